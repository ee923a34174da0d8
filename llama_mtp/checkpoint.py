"""Target checkpoints for drafts longer than the recurrent state can roll back.

Hybrid/recurrent targets (qwen35) drop rejected tokens through n_rs_seq state
snapshots. A draft longer than that takes upstream's other path: save the
sequence's partial (recurrent) state before verifying, and on a partial
rejection restore it and re-decode the accepted prefix.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Tuple

import llama_cpp

from . import _compat, llama_rules
from .errors import RollbackError

PARTIAL_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY


def rollback_capacity(llm: llama_cpp.Llama) -> Optional[int]:
    """Tokens the target can drop with seq_rm; None when unbounded (attention-only)."""
    return llama_rules.context_rollback_capacity(_compat.native_context(llm))


def save_partial_state(llm: llama_cpp.Llama, seq_id: int, buf: Optional[ctypes.Array] = None) -> Tuple[ctypes.Array, int]:
    """The recurrent part of seq_id's state, in ``buf`` when it is big enough: (buffer, bytes written)."""
    ctx = _compat.native_context(llm)
    need = llama_cpp.llama_state_seq_get_size_ext(ctx, seq_id, PARTIAL_ONLY)
    if buf is None or len(buf) < need:
        buf = (ctypes.c_uint8 * need)()
    return buf, int(llama_cpp.llama_state_seq_get_data_ext(ctx, buf, need, seq_id, PARTIAL_ONLY))


def restore_partial_state(llm: llama_cpp.Llama, buf: ctypes.Array, size: int, seq_id: int, what: str) -> None:
    if llama_cpp.llama_state_seq_set_data_ext(_compat.native_context(llm), buf, size, seq_id, PARTIAL_ONLY) == 0:
        raise RollbackError(f"llama.cpp could not restore the {what}")


class TargetCheckpoint:
    def __init__(self, llm: llama_cpp.Llama) -> None:
        self._llm = llm
        self._buf: Optional[ctypes.Array] = None
        self._size = 0

    def save(self, seq_id: int) -> None:
        self._buf, self._size = save_partial_state(self._llm, seq_id, self._buf)

    def restore(self, seq_id: int, n_past: int) -> None:
        """Back to the saved state, with positions >= n_past removed."""
        assert self._buf is not None
        restore_partial_state(self._llm, self._buf, self._size, seq_id, "target checkpoint")
        ctx = _compat.native_context(self._llm)
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq_id, n_past, -1)
