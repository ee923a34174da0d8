"""Synthetic Qwen3.5 (``qwen35``) GGUF models with an MTP head, for tests and benchmarks.

No real checkpoint can be downloaded in CI, so this module writes small (or
benchmark-sized) GGUFs whose behaviour is known in closed form:

* ``recipe="oracle"``: every output projection of the trunk (attention out, ssm out,
  ffn down) is zero, so the residual stream at every position is exactly the token
  embedding and greedy decoding follows a known single-cycle permutation ``pi`` of
  the ordinary tokens.  The MTP head predicts ``pi(t)`` for the token ``t`` it is fed
  for a chosen fraction ``accept`` of tokens and a different, known token otherwise,
  which gives an exact per-position draft acceptance rate.  Optionally
  (``h_miss_fraction``) part of the misses are triggered by the fed target hidden
  state instead, so pairing a token with the wrong hidden state changes the drafts
  in a known way (TestModelInfo.mtp_draft).
* ``recipe="context"``: the oracle plus scaled random attention / recurrent / FFN
  output projections and an MTP head that also reads the rest of the hidden state,
  so the output depends on history: a wrong KV / recurrent-state rollback or a stale
  hidden state changes the logits and tokens.  Margins along a fixed prompt were
  checked to stay far above batch-size float noise (``CONTEXT_MIN_MARGIN``).

The layout mirrors llama.cpp's ``src/models/qwen35.cpp``: gated-delta-net layers with
a full-attention layer every ``full_attention_interval`` layers, then ONE nextn/MTP
block stored as block ``n_layer`` (``block_count = n_layer + 1``,
``qwen35.nextn_predict_layers = 1``) that shares ``token_embd`` and ``output`` with
the trunk (no ``nextn.embed_tokens`` / ``nextn.shared_head_head``), like the
converted Qwen3.5 checkpoints.

Requires ``numpy`` and ``gguf`` (the pure-python package from PyPI).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "GENERATOR_VERSION",
    "SIZES",
    "RECIPE_DEFAULTS",
    "CONTEXT_TEST_PROMPT",
    "CONTEXT_TEST_N_TOKENS",
    "CONTEXT_MIN_MARGIN",
    "TestModelSpec",
    "TestModelInfo",
    "write_test_model",
    "describe_test_model",
    "cached_test_model",
    "cache_dir",
    "cached_test_model_info",
    "reference_greedy",
]

# Bump whenever the bytes written for a given spec change: it is part of the cache key.
GENERATOR_VERSION = 2

ARCH = "qwen35"

SIZES: dict[str, dict[str, int]] = {
    # ~1M params, builds in well under a second.
    "tiny": dict(
        n_embd=128, n_layer=4, n_vocab=384, n_head=4, n_head_kv=2, head_dim=32, n_ff=256,
        ssm_d_state=32, ssm_n_group=2, ssm_dt_rank=4,
    ),
    # ~120M params (most in token_embd + output), f16 ~240 MB.
    "fast": dict(
        n_embd=768, n_layer=8, n_vocab=32768, n_head=8, n_head_kv=2, head_dim=128, n_ff=2048,
        ssm_d_state=128, ssm_n_group=4, ssm_dt_rank=8,
    ),
    # Qwen3.5-2B-like shapes (smaller vocab, 16 layers): ~1.1B params, f16 ~2.2 GB, q8_0 ~1.2 GB.
    "bench": dict(
        n_embd=2048, n_layer=16, n_vocab=32768, n_head=8, n_head_kv=2, head_dim=256, n_ff=6144,
        ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=16,
    ),
}

# Per-recipe defaults for fields left as None in TestModelSpec.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # h_miss_fraction 0: every draft depends on the fed token only, so a draft chain is
    # mtp_draft applied repeatedly (set it > 0 to make the drafts read the hidden state).
    "oracle": dict(seed=0, noise=0.0, logit_scale=16.0, h_miss_fraction=0.0),
    # Chosen by scanning (llama-cpp-python 0.3.36, CPU, tiny f32) noise {2.0, 2.5, 3.0} x
    # seeds 0..127: the greedy continuation of CONTEXT_TEST_PROMPT for 96 tokens has
    # min top-1 margin 0.264 (vs ~5e-4 logit change between 1-token and batched
    # decoding of the same tokens) and departs from pure pi at 22 of the 96 steps.
    # Margins are continuous in the noise, so more departures means more near-ties:
    # noise 3.0 averages ~19 departures but only 7/128 seeds keep margins >= 0.1;
    # noise 2.0 keeps margins but departs < 1 time on average.  logit_scale only
    # rescales margins (argmax is invariant); 32 is typical of real LLMs.  The trunk
    # ignores the MTP flag dims, so this holds for every accept / h_miss_fraction.
    "context": dict(seed=108, noise=3.0, logit_scale=32.0, h_miss_fraction=0.5),
}

# Fixed prompt and length used to validate the context recipe's margins.
CONTEXT_TEST_PROMPT = "The quick brown fox jumps over the lazy dog."
CONTEXT_TEST_N_TOKENS = 96
# Lower bound asserted by the tests for the default tiny context model (measured value
# in the RECIPE_DEFAULTS comment).  Decoding in batches instead of one token at a time
# moves logits by ~1e-2 at most in real models; use reference_greedy on other prompts.
CONTEXT_MIN_MARGIN = 0.1

_FTYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # value = llama_ftype (general.file_type)
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # bos/pad, -, eos (Qwen-like)
_MERGES = ("Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "r e")
_RMS_EPS = 1e-6
_FLAG_AMP = 0.5      # size of a "wrong draft" flag added to a token embedding
_FLAG_GAIN_E = 8.0   # eh_proj gain of a token flag: decoy weight AMP*GAIN = 4x the own token
_FLAG_GAIN_H = 5.0   # gain of an h flag (2.5x): lower, so a token flag wins when both fire


@dataclass(frozen=True)
class TestModelSpec:
    """Everything that determines the generated file (hashed into the cache key)."""

    __test__ = False  # not a pytest test class

    recipe: str = "oracle"          # "oracle" | "context"
    accept: float = 1.0             # fraction of tokens the MTP head predicts correctly
    n_embd: int = 128
    n_layer: int = 4                # trunk layers (the MTP block comes on top)
    n_vocab: int = 384
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 256
    ssm_d_state: int = 32           # gated-delta-net head dim (k and v)
    ssm_n_group: int = 2            # number of k heads
    ssm_dt_rank: int = 4            # number of v heads (multiple of ssm_n_group)
    ssm_d_conv: int = 4
    full_attention_interval: int = 4
    n_ctx_train: int = 4096
    rope_freq_base: float = 10_000_000.0
    ftype: str = "f32"              # "f32" | "f16" | "q8_0"
    seed: int | None = None         # None -> RECIPE_DEFAULTS[recipe]["seed"]
    noise: float | None = None      # output-projection scale of "context"; None -> recipe default
    logit_scale: float | None = None  # top-1 trunk logit of the oracle part; None -> recipe default
    accept_pattern: str = "spread"  # "spread": exact rate in every window; "random": iid
    h_miss_fraction: float | None = None  # share of wrong drafts caused by the fed hidden state

    def __post_init__(self) -> None:
        if self.recipe not in RECIPE_DEFAULTS:
            raise ValueError(f"recipe must be one of {sorted(RECIPE_DEFAULTS)}, got {self.recipe!r}")
        for key, value in RECIPE_DEFAULTS[self.recipe].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)  # frozen: resolve defaults once
        if self.ftype not in _FTYPES:
            raise ValueError(f"ftype must be one of {sorted(_FTYPES)}, got {self.ftype!r}")
        if self.accept_pattern not in ("spread", "random"):
            raise ValueError(f"accept_pattern must be 'spread' or 'random', got {self.accept_pattern!r}")
        if not (0.0 <= self.accept <= 1.0 and 0.0 <= self.h_miss_fraction <= 1.0):
            raise ValueError("accept and h_miss_fraction must be in [0, 1]")
        if self.recipe == "oracle" and self.noise:
            raise ValueError("the oracle recipe has no noise (use recipe='context')")
        if self.n_layer < self.full_attention_interval:
            # llama.cpp needs both recurrent and attention layers in a qwen35 trunk
            raise ValueError("n_layer must be >= full_attention_interval")
        if self.ssm_dt_rank % self.ssm_n_group or self.n_head % self.n_head_kv:
            raise ValueError("ssm_dt_rank % ssm_n_group and n_head % n_head_kv must be 0")
        if self.head_dim % 8:
            raise ValueError("head_dim must be a multiple of 8 (rope dims = head_dim / 4)")
        if self.n_vocab < 256 + len(_SPECIALS) + 4:
            raise ValueError("n_vocab must leave room for 256 byte tokens, specials and merges")
        if self.n_embd < 32:
            raise ValueError("n_embd must be >= 32")
        if self.ftype == "q8_0" and self.n_embd % 32:
            raise ValueError("q8_0 needs n_embd % 32 == 0")

    def key(self) -> str:
        """Stable hash of the spec and generator version (cache file name)."""
        payload = json.dumps(
            {"v": GENERATOR_VERSION, "spec": dataclasses.asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape in _tensor_shapes(self))


@dataclass
class TestModelInfo:
    """What the generated model is known to do (valid for any ftype).

    ``successor``, ``mtp_correct`` and ``mtp_prediction`` describe the oracle part of
    the weights.  For ``recipe="oracle"`` they are exactly what llama.cpp computes;
    for ``"context"`` history-dependent perturbations sit on top, so only the
    llama.cpp output itself is the reference.
    """

    __test__ = False

    spec: TestModelSpec
    n_vocab: int
    bos_id: int
    eos_id: int
    pad_id: int
    special_ids: tuple[int, ...]
    successor: np.ndarray       # (n_vocab,) int: greedy next token after t (= pi(t))
    predecessor: np.ndarray     # (n_vocab,) int: pi^-1 (whose hidden state pairs with t)
    mtp_correct: np.ndarray     # (n_vocab,) bool: first draft after t is pi(t)
    mtp_prediction: np.ndarray  # (n_vocab,) int: that draft, = mtp_draft(t)
    token_decoy: np.ndarray     # (n_vocab,) int: -1 or d: fed token t drafts pi(d)
    h_decoy: np.ndarray         # (n_vocab,) int: -1 or d: target hidden state of t -> pi(d)
    trunk_margin: float         # min top-1 logit gap of the trunk (exact math, f32 weights)
    mtp_margin: float           # min top-1 logit gap of the MTP head (exact math, f32 weights)
    margin_tokens: int          # how many input tokens the margins were checked on
    path: pathlib.Path | None = None
    tokens: list[str] = field(default_factory=list, repr=False)

    def greedy_continuation(self, last_token: int, n: int) -> list[int]:
        """The ``n`` tokens greedy decoding produces after ``last_token`` (oracle only)."""
        if self.spec.recipe != "oracle":
            raise ValueError("greedy_continuation is exact only for recipe='oracle'")
        return self.pi_chain(last_token, n)

    def pi_chain(self, last_token: int, n: int) -> list[int]:
        """``pi`` applied repeatedly: the oracle part's greedy sequence."""
        out: list[int] = []
        t = int(last_token)
        for _ in range(n):
            t = int(self.successor[t])
            out.append(t)
        return out

    def mtp_draft(self, token: int, h_token: int | None = None) -> int:
        """The oracle MTP draft when fed ``token`` and the target hidden state of ``h_token``.

        ``h_token`` defaults to ``predecessor[token]``: on any greedy path the target
        hidden state paired with a token (upstream: x_{p+1} with h_p) is its
        predecessor's.  ``h_token=-1`` means a hidden state without flags: an all-zero
        row, or the MTP's own h_nextn, which is what chained drafts are fed.
        With ``h_miss_fraction=0`` (the oracle default) ``h_token`` never matters.
        """
        h = int(self.predecessor[token]) if h_token is None else int(h_token)
        if self.token_decoy[token] >= 0:
            return int(self.successor[self.token_decoy[token]])
        if h >= 0 and self.h_decoy[h] >= 0:
            return int(self.successor[self.h_decoy[h]])
        return int(self.successor[token])

    def draft_chain(self, id_last: int, n: int) -> list[int]:
        """The ``n`` drafts upstream's MTP loop makes after the target emitted ``id_last``.

        Step 1 is fed ``id_last`` with the target hidden state of its predecessor;
        step i+1 is fed draft i with the MTP's own h_nextn (``h_token=-1``).
        """
        drafts = [self.mtp_draft(id_last)]
        while len(drafts) < n:
            drafts.append(self.mtp_draft(drafts[-1], -1))
        return drafts

    def accept_rate(self, tokens: Sequence[int]) -> float:
        """Fraction of 1-token MTP drafts accepted while generating ``tokens`` greedily.

        After the target emits token x, the MTP head is fed x (with the hidden state of
        the token before it) and drafts the next one; it is right iff ``mtp_correct[x]``.
        (Chained drafts are right iff ``token_decoy[x] < 0``; with h_miss_fraction=0
        that is the same thing.)
        """
        if not tokens:
            return float("nan")
        return float(np.mean(self.mtp_correct[np.asarray(tokens)]))


