"""n_draft="auto": choose each step's draft length from what the session observes.

Expected tokens per second of a step with k drafts is
    E(k) / (verify(k+1) + draft(k)),   E(k) = 1 + sum_{i<k} prod_{j<=i} a_j,
with a_j a running estimate of P(position j accepted | j-1 accepted) and the
costs running averages of measured target verify decodes (by batch size) and
draft tokens. Costs never measured are extrapolated linearly from those that
were; a step with k=0 probes k=1 now and then so acceptance can recover when
the text changes character. All of it is a few float operations per step.

Acceptance starts as a plain mean with a prior: PRIOR_ACCEPT counted as one
observation for position 0 (two misses already say "stop drafting"), and position
0's estimate counted as PRIOR_N observations for deeper positions, which are tested
rarely and must not be written off after one or two misses. Once 1/n drops below
ALPHA it turns into the exponential average. A cost is only re-measured when its option is chosen, so
one slow outlier could lock an option out for good: single observations are
clipped to [1/2, 2] x the running value, and a verify of n tokens is never
assumed dearer than a measured verify of more tokens.
"""

from __future__ import annotations

from typing import List, Optional


class DraftPolicy:
    ALPHA = 0.1           # running-average weight: adapts within a few dozen tokens
    PROBE_EVERY = 12      # plain steps between k=1 probes
    PRIOR_ACCEPT = 0.6
    PRIOR_N = 3           # weight of position 0's estimate in a deeper position's prior
    EXPLORE_EVERY = 4     # steps between tries of a longer draft that might be better

    def __init__(self, k_max: int) -> None:
        self.k_max = k_max
        self.accept: List[float] = [self.PRIOR_ACCEPT] * k_max
        self._n_accept_obs = [0] * k_max
        self._hits = [0] * k_max
        self.t_verify: List[Optional[float]] = [None] * (k_max + 2)  # index: batch size
        self.t_draft: Optional[float] = None                        # per draft token
        self.t_other: float = 0.0                                    # per step: sampling, Python
        self._n_verify = [0] * (k_max + 2)
        self._n_draft = 0
        self._since_probe = 0
        self._n_choices = 0
        self._probing = False     # the step in flight is a probe
        self._probe_hit = False   # the last probe's draft was accepted

    def choose(self, room: int) -> int:
        k_hi = max(0, min(self.k_max, room))
        if k_hi == 0:
            return 0
        best_k, best = 0, -1.0
        rates = []
        for k in range(k_hi + 1):
            rate = self.expected_tokens(k) / self.cost(k)
            rates.append(rate)
            if rate > best * 1.0001:
                best_k, best = k, rate
        self._n_choices += 1
        nxt = best_k + 1
        # one token longer is tried now and then if it could be better: its deepest position is
        # only observed when it is drafted, so a low estimate from a few unlucky misses would
        # otherwise never recover (optimism in the face of uncertainty, one standard error)
        close = nxt <= k_hi and self._n_choices % self.EXPLORE_EVERY == 0 \
            and self.expected_tokens(nxt, optimistic=True) / self.cost(nxt) > best
        if best_k == 0:
            self._since_probe += 1
            if self._since_probe >= self.PROBE_EVERY or self._probe_hit or close:
                # a probe that hit is followed up at once: the text may have turned predictable
                self._since_probe = 0
                self._probe_hit = False
                self._probing = True
                return 1
        else:
            self._since_probe = 0
        # measure each verify size twice (the first run is warm-up) before trusting extrapolations
        if close or (nxt <= k_hi and self._n_verify[nxt + 1] < 2 and self.acceptance(best_k) > 0.5):
            return nxt
        return best_k

    def acceptance(self, j: int) -> float:
        """Estimated P(draft position j accepted | positions < j accepted)."""
        n = self._n_accept_obs[j]
        if n * self.ALPHA >= 1:
            return self.accept[j]
        prior, weight = (self.PRIOR_ACCEPT, 1) if j == 0 else (self.acceptance(0), self.PRIOR_N)
        return (self._hits[j] + weight * prior) / (n + weight)

    def acceptance_stderr(self, j: int) -> float:
        a, n = self.acceptance(j), self._n_accept_obs[j]
        n_eff = (2 - self.ALPHA) / self.ALPHA if n * self.ALPHA >= 1 else n + (1 if j == 0 else self.PRIOR_N)
        return (a * (1 - a) / n_eff) ** 0.5

    def expected_tokens(self, k: int, optimistic: bool = False) -> float:
        """Expected tokens of a k-token draft step; ``optimistic``: the deepest position's
        acceptance one standard error higher."""
        total, run = 1.0, 1.0
        for j in range(k):
            a = self.acceptance(j)
            if optimistic and j == k - 1:
                a = min(1.0, a + self.acceptance_stderr(j))
            run *= a
            total += run
        return total

    def cost(self, k: int) -> float:
        t_draft = self.t_draft if self.t_draft is not None else 0.1 * self._verify_cost(1)
        return self._verify_cost(k + 1) + k * t_draft + self.t_other

    def _verify_cost(self, n: int) -> float:
        known = [(i, t) for i, t in enumerate(self.t_verify) if t is not None]
        if not known:
            return 1.0 + 0.3 * (n - 1)  # arbitrary units until the first measurement
        if self.t_verify[n] is not None:
            return min(t for i, t in known if i >= n)
        if len(known) == 1:
            i, t = known[0]
            return t * (1.0 + 0.3 * (n - i) / max(1, i))
        (i0, t0), (i1, t1) = known[-2], known[-1]
        if n < i0:
            (i0, t0), (i1, t1) = known[0], known[1]
        slope = max(0.0, (t1 - t0) / (i1 - i0))
        return max(t0, t0 + slope * (n - i0))

    def observe(self, k: int, n_accepted: int, t_verify: float, t_draft: float, t_step: float,
                steady: bool = True) -> None:
        """One finished step: k drafted, n_accepted kept; its verify, draft and total times.

        ``steady``: the step before also drafted. The first draft after plain steps also
        decodes their deferred MTP rows, a cost that is not paid again while drafting goes on.
        """
        a = self.ALPHA
        if self._probing:
            self._probing = False
            self._probe_hit = k > 0 and n_accepted > 0
        self.t_other = (1 - a) * self.t_other + a * _clip(max(0.0, t_step - t_verify - t_draft), self.t_other)
        # the first run of a new batch shape pays llama.cpp's graph setup: a second one replaces it
        self._n_verify[k + 1] += 1
        old = self.t_verify[k + 1]
        self.t_verify[k + 1] = t_verify if old is None or self._n_verify[k + 1] == 2 \
            else (1 - a) * old + a * _clip(t_verify, old)
        if k > 0 and steady:  # until then: the prior (cost())
            per_token = t_draft / k
            self._n_draft += 1
            self.t_draft = per_token if self.t_draft is None or self._n_draft == 2 \
                else (1 - a) * self.t_draft + a * _clip(per_token, self.t_draft)
        # position j was tested only if every earlier draft was accepted
        for j in range(min(k, n_accepted + 1)):
            hit = 1 if j < n_accepted else 0
            early = self._n_accept_obs[j] * a < 1
            self._n_accept_obs[j] += 1
            self._hits[j] += hit
            # the early mean hands its value over to the exponential average
            self.accept[j] = self.acceptance(j) if early else (1 - a) * self.accept[j] + a * hit


def _clip(x: float, ref: float) -> float:
    """One observation moves a running value by a bounded factor (outliers on shared machines)."""
    return min(max(x, 0.5 * ref), 2.0 * ref) if ref > 0 else x
