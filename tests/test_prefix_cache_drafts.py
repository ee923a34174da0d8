"""The MTP drafter after a prompt cache hit: it drafts as it does after a cold prefill.

Oracle models (fixed accept pattern, greedy drafts deterministic) with ``h_miss_fraction``: part
of the wrong drafts come from the target hidden state the first draft is fed, so a draft made from
the wrong (stale) hidden state is a different, known token (TestModelInfo.mtp_draft). The oracle's
MTP head does not read the draft context's memory (its attention output is zero), so a lost or
stale draft memory shows only on the history-dependent "context" recipe, whose head attends over
it: there cold, hit and restore are compared as they come out (no margins are known for drafts;
the runs decode the same tokens, in different batch shapes)."""

from __future__ import annotations

from typing import Iterator, List, Tuple

import pytest

import llama_mtp
from llama_mtp import session as session_module
from llama_mtp import testing as T
from llama_mtp.results import GenerationResult

import _helpers

N = 32  # tokens per reply
ARCHS = ("qwen35", "glm4moe")  # hybrid (recurrent checkpoints) and attention-only (KV trim)
# first turns and each conversation's new text of its second turn (distinct last tokens: the
# replies, and where drafts start, differ)
STARTS = ("Once upon a time", "In a hole in the ground", "Call me Ishmael", "It was the best of times")
NEXT = (" jumps over", " and then", " the lazy dog", " again")

Draft = Tuple[int, int, List[int]]  # (n_past, id_last, draft) of one drafting step
Pair = Tuple[T.TestModelInfo, llama_mtp.MtpTargetLlama, llama_mtp.MtpDraftLlama]


def model_spec(arch: str, recipe: str = "oracle") -> T.TestModelSpec:
    if recipe == "oracle":
        return T.TestModelSpec(recipe="oracle", arch=arch, accept=0.5, h_miss_fraction=0.5)
    return T.TestModelSpec(recipe="context", arch=arch, accept=0.5)


def loaded(arch: str, recipe: str) -> Iterator[Pair]:
    path, info = T.cached_test_model_info(model_spec(arch, recipe))
    target, draft = _helpers.load_pair(path, n_seq=2, n_draft_max=3, n_ctx=1024)
    yield info, target, draft
    draft.close()
    target.close()


@pytest.fixture(scope="module", params=[(a, r) for a in ARCHS for r in ("oracle", "context")],
                ids=lambda p: "-".join(p))
def pair(request) -> Iterator[Pair]:
    yield from loaded(*request.param)


@pytest.fixture(scope="module", params=ARCHS)
def oracle_pair(request) -> Iterator[Pair]:
    yield from loaded(request.param, "oracle")


class Recorder:
    """Runs requests one at a time, with the drafts the engine proposed for each."""

    def __init__(self) -> None:
        self.log: List[Draft] = []

    def run(self, engine: llama_mtp.Engine, prompt: List[int], **kwargs) -> Tuple[GenerationResult, List[Draft]]:
        self.log.clear()
        res = engine.submit(prompt, max_tokens=N, **kwargs).result()
        return res, list(self.log)


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    original = session_module.MtpSession.draft_many

    def draft_many(self, requests):
        out = original(self, requests)
        rec.log.extend((r.n_past, r.id_last, list(tokens)) for r, (tokens, _) in zip(requests, out))
        return out

    monkeypatch.setattr(session_module.MtpSession, "draft_many", draft_many)
    return rec


def per_position(r: GenerationResult) -> Tuple[List[int], List[int]]:
    return list(r.stats.drafted_per_pos), list(r.stats.accepted_per_pos)


def assert_drafts_read_the_right_hidden_state(info: T.TestModelInfo, tokens: List[int], log: List[Draft]) -> None:
    """Each draft of a greedy run over ``tokens`` (prompt + reply) is the oracle's: its first token
    made from id_last and the target hidden state of the token before it, the rest chained."""
    assert log
    for n_past, id_last, d in log:
        assert tokens[n_past] == id_last
        want = [info.mtp_draft(id_last, tokens[n_past - 1])]
        while len(want) < len(d):
            want.append(info.mtp_draft(want[-1], -1))
        assert d == want, (n_past, id_last)


