"""n_draft="auto": the DraftPolicy against a simulated session with known costs.

Costs are those measured on the benchmark model (2-core CPU, ms): a verify decode of
n tokens, a draft token, and the per-step rest. Acceptance is iid per position with a
rate that may change mid-text. The simulation is seeded, so every number is fixed.
"""

from __future__ import annotations

import random
from typing import Callable, List, Tuple

import pytest

from llama_mtp.adaptive import DraftPolicy

VERIFY_MS = {1: 85.0, 2: 89.0, 3: 92.0, 4: 96.0, 5: 150.0}  # a 5-token batch takes a slower path
DRAFT_MS = 11.5
OTHER_MS = 0.3
K_MAX = 4


def step_cost(k: int) -> float:
    return VERIFY_MS[k + 1] + k * DRAFT_MS + OTHER_MS


def expected_rate(a: float, k: int) -> float:
    """Tokens per ms of fixed draft length k at iid acceptance a."""
    tokens = sum(a ** i for i in range(k + 1))
    return tokens / step_cost(k)


def best_fixed_rate(a: float) -> float:
    return max(expected_rate(a, k) for k in range(K_MAX + 1))


def simulate(accept_at: Callable[[int], float], n_tokens: int, seed: int) -> Tuple[float, List[Tuple[int, int]]]:
    """Run the policy for n_tokens: (tokens per ms, [(token index, chosen k)] per step)."""
    rng = random.Random(seed)
    policy = DraftPolicy(K_MAX)
    produced, elapsed, k_prev = 0, 0.0, 0
    choices: List[Tuple[int, int]] = []
    while produced < n_tokens:
        k = policy.choose(room=10**6)
        choices.append((produced, k))
        a = accept_at(produced)
        n_acc = 0
        while n_acc < k and rng.random() < a:
            n_acc += 1
        t_verify, t_draft = VERIFY_MS[k + 1], k * DRAFT_MS
        t_step = t_verify + t_draft + OTHER_MS
        policy.observe(k, n_acc, t_verify / 1e3, t_draft / 1e3, t_step / 1e3, steady=k_prev > 0)
        elapsed += t_step
        produced += n_acc + 1
        k_prev = k
    return produced / elapsed, choices


@pytest.mark.parametrize("a", [0.0, 0.3, 0.6, 0.8, 0.9, 1.0])
def test_auto_is_close_to_the_best_fixed_length(a):
    """Over 2000 tokens, auto reaches >= 0.95 of the best fixed n_draft (0 = plain) for that
    acceptance, exploration and probes included."""
    rates = [simulate(lambda _: a, 2000, seed)[0] for seed in range(3)]
    ratio = sum(rates) / len(rates) / best_fixed_rate(a)
    assert ratio >= 0.95, (a, ratio)


def _first_settled(choices, start, want: Callable[[int], bool], run: int = 3) -> int:
    """Tokens after `start` until `run` consecutive steps satisfy want(k)."""
    streak = 0
    for tok, k in choices:
        if tok < start:
            continue
        streak = streak + 1 if want(k) else 0
        if streak == run:
            return tok - start
    return 10**9


def test_auto_adapts_within_a_few_dozen_tokens():
    """Predictable text (a=0.9), then unpredictable (a=0), then predictable again."""
    switch1, switch2 = 300, 600
    phase = lambda i: 0.9 if i < switch1 or i >= switch2 else 0.0  # noqa: E731
    for seed in range(5):
        _, choices = simulate(phase, 900, seed)
        warm = _first_settled(choices, 0, lambda k: k >= 2)
        stop = _first_settled(choices, switch1, lambda k: k == 0)
        resume = _first_settled(choices, switch2, lambda k: k >= 1)
        # measured over 30 seeds: warm-up 4-11 tokens, stop 20-28, resume 4-25
        assert warm <= 16 and stop <= 36 and resume <= 36, (seed, warm, stop, resume)


def test_plain_text_costs_few_drafts():
    """At a=0 the policy drafts in the first steps and in probes only (one k=1 probe per
    PROBE_EVERY plain steps), so it runs within 5% of plain."""
    rate, choices = simulate(lambda _: 0.0, 1000, seed=1)
    drafting = sum(1 for _, k in choices if k > 0)
    assert drafting <= 1000 / DraftPolicy.PROBE_EVERY + 10
    assert rate >= 0.95 * expected_rate(0.0, 0)


def test_an_outlier_cannot_lock_out_plain_steps():
    """One very slow plain decode must not make the policy draft forever at a=0."""
    policy = DraftPolicy(K_MAX)
    for _ in range(30):
        k = policy.choose(room=10**6)
        policy.observe(k, 0, VERIFY_MS[k + 1] / 1e3, k * DRAFT_MS / 1e3, step_cost(k) / 1e3, steady=True)
    policy.observe(0, 0, 10 * VERIFY_MS[1] / 1e3, 0.0, 10 * VERIFY_MS[1] / 1e3)  # a stall
    later = [policy.choose(room=10**6) for _ in range(1)]
    for _ in range(40):
        k = policy.choose(room=10**6)
        later.append(k)
        policy.observe(k, 0, VERIFY_MS[k + 1] / 1e3, k * DRAFT_MS / 1e3, step_cost(k) / 1e3, steady=True)
    assert later[-10:].count(0) >= 9, later