# --------------------------------------------------------------------------- vocab


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable unicode char map (what llama.cpp's BPE decoder inverts)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: tuple[int, ...]
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def ordinary(self) -> np.ndarray:
        mask = np.ones(len(self.tokens), dtype=bool)
        mask[list(self.special_ids)] = False
        return np.flatnonzero(mask)


def _build_vocab(n_vocab: int) -> _Vocab:
    # ids 0..255 are the byte tokens in byte order, then merges, filler, specials last (as Qwen).
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = list(_MERGES)
    tokens += [m.replace(" ", "") for m in merges]
    n_filler = n_vocab - len(tokens) - len(_SPECIALS)
    # Filler: plain ASCII (decodable by the byte-level decoder), never produced by merges.
    tokens += [f"<x{i}>" for i in range(n_filler)]
    first_special = len(tokens)
    tokens += list(_SPECIALS)
    types = [1] * first_special + [3] * len(_SPECIALS)  # NORMAL / CONTROL
    special_ids = tuple(range(first_special, n_vocab))
    endoftext, _, im_end = special_ids
    return _Vocab(tokens, types, merges, special_ids, bos_id=endoftext, eos_id=im_end, pad_id=endoftext)


# ----------------------------------------------------------------------- oracle part


@dataclass
class _Oracle:
    vocab: _Vocab
    embd: np.ndarray         # (n_vocab, n_embd) token_embd rows
    head: np.ndarray         # (n_vocab, n_embd) output rows
    eh_proj: np.ndarray      # (n_embd, 2 n_embd) oracle part of nextn.eh_proj
    successor: np.ndarray
    predecessor: np.ndarray  # inverse of successor on the cycle (specials: their alias's)
    token_decoy: np.ndarray  # -1, or the decoy whose successor is drafted when fed this token
    h_decoy: np.ndarray      # -1, or the decoy drafted when this token's hidden state is fed
    mtp_correct: np.ndarray
    mtp_prediction: np.ndarray

    def mtp_rows(self, idx: np.ndarray) -> np.ndarray:
        """Pre-norm MTP hidden for input tokens idx fed with their predecessor's hidden state."""
        def rms(x: np.ndarray) -> np.ndarray:
            return x * (math.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True))

        # oracle trunk: h_nextn of the predecessor = RMSNorm(its embedding)
        pair = np.concatenate([rms(self.embd[idx]), rms(self.embd[self.predecessor[idx]])], axis=1)
        return pair @ self.eh_proj.T


