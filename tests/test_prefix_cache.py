"""Conversations that stay warm: the Engine's and generate_many's slot cache.

Each turn resends the whole history; the slot that holds its prefix decodes only the rest
(recurrent targets restore a checkpoint). Every output is plain greedy's on the same prompt
tokens (history-dependent "context" models, margins asserted), hit or miss.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import llama_mtp
from llama_mtp import testing as T
from llama_mtp.checkpoint import rollback_capacity
from llama_mtp.testing.archs import ARCHS as GENERATED_ARCHS
from llama_mtp.prompt_cache import SlotCache, common_prefix

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


def reference(path: str, prompt: List[int], n: int = N, **llama_kwargs) -> List[int]:
    tokens, margins = T.reference_greedy(path, prompt, n, **llama_kwargs)
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
    server = ServerProcess(path, tmp_path / "server.log", "--n_parallel", "2", "--n_ctx", "1024", "--cache_ram_mib", "16",
                           chat_format=None)  # the GGUF's template, through llama.cpp's chat code
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
        # another conversation with the same system prompt: the chat template's message spans put a
        # checkpoint at the first one's user-message start (the default arch is hybrid: without it,
        # nothing within the shared prefix would be reusable)
        system = {"role": "system", "content": "You are a storyteller who always speaks in rhyme."}
        firsts = [client.chat.completions.create(model=str(path), messages=[system, {"role": "user", "content": c}],
                                                 max_tokens=8, temperature=0)
                  for c in ("Tell me a story", "Sing me a song")]
        assert firsts[0].usage.prompt_tokens_details.cached_tokens == 0
        assert 0 < firsts[1].usage.prompt_tokens_details.cached_tokens < firsts[1].usage.prompt_tokens - 4
        cold = client.chat.completions.create(model=str(path), messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"cache_prompt": False})
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        assert cold.choices[0].message.content == two.choices[0].message.content
        metrics = server.metrics()
        hits = sum(v for (name, _), v in metrics.items() if name == "llama_mtp:prefix_cache_hits_total")
        cached = sum(v for (name, _), v in metrics.items() if name == "llama_mtp:prompt_tokens_cached_total")
        assert hits == 3 and cached == (two.usage.prompt_tokens_details.cached_tokens + usage.prompt_tokens_details.cached_tokens
                                        + firsts[1].usage.prompt_tokens_details.cached_tokens)
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


SYSTEM = "Once upon a time there was a king who ruled the land of the far north with a heavy hand"
USERS = (" and every morning the queen walked along the river to the old mill by the bridge",
         " but one winter a dragon came down from the mountains and burned the harvest of the valley")


def test_a_user_message_start_checkpoints_the_shared_system_prompt(pair) -> None:
    """Two conversations with one system prompt, one after the other: the first prompt is checkpointed at
    its user message's start (llama-server's message spans), so on a recurrent target the second
    conversation resumes after the system prompt instead of decoding it again. Without the span,
    no checkpoint lies within the common prefix (those near the end are past it)."""
    path, target, draft = pair
    system = _helpers.tokenize(target, SYSTEM)
    first, second = (system + _helpers.tokenize(target, text)[1:] for text in USERS)  # [1:]: no second BOS
    assert common_prefix(first, second) == len(system) and len(first) - 16 > len(system)
    spans = [(len(system), len(first))], [(len(system), len(second))]
    recurrent = rollback_capacity(target) is not None
    for with_spans in (True, False):
        llama_mtp.generate(target, draft, "Unrelated words here", max_tokens=2)  # the slots start empty
        with llama_mtp.Engine(target, draft, n_draft=3) as engine:
            a = engine.submit(first, max_tokens=N, user_spans=spans[0] if with_spans else ()).result()
            b = engine.submit(second, max_tokens=N, user_spans=spans[1] if with_spans else ()).result()
        assert a.tokens == reference(path, first) and b.tokens == reference(path, second)
        if recurrent:
            assert b.stats.n_cached_tokens == (len(system) if with_spans else 0), with_spans
        else:
            assert b.stats.n_cached_tokens == len(system)  # an attention-only target trims its KV anywhere


def test_a_slot_another_conversation_takes_is_saved_whole_and_comes_back(pair) -> None:
    """Host-memory cache with chat spans: a conversation with the same (long) system prompt takes a
    slot and keeps over half of what it holds, so llama-server's rule (save under half kept) would
    drop the first conversation's turn; knowing where its last user message ends, the cache saves
    it, with its checkpoints, and its next turn (diverging inside the reply, as a re-rendered
    history does) gets it back: the attention-only target to the divergence, the recurrent one to
    the checkpoint at its prompt's end. Exact either way."""
    path, target, draft = pair
    system = _helpers.tokenize(target, SYSTEM + " and his three sons rode out every spring to hunt in the forest")
    users = [_helpers.tokenize(target, text)[1:] for text in
             (" queens walked to the mill", " dragons burned the harvest", " rivers froze in May")]
    firsts = [system + u for u in users]
    assert all(common_prefix(a, b) == len(system) for a, b in zip(firsts, firsts[1:]))
    more = _helpers.tokenize(target, " What happened next?")[1:]
    recurrent = rollback_capacity(target) is not None
    for with_spans in (True, False):
        llama_mtp.generate(target, draft, "Unrelated words here", max_tokens=2)  # the slots start empty
        with llama_mtp.Engine(target, draft, n_draft=3, cache_ram_mib=64) as engine:
            def submit(prompt: List[int], user_starts: List[int]) -> llama_mtp.GenerationResult:
                ends = user_starts[1:] + [len(prompt)]
                spans = list(zip(user_starts, ends)) if with_spans else []
                return engine.submit(prompt, max_tokens=N, user_spans=spans).result()

            replies = [submit(p, [len(system)]) for p in firsts]
            restores = engine._core.cache.stats.ram_restores
            second = firsts[0] + replies[0].tokens[:N - 3] + more
            again = submit(second, [len(system), len(firsts[0]) + N - 3])
            restores = engine._core.cache.stats.ram_restores - restores
        assert [r.tokens for r in replies] == [reference(path, p) for p in firsts]
        assert again.tokens == reference(path, second)
        assert (len(firsts[0]) + N - 1) / 2 < len(system)  # what the slot held: llama-server's rule keeps it
        whole = len(firsts[0]) - 1 if recurrent else len(firsts[0]) + N - 3
        if with_spans or recurrent:  # (a recurrent target without spans keeps nothing: saved as well)
            assert (again.stats.n_cached_tokens, restores) == (whole, 1), with_spans
        else:
            assert (again.stats.n_cached_tokens, restores) == (len(system), 0)