def test_drafts_after_a_hit_and_a_restore_are_accepted_as_after_a_cold_prefill(pair, recorder) -> None:
    """A conversation's second turn decoded (a) cold, (b) after its first turn in the same slot and
    (c) restored from the host-memory cache (4 conversations over 2 slots): the same tokens, and
    the same drafts accepted at every draft position (on the oracle: each draft the oracle's)."""
    info, target, draft = pair
    firsts = [_helpers.tokenize(target, s) for s in STARTS]
    seconds: List[List[int]] = []
    runs: List[List[Tuple[GenerationResult, List[Draft]]]] = []  # per conversation: cold, hit, restored
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        for prompt, text in zip(firsts, NEXT):
            reply = engine.submit(prompt, max_tokens=N).result().tokens
            seconds.append(prompt + reply + _helpers.tokenize(target, text))
            runs.append([recorder.run(engine, seconds[-1])])
        for second, conv in zip(seconds, runs):
            conv.insert(0, recorder.run(engine, second, cache_prompt=False))
    with llama_mtp.Engine(target, draft, n_draft=3, cache_ram_mib=64) as engine:
        for prompt in firsts:
            engine.submit(prompt, max_tokens=N).result()
        for second, conv in zip(seconds, runs):
            conv.append(recorder.run(engine, second))
        stats = engine._core.cache.stats
    assert stats.ram_restores == len(STARTS) and stats.ram_failures == 0
    for first, second, conv in zip(firsts, seconds, runs):
        (cold, _), (hit, _), (restored, _) = conv
        assert cold.stats.n_cached_tokens == 0
        assert hit.stats.n_cached_tokens > len(first) and restored.stats.n_cached_tokens > len(first)
        assert cold.tokens == hit.tokens == restored.tokens
        assert per_position(cold) == per_position(hit) == per_position(restored)
        if info.spec.recipe == "oracle":
            assert cold.tokens == info.greedy_continuation(second[-1], N)
            for res, log in conv:
                assert_drafts_read_the_right_hidden_state(info, second + res.tokens, log)
    # the drafts are not trivial: every position drafts and some are rejected
    drafted, accepted = (sum(map(sum, x)) for x in zip(*(per_position(conv[0][0]) for conv in runs)))
    assert all(n > 0 for n in per_position(runs[0][0][0])[0]) and 0 < accepted < drafted


def test_a_fully_cached_prompt_drafts_from_its_own_hidden_state(oracle_pair, recorder) -> None:
    """The same prompt again (a regenerate): the slot holds all of it but its last token, nothing is
    prefilled, and the drafter's last hidden state is the previous reply's. No draft may read it:
    every draft pairs id_last with the state of the token before it."""
    info, target, draft = oracle_pair
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        for text in STARTS:
            prompt = _helpers.tokenize(target, text)
            first = engine.submit(prompt, max_tokens=N).result()
            again, log = recorder.run(engine, prompt)
            assert again.stats.n_cached_tokens == len(prompt) - 1
            assert again.tokens == first.tokens == info.greedy_continuation(prompt[-1], N)
            assert_drafts_read_the_right_hidden_state(info, prompt + again.tokens, log)


def test_drafts_after_a_prefix_copied_from_another_slot_are_a_cold_prefills(pair, recorder, caplog) -> None:
    """A prompt that copies a shared prefix from another running slot (its KV, its MTP draft rows
    and, on a recurrent target, the checkpoint at the user-message start) decodes the tokens of a
    cold prefill of the whole prompt, keeps every copied draft row, and on the oracle drafts exactly
    as after the cold prefill (each draft the oracle's). The context recipe's head attends over the
    draft rows, which the copy computed in the other prompt's batches: float noise of other batch
    shapes can flip a draft there (drafts have no margins), so there only the acceptance is compared."""
    import logging

    info, target, draft = pair
    shared = _helpers.tokenize(target, " ".join(STARTS) + " and so the story begins")
    prompts = [shared + _helpers.tokenize(target, text)[1:] for text in NEXT[:2]]
    spans = [[(len(shared), len(p))] for p in prompts]
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        cold, _ = recorder.run(engine, prompts[1], cache_prompt=False, user_spans=spans[1])
    llama_mtp.generate(target, draft, "Unrelated words here", max_tokens=2)  # the slots start empty
    caplog.set_level(logging.DEBUG, logger="llama_mtp")
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        first = engine.submit(prompts[0], max_tokens=N, n_draft=0, user_spans=spans[0])  # (drafts nothing itself)
        copied, log = recorder.run(engine, prompts[1], user_spans=spans[1])
        first.result()
    assert (cold.stats.n_cached_tokens, copied.stats.n_cached_tokens) == (0, len(shared))
    assert copied.tokens == cold.tokens
    assert not [r for r in caplog.records if "stop short" in r.getMessage()]  # every copied draft row kept
    if info.spec.recipe == "oracle":
        assert per_position(copied) == per_position(cold)
        assert_drafts_read_the_right_hidden_state(info, prompts[1] + copied.tokens, log)
    else:
        assert sum(per_position(copied)[1]) >= 0.75 * sum(per_position(cold)[1])
