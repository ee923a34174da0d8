"""llama-mtp: upstream llama.cpp multi-token-prediction speculative decoding for llama-cpp-python.

Importing this package never loads native code; the shim is built (once per
installed llama-cpp-python) and loaded on first use.
"""

from __future__ import annotations

from .errors import (
    BadSeqIdError,
    EngineClosedError,
    MtpArgumentError,
    MtpError,
    MtpInitError,
    MtpProcessError,
    ProtocolError,
    QueueFullError,
    RollbackError,
    SessionClosedError,
    ShimUnavailableError,
)
from .engine import Engine, RequestHandle
from .generation import GenerationStream, generate, generate_many
from .results import GenerationResult, GenerationStats
from .loading import MtpAssistantLlama, MtpDraftLlama, MtpTargetLlama, load
from .mtp_llama import MtpLlama
from .session import DraftRequest, MtpSession
from .stats import MtpStats

from .version import __version__

__all__ = [
    "BadSeqIdError", "DraftRequest", "Engine", "EngineClosedError", "GenerationResult", "GenerationStats",
    "GenerationStream", "MtpArgumentError", "MtpAssistantLlama", "MtpDraftLlama", "MtpError", "MtpInitError",
    "MtpLlama", "MtpProcessError", "MtpSession", "MtpStats", "MtpTargetLlama", "ProtocolError", "QueueFullError",
    "RequestHandle", "RollbackError", "SessionClosedError", "ShimUnavailableError", "generate",
    "generate_many", "load",
]
