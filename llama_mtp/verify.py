"""Verification of a draft against the target's batched logits.

``MatchVerifier`` is upstream's sample-and-match: sample each row with the
sampler chain plain llama-cpp-python builds and keep drafts while they agree.
Exact for any sampler; for a sampled draft its acceptance is P_target(draft).

``RejectionVerifier`` is standard speculative sampling (Leviathan et al.): a
draft token x drawn from the MTP head's q is kept with probability
min(1, p(x)/q(x)); on rejection the token comes from normalize(max(0, p - q)).
p is the target distribution after the same chain plain sampling applies
(penalties, top-k, typical, top-p, min-p, temperature), so the output is
distributed exactly as plain sampling, and acceptance is sum(min(p, q)).

Several sequences share one verify decode: ``verify(proposal, q, row0)`` reads
the sequence's rows ``row0 .. row0 + len(proposal)`` of that batch.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import llama_cpp
import numpy as np

from . import _compat, _loader
from .errors import MtpArgumentError, MtpError

log = logging.getLogger("llama_mtp")


def row_logits(llm: llama_cpp.Llama, row: int, n_vocab: int) -> np.ndarray:
    """The logits of batch row ``row`` of the last decode (a writable view)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(_compat.native_context(llm), row), shape=(n_vocab,))


def rows_logits(llm: llama_cpp.Llama, row0: int, n_rows: int, n_vocab: int) -> np.ndarray:
    """The logits of batch rows ``row0 .. row0 + n_rows - 1`` of the last decode, (n_rows, n_vocab).

    Consecutive output rows are consecutive in llama.cpp's logits buffer: one view of all of
    them when the first and last row's addresses say so (a greedy step's only numpy call),
    row by row otherwise.
    """
    ctx = _compat.native_context(llm)
    first = ctypes.cast(llama_cpp.llama_get_logits_ith(ctx, row0), ctypes.c_void_p).value
    if not first:
        raise MtpError(f"internal: batch row {row0} of the last decode has no logits")
    if n_rows > 1:
        last = ctypes.cast(llama_cpp.llama_get_logits_ith(ctx, row0 + n_rows - 1), ctypes.c_void_p).value
        if last != first + (n_rows - 1) * n_vocab * ctypes.sizeof(ctypes.c_float):
            return np.stack([row_logits(llm, row0 + i, n_vocab) for i in range(n_rows)])
    return np.frombuffer((ctypes.c_float * (n_rows * n_vocab)).from_address(first), dtype=np.float32).reshape(
        n_rows, n_vocab)


def top_logprobs(logits: np.ndarray, token: int, n_top: int) -> Dict[str, Any]:
    """llama-cpp-python's logprobs for one row: log-softmax of the raw logits."""
    z = logits.astype(np.float64)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    top = np.argsort(-logp, kind="stable")[:n_top] if n_top > 0 else np.array([], dtype=np.int64)
    return {"token": int(token), "logprob": float(logp[token]),
            "top_logprobs": {int(t): float(logp[t]) for t in top}}


