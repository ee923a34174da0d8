"""Property tests: a hypothesis state machine over a REAL two-sequence MtpSession,
and pure properties of MtpStats arithmetic and of the 32-bit argument checks."""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional

import numpy as np
import pytest
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import llama_cpp
import llama_mtp
from llama_mtp.errors import (
    BadSeqIdError,
    MtpArgumentError,
    MtpProcessError,
    ProtocolError,
    SessionClosedError,
)
from llama_mtp.session import _i32
from llama_mtp.stats import MtpStats

from _helpers import ORACLE_RANDOM_SPEC, Decoder, build_model, counters, load_pair, pos_max, seq_rm

# State machine size per hypothesis profile: (examples, steps per example).
# ci: 100 examples x up to 50 steps = up to 5,000 rule calls per machine (each also
# runs every invariant), two machines (eager, deferred). long: 1000 x 100 = 100,000 steps.
STATE_MACHINE_RUNS = {"ci": (100, 50), "long": (1000, 100)}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
SM_EXAMPLES, SM_STEPS = STATE_MACHINE_RUNS.get(PROFILE, STATE_MACHINE_RUNS["ci"])

N_SEQ = 2
N_DRAFT_MAX = 3
N_VOCAB = 384
VALID_SEQS = list(range(N_SEQ))
INVALID_SEQS = [-1, N_SEQ, N_SEQ + 1, 2**31 - 1, -(2**31), 2**40]
I32_MAX = 2**31 - 1


@dataclass
class SeqModel:
    """What the test knows about one sequence."""

    mem: int = 0                  # tokens held by the target (and seen by the drafter)
    dft_mem: int = 0              # tokens decoded on the draft context (< mem: deferred rows)
    id_last: int = 1              # the next token to decode (not in memory)
    pending: bool = False
    draft: List[int] = field(default_factory=list)
    pos0: int = 0                 # n_past of the pending draft
    verified: bool = False        # the verify batch for the pending draft was processed
    n_verify: int = 0             # rows of this seq in the last processed batch
    verify_argmax: List[int] = field(default_factory=list)


@dataclass
class StatsModel:
    n_draft_calls: int = 0
    n_drafts: int = 0
    n_drafted: int = 0
    n_accept_calls: int = 0
    n_accepted: int = 0
    n_process_calls: int = 0
    n_process_tokens: int = 0
    drafted_per_pos: List[int] = field(default_factory=lambda: [0] * N_DRAFT_MAX)
    accepted_per_pos: List[int] = field(default_factory=lambda: [0] * N_DRAFT_MAX)


seq_ids = st.one_of(st.sampled_from(VALID_SEQS), st.sampled_from(VALID_SEQS), st.sampled_from(INVALID_SEQS))
tokens = st.integers(0, N_VOCAB - 1)
any_n = st.one_of(st.integers(-1, N_DRAFT_MAX + 1),
                  st.sampled_from([65535, 65536, 70000, I32_MAX, 2**31, -(2**31), 2**40, -(2**40)]))
bad_tokens = st.sampled_from([-1, N_VOCAB, N_VOCAB + 7, 2**31 - 1, -(2**31)])


