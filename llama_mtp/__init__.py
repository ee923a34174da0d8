"""llama-mtp: upstream llama.cpp multi-token-prediction speculative decoding for llama-cpp-python.

Importing this package never loads native code; the shim is built (once per
installed llama-cpp-python) and loaded on first use.
"""

from __future__ import annotations

from .errors import (
    BadSeqIdError,
    MtpArgumentError,
    MtpError,
    MtpInitError,
    MtpProcessError,
    ProtocolError,
    RollbackError,
    SessionClosedError,
    ShimUnavailableError,
)
from .generation import GenerationResult, GenerationStats, GenerationStream, generate
from .loading import MtpDraftLlama, MtpTargetLlama, load
from .mtp_llama import MtpLlama
from .session import MtpSession
from .stats import MtpStats

__version__ = "0.1.0"

__all__ = [
    "BadSeqIdError", "GenerationResult", "GenerationStats", "GenerationStream", "MtpArgumentError", "MtpLlama", "MtpDraftLlama", "MtpError", "MtpInitError", "MtpProcessError",
    "MtpSession", "MtpStats", "MtpTargetLlama", "ProtocolError", "RollbackError", "SessionClosedError",
    "ShimUnavailableError", "generate", "load",
]
