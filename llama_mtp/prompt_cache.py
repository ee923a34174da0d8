"""Prompt reuse: the longest common prefix, recurrent-state checkpoints, and the choice of a slot.

One cache for every entry point: :class:`SlotCache` remembers what each slot's memory holds and
picks the slot a new prompt goes to (llama-server's rule); :class:`PromptCheckpoints` keeps a
slot's recurrent-state checkpoints. The Engine, ``generate_many`` and the server use a
SlotCache per target; MtpLlama, whose one sequence is seq 0, uses its checkpoints and reuse rule.

Attention-only targets keep what llama-cpp-python keeps: the longest common prefix of
the new prompt with the context (positions past it are dropped on both contexts).
Hybrid/recurrent targets cannot cut their recurrent state back to an arbitrary
position, so (as llama.cpp's server "context checkpoints") the recurrent part of the
target's sequence state is saved at chosen positions -- near the end of each prompt, at
user-message starts (a chat template's message delimiters), the end of each generation --
in a small LRU. A later prompt restores the latest
checkpoint at a position p <= its common prefix (attention KV trimmed to p), or, with
none usable, decodes from 0. A checkpoint at p is usable only while the context still
holds the tokens it was taken after (checked token for token).
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import llama_cpp

from . import _compat
from .checkpoint import restore_partial_state, rollback_capacity, save_partial_state
from .checks import integer


log = logging.getLogger("llama_mtp.prompt_cache")

# the length of the longest common prefix of two token sequences: llama-cpp-python's own
common_prefix = llama_cpp.Llama.longest_token_prefix

Checkpoint = Tuple[Tuple[int, ...], ctypes.Array]  # (the tokens the state is the one after, the state)


def held_by(keys: Iterable[Tuple[int, ...]], context: Sequence[int]) -> List[Tuple[int, ...]]:
    """The checkpoint keys (the tokens each state is the one after) that ``context`` holds."""
    return [k for k in keys if common_prefix(context, k) == len(k)]


def checkpoint_reach(keys: Iterable[Tuple[int, ...]], context: Sequence[int], limit: int) -> int:
    """The position of the latest checkpoint (by the tokens it follows) at or before ``limit``
    whose tokens ``context`` holds; 0: none."""
    return max((len(k) for k in held_by(keys, context) if len(k) <= limit), default=0)


# llama-server's --checkpoint-min-step default: user messages closer than this to the last
# checkpoint get none of their own (the last user message always does); a long prompt gets one
# every that many tokens
CHECKPOINT_MIN_STEP = 8192

# the checkpoints a slot saved to host memory takes along: the latest (its last turn's, where its
# next turn resumes); older ones (earlier turns, the system prompt other slots hold too) would
# cost ~3 MB each on a small hybrid model and crowd other conversations out of the budget
SAVED_CHECKPOINTS = 4


def user_checkpoints(starts: Sequence[int], min_step: int = CHECKPOINT_MIN_STEP) -> Tuple[int, ...]:
    """The user-message starts llama-server checkpoints a prompt at (server-context.cpp): the first,
    the last, and those more than ``min_step`` tokens past the previous one kept. A conversation's
    system prompt thus ends in a checkpoint another conversation reuses, and each turn's history
    in one its next turn does."""
    kept: List[int] = []
    for i, pos in enumerate(starts):
        if pos > 0 and (not kept or i == len(starts) - 1 or pos > kept[-1] + min_step):
            kept.append(pos)
    return tuple(kept)


class PromptCheckpoints:
    """Up to ``capacity`` recurrent-state checkpoints of one sequence, least recently used evicted."""

    def __init__(self, llm: llama_cpp.Llama, capacity: int, seq_id: int = 0) -> None:
        integer("ctx_checkpoints", capacity, 0)
        self._llm = llm
        self.capacity = capacity
        self.seq_id = seq_id
        # key: the tokens the context held when the state was saved (its position = len(key))
        self._items: "OrderedDict[Tuple[int, ...], ctypes.Array]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in list(self._items.values()))  # list(): one atomic copy (other threads read it)

    def sizes(self) -> List[int]:
        """Bytes of each checkpoint (the recurrent state only: the same for every position)."""
        return [len(b) for b in self._items.values()]

    def positions(self) -> List[int]:
        return sorted(len(k) for k in self._items)

    def save(self, tokens: Sequence[int]) -> None:
        """Checkpoint the target's recurrent state, which must be that after ``tokens``."""
        if not self.capacity or not tokens:
            return
        buf, n = save_partial_state(self._llm, self.seq_id)
        if n != len(buf):
            return  # nothing usable to keep (llama.cpp logged why)
        self.put(tokens, buf)

    def keys(self) -> List[Tuple[int, ...]]:
        return list(self._items)

    def get(self, tokens: Sequence[int]) -> Optional[ctypes.Array]:
        """The state saved after exactly ``tokens`` (None: none)."""
        return self._items.get(tuple(int(t) for t in tokens))

    def put(self, tokens: Sequence[int], state: ctypes.Array) -> None:
        """Keep a state saved elsewhere (another slot's) as the one after ``tokens``."""
        if not self.capacity or not tokens:
            return
        key = tuple(int(t) for t in tokens)
        self._items.pop(key, None)  # supersede one at the same prefix
        self._items[key] = state
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def restore_best(self, context: Sequence[int], limit: int) -> int:
        """Restore the latest checkpoint at a position <= limit whose tokens the context still
        holds; returns its position (0: none). Checkpoints the context no longer holds are dropped."""
        self._items = OrderedDict((k, self._items[k]) for k in held_by(self._items, context))
        best = max((k for k in self._items if len(k) <= limit), key=len, default=None)
        if best is None:
            return 0
        buf = self._items[best]
        restore_partial_state(self._llm, buf, len(buf), self.seq_id, "prompt checkpoint")
        self._items.move_to_end(best)
        return len(best)

    def clear(self) -> None:
        self._items.clear()

    def export(self, context: Sequence[int], latest: int) -> Tuple[Checkpoint, ...]:
        """The ``latest`` checkpoints (by position) taken after a prefix of ``context``, oldest
        first, to travel with a slot saved to host memory (a buffer is never written after its
        save, so the slot and the saved copy can share it)."""
        keep = set(sorted(held_by(self._items, context), key=len)[-latest:]) if latest > 0 else set()
        return tuple((k, buf) for k, buf in self._items.items() if k in keep)

    def adopt(self, items: Sequence[Checkpoint]) -> None:
        """Replace the checkpoints with a restored slot's (a state restores into any sequence)."""
        self._items = OrderedDict(items[-self.capacity:] if self.capacity else ())


