"""Answering a request whose work blocks: worker threads, a watch on the client, JSON or SSE.

Blocking work (chat templating, submitting, waiting for pieces) runs in worker
threads; each request races it against a watcher of the client's connection, and
a client that goes away cancels its sequences so the slot frees at the engine's
next step. Streams use llama_cpp.server's SSE format ``data: {...}\\n\\n ... data: [DONE]``.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, AsyncIterator, Callable, Dict, Optional

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from .completion import EngineLlama
from .errors import classify, sse_error

_END = object()
# seconds between checks of a waiting request's connection
_DISCONNECT_POLL_S = 0.2
# --disable_ping_events: a ping interval no stream lives to see (some clients choke on keep-alive comments)
_NO_PING_S = 365 * 24 * 3600
# anyio >= 4.1 calls it abandon_on_cancel; older versions cancellable
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(anyio.to_thread.run_sync).parameters
            else "cancellable")


class Responder:
    """Runs requests' blocking calls in worker threads and turns their results into responses.

    ``limiter`` bounds the worker threads; ``ping``: whether streams send keep-alive comments.
    """

    def __init__(self, limiter: anyio.CapacityLimiter, *, ping: bool = True) -> None:
        self._limiter = limiter
        self._sse_kwargs: Dict[str, Any] = {} if ping else {"ping": _NO_PING_S}

    async def respond(self, request: Request, llama: EngineLlama, fn: Callable[[], Any], stream: bool,
                      param: str) -> Response:
        """``fn()``'s result as JSON, or, for a stream, its chunks as server-sent events."""
        if not stream:
            return JSONResponse(await self._blocking(request, llama, fn, param))
        it = await self._blocking(request, llama, fn, param)
        # read the first chunk before answering, so errors at the start still get their status code
        first = await self._blocking(request, llama, functools.partial(next, it, _END), param)
        return EventSourceResponse(self._events(llama, it, first), sep="\n", **self._sse_kwargs)

    async def _blocking(self, request: Request, llama: EngineLlama, fn: Callable[[], Any], param: str) -> Any:
        """Run fn in a worker thread; if the client disconnects meanwhile, cancel its sequences."""
        async def watch() -> None:
            while True:
                await anyio.sleep(_DISCONNECT_POLL_S)
                if await request.is_disconnected():
                    llama.cancel()
                    return

        result: Any = None
        error: Optional[Exception] = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                result = await anyio.to_thread.run_sync(fn, limiter=self._limiter)
            except Exception as e:  # raised outside the task group, or it arrives as an ExceptionGroup
                error = e
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise classify(error, param=param) from None
        return result

    async def _events(self, llama: EngineLlama, it: Any, first: Any) -> AsyncIterator[Dict[str, str]]:
        try:
            chunk = first
            while chunk is not _END:
                yield {"data": json.dumps(chunk)}
                # abandon the blocked read on cancellation (client gone): llama.cancel() below ends it
                chunk = await anyio.to_thread.run_sync(functools.partial(next, it, _END), limiter=self._limiter,
                                                       **{_ABANDON: True})
            yield {"data": "[DONE]"}
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as e:  # a failure after the stream started: tell the client in-band
            yield {"data": sse_error(classify(e))}
        finally:
            llama.cancel()  # no-op once finished; otherwise frees the slot at the next step