def _n_flag(n_embd: int) -> int:
    return 4 if n_embd >= 64 else 2


def _flag_dims(n_embd: int) -> slice:
    """The residual-stream dims reserved for the MTP flags (see _build_oracle)."""
    return slice(n_embd - 2 * (_n_flag(n_embd) + 1), n_embd)


def _rng(seed: int, *salt: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(s.encode()) for s in salt)])


def _pick_flags(
    owners: np.ndarray, forbidden: np.ndarray, decoys: np.ndarray, n_vocab: int
) -> np.ndarray:
    """flag index per token: owners[i] gets a flag whose decoy != forbidden[i]."""
    flag = np.full(n_vocab, -1, dtype=np.int64)
    n_flag = len(decoys)
    for i, (t, bad) in enumerate(zip(owners, forbidden)):
        j = i % n_flag
        if decoys[j] == bad:
            j = (j + 1) % n_flag
        flag[t] = j
    return flag


def _build_oracle(spec: TestModelSpec) -> _Oracle:
    """The successor permutation, draft correctness and the matrices realising them.

    Dims: [u-space | F token flags, "no token flag" | F h flags, "no h flag"].
    Embedding e_t = u_t (unit) + AMP on one dim of each flag group, so every
    embedding has the same norm and nothing but the MTP reads the flag dims: the
    trunk (for "context" too) does not depend on accept / h_miss_fraction.  LM head
    row pi(t) = alpha * u_t, so with zero output projections the trunk's argmax after
    t is pi(t).
    The MTP is fed token x_{p+1} and the target hidden state h_p = RMSNorm(e_{x_p}).
    eh_proj copies the u-dims of enorm(e), maps its token-flag j to GAIN_E * u_{decoy_j}
    and the h-flag i of hnorm(h) to GAIN_H * u_{hdecoy_i}; a decoy term outweighs the
    own-token term, so the draft becomes pi(decoy) != pi(t).
    A draft along the cycle misses either because the fed token carries a token
    flag or (share h_miss_fraction) because its predecessor, whose hidden state is
    fed, carries an h flag; so a wrong, stale or zero hidden state changes drafts.
    eh_proj writes only u-dims, so the MTP's own h_nextn has no flags: chained drafts
    follow the token flags alone (TestModelInfo.draft_chain).
    """
    vocab = _build_vocab(spec.n_vocab)
    rng = _rng(spec.seed, "oracle")
    d = spec.n_embd
    n_flag = _n_flag(d)
    d_u = d - 2 * (n_flag + 1)
    tok_dims = d_u + np.arange(n_flag + 1)  # last one = "no token flag"
    h_dims = d_u + n_flag + 1 + np.arange(n_flag + 1)  # last one = "no h flag"
    ordinary = vocab.ordinary
    n_ord = len(ordinary)

    u = rng.standard_normal((spec.n_vocab, d_u), dtype=np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)

    # single cycle through all ordinary tokens
    cycle = ordinary[rng.permutation(n_ord)]
    successor = np.empty(spec.n_vocab, dtype=np.int64)
    successor[cycle] = np.roll(cycle, -1)
    predecessor = np.empty(spec.n_vocab, dtype=np.int64)
    predecessor[cycle] = np.roll(cycle, 1)

    # hits[k]: the draft made when the MTP is fed cycle[k] is right, laid out along the cycle
    k = np.arange(n_ord)
    if spec.accept_pattern == "spread":
        hits = np.floor((k + 1) * spec.accept + 1e-9) > np.floor(k * spec.accept + 1e-9)
    else:
        hits = rng.random(n_ord) < spec.accept
    misses = np.flatnonzero(~hits)
    via_h = rng.random(len(misses)) < spec.h_miss_fraction
    tok_miss, h_miss = misses[~via_h], misses[via_h]

    # decoys: distinct tokens, hits first so a decoy's own draft is usually right
    pool = np.concatenate([cycle[hits], cycle[~hits]])
    decoys, hdecoys = pool[:n_flag], pool[n_flag:2 * n_flag]
    # a decoy must differ from the fed token (pi(decoy) != pi(fed))
    tok_flag = _pick_flags(cycle[tok_miss], cycle[tok_miss], decoys, spec.n_vocab)
    h_flag = _pick_flags(cycle[h_miss - 1], cycle[h_miss], hdecoys, spec.n_vocab)

    embd = np.zeros((spec.n_vocab, d), dtype=np.float32)
    embd[:, :d_u] = u
    for flag, dims in ((tok_flag, tok_dims), (h_flag, h_dims)):
        embd[np.arange(spec.n_vocab), dims[flag]] = _FLAG_AMP  # flag -1 -> the "no flag" dim

    token_decoy = np.where(tok_flag >= 0, decoys[np.maximum(tok_flag, 0)], -1)
    h_decoy = np.where(h_flag >= 0, hdecoys[np.maximum(h_flag, 0)], -1)
    mtp_correct = np.zeros(spec.n_vocab, dtype=bool)
    mtp_correct[cycle] = hits

    # specials behave like an (arbitrary) ordinary token so every input has a defined next token
    for i, s in enumerate(vocab.special_ids):
        alias = cycle[i]
        for arr in (embd, successor, predecessor, token_decoy, h_decoy, mtp_correct):
            arr[s] = arr[alias]

    # RMSNorm (weight 1) scales a vector to norm sqrt(d); every embedding has norm e_len
    g, e_len = math.sqrt(d), math.sqrt(1.0 + 2.0 * _FLAG_AMP**2)
    alpha = spec.logit_scale * e_len / g  # top-1 trunk logit = logit_scale
    head = np.zeros((spec.n_vocab, d), dtype=np.float32)
    head[successor[ordinary], :d_u] = alpha * u[ordinary]

    eh = np.zeros((d, 2 * d), dtype=np.float32)
    eh[np.arange(d_u), np.arange(d_u)] = 1.0
    eh[:d_u, tok_dims[:-1]] = _FLAG_GAIN_E * u[decoys].T
    eh[:d_u, d + h_dims[:-1]] = _FLAG_GAIN_H * u[hdecoys].T

    # the rule of TestModelInfo.mtp_draft, vectorised: token flag > h flag > own token
    hd = h_decoy[predecessor]
    mtp_prediction = np.where(hd >= 0, successor[np.maximum(hd, 0)], successor)
    mtp_prediction = np.where(token_decoy >= 0, successor[np.maximum(token_decoy, 0)], mtp_prediction)

    return _Oracle(
        vocab, embd, head, eh, successor, predecessor, token_decoy, h_decoy, mtp_correct,
        mtp_prediction,
    )