def swa_floor(llm: llama_cpp.Llama, seq_id: int) -> int:
    """The fewest held tokens a sequence can keep when its target's sliding-window layers keep only
    their window (``swa_full=False``): the next token attends over the n_swa before it, which the
    window must still hold (llama-server's pos_min check); 0 with a full-size SWA cache
    (llama-cpp-python's default, where reuse anywhere is exact) or no SWA layers."""
    n_swa = _compat.swa_window(llm)
    if not n_swa:
        return 0
    pos_min = int(llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(_compat.native_context(llm)), seq_id))
    return pos_min + n_swa if pos_min > 0 else 0


def reusable(held: Sequence[int], prompt: Sequence[int], limit: int, checkpoints: Optional[PromptCheckpoints],
             floor: int = 0) -> int:
    """Leading tokens of ``prompt`` a sequence holding ``held`` keeps, at most ``limit``: the common
    prefix on an attention-only target; on a recurrent one (``checkpoints`` given) everything held
    when the prompt extends it (the state is the one after it), else the latest checkpoint at or
    before the limit, which is restored (0: none). Fewer than ``floor`` (swa_floor) keep nothing."""
    limit = min(limit, common_prefix(held, prompt))
    if limit < floor:
        return 0
    if checkpoints is None:
        return limit
    if len(held) <= limit:
        return len(held)
    return checkpoints.restore_best(held, limit)


@dataclass
class CacheStats:
    """What the slot cache did: requests that reused a prefix (hits) or not (misses), tokens reused,
    and the host-memory cache's saves, restores and failed restores."""

    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0
    ram_saves: int = 0
    ram_restores: int = 0
    ram_failures: int = 0


@dataclass
class SavedSlot:
    """A slot's whole sequence state in host memory: the target's and the draft context's, and (on
    a recurrent target) its checkpoints, so a prompt that leaves the slot's last turn reuses what
    a checkpoint holds (llama-server's saved prompts keep theirs)."""

    tokens: Tuple[int, ...]
    target: bytes
    draft: bytes
    checkpoints: Tuple[Checkpoint, ...] = ()
    user_end: Optional[int] = None

    @property
    def nbytes(self) -> int:
        return len(self.target) + len(self.draft) + sum(len(buf) for _, buf in self.checkpoints)


