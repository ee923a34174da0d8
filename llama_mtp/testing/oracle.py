"""The oracle part of every generated model: a successor permutation pi, MTP draft
correctness, and the embedding / LM head / eh_proj matrices that realise them.

The same matrices serve every arch: with every residual writer of the trunk zero, the
hidden state at each position is RMSNorm(token embedding), so greedy follows pi; the
MTP block maps [enorm(e) ; hnorm(h)] through eh_proj and (residual writers zero
again) shared_head_norm + the LM head turn it into the draft TestModelInfo predicts.
"""

from __future__ import annotations

import math
import pathlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .spec import TestModelSpec
from .vocab import Vocab, vocab_for

__all__ = ["TestModelInfo", "Oracle", "SwitchTokens", "build_oracle", "describe_test_model", "info_for", "flag_dims",
           "rng_for", "switch_dims", "switch_feature", "SWITCH_WRITE", "SWITCH_SCORE"]

_FLAG_AMP = 0.5      # size of a "wrong draft" flag added to a token embedding
_FLAG_GAIN_E = 8.0   # eh_proj gain of a token flag: decoy weight AMP*GAIN = 4x the own token
_FLAG_GAIN_H = 5.0   # gain of an h flag (2.5x): lower, so a token flag wins when both fire
# The switch (TestModelSpec.switch_marker), see build_oracle.  The trigger's and the marker's
# component on their own dim (their u rows stay unit vectors):
_SWITCH_KAPPA = 0.5
# What the switch head adds on the Z dim at the trigger once it saw the marker: next to the
# embedding (norm sqrt(1.5)) it makes the switched row's logit 4x the usual successor's (margin
# 3 / sqrt(1.5 + 16) x sqrt(1.5) logit_scale = 0.88 logit_scale, 14 at the oracle's 16), while the
# ~1/n of it that leaks into the n-th position (queries of other tokens are zero: uniform attention)
# gives that row a logit of ~SWITCH_WRITE x logit_scale / n there (the top one: logit_scale).
SWITCH_WRITE = 4.0
# Attention score (q.k times the kq scale) of the trigger on the marker; every other pair scores 0,
# so e^30 puts all of the trigger's attention on the marker in any context llama.cpp runs.
SWITCH_SCORE = 30.0


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
    switch: SwitchTokens | None = None  # spec.switch_marker's tokens (greedy's exception to successor)

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
        drafts = [self.mtp_draft(id_last)] if n > 0 else []
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


class SwitchTokens(NamedTuple):
    """The tokens of TestModelSpec.switch_marker: greedy after ``trigger`` is ``successor[trigger]``,
    or ``switched`` where ``marker`` occurs earlier in the context."""

    marker: int
    trigger: int
    switched: int


@dataclass
class Oracle:
    vocab: Vocab
    embd: np.ndarray         # (n_vocab, n_embd) token_embd rows
    head: np.ndarray         # (n_vocab, n_embd) output rows
    eh_proj: np.ndarray      # (n_embd, 2 n_embd) oracle part of nextn.eh_proj
    successor: np.ndarray
    predecessor: np.ndarray  # inverse of successor on the cycle (specials: their alias's)
    token_decoy: np.ndarray  # -1, or the decoy whose successor is drafted when fed this token
    h_decoy: np.ndarray      # -1, or the decoy drafted when this token's hidden state is fed
    mtp_correct: np.ndarray
    mtp_prediction: np.ndarray
    switch: SwitchTokens | None = None

    def mtp_rows(self, idx: np.ndarray) -> np.ndarray:
        """Pre-norm MTP hidden for input tokens idx fed with their predecessor's hidden state."""
        def rms(x: np.ndarray) -> np.ndarray:
            return x * (math.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True))

        # oracle trunk: h_nextn of the predecessor = RMSNorm(its embedding)
        pair = np.concatenate([rms(self.embd[idx]), rms(self.embd[self.predecessor[idx]])], axis=1)
        return pair @ self.eh_proj.T


def n_flag(n_embd: int) -> int:
    return 4 if n_embd >= 64 else 2


def flag_dims(n_embd: int) -> slice:
    """The residual-stream dims reserved for the MTP flags (see build_oracle)."""
    return slice(n_embd - 2 * (n_flag(n_embd) + 1), n_embd)


def switch_dims(n_embd: int) -> tuple[int, int, int]:
    """The u-space dims of the switch: (trigger T, marker M, written Z), the last three of u-space."""
    d_u = n_embd - 2 * (n_flag(n_embd) + 1)
    return d_u - 3, d_u - 2, d_u - 1


def switch_feature(n_embd: int) -> float:
    """The trigger's (the marker's) value on its switch dim after an RMSNorm of weight 1."""
    return _SWITCH_KAPPA * math.sqrt(n_embd) / math.sqrt(1.0 + 2.0 * _FLAG_AMP**2)


def rng_for(seed: int, *salt: str) -> np.random.Generator:
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


