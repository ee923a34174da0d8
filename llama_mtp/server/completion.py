"""What llama-cpp-python's chat handlers see as ``llama``: a per-request stand-in for the target Llama.

A chat handler (Jinja2 templates from the GGUF, every registered ``--chat_format``,
tools, ``response_format``) formats the messages, builds a grammar, and calls
``llama.create_completion(...)``. ``EngineLlama`` answers that call by submitting
to the multi-sequence :class:`llama_mtp.Engine` and returns exactly the shapes
``llama_cpp.Llama.create_completion`` returns (a completion dict, or an iterator
of chunk dicts), with ``usage.completion_tokens_details`` added. The completion
endpoint calls it directly, so both endpoints share one path.

Only read-only attributes are forwarded to the target (tokenizer, metadata,
special tokens): the engine's worker thread is the only one that may touch the
contexts, so a handler reaching for ``eval``/``reset``/``_ctx`` gets a clear
error instead of racing it.
"""

from __future__ import annotations

import codecs
import threading
import time
import uuid
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Union

import llama_cpp

from llama_mtp.results import GenerationResult

from .backend import Backend, RequestRecord
from .errors import ApiError, UnsupportedParameterError

Prompt = Union[str, List[int]]
# llama-cpp-python's completion dicts (CreateCompletionResponse / ...StreamResponse and their usage)
Completion = Dict[str, Any]
Usage = Dict[str, Any]

# Attributes of the target Llama a handler may read: none of them touches a context.
_FORWARDED = frozenset({
    "tokenize", "detokenize", "tokenizer_", "token_eos", "token_bos", "token_nl", "n_vocab", "metadata",
    "model_path", "chat_format", "chat_handler", "verbose", "n_batch",
})