class MtpSessionMachine(RuleBasedStateMachine):
    """Drives one MtpSession(n_seq=2, n_draft_max=3) on a shared (target, draft) pair.

    Every rule draws from valid and invalid inputs alike; the machine predicts the
    outcome (success, or exactly which documented exception), and the invariants
    check that pending(), stats and both contexts' memory agree with the model.
    """

    DEFER = False  # the session's defer_catchup
    n_ubatch_dft = 0  # deferred runs this long are decoded at once
    target = None  # set by the test before running
    draft_llm = None
    dec: Optional[Decoder] = None
    n_ctx_seq = 0

    def __init__(self) -> None:
        super().__init__()
        # finalize sessions earlier examples left unclosed (hypothesis' explain phase can
        # abandon one after a failure) now, before this example's memory is cleared, rather
        # than at some allocation in the middle of it
        gc.collect()
        for llm in (self.target, self.draft_llm):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
        # backend_sampling=False: draft_dist() (the session's own draft loop) is available too
        self.session = llama_mtp.MtpSession(self.target, self.draft_llm, n_seq=N_SEQ, n_draft_max=N_DRAFT_MAX,
                                            backend_sampling=False, defer_catchup=self.DEFER)
        self.closed = False
        self.seqs: Dict[int, SeqModel] = {i: SeqModel() for i in VALID_SEQS}
        self.stats = StatsModel()
        self.decoded_since_open = False  # the target has hidden states for this session
        self.last_batch_ok = False       # dec.batch holds the last processed verify batch
        self.last_runs: List[tuple] = [] # its (seq, first pos, last pos) runs

    def teardown(self) -> None:
        self.session.close()

    # -- helpers -----------------------------------------------------------------------

    def expect(self, exc_type, call):
        """Run call; exc_type None means it must succeed. Returns the call's result."""
        if exc_type is None:
            return call()
        with pytest.raises(exc_type):
            call()
        return None

    def _pre(self, seq_id) -> Optional[type]:
        """Error of the Python-side checks every per-seq call does first."""
        if seq_id not in self.seqs:
            return BadSeqIdError
        return None

    # -- rules -------------------------------------------------------------------------

    @rule(seq_id=seq_ids, prompt=st.one_of(st.lists(tokens, max_size=4), st.lists(tokens, min_size=40, max_size=120)),
          bad=st.one_of(st.none(), st.none(), bad_tokens))
    def start(self, seq_id, prompt, bad):
        """A new generation on seq: clear it, prefill prompt[:-1] through process(), begin()."""
        if bad is not None and prompt:
            prompt = prompt[:-1] + [bad]
        err = self._pre(seq_id)
        if err is None and self.closed:
            err = SessionClosedError
        if err is None and bad is not None and prompt:
            err = MtpArgumentError
        note(f"start({seq_id}, len={len(prompt)}, bad={bad}) -> {err}")
        if err is not None:
            self.expect(err, lambda: self.session.begin(seq_id, prompt))
            return
        m = self.seqs[seq_id]
        seq_rm(self.target, seq_id, 0)
        seq_rm(self.draft_llm, seq_id, 0)
        m.mem = m.dft_mem = 0
        body = prompt[:-1]
        for lo in range(0, len(body), 64):
            part = body[lo:lo + 64]
            self.dec.decode(seq_id, part, m.mem, logits=[False] * (len(part) - 1) + [True])
            self.session.process(self.dec.batch)
            self.decoded_since_open = True
            self.stats.n_process_calls += 1
            self.stats.n_process_tokens += len(part)
            m.mem += len(part)
            self._drafter_saw(m)
        self.last_batch_ok = False
        self.expect(None, lambda: self.session.begin(seq_id, body))
        m.pending = m.verified = False
        m.draft = []
        m.id_last = prompt[-1] if prompt else 7

    @rule(seq_id=seq_ids, offset=st.sampled_from([0, 0, 0, 0, 1, -1, 1000, -(2**31)]),
          n_max=st.sampled_from([None, None, None, 0, 1, 2, 3, 4, -1, -2, 2**31 - 1]),
          bad_id=st.one_of(st.none(), st.none(), bad_tokens),
          dist=st.one_of(st.none(), st.tuples(st.sampled_from([0.0, 0.7, 5.0]), st.sampled_from([1, 5, 40, 1000]),
                                               st.integers(0, 2**32 - 1))))
    def draft(self, seq_id, offset, n_max, bad_id, dist=None):
        """draft(), or with ``dist`` = (temperature, top_k, seed) the session's own draft_dist()."""
        err = self._pre(seq_id)
        m = self.seqs.get(seq_id)
        n_past = (m.mem if m else 0) + offset
        n_past = max(-(2**31), min(I32_MAX, n_past))
        id_last = bad_id if bad_id is not None else (m.id_last if m else 1)
        if err is None and n_max is not None and n_max < 0:
            err = MtpArgumentError  # checked in Python, before the session's state
        if err is None and self.closed:
            err = SessionClosedError
        if err is None and self.DEFER and dist is None:
            err = MtpArgumentError  # upstream's drafter cannot see deferred rows
        if err is None and m.pending:
            err = ProtocolError
        eff = N_DRAFT_MAX if n_max is None else n_max
        if err is None and eff > N_DRAFT_MAX:
            err = MtpArgumentError
        if err is None and not 0 <= id_last < N_VOCAB:
            err = MtpArgumentError
        if err is None and n_past != m.mem:
            err = MtpArgumentError  # pos0 < 0 or not the number of tokens in the context
        if err is None and n_past + eff >= self.n_ctx_seq:
            err = MtpArgumentError
        note(f"draft({seq_id}, {n_past}, {id_last}, {n_max}, dist={dist}) -> {err}")
        if dist is None:
            d = self.expect(err, lambda: self.session.draft(seq_id, n_past, id_last, n_max=n_max))
        else:
            temperature, top_k, seed = dist
            res = self.expect(err, lambda: self.session.draft_dist(seq_id, n_past, id_last, n_max=n_max,
                                                                   temperature=temperature, top_k=top_k, seed=seed))
            if res is not None:
                d, q = res
                assert q.shape == (len(d), N_VOCAB)
                assert np.allclose(q.sum(axis=1), 1.0, atol=1e-4)
                assert all(q[i, t] > 0 for i, t in enumerate(d))
        if err is not None:
            return
        # p_min = 0 and n_min = 0: both draft paths propose exactly n_max tokens
        assert isinstance(d, list) and len(d) == eff <= N_DRAFT_MAX
        assert all(isinstance(t, int) and 0 <= t < N_VOCAB for t in d)
        self.stats.n_draft_calls += 1
        if d:
            self.stats.n_drafts += 1
            self.stats.n_drafted += len(d)
            for i in range(len(d)):
                self.stats.drafted_per_pos[i] += 1
            m.pending, m.verified, m.draft, m.pos0 = True, False, list(d), m.mem
        if eff > 0:
            m.dft_mem = m.mem  # the draft loop decoded the deferred rows first

    def _verify_runs(self, sids, ks):
        runs = []
        for sid, k in zip(sids, ks):
            m = self.seqs[sid]
            runs.append((sid, [m.id_last, *m.draft[:k]], m.mem))
        self.last_runs = [(sid, pos, pos + len(toks) - 1) for sid, toks, pos in runs]
        return runs

    def _drafter_saw(self, m):
        """After a process(): eager sessions decode on the draft context right away,
        deferring ones once a run reaches the draft context's n_ubatch."""
        if not self.DEFER or m.mem - m.dft_mem >= self.n_ubatch_dft:
            m.dft_mem = m.mem

    def _after_processed(self, sids, ks, logits):
        row = 0
        for sid, k in zip(sids, ks):
            m = self.seqs[sid]
            ids = [int(x) for x in logits[row:row + k + 1].argmax(axis=-1)]
            row += k + 1
            m.n_verify = k + 1
            if m.pending:
                m.verified = True
                m.verify_argmax = ids
                m.mem += k + 1
            else:  # a plain step: id_last is now in memory, its argmax comes next
                m.mem += 1
                m.id_last = ids[0]
            self._drafter_saw(m)
            self.stats.n_process_tokens += k + 1
        self.stats.n_process_calls += 1

    def _can_verify(self, sid) -> bool:
        m = self.seqs[sid]
        return not (m.pending and m.verified) and m.mem + 1 + len(m.draft if m.pending else []) < self.n_ctx_seq

    @precondition(lambda self: not self.closed)
    @rule(which=st.sampled_from(["0", "1", "both", "pending"]), frac=st.sampled_from([1.0, 1.0, 0.5, 0.0]))
    def verify(self, which, frac):
        """Decode [id_last, *draft[:k]] on the target (one batch for one or both seqs), then process()."""
        if which == "pending":
            sids = [s for s, m in self.seqs.items() if m.pending]
        else:
            sids = [0, 1] if which == "both" else [int(which)]
        sids = [s for s in sids if self._can_verify(s)]
        if not sids:
            return
        ks = []
        for sid in sids:
            m = self.seqs[sid]
            ks.append(int(math.floor(len(m.draft) * frac)) if m.pending else 0)
        logits = self.dec.decode_runs(self._verify_runs(sids, ks))
        self.decoded_since_open = True
        note(f"verify({sids}, k={ks})")
        self.session.process(self.dec.batch)
        self._after_processed(sids, ks, logits)
        self.last_batch_ok = True

    @rule(kind=st.sampled_from(["empty", "stale", "bad_seq", "bad_token", "type"]))
    def process_garbage(self, kind):
        """process() of a batch that is not the one the target just decoded."""
        if kind == "type":
            self.expect(MtpArgumentError, lambda: self.session.process(12345))
            return
        if kind == "stale" and not self.last_batch_ok:
            return
        if self.closed:
            err = SessionClosedError
        elif kind == "empty":
            err = MtpProcessError
        elif not self.decoded_since_open:
            # "no hidden states yet" unless the target's output buffer still holds rows
            # from a decode under an earlier session (the shim cannot tell those apart)
            err = (MtpProcessError, BadSeqIdError) if kind == "bad_seq" else MtpProcessError
        elif kind == "bad_seq":
            err = BadSeqIdError
        elif kind == "stale" and self.DEFER and all(
                self.seqs[sid].mem - 1 == last and self.seqs[sid].dft_mem <= first
                for sid, first, last in self.last_runs):
            err = None  # the rows it re-sends are still deferred: they are replaced, same state
        else:
            err = MtpProcessError
        with Decoder(self.target, capacity=8, n_seq_max=1) as junk:
            if kind == "empty":
                batch = junk.batch
            elif kind == "stale":
                batch = self.dec.batch  # already processed
            elif kind == "bad_seq":
                junk.fill_runs([(0, [1], self.seqs[0].mem), (N_SEQ, [2], 0)])
                batch = junk.batch
            else:
                junk.fill(0, [N_VOCAB + 1], self.seqs[0].mem)
                batch = junk.batch
            note(f"process_garbage({kind}) -> {err}")
            self.expect(err, lambda: self.session.process(batch))
            if err is None:
                self.stats.n_process_calls += 1
                self.stats.n_process_tokens += sum(last - first + 1 for _, first, last in self.last_runs)

    @rule(data=st.data())
    def accept(self, data):
        # mostly a seq with a proposal (rarely reached by chance), else any id
        settling = [sid for sid, m in self.seqs.items() if m.pending]
        seq_id = data.draw(st.one_of(st.sampled_from(settling), seq_ids) if settling else seq_ids, label="seq_id")
        m = self.seqs.get(seq_id)
        valid = st.integers(0, max(0, m.n_verify - 1 if m.verified else len(m.draft))) if m else st.just(0)
        n = data.draw(st.one_of(valid, valid, any_n), label="n")
        self._accept(seq_id, n)

    def _accept(self, seq_id, n):
        """accept(seq_id, n) with the outcome predicted from the model."""
        err = self._pre(seq_id)
        m = self.seqs.get(seq_id)
        if err is None and not -(2**31) <= n <= I32_MAX:
            err = MtpArgumentError
        if err is None and self.closed:
            err = SessionClosedError
        if err is None and not m.pending:
            err = ProtocolError
        if err is None and n < 0:
            err = MtpArgumentError
        if err is None and n > len(m.draft):
            err = ProtocolError
        if err is None and not m.verified:
            err = ProtocolError
        if err is None and n > m.n_verify - 1:
            err = ProtocolError
        note(f"accept({seq_id}, {n}) -> {err}")
        self.expect(err, lambda: self.session.accept(seq_id, n))
        if err is None:
            self._accepted(m, n)

    @precondition(lambda self: not self.closed)
    @rule(seq_id=st.sampled_from(VALID_SEQS), data=st.data())
    def step(self, seq_id, data):
        """One whole speculative step on a valid seq: [draft] -> verify -> accept(n <= k)."""
        m = self.seqs[seq_id]
        if not m.pending:
            n_max = data.draw(st.sampled_from([None, 1, 2, 3]), label="n_max")
            eff = N_DRAFT_MAX if n_max is None else n_max
            if m.mem + 1 + eff >= self.n_ctx_seq:
                return
            own = st.one_of(st.just((0.0, 40, 0)), st.just((1.0, 10, 3)))
            dist = data.draw(own if self.DEFER else st.one_of(st.none(), own), label="dist")
            self.draft(seq_id, 0, n_max, None, dist)
        if m.pending and not m.verified:
            self.verify(str(seq_id), data.draw(st.sampled_from([1.0, 1.0, 1.0, 0.5, 0.0]), label="frac"))
        if m.pending and m.verified:
            if data.draw(st.booleans(), label="try_bad_n_first"):
                self._accept(seq_id, data.draw(any_n, label="bad_n"))  # may well be valid too
        if m.pending and m.verified:
            n = data.draw(st.sampled_from(range(m.n_verify)), label="n")
            self.expect(None, lambda: self.session.accept(seq_id, n))
            self._accepted(m, n)

    def _accepted(self, m, n):
        m.pending = m.verified = False
        m.mem = m.pos0 + 1 + n
        m.dft_mem = min(m.dft_mem, m.mem)
        m.id_last = m.verify_argmax[n]
        m.draft = []
        self.stats.n_accept_calls += 1
        self.stats.n_accepted += n
        for i in range(n):
            self.stats.accepted_per_pos[i] += 1

    @rule(seq_id=seq_ids)
    def begin_only(self, seq_id):
        """begin() without touching memory: drops the pending proposal, nothing else."""
        err = self._pre(seq_id) or (SessionClosedError if self.closed else None)
        note(f"begin_only({seq_id}) -> {err}")
        self.expect(err, lambda: self.session.begin(seq_id, []))
        if err is not None:
            return
        m = self.seqs[seq_id]
        if m.pending and m.verified:  # the verify rows stay in memory: continue after them
            m.id_last = m.verify_argmax[-1]
        m.pending = m.verified = False
        m.draft = []

    @rule(seq_id=seq_ids)
    def query_pending(self, seq_id):
        err = self._pre(seq_id) or (SessionClosedError if self.closed else None)
        got = self.expect(err, lambda: self.session.pending(seq_id))
        if err is None:
            assert got is self.seqs[seq_id].pending

    @rule(go=st.integers(0, 7))
    def close(self, go):
        if go == 0:
            note("close()")
            self.session.close()
            self.closed = True

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def session_agrees_with_model(self):
        if self.closed:
            assert self.session.closed
            with pytest.raises(SessionClosedError):
                self.session.pending(0)
            with pytest.raises(SessionClosedError):
                self.session.stats
            return
        stats = counters(self.session.stats)
        want = self.stats
        assert stats.drafted_per_pos == tuple(want.drafted_per_pos)
        assert stats.accepted_per_pos == tuple(want.accepted_per_pos)
        got = {k: getattr(stats, k) for k in ("n_draft_calls", "n_drafts", "n_drafted", "n_accept_calls",
                                             "n_accepted", "n_process_calls", "n_process_tokens")}
        assert got == {k: getattr(want, k) for k in got}
        assert sum(stats.drafted_per_pos) == stats.n_drafted
        assert sum(stats.accepted_per_pos) == stats.n_accepted <= stats.n_drafted
        for sid, m in self.seqs.items():
            assert self.session.pending(sid) is m.pending

    @invariant()
    def memories_agree_with_model(self):
        for sid, m in self.seqs.items():
            assert pos_max(self.target, sid) == m.mem - 1, (sid, m)
            assert pos_max(self.draft_llm, sid) == m.dft_mem - 1, (sid, m)


