"""Exceptions raised by llama_mtp. Every misuse becomes one of these; none kills the process."""

from __future__ import annotations

from typing import Optional


class MtpError(RuntimeError):
    """Base class of every llama_mtp error."""


class ShimUnavailableError(MtpError, ImportError):
    """The native shim could not be built or loaded (the message says how to fix it)."""


class MtpInitError(MtpError):
    """The model or contexts cannot host an MTP session."""


class MtpArgumentError(MtpError, ValueError):
    """An argument is out of range or inconsistent with the session's state."""


class MtpProcessError(MtpError):
    """A batch cannot be handed to the drafter (or the draft context failed to decode it)."""


class BadSeqIdError(MtpError, IndexError):
    """A sequence id outside [0, n_seq)."""

    def __init__(self, message: str, seq_id: Optional[int], n_seq: int) -> None:
        super().__init__(message)
        self.seq_id = seq_id
        self.n_seq = n_seq


class ProtocolError(MtpError):
    """Calls out of order: draft while a proposal is pending, accept without a draft,
    or accepting more tokens than were drafted and verified."""


class RollbackError(MtpError):
    """The target cannot drop that many tokens (recurrent state snapshots too few)."""


class SessionClosedError(MtpError):
    """The session, or one of the Llama objects it drives, has been closed."""


class EngineClosedError(MtpError):
    """A request was submitted to an Engine after close()."""


class QueueFullError(MtpError):
    """The Engine's waiting queue is full (a server answers 503 with Retry-After)."""
