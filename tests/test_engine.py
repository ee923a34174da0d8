"""Many sequences at once: generate_many(), the threaded Engine and the StepEngine under them.

Exactness is judged per sequence against plain llama-cpp-python on that prompt
alone. Batched decodes move logits by up to ~1e-2, so the greedy references are
taken only on prompts whose every step has a clear top-1 margin (asserted).
"""

from __future__ import annotations

import re
import pathlib
import threading
from typing import Dict, Iterator, List, Tuple

import pytest

import _helpers
import llama_mtp
from llama_mtp import adaptive, core, testing

N_TOKENS = 24
MIN_MARGIN = 0.1
CANDIDATES = ["Hello there", "The cat sat", "abc def ghi", "Once upon a time", "zzz yyy", "Numbers 123",
              "A B C D", "one two", "lorem ipsum", "x", "Quick!", "pack my box", "the end", "red green blue"]


@pytest.fixture(scope="module")
def context_path(model_dir) -> pathlib.Path:
    return _helpers.build_model(testing.TestModelSpec(recipe="context", accept=0.8), model_dir)


@pytest.fixture(scope="module")
def references(context_path) -> Dict[str, List[int]]:
    """Plain greedy references of the candidate prompts that have clear margins at every step."""
    plain = _helpers.plain_llama(context_path)
    refs: Dict[str, List[int]] = {}
    try:
        for text in CANDIDATES:
            toks = plain.tokenize(text.encode(), add_bos=True, special=True)
            out, margins = testing.reference_greedy(context_path, toks, N_TOKENS)
            if min(margins) > MIN_MARGIN:
                refs[text] = out
    finally:
        plain.close()
    assert len(refs) >= 6, f"only {len(refs)} candidate prompts have top-1 margins > {MIN_MARGIN}"
    return refs


@pytest.fixture(scope="module")
def pair4(context_path) -> Iterator[Tuple[llama_mtp.MtpTargetLlama, llama_mtp.MtpDraftLlama]]:
    target, draft = _helpers.load_pair(context_path, n_seq=4, n_ctx=4 * 256, n_draft_max=3)
    yield target, draft
    draft.close()
    target.close()


# ------------------------------------------------------------------------ generate_many


@pytest.mark.parametrize("n_draft", [3, "auto", 0, 1])
def test_generate_many_equals_plain_per_prompt(pair4, references, n_draft) -> None:
    """More prompts than slots: they run in waves, slots are reused, each output is plain's."""
    target, draft = pair4
    prompts = list(references)[:7]
    results = llama_mtp.generate_many(target, draft, prompts, max_tokens=N_TOKENS, n_draft=n_draft)
    assert [r.tokens for r in results] == [references[p] for p in prompts]
    for p, r in zip(prompts, results):
        st = r.stats
        assert st.n_prompt_tokens == len(target.tokenize(p.encode(), add_bos=True, special=True))
        assert st.n_generated == N_TOKENS == len(r.tokens)
        assert sum(st.draft_len_hist) == st.steps and st.accepted <= st.drafted
        assert r.finish_reason == "length"
        if n_draft == 0:
            assert st.drafted == 0 and st.steps == N_TOKENS
        elif n_draft != "auto":
            assert st.drafted > 0 and st.steps < N_TOKENS
    if n_draft == 3:
        # per-sequence stats: the prompts do not all draft and accept alike
        assert len({(r.stats.accepted, r.stats.steps) for r in results}) > 1


@pytest.mark.parametrize("prefill", ["shared", "separate"])
def test_prefill_placements_are_exact(pair4, references, prefill) -> None:
    target, draft = pair4
    prompts = list(references)[:6]
    long_prompt = " ".join(prompts)  # a prompt of several batch chunks joins others' steps
    with core.StepEngine(target, draft, n_draft=3, prefill=prefill) as eng:
        params = core.sequence_params(max_tokens=N_TOKENS)
        seqs = {}
        queue = [long_prompt] + prompts
        while queue or eng.active:
            while queue and eng.free_slots():
                p = queue.pop(0)
                seqs[p] = eng.add(core.tokenize_prompt(target, p), params)
            eng.step()
    for p in prompts:
        assert seqs[p].generated == references[p], p
    assert seqs[long_prompt].finish_reason == "length" and len(seqs[long_prompt].generated) == N_TOKENS


