"""Conversations that stay warm: the Engine's and generate_many's slot cache.

Each turn resends the whole history; the slot that holds its prefix decodes only the rest
(recurrent targets restore a checkpoint). Every output is plain greedy's on the same prompt
tokens (history-dependent "context" models, margins asserted), hit or miss.
"""

from __future__ import annotations

import threading
from typing import Dict, Iterator, List, Tuple

import pytest

import llama_mtp
from llama_mtp import testing as T
from llama_mtp.checkpoint import rollback_capacity
from llama_mtp.prompt_cache import SlotCache

import _helpers

N = 12  # tokens per reply
ARCHS = ("qwen35", "glm4moe")  # hybrid (recurrent checkpoints) and attention-only (KV trim)
TURNS = (" The quick brown fox", " jumps over", " the lazy dog.", " And then?")


def load(path: str) -> Tuple[llama_mtp.MtpTargetLlama, llama_mtp.MtpDraftLlama]:
    return _helpers.load_pair(path, n_seq=2, n_draft_max=3, n_ctx=1024)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request) -> Iterator[Tuple[str, llama_mtp.MtpTargetLlama, llama_mtp.MtpDraftLlama]]:
    path = str(T.cached_test_model(T.TestModelSpec(recipe="context", arch=request.param)))
    target, draft = load(path)
    yield path, target, draft
    draft.close()
    target.close()


def reference(path: str, prompt: List[int], n: int = N) -> List[int]:
    tokens, margins = T.reference_greedy(path, prompt, n)
    assert margins.min() > 1e-2, "near-tie in the greedy reference: pick another prompt"
    return tokens


STARTS = ["Once upon a time", "In a hole in the ground", "Call me Ishmael", "It was the best of times",
          "All happy families", "The sky above the port", "Far out in the uncharted", "A screaming comes"]


def conversations(path: str, target, n: int, turns: int = 3) -> List[List[Tuple[List[int], List[int]]]]:
    """``n`` conversations of ``turns`` turns, (prompt, plain greedy reply) each: every turn's
    prompt is the history so far plus new text. Starts whose references have a near-tie anywhere
    are skipped (batched and single decodes may differ by ~1e-2 in logits)."""
    out = []
    for start in STARTS:
        prompt, conv = _helpers.tokenize(target, start), []
        for text in TURNS[:turns]:
            reply, margins = T.reference_greedy(path, prompt, N)
            if margins.min() <= 1e-2:
                break
            conv.append((prompt, reply))
            prompt = prompt + reply + _helpers.tokenize(target, text)
        if len(conv) == turns:
            out.append(conv)
        if len(out) == n:
            return out
    pytest.fail(f"fewer than {n} conversations without near-ties on this model")


def test_turns_reuse_the_slot_and_equal_plain(pair) -> None:
    path, target, draft = pair
    (conv,) = conversations(path, target, 1)
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        results = [engine.submit(prompt, max_tokens=N).result() for prompt, _ in conv]
    assert [r.tokens for r in results] == [reply for _, reply in conv]
    # the first turn decodes everything; each later one all but the new text: the slot holds the
    # previous prompt and its reply but the last reply token (never decoded)
    cached = [r.stats.n_cached_tokens for r in results]
    assert cached[0] == 0 and cached[1:] == [len(p) + len(r) - 1 for p, r in conv[:-1]], cached


def test_cache_prompt_false_decodes_everything(pair) -> None:
    path, target, draft = pair
    prompt = _helpers.tokenize(target, "It was a dark and stormy night")
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        first = engine.submit(prompt, max_tokens=N).result()
        again = engine.submit(prompt, max_tokens=N, cache_prompt=False).result()
        hit = engine.submit(prompt, max_tokens=N).result()
    assert first.tokens == again.tokens == hit.tokens == reference(path, prompt)
    assert again.stats.n_cached_tokens == 0 and hit.stats.n_cached_tokens == len(prompt) - 1