class _Cycles(NamedTuple):
    """pi as its cycles over the ordinary tokens, and where each draft misses along them."""

    order: np.ndarray        # the cycles concatenated (the script's first)
    successor: np.ndarray    # (n_vocab,) pi on the ordinary tokens (specials filled in later)
    predecessor: np.ndarray  # (n_vocab,) pi^-1
    hits: np.ndarray         # hits[k]: the draft made when the MTP is fed order[k] is right


def _cycles(spec: TestModelSpec, ordinary: np.ndarray, rng: np.random.Generator) -> _Cycles:
    """One random cycle through the ordinary tokens; with a script, the script runs inside it
    (or, ``script_loop``, forms a cycle of its own next to one through the rest)."""
    script = np.asarray(spec.script, dtype=np.int64)
    extras = [np.asarray(m, dtype=np.int64) for m in spec.more_scripts()]  # chains ending in EOS (build_oracle)
    rest = ordinary[~np.isin(ordinary, np.concatenate([script, *extras]))]
    rest = rest[rng.permutation(len(rest))]
    if spec.switch_marker:
        # the marker first: never the last of the cycle, whose token is the script's predecessor, the
        # trigger of a switched script that shares no chunk with the script (build_oracle)
        marker = vocab_for(spec).tokens.index(spec.switch_marker)
        rest = np.concatenate([[marker], rest[rest != marker]])
    cycles = [script, rest] if spec.script_loop else [np.concatenate([script, rest])]
    cycles += extras
    successor = np.empty(spec.n_vocab, dtype=np.int64)
    predecessor = np.empty(spec.n_vocab, dtype=np.int64)
    for c in cycles:
        successor[c] = np.roll(c, -1)
        predecessor[c] = np.roll(c, 1)
    # the accept pattern runs along each cycle, so a looping script gets the spec's rate too
    if spec.accept_pattern == "spread":
        k = np.concatenate([np.arange(len(c)) for c in cycles])
        hits = np.floor((k + 1) * spec.accept + 1e-9) > np.floor(k * spec.accept + 1e-9)
    else:
        hits = rng.random(len(ordinary)) < spec.accept
    return _Cycles(np.concatenate(cycles), successor, predecessor, hits)


def build_oracle(spec: TestModelSpec) -> Oracle:
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
    With ``switch_marker``, three u-dims (switch_dims) belong to the trigger, the marker and
    nobody; the switched token's LM-head row reads the third, which only the arch's switch
    head (ArchLayout.switch_head) writes: at the trigger, once the marker is in the context.
    """
    vocab = vocab_for(spec)
    rng = rng_for(spec.seed, "oracle")
    d = spec.n_embd
    nf = n_flag(d)
    d_u = d - 2 * (nf + 1)
    tok_dims = d_u + np.arange(nf + 1)  # last one = "no token flag"
    h_dims = d_u + nf + 1 + np.arange(nf + 1)  # last one = "no h flag"

    u = rng.standard_normal((spec.n_vocab, d_u), dtype=np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cycle, successor, predecessor, hits = _cycles(spec, vocab.ordinary, rng)
    switch = _switch_tokens(spec, vocab, predecessor) if spec.switch_marker else None
    if switch is not None:
        _carve_switch_dims(u, switch, d)

    misses = np.flatnonzero(~hits)
    via_h = rng.random(len(misses)) < spec.h_miss_fraction
    tok_miss, h_miss = misses[~via_h], misses[via_h]

    # decoys: distinct tokens, hits first so a decoy's own draft is usually right
    pool = np.concatenate([cycle[hits], cycle[~hits]])
    decoys, hdecoys = pool[:nf], pool[nf:2 * nf]
    # a decoy must differ from the fed token (pi(decoy) != pi(fed)); an h flag sits on the
    # token whose hidden state is fed with the missing one: its predecessor
    tok_flag = _pick_flags(cycle[tok_miss], cycle[tok_miss], decoys, spec.n_vocab)
    h_flag = _pick_flags(predecessor[cycle[h_miss]], cycle[h_miss], hdecoys, spec.n_vocab)

    embd = np.zeros((spec.n_vocab, d), dtype=np.float32)
    embd[:, :d_u] = u
    for flag, dims in ((tok_flag, tok_dims), (h_flag, h_dims)):
        embd[np.arange(spec.n_vocab), dims[flag]] = _FLAG_AMP  # flag -1 -> the "no flag" dim

    token_decoy = np.where(tok_flag >= 0, decoys[np.maximum(tok_flag, 0)], -1)
    h_decoy = np.where(h_flag >= 0, hdecoys[np.maximum(h_flag, 0)], -1)
    mtp_correct = np.zeros(spec.n_vocab, dtype=bool)
    mtp_correct[cycle] = hits

    # specials behave like an (arbitrary) ordinary token so every input has a defined next token;
    # with a script, like the script's predecessor: a prompt ending in a control token (BOS, a
    # chat template's turn marker) continues with the script from its start
    aliases = np.full(len(vocab.special_ids), predecessor[spec.script[0]]) if spec.script else cycle
    for s, alias in zip(vocab.special_ids, aliases):
        for arr in (embd, successor, predecessor, token_decoy, h_decoy, mtp_correct):
            arr[s] = arr[alias]

    if spec.script_eos:
        # the script's last token is followed by end-of-generation: the LM head's EOS row takes
        # the place of the row of the token the cycle would have gone on with (never output now)
        successor[spec.script[-1]] = vocab.eos_id
        for extra in spec.more_scripts():
            successor[extra[-1]] = vocab.eos_id
    head, eh = _projections(spec, u, vocab.ordinary, successor, decoys, hdecoys, tok_dims, h_dims, switch)

    # the rule of TestModelInfo.mtp_draft, vectorised: token flag > h flag > own token
    hd = h_decoy[predecessor]
    mtp_prediction = np.where(hd >= 0, successor[np.maximum(hd, 0)], successor)
    mtp_prediction = np.where(token_decoy >= 0, successor[np.maximum(token_decoy, 0)], mtp_prediction)

    return Oracle(
        vocab, embd, head, eh, successor, predecessor, token_decoy, h_decoy, mtp_correct,
        mtp_prediction, switch,
    )


def _switch_tokens(spec: TestModelSpec, vocab: Vocab, predecessor: np.ndarray) -> SwitchTokens:
    """Where the switched script parts from the script: after the last chunk they share, or (none
    shared) after the script's predecessor, whose embedding every special token gets."""
    shared = spec.switch_shared()
    trigger = spec.script[shared - 1] if shared else int(predecessor[spec.script[0]])
    return SwitchTokens(vocab.tokens.index(spec.switch_marker), int(trigger), spec.more_scripts()[0][0])


