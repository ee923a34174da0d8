"""n_draft="auto": choose each step's draft length from what the session observes.

Expected tokens per second of a step with k drafts is
    E(k) / (verify(k+1) + draft(k)),   E(k) = 1 + sum_{i<k} prod_{j<=i} a_j,
with a_j a running estimate of P(position j accepted | j-1 accepted) and the
costs running averages of measured target verify decodes (by batch size) and
draft tokens. Costs never measured are extrapolated linearly from those that
were; a step with k=0 probes k=1 now and then so acceptance can recover when
the text changes character. All of it is a few float operations per step.
"""

from __future__ import annotations

from typing import List, Optional


class DraftPolicy:
    ALPHA = 0.15          # running-average weight: adapts within a few dozen tokens
    PROBE_EVERY = 16      # plain steps between k=1 probes
    PRIOR_ACCEPT = 0.6

    def __init__(self, k_max: int) -> None:
        self.k_max = k_max
        self.accept: List[float] = [self.PRIOR_ACCEPT] * k_max
        self.t_verify: List[Optional[float]] = [None] * (k_max + 2)  # index: batch size
        self.t_draft: Optional[float] = None                        # per draft token
        self.t_other: float = 0.0                                    # per step: sampling, Python
        self._n_verify = [0] * (k_max + 2)
        self._n_draft = 0
        self._since_probe = 0

    def choose(self, room: int) -> int:
        k_hi = max(0, min(self.k_max, room))
        if k_hi == 0:
            return 0
        best_k, best = 0, -1.0
        for k in range(k_hi + 1):
            rate = self.expected_tokens(k) / self.cost(k)
            if rate > best * 1.0001:
                best_k, best = k, rate
        if best_k == 0:
            self._since_probe += 1
            if self._since_probe >= self.PROBE_EVERY:
                self._since_probe = 0
                return 1
        else:
            self._since_probe = 0
        # measure each verify size twice (the first run is warm-up) before trusting extrapolations
        nxt = best_k + 1
        if nxt <= k_hi and self._n_verify[nxt + 1] < 2 and self.accept[best_k] > 0.5:
            return nxt
        return best_k

    def expected_tokens(self, k: int) -> float:
        total, run = 1.0, 1.0
        for j in range(k):
            run *= self.accept[j]
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
            return self.t_verify[n]  # type: ignore[return-value]
        if len(known) == 1:
            i, t = known[0]
            return t * (1.0 + 0.3 * (n - i) / max(1, i))
        (i0, t0), (i1, t1) = known[-2], known[-1]
        if n < i0:
            (i0, t0), (i1, t1) = known[0], known[1]
        slope = max(0.0, (t1 - t0) / (i1 - i0))
        return max(t0, t0 + slope * (n - i0))

    def observe(self, k: int, n_accepted: int, t_verify: float, t_draft: float, t_step: float) -> None:
        """One finished step: k drafted, n_accepted kept; its verify, draft and total times."""
        a = self.ALPHA
        self.t_other = (1 - a) * self.t_other + a * max(0.0, t_step - t_verify - t_draft)
        # the first run of a new batch shape pays llama.cpp's graph setup: a second one replaces it
        self._n_verify[k + 1] += 1
        old = self.t_verify[k + 1]
        self.t_verify[k + 1] = t_verify if old is None or self._n_verify[k + 1] == 2 else (1 - a) * old + a * t_verify
        if k > 0:
            per_token = t_draft / k
            self._n_draft += 1
            self.t_draft = per_token if self.t_draft is None or self._n_draft == 2 \
                else (1 - a) * self.t_draft + a * per_token
        # position j was tested only if every earlier draft was accepted
        for j in range(min(k, n_accepted + 1)):
            hit = 1.0 if j < n_accepted else 0.0
            self.accept[j] = (1 - a) * self.accept[j] + a * hit
