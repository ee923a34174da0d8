"""``auto`` for one sequence with a planner of its own, as the tests drive it: choose(room)
before a step, observe() after (the engine does the same for its sequences, in core)."""

from __future__ import annotations

from typing import Optional

from llama_mtp.adaptive import Acceptance, DraftChoice, Planner


class DraftPolicy:
    def __init__(self, k_max: int, planner: Optional[Planner] = None) -> None:
        self.k_max = k_max
        self.planner = planner if planner is not None else Planner()
        self.acceptance = Acceptance(k_max, self.planner.accepted)

    def choose(self, room: int) -> int:
        return self.planner.plan([DraftChoice(self.acceptance, room)], self.k_max)[0]

    def observe(self, k: int, n_accepted: int, t_step: float, t_draft: float) -> None:
        """One finished step: k drafted, n_accepted kept; the step's total and drafting times."""
        self.planner.observe(k + 1, t_step - t_draft, k, self.acceptance.pending + k - 1 if k else 0, t_draft)
        self.acceptance.observe(k, n_accepted)