class EngineLlama:
    """A stand-in for ``llama_cpp.Llama`` whose completions run in the shared engine.

    One per HTTP request: it remembers the handles it submitted so the server can
    cancel them when the client goes away (``cancel``).
    """

    def __init__(self, backend: Backend, *, kind: str, n_draft: Optional[int] = None, cache_prompt: bool = True) -> None:
        self._backend = backend
        self._kind = kind
        self._n_draft = n_draft
        self._cache_prompt = cache_prompt
        self._records: List[RequestRecord] = []
        self._lock = threading.Lock()
        self._cancelled = False

    # -- what a chat handler reads ------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name in _FORWARDED:
            return getattr(self._backend.target, name)
        raise UnsupportedParameterError(
            f"this chat handler needs Llama.{name}, which reads or changes the model's context; the "
            "multi-sequence engine owns the contexts, so this chat format cannot be served by llama_mtp.server",
            param="chat_format", status=500)

    def n_ctx(self) -> int:
        """One slot's context: what a single request can use."""
        return self._backend.slot_ctx

    # -- cancellation ---------------------------------------------------------------------

    def cancel(self) -> None:
        """Cancel every handle of this request (the client went away); idempotent."""
        with self._lock:
            self._cancelled = True
            records = list(self._records)
        for rec in records:
            if not rec.handle.done:
                rec.handle.cancel()
            self._backend.reap(rec)

    # -- the completion call ----------------------------------------------------------------

    def __call__(self, prompt: Prompt, **kwargs: Any) -> Union[Completion, Iterator[Completion]]:
        return self.create_completion(prompt, **kwargs)

    def create_completion(
        self,
        prompt: Prompt,
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria: Any = None,
        logits_processor: Any = None,
        grammar: Optional[llama_cpp.LlamaGrammar] = None,
        logit_bias: Optional[Dict[Any, float]] = None,
        special_ids: FrozenSet[int] = frozenset(),
        user_spans: Sequence[Tuple[int, int]] = (),
    ) -> Union[Completion, Iterator[Completion]]:
        """``llama_cpp.Llama.create_completion``, run as one engine sequence.

        The completion dict, or the last chunk of a stream, carries the ``usage``.
        ``stopping_criteria`` is not evaluated: the chat formatters' only criterion
        stops on the EOS token, which the engine stops on anyway (every EOG token).
        ``tfs_z`` is ignored, as llama-cpp-python's own sampler chain ignores it.
        ``special_ids``: tokens the text renders even if they are control tokens (llama.cpp's chat
        templates' preserved tokens); ``user_spans``: where a chat template's user messages start and end
        (see Engine.submit).
        """
        del tfs_z, mirostat_tau, mirostat_eta, stopping_criteria
        b = self._backend
        if suffix is not None:
            raise UnsupportedParameterError("suffix (fill-in-the-middle) is not supported", param="suffix")
        if logits_processor is not None:
            raise UnsupportedParameterError("logits processors cannot run inside the engine (min_tokens and "
                                            "custom processors are not supported)", param="logits_processor")
        if mirostat_mode and temperature > 0:
            raise UnsupportedParameterError("mirostat sampling is not supported", param="mirostat_mode")
        if isinstance(prompt, list) and not prompt:
            raise ApiError("the prompt is empty", param="prompt")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        bias = _int_logit_bias(logit_bias, b.n_vocab) if logit_bias else None
        if max_tokens is None or max_tokens <= 0:
            # llama-cpp-python: unlimited, up to the context; the engine ends at "length" there
            max_tokens = b.slot_ctx
        rec = self._submit(
            prompt, max_tokens=int(max_tokens), temperature=float(temperature), top_k=int(top_k),
            top_p=float(top_p), min_p=float(min_p), typical_p=float(typical_p), repeat_penalty=float(repeat_penalty),
            frequency_penalty=float(frequency_penalty or 0.0), presence_penalty=float(presence_penalty or 0.0),
            seed=seed, stop=stops or None, grammar=grammar, logit_bias=bias, logprobs=logprobs, special_ids=special_ids,
            user_spans=user_spans)
        shape = _Shape(b, prompt, model or b.model_alias, logprobs)
        return self._chunks(rec, shape) if stream else self._whole(rec, shape, echo)

    def _submit(self, prompt: Prompt, **sampling: Any) -> RequestRecord:
        """Submit one sequence to the engine, unless the client already went away."""
        with self._lock:
            # under the lock: a cancel() racing this submission either sees the record or stops it here
            if self._cancelled:
                raise ApiError("the client closed the request", status=499, err_type="client_closed_request")
            t0 = time.perf_counter()
            handle = self._backend.engine.submit(prompt, n_draft=self._n_draft, cache_prompt=self._cache_prompt,
                                                 **sampling)
            rec = RequestRecord(handle, self._kind, t0)
            self._records.append(rec)
        return rec

    def _whole(self, rec: RequestRecord, shape: "_Shape", echo: bool) -> Completion:
        """The finished completion as llama-cpp-python's completion dict."""
        b = self._backend
        try:
            res = rec.handle.result()
        except BaseException:
            b.reap(rec)
            raise
        b.finished(rec, res)
        text = res.text
        if echo:
            text = (shape.prompt if isinstance(shape.prompt, str) else b.detok(shape.prompt)) + text
        return {
            "id": shape.id,
            "object": "text_completion",
            "created": shape.created,
            "model": shape.model,
            "choices": [{"text": text, "index": 0, "logprobs": shape.logprobs(res),
                         "finish_reason": res.finish_reason}],
            "usage": usage(res, b.n_completion_tokens(res)),
        }

    def _chunks(self, rec: RequestRecord, shape: "_Shape") -> Iterator[Completion]:
        """llama-cpp-python's stream chunks; the last one also carries ``usage``."""
        handle = rec.handle
        done = False
        try:
            if shape.n_logprobs is None:
                for piece in handle:
                    yield shape.chunk(piece)
                res = handle.result()
            else:
                # logprobs are per token and come with the result: emit one chunk per token then,
                # as llama-cpp-python's stream does for the tokens it held back
                for _ in handle:
                    pass
                res = handle.result()
                for text, lp in shape.token_chunks(res):
                    yield shape.chunk(text, lp)
            done = True
            self._backend.finished(rec, res)
            final = shape.chunk("", None, res.finish_reason)
            final["usage"] = usage(res, self._backend.n_completion_tokens(res))
            yield final
        finally:
            if not done:
                # closed early (client gone) or failed: free the slot at the next step
                if not handle.done:
                    handle.cancel()
                self._backend.reap(rec)


