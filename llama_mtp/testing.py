"""Synthetic Qwen3.5 (``qwen35``) GGUF models with an MTP head, for tests and benchmarks.

No real checkpoint can be downloaded in CI, so this module writes small (or
benchmark-sized) GGUFs whose behaviour is known in closed form:

* ``recipe="oracle"``: every output projection of the trunk (attention out, ssm out,
  ffn down) is zero, so the residual stream at every position is exactly the token
  embedding and greedy decoding follows a known single-cycle permutation ``pi`` of
  the ordinary tokens.  The MTP head predicts ``pi(t)`` for the token ``t`` it is fed
  for a chosen fraction ``accept`` of tokens and a different, known token otherwise,
  which gives an exact per-position draft acceptance rate.
* ``recipe="context"``: the oracle plus scaled random attention / recurrent / FFN
  output projections (and an MTP head that reads the target hidden state), so the
  output depends on history: wrong KV / recurrent-state rollback or a stale hidden
  state changes the tokens.  Margins were checked to stay far above batch-size float
  noise (see ``CONTEXT_MIN_MARGIN``).

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
from collections.abc import Callable, Sequence
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
]

# Bump whenever the bytes written for a given spec change: it is part of the cache key.
GENERATOR_VERSION = 1

ARCH = "qwen35"

SIZES: dict[str, dict[str, int]] = {
    # ~0.3M params, builds in milliseconds.
    "tiny": dict(
        n_embd=128, n_layer=4, n_vocab=384, n_head=4, n_head_kv=2, head_dim=32, n_ff=256,
        ssm_d_state=32, ssm_n_group=2, ssm_dt_rank=4,
    ),
    # ~100M params.
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
    "oracle": dict(seed=0, noise=0.0),
    # Chosen by scanning seeds 0..15 x noise {0.5, 1, 1.5, 2, 3} on the tiny f32 model
    # (see _scan_context_defaults): greedy continuation of CONTEXT_TEST_PROMPT for 96
    # tokens has min top-1 margin <FILLED IN BELOW>, and departs from pure pi at
    # <FILLED IN BELOW> of the 96 steps.
    "context": dict(seed=0, noise=1.0),
}

# Fixed prompt and length used to validate the context recipe's margins.
CONTEXT_TEST_PROMPT = "The quick brown fox jumps over the lazy dog."
CONTEXT_TEST_N_TOKENS = 96
# Lower bound asserted by the tests for the default tiny context model (measured value
# is in the RECIPE_DEFAULTS comment; batch-vs-single float noise is ~1e-2 at most).
CONTEXT_MIN_MARGIN = 0.1

_FTYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # value = llama_ftype (general.file_type)
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # bos/pad, -, eos (Qwen-like)
_MERGES = ("Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "r e")
_RMS_EPS = 1e-6
_FLAG_AMP = 0.5     # size of the "wrong draft" flag added to a token embedding
_FLAG_GAIN = 8.0    # eh_proj gain of the flag direction: decoy weight = AMP*GAIN = 4x own token


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
    logit_scale: float = 16.0       # top-1 trunk logit of the oracle part
    accept_pattern: str = "spread"  # "spread": exact rate in every window; "random": iid

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
        if not 0.0 <= self.accept <= 1.0:
            raise ValueError(f"accept must be in [0, 1], got {self.accept}")
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
    mtp_correct: np.ndarray     # (n_vocab,) bool: MTP fed token t drafts successor[t]
    mtp_prediction: np.ndarray  # (n_vocab,) int: MTP argmax when fed token t
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

    def mtp_draft(self, token: int) -> int:
        """MTP draft for the token after ``successor[token]`` when fed ``token`` (oracle)."""
        return int(self.mtp_prediction[token])

    def accept_rate(self, tokens: Sequence[int]) -> float:
        """Fraction of 1-token MTP drafts accepted while generating ``tokens`` greedily.

        After the target emits token x, the MTP head is fed x and drafts the next one;
        the draft is right iff ``mtp_correct[x]``.
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
    embd: np.ndarray        # (n_vocab, n_embd) token_embd rows
    head: np.ndarray        # (n_vocab, n_embd) output rows
    eh_proj_e: np.ndarray   # (n_embd, n_embd) eh_proj columns acting on enorm(embedding)
    successor: np.ndarray
    mtp_correct: np.ndarray
    mtp_prediction: np.ndarray
    mtp_rows: np.ndarray    # (n_vocab, n_embd) pre-norm MTP hidden for each input token


