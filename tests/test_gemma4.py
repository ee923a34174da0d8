"""The gemma4 target + gemma4-assistant pair (upstream's is_mem_shared draft mode).

The assistant is a second GGUF (llama_mtp.testing.archs.gemma4.cached_gemma4_pair) whose
context is created on its own model with ``ctx_type = MTP`` and ``ctx_other`` = the
target's context: it reads the target's token embeddings and attends over the target's
KV. The first tests build that context with llama-cpp-python's low-level API, open an
MtpSession on the pair, and check the mode, upstream's drafts against the oracle, and
that speculative greedy output is plain greedy output. The rest run the library's
supported path, ``llama_mtp.load(target, draft_model_path=assistant)`` (and MtpLlama,
Engine, generate_many, the CLI and the server's settings on it): routed to upstream's
drafter with a logged reason, plain output everywhere, typed errors for bad pairs, and
the assistant freed before the target.
"""

from __future__ import annotations

import pathlib
from typing import Iterator, Tuple

import pytest

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

import llama_mtp  # noqa: E402
from llama_cpp import _internals  # noqa: E402
from llama_mtp import _compat  # noqa: E402
from llama_mtp import testing as T  # noqa: E402
from llama_mtp.session import draft_mode_of  # noqa: E402
from llama_mtp.testing.archs import gemma4 as G  # noqa: E402

import _helpers  # noqa: E402

N_CTX = 512
THREADS = dict(n_threads=_helpers.N_THREADS, n_threads_batch=_helpers.N_THREADS)


def assistant_params(target: llama_cpp.Llama, n_seq: int = 1) -> llama_cpp.llama_context_params:
    """The assistant's context params, as common_speculative_init_result builds them."""
    cp = llama_cpp.llama_context_default_params()
    cp.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
    cp.ctx_other = _compat.native_context(target)  # the target's llama_context: its memory is shared
    cp.n_ctx = target.n_ctx()
    cp.n_batch = target.n_batch
    cp.n_ubatch = min(32, target.n_batch)
    cp.n_rs_seq = 0
    cp.n_seq_max = n_seq
    cp.n_threads = cp.n_threads_batch = _helpers.N_THREADS
    return cp


def assistant_model(path: pathlib.Path) -> _internals.LlamaModel:
    mp = llama_cpp.llama_cpp.llama_model_default_params()  # the low-level module: no_extra_bufts patches it
    mp.load_mtp = True  # every assistant layer is a nextn layer
    return _internals.LlamaModel(path_model=str(path), params=mp, verbose=False)


@pytest.fixture
def oracle_pair() -> Iterator[Tuple[llama_mtp.MtpTargetLlama, _internals.LlamaContext, T.TestModelInfo]]:
    """(target, assistant LlamaContext, info) on the tiny oracle pair, accept 0.6 iid, h-flag misses."""
    tp, ap, info = G.cached_gemma4_pair(size="tiny", accept=0.6, accept_pattern="random", h_miss_fraction=0.5)
    target = llama_mtp.MtpTargetLlama(str(tp), n_draft_max=3, n_ctx=N_CTX, verbose=False, **THREADS)
    model = assistant_model(ap)
    ctx = _internals.LlamaContext(model=model, params=assistant_params(target), verbose=False)
    yield target, ctx, info
    ctx.close()
    model.close()
    target.close()


def test_pair_files_and_metadata() -> None:
    import gguf

    tp, ap, info = G.cached_gemma4_pair(size="tiny", accept=0.5)
    assert tp.parent == ap.parent and info.spec.key() in tp.name and info.spec.key() in ap.name
    r = gguf.GGUFReader(str(ap))
    kv = {f.name: f.contents() for f in r.fields.values()}
    assert kv["general.architecture"] == "gemma4-assistant"
    n_a = info.spec.param("assistant_n_layer")
    assert kv["gemma4-assistant.embedding_length_out"] == info.spec.n_embd
    assert kv["gemma4-assistant.embedding_length"] == G.assistant_width(info.spec) != info.spec.n_embd
    assert kv["gemma4-assistant.block_count"] == kv["gemma4-assistant.nextn_predict_layers"] == n_a
    names = {t.name for t in r.tensors}
    assert {"nextn.pre_projection.weight", "nextn.post_projection.weight", "token_embd.weight"} <= names
    assert not any(".attn_k." in n or ".attn_v." in n for n in names)  # Q-only: KV is the target's
    assert T.ARCHS["gemma4"].has_mtp_heads is False and "gemma4-assistant" not in T.ARCHS
    # the target alone is an ordinary model; the assistant needs a target context
    with pytest.raises(ValueError):
        llama_cpp.Llama(str(ap), n_ctx=64, verbose=False)


