"""Target checkpoints for drafts longer than the recurrent state can roll back.

Hybrid/recurrent targets (qwen35) drop rejected tokens through n_rs_seq state
snapshots. A draft longer than that takes upstream's other path: save the
sequence's partial (recurrent) state before verifying, and on a partial
rejection restore it and re-decode the accepted prefix.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import llama_cpp

from . import _compat
from .errors import RollbackError

PARTIAL_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY


def rollback_capacity(llm: llama_cpp.Llama) -> Optional[int]:
    """Tokens the target can drop with seq_rm; None when unbounded (attention-only)."""
    ctx = _compat.ctx_ptr(llm)
    model = llama_cpp.llama_get_model(ctx)
    if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
        return int(llama_cpp.llama_n_rs_seq(ctx))
    return None


class TargetCheckpoint:
    def __init__(self, llm: llama_cpp.Llama) -> None:
        self._llm = llm
        self._buf: Optional[ctypes.Array] = None
        self._size = 0

    def save(self, seq_id: int) -> None:
        ctx = _compat.ctx_ptr(self._llm)
        need = llama_cpp.llama_state_seq_get_size_ext(ctx, seq_id, PARTIAL_ONLY)
        if self._buf is None or len(self._buf) < need:
            self._buf = (ctypes.c_uint8 * need)()
        self._size = llama_cpp.llama_state_seq_get_data_ext(ctx, self._buf, need, seq_id, PARTIAL_ONLY)

    def restore(self, seq_id: int, n_past: int) -> None:
        """Back to the saved state, with positions >= n_past removed."""
        ctx = _compat.ctx_ptr(self._llm)
        assert self._buf is not None
        if llama_cpp.llama_state_seq_set_data_ext(ctx, self._buf, self._size, seq_id, PARTIAL_ONLY) == 0:
            raise RollbackError("llama.cpp could not restore the target checkpoint")
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), seq_id, n_past, -1)
