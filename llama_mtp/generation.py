"""Speculative generation with the MTP drafter: exactly plain generation, only faster.

Per step (upstream's speculative-simple loop): draft k tokens after id_last,
decode ``[id_last, *draft]`` on the target in one batch, hand it to the
drafter, then sample row by row with the *same* llama.cpp sampler chain plain
llama-cpp-python uses, keeping drafts while the sampled token equals the draft
(upstream's sample-and-match). Each committed token is sampled from the
target's distribution given the committed prefix, consuming the sampler's RNG
in the same order as plain decoding, so greedy output is identical and sampled
output is distributed exactly as plain sampling.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import llama_cpp

from .errors import MtpArgumentError, MtpError, MtpProcessError
from .adaptive import DraftPolicy
from .checkpoint import TargetCheckpoint, rollback_capacity
from .session import MtpSession
from .verify import GreedyVerifier, MatchVerifier, RejectionVerifier, is_plain_greedy, supports_rejection
from .text import TextAssembler

Prompt = Union[str, bytes, Sequence[int]]


@dataclass
class GenerationStats:
    n_prompt_tokens: int = 0
    n_generated: int = 0
    steps: int = 0                    # target verify decodes after the prompt
    drafted: int = 0
    accepted: int = 0
    drafted_per_pos: List[int] = field(default_factory=list)
    accepted_per_pos: List[int] = field(default_factory=list)
    draft_len_hist: List[int] = field(default_factory=list)  # steps that drafted k tokens, k = index
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    t_decode: float = 0.0             # target decodes (prompt excluded)
    t_draft: float = 0.0
    t_process: float = 0.0
    t_sample: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_pos_acceptance(self) -> List[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_pos, self.drafted_per_pos)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verify step."""
        return self.n_generated / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.n_generated / self.generation_seconds if self.generation_seconds > 0 else 0.0

    @property
    def t_python(self) -> float:
        """Generation time spent outside llama.cpp calls."""
        return max(0.0, self.generation_seconds - self.t_decode - self.t_draft - self.t_process - self.t_sample)

    def as_dict(self) -> dict:
        keys = ("n_prompt_tokens", "n_generated", "steps", "drafted", "accepted", "drafted_per_pos",
                "accepted_per_pos", "draft_len_hist", "prompt_seconds", "generation_seconds", "t_decode",
                "t_draft", "t_process", "t_sample")
        out = {k: getattr(self, k) for k in keys}
        out.update(acceptance_rate=self.acceptance_rate, per_pos_acceptance=self.per_pos_acceptance,
                   mean_accepted_length=self.mean_accepted_length, tokens_per_second=self.tokens_per_second,
                   t_python=self.t_python)
        return out


@dataclass
class GenerationResult:
    tokens: List[int]
    text: str
    finish_reason: str  # "stop" | "length"
    stats: GenerationStats


class GenerationStream:
    """Iterator of committed text pieces; ``result`` is set once it is exhausted."""

    def __init__(self, run: "_Run") -> None:
        self._run = run
        self._it = run.pieces()
        self.result: Optional[GenerationResult] = None

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._it)
        except StopIteration:
            self.result = self._run.result()
            raise

    def close(self) -> None:
        self._it.close()


def generate(target: llama_cpp.Llama, draft: llama_cpp.Llama, prompt: Prompt, *, max_tokens: int = 256,
             n_draft: Union[int, str] = "auto", temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95,
             min_p: float = 0.05, repeat_penalty: float = 1.0, seed: Optional[int] = None,
             stop: Union[None, str, Sequence[str]] = None, stream: bool = False,
             session: Optional[MtpSession] = None, verify: str = "match") -> Union[GenerationResult, GenerationStream]:
    """Generate from ``prompt`` with MTP speculative decoding.

    ``target``/``draft``: from :func:`llama_mtp.load` (or an MtpLlama and its draft).
    ``n_draft``: tokens drafted per step, or ``"auto"`` to pick each step's draft
    length (0 = a plain step) from the observed acceptance and costs.
    ``verify`` (temperature > 0): ``"match"`` (upstream's sample-and-match) or
    ``"rejection"`` (speculative sampling with drafts sampled from the MTP head).
    Returns a :class:`GenerationResult`, or with ``stream=True`` a
    :class:`GenerationStream` yielding text pieces as tokens are committed.
    """
    if temperature < 0:
        raise MtpArgumentError(f"temperature must be >= 0, got {temperature}")
    sampling = dict(top_k=top_k, top_p=top_p, min_p=min_p, temp=temperature, repeat_penalty=repeat_penalty)
    run = _Run(target, draft, prompt, max_tokens=max_tokens, n_draft=n_draft, sampling=sampling, seed=seed,
               stop=stop, session=session, verify=verify)
    if stream:
        return GenerationStream(run)
    for _ in run.pieces():
        pass
    return run.result()