def test_mode_is_mem_shared_and_own_loop_refuses_it(oracle_pair) -> None:
    target, ctx, _ = oracle_pair
    assert llama_cpp.llama_model_n_embd_out(llama_cpp.llama_get_model(ctx.ctx)) == target.n_embd()
    mode = draft_mode_of(target, ctx)
    assert mode.mode == "mem_shared" and not mode.own_loop
    assert mode.n_heads == 4  # the assistant's layers
    with pytest.raises(llama_mtp.MtpInitError, match="is_mem_shared"):
        llama_mtp.MtpSession(target, ctx, defer_catchup=True, backend_sampling=False)
    with llama_mtp.MtpSession(target, ctx, backend_sampling=False) as s:
        assert s.draft_mode.mode == "mem_shared"
        with pytest.raises(llama_mtp.MtpArgumentError, match="is_mem_shared"):
            s.draft_dist(0, 0, 65, 2)


def test_upstream_drafts_are_the_oracles(oracle_pair) -> None:
    """Upstream's drafter on the shared KV proposes info.draft_chain at every step: step 1
    fed the target's hidden state (h-flag misses depend on it), later steps the assistant's
    own; per-position acceptance is the oracle's and position 0 accepts at ~accept."""
    target, ctx, info = oracle_pair
    prompt = target.tokenize(b"The quick brown fox", add_bos=False)
    with llama_mtp.MtpSession(target, ctx, n_draft_max=3, defer_catchup=False) as s:
        r = _helpers.spec_loop(target, ctx, s, prompt, 96, 3)
    assert r.tokens == info.greedy_continuation(prompt[-1], 96)
    assert len(r.drafts) > 20
    for last, d in r.drafts:
        assert d == info.draft_chain(last, len(d)), last
    # the hidden state matters: feeding no h flags would change some first drafts
    assert any(info.mtp_draft(last) != info.mtp_draft(last, -1) for last, _ in r.drafts)
    # each step accepts the drafts' longest prefix along pi, and the stats count it per position
    want = [(len(d), next((i for i, (a, b) in enumerate(zip(d, info.pi_chain(last, len(d)))) if a != b), len(d)))
            for last, d in r.drafts]
    assert [st for st in r.steps if st[0]] == want
    assert list(r.stats.accepted_per_pos) == [sum(a > i for _, a in want) for i in range(3)]
    assert r.stats.accepted_per_pos[0] / r.stats.drafted_per_pos[0] == pytest.approx(0.6, abs=0.15)


def test_generate_acceptance_per_position_is_the_oracles(oracle_pair) -> None:
    """generate() with fixed k drafts and accepts per position what the oracle predicts
    (the same check test_archs runs for archs with MTP heads of their own)."""
    target, _, info = oracle_pair
    draft = llama_mtp.MtpAssistantLlama(target, G.cached_assistant(info.spec), verbose=False, **THREADS)
    try:
        prompt = target.tokenize(b"The quick brown fox", add_bos=False)
        # [:n]: TestModelInfo.draft_chain(last, 0) returns one draft, not none
        chain = lambda last, n: info.draft_chain(last, n)[:n]  # noqa: E731
        tokens, drafted, accepted = _helpers.oracle_fixed_k(chain, info.successor, prompt, 96, 3)
        assert tokens == info.greedy_continuation(prompt[-1], 96)
        r = llama_mtp.generate(target, draft, prompt, max_tokens=96, n_draft=3)
        assert r.tokens == tokens
        assert (list(r.stats.drafted_per_pos), list(r.stats.accepted_per_pos)) == (drafted, accepted)
    finally:
        draft.close()


