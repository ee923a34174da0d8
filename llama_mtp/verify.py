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
"""

from __future__ import annotations

import ctypes
from typing import Any, List, Optional, Tuple

import llama_cpp
import numpy as np
from llama_cpp import _internals


class GreedyVerifier:
    """Temperature 0 with no-op penalties and no grammar: llama-cpp-python's chain is
    then argmax of the raw logits (first index on ties, as llama.cpp's greedy sampler),
    so one vectorised argmax over the verify rows replaces k+1 sampler calls."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        self.llm = llm
        self.n_vocab = llm.n_vocab()

    def verify(self, proposal: List[int], q: Any = None) -> Tuple[int, List[int]]:
        n = len(proposal) + 1
        rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm._ctx.ctx), shape=(n, self.n_vocab))
        best = rows.argmax(axis=1).tolist()
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
    def __init__(self, llm: llama_cpp.Llama, sampling: dict) -> None:
        # the exact sampler chain plain llama-cpp-python would build for these settings
        self.sampler = llm._init_sampler(**sampling)
        self.ctx = llm._ctx

    def verify(self, proposal: List[int], q: Any = None) -> Tuple[int, List[int]]:
        new: List[int] = []
        for i, want in enumerate(proposal):
            tok = self.sampler.sample(self.ctx, i)
            new.append(tok)
            if tok != want:
                return i, new
        new.append(self.sampler.sample(self.ctx, len(proposal)))
        return len(proposal), new

    def close(self) -> None:
        self.sampler.close()


class RejectionVerifier:
    def __init__(self, llm: llama_cpp.Llama, sampling: dict, seed: Optional[int]) -> None:
        self.llm = llm
        self.n_vocab = llm.n_vocab()
        self.chain = _distribution_chain(llm, sampling)
        self.cand = _internals.LlamaTokenDataArray(n_vocab=self.n_vocab)
        self.rng = np.random.default_rng(seed)

    def target_probs(self, row: int) -> np.ndarray:
        """p for a verify row: the chain's transforms, then softmax, as a dense vector."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, row), shape=(self.n_vocab,))
        self.cand.copy_logits(logits)
        llama_cpp.llama_sampler_apply(self.chain.sampler, ctypes.byref(self.cand.candidates))
        n = self.cand.candidates.size
        data = ctypes.cast(self.cand.candidates.data, ctypes.POINTER(llama_cpp.llama_token_data * n)).contents
        kept = np.frombuffer(data, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True), count=n)
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

    def verify(self, proposal: List[int], q: Any = None) -> Tuple[int, List[int]]:
        new: List[int] = []
        for i, x in enumerate(proposal):
            p = self.target_probs(i)
            qi = q[i].astype(np.float64)
            if qi[x] > 0 and self.rng.random() * qi[x] < p[x]:
                new.append(self._commit(x))
                continue
            residual = np.maximum(p - qi, 0.0)
            total = residual.sum()
            dist = residual / total if total > 0 else p
            new.append(self._commit(int(self.rng.choice(self.n_vocab, p=dist))))
            return i, new
        p = self.target_probs(len(proposal))
        new.append(self._commit(int(self.rng.choice(self.n_vocab, p=p))))
        return len(proposal), new

    def close(self) -> None:
        self.chain.close()


def _distribution_chain(llm: llama_cpp.Llama, sampling: dict) -> _internals.LlamaSampler:
    """Llama._init_sampler's chain for temperature > 0, without its final dist sampler."""
    chain = _internals.LlamaSampler()
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
