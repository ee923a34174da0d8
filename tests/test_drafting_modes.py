"""Upstream's three MTP draft modes through the session's own draft loop and upstream's drafter.

Step-3.5 (``step35``) ships chained heads: head i drafts position i (upstream's
``chain_heads``). The generated step35 model gives each head its own known acceptance
(``head_accepts``), so the exact draft chain is known (``chained_draft_chain``) and a loop
that drafted every position with head 0 would propose other tokens. The gemma4
assistant's ``mem_shared`` mode is not in the own loop: it must be routed to upstream's
drafter with a logged reason, never drafted silently with a single head.
"""

from __future__ import annotations

import logging
import os
from typing import List, Sequence, Tuple

import pytest

import llama_mtp
from llama_mtp import session as session_mod
from llama_mtp import testing
from llama_mtp.errors import MtpArgumentError
from llama_mtp.session import DraftMode, MtpSession

from _helpers import Decoder, build_model, draft_log, greedy_reference, load_pair, oracle_fixed_k, prefill

HEAD_ACCEPTS = (0.8, 0.6, 0.4)
# iid hits: the tokens a loop visits are not in lockstep with a periodic layout
STEP35_SPEC = testing.TestModelSpec(arch="step35", accept=HEAD_ACCEPTS[0], accept_pattern="random",
                                    arch_params={"head_accepts": HEAD_ACCEPTS})
# history-dependent step35: the drafts depend on each head's KV over the prefix
STEP35_CONTEXT_SPEC = testing.TestModelSpec(arch="step35", recipe="context", accept=0.5, accept_pattern="random")
PROMPT = b"The quick brown fox"
N_GEN = 160
# plain steps (0) between drafts: deferred catch-up runs of several rows, decoded under every head
SCHEDULE = (3, 0, 2, 0, 0, 3, 1, 3)


def _chain(id_last: int, n: int) -> List[int]:
    from llama_mtp.testing.archs.step35 import chained_draft_chain

    return chained_draft_chain(STEP35_SPEC, id_last, n)


@pytest.fixture(scope="module")
def step35_model(model_dir) -> os.PathLike:
    return build_model(STEP35_SPEC, model_dir)


@pytest.fixture(scope="module")
def step35_context_model(model_dir) -> os.PathLike:
    return build_model(STEP35_CONTEXT_SPEC, model_dir)


def _drafts(path: os.PathLike, text: bytes = PROMPT, **kw) -> List[Tuple[int, List[int]]]:
    return draft_log(path, text=text, **kw)


def test_modes_are_reported(step35_model, oracle_model):
    """The session reports upstream's mode choice: chained heads for step35 (3 nextn layers),
    a single head for qwen35; chained drafts are capped at one token per head."""
    for path, want in ((step35_model, DraftMode("chain_heads", 3)), (oracle_model, DraftMode("single", 1))):
        target, draft = load_pair(path, n_draft_max=4)
        assert session_mod.draft_mode_of(target, draft) == want
        with MtpSession(target, draft, n_draft_max=4, backend_sampling=False) as s:
            assert s.draft_mode == want
            assert s.n_max == (want.n_heads if want.mode == "chain_heads" else 4)
            prompt = target.tokenize(PROMPT, add_bos=False)
            with Decoder(target, 64) as dec:
                n_past = prefill(s, dec, 0, prompt[:-1])
                d, _ = s.draft_dist(0, n_past, prompt[-1], n_max=4)
                assert len(d) == s.n_max
        draft.close()
        target.close()


@pytest.mark.parametrize("own,defer", [(False, False), (True, False), (True, True)])
def test_chained_heads_draft_the_known_chain(step35_model, own, defer):
    """Every draft, from upstream's drafter and the own loop (eager and deferred catch-up),
    is the chain of head i at position i; head 0 at every position would differ."""
    steps = _drafts(step35_model, own=own, defer=defer, schedule=SCHEDULE)
    assert len(steps) >= 12
    for id_last, d in steps:
        assert d == _chain(id_last, len(d)), (id_last, d)
    # the model really needs chained heads: some drafts differ from head 0's chain
    from llama_mtp.testing.archs.step35 import head_oracle

    o0 = head_oracle(STEP35_SPEC, 0)

    def head0_chain(x: int, n: int) -> List[int]:
        out = []
        for _ in range(n):
            dec = int(o0.token_decoy[x])
            x = int(o0.successor[dec if dec >= 0 else x])
            out.append(x)
        return out
    assert any(d != head0_chain(x, len(d)) for x, d in steps)


