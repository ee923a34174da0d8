"""generate() is plain generation, only faster: exactness, sampling, stops, context limits."""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterator, List, Tuple

import llama_cpp
import numpy as np
import pytest

import _helpers
import llama_mtp
from llama_mtp import testing
from llama_mtp.generation import tokenize_prompt

CTX = dict(n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
# 16-token prompt chunks: the prompts below straddle several batch boundaries
N_BATCH = 16
PROMPT = "The quick brown fox jumps over the lazy dog, again and again."

RECIPES = {
    "oracle-0.6": testing.TestModelSpec(recipe="oracle", accept=0.6),
    "context": testing.TestModelSpec(recipe="context", accept=0.8),
}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def model(request: pytest.FixtureRequest) -> Iterator[Tuple[str, llama_mtp.MtpTargetLlama, llama_mtp.MtpDraftLlama, llama_cpp.Llama]]:
    path = str(testing.cached_test_model(RECIPES[request.param]))
    target, draft = llama_mtp.load(path, n_draft_max=4, n_batch=N_BATCH, **CTX)
    plain = llama_cpp.Llama(path, n_batch=N_BATCH, **CTX)
    yield request.param, target, draft, plain
    draft.close()
    target.close()
    plain.close()


def plain_greedy(plain: llama_cpp.Llama, prompt_tokens: List[int], n: int) -> List[int]:
    out: List[int] = []
    for tok in plain.generate(prompt_tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("n_draft", [1, 2, 3, 4, 6, "auto"])
def test_greedy_is_identical_to_plain(model, n_draft) -> None:
    """n_draft 6 exceeds the target's n_rs_seq (4): partial rejections restore a checkpoint."""
    name, target, draft, plain = model
    prompt = tokenize_prompt(target, PROMPT)
    assert len(prompt) > 2 * N_BATCH  # the prefill crosses batch boundaries
    ref = plain_greedy(plain, prompt, 64)
    res = llama_mtp.generate(target, draft, prompt, max_tokens=64, n_draft=n_draft)
    assert res.tokens == ref
    assert res.finish_reason == "length"
    st = res.stats
    assert st.n_generated == 64
    assert sum(st.draft_len_hist) == st.steps
    assert sum(k * n for k, n in enumerate(st.draft_len_hist)) == st.drafted
    # each step commits its accepted drafts plus one sampled token (drafts never overshoot max_tokens)
    assert st.steps + st.accepted == st.n_generated
    assert st.accepted <= st.drafted
    # 0.6 / 0.8 of these models' drafts are right: every fixed length gets drafts accepted (fewer
    # steps than tokens); auto drafts (its first choice, or a probe within 8 plain steps), but
    # whether drafting pays on a tiny model depends on the machine's timings, so no more is asserted
    # here (tests/test_adaptive.py holds the policy to its choices on seeded costs)
    if n_draft == "auto":
        assert st.drafted > 0
    else:
        assert st.accepted > 0
    if name == "context" and n_draft != "auto":
        # partial rejections happen, so the recurrent rollback path ran
        assert 0 < st.accepted < st.drafted


def test_target_state_matches_plain_after_generation(model) -> None:
    """Next-token logits after generate() equal a fresh plain run over the same tokens.

    Batched and one-at-a-time decoding of the same tokens differ by up to ~1e-2 in
    logits here, so the tolerance sits a few times above that.
    """
    name, target, draft, plain = model
    prompt = tokenize_prompt(target, PROMPT)
    res = llama_mtp.generate(target, draft, prompt, max_tokens=48, n_draft=3)
    tokens = prompt + res.tokens
    assert target.n_tokens == len(tokens) - 1  # everything but the last committed token is in the context
    target.eval(tokens[-1:])
    got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(target._ctx.ctx, -1), shape=(target.n_vocab(),)).copy()
    plain.reset()
    plain._ctx.kv_cache_clear()
    plain.eval(tokens)
    want = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(plain._ctx.ctx, -1), shape=(plain.n_vocab(),)).copy()
    assert np.max(np.abs(got - want)) < 0.05
    assert int(np.argmax(got)) == int(np.argmax(want))


@pytest.fixture(scope="module")
def context_model() -> Iterator[Tuple[llama_mtp.MtpTargetLlama, llama_mtp.MtpDraftLlama, llama_cpp.Llama]]:
    path = str(testing.cached_test_model(RECIPES["context"]))
    target, draft = llama_mtp.load(path, n_draft_max=3, **CTX)
    plain = llama_cpp.Llama(path, **CTX)
    yield target, draft, plain
    draft.close()
    target.close()
    plain.close()