def tokenize_prompt(llm: llama_cpp.Llama, prompt: Prompt) -> List[int]:
    """Tokens of a prompt, as llama-cpp-python's create_completion tokenizes it."""
    if isinstance(prompt, str):
        return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    if isinstance(prompt, bytes):
        return llm.tokenize(prompt, add_bos=True, special=True)
    try:
        tokens = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise MtpArgumentError(f"prompt must be str, bytes or a sequence of token ids, got {type(prompt).__name__}") from None
    n_vocab = llm.n_vocab()
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise MtpArgumentError(f"prompt token {bad[0]} is outside the vocabulary [0, {n_vocab})")
    return tokens


class _Run:
    """One generation: prefill, then draft/verify/accept steps."""

    def __init__(self, target: llama_cpp.Llama, draft: llama_cpp.Llama, prompt: Prompt, *, max_tokens: int,
                 n_draft: Union[int, str], sampling: dict, seed: Optional[int],
                 stop: Union[None, str, Sequence[str]], session: Optional[MtpSession], verify: str = "match") -> None:
        if not isinstance(target, llama_cpp.Llama) or not isinstance(draft, llama_cpp.Llama):
            raise MtpArgumentError("generate() takes the target and draft llama_cpp.Llama objects (see llama_mtp.load)")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise MtpArgumentError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        auto = n_draft == "auto"
        if not auto and (isinstance(n_draft, bool) or not isinstance(n_draft, int) or n_draft < 0):
            raise MtpArgumentError(f"n_draft must be an int >= 0 or 'auto', got {n_draft!r}")
        if verify not in ("match", "rejection"):
            raise MtpArgumentError(f"verify must be 'match' or 'rejection', got {verify!r}")
        if verify == "rejection" and not supports_rejection(sampling):
            # rejection needs a target distribution: temperature > 0, no grammar or mirostat
            verify = "match"
        self.target, self.draft = target, draft
        self.tokens_prompt = tokenize_prompt(target, prompt)
        if not self.tokens_prompt:
            raise MtpArgumentError("the prompt is empty")
        # llama.cpp may round n_ctx up; llama-cpp-python's token buffer keeps the requested size
        self.n_ctx = min(target.n_ctx(), len(target.input_ids))
        if len(self.tokens_prompt) >= self.n_ctx:
            raise MtpArgumentError(f"the prompt has {len(self.tokens_prompt)} tokens, more than the context "
                                   f"allows (n_ctx={self.n_ctx}); shorten it or load with a larger n_ctx")
        self.max_tokens = max_tokens
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.owns_session = session is None
        k_max = int(getattr(target, "mtp_n_draft_max", 3)) if auto else max(1, int(n_draft))
        own_draft = auto or verify == "rejection" or (session is not None and session.defer_catchup)
        # the own draft loop (exact n_max, sampled drafts) reads draft logits: no backend sampler,
        # and it takes the deferred catch-up rows into its first decode (plain steps skip the MTP
        # context); upstream's drafter keeps its default (top-k on the backend, as the native loop)
        self.session = session or MtpSession(target, draft, n_draft_max=k_max, backend_sampling=not own_draft,
                                             defer_catchup=own_draft)
        if self.session.target is not target:
            raise MtpArgumentError("the session was created for another target Llama")
        if not auto and n_draft > self.session.n_draft_max:
            raise MtpArgumentError(f"n_draft={n_draft} exceeds the session's n_draft_max={self.session.n_draft_max}")
        self.n_draft = self.session.n_draft_max if auto else int(n_draft)
        self.policy = DraftPolicy(self.n_draft) if auto else None
        self.rollback_cap = rollback_capacity(target)
        self.checkpoint = TargetCheckpoint(target)
        self.use_checkpoint = False
        self._observation: Optional[tuple] = None  # last step's (k, n_acc, t_verify, t_draft, t_start, steady)
        self._k_prev = 0
        self.verify_mode = verify
        self.own_draft = own_draft
        self.draft_temp = sampling["temp"] if verify == "rejection" else 0.0
        self.draft_top_k = sampling.get("top_k", 40) if sampling.get("top_k", 40) > 0 else 40
        self.rng = random.Random(seed)
        if seed is not None:
            target.set_seed(seed)
        if verify == "rejection":
            self.verifier: Any = RejectionVerifier(target, sampling, seed)
        elif is_plain_greedy(sampling):
            self.verifier = GreedyVerifier(target)
        else:
            self.verifier = MatchVerifier(target, sampling)
        self.ctx = target._ctx.ctx
        self.batch = target._batch.batch
        self.n_batch = target.n_batch
        self.vocab = target._model.vocab
        self.stats = GenerationStats(n_prompt_tokens=len(self.tokens_prompt),
                                     drafted_per_pos=[0] * self.n_draft, accepted_per_pos=[0] * self.n_draft,
                                     draft_len_hist=[0] * (self.n_draft + 1))
        self.generated: List[int] = []
        self.finish_reason = "length"
        self.text = TextAssembler(lambda toks, prev: target.detokenize(toks, prev_tokens=prev),
                                  self.tokens_prompt, self.stop)

    # -- driver -----------------------------------------------------------------------------

    def pieces(self) -> Iterator[str]:
        """Text pieces as tokens are committed (stop strings, EOG and max_tokens applied)."""
        for _, piece in self._loop(self._commit):
            if piece:
                yield piece
        tail = self.text.finish()
        if tail:
            yield tail

    def tokens(self) -> Iterator[int]:
        """Committed tokens, unbounded (the caller stops, as Llama.generate's callers do)."""
        for new_tokens, _ in self._loop(self._commit_all):
            yield from new_tokens

    def _loop(self, commit: Callable[[List[int]], Tuple[int, str]]) -> Iterator[Tuple[List[int], str]]:
        """Prefill, then steps until the context is full or ``commit`` ends generation.

        ``commit`` decides how many of a step's tokens are kept; the rest is rolled back.
        """
        try:
            self._start()
            while True:
                new_tokens = self._step()
                if new_tokens is None:
                    break
                n_keep, piece = commit(new_tokens)
                self._settle(new_tokens, n_keep)
                self.stats.generation_seconds = time.perf_counter() - self._t_gen
                yield new_tokens[:n_keep], piece
                if self.finish_reason == "stop" or len(self.generated) >= self.max_tokens:
                    break
        finally:
            self._finish()

    def _commit_all(self, new_tokens: List[int]) -> Tuple[int, str]:
        self.generated.extend(new_tokens)
        return len(new_tokens), ""

    def result(self) -> GenerationResult:
        return GenerationResult(self.generated, self.text.text, self.finish_reason, self.stats)

    # -- phases -----------------------------------------------------------------------------

    def _start(self) -> None:
        t0 = time.perf_counter()
        self._prefill()
        self._t_gen = time.perf_counter()
        self.stats.prompt_seconds = self._t_gen - t0

    def _prefill(self) -> None:
        """Decode all prompt tokens but the last, each chunk handed to the drafter."""
        mem = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_seq_rm(mem, 0, 0, -1)
        self.draft._ctx.kv_cache_seq_rm(0, 0, -1)
        self.target.n_tokens = 0
        head = self.tokens_prompt[:-1]
        for i in range(0, len(head), self.n_batch):
            chunk = head[i: i + self.n_batch]
            self._decode(chunk, i, all_logits=False)
            self.session.process(self.batch)
        self.session.begin(0, head)
        self.n_past = len(head)
        self.id_last = self.tokens_prompt[-1]

    def _step(self) -> Optional[List[int]]:
        """Draft, verify in one target decode, sample: the tokens this step would commit.

        None when the context is full. Leaves the proposal pending until _settle().
        """
        st = self.stats
        t = time.perf_counter()
        if self._observation is not None and self.policy:
            k_prev, n_acc_prev, t_verify, t_draft, t_start, steady = self._observation
            self.policy.observe(k_prev, n_acc_prev, t_verify, t_draft, t - t_start, steady)
            self._observation = None
        if self.n_past >= self.n_ctx:
            self.finish_reason = "length"
            return None
        # never overrun the context or max_tokens (a step commits up to k+1 tokens)
        room = min(self.n_ctx - self.n_past - 2, self.max_tokens - len(self.generated) - 1)
        k = self.policy.choose(room) if self.policy else max(0, min(self.n_draft, room))
        self.q = None
        if k == 0:
            self.proposal = []
        elif self.own_draft:
            self.proposal, self.q = self.session.draft_dist(0, self.n_past, self.id_last, n_max=k,
                                                            temperature=self.draft_temp, top_k=self.draft_top_k,
                                                            seed=self.rng.getrandbits(32))
        else:
            self.proposal = self.session.draft(0, self.n_past, self.id_last, n_max=k)
        # a draft longer than the recurrent state can roll back: checkpoint first (upstream's path)
        self.use_checkpoint = bool(self.proposal) and self.rollback_cap is not None \
            and len(self.proposal) > self.rollback_cap
        if self.use_checkpoint:
            self.checkpoint.save(0)
        t2 = time.perf_counter()
        st.t_draft += t2 - t
        if not self._decode([self.id_last, *self.proposal], self.n_past, all_logits=True):
            self.finish_reason = "length"
            if self.proposal:
                self.session.begin(0, [])  # drop the proposal that could not be verified
            return None
        t3 = time.perf_counter()
        st.t_decode += t3 - t2
        self.session.process(self.batch)
        t4 = time.perf_counter()
        st.t_process += t4 - t3
        self.n_acc, new_tokens = self.verifier.verify(self.proposal, self.q)
        st.t_sample += time.perf_counter() - t4
        self._observation = (len(self.proposal), self.n_acc, t4 - t2, t2 - t, t, self._k_prev > 0)
        self._k_prev = len(self.proposal)
        return new_tokens

    def _commit(self, new_tokens: List[int]) -> Tuple[int, str]:
        """Apply EOG, stop strings and max_tokens token by token: (tokens kept, final text)."""
        out: List[str] = []
        for i, tok in enumerate(new_tokens):
            self.generated.append(tok)
            if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
                self.finish_reason = "stop"
                return i + 1, "".join(out)
            out.append(self.text.feed(tok))
            if self.text.stopped:
                self.finish_reason = "stop"
                return i + 1, "".join(out)
            if len(self.generated) >= self.max_tokens:
                self.finish_reason = "length"
                return i + 1, "".join(out)
        return len(new_tokens), "".join(out)

    def _settle(self, new_tokens: List[int], n_keep: int) -> None:
        """Accept what is kept; a stop inside the accepted drafts keeps only what precedes it."""
        st = self.stats
        n_acc = min(self.n_acc, n_keep - 1)
        if self.use_checkpoint and n_acc < len(self.proposal):
            self._redo(n_acc)
        if self.proposal:
            self.session.accept(0, n_acc)  # trims target and draft to n_past + 1 + n_acc
        st.steps += 1
        st.n_generated += n_keep
        st.drafted += len(self.proposal)
        st.accepted += n_acc
        st.draft_len_hist[len(self.proposal)] += 1
        for i in range(len(self.proposal)):
            st.drafted_per_pos[i] += 1
        for i in range(n_acc):
            st.accepted_per_pos[i] += 1
        self.n_past += 1 + n_acc
        self.id_last = new_tokens[n_keep - 1]

    def _redo(self, n_acc: int) -> None:
        """Restore the checkpoint and re-decode [id_last, accepted drafts] on both contexts."""
        self.checkpoint.restore(0, self.n_past)
        self.draft._ctx.kv_cache_seq_rm(0, self.n_past, -1)
        self._decode([self.id_last, *self.proposal[:n_acc]], self.n_past, all_logits=False)
        self.session.process(self.batch)

    def _decode(self, tokens: List[int], pos0: int, *, all_logits: bool) -> bool:
        """Decode tokens of seq 0 at pos0.. on the target; False when the context is full."""
        b = self.batch
        n = len(tokens)
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits
        b.logits[n - 1] = True
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc == 1:
            return False  # no room in the KV cache
        if rc != 0:
            raise MtpError(f"llama_decode failed on the target (status {rc})")
        return True

    def _finish(self) -> None:
        """Leave the target Llama consistent with its context (prompt + committed tokens but the last)."""
        tokens = self.tokens_prompt + self.generated
        n_past = min(getattr(self, "n_past", 0), len(tokens))
        try:
            if n_past and self.target._ctx.ctx:
                self.target.input_ids[:n_past] = tokens[:n_past]
            self.target.n_tokens = n_past
            self.target._requires_eval = True
        finally:
            self.verifier.close()
            if self.owns_session:
                self.session.close()