def _margins(head: np.ndarray, x: np.ndarray, expected: np.ndarray) -> float:
    """Min over rows of (logit[expected] - best other logit) after RMS-norming x."""
    x = x * (math.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True))
    worst = math.inf
    for lo in range(0, len(x), 512):
        logits = x[lo:lo + 512] @ head.T
        ar = np.arange(len(logits))
        want = expected[lo:lo + 512]
        top = logits[ar, want].copy()
        logits[ar, want] = -np.inf
        worst = min(worst, float(np.min(top - logits.max(axis=1))))
    return worst


def describe_test_model(spec: TestModelSpec) -> TestModelInfo:
    """The TestModelInfo of ``spec`` without writing a file (deterministic, cheap)."""
    return _info(spec, _build_oracle(spec))


def _info(spec: TestModelSpec, o: _Oracle) -> TestModelInfo:
    v = o.vocab
    ordinary = v.ordinary
    # exact margins cost n_check * n_vocab * n_embd: check a sample for big vocabularies
    if len(ordinary) > 4096:
        idx = np.sort(_rng(spec.seed, "margin-sample").choice(ordinary, 1024, replace=False))
    else:
        idx = ordinary
    return TestModelInfo(
        spec=spec,
        n_vocab=spec.n_vocab,
        bos_id=v.bos_id,
        eos_id=v.eos_id,
        pad_id=v.pad_id,
        special_ids=v.special_ids,
        successor=o.successor,
        predecessor=o.predecessor,
        mtp_correct=o.mtp_correct,
        mtp_prediction=o.mtp_prediction,
        token_decoy=o.token_decoy,
        h_decoy=o.h_decoy,
        trunk_margin=_margins(o.head, o.embd[idx], o.successor[idx]),
        mtp_margin=_margins(o.head, o.mtp_rows(idx), o.mtp_prediction[idx]),
        margin_tokens=len(idx),
        tokens=v.tokens,
    )