@pytest.mark.parametrize("text", [PROMPT, PROMPT * 6], ids=["short", "long"])
def test_own_loop_matches_upstream_on_history_dependent_heads(step35_context_model, text):
    """On heads with attention noise the own loop's drafts equal upstream's at every step,
    eager and with deferred per-head catch-up (the long prompt's chunks exceed the draft
    n_ubatch, so process() catches up under every head too). Note: these heads' logits are
    too saturated to expose a head that misses its own KV (a mutant decoding deferred rows
    under head 0 only still passed, and q moved by no more than batch-shape noise)."""
    up = _drafts(step35_context_model, own=False, schedule=SCHEDULE, n_tokens=64, text=text)
    assert _drafts(step35_context_model, own=True, schedule=SCHEDULE, n_tokens=64, text=text) == up
    assert _drafts(step35_context_model, own=True, defer=True, schedule=SCHEDULE, n_tokens=64, text=text) == up


def _expected_fixed_k(prompt: Sequence[int], n_tokens: int, k_max: int) -> Tuple[List[int], List[int], List[int]]:
    from llama_mtp.testing.archs.step35 import head_oracle

    return oracle_fixed_k(_chain, head_oracle(STEP35_SPEC, 0).successor, prompt, n_tokens, k_max)


def test_generate_per_head_acceptance(step35_model):
    """Greedy generate() on step35: the output is plain llama-cpp-python's greedy output, and
    fixed k=3 accepts per position exactly what the per-head oracle predicts, with upstream's
    drafter and with the own loop; auto (own loop) drafts no more than one token per head."""
    target, draft = load_pair(step35_model, n_draft_max=3)
    prompt = target.tokenize(PROMPT, add_bos=False)
    plain = greedy_reference(step35_model, prompt, N_GEN)
    tokens, drafted, accepted = _expected_fixed_k(prompt, N_GEN, 3)
    assert tokens == plain
    runs = {"upstream": llama_mtp.generate(target, draft, prompt, max_tokens=N_GEN, n_draft=3, temperature=0.0,
                                           drafter="upstream")}
    with MtpSession(target, draft, backend_sampling=False, defer_catchup=True) as s:
        runs["own"] = llama_mtp.generate(target, draft, prompt, max_tokens=N_GEN, n_draft=3, temperature=0.0,
                                         session=s)
    runs["auto"] = llama_mtp.generate(target, draft, prompt, max_tokens=N_GEN, n_draft="auto", temperature=0.0)
    for name, r in runs.items():
        assert r.tokens == plain, name
    for name in ("upstream", "own"):
        st = runs[name].stats
        assert (list(st.drafted_per_pos), list(st.accepted_per_pos)) == (drafted, accepted), name
    # each head's acceptance given the heads before it accepted, as measured
    rates = [accepted[0] / drafted[0]] + [accepted[i] / accepted[i - 1] for i in (1, 2) if accepted[i - 1]]
    print("step35 fixed k=3 per-head acceptance:", [round(x, 3) for x in rates], "configured", HEAD_ACCEPTS)
    st = runs["auto"].stats
    assert len(st.draft_len_hist) <= 4 and sum(st.draft_len_hist) == st.steps
    draft.close()
    target.close()


