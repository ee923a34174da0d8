"""MtpLlama: a drop-in ``llama_cpp.Llama`` whose generation runs MTP-accelerated.

``llm(prompt)``, ``create_completion`` (stream or not) and
``create_chat_completion`` keep llama-cpp-python's own code paths and dict
shapes: only ``Llama.generate`` (the token loop they all use) is replaced by
the speculative loop, with the very sampler chain llama-cpp-python builds.
"""

from __future__ import annotations

import os
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Union

import llama_cpp

from . import _compat
from .chat_completion import create_chat_completion
from .chat_templates import ChatTemplates, llama_cpp_templates
from .checkpoint import rollback_capacity
from .checks import NDraft, n_draft as check_n_draft
from .core import sequence_params
from .drafter import resolve_drafter
from .errors import MtpArgumentError
from .generation import OneSequenceRun
from .loading import MtpTargetLlama, open_pair
from .prompt_cache import PromptCheckpoints, common_prefix, reusable, swa_floor
from .results import GenerationStats
from .session import DraftMode, MtpSession


class MtpLlama(_compat.CompletionMaxTokens, MtpTargetLlama):
    """``llama_cpp.Llama`` with the model's MTP heads drafting ``n_draft`` tokens per step
    (``"auto"``: 0..n_draft_max, chosen per step from observed acceptance and costs).

    Owns its MTP draft context (``self.mtp_draft``) and session; ``close()``
    frees them first, exactly once. Requests MTP cannot honour token for token
    (``logits_processor``, ``stopping_criteria`` other than the end-of-generation stop
    llama-cpp-python adds for GGUF chat templates, logprobs via ``logits_all``)
    run through plain llama-cpp-python decoding instead; ``last_mtp_stats`` is
    then None.

    ``draft_model_path``: an external MTP drafter GGUF for a target without MTP heads (a
    gemma4-assistant for its gemma4 target; see :func:`llama_mtp.load`). Its draft mode
    (``is_mem_shared``) is not one the session's own draft loop implements: drafts then come
    from upstream's drafter (logged once, at construction), and ``verify="rejection"``
    raises MtpArgumentError.

    Prompt reuse: a call whose prompt shares a prefix with what the context holds
    decodes only the rest, as llama-cpp-python does; the MTP context keeps its own
    rows for that prefix (an external drafter on the target's KV has none: it keeps only the
    target's hidden state after the last token). Hybrid/recurrent targets (qwen35), where llama-cpp-python
    reuses nothing, keep up to ``ctx_checkpoints`` recurrent-state checkpoints (end of
    each prompt prefill and of each generation; LRU; 0 disables) and resume from the
    latest one at or before the common prefix (see :mod:`llama_mtp.prompt_cache`).
    """

    def __init__(self, model_path: str | os.PathLike[str], *, n_draft: Union[int, str] = "auto",
                 n_draft_max: int = 3, verify: str = "match", ctx_checkpoints: int = 4,
                 draft_model_path: Optional[str | os.PathLike[str]] = None, **llama_kwargs: Any) -> None:
        n_draft = check_n_draft(n_draft)
        if n_draft != "auto":  # a fixed length needs no deeper rollback or more verify rows than itself
            n_draft_max = max(1, n_draft)

        def init_target(path: str, **kwargs: Any) -> MtpTargetLlama:
            super(MtpLlama, self).__init__(path, **kwargs)
            return self

        _, self.mtp_draft = open_pair(init_target, model_path, n_draft_max=n_draft_max, n_seq=1,
                                      draft_model_path=draft_model_path, llama_kwargs=llama_kwargs)
        self._mtp_session: Optional[MtpSession] = None
        # Llama.close() unwinds its ExitStack last-in first-out: MTP parts go before the target
        _compat.on_close(self, self._close_mtp)
        try:
            # llama_mtp.drafter's one rule: the own draft loop where the mode has it, else
            # upstream's drafter (logged), and verify="rejection" raises without the own loop
            self.mtp_drafter = resolve_drafter(self, self.mtp_draft, n_draft, verify)
        except BaseException:
            self.close()
            raise
        # a drafter on the target's own KV (is_mem_shared) has no memory of its own to catch up
        self._mtp_shared_kv = self.mtp_drafter.mode.mode == "mem_shared"
        self.mtp_verify = verify
        self.last_mtp_stats: Optional[GenerationStats] = None
        self.mtp_checkpoints = PromptCheckpoints(self, ctx_checkpoints)
        # tokens whose MTP rows the drafter holds (its context, or deferred in the session), and
        # with a shared KV the tokens the drafter's hidden state was taken after: plain-decoding
        # fallbacks and load_state() change the target only
        self._mtp_tokens: List[int] = []
        self._recurrent = rollback_capacity(self) is not None
        # llama.cpp's chat templates (tool calls, reasoning) unless a llama-cpp-python chat format was named
        self.mtp_chat_templates: Optional[ChatTemplates] = llama_cpp_templates(
            self, llama_kwargs.get("chat_format"), llama_kwargs.get("chat_handler"))

    @property
    def mtp_draft_mode(self) -> DraftMode:
        """The pair's draft mode (see :class:`llama_mtp.session.DraftMode`)."""
        return self.mtp_drafter.mode

    @property
    def mtp_n_draft(self) -> NDraft:
        """The draft length of the next generations ("auto" or an int <= n_draft_max); settable."""
        return self.mtp_drafter.n_draft

    @mtp_n_draft.setter
    def mtp_n_draft(self, n_draft: NDraft) -> None:
        self.mtp_drafter = self.mtp_drafter.with_n_draft(n_draft)

    def _close_mtp(self) -> None:
        if self._mtp_session is not None:
            self._mtp_session.close()
            self._mtp_session = None
        draft = self.__dict__.pop("mtp_draft", None)
        if draft is not None:
            draft.close()

    def _session(self) -> MtpSession:
        if self._mtp_session is None or self._mtp_session.closed:
            # the own draft loop: deferred MTP decodes, exact draft lengths; or upstream's drafter
            # (backend sampling, as llama.cpp runs it) for a mode the own loop lacks
            own = self.mtp_drafter.own_loop
            self._mtp_session = MtpSession(self, self.mtp_draft, n_draft_max=self.mtp_drafter.k_max,
                                           backend_sampling=not own, defer_catchup=own)
        return self._mtp_session

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor: Any = None, stopping_criteria: Any = None,
                 grammar: Any = None) -> Iterator[int]:
        sampling = dict(top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, temp=temp,
                        repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                        presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                        mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, penalize_nl=penalize_nl,
                        grammar=grammar)
        # a chat template's stop on end-of-generation tokens changes nothing create_completion does
        # (it stops there first), unless the prompt itself ends in one (then plain returns at once)
        chat_stop = _compat.chat_eog_stop_ids(stopping_criteria, self) if stopping_criteria is not None else None
        if chat_stop is not None and tokens and int(tokens[-1]) not in chat_stop:
            stopping_criteria = None
        # a completion's max_tokens, as a hard cap (llama-cpp-python's loop overshoots it mid-character)
        cap = _compat.completion_cap(self)
        if cap is not None:
            yield from cap.tokens(self._generate(tokens, reset, logits_processor, stopping_criteria, sampling))
        else:
            yield from self._generate(tokens, reset, logits_processor, stopping_criteria, sampling)

    def _generate(self, tokens: Sequence[int], reset: bool, logits_processor: Any, stopping_criteria: Any,
                  sampling: dict) -> Iterator[int]:
        temp = sampling.pop("temp")
        if logits_processor is not None or stopping_criteria is not None or _compat.logits_all(self) \
                or "mtp_draft" not in self.__dict__:
            self.last_mtp_stats = None
            yield from super().generate(tokens, reset=reset, logits_processor=logits_processor,
                                        stopping_criteria=stopping_criteria, temp=temp, **sampling)
            return
        # Llama.generate's contract: every token is yielded, the caller stops (max_tokens, stops, EOG)
        params = sequence_params(max_tokens=self.n_ctx(), verify=self.mtp_verify, raw=True,
                                 temperature=temp, **sampling)
        prompt = list(tokens)
        if not reset:  # Llama.generate(reset=False): the tokens continue what the context holds
            prompt = _compat.context_tokens(self) + prompt
        if not prompt:
            raise MtpArgumentError("generate() needs at least one token to decode")
        session = self._session()
        run: Optional[OneSequenceRun] = None
        try:
            run = OneSequenceRun(self, self.mtp_draft, prompt, params, self.mtp_drafter, session=session,
                                 n_reuse=self._reuse(prompt))
            if self._recurrent:
                self.mtp_checkpoints.save(prompt[:-1])  # the end of the prefill
            self.last_mtp_stats = run.stats
            yield from run.tokens()
            if run.seq.grammar_refused is not None and _compat.eog_token(self) >= 0:
                # llama-cpp-python's loop ends a completion at end-of-generation ("stop"): the grammar
                # refused the last token, after which nothing can be sampled
                yield _compat.eog_token(self)
        except GeneratorExit:  # the caller stopped (max_tokens, a stop string): the contexts are consistent
            self._settled(run)
            raise
        except BaseException:
            self._settled(None)
            raise
        else:
            self._settled(run)

    def _reuse(self, prompt: List[int]) -> int:
        """Leading prompt tokens both contexts keep (restoring a checkpoint if the target is recurrent)."""
        held = _compat.context_tokens(self)
        limit = min(common_prefix(held, prompt), len(prompt) - 1)
        if not self._mtp_shared_kv:
            # the drafter's rows need the target's hidden states, which only a target decode makes:
            # the target re-decodes what the drafter lacks (after a plain fallback or load_state())
            limit = min(limit, common_prefix(self._mtp_tokens, prompt))
        elif 0 < limit == len(prompt) - 1 and self._mtp_tokens != prompt[:limit]:
            # a drafter on the target's KV reads the whole prefix from it; all it keeps is the
            # target's hidden state after the last token a decode handed it (that of _mtp_tokens).
            # With nothing left to prefill, the first draft reads that state: unless it is the one
            # after prompt[:limit], the target re-decodes the last reused token to renew it
            limit -= 1
        return reusable(held, prompt, limit, self.mtp_checkpoints if self._recurrent else None, swa_floor(self, 0))

    def _settled(self, run: Optional[OneSequenceRun]) -> None:
        """After a run: record what both contexts hold; after a failure, hold nothing."""
        if run is None or run.seq.error is not None or not _compat.native_context(self):
            self._mtp_tokens = []
            if _compat.native_context(self):
                _compat.sync_llama_tokens(self, [], 0)
                # a drafter on the target's KV has no memory of its own to clear
                for llm in (self,) if self._mtp_shared_kv else (self, self.mtp_draft):
                    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(_compat.native_context(llm)), -1, -1, -1)
            return
        self._mtp_tokens = _compat.context_tokens(self)
        if self._recurrent:
            self.mtp_checkpoints.save(self._mtp_tokens)  # the end of the generation

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        result = super().create_completion(*args, **kwargs)
        if isinstance(result, dict):
            _add_prediction_usage(result, self.last_mtp_stats)
        return result

    def create_chat_completion(self, messages: List[Dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        """llama-cpp-python's ``create_chat_completion``; for a GGUF with a chat template (and no
        ``chat_format``/``chat_handler`` named at construction) formatted and parsed by llama.cpp's
        own chat code as llama-server does it: ``message.tool_calls`` with ``finish_reason:
        "tool_calls"``, ``message.reasoning_content``, streamed as OpenAI deltas.

        Keywords beyond llama-cpp-python's (template ones, as llama-server reads them):
        ``parallel_tool_calls``, ``chat_template_kwargs`` (e.g. ``{"enable_thinking": False}``),
        ``reasoning_format``, ``reasoning_effort``, ``add_generation_prompt``.
        ``functions``/``function_call`` (OpenAI's legacy form) and ``logits_processor`` keep
        llama-cpp-python's own handler path.
        """
        if args:
            raise TypeError("create_chat_completion takes messages and keyword arguments")
        legacy = any(kwargs.get(k) is not None for k in ("functions", "function_call", "logits_processor"))
        if self.mtp_chat_templates is None or legacy:
            template_only = sorted(k for k in _TEMPLATE_KEYWORDS if kwargs.get(k) is not None)
            if template_only:
                raise MtpArgumentError(f"{', '.join(template_only)} need llama.cpp's chat templates, which this "
                                       "call does not use (a chat_format was named, or functions/function_call)")
            return super().create_chat_completion(messages, **{k: v for k, v in kwargs.items() if k not in _TEMPLATE_KEYWORDS})
        body: Dict[str, Any] = {"messages": messages}
        for key in ("tools", "tool_choice", "response_format", *_TEMPLATE_KEYWORDS):
            if kwargs.get(key) is not None:
                body[key] = kwargs.pop(key)
        grammar = kwargs.pop("grammar", None)
        if grammar is not None:
            body["grammar"] = grammar._grammar if isinstance(grammar, llama_cpp.LlamaGrammar) else str(grammar)
        if kwargs.pop("logprobs", None):
            kwargs["logprobs"] = kwargs.pop("top_logprobs", None) or 0
        kwargs.pop("top_logprobs", None)
        kwargs.setdefault("temperature", 0.2)  # llama-cpp-python's chat default
        stream = bool(kwargs.pop("stream", False))
        model = kwargs.pop("model", None) or self.model_path
        # no user spans: the one conversation goes on in seq 0, whose checkpoints at each prompt's
        # and each generation's end serve its next turn
        return create_chat_completion(self.mtp_chat_templates, self, self._templated_completion, body,
                                      model=model, stream=stream, with_user_spans=False, **kwargs)

    def _templated_completion(self, prompt: List[int], *, stream: bool, special_ids: FrozenSet[int],
                              **kwargs: Any) -> Any:
        """create_completion with the chat template's preserved tokens rendered in the text."""
        if not stream:
            with _compat.rendering_special(self, special_ids):
                return self.create_completion(prompt, stream=False, **kwargs)

        def chunks() -> Iterator[Any]:
            with _compat.rendering_special(self, special_ids):
                yield from self.create_completion(prompt, stream=True, **kwargs)

        return chunks()


# create_chat_completion keywords only llama.cpp's templates read
_TEMPLATE_KEYWORDS = ("parallel_tool_calls", "chat_template_kwargs", "reasoning_format", "reasoning_effort",
                      "add_generation_prompt")


def _add_prediction_usage(result: dict, stats: Optional[GenerationStats]) -> None:
    """OpenAI's usage fields: prompt_tokens_details.cached_tokens, and completion_tokens_details for
    speculated tokens."""
    usage = result.get("usage")
    if stats is None or not isinstance(usage, dict):
        return
    usage["prompt_tokens_details"] = {"cached_tokens": stats.n_cached_tokens}  # the prompt cache's reuse
    usage["completion_tokens_details"] = {
        "accepted_prediction_tokens": stats.accepted,
        "rejected_prediction_tokens": stats.drafted - stats.accepted,
    }