def test_generate_many_validates_before_running(pair4, references) -> None:
    target, draft = pair4
    with pytest.raises(llama_mtp.MtpArgumentError, match="empty"):
        llama_mtp.generate_many(target, draft, ["Hello", []])
    with pytest.raises(llama_mtp.MtpArgumentError, match="context"):
        llama_mtp.generate_many(target, draft, ["Hello", list(range(5, 300))])
    with pytest.raises(llama_mtp.MtpArgumentError, match="list of prompts"):
        llama_mtp.generate_many(target, draft, "Hello")
    with pytest.raises(llama_mtp.MtpArgumentError, match="temperature"):
        llama_mtp.generate_many(target, draft, ["Hello"], temperature=-1)
    assert llama_mtp.generate_many(target, draft, []) == []
    p = next(iter(references))
    assert llama_mtp.generate_many(target, draft, [p], max_tokens=N_TOKENS)[0].tokens == references[p]


def test_generate_is_the_one_sequence_case(pair4, references) -> None:
    """generate() on a 4-slot target, and again after generate_many reused its slots."""
    target, draft = pair4
    for p in list(references)[:3]:
        assert llama_mtp.generate(target, draft, p, max_tokens=N_TOKENS, n_draft=2).tokens == references[p]


# ------------------------------------------------------------------------------- Engine


def test_engine_streams_each_request_exactly(pair4, references) -> None:
    target, draft = pair4
    prompts = list(references)[:6]
    with llama_mtp.Engine(target, draft, n_draft="auto") as engine:
        assert engine.n_slots == 4
        handles = [engine.submit(p, max_tokens=N_TOKENS) for p in prompts]
        texts = ["".join(h) for h in handles]
        results = [h.result(timeout=60) for h in handles]
        assert engine.n_running == 0 and engine.n_waiting == 0
    for p, text, r in zip(prompts, texts, results):
        assert r.tokens == references[p]
        assert text == r.text == target.detokenize(references[p]).decode("utf-8", "ignore")


def test_engine_is_built_when_its_constructor_returns(pair4) -> None:
    """The worker hands its core back before __init__ returns: the engine's facts are the
    core's, and a bad setting raises from the constructor with no thread left behind."""
    target, draft = pair4
    before = threading.active_count()
    for bad in (dict(n_draft=-1), dict(n_draft=True), dict(n_draft=9), dict(verify="maybe")):
        with pytest.raises(llama_mtp.MtpArgumentError):
            llama_mtp.Engine(target, draft, **bad)
    assert threading.active_count() == before
    with llama_mtp.Engine(target, draft, n_draft=2) as engine:
        assert (engine.n_slots, engine.n_draft) == (4, 2)
        assert 0 < engine.n_ctx_slot <= target.n_ctx()
        assert engine._core.drafter.own_loop and engine._core.drafter.k_max == target.mtp_limits.n_draft_max


def test_engine_requests_from_many_threads(pair4, references) -> None:
    target, draft = pair4
    prompts = list(references)[:6]
    got: Dict[str, List[int]] = {}
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        def client(p: str) -> None:
            got[p] = engine.submit(p, max_tokens=N_TOKENS, n_draft=2 if len(p) % 2 else None).result(timeout=60).tokens

        threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got == {p: references[p] for p in prompts}


def test_cancel_leaves_the_others_unchanged(pair4, references) -> None:
    target, draft = pair4
    prompts = list(references)[:4]
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        victim = engine.submit(prompts[0], max_tokens=200)
        others = [engine.submit(p, max_tokens=N_TOKENS) for p in prompts[1:]]
        it = iter(victim)
        next(it)  # it is running, with the others in the same steps
        victim.cancel()
        res = victim.result(timeout=60)
        assert res.finish_reason == "cancelled" and 0 < len(res.tokens) < 200
        assert [h.result(timeout=60).tokens for h in others] == [references[p] for p in prompts[1:]]
        # the freed slot serves a new request exactly (its memory was cleared)
        assert engine.submit(prompts[0], max_tokens=N_TOKENS).result(timeout=60).tokens == references[prompts[0]]
        waiting = [engine.submit(p, max_tokens=N_TOKENS) for p in prompts * 2]
        waiting[-1].cancel()  # cancelled while it waits for a slot
        assert waiting[-1].result(timeout=60).finish_reason == "cancelled"
        assert waiting[0].result(timeout=60).tokens == references[prompts[0]]


