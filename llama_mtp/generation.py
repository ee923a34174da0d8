"""Speculative generation with the MTP drafter: exactly plain generation, only faster.

Per step (upstream's speculative-simple loop, run by :class:`llama_mtp.core.StepEngine`):
draft k tokens after id_last, decode ``[id_last, *draft]`` on the target in one
batch, hand it to the drafter, then sample row by row with the *same* llama.cpp
sampler chain plain llama-cpp-python uses, keeping drafts while the sampled
token equals the draft (upstream's sample-and-match). Each committed token is
sampled from the target's distribution given the committed prefix, consuming
the sampler's RNG in the same order as plain decoding, so greedy output is
identical and sampled output is distributed exactly as plain sampling.

:func:`generate` is the one-sequence case; :func:`generate_many` batches many
prompts through the target's sequence slots (``load(path, n_seq=N)``).
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Iterator, List, Optional, Sequence, Tuple, Union

import llama_cpp

from .core import Prompt, SequenceParams, StepEngine, sequence_params, tokenize_prompt
from .drafter import Drafter, resolve_drafter
from .errors import MtpArgumentError
from .prompt_cache import slot_cache
from .results import GenerationResult, GenerationStats
from .session import MtpSession

__all__ = ["GenerationResult", "GenerationStats", "GenerationStream", "OneSequenceRun", "generate",
           "generate_many", "tokenize_prompt"]


class OneSequenceRun:
    """One sequence on a one-shot StepEngine: the loop behind generate() and MtpLlama.generate.

    The engine leaves the sequence's tokens in the contexts, and the target Llama
    is told what its context holds, so plain llama-cpp-python calls can follow.
    """

    def __init__(self, target: llama_cpp.Llama, draft: llama_cpp.Llama, prompt_tokens: List[int],
                 params: SequenceParams, drafter: Drafter, *, session: Optional[MtpSession] = None,
                 n_reuse: int = 0) -> None:
        # one sequence shares its decodes with nobody: its prompt is decoded up front, and the
        # stats split prompt time from generation time as plain llama-cpp-python's timings do
        self.engine = StepEngine(target, draft, drafter=drafter, prefill="separate", session=session,
                                 keep_memory=True)
        try:
            if self.engine.n_slots < 1:
                raise MtpArgumentError("the session has no sequence slots")
            self.seq = self.engine.add(prompt_tokens, params, n_reuse=n_reuse)
        except BaseException:
            self.engine.close()
            raise
        self.stats = self.seq.stats

    def steps(self) -> Iterator[Tuple[List[int], str]]:
        """(committed tokens, final text) per step until the sequence ends; then the engine closes."""
        try:
            while not self.seq.finished:
                for ev in self.engine.step():
                    if ev.tokens or ev.text:
                        yield ev.tokens, ev.text
            if self.seq.error is not None:
                raise self.seq.error
        finally:
            self.engine.sync_target(self.seq)
            self.engine.close()

    def pieces(self) -> Iterator[str]:
        for _, text in self.steps():
            if text:
                yield text

    def tokens(self) -> Iterator[int]:
        for toks, _ in self.steps():
            yield from toks

    def result(self) -> GenerationResult:
        return self.seq.result()


class GenerationStream:
    """Iterator of committed text pieces; ``result`` is set once it is exhausted."""

    def __init__(self, run: OneSequenceRun) -> None:
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
             session: Optional[MtpSession] = None, verify: str = "match",
             drafter: str = "auto") -> Union[GenerationResult, GenerationStream]:
    """Generate from ``prompt`` with MTP speculative decoding.

    ``target``/``draft``: from :func:`llama_mtp.load` (or an MtpLlama and its draft).
    ``n_draft``: tokens drafted per step, or ``"auto"`` to pick each step's draft
    length (0 = a plain step) from the observed acceptance and costs.
    ``verify`` (temperature > 0): ``"match"`` (upstream's sample-and-match) or
    ``"rejection"`` (speculative sampling with drafts sampled from the MTP head).
    ``drafter``: "auto" (the session's own draft loop where the pair's draft mode has it, else
    upstream's drafter; see :mod:`llama_mtp.drafter`), "own" or "upstream" (upstream's
    drafter, fixed length, as llama.cpp's own loop runs it). A ``session`` fixes the drafter
    it was made for.
    Returns a :class:`GenerationResult`, or with ``stream=True`` a
    :class:`GenerationStream` yielding text pieces as tokens are committed.
    """
    params = sequence_params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop, verify=verify)
    chosen = resolve_drafter(target, draft, n_draft, verify, prefer=drafter, size_to_n_draft=True, session=session)
    run = OneSequenceRun(target, draft, tokenize_prompt(target, prompt), params, chosen, session=session)
    if stream:
        return GenerationStream(run)
    for _ in run.steps():
        pass
    return run.result()


def generate_many(target: llama_cpp.Llama, draft: llama_cpp.Llama, prompts: Sequence[Prompt], *,
                  max_tokens: int = 256, n_draft: Union[int, str] = "auto", temperature: float = 0.0,
                  top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                  seed: Optional[int] = None, stop: Union[None, str, Sequence[str]] = None,
                  verify: str = "match", prefill: str = "shared", cache_prompt: bool = True,
                  ctx_checkpoints: int = 8) -> List[GenerationResult]:
    """Generate from every prompt, batching up to ``n_seq`` sequences per target decode.

    ``target``/``draft`` come from ``llama_mtp.load(path, n_seq=N)``; with more prompts
    than N slots they run in waves through the free slots (continuous batching: a
    finished sequence's slot takes the next prompt at once). Results come in prompt
    order, each with its own stats; every sequence is exactly what :func:`generate`
    gives for that prompt alone (greedy: token for token). ``prefill``: "shared" (a
    joining prompt's chunks ride in the running sequences' verify decode, the default)
    or "separate" (decoded on their own before the next step).

    Prompt cache: each prompt goes to the slot whose memory shares the longest prefix with it
    (what this or an earlier call left there, as llama-server picks slots) and decodes only the
    rest; hybrid/recurrent targets keep ``ctx_checkpoints`` recurrent-state checkpoints per slot.
    ``cache_prompt=False``: every prompt is decoded in full. ``stats.n_cached_tokens`` says what
    each reused.
    """
    if isinstance(prompts, (str, bytes)):
        raise MtpArgumentError("generate_many takes a list of prompts (use generate() for one)")
    params = sequence_params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop, verify=verify,
                             cache_prompt=cache_prompt)
    chosen = resolve_drafter(target, draft, n_draft, verify)  # bad input raises even with nothing to run
    tokenized = [tokenize_prompt(target, p) for p in prompts]
    results: List[Optional[GenerationResult]] = [None] * len(tokenized)
    if not tokenized:
        return []
    cache = slot_cache(target, chosen.n_seq, ctx_checkpoints)
    with StepEngine(target, draft, drafter=chosen, prefill=prefill, keep_memory=True, cache=cache) as engine:
        for toks in tokenized:
            engine.check_prompt(toks)  # every prompt is checked before anything runs
        queue: Deque[Tuple[int, List[int]]] = deque(enumerate(tokenized))
        while queue or engine.active:
            while queue and engine.free_slots():
                index, toks = queue.popleft()
                engine.add(toks, params).tag = index
            for ev in engine.step():
                if ev.done:
                    if ev.seq.error is not None:
                        raise ev.seq.error
                    results[ev.seq.tag] = ev.seq.result()
    return [r for r in results if r is not None]