SAMPLING = dict(temperature=12.0, top_k=0, top_p=1.0, min_p=0.0)
N_SAMPLE_TOKENS = 3


def _plain_sample(plain: llama_cpp.Llama, prompt: str, seed: int) -> List[int]:
    plain.set_seed(seed)
    toks = tokenize_prompt(plain, prompt)
    got: List[int] = []
    for tok in plain.generate(toks, temp=SAMPLING["temperature"], top_k=SAMPLING["top_k"],
                              top_p=SAMPLING["top_p"], min_p=SAMPLING["min_p"]):
        got.append(tok)
        if len(got) == N_SAMPLE_TOKENS:
            break
    return got


def test_sampling_is_distributed_as_plain(context_model) -> None:
    """temperature > 0: committed tokens follow plain sampling's distribution.

    Independent seeds for the two sides (a two-sample chi-square over the first
    tokens), plus: with the same seed the speculative run consumes the sampler's
    RNG in plain's order, so nearly every seed reproduces plain's tokens exactly.
    """
    target, draft, plain = context_model
    n = 150
    mtp: Dict[int, List[int]] = {}
    for seed in range(n):
        res = llama_mtp.generate(target, draft, "Hello", max_tokens=N_SAMPLE_TOKENS, n_draft=3, seed=seed, **SAMPLING)
        mtp[seed] = res.tokens
    ref_same_seed = {seed: _plain_sample(plain, "Hello", seed) for seed in range(n)}
    ref_other_seed = [_plain_sample(plain, "Hello", 10_000 + seed) for seed in range(n)]
    same = sum(mtp[s] == ref_same_seed[s] for s in range(n))
    assert same >= 0.9 * n, f"only {same}/{n} seeds reproduced plain sampling"
    for pos in range(N_SAMPLE_TOKENS):
        # -1: generation had already stopped (an end-of-generation token was sampled)
        a = Counter(t[pos] if pos < len(t) else -1 for t in mtp.values())
        b = Counter(t[pos] if pos < len(t) else -1 for t in ref_other_seed)
        assert len(a) > 3, "the fixture must make sampling non-degenerate"
        assert _helpers.chi_square_p(a, b) > 0.01


