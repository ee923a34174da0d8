"""Foundation tests of MtpSession: import, lifecycle, every error as a Python
exception, and the speculative loop matching plain greedy decoding."""

from __future__ import annotations

import ctypes
import gc
import math
import weakref
from typing import Any, List, Tuple

import llama_cpp
import numpy as np
import pytest

import llama_mtp
from llama_mtp import testing
from llama_mtp.errors import (
    BadSeqIdError,
    MtpArgumentError,
    MtpError,
    MtpInitError,
    MtpProcessError,
    ProtocolError,
    RollbackError,
    SessionClosedError,
    ShimUnavailableError,
)

import _helpers
from _helpers import (
    ORACLE_HALF_SPEC,
    ORACLE_RANDOM_SPEC,
    ORACLE_SPEC,
    Decoder,
    counters,
    native_context,
    greedy_reference,
    greedy_reference_logits,
    load_pair,
    plain_llama,
    pos_max,
    prefill,
    run_python,
    describe,
    seq_rm,
    spec_loop,
    spec_loop_multi,
    tokenize,
)

N_GEN = 96  # >= 64 tokens per loop
# batch-vs-single-token float noise on the tiny f32 models is ~1e-4; a wrong KV or
# recurrent-state rollback moves logits by O(0.1..1) (checked in test_context_model_is_history_sensitive)
LOGIT_TOL = 1e-2
PROMPT = testing.CONTEXT_TEST_PROMPT


def _started(target, draft, session, text="hello world"):
    """Prefill text[:-1] on seq 0 and return (decoder, n_past, id_last)."""
    prompt = tokenize(target, text)
    dec = Decoder(target)
    n_past = prefill(session, dec, 0, prompt[:-1])
    session.begin(0, prompt[:-1])
    return dec, n_past, prompt[-1]


def _verify(session, dec, n_past, id_last, d):
    logits = dec.decode(0, [id_last, *d], n_past)
    session.process(dec.batch)
    return logits.argmax(axis=-1)


# ------------------------------------------------------------------------------ import