# ------------------------------------------------------------------------- tensors


def _is_recurrent(spec: TestModelSpec, il: int) -> bool:
    # same rule as llama.cpp's qwen35 loader when only full_attention_interval is given
    return il < spec.n_layer and (il + 1) % spec.full_attention_interval != 0


def _tensor_shapes(spec: TestModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in file order.  numpy shape = reversed ggml ne."""
    d, hd = spec.n_embd, spec.head_dim
    key_dim = spec.ssm_d_state * spec.ssm_n_group
    value_dim = spec.ssm_d_state * spec.ssm_dt_rank
    conv_dim = 2 * key_dim + value_dim

    def attention(p: str) -> list[tuple[str, tuple[int, ...]]]:
        return [
            (f"{p}.attn_q.weight", (2 * spec.n_head * hd, d)),  # per head: [query | gate]
            (f"{p}.attn_k.weight", (spec.n_head_kv * hd, d)),
            (f"{p}.attn_v.weight", (spec.n_head_kv * hd, d)),
            (f"{p}.attn_output.weight", (d, spec.n_head * hd)),
            (f"{p}.attn_q_norm.weight", (hd,)),
            (f"{p}.attn_k_norm.weight", (hd,)),
        ]

    def ffn(p: str) -> list[tuple[str, tuple[int, ...]]]:
        return [
            (f"{p}.ffn_gate.weight", (spec.n_ff, d)),
            (f"{p}.ffn_up.weight", (spec.n_ff, d)),
            (f"{p}.ffn_down.weight", (d, spec.n_ff)),
        ]

    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (spec.n_vocab, d))]
    for il in range(spec.n_layer + 1):
        p = f"blk.{il}"
        out += [(f"{p}.attn_norm.weight", (d,)), (f"{p}.post_attention_norm.weight", (d,))]
        if _is_recurrent(spec, il):
            out += [
                (f"{p}.attn_qkv.weight", (conv_dim, d)),
                (f"{p}.attn_gate.weight", (value_dim, d)),
                (f"{p}.ssm_conv1d.weight", (conv_dim, spec.ssm_d_conv)),
                (f"{p}.ssm_dt.bias", (spec.ssm_dt_rank,)),
                (f"{p}.ssm_a", (spec.ssm_dt_rank,)),
                (f"{p}.ssm_beta.weight", (spec.ssm_dt_rank, d)),
                (f"{p}.ssm_alpha.weight", (spec.ssm_dt_rank, d)),
                (f"{p}.ssm_norm.weight", (spec.ssm_d_state,)),
                (f"{p}.ssm_out.weight", (d, value_dim)),
            ]
        else:
            out += attention(p)
        out += ffn(p)
        if il == spec.n_layer:  # the MTP block
            out += [
                (f"{p}.nextn.eh_proj.weight", (d, 2 * d)),  # input = [enorm(embd) ; hnorm(h)]
                (f"{p}.nextn.enorm.weight", (d,)),
                (f"{p}.nextn.hnorm.weight", (d,)),
                (f"{p}.nextn.shared_head_norm.weight", (d,)),
            ]
    out += [("output_norm.weight", (d,)), ("output.weight", (spec.n_vocab, d))]
    return out


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    # uniform with the given std: ~2x cheaper than normal, which matters for the bench size
    x = rng.random(shape, dtype=np.float32)
    x -= 0.5
    x *= np.float32(std * math.sqrt(12.0))
    return x


def _tensor_data(spec: TestModelSpec, o: _Oracle, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 contents of one tensor; each tensor has its own RNG stream (order-free)."""
    rng = _rng(spec.seed, "tensor", name)
    d = spec.n_embd
    flags = _flag_dims(d)  # only the MTP's eh_proj may read or write these
    leaf = name.split(".", 2)[-1] if name.startswith("blk.") else name
    is_mtp = name.startswith(f"blk.{spec.n_layer}.")

    if name == "token_embd.weight":
        return o.embd
    if name == "output.weight":
        return o.head
    if leaf == "nextn.eh_proj.weight":
        w = o.eh_proj.copy()
        if spec.noise:  # the MTP also reads the rest of the target hidden state
            w_h = _uniform(rng, (d, d), spec.noise / d)
            w_h[flags, :] = 0.0
            w_h[:, flags] = 0.0
            w[:, d:] += w_h
        return w
    if leaf in ("attn_output.weight", "ssm_out.weight", "ffn_down.weight"):  # write the residual
        w = np.zeros(shape, dtype=np.float32)
        if spec.noise:
            # "context": history-dependent perturbation relative to the unit-norm embedding;
            # the FFN mostly sees the current token only, so keep it weaker than the mixers
            std = spec.noise / (math.sqrt(d) * math.sqrt(shape[1]))
            std *= (0.25 if leaf == "ffn_down.weight" else 1.0) * (2.0 if is_mtp else 1.0)
            w = _uniform(rng, shape, std)
            w[flags, :] = 0.0
        return w
    if len(shape) == 1:
        if leaf == "ssm_a":  # -exp(A_log), A_log ~ U(0, log 16) as in the HF init
            return -np.exp(rng.uniform(0.0, math.log(16.0), shape)).astype(np.float32)
        if leaf == "ssm_dt.bias":  # inverse softplus of dt ~ logU(1e-3, 1e-1): slow decay
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            return np.log(np.expm1(dt)).astype(np.float32)
        return np.ones(shape, dtype=np.float32)  # all norms
    if leaf == "ssm_conv1d.weight":
        return _uniform(rng, shape, 1.0 / math.sqrt(spec.ssm_d_conv))
    # input projections (read the RMS-normed residual): unit-scale activations
    w = _uniform(rng, shape, 1.0 / math.sqrt(shape[1]))
    w[:, flags] = 0.0
    return w


def _ggml_type(spec: TestModelSpec, name: str, shape: tuple[int, ...]) -> Any:
    from gguf import GGMLQuantizationType as Q

    # llama.cpp keeps norms, biases, ssm_a and the conv kernel in f32
    if len(shape) == 1 or name.endswith("ssm_conv1d.weight") or spec.ftype == "f32":
        return Q.F32
    if spec.ftype == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def _encode(data: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return quants.quantize(data, qtype)


def _nbytes(shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], Any, int]:
    """(shape as passed to add_tensor_info, its numpy dtype, byte size)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    n = math.prod(shape)
    if qtype == Q.F32:
        return shape, np.float32, 4 * n
    if qtype == Q.F16:
        return shape, np.float16, 2 * n
    block, type_size = GGML_QUANT_SIZES[qtype]
    byte_shape = (*shape[:-1], shape[-1] // block * type_size)
    return byte_shape, np.uint8, n // block * type_size


def _add_metadata(w: Any, spec: TestModelSpec, vocab: _Vocab) -> None:
    from gguf import GGUFValueType

    a = ARCH
    n_rot = spec.head_dim // 4  # Qwen3.5 partial_rotary_factor = 0.25
    half = n_rot // 2
    s01 = max(1, round(half * 11 / 32))  # Qwen3.5 ratio [11, 11, 10, 0]
    sections = [s01, s01, half - 2 * s01, 0]

    w.add_string("general.name", f"llama-mtp test model ({spec.recipe})")
    w.add_uint32("general.file_type", _FTYPES[spec.ftype])
    if spec.ftype == "q8_0":
        w.add_uint32("general.quantization_version", 2)
    w.add_uint32(f"{a}.context_length", spec.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", spec.n_embd)
    w.add_uint32(f"{a}.block_count", spec.n_layer + 1)  # trunk + MTP block
    w.add_uint32(f"{a}.nextn_predict_layers", 1)
    w.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
    w.add_uint32(f"{a}.attention.head_count", spec.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", spec.n_head_kv)
    w.add_uint32(f"{a}.attention.key_length", spec.head_dim)
    w.add_uint32(f"{a}.attention.value_length", spec.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", _RMS_EPS)
    w.add_float32(f"{a}.rope.freq_base", spec.rope_freq_base)
    w.add_uint32(f"{a}.rope.dimension_count", n_rot)
    w.add_array(f"{a}.rope.dimension_sections", sections)
    w.add_uint32(f"{a}.ssm.conv_kernel", spec.ssm_d_conv)
    w.add_uint32(f"{a}.ssm.state_size", spec.ssm_d_state)
    w.add_uint32(f"{a}.ssm.group_count", spec.ssm_n_group)
    w.add_uint32(f"{a}.ssm.time_step_rank", spec.ssm_dt_rank)
    w.add_uint32(f"{a}.ssm.inner_size", spec.ssm_d_state * spec.ssm_dt_rank)
    w.add_uint32(f"{a}.full_attention_interval", spec.full_attention_interval)

    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "qwen35")
    w.add_array("tokenizer.ggml.tokens", vocab.tokens)
    w.add_key_value("tokenizer.ggml.token_type", vocab.types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    w.add_array("tokenizer.ggml.merges", vocab.merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", vocab.bos_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab.eos_id)
    w.add_uint32("tokenizer.ggml.padding_token_id", vocab.pad_id)
    w.add_bool("tokenizer.ggml.add_bos_token", False)

    # provenance, ignored by llama.cpp
    w.add_uint32("llama_mtp.generator_version", GENERATOR_VERSION)
    w.add_string("llama_mtp.spec", json.dumps(dataclasses.asdict(spec), sort_keys=True))


def write_test_model(path: str | os.PathLike[str], spec: TestModelSpec) -> TestModelInfo:
    """Write the GGUF for ``spec`` to ``path`` (streamed tensor by tensor) and describe it."""
    import gguf

    path = pathlib.Path(path)
    oracle = _build_oracle(spec)
    shapes = _tensor_shapes(spec)
    qtypes = [_ggml_type(spec, n, s) for n, s in shapes]

    w = gguf.GGUFWriter(path, ARCH)
    try:
        _add_metadata(w, spec, oracle.vocab)
        for (name, shape), qtype in zip(shapes, qtypes):
            info_shape, dtype, nbytes = _nbytes(shape, qtype)
            w.add_tensor_info(name, info_shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (name, shape), qtype in zip(shapes, qtypes):
            data = _tensor_data(spec, oracle, name, shape)
            assert data.shape == shape, (name, data.shape, shape)
            w.write_tensor_data(_encode(data, qtype))
    finally:
        w.close()

    info = _info(spec, oracle)
    info.path = path
    return info


# --------------------------------------------------------------------------- cache


def cache_dir() -> pathlib.Path:
    """Where generated models live: ``$LLAMA_MTP_MODEL_CACHE`` (models only), else models/ under
    the llama_mtp cache root (``$LLAMA_MTP_CACHE``, as for shim builds, default ~/.cache/llama_mtp).

    The test suite sets LLAMA_MTP_MODEL_CACHE to a temporary folder; setting LLAMA_MTP_CACHE
    instead would also move the shim build cache (and so rebuild the shim).
    """
    models = os.environ.get("LLAMA_MTP_MODEL_CACHE")
    if models:
        return pathlib.Path(models)
    env = os.environ.get("LLAMA_MTP_CACHE")
    return (pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "llama_mtp") / "models"


def _resolve_spec(spec: TestModelSpec | None, size: str, overrides: dict[str, Any]) -> TestModelSpec:
    if spec is None:
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        return TestModelSpec(**{**SIZES[size], **overrides})
    return dataclasses.replace(spec, **overrides) if overrides else spec


def cached_test_model(
    spec: TestModelSpec | None = None, *, size: str = "tiny", **overrides: Any
) -> pathlib.Path:
    """Path of the GGUF for ``spec`` (or ``SIZES[size]`` + overrides), built on first use.

    Files live in ``cache_dir()`` (default ``~/.cache/llama_mtp/models``) under a
    name derived from the spec hash and GENERATOR_VERSION; they are written to a
    temporary file and renamed, so concurrent builders never expose a partial file.
    """
    spec = _resolve_spec(spec, size, overrides)
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"qwen35-mtp-{spec.recipe}-{spec.n_embd}x{spec.n_layer}-{spec.ftype}-{spec.key()}.gguf"
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write_test_model(tmp, spec)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cached_test_model_info(
    spec: TestModelSpec | None = None, *, size: str = "tiny", **overrides: Any
) -> tuple[pathlib.Path, TestModelInfo]:
    """``cached_test_model`` plus the model's TestModelInfo."""
    spec = _resolve_spec(spec, size, overrides)
    path = cached_test_model(spec)
    info = describe_test_model(spec)
    info.path = path
    return path, info


# ------------------------------------------------------------------ llama.cpp helper


def reference_greedy(
    path: str | os.PathLike[str],
    prompt: Sequence[int] | str,
    n_tokens: int,
    **llama_kwargs: Any,
) -> tuple[list[int], np.ndarray]:
    """Plain llama-cpp-python greedy decoding: (tokens, top-1 logit margin of each step).

    ``prompt`` is a token list or text (tokenized without BOS).  Use it to check that a
    prompt of your own has no near-ties (margins well above ~1e-2) before comparing
    speculative and plain decoding token by token.
    """
    import llama_cpp

    kwargs: dict[str, Any] = dict(n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    kwargs.update(llama_kwargs)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, **kwargs)
    try:
        tokens = llm.tokenize(prompt.encode(), add_bos=False) if isinstance(prompt, str) else list(prompt)
        out: list[int] = []
        for tok in llm.generate(tokens, temp=0.0, top_k=1):
            out.append(int(tok))
            if len(out) == n_tokens:
                break
        # row i of scores = logits after token i; the steps are rows len(prompt)-1 ...
        scores = np.array(llm.scores[len(tokens) - 1:len(tokens) - 1 + n_tokens], dtype=np.float32)
        top2 = np.sort(scores, axis=1)[:, -2:]
        return out, top2[:, 1] - top2[:, 0]
    finally:
        llm.close()