def test_unimplemented_mode_is_routed_with_a_logged_reason(oracle_model, monkeypatch, caplog):
    """A mode the own loop lacks (mem_shared) goes to upstream's drafter with a warning that
    names it (auto), and rejection sampling, which needs the own loop, raises."""
    monkeypatch.setattr(session_mod, "draft_mode_of", lambda target, draft: DraftMode("mem_shared", 1))
    target, draft = load_pair(oracle_model, n_draft_max=3)
    prompt = target.tokenize(PROMPT, add_bos=False)
    with caplog.at_level(logging.WARNING, logger="llama_mtp"):
        r = llama_mtp.generate(target, draft, prompt, max_tokens=16, n_draft="auto", temperature=0.0)
    assert r.tokens == greedy_reference(oracle_model, prompt, 16)
    msgs = [rec.getMessage() for rec in caplog.records if rec.name == "llama_mtp"]
    assert any("mem_shared" in m and "upstream" in m for m in msgs), msgs
    assert r.stats.drafted > 0  # upstream's drafter drafted
    with pytest.raises(MtpArgumentError, match="mem_shared"):
        llama_mtp.generate(target, draft, prompt, max_tokens=8, temperature=0.8, verify="rejection", seed=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llama_mtp"):
        # (the real pair is single-head, so the shim accepts it; a real mem_shared pair is refused there too)
        MtpSession(target, draft, backend_sampling=False, defer_catchup=True).close()
    assert any("mem_shared" in rec.getMessage() for rec in caplog.records if rec.name == "llama_mtp")
    draft.close()
    target.close()


def test_resolve_drafter_one_rule(oracle_model, monkeypatch, caplog):
    """resolve_drafter: the own loop wherever the mode has it (any n_draft), upstream's only when
    asked for or when the mode lacks the own loop; a caller's session fixes its drafter and
    size; a fixed n_draft sizes a one-sequence run; bad input raises typed errors."""
    from llama_mtp.drafter import resolve_drafter

    target, draft = load_pair(oracle_model, n_draft_max=3)
    try:
        for n in (0, 2, 3, "auto"):
            d = resolve_drafter(target, draft, n, "match")
            assert (d.own_loop, d.n_draft, d.k_max, d.n_seq, d.mode.mode) == (True, n, 3, 1, "single"), n
        up = resolve_drafter(target, draft, 2, "match", prefer="upstream")
        assert not up.own_loop and up.name == "upstream"
        assert resolve_drafter(target, draft, 2, size_to_n_draft=True).k_max == 2
        assert resolve_drafter(target, draft, 0, size_to_n_draft=True).k_max == 1
        assert resolve_drafter(target, draft, "auto", size_to_n_draft=True).k_max == 3
        with pytest.raises(MtpArgumentError, match="rejection"):
            resolve_drafter(target, draft, 2, "rejection", prefer="upstream")
        for bad in (dict(n_draft=4), dict(n_draft=-1), dict(n_draft=True), dict(verify="maybe"),
                    dict(prefer="fast")):
            with pytest.raises(MtpArgumentError):
                resolve_drafter(target, draft, **bad)
        with pytest.raises(MtpArgumentError, match="llama_cpp.Llama"):
            resolve_drafter(target, None)
        with MtpSession(target, draft, n_draft_max=2) as s:  # an upstream session: its drafter, its size
            d = resolve_drafter(target, draft, "auto", session=s)
            assert (d.own_loop, d.k_max) == (False, 2)
            with pytest.raises(MtpArgumentError, match="session was made for the upstream"):
                resolve_drafter(target, draft, session=s, prefer="own")
        assert d.with_n_draft(2).n_draft == 2
        with pytest.raises(MtpArgumentError, match="exceeds"):
            d.with_n_draft(3)
        monkeypatch.setattr(session_mod, "draft_mode_of", lambda target, draft: DraftMode("mem_shared", 1))
        with pytest.raises(MtpArgumentError, match="mem_shared"):
            resolve_drafter(target, draft, 2, prefer="own")
        assert not resolve_drafter(target, draft, 2).own_loop  # fixed k: routed like auto
    finally:
        draft.close()
        target.close()


def test_checks_refuse_bools_and_bounds():
    from llama_mtp import checks

    assert checks.integer("x", 5, 1, 9) == 5 and checks.n_draft(0) == 0 and checks.n_draft("auto") == "auto"
    assert checks.number("p", 1, 0.0, 1.0) == 1.0 and checks.choice("v", "a", ("a", "b")) == "a"
    for call in (lambda: checks.integer("x", True), lambda: checks.integer("x", 0, 1), lambda: checks.integer("x", 10, hi=9),
                 lambda: checks.integer("x", 1.0), lambda: checks.number("p", float("nan")),
                 lambda: checks.number("p", 0.0, 0.0, lo_open=True), lambda: checks.number("p", False),
                 lambda: checks.n_draft(False), lambda: checks.n_draft(-1), lambda: checks.n_draft("AUTO"),
                 lambda: checks.choice("v", "c", ("a", "b")), lambda: checks.choice("v", ["a"], ("a",))):
        with pytest.raises(MtpArgumentError):
            call()