@pytest.mark.parametrize("swa_full", [True, False])
def test_a_sliding_window_target_reuses_only_what_its_window_holds(swa_full, model_dir) -> None:
    """mimo2 (sliding window 128): llama-cpp-python's default full-size SWA cache keeps every
    position, so a prompt may reuse any common prefix. With ``swa_full=False`` the window layers keep
    only the last positions (llama-server's default): a prefix that ends before what they hold
    leaves the next token without its window, so it is decoded again (llama-server's pos_min
    check); one ending inside the window is reused. Exact either way."""
    import random

    path = _helpers.build_model(T.TestModelSpec(recipe="context", arch="mimo2"), model_dir)
    target, draft = _helpers.load_pair(path, n_seq=2, n_ctx=2048, swa_full=swa_full)
    rng = random.Random(1)
    words = [rng.randrange(10, 300) for _ in range(1300)]
    first = words[:900]
    far, near = first[:100] + words[900:1200], first[:850] + words[1200:1300]  # diverging before / inside the window
    try:
        for prompt, shared in ((far, 100), (near, 850)):
            llama_mtp.generate(target, draft, "Unrelated words here", max_tokens=2)  # the slots start empty
            with llama_mtp.Engine(target, draft, n_draft=3) as engine:
                a = engine.submit(first, max_tokens=N).result()
                b = engine.submit(prompt, max_tokens=N).result()
            assert a.tokens == reference(path, first, n_ctx=2048) and b.tokens == reference(path, prompt, n_ctx=2048)
            window_holds_it = swa_full or shared == 850
            assert b.stats.n_cached_tokens == (shared if window_holds_it else 0), (shared, swa_full)
    finally:
        draft.close()
        target.close()


def test_a_prefix_another_slot_decodes_is_copied_not_decoded_again(pair) -> None:
    """Two conversations with one system prompt at once, in two slots: the second copies the
    system prompt from the first's slot (KV with llama_memory_seq_cp; a recurrent state from the
    checkpoint at the first's user-message start), waiting for it if it is not decoded yet, rather
    than decoding it too. Exact; cached_tokens counts the copy."""
    path, target, draft = pair
    system = _helpers.tokenize(target, SYSTEM + " and his three sons rode out every spring to hunt in the forest")
    prompts = [system + _helpers.tokenize(target, text)[1:] for text in USERS]
    for wait in (True, False):
        llama_mtp.generate(target, draft, "Unrelated words here", max_tokens=2)  # the slots start empty
        with llama_mtp.Engine(target, draft, n_draft=3) as engine:
            first = engine.submit(prompts[0], max_tokens=N if wait else 1, user_spans=[(len(system), len(prompts[0]))])
            if not wait:
                first.result()  # the first prompt is decoded (and its slot free) before the second comes
            second = engine.submit(prompts[1], max_tokens=N, user_spans=[(len(system), len(prompts[1]))])
            a, b = first.result(), second.result()
            stats = engine._core.cache.stats
        if wait:
            assert a.tokens == reference(path, prompts[0])
        assert b.tokens == reference(path, prompts[1])
        assert (a.stats.n_cached_tokens, b.stats.n_cached_tokens) == (0, len(system)), wait
        assert stats.hits >= 1


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