class DeferredMtpSessionMachine(MtpSessionMachine):
    """The same machine on a session with defer_catchup=True."""

    DEFER = True


@pytest.fixture(scope="module")
def machine_pair(model_dir):
    path = build_model(ORACLE_RANDOM_SPEC, model_dir)
    target, draft = load_pair(path, n_draft_max=N_DRAFT_MAX, n_seq=N_SEQ, n_ctx=512)
    yield target, draft
    target.close()
    draft.close()


@pytest.mark.parametrize("machine", [MtpSessionMachine, DeferredMtpSessionMachine], ids=["eager", "deferred"])
def test_session_state_machine(machine_pair, machine):
    target, draft = machine_pair
    dec = Decoder(target, capacity=128)
    MtpSessionMachine.target = target
    MtpSessionMachine.draft_llm = draft
    MtpSessionMachine.dec = dec
    MtpSessionMachine.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(target._ctx.ctx))
    MtpSessionMachine.n_ubatch_dft = int(llama_cpp.llama_n_ubatch(draft._ctx.ctx))
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(max_examples=SM_EXAMPLES, stateful_step_count=SM_STEPS, deadline=None),
        )
    finally:
        dec.close()
        MtpSessionMachine.target = MtpSessionMachine.draft_llm = MtpSessionMachine.dec = None