def test_engine_bad_input_keeps_it_usable(pair4, references) -> None:
    target, draft = pair4
    p = next(iter(references))
    engine = llama_mtp.Engine(target, draft, max_waiting=2)
    try:
        bad = [dict(prompt=""), dict(prompt=[]), dict(prompt=list(range(5, 300))), dict(prompt=p, temperature=-0.5),
               dict(prompt=p, top_p=1.5), dict(prompt=p, max_tokens=0), dict(prompt=p, max_tokens="8"),
               dict(prompt=p, n_draft=9), dict(prompt=p, logit_bias={10**6: 1.0}), dict(prompt=[10**7]),
               dict(prompt=p, stop=[3]), dict(prompt=p, verify="nope")]
        for kwargs in bad:
            with pytest.raises(llama_mtp.MtpArgumentError):
                engine.submit(**kwargs).result(timeout=60)
        assert engine.submit(p, max_tokens=N_TOKENS).result(timeout=60).tokens == references[p]
    finally:
        engine.close()
    engine.close()  # idempotent
    with pytest.raises(llama_mtp.EngineClosedError):
        engine.submit(p)


def test_queue_full_is_refused_at_once(context_path) -> None:
    target, draft = _helpers.load_pair(context_path, n_seq=1, n_ctx=256)
    try:
        with llama_mtp.Engine(target, draft, max_waiting=1) as engine:
            first = engine.submit("Hello", max_tokens=64)
            second = engine.submit("Hello", max_tokens=4)  # waits for the one slot
            with pytest.raises(llama_mtp.QueueFullError, match="waiting"):
                engine.submit("Hello", max_tokens=4)
            assert first.result(timeout=60).finish_reason == "length"
            assert second.result(timeout=60).stats.n_generated == 4
            assert engine.submit("Hello", max_tokens=4).result(timeout=60).stats.n_generated == 4
    finally:
        draft.close()
        target.close()


def test_one_failing_sequence_ends_alone(pair4, references, monkeypatch) -> None:
    """A sampler that raises in one sequence ends that request with the error; the rest finish exactly."""
    from llama_mtp import verify

    target, draft = pair4
    prompts = list(references)[:3]
    original = verify.MatchVerifier.verify

    def flaky(self, proposal, q=None, row0=0):
        if self.n_logprobs == 3:  # the victim is the request that asked for 3 logprobs
            raise RuntimeError("sampler exploded")
        return original(self, proposal, q, row0)

    monkeypatch.setattr(verify.MatchVerifier, "verify", flaky)
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        victim = engine.submit(prompts[0], max_tokens=N_TOKENS, logprobs=3)
        others = [engine.submit(p, max_tokens=N_TOKENS) for p in prompts[1:]]
        with pytest.raises(RuntimeError, match="exploded"):
            victim.result(timeout=60)
        with pytest.raises(RuntimeError, match="exploded"):
            list(victim)
        assert [h.result(timeout=60).tokens for h in others] == [references[p] for p in prompts[1:]]
        assert engine.submit(prompts[0], max_tokens=N_TOKENS).result(timeout=60).tokens == references[prompts[0]]