def every_arch_pair(arch: str, model_dir) -> Tuple[str, llama_mtp.MtpTargetLlama, Any]:
    """A history-dependent pair of ``arch`` in 2 slots: its own MTP heads, or (gemma4) the
    assistant GGUF that drafts on the target's KV."""
    spec = T.TestModelSpec(recipe="context", arch=arch)
    with _helpers.models_cache(model_dir):
        if arch == "gemma4":
            from llama_mtp.testing.archs import gemma4
            path, assistant, _ = gemma4.cached_gemma4_pair(spec)
            return str(path), *_helpers.load_pair(path, n_seq=2, n_ctx=1024, draft_model_path=str(assistant))
        path = T.cached_test_model(spec)
    return str(path), *_helpers.load_pair(path, n_seq=2, n_ctx=1024)


OPENINGS = (" queens walked to the mill by the river", " dragons burned the harvest of the valley",
            " rivers froze in the middle of May", " wolves sang under the silver moon",
            " merchants sailed across the western sea", " children built a tower of sand")


def shared_openings(path: str, target: llama_mtp.MtpTargetLlama, system: List[int],
                    more: List[int]) -> List[Tuple[List[int], List[int], List[int], List[int]]]:
    """Three conversations over ``system`` (first prompt, its greedy reply, second prompt, its reply),
    openings whose references have a near-tie anywhere skipped (batched and single decodes may differ
    by ~1e-2 in logits)."""
    out = []
    for text in OPENINGS:
        first = system + _helpers.tokenize(target, text)[1:]
        reply, margins = T.reference_greedy(path, first, N)
        second = first + reply + more
        reply2, margins2 = T.reference_greedy(path, second, N)
        if min(margins.min(), margins2.min()) > 1e-2:
            out.append((first, reply, second, reply2))
        if len(out) == 3:
            return out
    pytest.fail("fewer than 3 conversations without near-ties on this model")


@pytest.mark.parametrize("arch", sorted(GENERATED_ARCHS))
def test_every_arch_keeps_conversations_warm_and_exact(arch, model_dir) -> None:
    """Every arch the generator has: three conversations with one system prompt over two slots and
    a host-memory cache. The second opens while the first is decoded and copies the system prompt
    from its slot; the third takes a slot another conversation held (saved to RAM); each second
    turn extends its first turn and finds it whole, in its slot or in RAM. Every reply is plain
    greedy's on the same tokens."""
    path, target, draft = every_arch_pair(arch, model_dir)
    system = _helpers.tokenize(target, SYSTEM)
    more = _helpers.tokenize(target, " What happened next?")[1:]

    def spans(prompt: List[int], starts: List[int]) -> List[Tuple[int, int]]:
        return list(zip(starts, starts[1:] + [len(prompt)]))

    try:
        convs = shared_openings(path, target, system, more)
        firsts = [first for first, _, _, _ in convs]
        with llama_mtp.Engine(target, draft, n_draft=3, cache_ram_mib=64) as engine:
            opened = [engine.submit(p, max_tokens=N, user_spans=spans(p, [len(system)])) for p in firsts[:2]]
            ones = [h.result() for h in opened] + [
                engine.submit(firsts[2], max_tokens=N, user_spans=spans(firsts[2], [len(system)])).result()]
            twos = [engine.submit(second, max_tokens=N, user_spans=spans(second, [len(system), len(first) + N])).result()
                    for first, _, second, _ in convs]
            stats = engine._core.cache.stats
        assert [r.tokens for r in ones] == [reply for _, reply, _, _ in convs]
        assert [r.tokens for r in twos] == [reply2 for _, _, _, reply2 in convs]
        assert ones[1].stats.n_cached_tokens == len(system)  # copied from the first one's slot
        assert [r.stats.n_cached_tokens for r in twos] == [len(f) + N - 1 for f in firsts], stats
        assert stats.ram_saves >= 1 and stats.ram_restores >= 1, stats
    finally:
        draft.close()
        target.close()


def test_a_long_prompt_is_checkpointed_every_min_step_tokens(pair) -> None:
    """A prompt without chat spans gets a recurrent checkpoint every ``checkpoint_min_step`` tokens
    (llama-server's --checkpoint-min-step spacing): a later prompt diverging far from the end resumes
    from the last one before the divergence, where otherwise only checkpoints near the end exist."""
    import random

    path, target, draft = pair
    rng = random.Random(7)
    words = [rng.randrange(10, 300) for _ in range(200)]
    first, second = words[:120], words[:70] + words[120:170]
    recurrent = rollback_capacity(target) is not None
    for step, expected in ((32, 64 if recurrent else 70), (8192, 0 if recurrent else 70)):
        llama_mtp.generate(target, draft, "Unrelated words here", max_tokens=2)  # the slots start empty
        with llama_mtp.Engine(target, draft, n_draft=3, checkpoint_min_step=step) as engine:
            a = engine.submit(first, max_tokens=N).result()
            b = engine.submit(second, max_tokens=N).result()
        assert a.tokens == reference(path, first) and b.tokens == reference(path, second)
        assert b.stats.n_cached_tokens == expected, step