def save_seq(ctx: Any, seq_id: int) -> bytes:
    """llama.cpp's whole state of one sequence (llama_state_seq_get_data)."""
    size = int(llama_cpp.llama_state_seq_get_size(ctx, seq_id))
    if size <= 0:
        return b""
    buf = (ctypes.c_uint8 * size)()
    n = int(llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id))
    return ctypes.string_at(buf, n)  # one memcpy (slicing a ctypes array builds a list of ints)


def restore_seq(ctx: Any, data: bytes, seq_id: int) -> bool:
    """Put a saved sequence state into ``seq_id`` (its memory must be empty); False if llama.cpp refused."""
    if not data:
        return True
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    return int(llama_cpp.llama_state_seq_set_data(ctx, buf, len(data), seq_id)) == len(data)


class RamCache:
    """Saved slots in host memory, least recently used evicted beyond ``budget`` bytes
    (llama-server's --cache-ram)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: "OrderedDict[Tuple[int, ...], SavedSlot]" = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def put(self, saved: SavedSlot) -> bool:
        if saved.nbytes > self.budget:
            return False
        self._items.pop(saved.tokens, None)
        self._items[saved.tokens] = saved
        while self.nbytes > self.budget:
            self._items.popitem(last=False)
        return True

    def best(self, prompt: Sequence[int], usable: "Callable[[SavedSlot], int]") -> Tuple[Optional[SavedSlot], int]:
        """The saved slot that lets ``prompt`` reuse the most (``usable(saved)``), and how much."""
        best, n_best = None, 0
        for saved in list(self._items.values()):
            n = usable(saved)
            if n > n_best:
                best, n_best = saved, n
        return best, n_best

    def take(self, saved: SavedSlot) -> None:
        """``saved`` goes back into a slot: it leaves the cache (the slot holds it now)."""
        self._items.pop(saved.tokens, None)

    def clear(self) -> None:
        self._items.clear()


class SlotCache:
    """What each slot's memory holds (both contexts), and which free slot a prompt goes to.

    The choice is llama-server's (tools/server ``get_available_slot``): the free slot whose held
    tokens share the longest prefix with the prompt, if that prefix is more than ``SIMILARITY`` of
    the prompt; else the least recently used free slot. Hybrid/recurrent targets keep up to
    ``ctx_checkpoints`` recurrent-state checkpoints per slot (4, 16 and 4 + n_ubatch tokens before
    each prompt's end, user-message starts, the end of its head, the end of each generation;
    StepEngine decides where), as llama-server's ``--ctx-checkpoints``. With a host-memory budget,
    a slot about to take another conversation is saved with its latest checkpoints (see ``swap``).

    The cache is only right while nothing else decodes on the target: ``seal`` records llama.cpp's
    decode counter when its owner stops using it, ``check`` forgets every slot if it moved since.
    """

    SIMILARITY = 0.1  # llama-server's --slot-prompt-similarity default

    def __init__(self, target: llama_cpp.Llama, n_slots: int, ctx_checkpoints: int = 8, ram_bytes: int = 0,
                 checkpoint_min_step: int = CHECKPOINT_MIN_STEP) -> None:
        integer("ctx_checkpoints", ctx_checkpoints, 0)
        integer("ram_bytes", ram_bytes, 0)
        integer("checkpoint_min_step", checkpoint_min_step, 1)
        self.ctx_checkpoints = ctx_checkpoints
        self.checkpoint_min_step = checkpoint_min_step
        self.ram = RamCache(ram_bytes) if ram_bytes else None
        recurrent = rollback_capacity(target) is not None
        self._recurrent = recurrent
        self._held: List[List[int]] = [[] for _ in range(n_slots)]
        self._used = [0] * n_slots
        # where the last user message of what each slot holds ends (None: unknown, not a chat)
        self._user_end: List[Optional[int]] = [None] * n_slots
        self._clock = 0
        self._checkpoints = [PromptCheckpoints(target, ctx_checkpoints, sid) if recurrent else None
                             for sid in range(n_slots)]
        self._sealed: Optional[int] = None
        self.stats = CacheStats()

    @property
    def n_slots(self) -> int:
        return len(self._held)

    @property
    def nbytes(self) -> int:
        """Bytes of recurrent-state checkpoints and host-memory saved slots held."""
        ram = self.ram.nbytes if self.ram is not None else 0
        return ram + sum(c.nbytes for c in self._checkpoints if c is not None)

    def held(self, sid: int) -> List[int]:
        return list(self._held[sid])

    def choose(self, prompt: Sequence[int], free: Sequence[int], reuse: bool = True) -> int:
        """The free slot ``prompt`` goes to (``reuse=False``: the least recently used one)."""
        best, best_sim = None, 0.0
        if reuse:
            for sid in free:
                if self._held[sid]:
                    sim = common_prefix(self._held[sid], prompt) / len(prompt)
                    if sim > best_sim and sim > self.SIMILARITY:
                        best, best_sim = sid, sim
        if best is None:  # llama-server: the least recently used (the later slot on a tie)
            best = min(reversed(list(free)), key=lambda sid: self._used[sid])
        return best

    def _usable(self, tokens: Sequence[int], prompt: Sequence[int], checkpoints: Iterable[Tuple[int, ...]]) -> int:
        """Prompt tokens a memory holding ``tokens`` (its state the one after them, with recurrent
        checkpoints after each of ``checkpoints``) could keep: the common prefix; on a recurrent
        target all of them when the prompt extends them, else the latest checkpoint within it."""
        n = min(common_prefix(tokens, prompt), len(prompt) - 1)
        if not self._recurrent or n == len(tokens):
            return n
        return checkpoint_reach(checkpoints, tokens, n)

    def _leaves(self, sid: int, prompt: Sequence[int], keep: int) -> bool:
        """Whether ``prompt`` leaves what slot ``sid`` holds for good, so that it is worth saving:
        the prompt does not hold the slot's last user message whole (another conversation, or an
        edited history), where the slot knows where that message ends (chat templates' message
        delimiters); else, as llama-server decides, it keeps under half of what the slot holds."""
        held, user_end = self._held[sid], self._user_end[sid]
        if keep >= len(held):
            return False
        if user_end is not None:
            return common_prefix(held, prompt) < user_end
        return keep < len(held) / 2

    def swap(self, sid: int, prompt: Sequence[int], target_ctx: Any, draft_ctx: Any,
             catch_up: Callable[[int], None]) -> None:
        """Host-memory cache, before slot ``sid`` takes ``prompt``: save what the slot holds if the
        prompt leaves it (see _leaves) or a saved slot serves the prompt better, and bring that
        saved slot back. ``catch_up(sid)`` first puts the drafter's deferred rows into the draft
        context, so the saved draft memory is whole. A restore that fails leaves the slot empty
        (the prompt is then decoded in full), logged once."""
        if self.ram is None:
            return
        held = self._held[sid]
        cps = self._checkpoints[sid]
        keep = self._usable(held, prompt, cps.keys() if cps is not None else ()) if held else 0
        saved, n = self.ram.best(prompt, lambda entry: self._usable(entry.tokens, prompt,
                                                                    (k for k, _ in entry.checkpoints)))
        if held and (n > keep or self._leaves(sid, prompt, keep)):
            catch_up(sid)
            if self.ram.put(SavedSlot(tuple(held), save_seq(target_ctx, sid),
                                      save_seq(draft_ctx, sid) if draft_ctx is not None else b"",
                                      cps.export(held, SAVED_CHECKPOINTS) if cps is not None else (),
                                      self._user_end[sid])):
                self.stats.ram_saves += 1
        if saved is None or n <= keep:
            return
        self.ram.take(saved)
        for ctx in (target_ctx, draft_ctx):
            if ctx is not None:
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), sid, -1, -1)
        self.forget(sid)
        ok = restore_seq(target_ctx, saved.target, sid) and (
            draft_ctx is None or restore_seq(draft_ctx, saved.draft, sid))
        if not ok:
            self.stats.ram_failures += 1
            log.warning("slot %d: restoring a saved prompt of %d tokens failed; decoding the prompt in full",
                        sid, len(saved.tokens))
            for ctx in (target_ctx, draft_ctx):
                if ctx is not None:
                    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), sid, -1, -1)
            return
        self.stats.ram_restores += 1
        self._held[sid] = list(saved.tokens)
        self._user_end[sid] = saved.user_end
        if cps is not None:
            cps.adopt(saved.checkpoints)

    def take(self, sid: int, prompt: Sequence[int], reuse: bool = True, limit: Optional[int] = None,
             floor: int = 0) -> int:
        """A new sequence takes slot ``sid``: the prompt tokens its memory keeps (restoring a
        checkpoint on a recurrent target), at most ``limit`` (default len(prompt) - 1). Until
        :meth:`release`, the slot holds nothing the cache vouches for. ``floor``: see swa_floor."""
        limit = len(prompt) - 1 if limit is None else min(limit, len(prompt) - 1)
        n = reusable(self._held[sid], prompt, limit, self._checkpoints[sid], floor) if reuse and limit > 0 else 0
        self._held[sid] = []
        self._user_end[sid] = None
        self._clock += 1
        self._used[sid] = self._clock
        if n:
            self.stats.hits += 1
            self.stats.cached_tokens += n
        else:
            self.stats.misses += 1
            if self._checkpoints[sid] is not None:
                self._checkpoints[sid].clear()
        return n

    def checkpoint_positions(self, sid: int, prompt: Sequence[int]) -> List[int]:
        """Positions of slot ``sid``'s checkpoints taken after a prefix of ``prompt``."""
        cps = self._checkpoints[sid]
        return [len(k) for k in held_by(cps.keys(), prompt)] if cps is not None else []

    def checkpoint_state(self, sid: int, tokens: Sequence[int]) -> Optional[ctypes.Array]:
        """Slot ``sid``'s checkpoint taken after exactly ``tokens`` (None: it has none)."""
        cps = self._checkpoints[sid]
        return cps.get(tokens) if cps is not None else None

    def checkpoint_from(self, sid: int, tokens: Sequence[int], state: ctypes.Array) -> None:
        """Slot ``sid`` holds ``state`` after ``tokens`` now (copied from another slot): keep it."""
        cps = self._checkpoints[sid]
        if cps is not None:
            cps.put(tokens, state)

    def shared(self, n_before: int, n_after: int) -> None:
        """A new sequence that kept ``n_before`` of its slot copied ``n_after`` from another slot."""
        if not n_before:
            self.stats.hits += 1
            self.stats.misses -= 1
        self.stats.cached_tokens += n_after - n_before

    def checkpoint(self, sid: int, tokens: Sequence[int]) -> None:
        """The slot's recurrent state is the one after ``tokens`` now: keep a checkpoint of it."""
        cps = self._checkpoints[sid]
        if cps is not None:
            cps.save(tokens)

    def release(self, sid: int, tokens: Sequence[int], user_end: Optional[int] = None) -> None:
        """The slot's sequence ended with both contexts holding ``tokens`` (and, on a recurrent
        target, the state after them); its prompt's last user message ended at ``user_end`` (if known)."""
        self._held[sid] = [int(t) for t in tokens]
        self._user_end[sid] = user_end
        self.checkpoint(sid, tokens)

    def forget_all(self) -> None:
        """Nothing held anywhere can be vouched for any more (something else decoded on the target)."""
        for sid in range(self.n_slots):
            self.forget(sid)
        if self.ram is not None:
            self.ram.clear()

    def forget(self, sid: int) -> None:
        self._held[sid] = []
        self._user_end[sid] = None
        if self._checkpoints[sid] is not None:
            self._checkpoints[sid].clear()

    def seal(self, n_decoded: int) -> None:
        self._sealed = n_decoded

    def check(self, n_decoded: int) -> None:
        if self._sealed is not None and self._sealed != n_decoded:
            self.forget_all()
        self._sealed = None


_CACHES: "weakref.WeakKeyDictionary[llama_cpp.Llama, SlotCache]" = weakref.WeakKeyDictionary()


def slot_cache(target: llama_cpp.Llama, n_slots: int, ctx_checkpoints: int = 8, ram_bytes: int = 0,
               checkpoint_min_step: int = CHECKPOINT_MIN_STEP) -> SlotCache:
    """The target's slot cache (one per target, so what one Engine or generate_many call left in
    the slots serves the next; a new shape starts an empty one)."""
    cache = _CACHES.get(target)
    shape = (n_slots, ctx_checkpoints, ram_bytes, checkpoint_min_step)
    if cache is None or (cache.n_slots, cache.ctx_checkpoints, cache.ram.budget if cache.ram is not None else 0,
                         cache.checkpoint_min_step) != shape:
        cache = _CACHES[target] = SlotCache(target, *shape)
    return cache