def _rng(seed: int, *salt: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(s.encode()) for s in salt)])


def _build_oracle(spec: TestModelSpec) -> _Oracle:
    """The successor permutation, draft correctness and the matrices realising them.

    Embedding e_t = u_t (unit, in the first d - F dims) plus, for tokens whose draft
    must be wrong, AMP * f_j (flag dim j among the last F dims).  LM head row
    pi(t) = alpha * u_t, so with zero output projections the trunk's argmax after t is
    pi(t).  eh_proj copies the u-dims of enorm(e) and maps flag j to GAIN * u_{d_j},
    so the MTP hidden is ~ u_t + 4 u_{d_j} and its argmax is pi(d_j) != pi(t).
    """
    vocab = _build_vocab(spec.n_vocab)
    rng = _rng(spec.seed, "oracle")
    d = spec.n_embd
    n_flag = 4 if d >= 64 else 2
    d_u = d - n_flag
    ordinary = vocab.ordinary
    n_ord = len(ordinary)

    u = rng.standard_normal((spec.n_vocab, d_u), dtype=np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)

    # single cycle through all ordinary tokens
    cycle = ordinary[rng.permutation(n_ord)]
    successor = np.empty(spec.n_vocab, dtype=np.int64)
    successor[cycle] = np.roll(cycle, -1)

    # which tokens get a correct draft, laid out along the cycle
    k = np.arange(n_ord)
    if spec.accept_pattern == "spread":
        hits = np.floor((k + 1) * spec.accept + 1e-9) > np.floor(k * spec.accept + 1e-9)
    else:
        hits = rng.random(n_ord) < spec.accept
    mtp_correct = np.zeros(spec.n_vocab, dtype=bool)
    mtp_correct[cycle] = hits

    # decoys: wrong-draft tokens point their flag at a decoy token d_j != themselves
    decoys = np.concatenate([cycle[hits], cycle[~hits]])[:n_flag]
    flag_of = np.full(spec.n_vocab, -1, dtype=np.int64)
    for pos in np.flatnonzero(~hits):
        t = cycle[pos]
        j = pos % n_flag
        if decoys[j] == t:
            j = (j + 1) % n_flag
        flag_of[t] = j

    embd = np.zeros((spec.n_vocab, d), dtype=np.float32)
    embd[:, :d_u] = u
    wrong = np.flatnonzero(flag_of >= 0)
    embd[wrong, d_u + flag_of[wrong]] = _FLAG_AMP

    # specials behave like an (arbitrary) ordinary token so every input has a defined next token
    for i, s in enumerate(vocab.special_ids):
        alias = cycle[i]
        embd[s] = embd[alias]
        successor[s] = successor[alias]
        mtp_correct[s] = mtp_correct[alias]
        flag_of[s] = flag_of[alias]

    g = math.sqrt(d)  # RMSNorm of a unit vector with weight 1 scales it to norm sqrt(d)
    alpha = spec.logit_scale / g
    head = np.zeros((spec.n_vocab, d), dtype=np.float32)
    head[successor[ordinary], :d_u] = alpha * u[ordinary]

    eh_e = np.zeros((d, d), dtype=np.float32)
    eh_e[np.arange(d_u), np.arange(d_u)] = 1.0
    for j, t0 in enumerate(decoys):
        eh_e[:d_u, d_u + j] = _FLAG_GAIN * u[t0]

    # MTP hidden before the final norm, per input token (attn/ffn outputs are zero)
    e_norm = embd * (g / np.linalg.norm(embd, axis=1, keepdims=True))
    mtp_rows = e_norm @ eh_e.T
    mtp_prediction = successor.copy()
    mtp_prediction[wrong] = successor[decoys[flag_of[wrong]]]
    for s in vocab.special_ids:
        mtp_prediction[s] = mtp_prediction[cycle[vocab.special_ids.index(s)]]

    return _Oracle(vocab, embd, head, eh_e, successor, mtp_correct, mtp_prediction, mtp_rows)