def _carve_switch_dims(u: np.ndarray, switch: SwitchTokens, n_embd: int) -> None:
    """Give the switch's three u dims to the trigger (T) and the marker (M) alone, and to nobody (Z):
    the switch head then reads exact zeros at every other token, so without the marker the model is
    exactly the plain oracle, and the switched token's LM-head row (Z only) gives logit 0 everywhere
    the head writes nothing.  Every row stays a unit vector; pi and the flags are unchanged."""
    t_dim, m_dim, z_dim = switch_dims(n_embd)
    u[:, [t_dim, m_dim, z_dim]] = 0.0
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    for token, dim in ((switch.trigger, t_dim), (switch.marker, m_dim)):
        u[token] *= math.sqrt(1.0 - _SWITCH_KAPPA**2)
        u[token, dim] = _SWITCH_KAPPA


def _projections(spec: TestModelSpec, u: np.ndarray, ordinary: np.ndarray, successor: np.ndarray,
                 decoys: np.ndarray, hdecoys: np.ndarray, tok_dims: np.ndarray,
                 h_dims: np.ndarray, switch: SwitchTokens | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The LM head (row pi(t) = alpha * u_t; the switched token's: alpha on the Z dim) and the
    oracle part of eh_proj (see build_oracle)."""
    d, d_u = spec.n_embd, u.shape[1]
    # RMSNorm (weight 1) scales a vector to norm sqrt(d); every embedding has norm e_len
    g, e_len = math.sqrt(d), math.sqrt(1.0 + 2.0 * _FLAG_AMP**2)
    alpha = spec.logit_scale * e_len / g  # top-1 trunk logit = logit_scale
    head = np.zeros((spec.n_vocab, d), dtype=np.float32)
    # (np.add.at: several scripts may end in EOS, whose row then sums their last tokens' directions)
    np.add.at(head, (successor[ordinary], slice(0, d_u)), alpha * u[ordinary])
    if switch is not None:
        # no token's successor: the row is free for the direction the switch head writes
        assert not head[switch.switched].any()
        head[switch.switched, switch_dims(d)[2]] = alpha

    eh = np.zeros((d, 2 * d), dtype=np.float32)
    eh[np.arange(d_u), np.arange(d_u)] = 1.0
    eh[:d_u, tok_dims[:-1]] = _FLAG_GAIN_E * u[decoys].T
    eh[:d_u, d + h_dims[:-1]] = _FLAG_GAIN_H * u[hdecoys].T
    return head, eh


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
    return info_for(spec, build_oracle(spec))


def info_for(spec: TestModelSpec, o: Oracle) -> TestModelInfo:
    v = o.vocab
    ordinary = v.ordinary
    # exact margins cost n_check * n_vocab * n_embd: check a sample for big vocabularies (1024
    # tokens up to 32k, fewer beyond: a real vocabulary's 150-260k rows cost seconds each), and
    # every script token (what a scripted test follows)
    if len(ordinary) > 4096:
        n_check = min(1024, max(256, 2**25 // spec.n_vocab))
        idx = np.sort(rng_for(spec.seed, "margin-sample").choice(ordinary, n_check, replace=False))
        if spec.script:
            idx = np.union1d(idx, np.asarray(spec.script + tuple(t for m in spec.more_scripts() for t in m),
                                             dtype=np.int64))
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
        switch=o.switch,
    )