def test_more_conversations_than_slots_from_threads(pair) -> None:
    """4 conversations over 2 slots, each on its own thread: a freed slot goes to whichever request
    waits first, reusing what it can; evicted prefixes are decoded again; every turn is exact."""
    path, target, draft = pair
    convs = conversations(path, target, 4)
    got: Dict[int, List[Tuple[List[int], int]]] = {i: [] for i in range(len(convs))}
    errors: List[BaseException] = []
    with llama_mtp.Engine(target, draft, n_draft="auto") as engine:
        def run(i: int) -> None:
            try:
                for prompt, _ in convs[i]:
                    res = engine.submit(prompt, max_tokens=N).result()
                    got[i].append((res.tokens, res.stats.n_cached_tokens))
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(convs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    assert not errors
    for i, conv in enumerate(convs):
        assert [tokens for tokens, _ in got[i]] == [reply for _, reply in conv]
    # (hits are not asserted: 4 conversations queued FIFO over 2 slots evict each other's prefix)


def test_generate_many_reuses_across_calls_and_outside_decodes_invalidate(pair) -> None:
    path, target, draft = pair
    prompts = [_helpers.tokenize(target, t) for t in ("Once upon a time there", "Far far away in a land")]
    first = llama_mtp.generate_many(target, draft, prompts, max_tokens=N, n_draft=2)
    longer = [p + r.tokens + _helpers.tokenize(target, " and so") for p, r in zip(prompts, first)]
    second = llama_mtp.generate_many(target, draft, longer, max_tokens=N, n_draft=2)
    for p, r in zip(longer, second):
        assert r.tokens == reference(path, p)
        # a new call's session lacks the last one's deferred MTP rows (up to n_ubatch of them): the
        # target re-decodes from what the draft context holds (a recurrent one: from a checkpoint)
        assert 0 < r.stats.n_cached_tokens <= len(p) - len(_helpers.tokenize(target, " and so")) - 1
    # something else decodes on the target in between: the cache cannot vouch for the slots any more
    llama_mtp.generate(target, draft, "Unrelated words here", max_tokens=4)
    third = llama_mtp.generate_many(target, draft, longer, max_tokens=N, n_draft=2)
    assert [r.tokens for r in third] == [r.tokens for r in second]
    assert all(r.stats.n_cached_tokens == 0 for r in third)


def test_a_prompt_diverging_before_the_slot_end_is_exact(pair) -> None:
    """A prompt that shares only part of what the slot holds: the attention-only target trims its
    KV there; a recurrent one restores the latest checkpoint at or before it (the end of an
    earlier prompt), or decodes from 0 when none is."""
    path, target, draft = pair
    base = _helpers.tokenize(target, "Once upon a time there was a king")
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        r1 = engine.submit(base, max_tokens=N).result()
        longer = base + r1.tokens + _helpers.tokenize(target, " who ruled")
        r2 = engine.submit(longer, max_tokens=N).result()
        # diverges inside the first reply: after the first prompt's end checkpoint
        diverging = base + r1.tokens[:3] + _helpers.tokenize(target, " queen")
        r3 = engine.submit(diverging, max_tokens=N).result()
    assert r2.tokens == reference(path, longer) and r3.tokens == reference(path, diverging)
    assert r2.stats.n_cached_tokens > len(base)
    assert len(base) - 1 <= r3.stats.n_cached_tokens <= len(base) + 3


def test_slot_choice_is_llama_servers() -> None:
    """The longest common prefix above 10% of the prompt, else the least recently used slot."""
    cache = SlotCache.__new__(SlotCache)  # the choice needs no context
    cache._held = [[1, 2, 3, 4], [1, 2, 9, 9], [], [7] * 10]
    cache._used = [4, 1, 2, 3]
    assert cache.choose([1, 2, 3, 5], free=[0, 1, 2, 3]) == 0
    assert cache.choose([1, 2, 9, 9, 9], free=[0, 1, 2, 3]) == 1
    assert cache.choose([1, 2, 3, 5], free=[1, 2, 3]) == 1           # 2 of 4 tokens: 50%
    assert cache.choose([5] * 30 + [1], free=[0, 1, 2, 3]) == 1       # no prefix: least recently used
    assert cache.choose([1] + [5] * 20, free=[0, 1, 2]) == 1          # 1/21 < 10%: LRU among the free
    assert cache.choose([1, 2, 3, 5], free=[0, 1], reuse=False) == 1  # cache_prompt=False: LRU


def test_cached_tokens_in_usage_of_mtp_llama_and_the_server(tmp_path) -> None:
    """OpenAI's usage.prompt_tokens_details.cached_tokens: MtpLlama's prompt reuse, the server's slot
    cache (a chat's second turn, plain and streamed), and cache_prompt=false."""
    from test_server import ServerProcess

    path = T.cached_test_model(T.TestModelSpec(recipe="context", accept=0.8))
    llm = llama_mtp.MtpLlama(str(path), n_draft=3, n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        first = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0)
        again = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    server = ServerProcess(path, tmp_path / "server.log", "--n_parallel", "2", "--n_ctx", "1024", "--cache_ram_mib", "16")
    try:
        server.wait_ready()
        client = server.client()
        messages = [{"role": "user", "content": "Tell me a story"}]
        one = client.chat.completions.create(model=str(path), messages=messages, max_tokens=8, temperature=0)
        messages += [{"role": "assistant", "content": one.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
        two = client.chat.completions.create(model=str(path), messages=messages, max_tokens=8, temperature=0)
        assert one.usage.prompt_tokens_details.cached_tokens == 0
        assert 0 < two.usage.prompt_tokens_details.cached_tokens < two.usage.prompt_tokens
        chunks = list(client.chat.completions.create(model=str(path), messages=messages, max_tokens=8, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        usage = next(c.usage for c in reversed(chunks) if c.usage is not None)
        assert usage.prompt_tokens_details.cached_tokens == two.usage.prompt_tokens - 1
        cold = client.chat.completions.create(model=str(path), messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"cache_prompt": False})
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        assert cold.choices[0].message.content == two.choices[0].message.content
        metrics = server.metrics()
        hits = sum(v for (name, _), v in metrics.items() if name == "llama_mtp:prefix_cache_hits_total")
        cached = sum(v for (name, _), v in metrics.items() if name == "llama_mtp:prompt_tokens_cached_total")
        assert hits == 2 and cached == two.usage.prompt_tokens_details.cached_tokens + usage.prompt_tokens_details.cached_tokens
    finally:
        server.stop()


@pytest.mark.parametrize("budget_mib", [64, 0])
def test_more_conversations_than_slots_with_a_host_memory_cache(pair, budget_mib, monkeypatch) -> None:
    """4 conversations taking turns over 2 slots: with a RAM cache an evicted conversation's slot is
    saved and restored at its next turn (hits where the slots alone miss); outputs exact either way."""
    path, target, draft = pair
    convs = conversations(path, target, 4, turns=2)
    cached: List[int] = []
    with llama_mtp.Engine(target, draft, n_draft=3, cache_ram_mib=budget_mib) as engine:
        for turn in range(2):
            for conv in convs:
                prompt, reply = conv[turn]
                res = engine.submit(prompt, max_tokens=N).result()
                assert res.tokens == reply
                cached.append(res.stats.n_cached_tokens)
        stats = engine._core.cache.stats
    second = cached[len(convs):]
    if budget_mib:
        assert stats.ram_saves >= 4 and stats.ram_restores == 4 and stats.ram_failures == 0
        assert all(n > 0 for n in second), second
    else:
        assert stats.ram_saves == stats.ram_restores == 0
        # each slot was taken by another conversation meanwhile: at most a shared first token is kept
        assert all(n <= 1 for n in second), second


def test_a_failed_restore_decodes_the_prompt_in_full(pair, monkeypatch, caplog) -> None:
    """llama.cpp refusing a saved state: one log line, the whole prompt decoded, output exact."""
    from llama_mtp import prompt_cache

    path, target, draft = pair
    convs = conversations(path, target, 3, turns=2)
    monkeypatch.setattr(prompt_cache, "restore_seq", lambda ctx, data, seq_id: False)
    with llama_mtp.Engine(target, draft, n_draft=3, cache_ram_mib=64) as engine:
        for conv in convs:
            assert engine.submit(conv[0][0], max_tokens=N).result().tokens == conv[0][1]
        res = engine.submit(convs[0][1][0], max_tokens=N).result()
        stats = engine._core.cache.stats
    assert res.tokens == convs[0][1][1] and res.stats.n_cached_tokens == 0
    assert stats.ram_failures == 1
    assert [r for r in caplog.records if "restoring a saved prompt" in r.getMessage()]


def test_a_next_turn_that_rewrites_the_prompts_end_reuses_a_checkpoint_before_it(pair) -> None:
    """Chat templates render a reply in the history differently from its generation prompt, so the
    next turn diverges a few tokens before the previous prompt's end. A recurrent target keeps
    checkpoints 4, 16 and 4 + n_ubatch tokens before each prompt's end (llama-server's offsets and
    one for a longer generation-prompt tail): the next turn resumes from the latest usable, exactly."""
    path, target, draft = pair
    base = _helpers.tokenize(target, "Once upon a time there was a king who ruled the land of the far north")
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        r1 = engine.submit(base, max_tokens=N).result()
        diverging = base[:-3] + _helpers.tokenize(target, " a queen and so on")
        r2 = engine.submit(diverging, max_tokens=N).result()
    assert r1.tokens == reference(path, base) and r2.tokens == reference(path, diverging)
    assert len(base) > 16  # so that the 16-before-the-end checkpoint exists, and is not the one used
    common = len(base) - 3
    if rollback_capacity(target) is not None:
        assert r2.stats.n_cached_tokens == len(base) - 4  # the checkpoint 4 tokens before the end
    else:
        assert r2.stats.n_cached_tokens == common  # an attention-only target trims its KV anywhere


def test_sampled_turns_with_reuse_are_distributed_as_plain(pair) -> None:
    """temperature > 0 on a conversation's second turn, one seed at a time: every sample reuses the
    slot, alternately right after the first turn (the slot holds the first turn: the prompt extends
    it) and right after another sample (a regenerate: a recurrent target restores the checkpoint at
    the end of the prompt, an attention-only one trims its KV), and the samples are distributed as
    plain llama-cpp-python's on that prompt. (At temperature 3 a few tokens take most of the mass:
    the chi-square test has cells to compare; at 12 the distribution is nearly uniform over the
    vocabulary, effective support ~350 of 384 tokens, and 150 samples could tell little apart.)"""
    path = pair[0]
    n, n_tok, temperature = 150, 3, 3.0
    # a pair of its own: slots that earlier tests filled from other engines (sessions) would make
    # the first hit drop the drafter's history (the forget path), and every later hit in that slot
    # again (a draft memory restarted past 0 reports no rows), re-decoding one more token
    target, draft = load(path)
    first = _helpers.tokenize(target, STARTS[0])
    plain = _helpers.plain_llama(path)
    try:
        with llama_mtp.Engine(target, draft, n_draft=3) as engine:
            reply = engine.submit(first, max_tokens=N).result().tokens
            second = first + reply + _helpers.tokenize(target, TURNS[1])
            samples, cached = [], []
            for seed in range(n):
                if seed % 2 == 0:
                    assert engine.submit(first, max_tokens=N).result().tokens == reply
                res = engine.submit(second, max_tokens=n_tok, seed=seed, temperature=temperature,
                                    **_helpers.SAMPLING).result()
                samples.append(res.tokens)
                cached.append(res.stats.n_cached_tokens)
        assert cached[0::2] == [len(first) + len(reply) - 1] * (n // 2), cached
        assert cached[1::2] == [len(second) - 1] * (n // 2), cached
        _helpers.assert_sampled_alike(samples, _helpers.plain_samples(plain, second, n, n_tok, temperature), n_tok)
    finally:
        plain.close()
        draft.close()
        target.close()