def test_logprobs_and_logit_bias_run_as_plain_sequences(pair4, references, context_path) -> None:
    target, draft = pair4
    p = next(iter(references))
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        lp = engine.submit(p, max_tokens=N_TOKENS, logprobs=2).result(timeout=60)
        forced = 300
        biased = engine.submit(p, max_tokens=6, logit_bias={forced: 1000.0}).result(timeout=60)
    assert lp.tokens == references[p] and lp.stats.drafted == 0
    assert len(lp.logprobs) == N_TOKENS
    for tok, entry in zip(lp.tokens, lp.logprobs):
        assert entry["token"] == tok and entry["logprob"] <= 0.0
        # greedy picks the top-1 token, so it is the first of the top logprobs
        top = max(entry["top_logprobs"], key=entry["top_logprobs"].get)
        assert top == tok and len(entry["top_logprobs"]) == 2
    assert biased.tokens == [forced] * 6 and biased.stats.drafted == 0
    # the same values as llama-cpp-python's own logprobs (log-softmax of the raw logits)
    plain = _helpers.plain_llama(context_path, logits_all=True)
    try:
        want = plain.create_completion(p, max_tokens=4, temperature=0.0, logprobs=2)["choices"][0]["logprobs"]
    finally:
        plain.close()
    for got, ref in zip(lp.logprobs[:4], want["token_logprobs"]):
        assert got["logprob"] == pytest.approx(ref, abs=2e-2)


def test_sampled_sequences_are_distributed_as_plain(context_path) -> None:
    """temperature > 0 in a batch of 4: each sequence samples as plain llama-cpp-python would.
    (Temperature 3: at 12 the distribution was nearly uniform over the vocabulary and the test
    passed with every sequence sampling at half the temperature.)"""
    target, draft = _helpers.load_pair(context_path, n_seq=4, n_ctx=4 * 128)
    plain = _helpers.plain_llama(context_path)
    n, n_tok, temperature = 150, 3, 3.0
    try:
        with llama_mtp.Engine(target, draft, n_draft=3, max_waiting=n) as engine:
            handles = [engine.submit("Hello", max_tokens=n_tok, seed=seed, temperature=temperature, **_helpers.SAMPLING)
                       for seed in range(n)]
            mtp = [h.result(timeout=120).tokens for h in handles]
        ref = _helpers.plain_samples(plain, plain.tokenize(b"Hello", add_bos=True, special=True), n, n_tok, temperature)
        _helpers.assert_sampled_alike(mtp, ref, n_tok)
    finally:
        plain.close()
        draft.close()
        target.close()


# ------------------------------------------------------------------------- draft_many


def test_draft_many_equals_one_sequence_drafts(context_path) -> None:
    """Batched drafting (one MTP decode per position for all sequences) proposes what each
    sequence's own draft_dist proposes alone."""
    target, draft = _helpers.load_pair(context_path, n_seq=3, n_ctx=3 * 128)
    try:
        s = llama_mtp.MtpSession(target, draft, n_seq=3, n_draft_max=3, backend_sampling=False, defer_catchup=True)
        dec = _helpers.Decoder(target, capacity=128)
        prompts = {0: "Hello there", 1: "The cat sat", 2: "abc def ghi"}
        n_past = {}
        for sid, text in prompts.items():
            toks = _helpers.tokenize(target, text)
            n_past[sid] = _helpers.prefill(s, dec, sid, toks[:-1])
            s.begin(sid, toks[:-1])
            prompts[sid] = toks  # type: ignore[assignment]
        alone = {}
        for sid, toks in prompts.items():
            d, _ = s.draft_dist(sid, n_past[sid], toks[-1], n_max=3)
            s.begin(sid, [])  # drop the proposal: the same state drafts again below
            alone[sid] = d
        reqs = [llama_mtp.DraftRequest(sid, n_past[sid], toks[-1], n_max=3 if sid != 1 else 2)
                for sid, toks in prompts.items()]
        with pytest.raises(llama_mtp.MtpArgumentError, match="twice"):
            s.draft_many([reqs[0], reqs[0]])
        batched = s.draft_many(reqs)
        assert [t for t, _ in batched] == [alone[0], alone[1][:2], alone[2]]
        assert all(q is None for _, q in batched)
        assert all(s.pending(sid) for sid in prompts)
        dec.close()
        s.close()
    finally:
        draft.close()
        target.close()


# ------------------------------------------------------------------ the one seam