def test_shared_kv_and_per_layer_embeddings_follow_the_oracle() -> None:
    """E2B-like target (per-layer token embeddings, KV-shared trailing layers): the
    assistant shares layers that reuse earlier layers' KV, and still drafts the oracle."""
    tp, ap, info = G.cached_gemma4_pair(size="tiny", n_layer=8, accept=0.5, accept_pattern="random",
                                        arch_params={"n_embd_per_layer": 16, "shared_kv_layers": 2})
    r = _oracle_loop(tp, ap, info, 2)
    assert 0 < r.stats.n_accepted < r.stats.n_drafted


def _oracle_loop(tp: pathlib.Path, ap: pathlib.Path, info: T.TestModelInfo, n_draft: int) -> _helpers.LoopResult:
    """spec_loop on a pair built by hand (the assistant context over the target's), checked against
    the oracle: greedy path and every draft chain."""
    target = llama_mtp.MtpTargetLlama(str(tp), n_draft_max=n_draft, n_ctx=N_CTX, verbose=False, **THREADS)
    model = assistant_model(ap)
    ctx = _internals.LlamaContext(model=model, params=assistant_params(target), verbose=False)
    try:
        prompt = target.tokenize(b"Hello world", add_bos=False)
        with llama_mtp.MtpSession(target, ctx, n_draft_max=n_draft) as s:
            r = _helpers.spec_loop(target, ctx, s, prompt, 48, n_draft)
        assert r.tokens == info.greedy_continuation(prompt[-1], 48)
        assert all(d == info.draft_chain(last, len(d)) for last, d in r.drafts)
        return r
    finally:
        ctx.close()
        model.close()
        target.close()


@pytest.mark.parametrize("ftype", ["q8_0", "q4_k_m"])
def test_quantized_pair_follows_the_oracle(ftype: str, no_extra_bufts) -> None:
    """q8_0 (f16 where the assistant's rows are not a multiple of 32) and llama.cpp's q4_k_m
    quantizer output of both files keep the oracle's greedy path and drafts."""
    tp, ap, info = G.cached_gemma4_pair(size="tiny", accept=0.5, accept_pattern="random", ftype=ftype)
    _oracle_loop(tp, ap, info, 3)


CONTEXT_SPEC = T.TestModelSpec(arch="gemma4", recipe="context", accept=0.5, accept_pattern="random")


@pytest.fixture(scope="module")
def context_paths() -> Tuple[pathlib.Path, pathlib.Path]:
    tp, ap, _ = G.cached_gemma4_pair(CONTEXT_SPEC)
    return tp, ap


@pytest.fixture(scope="module")
def context_pair(context_paths) -> Iterator[Tuple[pathlib.Path, llama_mtp.MtpTargetLlama, llama_mtp.MtpAssistantLlama]]:
    """llama_mtp.load(target, draft_model_path=assistant) on the history-dependent pair."""
    tp, ap = context_paths
    target, draft = llama_mtp.load(tp, draft_model_path=ap, n_draft_max=4, n_ctx=N_CTX, n_batch=16, **THREADS)
    yield tp, target, draft
    draft.close()
    target.close()


