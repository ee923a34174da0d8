"""Which drafter a run uses: decided here, once, for every entry point.

The rule: the session's own draft loop whenever the pair's draft mode supports it (batched
drafts across sequences, deferred MTP catch-up, exact per-step draft lengths, sampled drafts
for rejection sampling; it is what the benchmarks measured); otherwise upstream's drafter
(fixed length, sample-and-match), said once per draft context in a logged warning, and
``verify="rejection"``, which needs the own loop, raises MtpArgumentError. A caller may ask
for upstream's drafter explicitly (``prefer="upstream"``); a caller's own session fixes the
drafter it was made for (``defer_catchup=True``: the own loop).

:func:`resolve_drafter` probes the draft mode once and returns a :class:`Drafter`, which
:class:`llama_mtp.core.StepEngine` takes as it is.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, replace
from typing import Any, Optional

import llama_cpp

from . import session as _session
from .checks import NDraft, check_pair, choice, n_draft as check_n_draft
from .errors import MtpArgumentError
from .loading import limits_of

log = logging.getLogger("llama_mtp")

DRAFTERS = ("auto", "own", "upstream")
VERIFY_MODES = ("match", "rejection")


@dataclass(frozen=True)
class Drafter:
    """A run's drafting, resolved once.

    ``mode``: the pair's draft mode; ``own_loop``: drafts come from the session's own draft
    loop (else upstream's drafter); ``n_draft``: the run's validated default draft length;
    ``k_max``: the longest draft the run's session is sized for (before chained heads cap it
    at one token per head); ``n_seq``: its sequence slots.
    """

    mode: _session.DraftMode
    own_loop: bool
    n_draft: NDraft
    k_max: int
    n_seq: int

    @property
    def name(self) -> str:
        return "own" if self.own_loop else "upstream"

    def with_n_draft(self, n_draft: Any) -> "Drafter":
        """This drafter with another default draft length (validated, within ``k_max``)."""
        return replace(self, n_draft=_fitting(check_n_draft(n_draft), self.k_max))

    def check_verify(self, verify: str) -> None:
        """Raise MtpArgumentError if a request's ``verify`` needs a drafter this one is not."""
        _check_verify(self.mode, self.own_loop, verify)


def resolve_drafter(target: llama_cpp.Llama, draft: llama_cpp.Llama, n_draft: Any = "auto",
                    verify: str = "match", *, prefer: str = "auto", size_to_n_draft: bool = False,
                    session: Optional[_session.MtpSession] = None) -> Drafter:
    """The drafter for a run of ``target``/``draft`` (see the module's rule).

    ``n_draft``: the run's default draft length (validated here, where it enters);
    ``verify``: the run's default verification; ``prefer``: "auto" (the rule), "own" (raises
    if the mode lacks it) or "upstream"; ``size_to_n_draft``: a fixed ``n_draft`` is the
    longest draft the run needs (a one-sequence run; otherwise the session is sized for the
    n_draft_max the pair was loaded with, room for requests that ask for more);
    ``session``: a caller's own MtpSession, whose drafter, n_draft_max and slots the run takes.
    """
    check_pair(target, draft)
    n_draft = check_n_draft(n_draft)
    choice("verify", verify, VERIFY_MODES)
    choice("drafter", prefer, DRAFTERS)
    if session is not None:
        mode, k_max, n_seq = session.draft_mode, session.n_draft_max, session.n_seq
        # the session was made for one drafter: deferred catch-up is the own loop's
        made_for = "own" if session.defer_catchup else "upstream"
        if prefer not in ("auto", made_for):
            raise MtpArgumentError(f"drafter={prefer!r}, but the session was made for the {made_for} drafter "
                                   f"(defer_catchup={session.defer_catchup})")
        prefer = made_for
    else:
        mode = _session.draft_mode_of(target, draft)
        limits = limits_of(target)
        # upstream's drafter drafts its session's n_draft_max tokens: a one-sequence run's is its n_draft
        k_max = max(1, n_draft) if size_to_n_draft and n_draft != "auto" else limits.n_draft_max
        n_seq = limits.n_seq
    own = _own_loop(mode, draft, verify, prefer)
    return Drafter(mode=mode, own_loop=own, n_draft=_fitting(n_draft, k_max), k_max=k_max, n_seq=n_seq)


def _fitting(n_draft: NDraft, k_max: int) -> NDraft:
    if n_draft != "auto" and n_draft > k_max:
        raise MtpArgumentError(f"n_draft={n_draft} exceeds the session's n_draft_max={k_max}")
    return n_draft


def _own_loop(mode: _session.DraftMode, draft: Any, verify: str, prefer: str) -> bool:
    own = prefer != "upstream" and mode.own_loop
    _check_verify(mode, own, verify)
    if own or prefer == "upstream":
        return own
    if prefer == "own":
        raise MtpArgumentError(f"the draft mode {mode.mode!r} is not implemented by the session's own draft loop")
    # once per draft context: a server or a chat loop would otherwise repeat it on every request
    if draft not in _ROUTED:
        _ROUTED.add(draft)
        log.warning("llama_mtp: draft mode %r is not implemented by the own draft loop: drafting with upstream's "
                    "drafter (fixed length, sample-and-match) instead", mode.mode)
    return False


def _check_verify(mode: _session.DraftMode, own_loop: bool, verify: str) -> None:
    # rejection sampling verifies drafts sampled from the MTP head's q: only the own loop samples them
    if verify == "rejection" and not own_loop:
        why = (f"the draft mode {mode.mode!r} is not implemented by the session's own draft loop"
               if not mode.own_loop else "upstream's drafter was asked for")
        raise MtpArgumentError(f"{why}, but verify='rejection' needs the own draft loop; use verify='match'")


_ROUTED: "weakref.WeakSet[Any]" = weakref.WeakSet()  # draft contexts whose routing was logged
