"""n_draft="auto": each step's draft lengths from measured costs and estimated acceptance.

The policy maximises goodput, expected tokens per second of the next step, over
k in {0 .. k_max} per sequence (k = 0 is plain decoding). With N sequences in one
verify decode it maximises the batch's tokens per second jointly, so each
sequence's verify rows are priced at what they add to the shared decode.

Expected tokens of a k-token draft: E(k) = 1 + sum_{i<k} prod_{j<=i} a_j, with a_j an
estimate of P(position j accepted | j-1 accepted), per sequence (``Acceptance``).

Costs (``StepCosts``, one per engine, shared by its sequences) are measured on the
machine at hand, never assumed:

* the target step without drafting (decode, drafter bookkeeping, sampling, Python) by
  the number of verify rows, a table with monotone interpolation, because real
  kernels have steps (a 5-row batch taking a slower path was measured);
* drafting, least squares on t = c_pos * positions + c_row * rows: the own loop runs
  one draft-context decode per draft position for all sequences in lockstep, and the
  first one also carries each sequence's deferred catch-up rows (one per token
  committed since its last draft). So plain steps are charged the catch-up they defer,
  and a GPU-like machine (launch-bound: c_pos >> c_row) learns that a second sequence
  drafting alongside a first is nearly free.

Estimates go stale when they are never re-measured: a slow first measurement of an
option could lock it out. So single observations are clipped to [1/2, 2] x the
running value, the first run of a new batch shape (graph setup) is replaced by the
second, and an option whose estimate is within STALE_MARGIN of the best and whose
cost was last measured more than STALE_STEPS choices ago is run once to refresh it.

When plain decoding is best, a sequence probes k=1 now and then so acceptance can
recover when the text changes character. Probes back off exponentially (PROBE_MIN
to PROBE_MAX plain steps) while they miss, so at acceptance 0 they cost well under
1% of the time in the long run; a hit is followed up at once, and two hits in a row
reset the back-off.

Exactness is untouched: this module only chooses lengths. It is pure Python,
a few hundred float operations per step, and tested on a seeded simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

ALPHA = 0.1  # running-average weight of costs: adapts within a few dozen observations
# of acceptance: its estimate decides between options a few % apart near break-even, where
# 0.1 left a std of ~0.09 at a=0.8 (plain chosen on unlucky streaks); 0.05 halves the variance
ACCEPT_ALPHA = 0.05


def _clip(x: float, ref: float) -> float:
    """One observation moves a running value by a bounded factor (outliers on shared machines)."""
    return min(max(x, 0.5 * ref), 2.0 * ref) if ref > 0 else x


class RowTable:
    """A decode's time by row count: running averages where measured, interpolated between.

    Costs never decrease with rows: an estimate is at most the cheapest measured larger
    batch and at least the dearest measured smaller one (when those disagree, noise,
    the larger batch wins). Unmeasured row counts are interpolated linearly between
    measured neighbours and extrapolated with the slope of the two nearest (>= 0).
    """

    def __init__(self, prior: Callable[[int], float]) -> None:
        self._prior = prior
        self.value: dict = {}   # rows -> seconds
        self.count: dict = {}   # rows -> observations
        self.last: dict = {}    # rows -> choice counter at the last observation
        self._memo: dict = {}   # rows -> estimate: plan() asks for the same few row counts many times a step

    def observe(self, n: int, t: float, now: int = 0) -> None:
        self._memo.clear()
        c = self.count.get(n, 0) + 1
        self.count[n] = c
        self.last[n] = now
        old = self.value.get(n)
        # the first run of a new batch shape pays llama.cpp's graph setup: a second one replaces it
        self.value[n] = t if old is None or c == 2 else (1 - ALPHA) * old + ALPHA * _clip(t, old)

    def measured(self, n: int) -> bool:
        return n in self.value

    def lower_bound(self, n: int) -> float:
        """The least n rows can cost by what is measured: the dearest smaller batch (costs never
        decrease with rows); the estimate itself where nothing smaller is measured."""
        below = [v for m, v in self.value.items() if m < n]
        return max(below) if below else self(n)

    def __call__(self, n: int) -> float:
        t = self._memo.get(n)
        if t is None:
            t = self._memo[n] = self._estimate(n)
        return t

    def _estimate(self, n: int) -> float:
        if not self.value:
            return self._prior(n)
        keys = sorted(self.value)
        if n in self.value:
            t = self.value[n]
        else:
            lo = [k for k in keys if k < n]
            hi = [k for k in keys if k > n]
            if lo and hi:
                (i0, i1) = lo[-1], hi[0]
                t0, t1 = self.value[i0], self.value[i1]
                t = t0 + (t1 - t0) * (n - i0) / (i1 - i0)
            elif len(keys) == 1:
                i0 = keys[0]
                t = self.value[i0] * self._prior(n) / self._prior(i0)
            else:
                (i0, i1) = (keys[-2], keys[-1]) if lo else (keys[0], keys[1])
                t0, t1 = self.value[i0], self.value[i1]
                slope = max(0.0, (t1 - t0) / (i1 - i0))
                t = max(min(t0, t1) if not lo else t1, (t1 if lo else t0) + slope * (n - (i1 if lo else i0)))
        above = [self.value[k] for k in keys if k > n]
        below = [self.value[k] for k in keys if k < n]
        if below:
            t = max(t, max(below))
        if above:
            t = min(t, min(above))
        return t


class LinearCost:
    """t = c_pos * positions + c_row * rows, fitted by exponentially weighted least squares.

    Two pseudo-observations, scaled from the first real one (c_row = ROW_SHARE * c_pos),
    keep the fit defined while every observation has the same shape; they are
    forgotten at the rate ALPHA as real ones come in. ``n == 0``: nothing measured.
    """

    ROW_SHARE = 0.25

    def __init__(self) -> None:
        # normal equations of the weighted fit: [[pp, pr], [pr, rr]] c = [pt, rt]
        self._pp, self._pr, self._rr, self._pt, self._rt = 0.0, 0.0, 0.0, 0.0, 0.0
        self.n = 0
        self._coef: Optional[Tuple[float, float]] = None  # solved once per observation, not per query

    def _add(self, p: float, r: float, t: float) -> None:
        self._pp += p * p
        self._pr += p * r
        self._rr += r * r
        self._pt += p * t
        self._rt += r * t

    def observe(self, positions: int, rows: int, t: float) -> None:
        if positions <= 0:
            return
        self._coef = None
        self.n += 1
        if self.n <= 2:
            # the first draft decode pays graph setup (and a cold cache): the second replaces it
            self._pp = self._pr = self._rr = self._pt = self._rt = 0.0
            c_pos = t / (positions + self.ROW_SHARE * rows)
            self._add(1.0, 0.0, c_pos)
            self._add(1.0, 1.0, c_pos * (1 + self.ROW_SHARE))
        else:
            t = _clip(t, self(positions, rows))
            for name in ("_pp", "_pr", "_rr", "_pt", "_rt"):
                setattr(self, name, (1 - ALPHA) * getattr(self, name))
        self._add(float(positions), float(rows), t)
        self._coef = None

    def coefficients(self) -> Tuple[float, float]:
        if self._coef is None:
            self._coef = self._solve()
        return self._coef

    def _solve(self) -> Tuple[float, float]:
        det = self._pp * self._rr - self._pr * self._pr
        if self.n == 0:
            return 0.0, 0.0
        if det <= 1e-9 * self._pp * self._rr:
            # every observation had rows proportional to positions: all of it per position
            return max(0.0, (self._pt + self._rt) / (self._pp + self._pr)), 0.0
        c_pos = (self._pt * self._rr - self._rt * self._pr) / det
        c_row = (self._rt * self._pp - self._pt * self._pr) / det
        # a negative coefficient is noise in a nearly collinear fit: fold it into the other one
        if c_row < 0:
            return max(0.0, (self._pt + self._rt) / (self._pp + self._pr)), 0.0
        if c_pos < 0:
            return 0.0, max(0.0, (self._pt + self._rt) / (self._pr + self._rr))
        return c_pos, c_row

    def __call__(self, positions: int, rows: int) -> float:
        if positions <= 0:
            return 0.0
        c_pos, c_row = self.coefficients()
        return c_pos * positions + c_row * rows


Runs = Tuple[Tuple[int, int], ...]  # a step's verify runs in batch order: (seq id, rows), one per sequence


@dataclass(frozen=True)
class UbatchSplit:
    """How the target's llama_decode cuts a batch into ubatches, each one pass over the model.

    llama.cpp's ``llama_batch_allocr::split_equal`` (hybrid and recurrent memories always; an
    attention KV cache with one stream per sequence, i.e. ``kv_unified=False`` and n_seq > 1):
    every sequence in a ubatch contributes the same number of rows, so a 4-sequence step with
    row counts [2, 1, 1, 1] costs two passes, [1, 1, 1, 1] then [1] (measured on the fast model:
    17.5 ms against 10.5 ms for [1, 1, 1, 1] and 6.5 ms for one row). ``sequential``: a ubatch
    holds consecutive seq ids only. ``keep_tail``: a hybrid target keeps each sequence's last
    n_rs_seq + 1 rows in one ubatch (its rollback snapshots). Otherwise one ubatch per n_ubatch rows.
    """

    equal: bool = False
    sequential: bool = False
    keep_tail: int = 0
    n_ubatch: int = 512

    def ubatches(self, runs: Runs) -> List[int]:
        """Rows of each ubatch the target decodes for ``runs`` (upstream's algorithm, run by run)."""
        total = sum(n for _, n in runs)
        if not self.equal or len(runs) <= 1 and total <= self.n_ubatch:
            return [min(self.n_ubatch, total - i) for i in range(0, total, self.n_ubatch)] or [0]
        used = [0] * len(runs)
        out: List[int] = []
        while True:
            # the sequences of this ubatch: each with unused rows (consecutive ids when sequential)
            cur: List[int] = []
            last = -1
            for r, (sid, n) in enumerate(runs):
                if used[r] >= n or (self.sequential and cur and sid != last + 1):
                    continue
                cur.append(r)
                last = sid
                if len(cur) > self.n_ubatch:
                    break
            if not cur:
                return out
            take = [0] * len(cur)
            while all(used[r] + take[j] < runs[r][1] for j, r in enumerate(cur)):
                take = [t + 1 for t in take]
                if (take[0] + 1) * len(cur) > self.n_ubatch:
                    break
            if self.keep_tail > 0:
                def rem(j: int) -> int:
                    return runs[cur[j]][1] - used[cur[j]] - take[j]
                n_keep = 0
                while n_keep < len(cur) and not (0 != rem(n_keep) < self.keep_tail):
                    n_keep += 1
                if n_keep == 0:  # the first sequence alone: to its end, or leaving keep_tail rows
                    if take[0] + rem(0) <= self.n_ubatch:
                        take[0] += rem(0)
                    else:
                        while rem(0) < self.keep_tail:
                            take[0] -= 1
                    n_keep = 1
                cur, take = cur[:n_keep], take[:n_keep]
            for j, r in enumerate(cur):
                used[r] += take[j]
            out.append(sum(take))


def runs_of(rows: Union[int, Runs]) -> Runs:
    """One sequence's row count as runs, or the runs themselves."""
    return ((0, rows),) if isinstance(rows, int) else tuple(rows)


class StepCosts:
    """What one step costs on this machine: the verify step by its ubatches, and drafting; plus
    what earlier sequences on this target accepted (``accepted``, their successors' prior).

    ``step`` is the time of a one-ubatch step by rows. A step that llama.cpp splits into several
    ubatches is priced as the sum of theirs, times ``split_factor``: the running ratio of what
    such steps took to that sum (one step's bookkeeping and sampling counted once, not per pass).
    """

    def __init__(self, split: Optional[UbatchSplit] = None) -> None:
        # arbitrary units until the first measurement; they only order the first choices
        self.step = RowTable(lambda n: 1.0 + 0.3 * (n - 1))
        self.draft = LinearCost()
        self.split = split or UbatchSplit()
        self.split_factor = 1.0
        self.n_split = 0
        self.clock = 0  # choices made: the age of a measurement
        self.hold: Optional[Tuple[Any, int]] = None  # (batch, clock): plain held until then (plan)
        self.n_held = 0  # choices made under a hold
        self.tried: dict = {}  # rows -> tries of a one-pass shape chosen for its cost's lower bound
        self.accepted = AcceptancePrior()
        self._shapes: dict = {}  # runs -> ubatch rows (a pure function of the runs: kept)

    def ubatches(self, runs: Runs) -> List[int]:
        u = self._shapes.get(runs)
        if u is None:
            if len(self._shapes) >= 4096:  # a server's slots see many shapes over time: bounded
                self._shapes.clear()
            u = self._shapes[runs] = self.split.ubatches(runs)
        return u

    def step_cost(self, rows: Union[int, Runs]) -> float:
        """Estimated seconds of a step without drafting: one run per sequence, (seq id, rows)."""
        u = self.ubatches(runs_of(rows))
        return self.step(max(1, u[0])) if len(u) == 1 else self.split_factor * sum(self.step(max(1, n)) for n in u)

    def draft_cost(self, positions: int, rows: int) -> float:
        if positions <= 0:
            return 0.0
        # until measured: a draft decode at a fifth of a plain step; one measurement alone (graph
        # setup, cold caches) is only an upper bound, or a slow first draft would stop drafting
        prior = 0.2 * self.step(1) * (positions + LinearCost.ROW_SHARE * rows)
        if self.draft.n == 0:
            return prior
        if self.draft.n == 1:
            return min(prior, self.draft(positions, rows))
        return self.draft(positions, rows)

    def observe(self, rows: Union[int, Runs], t_step: float, positions: int, draft_rows: int, t_draft: float) -> None:
        """One finished step: its verify runs (or one sequence's rows) and its time without
        drafting; its draft shape and time."""
        u = self.ubatches(runs_of(rows))
        if len(u) == 1:
            self.step.observe(max(1, u[0]), t_step, self.clock)
        else:
            ratio = t_step / sum(self.step(max(1, n)) for n in u)
            self.n_split += 1
            self.split_factor = ratio if self.n_split <= 2 else (
                (1 - ALPHA) * self.split_factor + ALPHA * _clip(ratio, self.split_factor))
        self.draft.observe(positions, draft_rows, t_draft)


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
    """One sequence's per-position acceptance estimates, probes and catch-up debt.

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
        self.since_probe = 0
        self.probe_gap = PROBE_MIN
        self.probing = False      # the step in flight is a probe
        self.hit_streak = 0       # consecutive probe hits
        self.follow_up = False    # the last probe hit: probe again at once
        self.n_choices = 0

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
        if self.probing:
            self.probing = False
            hit = k > 0 and n_accepted > 0
            self.follow_up = hit
            self.hit_streak = self.hit_streak + 1 if hit else 0
            if self.hit_streak >= 2:
                self.probe_gap = PROBE_MIN
            elif not hit:
                self.probe_gap = min(PROBE_MAX, 2 * self.probe_gap)
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


PROBE_MIN = 8      # plain steps before the first k=1 probe
PROBE_MAX = 64     # longest gap between probes: recovery within ~70 tokens, < 1% of time at a=0
PROBE_BUDGET = 0.02  # most of the time since the last probe that a probe may cost
PROBE_BUDGET_CAP = 4 * PROBE_MAX  # plain steps after which a probe is due whatever the budget says
EXPLORE_EVERY = 4  # choices between tries of a longer draft that might be better
STALE_STEPS = 48   # a near-best option not measured for this many choices is refreshed once
STALE_MARGIN = 0.9
EVIDENCE = 2       # drafts a sequence has had judged before its acceptance may justify a try
HOLD_MARGIN = 0.95  # plain is held (the search skipped) while drafting is this much worse...
HOLD_STEPS = 8      # ...for this many choices, or until a probe is due
# plain steps in a row after which the engine has the draft context forget all but FORGET_KEEP
# rows of a sequence's history (MtpSession.forget): below the draft context's n_ubatch (32),
# where process() would decode the backlog, so a long plain run costs no MTP rows per token
# and the next probe decodes at most FORGET_AT of them
FORGET_AT = 24
FORGET_KEEP = 8


@dataclass
class DraftChoice:
    """One sequence's input to a step's plan."""

    acceptance: Acceptance
    room: int                     # most draft tokens this sequence may take now
    seq_id: Optional[int] = None  # its slot (the batch's order and ubatch split); None: its index


def plan(choices: Sequence[DraftChoice], costs: StepCosts, k_max: int,
         fixed: Sequence[Tuple[int, int]] = ()) -> List[int]:
    """Draft lengths for the ``auto`` sequences of one step.

    ``fixed``: (seq id, k) of the step's other sequences (a fixed k, or plain decoding).
    """
    costs.clock += 1
    n = len(choices)
    if n == 0:
        return []
    his = [max(0, min(k_max, c.room)) for c in choices]
    sids = [i if c.seq_id is None else c.seq_id for i, c in enumerate(choices)]
    batch = (tuple(sids), tuple(fixed), tuple(h > 0 for h in his))
    if (costs.hold is not None and costs.hold[0] == batch and costs.clock <= costs.hold[1]
            and all(c.acceptance.since_probe + 1 < c.acceptance.probe_gap for c in choices)):
        # plain was clearly best a few steps ago and no probe is due: the search is skipped (on a
        # 5 ms step it is ~2% of the time); _adjust's bookkeeping for a plain step still runs
        for c in choices:
            c.acceptance.since_probe += 1
            c.acceptance.n_choices += 1
        costs.n_held += 1
        return [0] * n
    costs.hold = None
    curves = [c.acceptance.expected_tokens(hi) for c, hi in zip(choices, his)]
    # the batch in seq-id order, as the engine builds it: auto entries are filled in per candidate
    order = sorted([(sid, True, i) for i, sid in enumerate(sids)] + [(sid, False, k) for sid, k in fixed])
    fixed_tokens = float(len(fixed))
    fixed_positions = max((k for _, k in fixed), default=0)
    fixed_draft_rows = sum(k for _, k in fixed)

    def runs(ks: Sequence[int]) -> Runs:
        return tuple((sid, (ks[x] if auto else x) + 1) for sid, auto, x in order)

    def step_time(ks: Sequence[int]) -> float:
        positions = max([fixed_positions, *ks])
        # rows of steady drafting (the tokens of one step, ~2); a long plain run's catch-up debt
        # is paid once whenever drafting resumes and must not keep drafting from resuming
        draft_rows = fixed_draft_rows + sum(min(c.acceptance.pending, 2) + k - 1 for c, k in zip(choices, ks) if k)
        return costs.step_cost(runs(ks)) + costs.draft_cost(positions, draft_rows)

    def tokens(ks: Sequence[int]) -> float:
        return fixed_tokens + sum(curve[k] for curve, k in zip(curves, ks))

    def rate(ks: Sequence[int]) -> float:
        return tokens(ks) / step_time(ks)

    # start from the best length shared by all: drafts run in lockstep, so where a draft decode
    # costs more than its rows (GPU-like), or where unequal row counts split the decode into
    # passes (UbatchSplit), drafting pays only if the sequences draft together, and a start
    # from all-plain would never leave it one sequence at a time
    ks, best = [0] * n, rate([0] * n)
    alt = 0.0  # the best rate of a candidate that drafts
    for k in range(1, max(his) + 1):
        cand = [min(k, hi) for hi in his]
        r = rate(cand)
        alt = max(alt, r)
        if r > best * 1.0001:
            ks, best = cand, r
    # coordinate ascent: each sequence's best k given the others', twice over (one pass for N=1)
    for _ in range(1 if n == 1 else 2):
        changed = False
        for i in range(n):
            keep = ks[i]
            for k in range(his[i] + 1):
                if k == keep:
                    continue
                ks[i] = k
                r = rate(ks)
                alt = max(alt, r) if any(ks) else alt
                if r > best * 1.0001:
                    best, keep, changed = r, k, True
            ks[i] = keep
        if not changed:
            break
    # probes, exploration and refreshes: per sequence, or where the target splits unequal rows
    # into passes, per group of sequences at the same length (one probing alone would cost a pass)
    if costs.split.equal and n > 1:
        groups: dict = {}
        for i, k in enumerate(ks):
            groups.setdefault(k, []).append(i)
        group_list = list(groups.values())
    else:
        group_list = [[i] for i in range(n)]
    for group in group_list:
        _adjust(group, choices, ks, his, costs, tokens, step_time, runs, best)
    if not any(ks):
        _maybe_hold(batch, choices, his, curves, costs, tokens, step_time, best, alt)
    return ks


def _maybe_hold(batch: Any, choices: Sequence[DraftChoice], his: List[int], curves: List[List[float]],
                costs: StepCosts, tokens: Callable[[Sequence[int]], float],
                step_time: Callable[[Sequence[int]], float], best: float, alt: float) -> None:
    """Hold plain for HOLD_STEPS choices when every drafting option is clearly worse: each
    sequence, and all of them, one token each at one standard error more hopeful, and every
    candidate the search priced, below HOLD_MARGIN of plain."""
    able = [i for i in range(len(choices)) if his[i] > 0]
    if not able or alt >= HOLD_MARGIN * best:
        return

    zeros = [0] * len(choices)
    groups = [able] + ([[i] for i in able] if len(able) > 1 else [])
    if all(_hopeful_rate(g, 1, zeros, choices, tokens, step_time) < HOLD_MARGIN * best for g in groups):
        costs.hold = (batch, costs.clock + HOLD_STEPS)


def _hopeful_rate(members: List[int], kk: int, ks: Sequence[int], choices: Sequence[DraftChoice],
                  tokens: Callable[[Sequence[int]], float], step_time: Callable[[Sequence[int]], float]) -> float:
    """The rate of ``ks`` with ``members`` at kk, each one standard error more hopeful at its
    deepest position (optimism in the face of uncertainty)."""
    trial = list(ks)
    for i in members:
        trial[i] = kk
    accs = [choices[i].acceptance for i in members]
    extra = sum(a.expected_tokens(kk, optimistic_at=kk - 1)[kk] - a.expected_tokens(kk)[kk] for a in accs)
    return (tokens(trial) + extra) / step_time(trial)


def _adjust(group: List[int], choices: Sequence[DraftChoice], ks: List[int], his: List[int], costs: StepCosts,
            tokens: Callable[[Sequence[int]], float], step_time: Callable[[Sequence[int]], float],
            runs: Callable[[Sequence[int]], Runs], best: float) -> None:
    """Probes, exploration and refreshes on top of the goodput optimum, for a group of sequences
    at one length, all moved together (a group of one where rows are not split into passes)."""
    for i in group:
        choices[i].acceptance.n_choices += 1
    members = [i for i in group if his[i] > 0]
    if not members:
        return
    accs = [choices[i].acceptance for i in members]
    k = ks[members[0]]
    hi = min(his[i] for i in members)

    def with_k(kk: int, f: Callable[[Sequence[int]], Any]) -> Any:
        old = [ks[i] for i in members]
        for i in members:
            ks[i] = kk
        try:
            return f(ks)
        finally:
            for i, o in zip(members, old):
                ks[i] = o

    def set_k(kk: int) -> None:
        for i in members:
            ks[i] = kk

    def hopeful_rate(kk: int) -> float:
        return _hopeful_rate(members, kk, ks, choices, tokens, step_time)

    if k == 0:
        for a in accs:
            a.since_probe += 1
        since = max(a.since_probe for a in accs)
        # while k=1 could still be better (one standard error more hopeful), probe at the shortest
        # gap: acceptance is only learnt from probes here; once it clearly cannot, back off
        hopeful = hopeful_rate(1) > best
        # and a probe's extra time (more verify rows, its draft) stays within PROBE_BUDGET of the
        # time since the last one, per sequence probed: in a batch on the slow side of a kernel
        # step a row is dear (a group's probe is its members' probes, taken in one step)
        t_now = step_time(ks)
        affordable = len(accs) * since * t_now * PROBE_BUDGET >= with_k(1, step_time) - t_now
        # (the budget rests on cost estimates that only probes refresh: it may delay a probe, not forbid it)
        due = any(a.since_probe >= a.probe_gap for a in accs) and (affordable or since >= PROBE_BUDGET_CAP)
        # a hit is followed up at once only while drafting could win: where even a hopeful k=1
        # loses (a batch whose rows are dear), a hit is no news and probes keep to the budget
        if (hopeful and any(a.follow_up for a in accs)) or (since >= PROBE_MIN and (hopeful or due)):
            for a in accs:
                a.since_probe = 0
                a.follow_up = False
                a.probing = True
            set_k(1)
            return
    else:
        for a in accs:
            a.since_probe = 0
            a.probe_gap = PROBE_MIN
    nxt = k + 1
    # one token longer is tried now and then if it could be better: its deepest position is
    # only observed when it is drafted, so a low estimate from a few unlucky misses would
    # otherwise never recover (optimism in the face of uncertainty, one standard error)
    if nxt <= hi and k > 0 and accs[0].n_choices % EXPLORE_EVERY == 0 and hopeful_rate(nxt) > best:
        set_k(nxt)
        return
    # a near-best option whose step cost has not been measured lately is run once to refresh it
    # (one-pass shapes only: the table holds those; a split step refreshes the split factor)
    for cand in (k - 1, k + 1):
        if 0 <= cand <= hi:
            u = costs.ubatches(with_k(cand, runs))
            if len(u) != 1:
                continue
            age = costs.clock - costs.step.last.get(u[0], -10**9)
            if age > STALE_STEPS and with_k(cand, lambda kk: tokens(kk) / step_time(kk)) >= STALE_MARGIN * best:
                costs.step.last[u[0]] = costs.clock  # one refresh per STALE_STEPS, measured or not
                set_k(cand)
                return
    # the longest draft, while its batch is larger than any measured, is tried (twice: the first run
    # of a shape pays graph setup) where its cost's lower bound (the dearest smaller batch measured)
    # would make it the best on the acceptance seen: from 1 and 2 rows the table extrapolates
    # linearly, which overprices longer batches where the kernels change (Q4_K_M here: 2 rows 2.4x
    # a plain step, 5 rows 4.5x), and from plain steps only probes (k=1) are run. Once measured,
    # lengths in between are interpolated.
    if hi > k and all(a.n_obs[0] >= EVIDENCE for a in accs):
        u = costs.ubatches(with_k(hi, runs))
        if len(u) == 1 and u[0] > max(costs.step.value, default=0) and costs.tried.get(u[0], 0) < 2:
            t_low = with_k(hi, step_time) - costs.step(u[0]) + costs.step.lower_bound(u[0])
            if with_k(hi, tokens) / t_low > best:
                costs.tried[u[0]] = costs.tried.get(u[0], 0) + 1
                set_k(hi)


class DraftPolicy:
    """``auto`` for one sequence with costs of its own: choose(room) before a step, observe() after."""

    def __init__(self, k_max: int, costs: Optional[StepCosts] = None) -> None:
        self.k_max = k_max
        self.costs = costs if costs is not None else StepCosts()
        self.acceptance = Acceptance(k_max, self.costs.accepted)

    def choose(self, room: int) -> int:
        return plan([DraftChoice(self.acceptance, room)], self.costs, self.k_max)[0]

    def observe(self, k: int, n_accepted: int, t_step: float, t_draft: float) -> None:
        """One finished step: k drafted, n_accepted kept; the step's total and drafting times."""
        self.costs.observe(k + 1, t_step - t_draft, k, self.acceptance.pending + k - 1 if k else 0, t_draft)
        self.acceptance.observe(k, n_accepted)