class GreedyVerifier:
    """Temperature 0 with no-op penalties and no grammar: llama-cpp-python's chain is
    then argmax of the raw logits (first index on ties, as llama.cpp's greedy sampler),
    so one vectorised argmax over the verify rows replaces k+1 sampler calls."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        self.llm = llm
        self.n_vocab = llm.n_vocab()

    def verify(self, proposal: List[int], q: Any = None, row0: int = 0) -> Tuple[int, List[int]]:
        best = rows_logits(self.llm, row0, len(proposal) + 1, self.n_vocab).argmax(axis=1).tolist()
        for i, want in enumerate(proposal):
            if best[i] != want:
                return i, best[: i + 1]
        return len(proposal), best

    def close(self) -> None:
        pass


def is_plain_greedy(sampling: dict) -> bool:
    return (sampling.get("temp", 0.8) == 0.0 and sampling.get("repeat_penalty", 1.0) == 1.0
            and not sampling.get("frequency_penalty") and not sampling.get("presence_penalty")
            and sampling.get("grammar") is None and not sampling.get("mirostat_mode"))


class MatchVerifier:
    """``logit_bias`` is added to each row's logits before sampling (as llama-cpp-python's
    logit_bias processor does); ``logprobs`` (top-n) records each sampled token's
    log-probability from the raw row in ``self.logprobs``."""

    def __init__(self, llm: llama_cpp.Llama, sampling: dict, seed: Optional[int] = None, *,
                 logit_bias: Optional[Dict[int, float]] = None, logprobs: Optional[int] = None) -> None:
        # the exact sampler chain plain llama-cpp-python would build for these settings
        self.sampler = _compat.init_sampler(llm, sampling, seed)
        self.llm = llm
        self.ctx = _compat.llama_context(llm, "target")
        # sampled through the shim: a grammar refusing a token it let through (a lazy grammar's
        # trigger inside a token) throws in llama.cpp, which would abort the process
        self._ffi, self._lib = _loader.load()
        self._chain = self._ffi.cast("struct llama_sampler *", _compat.sampler_address(self.sampler))
        self._out = self._ffi.new("int32_t[2]")
        self.refused: Optional[str] = None  # why the grammar refused the last token (the sequence ends there)
        self.n_vocab = llm.n_vocab()
        self.bias = None
        if logit_bias:
            self.bias_ids = np.fromiter(logit_bias.keys(), dtype=np.int64)
            self.bias = np.fromiter(logit_bias.values(), dtype=np.float32)
        self.n_logprobs = logprobs
        self.logprobs: List[Dict[str, Any]] = []

    def _sample(self, row: int) -> int:
        raw = None
        if self.bias is not None or self.n_logprobs is not None:
            logits = row_logits(self.llm, row, self.n_vocab)
            raw = logits.copy() if self.n_logprobs is not None else None
            if self.bias is not None:
                logits[self.bias_ids] += self.bias  # in place: the sampler reads this row
        ctx = self._ffi.cast("struct llama_context *", _compat.context_address(self.ctx, "target"))
        status = self._lib.mtp_sampler_sample(self._chain, ctx, row, self._out, self._out + 1)
        if status != self._lib.MTP_OK:
            raise MtpError(f"sampling failed: {_loader.last_error()}")
        tok = int(self._out[0])
        if self._out[1]:
            self.refused = _loader.last_error()
            log.warning("the grammar refused the model's token %d (%s); the reply ends there", tok, self.refused)
        if raw is not None:
            self.logprobs.append(top_logprobs(raw, tok, int(self.n_logprobs or 0)))
        return tok

    def verify(self, proposal: List[int], q: Any = None, row0: int = 0) -> Tuple[int, List[int]]:
        new: List[int] = []
        for i, want in enumerate(proposal):
            tok = self._sample(row0 + i)
            new.append(tok)
            if tok != want or self.refused is not None:
                return i, new
        new.append(self._sample(row0 + len(proposal)))
        return len(proposal), new

    def close(self) -> None:
        self.sampler.close()


class RejectionVerifier:
    def __init__(self, llm: llama_cpp.Llama, sampling: dict, seed: Optional[int]) -> None:
        self.llm = llm
        self.n_vocab = llm.n_vocab()
        self.chain = _distribution_chain(llm, sampling)
        self.cand = _compat.token_data_array(self.n_vocab)
        self.rng = np.random.default_rng(seed)

    def target_probs(self, row: int) -> np.ndarray:
        """p for a verify row: the chain's transforms, then softmax, as a dense vector."""
        kept = _compat.apply_chain(self.chain, self.cand, row_logits(self.llm, row, self.n_vocab))
        n = len(kept)
        z = kept["logit"].astype(np.float64)
        finite = np.isfinite(z)
        w = np.zeros(n)
        w[finite] = np.exp(z[finite] - z[finite].max())
        p = np.zeros(self.n_vocab)
        p[kept["id"]] = w / w.sum()
        return p

    def _commit(self, tok: int) -> int:
        llama_cpp.llama_sampler_accept(self.chain.sampler, tok)
        return tok

    def verify(self, proposal: List[int], q: Any = None, row0: int = 0) -> Tuple[int, List[int]]:
        new: List[int] = []
        for i, x in enumerate(proposal):
            p = self.target_probs(row0 + i)
            qi = q[i].astype(np.float64)
            if qi[x] > 0 and self.rng.random() * qi[x] < p[x]:
                new.append(self._commit(x))
                continue
            residual = np.maximum(p - qi, 0.0)
            total = residual.sum()
            dist = residual / total if total > 0 else p
            new.append(self._commit(int(self.rng.choice(self.n_vocab, p=dist))))
            return i, new
        p = self.target_probs(row0 + len(proposal))
        new.append(self._commit(int(self.rng.choice(self.n_vocab, p=p))))
        return len(proposal), new

    def close(self) -> None:
        self.chain.close()


def _distribution_chain(llm: llama_cpp.Llama, sampling: dict) -> _compat.LlamaSampler:
    """llama-cpp-python's sampler chain for temperature > 0, without its final dist sampler."""
    chain = _compat.new_sampler_chain()
    chain.add_penalties(n_vocab=llm.n_vocab(), penalty_last_n=llm.last_n_tokens_size,
                        penalty_repeat=sampling.get("repeat_penalty", 1.0),
                        penalty_freq=sampling.get("frequency_penalty", 0.0),
                        penalty_present=sampling.get("presence_penalty", 0.0))
    min_keep = 1
    chain.add_top_k(sampling.get("top_k", 40))
    chain.add_typical(sampling.get("typical_p", 1.0), min_keep)
    chain.add_top_p(sampling.get("top_p", 0.95), min_keep)
    chain.add_min_p(sampling.get("min_p", 0.05), min_keep)
    chain.add_temp(sampling["temp"])
    return chain


def supports_rejection(sampling: dict) -> bool:
    """Rejection needs the target distribution: plain temperature sampling, no grammar/mirostat."""
    return sampling.get("temp", 0.0) > 0 and not sampling.get("mirostat_mode") and sampling.get("grammar") is None


Verifier = Union[GreedyVerifier, MatchVerifier, RejectionVerifier]


def make_verifier(target: Any, sampling: dict, *, verify: str, seed: Optional[int], own_drafts: bool,
                  logit_bias: Optional[Dict[int, float]] = None, logprobs: Optional[int] = None) -> Verifier:
    """The one choice of a sequence's verifier.

    A per-row hook (``logit_bias``) or per-token ``logprobs`` make a plain-decoding sequence that
    samples and matches; ``verify="rejection"`` (sampled drafts, lossless) where the sampling
    settings allow it, which needs drafts from the session's own loop; plain greedy settings
    take the argmax of each row; every other setting samples each row and matches the draft.
    """
    plain_only = logit_bias is not None or logprobs is not None
    if verify == "rejection" and supports_rejection(sampling) and not plain_only:
        if not own_drafts:
            raise MtpArgumentError("verify='rejection' needs drafts sampled by the session's own draft loop")
        return RejectionVerifier(target, sampling, seed)
    if is_plain_greedy(sampling) and not plain_only:
        return GreedyVerifier(target)
    return MatchVerifier(target, sampling, seed, logit_bias=logit_bias, logprobs=logprobs)