def usage(res: GenerationResult, n_completion: int) -> Usage:
    """OpenAI usage with the speculative counts in completion_tokens_details."""
    st = res.stats
    return {
        "prompt_tokens": st.n_prompt_tokens,
        "completion_tokens": n_completion,
        "total_tokens": st.n_prompt_tokens + n_completion,
        "prompt_tokens_details": {"cached_tokens": st.n_cached_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": st.accepted,
            "rejected_prediction_tokens": st.drafted - st.accepted,
        },
    }


def _int_logit_bias(logit_bias: Dict[Any, float], n_vocab: int) -> Dict[int, float]:
    out: Dict[int, float] = {}
    for key, value in logit_bias.items():
        try:
            tok = int(key)
            bias = float(value)
        except (TypeError, ValueError):
            raise ApiError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= tok < n_vocab:
            raise ApiError(f"logit_bias token {tok} is outside the vocabulary [0, {n_vocab})", param="logit_bias")
        out[tok] = bias
    return out


class _Shape:
    """Builds llama-cpp-python's completion dicts for one request."""

    def __init__(self, backend: "Backend", prompt: Union[str, List[int]], model: str,
                 n_logprobs: Optional[int]) -> None:
        self.backend = backend
        self.prompt = prompt
        self.model = model
        self.n_logprobs = n_logprobs
        self.id = f"cmpl-{uuid.uuid4()}"
        self.created = int(time.time())

    def chunk(self, text: str, logprobs: Optional[Dict[str, Any]] = None,
              finish_reason: Optional[str] = None) -> Dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}],
        }

    def _entries(self, res: Any) -> List[Dict[str, Any]]:
        # the end-of-generation token is not part of the completion (llama-cpp-python leaves it out)
        return list(res.logprobs or [])[: self.backend.n_completion_tokens(res)]

    def logprobs(self, res: Any) -> Optional[Dict[str, Any]]:
        """llama-cpp-python's CompletionLogprobs for the generated tokens (echo excluded)."""
        if self.n_logprobs is None:
            return None
        entries = self._entries(res)
        tokens = [e["token"] for e in entries]
        texts = token_texts(self.backend.detok_bytes, tokens)
        offset = len(self.prompt)  # llama-cpp-python: len(prompt), characters or tokens
        text_offsets: List[int] = []
        for t in texts:
            text_offsets.append(offset)
            offset += len(t)
        return {
            "tokens": [self.backend.token_str(t) for t in tokens],
            "text_offset": text_offsets,
            "token_logprobs": [float(e["logprob"]) for e in entries],
            "top_logprobs": [self._top(e) for e in entries],
        }

    def _top(self, entry: Dict[str, Any]) -> Dict[str, float]:
        top = {self.backend.token_str(int(t)): float(lp) for t, lp in entry.get("top_logprobs", {}).items()}
        top[self.backend.token_str(int(entry["token"]))] = float(entry["logprob"])
        return top

    def token_chunks(self, res: Any) -> Iterator[tuple]:
        """(text, logprobs) per generated token; the texts add up to ``res.text``."""
        entries = self._entries(res)
        tokens = [e["token"] for e in entries]
        texts = token_texts(self.backend.detok_bytes, tokens)
        remaining = len(res.text)
        offset = len(self.prompt)
        for entry, text in zip(entries, texts):
            if remaining <= 0:
                break
            text = text[:remaining]  # a stop string cut the text inside this token
            remaining -= len(text)
            yield text, {
                "tokens": [self.backend.token_str(int(entry["token"]))],
                "text_offset": [offset],
                "token_logprobs": [float(entry["logprob"])],
                "top_logprobs": [self._top(entry)],
            }
            offset += len(text)


def token_texts(detok_bytes: Any, tokens: Sequence[int]) -> List[str]:
    """Each token's share of the decoded text (multi-byte characters go to the token that completes them)."""
    # "ignore", as the engine's text and llama-cpp-python decode: the pieces add up to the text
    dec = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    out = [dec.decode(detok_bytes([int(t)])) for t in tokens]
    if out:
        out[-1] += dec.decode(b"", final=True)
    return out