@pytest.mark.parametrize("n_draft", [1, 2, 3, 4, "auto"])
def test_generate_greedy_equals_plain(context_pair, n_draft) -> None:
    """generate() on load()'s pair is plain greedy decoding on the history-dependent
    pair ("auto" wants the own loop: it is routed to upstream's drafter)."""
    path, target, draft = context_pair
    assert isinstance(draft, llama_mtp.MtpAssistantLlama) and draft.mtp_target is target
    assert draft_mode_of(target, draft).mode == "mem_shared"
    prompt = llama_mtp.generation.tokenize_prompt(target, T.CONTEXT_TEST_PROMPT)
    ref, margins = T.reference_greedy(path, T.CONTEXT_TEST_PROMPT, 64)
    assert margins.min() >= T.CONTEXT_MIN_MARGIN
    res = llama_mtp.generate(target, draft, prompt, max_tokens=64, n_draft=n_draft)
    assert res.tokens == ref
    st = res.stats
    assert st.drafted > 0 and 0 < st.accepted < st.drafted
    if n_draft != "auto" and n_draft >= 2:
        # some step accepted a prefix and the target's KV (the assistant's too) was trimmed after it
        assert 0 < st.accepted_per_pos[1] and st.accepted_per_pos[-1] < st.accepted_per_pos[0], st.accepted_per_pos


def test_context_assistant_drafts_depend_on_history() -> None:
    """On the context pair the assistant's drafts are not the oracle's everywhere (it reads
    the target's KV and the rest of the hidden state), and speculative output is plain."""
    spec = T.TestModelSpec(arch="gemma4", recipe="context", accept=0.5, accept_pattern="random")
    tp, ap, info = G.cached_gemma4_pair(spec)
    target = llama_mtp.MtpTargetLlama(str(tp), n_draft_max=3, n_ctx=N_CTX, verbose=False, **THREADS)
    model = assistant_model(ap)
    ctx = _internals.LlamaContext(model=model, params=assistant_params(target), verbose=False)
    try:
        prompt = target.tokenize(T.CONTEXT_TEST_PROMPT.encode(), add_bos=False)
        with llama_mtp.MtpSession(target, ctx, n_draft_max=3) as s:
            r = _helpers.spec_loop(target, ctx, s, prompt, 48, 3)
        assert r.tokens == T.reference_greedy(tp, T.CONTEXT_TEST_PROMPT, 48)[0]
        assert any(d != info.draft_chain(last, len(d)) for last, d in r.drafts)
        assert r.partial_rejections > 0
    finally:
        ctx.close()
        model.close()
        target.close()


# ------------------------------------------------------------------ the library's path: routing


ROUTED = "draft mode 'mem_shared' is not implemented by the own draft loop"


def _prompt_tokens(target: llama_cpp.Llama, text: str) -> list:
    return target.tokenize(text.encode(), add_bos=False)


