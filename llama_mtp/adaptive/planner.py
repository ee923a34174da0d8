"""Each step's draft lengths: the goodput optimum, then probes, explorations, refreshes.

``Planner.plan`` runs in named phases on one record of the step (``_Step``: the sequences,
their room and acceptance curves, the batch's fixed part, and how a candidate is priced):

1. the hold: while plain was clearly best a few choices ago on the same batch and no probe
   is due, the search is skipped (``_holding``; set by ``_plain_clearly_best``);
2. the search: the best length shared by all sequences, then coordinate ascent (``_search``);
3. per group of sequences moved together (``_groups``), the first of: a k=1 probe from plain
   (``_probe``), one token longer than the optimum (``_explore``), a stale near-best option
   re-measured (``Planner._refresh``), the longest draft tried while its batch was never
   measured (``Planner._try_longest``).

The planner's memory (its clock, the hold, refreshes and tries) is its own; what a step costs
is ``StepCosts``'s, measured; each sequence's probe state is its ``ProbeSchedule``'s, told
what was chosen. Exactness is untouched: this module only chooses lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..llama_rules import Runs
from .acceptance import Acceptance, AcceptancePrior
from .costs import StepCosts
from .probes import PROBE_MAX, PROBE_MIN, ProbeSchedule

PROBE_BUDGET = 0.02  # most of the time since the last probe that a probe may cost
PROBE_BUDGET_CAP = 4 * PROBE_MAX  # plain steps after which a probe is due whatever the budget says
EXPLORE_EVERY = 4  # choices between tries of a longer draft that might be better
STALE_STEPS = 48   # a near-best option not measured for this many choices is refreshed once
STALE_MARGIN = 0.9
EVIDENCE = 2       # drafts a sequence has had judged before its acceptance may justify a try
HOLD_MARGIN = 0.95  # plain is held (the search skipped) while drafting is this much worse...
HOLD_STEPS = 8      # ...for this many choices, or until a probe is due
NEVER = -10**9      # the clock of a measurement or refresh that never happened


@dataclass
class DraftChoice:
    """One sequence's input to a step's plan."""

    acceptance: Acceptance
    room: int                     # most draft tokens this sequence may take now
    seq_id: Optional[int] = None  # its slot (the batch's order and ubatch split); None: its index


class _Step:
    """One step's candidates and their prices: ks (a draft length per auto sequence) -> the
    verify runs, the step's time, its expected tokens, its rate (tokens per second)."""

    def __init__(self, choices: Sequence[DraftChoice], his: List[int], sids: List[int],
                 fixed: Sequence[Tuple[int, int]], costs: StepCosts) -> None:
        self.choices = choices
        self.his = his  # the longest draft each sequence may take
        self.costs = costs
        self.curves = [c.acceptance.expected_tokens(hi) for c, hi in zip(choices, his)]
        # rows of steady drafting (the tokens of one step, ~2); a long plain run's catch-up debt
        # is paid once whenever drafting resumes and must not keep drafting from resuming
        self.catch_up = [min(c.acceptance.pending, 2) for c in choices]
        # the batch in seq-id order, as the engine builds it: auto entries are filled in per candidate
        self.order = sorted([(sid, True, i) for i, sid in enumerate(sids)] + [(sid, False, k) for sid, k in fixed])
        self.fixed_tokens = float(len(fixed))
        self.fixed_positions = max((k for _, k in fixed), default=0)
        self.fixed_draft_rows = sum(k for _, k in fixed)

    def runs(self, ks: Sequence[int]) -> Runs:
        return tuple((sid, (ks[x] if auto else x) + 1) for sid, auto, x in self.order)

    def step_time(self, ks: Sequence[int]) -> float:
        positions = max([self.fixed_positions, *ks])
        draft_rows = self.fixed_draft_rows + sum(c + k - 1 for c, k in zip(self.catch_up, ks) if k)
        return self.costs.step_cost(self.runs(ks)) + self.costs.draft_cost(positions, draft_rows)

    def tokens(self, ks: Sequence[int]) -> float:
        return self.fixed_tokens + sum(curve[k] for curve, k in zip(self.curves, ks))

    def rate(self, ks: Sequence[int]) -> float:
        return self.tokens(ks) / self.step_time(ks)

    def hopeful_rate(self, members: List[int], kk: int, ks: Sequence[int]) -> float:
        """The rate of ``ks`` with ``members`` at kk, each one standard error more hopeful at its
        deepest position (optimism in the face of uncertainty)."""
        trial = _with(ks, members, kk)
        accs = [self.choices[i].acceptance for i in members]
        extra = sum(a.expected_tokens(kk, optimistic_at=kk - 1)[kk] - a.expected_tokens(kk)[kk] for a in accs)
        return (self.tokens(trial) + extra) / self.step_time(trial)


