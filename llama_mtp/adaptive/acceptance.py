"""What a sequence's drafts are worth: per-position acceptance estimates.

Expected tokens of a k-token draft: E(k) = 1 + sum_{i<k} prod_{j<=i} a_j, with a_j an
estimate of P(position j accepted | j-1 accepted), per sequence (``Acceptance``), starting
from what earlier sequences on the same target accepted (``AcceptancePrior``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from .probes import ProbeSchedule

# of acceptance: its estimate decides between options a few % apart near break-even, where
# 0.1 left a std of ~0.09 at a=0.8 (plain chosen on unlucky streaks); 0.05 halves the variance
ACCEPT_ALPHA = 0.05
# plain steps in a row after which the engine has the draft context forget all but FORGET_KEEP
# rows of a sequence's history (MtpSession.forget): below the draft context's n_ubatch (32),
# where process() would decode the backlog, so a long plain run costs no MTP rows per token
# (``Acceptance.pending``) and the next probe decodes at most FORGET_AT of them
FORGET_AT = 24
FORGET_KEEP = 8


class AcceptancePrior:
    """What earlier sequences on one target accepted, per position: where a new sequence starts.

    A chat's next turn, or the next request to a server, is mostly text of the same kind on
    the same model, so its first drafts are priced at what the last ones achieved instead of
    at a generic guess (measured: a fresh generate() spent its first ~15 of ~100 steps plain at
    a=0.8 re-learning that). The mean of every observation of every sequence, then a slow
    exponential average once 1/n drops below ALPHA.
    """

    ALPHA = 0.02

    def __init__(self) -> None:
        self.rates: List[float] = []
        self.n: List[int] = []

    def rate(self, j: int) -> Tuple[float, int]:
        """(estimate, observations) of position j; (0.0, 0) before any."""
        return (self.rates[j], self.n[j]) if j < len(self.n) else (0.0, 0)

    def observe(self, j: int, hit: int) -> None:
        while len(self.n) <= j:
            self.rates.append(0.0)
            self.n.append(0)
        self.n[j] += 1
        w = max(self.ALPHA, 1.0 / self.n[j])
        self.rates[j] += w * (hit - self.rates[j])


class Acceptance:
    """One sequence's per-position acceptance estimates, its probe schedule and catch-up debt.

    A plain mean with a prior first, then the exponential average (ACCEPT_ALPHA) once 1/n
    drops below it. The prior: what earlier sequences on the target accepted at that
    position (``AcceptancePrior``), counted as PRIOR_N_SHARED observations; without one,
    PRIOR_ACCEPT counted as PRIOR_N0 observations for position 0 and position 0's estimate
    as PRIOR_N for deeper positions, which are tested rarely and must not be written off
    after one or two misses. Position j is observed only when every earlier draft was
    accepted (censoring).
    """

    PRIOR_ACCEPT = 0.6
    PRIOR_N0 = 2  # one unlucky first miss must not end drafting on a short generation
    PRIOR_N = 3
    PRIOR_N_SHARED = 4  # a new text may differ from the last: a few of its own drafts outweigh it

    def __init__(self, k_max: int, prior: Optional[AcceptancePrior] = None) -> None:
        self.k_max = k_max
        self.prior = prior
        self.accept: List[float] = [self.PRIOR_ACCEPT] * k_max
        self.n_obs = [0] * k_max
        self.hits = [0] * k_max
        self.pending = 1          # rows the next draft decodes first: tokens committed since the last
        self.probes = ProbeSchedule()

    def rate(self, j: int) -> float:
        """Estimated P(draft position j accepted | positions < j accepted)."""
        n = self.n_obs[j]
        if n * ACCEPT_ALPHA >= 1:
            return self.accept[j]
        prior, weight = self._prior(j)
        return (self.hits[j] + weight * prior) / (n + weight)

    def _prior(self, j: int) -> Tuple[float, float]:
        """(value, weight in observations) of position j's prior."""
        value, weight = (self.PRIOR_ACCEPT, self.PRIOR_N0) if j == 0 else (self.rate(0), self.PRIOR_N)
        shared, n = self.prior.rate(j) if self.prior is not None else (0.0, 0)
        if n:  # earlier sequences' rate, blended with the generic prior while they saw little
            value = (n * shared + weight * value) / (n + weight)
            weight = min(self.PRIOR_N_SHARED, n + weight)
        return value, weight

    def stderr(self, j: int) -> float:
        a, n = self.rate(j), self.n_obs[j]
        n_eff = (2 - ACCEPT_ALPHA) / ACCEPT_ALPHA if n * ACCEPT_ALPHA >= 1 else n + self._prior(j)[1]
        return (a * (1 - a) / n_eff) ** 0.5

    def expected_tokens(self, k_hi: int, optimistic_at: int = -1) -> List[float]:
        """E(k) for k = 0..k_hi; position ``optimistic_at`` one standard error more hopeful."""
        out, total, run = [1.0], 1.0, 1.0
        for j in range(k_hi):
            a = self.rate(j)
            if j == optimistic_at:
                a = min(1.0, a + self.stderr(j))
            run *= a
            total += run
            out.append(total)
        return out

    def observe(self, k: int, n_accepted: int) -> None:
        """A finished step of this sequence: k drafted, n_accepted of them kept."""
        self.probes.observe(k, n_accepted)
        self.pending = n_accepted + 1 if k > 0 else self.pending + 1
        for j in range(min(k, n_accepted + 1)):
            hit = 1 if j < n_accepted else 0
            early = self.n_obs[j] * ACCEPT_ALPHA < 1
            self.n_obs[j] += 1
            self.hits[j] += hit
            # the early mean hands its value over to the exponential average
            self.accept[j] = self.rate(j) if early else (1 - ACCEPT_ALPHA) * self.accept[j] + ACCEPT_ALPHA * hit
            if self.prior is not None:
                self.prior.observe(j, hit)