def test_routing_to_upstream_is_logged_and_rejection_names_mem_shared(context_paths, caplog) -> None:
    """Every front that wants the own draft loop (generate auto, generate_many, Engine, MtpLlama)
    routes the pair to upstream's drafter with a logged warning naming the mode, once per pair;
    verify="rejection", which needs the own loop, raises a typed error naming it instead."""
    tp, ap = context_paths
    fronts = {
        "generate": lambda t, d, p: llama_mtp.generate(t, d, p, max_tokens=4, n_draft="auto"),
        "generate_many": lambda t, d, p: llama_mtp.generate_many(t, d, [p], max_tokens=4),
        "Engine": lambda t, d, p: llama_mtp.Engine(t, d).close(),
    }
    for name, run in fronts.items():  # each on a pair of its own: the warning is logged once per pair
        target, draft = llama_mtp.load(tp, draft_model_path=ap, n_seq=2, n_draft_max=2, n_ctx=N_CTX, **THREADS)
        try:
            for repeat in range(2):
                caplog.clear()
                with caplog.at_level("WARNING", logger="llama_mtp"):
                    run(target, draft, _prompt_tokens(target, "Hello world"))
                logged = [r.getMessage() for r in caplog.records if ROUTED in r.getMessage()]
                assert len(logged) == (1 if repeat == 0 else 0), (name, repeat, logged)
        finally:
            draft.close()
            target.close()
    target, draft = llama_mtp.load(tp, draft_model_path=ap, n_seq=2, n_draft_max=2, n_ctx=N_CTX, **THREADS)
    try:
        prompt = _prompt_tokens(target, "Hello world")
        caplog.clear()
        with caplog.at_level("WARNING", logger="llama_mtp"):
            # upstream's drafter asked for: nothing is routed, nothing logged
            llama_mtp.generate(target, draft, prompt, max_tokens=4, n_draft=2, drafter="upstream")
        assert not [r for r in caplog.records if ROUTED in r.getMessage()]
        with caplog.at_level("WARNING", logger="llama_mtp"):
            # one rule for every n_draft: a fixed k wants the own loop too, so it is routed (and logged)
            llama_mtp.generate(target, draft, prompt, max_tokens=4, n_draft=2)
        assert len([r for r in caplog.records if ROUTED in r.getMessage()]) == 1
        with pytest.raises(llama_mtp.MtpArgumentError, match="mem_shared"):
            llama_mtp.generate(target, draft, prompt, max_tokens=4, temperature=0.8, verify="rejection")
        with pytest.raises(llama_mtp.MtpArgumentError, match="mem_shared"):
            llama_mtp.generate_many(target, draft, [prompt], max_tokens=4, temperature=0.8, verify="rejection")
        with pytest.raises(llama_mtp.MtpArgumentError, match="mem_shared"):
            llama_mtp.Engine(target, draft, verify="rejection")
        with llama_mtp.Engine(target, draft) as engine:
            with pytest.raises(llama_mtp.MtpArgumentError, match="mem_shared"):
                engine.submit(prompt, max_tokens=4, temperature=0.8, verify="rejection")
            assert engine.submit(prompt, max_tokens=4).result().finish_reason == "length"  # still usable
    finally:
        draft.close()
        target.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="llama_mtp"):
        llm = llama_mtp.MtpLlama(tp, draft_model_path=ap, n_ctx=N_CTX, verbose=False, **THREADS)
    llm.close()
    assert [r for r in caplog.records if ROUTED in r.getMessage()]
    with pytest.raises(llama_mtp.MtpArgumentError, match="mem_shared"):
        llama_mtp.MtpLlama(tp, draft_model_path=ap, verify="rejection", n_ctx=N_CTX, verbose=False, **THREADS)


# ------------------------------------------------------------------ MtpLlama


