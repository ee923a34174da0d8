"""Per-arch checks of the generated models, parametrised over llama_mtp.testing.ARCHS
(so every registered arch is picked up): tiny oracle greedy path, MTP drafts,
context-recipe margins and the q4_k_m copy made by llama.cpp's quantizer."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from llama_mtp import testing as T  # noqa: E402
from llama_mtp.testing.vocab import MERGES  # noqa: E402
from test_testing_models import _MtpProbe, _load  # noqa: E402  (tests/ is on sys.path)

N_GEN = 32
# departures from pi along CONTEXT_TEST_PROMPT's 96-token greedy continuation (qwen35: 22)
CONTEXT_DEPARTURES = (8, 48)
CONTEXT_DISTINCT = 32  # distinct tokens in those 96 (qwen35: 83, deepseek2: 42; a 6-token loop: ~10)
ARCH_NAMES = sorted(T.ARCHS)


def test_arch_is_part_of_key_and_name() -> None:
    spec = T.TestModelSpec()
    assert spec.arch == "qwen35" and "qwen35" in T.ARCHS
    with pytest.raises(ValueError):
        T.TestModelSpec(arch="nope")
    with pytest.raises(ValueError):
        T.TestModelSpec(arch_params={"no_such_knob": 1})
    path = T.cached_test_model(size="tiny", arch="qwen35", accept=0.5)
    assert path.name.startswith("qwen35-mtp-oracle-")
    assert spec.key() in T.cached_test_model(spec).name


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_oracle_greedy_and_mtp_drafts(arch: str) -> None:
    path, info = T.cached_test_model_info(size="tiny", arch=arch, accept=0.5, h_miss_fraction=0.5)
    llm = _load(llama_cpp, path)
    prompt = llm.tokenize(b"Hello world", add_bos=False)
    assert _helpers.greedy_tokens(llm, prompt, N_GEN) == info.greedy_continuation(prompt[-1], N_GEN)
    llm.close()
    if not T.ARCHS[arch].has_mtp_heads:
        return  # drafted by a separate assistant model (its own tests)
    probe = _MtpProbe(llama_cpp, path, extra_bufts=True)
    try:
        seq = [65, *info.pi_chain(65, N_GEN)]
        hidden = probe.target_hidden(seq)
        drafts, _ = probe.mtp_argmax([(seq[k], k, hidden[k - 1]) for k in range(1, len(seq))])
        assert drafts.tolist() == [info.mtp_draft(t) for t in seq[1:]]
        assert (drafts != np.array([info.successor[t] for t in seq[1:]])).any()  # accept=0.5 misses
    finally:
        probe.close()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_context_margins(arch: str) -> None:
    path, info = T.cached_test_model_info(size="tiny", arch=arch, recipe="context")
    tokens, margins = T.reference_greedy(path, T.CONTEXT_TEST_PROMPT, T.CONTEXT_TEST_N_TOKENS)
    assert len(tokens) == T.CONTEXT_TEST_N_TOKENS
    assert margins.min() >= T.CONTEXT_MIN_MARGIN
    # history matters along the path (else "context" would be the oracle), but the oracle's pi
    # still leads (else the MTP heads, which predict pi, would never be accepted)
    llm = _load(llama_cpp, path)
    prompt = llm.tokenize(T.CONTEXT_TEST_PROMPT.encode(), add_bos=False)
    llm.close()
    prev = [prompt[-1], *tokens[:-1]]
    departures = sum(int(info.successor[p]) != t for p, t in zip(prev, tokens))
    assert CONTEXT_DEPARTURES[0] <= departures <= CONTEXT_DEPARTURES[1], departures
    # and no short loop (a loop of a few tokens would fix each draft position's fate: one position
    # always rejected would hide rollback bugs behind a constant pattern)
    assert len(set(tokens)) >= CONTEXT_DISTINCT, len(set(tokens))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_q4_k_m_follows_the_oracle(arch: str, no_extra_bufts, model_dir: pathlib.Path) -> None:
    import gguf

    path, info = T.cached_test_model_info(size="tiny", arch=arch, accept=0.5, ftype="q4_k_m")
    types = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    # llama.cpp's quantizer ran: k-quants where rows allow, its own fallbacks elsewhere
    assert gguf.GGMLQuantizationType.Q4_K in types and gguf.GGMLQuantizationType.F16 not in types
    assert path.stat().st_size < T.cached_test_model(size="tiny", arch=arch, accept=0.5, ftype="f16").stat().st_size
    llm = _load(llama_cpp, path)
    prompt = list(b"Hello world")
    assert _helpers.greedy_tokens(llm, prompt, N_GEN) == info.greedy_continuation(prompt[-1], N_GEN)
    llm.close()


# the archs with a switch head (TestModelSpec.switch_marker)
SWITCH_ARCHS = [a for a in ARCH_NAMES if T.ARCHS[a].switch_head(T.TestModelSpec(arch=a)) is not None]
MARKER = "<tool_response>"
# batched and one-token decoding of the same tokens differ by up to ~1e-2 in logits
SWITCH_MIN_MARGIN = 1e-2


def switch_spec(arch: str, shared: bool) -> T.TestModelSpec:
    """A call script and an answer script that part after their shared "\n" (``shared``) or, sharing
    nothing, after the control token a prompt ends with; the answer once MARKER was in the prompt."""
    first = ("\n",) if shared else ()
    return T.TestModelSpec(arch=arch, script_text=first + (" call", " get_weather"), script_eos=True,
                           more_scripts_text=(first + (" sunny", " today."),), switch_marker=MARKER)


@pytest.mark.parametrize("shared", [True, False], ids=["after-a-shared-chunk", "after-a-control-token"])
@pytest.mark.parametrize("arch", SWITCH_ARCHS)
def test_switch_marker_turns_greedy_to_the_switched_script(arch: str, shared: bool) -> None:
    spec = switch_spec(arch, shared)
    path, info = T.cached_test_model_info(spec)
    end = "\n" if shared else T.ARCHS[arch].specials.eos
    llm = _load(llama_cpp, path)
    try:
        plain, marked = (llm.tokenize(text.encode(), add_bos=False, special=True) for text in (
            "What is the weather in Paris?" + end,
            f"What is the weather in Paris?{MARKER}sunny, 24 C</tool_response> So?" + end))
    finally:
        llm.close()
    assert info.switch is not None and info.switch.marker in marked and info.switch.marker not in plain
    # the prompts end where the scripts part: on their shared chunk, or on a control token (every
    # special token reads as the trigger, the script's predecessor)
    assert plain[-1] == marked[-1]
    assert plain[-1] == info.switch.trigger if shared else plain[-1] in info.special_ids
    answer = spec.more_scripts()[0]
    for prompt, want in ((plain, spec.script[shared:]), (marked, answer)):
        tokens, margins = T.reference_greedy(path, prompt, len(want) + 1)
        assert tokens == [*want, info.eos_id]
        assert margins.min() > SWITCH_MIN_MARGIN, margins


def test_switch_marker_validation() -> None:
    assert "switch_marker" not in T.TestModelSpec().recorded_fields()  # the specs before it keep their keys
    assert switch_spec(SWITCH_ARCHS[0], True).key() != switch_spec(SWITCH_ARCHS[0], False).key()
    for arch in set(ARCH_NAMES) - set(SWITCH_ARCHS):
        with pytest.raises(ValueError, match="switch"):
            switch_spec(arch, True)
    arch = SWITCH_ARCHS[0]
    for bad, match in ((dict(recipe="context"), "oracle"), (dict(more_scripts_text=()), "more_scripts_text"),
                       (dict(more_scripts_text=(("\n", " call"),)), "more_scripts_text"),
                       (dict(switch_marker=" call"), "already a token"), (dict(switch_marker="a"), "already a token")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(switch_spec(arch, True), **bad)


@pytest.mark.parametrize("arch", [a for a in ARCH_NAMES if T.ARCHS[a].chat_template])
def test_chat_template_renders_through_create_chat_completion(arch: str) -> None:
    path, info = T.cached_test_model_info(size="tiny", arch=arch)
    llm = _load(llama_cpp, path)
    try:
        # llama-cpp-python picked the GGUF's template (Jinja2ChatFormatter), not a built-in format
        assert llm.metadata["tokenizer.chat_template"] == T.ARCHS[arch].chat_template
        assert llm.chat_format == "chat_template.default"
        messages = [{"role": "user", "content": "Hello world"}]
        res = llm.create_chat_completion(messages, max_tokens=8, temperature=0.0)
        # the oracle continues from the prompt's last token: the rendered template decides it
        import jinja2

        rendered = jinja2.Template(T.ARCHS[arch].chat_template).render(messages=messages, add_generation_prompt=True)
        prompt = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        # (llama-cpp-python runs past max_tokens while a UTF-8 character is incomplete: count what it made)
        assert res["usage"]["completion_tokens"] >= 8
        expected = info.greedy_continuation(prompt[-1], res["usage"]["completion_tokens"])
        assert res["choices"][0]["message"]["content"] == llm.detokenize(expected).decode(errors="ignore")
        assert res["usage"]["prompt_tokens"] == len(prompt)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_filler_tokens_read_as_words(arch: str) -> None:
    path, info = T.cached_test_model_info(size="tiny", arch=arch)
    llm = _load(llama_cpp, path)
    try:
        filler = [t for t in range(256, info.n_vocab) if t not in info.special_ids and len(info.tokens[t]) > 3]
        assert len(filler) > 50
        texts = [llm.detokenize([t]) for t in filler]
        assert len(set(texts)) == len(texts)
        assert all(t[:1] == b" " and t[1:].isalpha() and t[1:].islower() for t in texts)
        # BPE never builds a filler from text: a filler word tokenizes back to bytes / merges
        assert all(x < 256 + len(MERGES) for x in llm.tokenize(texts[0] + texts[1], add_bos=False))
    finally:
        llm.close()


# ------------------------------------------------------------------ speculative paths per arch
# Everything below runs the library's own paths (generate(), MtpLlama, the session's draft
# loops) on every registered arch with MTP heads of its own, against plain llama-cpp-python.

import llama_mtp  # noqa: E402
from llama_mtp.generation import tokenize_prompt  # noqa: E402
from llama_mtp.session import draft_mode_of  # noqa: E402

import _helpers  # noqa: E402

MTP_ARCHS = [a for a in ARCH_NAMES if T.ARCHS[a].has_mtp_heads]
CTX = dict(n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
N_SPEC = 64
# plain steps (0) between drafts: deferred catch-up runs of several rows
SCHEDULE = (3, 0, 2, 0, 0, 3, 1, 3)


def _context_spec(arch: str) -> T.TestModelSpec:
    # history-dependent, drafts often (and partially) rejected
    return T.TestModelSpec(arch=arch, recipe="context", accept=0.5, accept_pattern="random")


@pytest.fixture(scope="module", params=MTP_ARCHS)
def context_pair(request: pytest.FixtureRequest):
    """(arch, path, target, draft, plain) on the arch's tiny context model; target n_rs_seq = 4."""
    path = T.cached_test_model(_context_spec(request.param))
    target, draft = llama_mtp.load(str(path), n_draft_max=4, n_batch=16, **CTX)
    plain = llama_cpp.Llama(str(path), n_batch=16, **CTX)
    yield request.param, path, target, draft, plain
    draft.close()
    target.close()
    plain.close()