# ------------------------------------------------------------------ pure: MtpStats


def stats_from_steps(steps, n_pos):
    """The MtpStats a session reports after ``steps``: (draft length, accepted, times) triples,
    each step a draft() call, then (if it drafted) one accept() call; ``times`` repeats it."""
    drafted, accepted = [0] * n_pos, [0] * n_pos
    for n, a, w in steps:
        for i in range(n):
            drafted[i] += w
        for i in range(a):
            accepted[i] += w
    real = [(n, a, w) for n, a, w in steps if n]
    return MtpStats(
        n_draft_calls=sum(w for _, _, w in steps), n_drafts=sum(w for _, _, w in real),
        n_drafted=sum(n * w for n, _, w in real), n_accept_calls=sum(w for _, _, w in real),
        n_accepted=sum(a * w for _, a, w in real), n_process_calls=sum(w for _, _, w in steps),
        n_process_tokens=sum((n + 1) * w for n, _, w in steps),
        drafted_per_pos=tuple(drafted), accepted_per_pos=tuple(accepted),
        t_draft_s=0.0, t_process_s=0.0, t_accept_s=0.0)


def expected_stats(steps, n_pos):
    """acceptance_rate, per_pos_acceptance and mean_tokens_per_draft_step computed another
    way: one (position, accepted?) outcome per drafted token, exact fractions, grouped."""
    outcomes = [(i, i < a, w) for n, a, w in steps for i in range(n)]
    n_tok = sum(w for _, _, w in outcomes)
    rate = Fraction(sum(w for _, ok, w in outcomes if ok), n_tok) if n_tok else Fraction(0)
    per_pos = []
    for i in range(n_pos):
        at_i = [(ok, w) for j, ok, w in outcomes if j == i]
        reached = sum(w for _, w in at_i)
        per_pos.append(Fraction(sum(w for ok, w in at_i if ok), reached) if reached else Fraction(0))
    # committed tokens of each drafting step: its accepted drafts plus the token the target samples
    committed = [(a + 1, w) for n, a, w in steps if n]
    n_steps = sum(w for _, w in committed)
    mean = Fraction(sum(c * w for c, w in committed), n_steps) if n_steps else Fraction(0)
    return rate, per_pos, mean