def _with(ks: Sequence[int], members: List[int], kk: int) -> List[int]:
    """``ks`` with ``members`` at kk (a new list)."""
    trial = list(ks)
    for i in members:
        trial[i] = kk
    return trial


@dataclass(frozen=True)
class _Optimum:
    """The search's result: the best ks, its rate, and the best rate of any candidate that drafts."""

    ks: List[int]
    best: float
    alt: float


@dataclass(frozen=True)
class _Group:
    """Sequences moved together by the phases after the search: those with room to draft."""

    members: List[int]
    k: int          # their length at the optimum
    hi: int         # the longest draft all of them may take
    accs: List[Acceptance]

    @property
    def probes(self) -> List[ProbeSchedule]:
        return [a.probes for a in self.accs]

    def at(self, ks: Sequence[int], kk: int) -> List[int]:
        return _with(ks, self.members, kk)


def _search(step: _Step) -> _Optimum:
    """The goodput optimum. It starts from the best length shared by all: drafts run in lockstep,
    so where a draft decode costs more than its rows (GPU-like), or where unequal row counts split
    the decode into passes (UbatchSplit), drafting pays only if the sequences draft together, and
    a start from all-plain would never leave it one sequence at a time."""
    n = len(step.his)
    ks, best = [0] * n, step.rate([0] * n)
    alt = 0.0  # the best rate of a candidate that drafts
    for k in range(1, max(step.his) + 1):
        cand = [min(k, hi) for hi in step.his]
        r = step.rate(cand)
        alt = max(alt, r)
        if r > best * 1.0001:
            ks, best = cand, r
    return _ascend(step, _Optimum(ks, best, alt))


def _ascend(step: _Step, start: _Optimum) -> _Optimum:
    """Coordinate ascent: each sequence's best k given the others', twice over (one pass for N=1)."""
    ks, best, alt = list(start.ks), start.best, start.alt
    n = len(ks)
    for _ in range(1 if n == 1 else 2):
        changed = False
        for i in range(n):
            keep = ks[i]
            for k in range(step.his[i] + 1):
                if k == keep:
                    continue
                ks[i] = k
                r = step.rate(ks)
                alt = max(alt, r) if any(ks) else alt
                if r > best * 1.0001:
                    best, keep, changed = r, k, True
            ks[i] = keep
        if not changed:
            break
    return _Optimum(ks, best, alt)


def _groups(step: _Step, ks: List[int]) -> List[List[int]]:
    """Who probes, explores and refreshes together: each sequence alone, or where the target
    splits unequal rows into passes, each group of sequences at one length (one sequence
    probing alone would cost a whole pass)."""
    if not (step.costs.split.equal and len(ks) > 1):
        return [[i] for i in range(len(ks))]
    groups: Dict[int, List[int]] = {}
    for i, k in enumerate(ks):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


def _group(step: _Step, indices: List[int], ks: List[int]) -> Optional[_Group]:
    members = [i for i in indices if step.his[i] > 0]
    if not members:
        return None
    return _Group(members, ks[members[0]], min(step.his[i] for i in members),
                  [step.choices[i].acceptance for i in members])