@pytest.mark.parametrize("n_draft", [1, 2, 3, 4, 6, "auto"])
def test_generate_greedy_equals_plain(context_pair, n_draft) -> None:
    """generate() is plain greedy decoding on every arch; fixed k >= 2 rolls back partial
    rejections (attention KV trim; recurrent n_rs_seq, and for k=6 > n_rs_seq the checkpoint path)."""
    arch, path, target, draft, plain = context_pair
    prompt = tokenize_prompt(target, T.CONTEXT_TEST_PROMPT)
    ref, margins = T.reference_greedy(path, T.CONTEXT_TEST_PROMPT, N_SPEC)
    assert margins.min() >= T.CONTEXT_MIN_MARGIN  # batch-shape float noise cannot flip a token
    res = llama_mtp.generate(target, draft, prompt, max_tokens=N_SPEC, n_draft=n_draft)
    assert res.tokens == ref
    st = res.stats
    assert st.drafted > 0 and sum(st.draft_len_hist) == st.steps
    if n_draft != "auto":
        k = capped(target, draft, n_draft)
        assert max(i for i, n in enumerate(st.draft_len_hist) if n) == k
        if k >= 2:  # some step accepted a prefix and rolled back the rest
            assert 0 < st.accepted_per_pos[k - 1] < st.accepted_per_pos[0], st.accepted_per_pos


