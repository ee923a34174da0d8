"""n_draft="auto": each step's draft lengths from measured costs and estimated acceptance.

The policy maximises goodput, expected tokens per second of the next step, over
k in {0 .. k_max} per sequence (k = 0 is plain decoding). With N sequences in one
verify decode it maximises the batch's tokens per second jointly, so each
sequence's verify rows are priced at what they add to the shared decode.

One module per concept, imported in this order (none imports a later one):

* ``costs``: what a step costs on this machine (``StepCosts``), measured, never assumed;
* ``probes``: when a sequence tries what the optimum would not (``ProbeSchedule``);
* ``acceptance``: what a sequence's drafts are worth (``Acceptance``, E(k) per length);
* ``planner``: the choice itself (``Planner``, one per target), in named phases.

Exactness is untouched: this package only chooses lengths. It is pure Python, a few
hundred float operations per step, and tested on a seeded simulator (tests/test_adaptive.py).
"""

from .acceptance import FORGET_AT, FORGET_KEEP, Acceptance, AcceptancePrior
from .costs import LinearCost, RowTable, StepCosts
from .planner import EVIDENCE, DraftChoice, Planner
from .probes import PROBE_MAX, PROBE_MIN, ProbeSchedule

__all__ = ["Acceptance", "AcceptancePrior", "DraftChoice", "EVIDENCE", "FORGET_AT", "FORGET_KEEP", "LinearCost",
           "PROBE_MAX", "PROBE_MIN", "Planner", "ProbeSchedule", "RowTable", "StepCosts"]