def test_stop_strings_match_llama_cpp_python(context_model) -> None:
    target, draft, plain = context_model
    text = llama_mtp.generate(target, draft, PROMPT, max_tokens=40, n_draft=3).text
    assert len(text) > 12
    # a stop string llama-cpp-python itself stops on (text rendered from byte tokens
    # like "<x31>" is not matched by its stop scan, so probe candidates)
    for start in range(4, len(text) - 2):
        stop = text[start: start + 2]
        ref = plain.create_completion(PROMPT, max_tokens=40, temperature=0.0, stop=[stop])
        if ref["choices"][0]["finish_reason"] == "stop":
            break
    else:
        pytest.fail("no usable stop string in the generated text")
    res = llama_mtp.generate(target, draft, PROMPT, max_tokens=40, n_draft=3, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == ref["choices"][0]["text"] == text[: text.find(stop)]
    assert stop not in res.text
    streamed = "".join(llama_mtp.generate(target, draft, PROMPT, max_tokens=40, n_draft=3, stop=[stop], stream=True))
    assert streamed == res.text


def test_eog_stops_generation(context_model, monkeypatch: pytest.MonkeyPatch) -> None:
    target, draft, _ = context_model
    full = llama_mtp.generate(target, draft, PROMPT, max_tokens=30, n_draft=3)
    eog = full.tokens[7]
    real = llama_cpp.llama_vocab_is_eog
    monkeypatch.setattr(llama_cpp, "llama_vocab_is_eog", lambda vocab, tok: tok == eog or real(vocab, tok))
    res = llama_mtp.generate(target, draft, PROMPT, max_tokens=30, n_draft=3)
    first = full.tokens.index(eog)
    assert res.finish_reason == "stop"
    assert res.tokens == full.tokens[: first + 1]
    # the context holds exactly the committed tokens but the last
    assert target.n_tokens == len(tokenize_prompt(target, PROMPT)) + first


def test_stream_yields_the_same_text(context_model) -> None:
    target, draft, _ = context_model
    res = llama_mtp.generate(target, draft, PROMPT, max_tokens=32, n_draft=2)
    stream = llama_mtp.generate(target, draft, PROMPT, max_tokens=32, n_draft=2, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == res.text
    assert stream.result is not None and stream.result.tokens == res.tokens


def test_max_tokens_and_context_limits(context_model) -> None:
    target, draft, _ = context_model
    for m in (1, 2, 5):
        res = llama_mtp.generate(target, draft, PROMPT, max_tokens=m, n_draft=3)
        assert len(res.tokens) == m and res.finish_reason == "length"
    with pytest.raises(llama_mtp.MtpArgumentError, match="n_ctx"):
        llama_mtp.generate(target, draft, "x" * 600, max_tokens=4)
    # the session stays usable after the error
    assert len(llama_mtp.generate(target, draft, PROMPT, max_tokens=4).tokens) == 4


def test_running_out_of_context_ends_with_length() -> None:
    path = str(testing.cached_test_model(RECIPES["context"]))
    target, draft = llama_mtp.load(path, n_draft_max=3, n_ctx=64, n_threads=2, verbose=False)
    try:
        prompt = tokenize_prompt(target, PROMPT)
        res = llama_mtp.generate(target, draft, prompt, max_tokens=500, n_draft=3)
        assert res.finish_reason == "length"
        # prompt + completion fill the 64-token context exactly, as llama-cpp-python truncates
        # max_tokens to n_ctx - len(prompt); the last token was sampled from the final row
        assert len(prompt) + len(res.tokens) == 64
        assert target.n_tokens == 63
    finally:
        draft.close()
        target.close()


def test_bad_arguments_raise_typed_errors(context_model) -> None:
    target, draft, _ = context_model
    for kwargs in (dict(max_tokens=0), dict(n_draft=-1), dict(temperature=-1.0), dict(n_draft="many"),
                   dict(verify="guess")):
        with pytest.raises(llama_mtp.MtpArgumentError):
            llama_mtp.generate(target, draft, PROMPT, **kwargs)
    with pytest.raises(llama_mtp.MtpArgumentError):
        llama_mtp.generate(target, draft, [10**9])
    with pytest.raises(llama_mtp.MtpArgumentError, match="empty"):
        llama_mtp.generate(target, draft, [])
    assert len(llama_mtp.generate(target, draft, PROMPT, max_tokens=3).tokens) == 3


def test_rejection_sampling_is_distributed_as_plain(context_model) -> None:
    """verify="rejection" (drafts sampled from the MTP head, min(1, p/q) acceptance,
    residual resampling) leaves the output distribution unchanged, and at this
    temperature accepts far more drafts than sample-and-match."""
    target, draft, plain = context_model
    n = 150
    rej, match = [], []
    acc_rej = [0, 0]  # accepted, drafted
    acc_match = [0, 0]
    for seed in range(n):
        r = llama_mtp.generate(target, draft, "Hello", max_tokens=N_SAMPLE_TOKENS, n_draft=3, seed=seed,
                               verify="rejection", **SAMPLING)
        m = llama_mtp.generate(target, draft, "Hello", max_tokens=N_SAMPLE_TOKENS, n_draft=3, seed=seed,
                               verify="match", **SAMPLING)
        rej.append(r.tokens)
        match.append(m.tokens)
        acc_rej[0] += r.stats.accepted
        acc_rej[1] += r.stats.drafted
        acc_match[0] += m.stats.accepted
        acc_match[1] += m.stats.drafted
    ref = [_plain_sample(plain, "Hello", 20_000 + seed) for seed in range(n)]
    for pos in range(N_SAMPLE_TOKENS):
        a = Counter(t[pos] if pos < len(t) else -1 for t in rej)
        b = Counter(t[pos] if pos < len(t) else -1 for t in ref)
        assert len(a) > 3
        assert _helpers.chi_square_p(a, b) > 0.01
    # At T=12 the target's p is nearly flat over the vocabulary. Match drafts the MTP head's
    # argmax d and accepts it with probability p(d); rejection drafts from q (the head's top-40
    # at the same temperature, nearly flat too) and accepts with probability sum(min(p, q)),
    # about p's mass on those 40 tokens: an order of magnitude more (measured ~0.08 vs ~0.007
    # of drafted tokens). Rejection drafting the argmax (temperature not passed to the draft
    # loop) would accept with probability p(d) too, as often as match, failing the factor 2.
    rate_rej, rate_match = acc_rej[0] / acc_rej[1], acc_match[0] / acc_match[1]
    assert rate_rej > 0.03 and rate_rej > 2 * rate_match, (acc_rej, acc_match)
