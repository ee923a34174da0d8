"""Drafting statistics of an MtpSession."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class MtpStats:
    n_draft_calls: int          # draft() calls (including ones that proposed nothing)
    n_drafts: int               # draft() calls that proposed at least one token
    n_drafted: int              # tokens proposed
    n_accept_calls: int         # accept() calls
    n_accepted: int             # tokens accepted
    n_process_calls: int
    n_process_tokens: int
    drafted_per_pos: Tuple[int, ...]   # drafts that reached position i
    accepted_per_pos: Tuple[int, ...]  # accept calls that accepted position i
    t_draft_s: float
    t_process_s: float
    t_accept_s: float
    n_forget: int = 0                  # forget() calls that emptied a sequence's draft memory

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0.0 before any draft)."""
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def per_pos_acceptance(self) -> Tuple[float, ...]:
        """P(draft position i accepted | position i was drafted)."""
        return tuple(a / d if d else 0.0 for a, d in zip(self.accepted_per_pos, self.drafted_per_pos))

    @property
    def mean_tokens_per_draft_step(self) -> float:
        """Tokens committed per drafting step: 1 + accepted drafts per accept() call (0.0 before any).

        Steps that drafted nothing are not counted; GenerationStats.tokens_per_step counts every step.
        """
        return 1.0 + self.n_accepted / self.n_accept_calls if self.n_accept_calls else 0.0