def _probe(step: _Step, g: _Group, ks: List[int], best: float) -> Optional[int]:
    """Probe scheduling: the group's schedules told whether the optimum drafts for it; k=1 for a
    plain group whose probe is due, or while k=1 could still be better."""
    if g.k > 0:
        for p in g.probes:
            p.drafting()
        return None
    for p in g.probes:
        p.plain()
    since = max(p.since for p in g.probes)
    # while k=1 could still be better (one standard error more hopeful), probe at the shortest
    # gap: acceptance is only learnt from probes here; once it clearly cannot, back off
    hopeful = step.hopeful_rate(g.members, 1, ks) > best
    # and a probe's extra time (more verify rows, its draft) stays within PROBE_BUDGET of the
    # time since the last one, per sequence probed: in a batch on the slow side of a kernel
    # step a row is dear (a group's probe is its members' probes, taken in one step)
    t_now = step.step_time(ks)
    affordable = len(g.accs) * since * t_now * PROBE_BUDGET >= step.step_time(g.at(ks, 1)) - t_now
    # (the budget rests on cost estimates that only probes refresh: it may delay a probe, not forbid it)
    due = any(p.due() for p in g.probes) and (affordable or since >= PROBE_BUDGET_CAP)
    # a hit is followed up at once only while drafting could win: where even a hopeful k=1
    # loses (a batch whose rows are dear), a hit is no news and probes keep to the budget
    if (hopeful and any(p.follow_up for p in g.probes)) or (since >= PROBE_MIN and (hopeful or due)):
        for p in g.probes:
            p.start()
        return 1
    return None


def _explore(step: _Step, g: _Group, ks: List[int], best: float) -> Optional[int]:
    """One token longer than the optimum, now and then, if it could be better: its deepest position
    is only observed when it is drafted, so a low estimate from a few unlucky misses would
    otherwise never recover (optimism in the face of uncertainty, one standard error)."""
    nxt = g.k + 1
    if (nxt <= g.hi and g.k > 0 and g.probes[0].n_choices % EXPLORE_EVERY == 0
            and step.hopeful_rate(g.members, nxt, ks) > best):
        return nxt
    return None


def _plain_clearly_best(step: _Step, opt: _Optimum) -> bool:
    """Every drafting option clearly worse than plain: each sequence, and all of them, one token
    each at one standard error more hopeful, and every candidate the search priced, below
    HOLD_MARGIN of plain."""
    able = [i for i in range(len(step.his)) if step.his[i] > 0]
    if not able or opt.alt >= HOLD_MARGIN * opt.best:
        return False
    zeros = [0] * len(step.his)
    groups = [able] + ([[i] for i in able] if len(able) > 1 else [])
    return all(step.hopeful_rate(g, 1, zeros) < HOLD_MARGIN * opt.best for g in groups)