@pytest.fixture(scope="module")
def mtp_llama(context_paths) -> Iterator[Tuple[llama_mtp.MtpLlama, llama_cpp.Llama]]:
    tp, ap = context_paths
    llm = llama_mtp.MtpLlama(tp, draft_model_path=ap, n_draft=3, n_ctx=N_CTX, verbose=False, **THREADS)
    plain = llama_cpp.Llama(str(tp), n_ctx=N_CTX, verbose=False, **THREADS)
    yield llm, plain
    llm.close()
    plain.close()


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=0.9, seed=7)])
def test_mtp_llama_completion_and_stream_equal_plain(mtp_llama, kwargs) -> None:
    llm, plain = mtp_llama
    assert llm.mtp_draft_mode.mode == "mem_shared" and isinstance(llm.mtp_draft, llama_mtp.MtpAssistantLlama)
    want = plain.create_completion(T.CONTEXT_TEST_PROMPT, max_tokens=40, **kwargs)
    got = llm.create_completion(T.CONTEXT_TEST_PROMPT, max_tokens=40, **kwargs)
    _helpers.assert_capped_like_plain(got, want, 40)  # max_tokens a hard cap, llama-cpp-python's text
    stats = llm.last_mtp_stats
    assert stats is not None and stats.drafted > 0 and stats.accepted > 0
    assert got["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] == stats.accepted
    # llama-cpp-python streams this byte-level vocabulary's invalid UTF-8 differently from its
    # non-streamed text: compare with its own stream
    streamed = ["".join(c["choices"][0]["text"] for c in llm_.create_completion(
        T.CONTEXT_TEST_PROMPT, max_tokens=40, stream=True, **kwargs)) for llm_ in (llm, plain)]
    overshot = want["usage"]["completion_tokens"] > 40  # plain went on to finish a character
    assert streamed[1].startswith(streamed[0]) if overshot else streamed[0] == streamed[1]


def test_mtp_llama_chat_equals_plain(mtp_llama) -> None:
    llm, plain = mtp_llama
    msgs = [{"role": "user", "content": "The quick brown fox"}]
    got = llm.create_chat_completion(msgs, max_tokens=24, temperature=0.0)
    want = plain.create_chat_completion(msgs, max_tokens=24, temperature=0.0)
    assert got["choices"][0]["message"]["role"] == want["choices"][0]["message"]["role"]
    _helpers.assert_capped_like_plain(got, want, 24)
    assert llm.last_mtp_stats is not None and llm.last_mtp_stats.drafted > 0


class _ReuseSpy:
    """Records the n_reuse MtpLlama hands each run (the prompt cache's decision)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from llama_mtp import mtp_llama as module

        self.n_reuse: list = []
        real = module.OneSequenceRun
        spy = self

        class Run(real):  # type: ignore[misc, valid-type]
            def __init__(self, *args, n_reuse: int = 0, **kwargs) -> None:
                spy.n_reuse.append(n_reuse)
                super().__init__(*args, n_reuse=n_reuse, **kwargs)

        monkeypatch.setattr(module, "OneSequenceRun", Run)


def test_mtp_llama_prompt_cache_with_a_shared_kv_drafter(mtp_llama, monkeypatch) -> None:
    """A drafter on the target's KV has no memory to catch up: a prompt extending the context
    reuses all of it (the target decodes only the new tokens), also after a plain-decoding
    fallback the drafter never saw, except the last token when the drafter's hidden state (its
    one state) is not the one after the reused prefix; every completion equals plain's text."""
    llm, plain = mtp_llama
    spy = _ReuseSpy(monkeypatch)

    def both(prompt, **kw) -> str:
        got = llm.create_completion(prompt, max_tokens=16, temperature=0.0, **kw)
        _helpers.assert_capped_like_plain(got, plain.create_completion(prompt, max_tokens=16, temperature=0.0), 16)
        return got

    def held() -> list:
        return [int(t) for t in llm.input_ids[:llm.n_tokens]]

    t1 = _prompt_tokens(llm, "Hello world")
    both(t1)
    assert len(held()) > len(t1)  # prompt + generated tokens
    both(t1)  # the same prompt again: the state after the whole context is stale, one token re-decoded
    assert spy.n_reuse[-1] == len(t1) - 2
    ctx = held()
    both(ctx + _prompt_tokens(llm, " and so"))  # extends the context: all of it is reused
    assert spy.n_reuse[-1] == len(ctx) > len(t1) and llm.last_mtp_stats.drafted > 0
    # a plain-decoding run (logits_processor) changes the target only; the next prompt extends
    # its context by one token: the drafter's hidden state is stale, so one token is re-decoded
    llm.create_completion(held() + _prompt_tokens(llm, " more"), max_tokens=8, temperature=0.0,
                          logits_processor=[lambda ids, scores: scores])
    assert llm.last_mtp_stats is None
    ctx = held()
    both(ctx + _prompt_tokens(llm, " x")[:1])
    assert spy.n_reuse[-1] == len(ctx) - 1
    # one token more right after an MTP run: its hidden state is current, nothing is re-decoded
    ctx = held()
    both(ctx + _prompt_tokens(llm, " y")[:1])
    assert spy.n_reuse[-1] == len(ctx) and llm.last_mtp_stats.drafted > 0


# ------------------------------------------------------------------ Engine, generate_many, CLI, server

ENGINE_PROMPTS = ("The quick brown fox jumps", "Once upon a time", "Speculative decoding")