@st.composite
def draft_histories(draw):
    n_pos = draw(st.integers(1, 8))
    times = st.one_of(st.just(1), st.integers(1, 10**6))  # large counts too
    steps = draw(st.lists(st.integers(0, n_pos).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n), times)), max_size=60))
    return steps, n_pos


def check_stats(steps, n_pos):
    s = stats_from_steps(steps, n_pos)
    rate, per_pos, mean = expected_stats(steps, n_pos)
    # float(Fraction) and int / int are both correctly rounded: the same float exactly
    assert s.acceptance_rate == float(rate)
    assert s.per_pos_acceptance == tuple(float(p) for p in per_pos)
    assert s.mean_tokens_per_draft_step == pytest.approx(float(mean), rel=1e-12, abs=0.0)
    return s


@given(draft_histories())
def test_stats_match_an_independent_count(history):
    check_stats(*history)


@pytest.mark.parametrize("steps, n_pos, want", [
    ([], 3, (0.0, (0.0, 0.0, 0.0), 0.0)),                                   # nothing yet
    ([(0, 0, 5)], 2, (0.0, (0.0, 0.0), 0.0)),                               # only plain steps
    ([(3, 0, 1)], 3, (0.0, (0.0, 0.0, 0.0), 1.0)),                          # all rejected
    ([(3, 3, 2)], 4, (1.0, (1.0, 1.0, 1.0, 0.0), 4.0)),                     # all accepted, pos 3 never drafted
    ([(1, 1, 1), (2, 0, 1), (0, 0, 7)], 2, (1 / 3, (0.5, 0.0), 1.5)),       # plain steps do not count
    ([(2, 1, 1), (1, 0, 3)], 2, (0.2, (0.25, 0.0), 1.25)),
])
def test_stats_edge_cases(steps, n_pos, want):
    s = check_stats(steps, n_pos)
    rate, per_pos, mean = want  # worked out by hand
    assert s.acceptance_rate == pytest.approx(rate)
    assert s.per_pos_acceptance == pytest.approx(per_pos)
    assert s.mean_tokens_per_draft_step == pytest.approx(mean)


# ------------------------------------------------------------------- pure: _i32


@given(st.integers())
def test_i32_bounds(x):
    if -(2**31) <= x <= 2**31 - 1:
        assert _i32(x, "x") == x and type(_i32(x, "x")) is int
    else:
        with pytest.raises(MtpArgumentError, match="32 bits"):
            _i32(x, "x")


@given(st.integers(-(2**63), 2**63 - 1), st.sampled_from([np.int64, np.int32, np.int16, np.uint32]))
def test_i32_numpy_ints(x, dtype):
    info = np.iinfo(dtype)
    assume(info.min <= x <= info.max)
    v = dtype(x)
    if -(2**31) <= x <= 2**31 - 1:
        assert _i32(v, "x") == x and type(_i32(v, "x")) is int
    else:
        with pytest.raises(MtpArgumentError):
            _i32(v, "x")


@given(st.one_of(st.booleans(), st.floats(allow_nan=True), st.text(max_size=3), st.none(),
                 st.lists(st.integers(), max_size=2), st.just(np.float32(1.0)), st.just(np.bool_(True))))
def test_i32_rejects_non_integers(x):
    with pytest.raises(MtpArgumentError):
        _i32(x, "x")