class Planner:
    """``auto`` for the sequences of one target: choose with plan() before a step, observe() after.

    One per target (core keeps it with the target), so a later run starts from what earlier
    ones measured (``costs``) and accepted (``accepted``, the prior of each new ``Acceptance``).
    """

    def __init__(self, costs: Optional[StepCosts] = None) -> None:
        self.costs = costs if costs is not None else StepCosts()
        self.accepted = AcceptancePrior()
        self.clock = 0      # choices made: the age of a measurement or refresh
        self.n_held = 0     # choices made under a hold
        self.tried: Dict[int, int] = {}  # rows -> tries of a one-pass shape chosen for its cost's lower bound
        self._hold: Optional[Tuple[Any, int]] = None  # (batch, clock): plain held until then
        self._refreshed: Dict[int, int] = {}  # rows -> clock of the last refresh chosen

    def observe(self, rows: Union[int, Runs], t_step: float, positions: int, draft_rows: int, t_draft: float) -> None:
        """One finished step (StepCosts.observe), stamped with the clock."""
        self.costs.observe(rows, t_step, positions, draft_rows, t_draft, now=self.clock)

    def plan(self, choices: Sequence[DraftChoice], k_max: int, fixed: Sequence[Tuple[int, int]] = ()) -> List[int]:
        """Draft lengths for the ``auto`` sequences of one step.

        ``fixed``: (seq id, k) of the step's other sequences (a fixed k, or plain decoding).
        """
        self.clock += 1
        if not choices:
            return []
        his = [max(0, min(k_max, c.room)) for c in choices]
        sids = [i if c.seq_id is None else c.seq_id for i, c in enumerate(choices)]
        batch = (tuple(sids), tuple(fixed), tuple(h > 0 for h in his))
        if self._holding(batch, choices):
            return [0] * len(choices)
        self._hold = None
        step = _Step(choices, his, sids, fixed, self.costs)
        opt = _search(step)
        ks = opt.ks
        for indices in _groups(step, ks):
            ks = self._adjust(step, indices, ks, opt.best)
        if not any(ks) and _plain_clearly_best(step, opt):
            self._hold = (batch, self.clock + HOLD_STEPS)
        return ks

    def _holding(self, batch: Any, choices: Sequence[DraftChoice]) -> bool:
        """Plain was clearly best a few choices ago on this batch and no probe is due: the search is
        skipped (on a 5 ms step it is ~2% of the time); a plain step's probe bookkeeping still runs."""
        if (self._hold is None or self._hold[0] != batch or self.clock > self._hold[1]
                or any(c.acceptance.probes.due_next() for c in choices)):
            return False
        for c in choices:
            c.acceptance.probes.plain()
            c.acceptance.probes.count_choice()
        self.n_held += 1
        return True

    def _adjust(self, step: _Step, indices: List[int], ks: List[int], best: float) -> List[int]:
        """The optimum ``ks`` with one group moved by the first phase that moves it: a probe, an
        exploration, a refresh or the longest-draft try (a new list; ``ks`` when none does)."""
        for i in indices:
            step.choices[i].acceptance.probes.count_choice()
        g = _group(step, indices, ks)
        if g is None:
            return ks
        for phase in (_probe, _explore, self._refresh, self._try_longest):
            kk = phase(step, g, ks, best)
            if kk is not None:
                return g.at(ks, kk)
        return ks

    def _refresh(self, step: _Step, g: _Group, ks: List[int], best: float) -> Optional[int]:
        """A near-best neighbour whose step cost was not measured (or refreshed) for STALE_STEPS
        choices, run once to re-measure it (one-pass shapes only: the table holds those; a split
        step refreshes the split factor)."""
        for cand in (g.k - 1, g.k + 1):
            if not 0 <= cand <= g.hi:
                continue
            trial = g.at(ks, cand)
            u = self.costs.ubatches(step.runs(trial))
            if len(u) != 1:
                continue
            last = max(self.costs.step.last.get(u[0], NEVER), self._refreshed.get(u[0], NEVER))
            if self.clock - last > STALE_STEPS and step.rate(trial) >= STALE_MARGIN * best:
                self._refreshed[u[0]] = self.clock  # one refresh per STALE_STEPS, measured or not
                return cand
        return None

    def _try_longest(self, step: _Step, g: _Group, ks: List[int], best: float) -> Optional[int]:
        """The longest draft, while its batch is larger than any measured, is tried (twice: the
        first run of a shape pays graph setup) where its cost's lower bound (the dearest smaller
        batch measured) would make it the best on the acceptance seen: from 1 and 2 rows the table
        extrapolates linearly, which overprices longer batches where the kernels change (Q4_K_M
        here: 2 rows 2.4x a plain step, 5 rows 4.5x), and from plain steps only probes (k=1) are
        run. Once measured, lengths in between are interpolated."""
        if not (g.hi > g.k and all(a.n_obs[0] >= EVIDENCE for a in g.accs)):
            return None
        trial = g.at(ks, g.hi)
        u = self.costs.ubatches(step.runs(trial))
        if len(u) != 1 or u[0] <= max(self.costs.step.value, default=0) or self.tried.get(u[0], 0) >= 2:
            return None
        t_low = step.step_time(trial) - self.costs.step(u[0]) + self.costs.step.lower_bound(u[0])
        if step.tokens(trial) / t_low > best:
            self.tried[u[0]] = self.tried.get(u[0], 0) + 1
            return g.hi
        return None