def test_engine_two_sequences_equal_plain(context_paths) -> None:
    """Two slots (three prompts: one waits for a free slot), each sequence token for token plain."""
    tp, ap = context_paths
    target, draft = llama_mtp.load(tp, draft_model_path=ap, n_seq=2, n_draft_max=3, n_ctx=N_CTX, **THREADS)
    try:
        prompts = [_prompt_tokens(target, p) for p in ENGINE_PROMPTS]
        refs = []
        for p in prompts:
            ref, margins = T.reference_greedy(tp, p, 32)
            assert margins.min() >= T.CONTEXT_MIN_MARGIN
            refs.append(ref)
        for n_draft in ("auto", 2):
            with llama_mtp.Engine(target, draft, n_draft=n_draft) as engine:
                handles = [engine.submit(p, max_tokens=32) for p in prompts]
                results = [h.result(timeout=120) for h in handles]
            assert [r.tokens for r in results] == refs, n_draft
            assert sum(r.stats.accepted for r in results) > 0
        many = llama_mtp.generate_many(target, draft, prompts, max_tokens=32, n_draft=3)
        assert [r.tokens for r in many] == refs
    finally:
        draft.close()
        target.close()


def test_cli_generate_with_draft_model(context_paths, capsys) -> None:
    from llama_mtp import cli

    tp, ap = context_paths
    rc = cli.main(["generate", "-m", str(tp), "--draft-model", str(ap), "-p", T.CONTEXT_TEST_PROMPT,
                   "--max-tokens", "16", "--n-draft", "2", "--threads", "2", "--n-ctx", "256"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "[mtp] 16 tokens" in out.out and "drafted" in out.out
    rc = cli.main(["generate", "-m", str(tp), "--draft-model", "/nonexistent/assistant.gguf"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: draft model file not found") and len(err.splitlines()) == 1


def test_server_settings_and_backend_take_the_assistant(context_paths) -> None:
    pytest.importorskip("pydantic_settings")
    from llama_mtp.server import backend, settings

    tp, ap = context_paths
    argv = ["--model", str(tp), "--draft_model_path", str(ap), "--n_parallel", "2", "--n_ctx", str(N_CTX),
            "--n_threads", "2", "--n_threads_batch", "2", "--verbose", "false"]
    cfg = settings.parse_config(argv, lambda: "unused")
    assert cfg.mtp.draft_model_path == str(ap)
    with pytest.raises(settings.SettingsError, match="--draft_model_path /nonexistent.gguf: no such file"):
        settings.parse_config(argv[:2] + ["--draft_model_path", "/nonexistent.gguf"], lambda: "unused")
    be = backend.load_backend(cfg)
    try:
        assert isinstance(be.draft, llama_mtp.MtpAssistantLlama)
        prompt = _prompt_tokens(be.target, ENGINE_PROMPTS[0])
        res = be.engine.submit(prompt, max_tokens=24).result(timeout=120)
        assert res.tokens == T.reference_greedy(tp, prompt, 24)[0]
    finally:
        be.close()
    assert _compat.native_context(be.draft) is None and _compat.native_context(be.target) is None


# ------------------------------------------------------------------ typed errors


def _load(target: pathlib.Path, assistant, **kw):
    return llama_mtp.load(target, draft_model_path=assistant, n_ctx=128, **THREADS, **kw)


def test_bad_pairs_raise_typed_errors_before_any_context(context_paths, oracle_model) -> None:
    """Mismatched files never reach llama.cpp's context constructor (which aborts the process
    on a width mismatch): each is a typed error naming the problem."""
    tp, ap = context_paths
    with pytest.raises(llama_mtp.MtpInitError, match="^draft model file not found: /nonexistent"):
        _load(tp, "/nonexistent/assistant.gguf")
    with pytest.raises(llama_mtp.MtpInitError, match="^draft model file not found"):
        llama_mtp.MtpLlama(tp, draft_model_path="/nonexistent/assistant.gguf", verbose=False)
    with pytest.raises(llama_mtp.MtpArgumentError, match="draft_model_path must be a path"):
        _load(tp, 3)
    # an assistant of a target of another width / vocabulary / head size
    for override, needle in ((dict(n_embd=96), "width 96"), (dict(n_vocab=400), "vocabulary of 400"),
                             (dict(head_dim=16), "key_length")):
        other = G.cached_assistant(T.TestModelSpec(arch="gemma4", accept=0.5, **override))
        with pytest.raises(llama_mtp.MtpInitError, match=needle):
            _load(tp, other)
    # files that are no external drafter: the target itself, a model with MTP heads of its own
    with pytest.raises(llama_mtp.MtpInitError, match="'gemma4'.*has no MTP \\(nextn\\) layers"):
        _load(tp, tp)
    with pytest.raises(llama_mtp.MtpInitError, match="'qwen35'.*is not an external MTP drafter"):
        _load(tp, oracle_model)
    # a target with MTP heads of its own: refused, it drafts with them
    with pytest.raises(llama_mtp.MtpArgumentError, match="MTP heads of its own .*drop draft_model_path"):
        _load(oracle_model, ap)
    # the target alone: no heads, and the message names the way out
    with pytest.raises(llama_mtp.MtpInitError, match="has no MTP heads.*draft_model_path"):
        llama_mtp.load(tp, n_ctx=128)
    # an assistant loaded without its target
    for make in (lambda: llama_mtp.load(ap, n_ctx=128),
                 lambda: llama_mtp.MtpLlama(ap, n_ctx=128, verbose=False)):
        with pytest.raises(llama_mtp.MtpInitError, match="gemma4-assistant model, an external MTP drafter"):
            make()
    plain = llama_cpp.Llama(str(tp), n_ctx=128, verbose=False)
    try:
        with pytest.raises(llama_mtp.MtpArgumentError, match="pass the target"):
            llama_mtp.MtpAssistantLlama(plain, ap)
    finally:
        plain.close()
    # and the loads that refused leave a working process: the right pair still loads
    target, draft = _load(tp, ap)
    target.close()


def test_external_branch_of_verify_mtp_pair(context_pair, oracle_model) -> None:
    """What load() injected into the assistant's context is checked on the native objects."""
    _, target, draft = context_pair
    mode = llama_mtp.session.draft_mode_of(target, draft).mode  # the shim's probe, which load() passes in
    _compat.verify_mtp_pair(target, draft, n_rs_seq=0, n_seq=1, external=True, draft_mode=mode)
    with pytest.raises(llama_mtp.MtpInitError, match="n_seq_max=1, 2 requested"):
        _compat.verify_mtp_pair(target, draft, n_rs_seq=0, n_seq=2, external=True, draft_mode=mode)
    with pytest.raises(llama_mtp.MtpInitError, match="ctx_other was not applied"):
        _compat.verify_mtp_pair(target, draft, n_rs_seq=0, n_seq=1, external=True, draft_mode="single")
    q_target, q_draft = llama_mtp.load(oracle_model, n_ctx=128, **THREADS)
    try:
        with pytest.raises(llama_mtp.MtpInitError, match="runs on the target's llama_model, not on its own"):
            _compat.verify_mtp_pair(q_target, q_draft, n_rs_seq=3, n_seq=1, external=True)
    finally:
        q_draft.close()
        q_target.close()


# ------------------------------------------------------------------ close order


def test_closing_the_target_closes_the_assistant_first(context_paths) -> None:
    tp, ap = context_paths
    target, draft = _load(tp, ap)
    session = llama_mtp.MtpSession(target, draft, n_draft_max=2)
    target.close()  # the assistant borrows the target's KV: it is freed first
    assert _compat.native_context(draft) is None and _compat.native_context(target) is None and session.closed
    for obj in (target, draft, target, session):
        obj.close()  # twice, in any order: no-ops
    with pytest.raises(llama_mtp.SessionClosedError):
        llama_mtp.generate(target, draft, [1, 2, 3], max_tokens=2)
    # the assistant first, then the target
    target, draft = _load(tp, ap)
    draft.close()
    assert _compat.native_context(draft) is None and _compat.native_context(target)
    target.close()
    target.close()
    # MtpLlama: its session and assistant go before it, once
    llm = llama_mtp.MtpLlama(tp, draft_model_path=ap, n_draft=2, n_ctx=128, verbose=False, **THREADS)
    llm.create_completion("abc", max_tokens=4, temperature=0.0)
    assistant = llm.mtp_draft
    llm.close()
    llm.close()
    assert _compat.native_context(assistant) is None and _compat.native_context(llm) is None
