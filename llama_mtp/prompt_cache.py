"""Prompt reuse for MtpLlama: the longest common prefix, and recurrent-state checkpoints.

Attention-only targets keep what llama-cpp-python keeps: the longest common prefix of
the new prompt with the context (positions past it are dropped on both contexts).
Hybrid/recurrent targets cannot cut their recurrent state back to an arbitrary
position, so (as llama.cpp's server "context checkpoints") the recurrent part of the
target's sequence state is saved at chosen positions -- the end of each prompt prefill
and the end of each generation -- in a small LRU. A later prompt restores the latest
checkpoint at a position p <= its common prefix (attention KV trimmed to p), or, with
none usable, decodes from 0. A checkpoint at p is usable only while the context still
holds the tokens it was taken after (checked token for token).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from typing import List, Sequence, Tuple

import llama_cpp

from .checkpoint import restore_partial_state, save_partial_state
from .checks import integer


# the length of the longest common prefix of two token sequences: llama-cpp-python's own
common_prefix = llama_cpp.Llama.longest_token_prefix


class PromptCheckpoints:
    """Up to ``capacity`` recurrent-state checkpoints of seq 0, least recently used evicted."""

    def __init__(self, llm: llama_cpp.Llama, capacity: int) -> None:
        integer("ctx_checkpoints", capacity, 0)
        self._llm = llm
        self.capacity = capacity
        # key: the tokens the context held when the state was saved (its position = len(key))
        self._items: "OrderedDict[Tuple[int, ...], ctypes.Array]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self._items.values())

    def sizes(self) -> List[int]:
        """Bytes of each checkpoint (the recurrent state only: the same for every position)."""
        return [len(b) for b in self._items.values()]

    def positions(self) -> List[int]:
        return sorted(len(k) for k in self._items)

    def save(self, tokens: Sequence[int]) -> None:
        """Checkpoint the target's recurrent state, which must be that after ``tokens``."""
        if not self.capacity or not tokens:
            return
        key = tuple(int(t) for t in tokens)
        buf, n = save_partial_state(self._llm, 0)
        if n != len(buf):
            return  # nothing usable to keep (llama.cpp logged why)
        self._items.pop(key, None)  # supersede one at the same prefix
        self._items[key] = buf
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def restore_best(self, context: Sequence[int], limit: int) -> int:
        """Restore the latest checkpoint at a position <= limit whose tokens the context still
        holds; returns its position (0: none). Checkpoints the context no longer holds are dropped."""
        for key in [k for k in self._items if common_prefix(context, k) < len(k)]:
            del self._items[key]
        best = max((k for k in self._items if len(k) <= limit), key=len, default=None)
        if best is None:
            return 0
        buf = self._items[best]
        restore_partial_state(self._llm, buf, len(buf), 0, "prompt checkpoint")
        self._items.move_to_end(best)
        return len(best)

    def clear(self) -> None:
        self._items.clear()