def test_only_compat_touches_llama_cpp_python_internals() -> None:
    private = re.compile(r"\._(ctx|batch|model|stack|init_sampler|requires_eval|logits_all|exit_stack|seed|"
                         r"input_ids|n_vocab|scores|sampler)\b|_internals|llama_cpp\.llama_tokenizer")
    offenders = []
    for path in sorted((pathlib.Path(llama_mtp.__file__).parent).rglob("*.py")):
        if path.name in ("_compat.py", "testing.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if private.search(line.split("#")[0]):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, "llama-cpp-python internals outside _compat.py:\n" + "\n".join(offenders)


def test_injection_is_verified_on_the_native_objects(context_path, monkeypatch) -> None:
    """A llama-cpp-python that builds its param structs differently must fail loudly."""
    from llama_mtp import _compat

    version = _compat.llama_cpp_python_version()
    monkeypatch.setattr(_compat.ParamsHook, "apply", lambda self, name, value: value)
    with pytest.raises(llama_mtp.MtpInitError, match=re.escape(f"llama-cpp-python {version}")):
        _helpers.load_pair(context_path, n_ctx=256)


def test_untested_llama_cpp_python_fails_the_build_in_one_line(tmp_path) -> None:
    from llama_mtp import _loader

    builder = _loader.build_module()
    inst = builder.Installed("9.9.9", tmp_path, tmp_path, tmp_path)
    err = builder._compile_error(inst, builder._CompileFailed(tmp_path / "mtp_shim.cpp", "error: x\nmore"),
                                 tmp_path / "log.txt")
    msg = str(err)
    assert "\n" not in msg and "9.9.9" in msg and f"tested: {builder.TESTED_LLAMA_CPP_PYTHON[0]}" in msg
    assert (tmp_path / "log.txt").read_text() == "error: x\nmore"
    tested = builder.Installed(builder.TESTED_LLAMA_CPP_PYTHON[0], tmp_path, tmp_path, tmp_path)
    assert "mtp_shim.cpp failed" in str(builder._compile_error(tested, builder._CompileFailed(
        tmp_path / "mtp_shim.cpp", "error: x"), tmp_path / "log.txt"))
    # pyproject.toml declares the same range as an upper-bounded requirement
    pyproject = (_helpers.REPO_ROOT / "pyproject.toml").read_text()
    assert f'"llama-cpp-python{_compat_range()}"' in pyproject


def _compat_range() -> str:
    from llama_mtp import _compat

    assert "<" in _compat.SUPPORTED_RANGE
    return _compat.SUPPORTED_RANGE


def test_long_plain_runs_forget_the_draft_history_and_stay_exact(context_path) -> None:
    """A plain-only sequence (n_draft=0) beside a drafting one: after FORGET_AT plain steps the
    engine drops the plain one's draft history (MtpSession.forget, once: it stays detached),
    both outputs stay plain greedy's, and the slot it leaves serves a drafting sequence exactly
    (its draft memory was emptied, not the next sequence's business)."""
    n = 2 * adaptive.FORGET_AT + 8
    target, draft = _helpers.load_pair(context_path, n_seq=2, n_ctx=2 * 256, n_draft_max=3)
    try:
        refs: List[Tuple[List[int], List[int]]] = []
        for text in CANDIDATES:
            toks = _helpers.tokenize(target, text)
            out, margins = testing.reference_greedy(context_path, toks, n)
            if min(margins) > MIN_MARGIN:
                refs.append((toks, out))
            if len(refs) == 3:
                break
        assert len(refs) == 3, "too few prompts with clear top-1 margins over the run"
        with core.StepEngine(target, draft, n_draft=3) as eng:
            plain = eng.add(refs[0][0], core.sequence_params(max_tokens=n, n_draft=0))
            drafting = eng.add(refs[1][0], core.sequence_params(max_tokens=n))
            while eng.active:
                eng.step()
            assert eng.session.stats.n_forget == 1
            assert plain.generated == refs[0][1] and drafting.generated == refs[1][1]
            assert plain.stats.drafted == 0 and drafting.stats.drafted > 0
            third = eng.add(refs[2][0], core.sequence_params(max_tokens=n))
            assert third.seq_id == plain.seq_id
            while eng.active:
                eng.step()
            assert third.generated == refs[2][1] and third.stats.drafted > 0
    finally:
        draft.close()
        target.close()
