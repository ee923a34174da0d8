"""What one step costs on this machine, measured, never assumed.

* The target step without drafting (decode, drafter bookkeeping, sampling, Python) by
  the number of verify rows, a table with monotone interpolation, because real
  kernels have steps (a 5-row batch taking a slower path was measured); a step that
  llama.cpp cuts into several passes (``llama_rules.UbatchSplit``) priced by its passes.
* Drafting, least squares on t = c_pos * positions + c_row * rows: the own loop runs
  one draft-context decode per draft position for all sequences in lockstep, and the
  first one also carries each sequence's deferred catch-up rows (one per token
  committed since its last draft). So plain steps are charged the catch-up they defer,
  and a GPU-like machine (launch-bound: c_pos >> c_row) learns that a second sequence
  drafting alongside a first is nearly free.

A slow first measurement must not lock an option out: single observations are clipped
to [1/2, 2] x the running value, and the first run of a new batch shape (graph setup)
is replaced by the second. (Re-measuring an option that went stale is the planner's
choice: ``planner.Planner``.)
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

from ..llama_rules import Runs, UbatchSplit

ALPHA = 0.1  # running-average weight of costs: adapts within a few dozen observations


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


def runs_of(rows: Union[int, Runs]) -> Runs:
    """One sequence's row count as runs, or the runs themselves."""
    return ((0, rows),) if isinstance(rows, int) else tuple(rows)


class StepCosts:
    """What one step costs on this machine: the verify step by its ubatches, and drafting.

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

    def observe(self, rows: Union[int, Runs], t_step: float, positions: int, draft_rows: int, t_draft: float,
                *, now: int = 0) -> None:
        """One finished step: its verify runs (or one sequence's rows) and its time without
        drafting; its draft shape and time. ``now``: the planner's clock (a measurement's age)."""
        u = self.ubatches(runs_of(rows))
        if len(u) == 1:
            self.step.observe(max(1, u[0]), t_step, now)
        else:
            ratio = t_step / sum(self.step(max(1, n)) for n in u)
            self.n_split += 1
            self.split_factor = ratio if self.n_split <= 2 else (
                (1 - ALPHA) * self.split_factor + ALPHA * _clip(ratio, self.split_factor))
        self.draft.observe(positions, draft_rows, t_draft)
