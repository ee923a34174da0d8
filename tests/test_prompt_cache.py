"""MtpLlama prompt reuse: common prefixes and recurrent-state checkpoints, on every generated
arch with MTP heads: the hybrids (recurrent-state checkpoints) and the attention-only ones
(any common prefix is kept)."""

from __future__ import annotations

from typing import Iterator, List, Tuple, Union

import llama_cpp
import pytest

import llama_mtp
from llama_mtp import _compat, adaptive, testing
from llama_mtp.checkpoint import rollback_capacity
from llama_mtp.prompt_cache import common_prefix

import _helpers

CTX = dict(n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
N = 12


def _is_hybrid(arch: str) -> bool:
    spec = testing.TestModelSpec(arch=arch)
    return any(testing.ARCHS[arch].is_recurrent(spec, il) for il in range(spec.n_layer))


_OWN_HEADS = sorted(a for a in testing.ARCHS if testing.ARCHS[a].has_mtp_heads)
HYBRID_ARCHS = [a for a in _OWN_HEADS if _is_hybrid(a)]            # qwen35, qwen35moe, qwen3next
ATTENTION_ARCHS = [a for a in _OWN_HEADS if not _is_hybrid(a)]     # deepseek2, glm4moe, mimo2, step35


def n_prompt_decoded(llm: llama_cpp.Llama) -> int:
    return int(llama_cpp.llama_perf_context(_compat.native_context(llm)).n_p_eval)


@pytest.fixture(scope="module", params=HYBRID_ARCHS)
def models(request: pytest.FixtureRequest) -> Iterator[Tuple[str, llama_mtp.MtpLlama, llama_cpp.Llama]]:
    # history-dependent: a wrong state restore changes the text
    path = str(testing.cached_test_model(testing.TestModelSpec(arch=request.param, recipe="context")))
    # n_draft=0: every generation step is a one-token decode, so n_p_eval counts prompt rows only
    llm = llama_mtp.MtpLlama(path, n_draft=0, **CTX)
    plain = llama_cpp.Llama(path, **CTX)
    yield path, llm, plain
    llm.close()
    plain.close()


def tok(llm: llama_cpp.Llama, text: str, bos: bool = False) -> List[int]:
    return llm.tokenize(text.encode(), add_bos=bos, special=True)


def complete(llm: llama_cpp.Llama, prompt: Union[str, List[int]]) -> Tuple[dict, int]:
    before = n_prompt_decoded(llm)
    out = llm.create_completion(prompt, max_tokens=N, temperature=0.0)
    return out, n_prompt_decoded(llm) - before


def same(got: dict, want: dict) -> bool:
    """MtpLlama's completion is plain's (max_tokens a hard cap: see _helpers.assert_capped_like_plain)."""
    _helpers.assert_capped_like_plain(got, want, N)
    return True


def check_margins(path: str, toks: List[int]) -> None:
    _, margins = testing.reference_greedy(path, toks, N)
    assert margins.min() > 1e-2, "near-tie in the greedy reference: pick another prompt"


def first_clear(path: str, candidates: List[List[int]]) -> List[int]:
    """The first prompt whose greedy reference has no near-tie on this model (a fixed text may
    hit one on some arch)."""
    for toks in candidates:
        _, margins = testing.reference_greedy(path, toks, N)
        if margins.min() > 1e-2:
            return toks
    pytest.fail("every candidate prompt has a near-tie in the greedy reference")


def test_extension_resumes_and_divergence_is_exact(models) -> None:
    path, llm, plain = models
    llm.mtp_checkpoints.clear()
    p1 = "Hello there"
    t1, _ = complete(llm, p1)
    assert same(t1, complete(plain, p1)[0])
    held1 = _compat.context_tokens(llm)
    assert len(llm.mtp_checkpoints) >= 1 and len(held1) in llm.mtp_checkpoints.positions()

    # token prompts: the tiny vocabulary's retokenized text need not match the sampled tokens
    toks2 = held1 + tok(llm, " again")
    check_margins(path, toks2)
    t2, n2 = complete(llm, toks2)
    t2_plain, n2_plain = complete(plain, toks2)
    assert same(t2, t2_plain)
    assert n2 == len(toks2) - 1 - len(held1)  # the head's new rows only (the last is the first step)
    assert n2 <= n2_plain                     # plain, too, keeps a hybrid context it extends exactly

    # back to held1 + something else: the context now holds the second run, so the
    # end-of-generation checkpoint of the first call is restored (not the current state)
    toks3 = held1 + tok(llm, " more and more")
    held2 = _compat.context_tokens(llm)
    assert common_prefix(held2, toks3) == len(held1) < len(held2)
    check_margins(path, toks3)
    t3, n3 = complete(llm, toks3)
    t3_plain, n3_plain = complete(plain, toks3)
    assert same(t3, t3_plain)
    assert n3 == len(toks3) - 1 - len(held1)
    assert n3_plain == len(toks3)  # plain cannot cut a hybrid's recurrent state back: all of it again

    # diverging before every checkpoint: a full prefill, still exact
    toks4 = first_clear(path, [tok(llm, t, bos=True) for t in ("Goodbye", "Farewell", "See you")])
    assert all(common_prefix(toks4, _compat.context_tokens(llm)) < p for p in llm.mtp_checkpoints.positions())
    t4, n4 = complete(llm, toks4)
    assert same(t4, complete(plain, toks4)[0])
    assert n4 == len(toks4) - 1


def test_checkpoints_are_bounded(models) -> None:
    _, llm, _ = models
    llm.mtp_checkpoints.clear()
    toks = tok(llm, "Prompt", bos=True)
    ends = []
    for _ in range(4):  # one conversation: two checkpoints per call (end of prefill, end of generation)
        complete(llm, toks)
        ends.append(len(toks) - 1)
        toks = _compat.context_tokens(llm)
        ends.append(len(toks))
        toks = toks + tok(llm, " next")
    # the LRU keeps the newest `capacity`, each the recurrent state only (independent of length)
    assert llm.mtp_checkpoints.capacity == 4
    assert llm.mtp_checkpoints.positions() == sorted(ends)[-4:]
    sizes = set(llm.mtp_checkpoints.sizes())
    assert len(sizes) == 1 and sizes.pop() > 0


def test_ram_cache_and_reset_false(models) -> None:
    path, llm, plain = models
    llm.set_cache(llama_cpp.LlamaRAMCache())
    plain.set_cache(llama_cpp.LlamaRAMCache())
    try:
        p1 = "Once upon"
        t1, _ = complete(llm, p1)
        assert same(t1, complete(plain, p1)[0])
        held = _compat.context_tokens(llm)
        toks2 = held + tok(llm, " then they went")
        check_margins(path, toks2)
        t2, n2 = complete(llm, toks2)
        assert same(t2, complete(plain, toks2)[0])
        assert n2 == len(toks2) - 1 - len(held)
        # another prompt, then back: create_completion loads the cached target state; the MTP
        # context lacks those rows, so the target re-decodes what it needs -- output still exact
        complete(llm, "Zebra")
        complete(plain, "Zebra")
        toks3 = toks2 + tok(llm, " so they said")
        check_margins(path, toks3)
        t3, n3 = complete(llm, toks3)
        assert same(t3, complete(plain, toks3)[0])
        assert 0 < n3 <= len(toks3)
    finally:
        llm.set_cache(None)
        plain.set_cache(None)
    # reset=False continues the context as Llama.generate does
    extra = llm.tokenize(b" and", add_bos=False)
    held = _compat.context_tokens(llm)
    got = []
    for t in llm.generate(extra, temp=0.0, reset=False):
        got.append(t)
        if len(got) == 4:
            break
    assert _compat.context_tokens(llm)[:len(held) + len(extra)] == held + extra
    plain.reset()
    want = []
    for t in plain.generate(held + extra, temp=0.0):
        want.append(t)
        if len(want) == 4:
            break
    assert got == want


@pytest.mark.parametrize("arch", ATTENTION_ARCHS)
def test_attention_only_keeps_the_common_prefix(arch: str) -> None:
    path = str(testing.cached_test_model(arch=arch, recipe="context"))
    llm = llama_mtp.MtpLlama(path, n_draft=0, **CTX)
    plain = llama_cpp.Llama(path, **CTX)
    try:
        assert rollback_capacity(llm) is None  # attention-only: any prefix can be kept
        p1 = tok(llm, "Hello there", bos=True)
        check_margins(path, p1)
        assert same(complete(llm, p1)[0], complete(plain, p1)[0])
        held = _compat.context_tokens(llm)
        texts = (" again and again", " then they went", " and so on", " once more")
        for toks in (first_clear(path, [held + tok(llm, t) for t in texts]),             # extends all of it
                     first_clear(path, [held[:len(held) - 5] + tok(llm, t) for t in texts])):  # diverges inside: a trim
            n_keep = common_prefix(_compat.context_tokens(llm), toks)
            got, n_got = complete(llm, toks)
            want, n_want = complete(plain, toks)
            assert same(got, want)
            assert n_got == len(toks) - 1 - n_keep   # plain decodes the last prompt row in the batch too
            assert n_got <= n_want                   # no more than plain llama-cpp-python decodes
    finally:
        llm.close()
        plain.close()


def test_a_prefix_is_reused_after_a_long_plain_run_dropped_the_draft_history() -> None:
    """A plain completion long enough for the engine to drop the draft history (MtpSession.forget),
    then one that extends it with drafting on: the prefix is reused, drafting resumes on the
    emptied draft memory, and both texts are plain greedy's."""
    path = str(testing.cached_test_model(testing.TestModelSpec(arch="qwen35", recipe="context")))
    n_long = 2 * adaptive.FORGET_AT
    llm = llama_mtp.MtpLlama(path, n_draft=3, **CTX)
    plain = llama_cpp.Llama(path, **CTX)
    try:
        llm.mtp_n_draft = 0  # the first completion plain
        toks1 = tok(llm, "Hello there", bos=True)
        _, margins = testing.reference_greedy(path, toks1, n_long)
        assert margins.min() > 1e-2, "near-tie in the greedy reference: pick another prompt"
        out1 = llm.create_completion(toks1, max_tokens=n_long, temperature=0.0)
        _helpers.assert_capped_like_plain(out1, plain.create_completion(toks1, max_tokens=n_long, temperature=0.0), n_long)
        assert llm._session().stats.n_forget == 1
        llm.mtp_n_draft = 3
        toks2 = first_clear(path, [_compat.context_tokens(llm) + tok(llm, t) for t in (" and", " so", " then")])
        assert llm._reuse(toks2) >= len(toks1) + n_long - 2
        out2 = llm.create_completion(toks2, max_tokens=N, temperature=0.0)
        assert same(out2, complete(plain, toks2)[0])
        assert llm.last_mtp_stats is not None and llm.last_mtp_stats.drafted > 0
    finally:
        llm.close()
        plain.close()