def _margins(
    head: np.ndarray, rows: np.ndarray, expected: np.ndarray, idx: np.ndarray
) -> float:
    """Min over idx of (logit[expected] - best other logit) for RMS-normed rows."""
    x = rows[idx].astype(np.float64)
    x *= math.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True)
    worst = math.inf
    for lo in range(0, len(idx), 1024):
        logits = x[lo:lo + 1024] @ head.T.astype(np.float64)
        ar = np.arange(len(logits))
        top = logits[ar, expected[idx[lo:lo + 1024]]]
        logits[ar, expected[idx[lo:lo + 1024]]] = -np.inf
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
        idx = np.sort(_rng(spec.seed, "margin-sample").choice(ordinary, 2048, replace=False))
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
        mtp_correct=o.mtp_correct,
        mtp_prediction=o.mtp_prediction,
        trunk_margin=_margins(o.head, o.embd, o.successor, idx),
        mtp_margin=_margins(o.head, o.mtp_rows, o.mtp_prediction, idx),
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
    leaf = name.split(".", 2)[-1] if name.startswith("blk.") else name
    is_mtp = name.startswith(f"blk.{spec.n_layer}.")
    # "context": history-dependent perturbation, relative to the unit-norm embedding
    out_std = spec.noise / (math.sqrt(d) * math.sqrt(shape[-1])) if len(shape) == 2 else 0.0

    if name == "token_embd.weight":
        return o.embd
    if name == "output.weight":
        return o.head
    if leaf == "nextn.eh_proj.weight":
        w = np.zeros(shape, dtype=np.float32)
        w[:, :d] = o.eh_proj_e
        if spec.noise:  # the MTP also reads the target hidden state
            w[:, d:] = _uniform(rng, (d, d), spec.noise / d)
        return w
    if leaf in ("attn_output.weight", "ssm_out.weight", "ffn_down.weight"):
        if not spec.noise:
            return np.zeros(shape, dtype=np.float32)
        # FFN mostly sees the current token only: keep it weaker than the mixers
        scale = 0.25 if leaf == "ffn_down.weight" else 1.0
        return _uniform(rng, shape, out_std * scale * (2.0 if is_mtp else 1.0))
    if len(shape) == 1:
        if leaf == "ssm_a":  # -exp(A_log), A_log ~ U(0, log 16) as in the HF init
            return -np.exp(rng.uniform(0.0, math.log(16.0), shape)).astype(np.float32)
        if leaf == "ssm_dt.bias":  # inverse softplus of dt ~ logU(1e-3, 1e-1): slow decay
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            return np.log(np.expm1(dt)).astype(np.float32)
        return np.ones(shape, dtype=np.float32)  # all norms
    if leaf == "ssm_conv1d.weight":
        return _uniform(rng, shape, 1.0 / math.sqrt(spec.ssm_d_conv))
    # input projections: RMS-normed input -> unit-scale activations
    return _uniform(rng, shape, 1.0 / math.sqrt(shape[-1]))


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

    w.add_architecture()
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
    env = os.environ.get("LLAMA_MTP_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "llama_mtp" / "models"


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

    Files live in ``$LLAMA_MTP_CACHE`` (default ``~/.cache/llama_mtp/models``) under a
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