def test_import_is_lazy_and_exports_api():
    proc = run_python("""
        import llama_mtp
        from llama_mtp import _loader
        assert not _loader.is_loaded(), "importing llama_mtp loaded the native shim"
        for name in llama_mtp.__all__:
            assert hasattr(llama_mtp, name), name
        print("OK", llama_mtp.__version__)
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, describe(proc)


def test_exception_hierarchy():
    for exc in (MtpInitError, MtpArgumentError, MtpProcessError, BadSeqIdError, ProtocolError,
                RollbackError, SessionClosedError, ShimUnavailableError):
        assert issubclass(exc, MtpError)
    assert issubclass(MtpError, RuntimeError)
    assert issubclass(MtpArgumentError, ValueError)
    assert issubclass(BadSeqIdError, IndexError)
    assert issubclass(ShimUnavailableError, ImportError)
    e = BadSeqIdError("msg", 5, 2)
    assert (e.seq_id, e.n_seq, str(e)) == (5, 2, "msg")


def test_session_basic_properties(pair):
    target, draft = pair
    # n_draft_max below the pair's default (3) and below what the model allows: the session's own
    # value, as the shim reports it back (n_max).
    with llama_mtp.MtpSession(target, draft, n_draft_max=2) as s:
        assert s.n_seq == 1 and s.n_draft_max == 2 and s.n_max == 2
        assert s.defer_catchup is False
        with pytest.raises(BadSeqIdError) as bad:  # n_seq bounds the seq ids
            s.pending(1)
        assert (bad.value.seq_id, bad.value.n_seq) == (1, 1)
        assert s.target is target and s.draft_model is draft
        assert not s.closed
        st = s.stats
        assert isinstance(st, llama_mtp.MtpStats)
        assert st.drafted_per_pos == (0, 0) and st.accepted_per_pos == (0, 0)
        assert (st.n_draft_calls, st.n_drafts, st.n_accept_calls, st.n_process_calls) == (0, 0, 0, 0)
        assert st.acceptance_rate == 0.0 and st.mean_tokens_per_draft_step == 0.0
        assert s.pending(0) is False
    assert s.closed


# --------------------------------------------------------------------------- lifecycle


def _all_calls(s, target):
    return {
        "draft": lambda: s.draft(0, 0, 1),
        "accept": lambda: s.accept(0, 0),
        "pending": lambda: s.pending(0),
        "begin": lambda: s.begin(0, [1, 2]),
        "process": lambda: s.process(target),
        "stats": lambda: s.stats,
    }


def test_use_after_close_raises_and_double_close_is_ok(pair):
    target, draft = pair
    s = llama_mtp.MtpSession(target, draft)
    s.close()
    s.close()
    assert s.closed
    for name, call in _all_calls(s, target).items():
        with pytest.raises(SessionClosedError):
            call()
    with s:  # entering a closed session is harmless; exit closes again
        pass


def test_context_manager_closes(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        dec, n_past, id_last = _started(target, draft, s)
        assert len(s.draft(0, n_past, id_last)) == 3
    dec.close()
    with pytest.raises(SessionClosedError):
        s.pending(0)


@pytest.mark.parametrize("first", ["target", "draft"])
def test_llama_closed_before_session(oracle_model, first):
    target, draft = load_pair(oracle_model)
    s = llama_mtp.MtpSession(target, draft)
    dec, n_past, id_last = _started(target, draft, s)
    d = s.draft(0, n_past, id_last)
    assert s.pending(0) and len(d) == 3
    dec.close()
    (target if first == "target" else draft).close()
    assert s.closed
    for name, call in _all_calls(s, target).items():
        with pytest.raises(SessionClosedError, match="closed"):
            call()
    with pytest.raises(SessionClosedError):
        llama_mtp.MtpSession(target, draft)
    s.close()
    s.close()
    target.close()
    draft.close()


def test_closing_llamas_after_session(oracle_model):
    target, draft = load_pair(oracle_model)
    s = llama_mtp.MtpSession(target, draft)
    r = spec_loop(target, draft, s, tokenize(target, PROMPT), 16, 3)
    assert r.stats.n_accepted > 0
    s.close()
    draft.close()
    target.close()
    assert s.closed


def test_gc_of_session_without_close(pair):
    target, draft = pair
    s = llama_mtp.MtpSession(target, draft)
    dec, n_past, id_last = _started(target, draft, s)
    s.draft(0, n_past, id_last)  # leave a proposal pending
    ref = weakref.ref(s)
    del s
    gc.collect()
    assert ref() is None
    dec.close()
    # the pair is still usable by a new session
    seq_rm(target, 0, 0)
    seq_rm(draft, 0, 0)
    with llama_mtp.MtpSession(target, draft) as s2:
        prompt = tokenize(target, PROMPT)
        r = spec_loop(target, draft, s2, prompt, 32, 3)
    assert r.tokens == greedy_reference(target.model_path, prompt, 32)


def test_gc_of_everything_without_close(oracle_model):
    target, draft = load_pair(oracle_model)
    s = llama_mtp.MtpSession(target, draft)
    spec_loop(target, draft, s, tokenize(target, PROMPT), 8, 3)
    refs = [weakref.ref(x) for x in (s, target, draft)]
    del s, target, draft
    gc.collect()
    assert all(r() is None for r in refs)


def test_sequential_sessions_on_one_pair(pair):
    target, draft = pair
    prompt = tokenize(target, PROMPT)
    ref = greedy_reference(target.model_path, prompt, 32)
    for n_draft in (1, 2, 3, 0):
        seq_rm(target, 0, 0)
        seq_rm(draft, 0, 0)
        with llama_mtp.MtpSession(target, draft) as s:
            assert spec_loop(target, draft, s, prompt, 32, n_draft).tokens == ref


# ------------------------------------------------------------------------------ errors


BAD_SEQ_IDS = [-1, 1, 2, 2**31 - 1, -(2**31), 2**40, -(2**63)]


@pytest.mark.parametrize("seq_id", BAD_SEQ_IDS)
@pytest.mark.parametrize("method", ["draft", "accept", "pending", "begin"])
def test_bad_seq_ids(pair, method, seq_id):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        call = {
            "draft": lambda: s.draft(seq_id, 0, 1),
            "accept": lambda: s.accept(seq_id, 0),
            "pending": lambda: s.pending(seq_id),
            "begin": lambda: s.begin(seq_id, [1, 2, 3]),
        }[method]
        with pytest.raises(BadSeqIdError) as ei:
            call()
        assert ei.value.seq_id == seq_id and ei.value.n_seq == 1
        assert isinstance(ei.value, IndexError)
        assert s.stats.n_draft_calls == 0 and not s.pending(0)


@pytest.mark.parametrize("seq_id", [True, 0.0, "0", None])
def test_non_int_seq_ids(pair, seq_id):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        with pytest.raises(MtpArgumentError):
            s.pending(seq_id)


def test_bad_seq_id_in_processed_batch(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        dec, n_past, id_last = _started(target, draft, s)
        dec.fill(1, [id_last], n_past)  # seq 1 on an n_seq=1 session (not decodable either)
        with pytest.raises(BadSeqIdError) as ei:
            s.process(dec.batch)
        assert ei.value.seq_id == 1 and ei.value.n_seq == 1
        # nothing changed: the loop carries on
        d = s.draft(0, n_past, id_last)
        ids = _verify(s, dec, n_past, id_last, d)
        s.accept(0, 3)
        assert list(ids[:3]) == d
        dec.close()


def test_draft_while_pending(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        dec, n_past, id_last = _started(target, draft, s)
        d = s.draft(0, n_past, id_last)
        before = counters(s.stats)
        with pytest.raises(ProtocolError, match="pending"):
            s.draft(0, n_past, id_last)
        assert counters(s.stats) == before and s.pending(0)
        _verify(s, dec, n_past, id_last, d)
        with pytest.raises(ProtocolError):
            s.draft(0, n_past, id_last)
        s.accept(0, len(d))
        assert not s.pending(0)
        dec.close()


def test_accept_without_draft(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        with pytest.raises(ProtocolError, match="no pending"):
            s.accept(0, 0)
        dec, n_past, id_last = _started(target, draft, s)
        with pytest.raises(ProtocolError):
            s.accept(0, 0)
        # an empty draft leaves nothing pending either
        assert s.draft(0, n_past, id_last, n_max=0) == []
        assert not s.pending(0)
        with pytest.raises(ProtocolError):
            s.accept(0, 0)
        assert s.stats.n_accept_calls == 0 and s.stats.n_draft_calls == 1 and s.stats.n_drafts == 0
        dec.close()


@pytest.mark.parametrize("n_accepted, exc", [
    (-1, MtpArgumentError), (-(2**31), MtpArgumentError), (4, ProtocolError), (65535, ProtocolError),
    (65536, ProtocolError), (70000, ProtocolError), (2**31 - 1, ProtocolError),
    (2**31, MtpArgumentError), (2**40, MtpArgumentError),
])
def test_accept_out_of_range(pair, n_accepted, exc):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        dec, n_past, id_last = _started(target, draft, s)
        d = s.draft(0, n_past, id_last)
        _verify(s, dec, n_past, id_last, d)
        before = counters(s.stats)
        with pytest.raises(exc):
            s.accept(0, n_accepted)
        assert counters(s.stats) == before and s.pending(0)
        assert pos_max(target, 0) == n_past + len(d)
        s.accept(0, len(d))  # the proposal is still there and settles normally
        assert pos_max(target, 0) == pos_max(draft, 0) == n_past + len(d)
        dec.close()


def test_accept_before_verify_was_processed(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        dec, n_past, id_last = _started(target, draft, s)
        d = s.draft(0, n_past, id_last)
        with pytest.raises(ProtocolError, match="process"):
            s.accept(0, 0)
        dec.decode(0, [id_last, *d], n_past)  # decoded on the target but not process()ed
        with pytest.raises(ProtocolError, match="process"):
            s.accept(0, 0)
        s.process(dec.batch)
        s.accept(0, 2)
        assert pos_max(target, 0) == pos_max(draft, 0) == n_past + 2
        dec.close()


def test_accept_more_than_verified(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        dec, n_past, id_last = _started(target, draft, s)
        d = s.draft(0, n_past, id_last)
        _verify(s, dec, n_past, id_last, d[:1])  # verify batch covers one draft token only
        with pytest.raises(ProtocolError, match="covered only 1"):
            s.accept(0, 2)
        s.accept(0, 1)
        assert pos_max(target, 0) == pos_max(draft, 0) == n_past + 1
        dec.close()


def test_process_empty_batch_and_before_any_decode(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        with pytest.raises(MtpProcessError, match="empty"):
            s.process(target)  # the Llama has decoded nothing: its batch is empty
        with Decoder(target) as dec:
            with pytest.raises(MtpProcessError, match="empty"):
                s.process(dec.batch)
            dec.fill(0, [1, 2, 3], 0)  # filled, never decoded
            with pytest.raises(MtpProcessError, match="no hidden states"):
                s.process(dec.batch)
            assert s.stats.n_process_calls == 0
            # ... and the session still works from there
            prompt = tokenize(target, PROMPT)
            r = spec_loop(target, draft, s, prompt, 16, 3, dec=dec)
        assert r.tokens == greedy_reference(target.model_path, prompt, 16)


def test_process_same_batch_twice(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        dec, n_past, id_last = _started(target, draft, s)
        with pytest.raises(MtpProcessError, match="position"):
            s.process(dec.batch)  # the prompt batch again
        dec.close()


def test_process_argument_types(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        for bad in (None, 42, "batch", object()):
            with pytest.raises(MtpArgumentError):
                s.process(bad)
        # the accepted batch-likes: Llama, LlamaBatch, llama_batch, pointer to llama_batch
        prompt = tokenize(target, "hello world")
        target.eval(prompt[:4])
        s.process(target._batch)
        target.eval(prompt[4:6])
        s.process(target)
        with Decoder(target) as dec:
            dec.decode(0, prompt[6:8], 6)
            s.process(ctypes.pointer(dec.batch))
        assert s.stats.n_process_calls == 3 and pos_max(draft, 0) == 7


def test_draft_argument_errors(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        dec, n_past, id_last = _started(target, draft, s)
        cases = [
            (dict(n_past=n_past + 1), "number of tokens"),
            (dict(n_past=n_past - 1), "number of tokens"),
            (dict(n_past=-1), "pos0"),
            (dict(n_max=4), "n_max"),
            (dict(n_max=-2), "n_max"),
            (dict(id_last=target.n_vocab()), "vocabulary"),
            (dict(id_last=-1), "vocabulary"),
            (dict(id_last=2**31), "32 bits"),
            (dict(n_past=2**31), "32 bits"),
        ]
        for kw, match in cases:
            args = dict(n_past=n_past, id_last=id_last, n_max=None)
            args.update(kw)
            with pytest.raises(MtpArgumentError, match=match):
                s.draft(0, args["n_past"], args["id_last"], n_max=args["n_max"])
        assert s.stats.n_draft_calls == 0 and not s.pending(0)
        assert len(s.draft(0, n_past, id_last)) == 3
        dec.close()


def test_draft_n_max_minus_one_is_rejected(pair):
    """draft(n_max=-1) is documented/checked as 'n_max must be >= 0' but -1 slips through
    as 'use n_draft_max' (the None sentinel leaks into the public argument)."""
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        dec, n_past, id_last = _started(target, draft, s)
        try:
            with pytest.raises(MtpArgumentError):
                s.draft(0, n_past, id_last, n_max=-1)
        finally:
            dec.close()


@pytest.mark.parametrize("swap", ["swapped", "same_target", "same_draft"])
def test_wrong_context_roles(pair, swap):
    target, draft = pair
    args = {"swapped": (draft, target), "same_target": (target, target), "same_draft": (draft, draft)}[swap]
    with pytest.raises(MtpInitError):
        llama_mtp.MtpSession(*args)


def test_plain_llama_as_draft(pair, oracle_model):
    target, draft = pair
    plain = plain_llama(oracle_model, n_ctx=256)
    try:
        with pytest.raises(MtpInitError):
            llama_mtp.MtpSession(target, plain)
        with pytest.raises(MtpInitError):
            llama_mtp.MtpSession(target, plain._ctx)
    finally:
        plain.close()


@pytest.mark.parametrize("kwargs", [
    dict(n_seq=0), dict(n_seq=-1), dict(n_seq=2), dict(n_seq=2**31),
    dict(n_draft_max=0), dict(n_draft_max=-1), dict(n_draft_max=512), dict(n_draft_max=65536),
    dict(n_draft_max=2**31), dict(n_min=-1), dict(n_min=4), dict(p_min=-0.1), dict(p_min=1.5),
    dict(p_min=float("nan")), dict(n_seq=1.0), dict(n_draft_max="3"), dict(n_seq=True), dict(p_min="0"),
])
def test_bad_session_arguments(pair, kwargs):
    target, draft = pair
    with pytest.raises(MtpArgumentError):
        llama_mtp.MtpSession(target, draft, **kwargs)


def test_bad_context_arguments(pair):
    target, draft = pair
    for bad in (None, 1, "target", target._model):
        with pytest.raises(MtpArgumentError):
            llama_mtp.MtpSession(bad, draft)
        with pytest.raises(MtpArgumentError):
            llama_mtp.MtpSession(target, bad)


@pytest.mark.parametrize("kwargs", [dict(n_draft_max=0), dict(n_seq=0), dict(n_draft_max=8, n_batch=8),
                                    dict(vocab_only=True), dict(embedding=True)])
def test_bad_load_arguments(oracle_model, kwargs):
    with pytest.raises(MtpArgumentError):
        load_pair(oracle_model, **kwargs)


def test_load_missing_file(tmp_path):
    with pytest.raises(MtpInitError, match="not found"):
        llama_mtp.load(tmp_path / "missing.gguf")


def test_model_without_mtp_heads(no_mtp_model, oracle_model):
    with pytest.raises(MtpInitError, match="no MTP heads"):
        load_pair(no_mtp_model)
    # the file itself is fine: a plain Llama decodes it like the MTP model's trunk
    prompt = [104, 101, 108, 108, 111]
    assert greedy_reference(no_mtp_model, prompt, 8) == greedy_reference(oracle_model, prompt, 8)
    # an MTP context cannot be created on it: a Python exception, not an abort
    target = llama_mtp.MtpTargetLlama(str(no_mtp_model), n_ctx=256, verbose=False)
    try:
        assert target.mtp_n_layer_nextn == 0
        with pytest.raises(MtpInitError, match="no MTP heads"):
            llama_mtp.MtpDraftLlama(target, verbose=False)
    finally:
        target.close()


def test_rollback_error_when_target_keeps_too_few_snapshots(oracle_model):
    # n_rs_seq = 1 on the (hybrid) target, but the session drafts 3 tokens
    target, draft = load_pair(oracle_model, n_draft_max=1)
    try:
        with llama_mtp.MtpSession(target, draft, n_draft_max=3) as s:
            dec, n_past, id_last = _started(target, draft, s)
            d = s.draft(0, n_past, id_last)
            assert len(d) == 3
            _verify(s, dec, n_past, id_last, d)
            before = counters(s.stats)
            for n in (0, 1):  # would drop 3 or 2 tokens
                with pytest.raises(RollbackError, match="n_rs_seq"):
                    s.accept(0, n)
            assert counters(s.stats) == before and s.pending(0)
            assert pos_max(target, 0) == pos_max(draft, 0) == n_past + 3
            s.accept(0, 2)  # drops one token: within n_rs_seq
            assert pos_max(target, 0) == pos_max(draft, 0) == n_past + 2
            dec.close()
    finally:
        target.close()
        draft.close()


def test_errors_leave_no_last_error_leak(pair):
    """A successful call after a failed one is not affected by the failure's message."""
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        with pytest.raises(ProtocolError):
            s.accept(0, 0)
        assert s.pending(0) is False


# ------------------------------------------------------------------- speculative loop


def _loop(model, n_draft, n_tokens=N_GEN, text=PROMPT, loop_kwargs=None, **session_kwargs):
    target, draft = load_pair(model)
    try:
        prompt = tokenize(target, text)
        with llama_mtp.MtpSession(target, draft, **session_kwargs) as s:
            r = spec_loop(target, draft, s, prompt, n_tokens, n_draft, **(loop_kwargs or {}))
        return prompt, r
    finally:
        target.close()
        draft.close()


ORACLE_SPECS = {"oracle_model": ORACLE_SPEC, "oracle_half_model": ORACLE_HALF_SPEC,
                "oracle_random_model": ORACLE_RANDOM_SPEC}
MODELS = ["oracle_model", "oracle_half_model", "oracle_random_model", "context_model", "context_half_model"]


@pytest.mark.parametrize("n_draft", [0, 1, 3])
@pytest.mark.parametrize("model_fixture", MODELS)
def test_spec_loop_matches_greedy(request, model_fixture, n_draft):
    model = request.getfixturevalue(model_fixture)
    prompt, r = _loop(model, n_draft)
    ref, ref_logits = greedy_reference_logits(model, prompt, N_GEN)
    assert r.tokens == ref
    assert np.abs(r.logits - ref_logits).max() < LOGIT_TOL
    st = r.stats
    assert st.n_draft_calls == len(r.steps)
    assert st.n_drafted == sum(n for n, _ in r.steps) and st.n_accepted == sum(a for _, a in r.steps)
    assert sum(st.drafted_per_pos) == st.n_drafted and sum(st.accepted_per_pos) == st.n_accepted
    if n_draft == 0:
        assert st.n_drafts == 0 and st.n_accept_calls == 0
    spec = ORACLE_SPECS.get(model_fixture)
    if spec is not None:  # the oracle's greedy output is known in closed form
        assert r.tokens == testing.describe_test_model(spec).greedy_continuation(prompt[-1], N_GEN)


@pytest.mark.parametrize("n_draft", [1, 2, 3])
def test_full_acceptance_oracle(oracle_model, n_draft):
    _, r = _loop(oracle_model, n_draft)
    st = r.stats
    assert st.acceptance_rate == 1.0
    assert st.per_pos_acceptance[:n_draft] == (1.0,) * n_draft
    assert st.mean_tokens_per_draft_step == 1 + n_draft
    assert all(a == n for n, a in r.steps)


def test_drafts_are_the_mtp_heads_predictions(oracle_random_model):
    """Every draft is exactly the chain of the MTP head's known argmax."""
    info = testing.describe_test_model(ORACLE_RANDOM_SPEC)
    target, draft = load_pair(oracle_random_model)
    try:
        with llama_mtp.MtpSession(target, draft) as s:
            dec, n_past, id_last = _started(target, draft, s, PROMPT)
            for _ in range(40):
                d = s.draft(0, n_past, id_last)
                expected, t = [], id_last
                for _ in range(3):
                    t = info.mtp_draft(t)
                    expected.append(t)
                assert d == expected
                ids = _verify(s, dec, n_past, id_last, d)
                acc = 0
                while acc < 3 and d[acc] == ids[acc]:
                    acc += 1
                assert acc == next((i for i in range(3) if not info.mtp_correct[([id_last] + d)[i]]), 3)
                s.accept(0, acc)
                n_past += 1 + acc
                id_last = int(ids[acc])
            dec.close()
    finally:
        target.close()
        draft.close()


def test_per_position_acceptance_matches_accept_rate(oracle_random_model):
    """With n_draft=1 each draft is one Bernoulli(F) trial (iid "random" pattern, the cycle
    never repeats within the run), so the measured rate is within a few binomial standard
    errors of F; it also equals the exact rate predicted by the model's mtp_correct table."""
    F = ORACLE_RANDOM_SPEC.accept
    info = testing.describe_test_model(ORACLE_RANDOM_SPEC)
    n_tokens = 200  # < cycle length (~380): every drafted-from token is distinct
    prompt, r = _loop(oracle_random_model, 1, n_tokens=n_tokens)
    st = r.stats
    n = st.drafted_per_pos[0]
    p = st.per_pos_acceptance[0]
    # 200 tokens at ~1.5 tokens per step: ~130 trials, sigma ~0.044; 4 sigma ~0.18
    assert n >= 100
    tol = 4 * math.sqrt(F * (1 - F) / n)
    assert abs(p - F) <= tol, (p, F, n, tol)
    # exact: the tokens each draft was made from
    fed, prev = [], prompt[-1]
    i = 0
    for nd, acc in r.steps:
        fed.append(prev)
        i += acc + 1
        prev = r.tokens[i - 1] if i - 1 < len(r.tokens) else None
    assert p == pytest.approx(np.mean(info.mtp_correct[np.array(fed)]))
    assert st.acceptance_rate == p
    assert st.mean_tokens_per_draft_step == pytest.approx(1 + p)


def test_per_position_acceptance_multi_token(oracle_random_model):
    """n_draft=3: position i is accepted iff all of 0..i are, so per_pos_acceptance ~ F**(i+1)."""
    F = ORACLE_RANDOM_SPEC.accept
    _, r = _loop(oracle_random_model, 3, n_tokens=200)
    st = r.stats
    n = st.drafted_per_pos[0]
    assert st.drafted_per_pos == (n, n, n)
    for i, p in enumerate(st.per_pos_acceptance):
        q = F ** (i + 1)
        assert abs(p - q) <= 4 * math.sqrt(q * (1 - q) / n), (i, p, q, n)
    assert list(st.accepted_per_pos) == sorted(st.accepted_per_pos, reverse=True)


def test_partial_rejections_roll_back_hybrid_state(context_half_model):
    """The hybrid (recurrent + attention) context model with half the drafts wrong:
    rejections of 1, 2 and 3 tokens all happen, and after each one the recurrent
    state (rolled back via n_rs_seq snapshots) gives exactly the reference logits."""
    prompt, r = _loop(context_half_model, 3)
    ref, ref_logits = greedy_reference_logits(context_half_model, prompt, N_GEN)
    assert r.tokens == ref
    assert np.abs(r.logits - ref_logits).max() < LOGIT_TOL
    rejected = {n - a for n, a in r.steps}
    assert {1, 2, 3} <= rejected, r.steps
    assert r.partial_rejections > 0 and r.full_rejections > 0


def test_context_model_is_history_sensitive(context_half_model):
    """Guards the meaning of LOGIT_TOL: changing one early prompt token (same last token)
    moves later logits far more than the tolerance, so a wrong rollback would show."""
    target, draft = load_pair(context_half_model)
    prompt = tokenize(target, PROMPT)
    target.close()
    draft.close()
    other = list(prompt)
    other[2] = other[3]
    _, a = greedy_reference_logits(context_half_model, prompt, 32)
    _, b = greedy_reference_logits(context_half_model, other, 32)
    assert np.abs(a - b).max() > 50 * LOGIT_TOL


def test_p_min_one_drafts_nothing(oracle_model):
    prompt, r = _loop(oracle_model, 3, n_tokens=32, p_min=1.0)
    assert r.stats.n_drafts == 0 and r.stats.n_draft_calls == 32
    assert r.tokens == greedy_reference(oracle_model, prompt, 32)


def test_cpu_sampling_gives_same_drafts(oracle_random_model):
    _, a = _loop(oracle_random_model, 3, n_tokens=48, backend_sampling=False)
    _, b = _loop(oracle_random_model, 3, n_tokens=48, backend_sampling=True)
    assert a.tokens == b.tokens and a.steps == b.steps


def test_restart_sequence_with_begin(pair):
    """After a run, clearing seq 0 and begin() with another prompt starts cleanly."""
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as s:
        for text in (PROMPT, "hello world", PROMPT):
            seq_rm(target, 0, 0)
            seq_rm(draft, 0, 0)
            prompt = tokenize(target, text)
            r = spec_loop(target, draft, s, prompt, 40, 3)
            assert r.tokens == greedy_reference(target.model_path, prompt, 40)


def test_long_prompt_prefill_in_chunks(context_model):
    target, draft = load_pair(context_model)
    try:
        prompt = tokenize(target, PROMPT * 6)  # > 200 tokens, prefilled in 64-token chunks
        assert len(prompt) > 200
        with llama_mtp.MtpSession(target, draft) as s:
            r = spec_loop(target, draft, s, prompt, 64, 3)
        ref, ref_logits = greedy_reference_logits(context_model, prompt, 64)
        assert r.tokens == ref and np.abs(r.logits - ref_logits).max() < LOGIT_TOL
    finally:
        target.close()
        draft.close()


@pytest.mark.parametrize("model_fixture", ["oracle_random_model", "context_half_model"])
def test_two_sequences_in_one_batch(request, model_fixture):
    """n_seq=2: both sequences' verify runs go through ONE decode and ONE process()."""
    model = request.getfixturevalue(model_fixture)
    target, draft = load_pair(model, n_seq=2)
    try:
        prompts = {0: tokenize(target, PROMPT), 1: tokenize(target, "hello world, how are you?")}
        with llama_mtp.MtpSession(target, draft, n_seq=2) as s:
            out = spec_loop_multi(target, draft, s, prompts, 64, 3)
            st = s.stats
        for sid, prompt in prompts.items():
            assert out[sid] == greedy_reference(model, prompt, 64), sid
        assert st.n_accepted < st.n_drafted  # rejections happened on both
    finally:
        target.close()
        draft.close()


def test_two_sequences_interleaved(oracle_random_model):
    """n_seq=2 driven one sequence at a time, alternating, match their single-seq runs."""
    target, draft = load_pair(oracle_random_model, n_seq=2)
    try:
        prompts = {0: tokenize(target, PROMPT), 1: tokenize(target, "hello world")}
        with llama_mtp.MtpSession(target, draft, n_seq=2) as s:
            # prefill both, then one step each in turn, each step a separate decode
            decs = {sid: Decoder(target) for sid in prompts}
            state = {}
            for sid, p in prompts.items():
                n = prefill(s, decs[sid], sid, p[:-1])
                s.begin(sid, p[:-1])
                state[sid] = [n, p[-1], []]
            for _ in range(40):
                for sid in (0, 1):
                    n, id_last, out = state[sid]
                    d = s.draft(sid, n, id_last)
                    logits = decs[sid].decode(sid, [id_last, *d], n)
                    s.process(decs[sid].batch)
                    ids = logits.argmax(-1)
                    acc = 0
                    while acc < len(d) and d[acc] == ids[acc]:
                        acc += 1
                    s.accept(sid, acc)
                    out += d[:acc] + [int(ids[acc])]
                    state[sid] = [n + 1 + acc, out[-1], out]
            for d in decs.values():
                d.close()
        for sid, p in prompts.items():
            got = state[sid][2]
            assert got == greedy_reference(oracle_random_model, p, len(got))
    finally:
        target.close()
        draft.close()


# ------------------------------------------------------------------------- draft_dist


def test_draft_dist_greedy(oracle_random_model):
    """draft_dist(T=0): exactly n_max tokens of the MTP argmax chain, one-hot q, and a
    loop drafting with it matches plain greedy decoding."""
    info = testing.describe_test_model(ORACLE_RANDOM_SPEC)
    target, draft = load_pair(oracle_random_model)
    try:
        with llama_mtp.MtpSession(target, draft, backend_sampling=False) as s:
            dec, n_past, id_last = _started(target, draft, s, PROMPT)
            for n_max in (1, 2, 3, None):
                d, q = s.draft_dist(0, n_past, id_last, n_max=n_max)
                expected, t = [], id_last
                for _ in range(n_max or 3):
                    t = info.mtp_draft(t)
                    expected.append(t)
                assert d == expected
                assert q.shape == (len(d), info.n_vocab) and q.dtype == np.float32
                assert (q.sum(axis=1) == 1.0).all() and (q.argmax(axis=1) == d).all()
                assert s.pending(0)
                s.begin(0, [])
            dec.close()
            seq_rm(target, 0, 0)
            seq_rm(draft, 0, 0)
            prompt = tokenize(target, PROMPT)
            r = spec_loop(target, draft, s, prompt, N_GEN, 3, draft_dist={})
        ref, ref_logits = greedy_reference_logits(oracle_random_model, prompt, N_GEN)
        assert r.tokens == ref and np.abs(r.logits - ref_logits).max() < LOGIT_TOL
        assert r.full_rejections > 0 and r.partial_rejections > 0
    finally:
        target.close()
        draft.close()


def test_draft_dist_sampled(context_half_model):
    """T > 0: tokens come from q = softmax(top_k logits / T), reproducibly per seed;
    greedy verification keeps the output exact whatever was drafted."""
    target, draft = load_pair(context_half_model)
    try:
        with llama_mtp.MtpSession(target, draft, backend_sampling=False) as s:
            dec, n_past, id_last = _started(target, draft, s, PROMPT)
            seen = []
            for seed in (1, 2, 1):
                d, q = s.draft_dist(0, n_past, id_last, temperature=2.0, top_k=5, seed=seed)
                assert len(d) == 3
                assert np.allclose(q.sum(axis=1), 1.0, atol=1e-5)
                assert ((q > 0).sum(axis=1) <= 5).all()
                assert all(q[i, t] > 0 for i, t in enumerate(d))
                seen.append(d)
                s.begin(0, [])
            assert seen[0] == seen[2]
            dec.close()
            seq_rm(target, 0, 0)
            seq_rm(draft, 0, 0)
            prompt = tokenize(target, PROMPT)
            r = spec_loop(target, draft, s, prompt, 64, 3, draft_dist=dict(temperature=1.0, top_k=10, seed=7))
        assert r.tokens == greedy_reference(context_half_model, prompt, 64)
    finally:
        target.close()
        draft.close()


def test_rejected_draft_dist_changes_nothing(pair):
    """A draft_dist() that raises must leave the stats alone, like a rejected draft()."""
    target, draft = pair
    offenders = []
    for backend_sampling, kwargs in [
        (True, dict()),                               # draft_dist needs backend_sampling=False
        (False, dict(top_k=0)),
        (False, dict(temperature=-1.0)),
        (False, dict(temperature=float("nan"))),
        (False, dict(temperature=float("inf"))),
    ]:
        seq_rm(target, 0, 0)
        seq_rm(draft, 0, 0)
        with llama_mtp.MtpSession(target, draft, backend_sampling=backend_sampling) as s:
            dec, n_past, id_last = _started(target, draft, s)
            before = counters(s.stats)
            with pytest.raises(MtpArgumentError):
                s.draft_dist(0, n_past, id_last, **kwargs)
            assert not s.pending(0)
            if counters(s.stats) != before:
                offenders.append((backend_sampling, kwargs, before.n_draft_calls, s.stats.n_draft_calls))
            dec.close()
    assert not offenders, f"rejected draft_dist() calls counted as draft calls: {offenders}"


# ----------------------------------------------------------------- deferred catch-up

# plain steps (0) between drafts of every length, so deferred runs of 1..4 rows and
# verify runs with every accepted count meet the next draft's first decode
SCHEDULE = [0, 0, 3, 0, 1, 2, 0, 0, 0, 0, 3, 3, 1, 0, 2, 2]


@pytest.mark.parametrize("model_fixture", ["context_half_model", "oracle_random_model"])
def test_deferred_catchup_drafts_like_eager(request, model_fixture):
    """defer_catchup moves the MTP context's decodes into the next draft's first batch:
    every draft, every acceptance and the output are those of the eager session, and
    the drafts' distributions agree up to batch-shape float noise (measured <= 0.016).
    A row at a wrong position fails the shim's position checks; a row paired with the
    wrong hidden state is NOT caught here: these models' MTP attention reads its KV
    history too weakly (such a mutation moved q by 0.016 too)."""
    model = request.getfixturevalue(model_fixture)
    runs = {}
    dist = dict(temperature=1.0, top_k=10**6, seed=5)  # q: the full softmax of the MTP logits
    for defer in (False, True):
        prompt, runs[defer] = _loop(model, 3, n_tokens=N_GEN, backend_sampling=False, defer_catchup=defer,
                                    loop_kwargs=dict(draft_dist=dist, schedule=SCHEDULE))
    eager, lazy = runs[False], runs[True]
    assert lazy.steps == eager.steps and lazy.tokens == eager.tokens
    assert len(lazy.qs) == len(eager.qs) > 0
    assert max(float(np.abs(a - b).max()) for a, b in zip(lazy.qs, eager.qs)) < 0.05
    assert 0 < lazy.stats.n_accepted < lazy.stats.n_drafted
    assert lazy.tokens == greedy_reference(model, prompt, N_GEN)


def test_deferred_catchup_skips_draft_decodes(pair):
    """A step without a draft leaves the MTP context alone; the next draft catches up."""
    target, draft = pair
    with llama_mtp.MtpSession(target, draft, backend_sampling=False, defer_catchup=True) as s:
        assert s.defer_catchup
        dec, n_past, id_last = _started(target, draft, s)
        assert 0 < n_past < llama_cpp.llama_n_ubatch(draft._ctx.ctx)
        assert pos_max(draft, 0) == -1  # a short prompt waits for the first draft too
        for _ in range(3):  # plain steps
            ids = _verify(s, dec, n_past, id_last, [])
            n_past, id_last = n_past + 1, int(ids[0])
            assert pos_max(target, 0) == n_past - 1 and pos_max(draft, 0) == -1
        d, _ = s.draft_dist(0, n_past, id_last)
        assert pos_max(draft, 0) == n_past - 1  # caught up; the draft rows were trimmed
        ids = _verify(s, dec, n_past, id_last, d)
        s.accept(0, 1)
        assert pos_max(draft, 0) == n_past - 1 and pos_max(target, 0) == n_past + 1
        dec.close()


def test_deferred_catchup_refuses_upstream_draft(pair):
    target, draft = pair
    with pytest.raises(MtpArgumentError, match="backend_sampling"):
        llama_mtp.MtpSession(target, draft, defer_catchup=True)
    with llama_mtp.MtpSession(target, draft, backend_sampling=False, defer_catchup=True) as s:
        dec, n_past, id_last = _started(target, draft, s)
        before = counters(s.stats)
        with pytest.raises(MtpArgumentError, match="draft_dist"):
            s.draft(0, n_past, id_last)
        assert counters(s.stats) == before and not s.pending(0)
        d, _ = s.draft_dist(0, n_past, id_last)  # still usable
        assert len(d) == 3 and s.pending(0)
        dec.close()


def test_deferred_catchup_session_reused_after_clearing_memories(context_half_model):
    """Rows a run left deferred are dropped once the caller clears the memories."""
    target, draft = load_pair(context_half_model)
    try:
        prompt = tokenize(target, PROMPT)
        ref = greedy_reference(context_half_model, prompt, 48)
        with llama_mtp.MtpSession(target, draft, backend_sampling=False, defer_catchup=True) as s:
            for schedule in ([0, 0, 2, 0, 3], [1, 0], [3]):
                seq_rm(target, 0, 0)
                seq_rm(draft, 0, 0)
                r = spec_loop(target, draft, s, prompt, 48, 3, draft_dist={}, schedule=schedule)
                assert r.tokens == ref
    finally:
        target.close()
        draft.close()


# ------------------------------------------------------------------------------ forget


def test_forget_drops_the_draft_history_and_drafting_goes_on(oracle_model):
    """forget() empties a sequence's draft memory after a long plain run but its last `keep`
    deferred rows; the next draft decodes just those and drafts as before (the accept=1.0
    oracle's drafts need no long past: all of them are still accepted). A rollback below the
    kept window (a prompt-cache reuse) continues from the emptied memory."""
    target, draft = load_pair(oracle_model)
    s = llama_mtp.MtpSession(target, draft, defer_catchup=True, backend_sampling=False)
    try:
        dec, n_past, id_last = _started(target, draft, s)
        for _ in range(40):  # plain steps: one deferred MTP row each
            logits = dec.decode(0, [id_last], n_past)
            s.process(dec.batch)
            n_past, id_last = n_past + 1, int(logits[-1].argmax())
        assert s.forget(0, keep=8) == 8
        assert pos_max(draft, 0) == -1 and s.stats.n_forget == 1
        assert s.forget(0, keep=8) == 8 and s.stats.n_forget == 1  # already detached: nothing new
        (d, _), = s.draft_many([llama_mtp.DraftRequest(0, n_past, id_last, 3)])
        assert len(d) == 3
        mem = llama_cpp.llama_get_memory(native_context(draft))
        assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == n_past - 8  # only the kept window went in
        with pytest.raises(ProtocolError):
            s.forget(0)  # a draft awaits accept()
        got = _verify(s, dec, n_past, id_last, d)
        assert list(got[:-1]) == d
        s.accept(0, len(d))
        n_past += 1 + len(d)
        id_last = int(got[-1])
        # an emptied memory continues wherever the caller goes on: here one token rolled back
        assert s.forget(0, keep=0) == 0 and pos_max(draft, 0) == -1
        p0 = n_past - 1
        assert seq_rm(target, 0, p0)
        s.begin(0, [])
        logits = dec.decode(0, [d[-1]], p0)
        s.process(dec.batch)
        (d, _), = s.draft_many([llama_mtp.DraftRequest(0, p0 + 1, int(logits[-1].argmax()), 2)])
        assert len(d) == 2
        assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == p0  # the one row since the forget
    finally:
        s.close()
        draft.close()
        target.close()


def _restarted_past_0(target, draft, s) -> Tuple[Any, int, int, List[int], int]:
    """24 plain steps, a forget keeping 4 rows, then a draft, which restarts the draft memory past 0
    with the kept rows: (decoder, n_past, id_last, the draft, rows kept)."""
    dec, n_past, id_last = _started(target, draft, s)
    for _ in range(24):
        logits = dec.decode(0, [id_last], n_past)
        s.process(dec.batch)
        n_past, id_last = n_past + 1, int(logits[-1].argmax())
    kept = s.forget(0, keep=4)
    (d, _), = s.draft_many([llama_mtp.DraftRequest(0, n_past, id_last, 2)])
    return dec, n_past, id_last, d, kept


def test_a_draft_memory_trimmed_to_nothing_continues_from_anywhere(model_dir):
    """Regression (served requests got HTTP 500): a forget, then a draft that restarts the draft
    memory past 0 with the kept rows, then a prompt-cache reuse of a shorter prefix, which trims
    both contexts below that restart: the draft memory is empty, and the next target decode must
    be accepted wherever it starts (drafts see a shorter past; output is exact all the same).
    (An attention-only target, which can drop any suffix: glm4moe.)"""
    target, draft = load_pair(_helpers.build_model(testing.TestModelSpec(arch="glm4moe", accept=1.0), model_dir))
    s = llama_mtp.MtpSession(target, draft, defer_catchup=True, backend_sampling=False)
    try:
        dec, n_past, id_last, d, kept = _restarted_past_0(target, draft, s)
        assert kept >= 1
        mem = llama_cpp.llama_get_memory(native_context(draft))
        assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == n_past - kept > 5  # restarted past 0 by the draft
        got = _verify(s, dec, n_past, id_last, d)
        s.accept(0, len(d))
        # a new request reuses only the first 5 tokens of this slot: both contexts are cut there
        p0 = 5
        assert seq_rm(target, 0, p0) and seq_rm(draft, 0, p0)
        assert pos_max(draft, 0) == -1 and s.drafter_rows(0, p0) == p0
        s.begin(0, [])
        logits = dec.decode(0, [int(got[-1])], p0)
        s.process(dec.batch)  # raised MtpProcessError ("the drafter has seen positions up to -1")
        (d, _), = s.draft_many([llama_mtp.DraftRequest(0, p0 + 1, int(logits[-1].argmax()), 2)])
        assert len(d) == 2 and llama_cpp.llama_memory_seq_pos_min(mem, 0) == p0
    finally:
        s.close()
        draft.close()
        target.close()


def test_forget_argument_errors(pair):
    target, draft = pair
    with llama_mtp.MtpSession(target, draft) as upstream_session:
        with pytest.raises(MtpArgumentError, match="defer_catchup"):
            upstream_session.forget(0)
    with llama_mtp.MtpSession(target, draft, defer_catchup=True, backend_sampling=False) as s:
        with pytest.raises(MtpArgumentError, match="keep"):
            s.forget(0, keep=-1)
        with pytest.raises(BadSeqIdError):
            s.forget(1)
        assert s.forget(0) == 0  # nothing deferred yet: fine, and the session stays usable
        assert s.stats.n_forget == 1


def test_a_draft_memory_restarted_past_0_is_trimmed_and_continued(model_dir):
    """A draft memory that restarted past 0 (a forget, then a draft) and is then trimmed past its
    first row keeps the rows it has: the drafter continues from the trim (a prompt-cache hit in that
    slot keeps what it shares instead of dropping the drafter's history again at every hit)."""
    target, draft = load_pair(_helpers.build_model(testing.TestModelSpec(arch="glm4moe", accept=1.0), model_dir))
    s = llama_mtp.MtpSession(target, draft, defer_catchup=True, backend_sampling=False)
    try:
        dec, n_past, id_last, d, kept = _restarted_past_0(target, draft, s)
        mem = llama_cpp.llama_get_memory(native_context(draft))
        first = llama_cpp.llama_memory_seq_pos_min(mem, 0)
        assert first == n_past - kept > 5
        got = _verify(s, dec, n_past, id_last, d)
        s.accept(0, len(d))
        assert s.drafter_rows(0, first) == 0  # trimmed to nothing but deferred rows: a full restart
        p0 = first + 2  # a new request keeps the first p0 tokens: both contexts are cut there
        assert s.drafter_rows(0, p0) == p0
        assert seq_rm(target, 0, p0) and seq_rm(draft, 0, p0)
        assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == first <= pos_max(draft, 0) < p0  # (+ deferred rows)
        s.begin(0, [])
        logits = dec.decode(0, [int(got[-1])], p0)
        s.process(dec.batch)
        (d, _), = s.draft_many([llama_mtp.DraftRequest(0, p0 + 1, int(logits[-1].argmax()), 2)])
        assert len(d) == 2 and pos_max(draft, 0) >= p0 and llama_cpp.llama_memory_seq_pos_min(mem, 0) == first
    finally:
        s.close()
        draft.close()
        target.close()