def capped(target, draft, k: int) -> int:
    """k as the drafter runs it: chained heads draft at most one token per head."""
    mode = draft_mode_of(target, draft)
    return min(k, mode.n_heads) if mode.mode == "chain_heads" else k


def test_mtp_llama_equals_plain(context_pair) -> None:
    """MtpLlama's completion and chat paths give plain llama-cpp-python's text on every arch."""
    arch, path, *_ = context_pair
    llm = llama_mtp.MtpLlama(str(path), n_draft="auto", **CTX)
    plain = llama_cpp.Llama(str(path), **CTX)
    try:
        got = llm.create_completion(T.CONTEXT_TEST_PROMPT, max_tokens=48, temperature=0.0)
        want = plain.create_completion(T.CONTEXT_TEST_PROMPT, max_tokens=48, temperature=0.0)
        _helpers.assert_capped_like_plain(got, want, 48)  # max_tokens a hard cap, llama-cpp-python's text
        assert llm.last_mtp_stats is not None and llm.last_mtp_stats.drafted > 0
        if T.ARCHS[arch].chat_template:  # formatted by llama.cpp's templates, as llama-server does
            _helpers.assert_chat_like_plain(llm, plain, [{"role": "user", "content": "The quick brown fox"}], 32)
    finally:
        llm.close()
        plain.close()


