"""Raw llama.cpp pointers pulled out of llama-cpp-python objects, and the hook
that frees native sessions before llama-cpp-python frees their contexts.

Upstream aborts if a speculative session outlives either of its contexts, so
each llama-cpp-python ``LlamaContext`` gets one guard on its own ExitStack: it
runs before the context's free (ExitStack is LIFO) and releases every native
session still attached, whatever order Python closes or collects things in.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable, Dict, Union

import llama_cpp
from llama_cpp import _internals

from .errors import MtpArgumentError, SessionClosedError

ContextLike = Union[llama_cpp.Llama, _internals.LlamaContext]
BatchLike = Union[llama_cpp.Llama, _internals.LlamaBatch, llama_cpp.llama_batch, "ctypes._Pointer[Any]"]


def context_of(obj: Any, role: str) -> _internals.LlamaContext:
    """The LlamaContext of a Llama (or the LlamaContext itself)."""
    if isinstance(obj, _internals.LlamaContext):
        return obj
    if isinstance(obj, llama_cpp.Llama):
        ctx = getattr(obj, "_ctx", None)
        if ctx is None:
            raise SessionClosedError(f"the {role} Llama has no context (was it closed?)")
        return ctx
    raise MtpArgumentError(f"{role} must be a llama_cpp.Llama or llama_cpp._internals.LlamaContext, got {type(obj).__name__}")


def raw_context(ctx: _internals.LlamaContext, role: str) -> int:
    """Address of the native llama_context; raises if llama-cpp-python freed it."""
    ptr = ctx.ctx
    if not ptr:
        raise SessionClosedError(f"the {role} context has been closed (Llama.close() or LlamaContext.close())")
    return int(ptr)


def raw_batch(batch: Any) -> int:
    """Address of a native llama_batch struct."""
    if isinstance(batch, llama_cpp.Llama):
        batch = getattr(batch, "_batch", None)
        if batch is None:
            raise SessionClosedError("the Llama has no batch (was it closed?)")
    if isinstance(batch, _internals.LlamaBatch):
        batch = batch.batch
        if batch is None:
            raise SessionClosedError("the LlamaBatch has been closed")
    if isinstance(batch, llama_cpp.llama_batch):
        return ctypes.addressof(batch)
    if isinstance(batch, ctypes._Pointer) and isinstance(batch.contents, llama_cpp.llama_batch):  # type: ignore[attr-defined]
        return ctypes.addressof(batch.contents)
    raise MtpArgumentError(
        f"process() takes the target Llama, a LlamaBatch or a ctypes llama_batch, got {type(batch).__name__}")


class _ContextGuard:
    """Releases attached native sessions right before a LlamaContext is freed.

    No lock: finalizers (MtpSession.__del__ -> detach) may run from the garbage
    collector at any allocation, on a thread already inside attach() or fire();
    single dict operations are atomic under the GIL.
    """

    def __init__(self) -> None:
        self._releasers: Dict[int, Callable[[], None]] = {}
        self.fired = False

    def attach(self, key: int, release: Callable[[], None]) -> None:
        self._releasers[key] = release

    def detach(self, key: int) -> None:
        self._releasers.pop(key, None)

    def fire(self) -> None:
        self.fired = True
        releasers, self._releasers = self._releasers, {}
        for release in list(releasers.values()):
            release()


_guards_lock = threading.Lock()


def guard_of(ctx: _internals.LlamaContext) -> _ContextGuard:
    """The (single) guard of a LlamaContext, installed on first use."""
    with _guards_lock:
        guard = ctx.__dict__.get("_llama_mtp_guard")
        if guard is None:
            guard = _ContextGuard()
            ctx._exit_stack.callback(guard.fire)
            ctx.__dict__["_llama_mtp_guard"] = guard
        return guard
