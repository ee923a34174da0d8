"""When one sequence tries what the goodput optimum would not.

While plain decoding is best, a sequence probes k=1 now and then, so acceptance can
recover when the text changes character (acceptance is learnt from drafts only). Probes
back off exponentially (PROBE_MIN to PROBE_MAX plain steps) while they miss, so at
acceptance 0 they cost well under 1% of the time in the long run; a hit is followed up
at once, and two hits in a row reset the back-off. The same schedule paces explorations
of one token more than the optimum (``n_choices``); whether a due probe is worth its time
is the planner's call (``planner``), which tells the schedule what it chose.
"""

from __future__ import annotations

PROBE_MIN = 8      # plain steps before the first k=1 probe
PROBE_MAX = 64     # longest gap between probes: recovery within ~70 tokens, < 1% of time at a=0


class ProbeSchedule:
    """One sequence's probe state: plain choices since its last draft, the current gap, and
    whether the step in flight is a probe (its outcome moves the gap)."""

    def __init__(self) -> None:
        self.since = 0            # plain choices since the last draft
        self.gap = PROBE_MIN      # plain choices between probes while they miss
        self.probing = False      # the step in flight is a probe
        self.hit_streak = 0       # consecutive probe hits
        self.follow_up = False    # the last probe hit: probe again at once
        self.n_choices = 0        # choices made for this sequence (the exploration cadence)

    def count_choice(self) -> None:
        self.n_choices += 1

    def plain(self) -> None:
        """The sequence was left plain this step."""
        self.since += 1

    def drafting(self) -> None:
        """The optimum drafts for the sequence: no probe needed, the back-off starts over."""
        self.since = 0
        self.gap = PROBE_MIN

    def start(self) -> None:
        """This step is a probe."""
        self.since = 0
        self.follow_up = False
        self.probing = True

    def due(self) -> bool:
        return self.since >= self.gap

    def due_next(self) -> bool:
        """A probe is due at the next plain choice (a hold must not skip it)."""
        return self.since + 1 >= self.gap

    def observe(self, k: int, n_accepted: int) -> None:
        """The finished step: a probe's hit shortens the gap (after two in a row), a miss doubles it."""
        if not self.probing:
            return
        self.probing = False
        hit = k > 0 and n_accepted > 0
        self.follow_up = hit
        self.hit_streak = self.hit_streak + 1 if hit else 0
        if self.hit_streak >= 2:
            self.gap = PROBE_MIN
        elif not hit:
            self.gap = min(PROBE_MAX, 2 * self.gap)