@pytest.mark.parametrize("own,defer", [(True, False), (True, True)], ids=["eager", "deferred"])
def test_own_loop_drafts_equal_upstream(context_pair, own, defer) -> None:
    """The session's own draft loop proposes what upstream's drafter proposes, at every
    position of every step, on history-dependent heads (deferred: catch-up runs after plain steps)."""
    arch, path, *_ = context_pair
    up = _helpers.draft_log(path, own=False, schedule=SCHEDULE, n_tokens=N_SPEC)
    assert len(up) >= 12 and any(len(d) == 3 for _, d in up)
    assert _helpers.draft_log(path, own=own, defer=defer, schedule=SCHEDULE, n_tokens=N_SPEC) == up


@pytest.mark.parametrize("arch", MTP_ARCHS)
def test_oracle_acceptance_per_position(arch: str) -> None:
    """On the oracle (accept 0.6) fixed-k generate() drafts and accepts per position exactly
    what the oracle predicts, with upstream's drafter and with the own loop, and position 0
    accepts at the configured rate (within sampling error: ~40 steps)."""
    # iid hits: the tokens a step starts from are an unbiased sample (a "spread" layout's
    # period would line step starts up with hits)
    path, info = T.cached_test_model_info(size="tiny", arch=arch, accept=0.6, accept_pattern="random")
    layout = T.ARCHS[arch]
    target, draft = llama_mtp.load(str(path), n_draft_max=3, **CTX)
    try:
        prompt = target.tokenize(b"The quick brown fox", add_bos=False)
        k = capped(target, draft, 3)
        tokens, drafted, accepted = _helpers.oracle_fixed_k(
            lambda last, n: layout.draft_chain(info.spec, info, last, n), info.successor, prompt, 96, k)
        assert tokens == info.greedy_continuation(prompt[-1], 96)
        runs = {"upstream": llama_mtp.generate(target, draft, prompt, max_tokens=96, n_draft=k, drafter="upstream")}
        with llama_mtp.MtpSession(target, draft, backend_sampling=False, defer_catchup=True) as s:
            runs["own"] = llama_mtp.generate(target, draft, prompt, max_tokens=96, n_draft=k, session=s)
        for name, r in runs.items():
            assert r.tokens == tokens, name
            assert (list(r.stats.drafted_per_pos), list(r.stats.accepted_per_pos)) == (drafted, accepted), name
        assert info.accept_rate(tokens) == pytest.approx(0.6, abs=0.1)  # along the whole path
        assert accepted[0] / drafted[0] == pytest.approx(0.6, abs=0.15)  # where steps start
    finally:
        draft.close()
        target.close()


@pytest.mark.parametrize("arch", MTP_ARCHS)
def test_model_without_mtp_heads_names_the_arch(arch: str, tmp_path: pathlib.Path) -> None:
    src = T.cached_test_model(size="tiny", arch=arch, accept=0.5)
    stripped = _helpers.write_model_without_mtp(src, tmp_path / "no-mtp.gguf")
    with pytest.raises(llama_mtp.MtpInitError) as e:
        llama_mtp.MtpLlama(str(stripped), n_draft=2, **CTX)
    assert f"(architecture '{arch}') has no MTP heads" in str(e.value)
    plain = llama_cpp.Llama(str(stripped), **CTX)  # the trunk alone is an ordinary model
    prompt = list(b"Hello world")
    info = T.cached_test_model_info(size="tiny", arch=arch, accept=0.5)[1]
    assert _helpers.greedy_tokens(plain, prompt, 16) == info.greedy_continuation(prompt[-1], 16)
    plain.close()


@pytest.mark.parametrize("arch", MTP_ARCHS)
def test_rollback_capacity_is_llama_cpps(arch: str) -> None:
    """Hybrid targets keep n_draft_max recurrent snapshots where llama.cpp can roll the state
    back (our mirror of its arch list, RS_ROLLBACK_ARCHS) and none elsewhere (qwen3next: every
    partial rejection restores a checkpoint); attention-only targets trim their KV freely."""
    from llama_mtp.llama_rules import RS_ROLLBACK_ARCHS
    from llama_mtp.checkpoint import rollback_capacity

    path, info = T.cached_test_model_info(size="tiny", arch=arch, accept=0.5)
    hybrid = any(T.ARCHS[arch].is_recurrent(info.spec, il) for il in range(info.spec.n_layer))
    target, draft = llama_mtp.load(str(path), n_draft_max=4, **CTX)
    try:
        assert rollback_capacity(target) == ((4 if arch in RS_ROLLBACK_ARCHS else 0) if hybrid else None)
    finally:
        draft.close()
        target.close()
