"""One HTTP request carried through a Serve deployment handle to a replica's own ASGI app, and back.

Serve's HTTP proxy hands an ingress the request before its body is read, and a request router sees
only what a handle call carries; a conversation's key is in the body. So the ingress reads the
body, and calls a replica's ``handle`` method with the request (``TunneledRequest``) and the key;
the replica runs the very app the single-process server runs (``create_app``: same routes, bodies,
errors, SSE) on it and streams its ASGI messages back, which the ingress sends on unchanged.
Nothing here knows a route.

A client that goes away makes the ingress cancel the call; the replica's app then reads
``http.disconnect`` (as under uvicorn) and cancels its sequence.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, MutableMapping, Optional, Tuple

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]
# the ASGI scope keys a replica's app needs (the rest is the ingress server's own)
_SCOPE_KEYS = ("http_version", "method", "scheme", "path", "raw_path", "query_string", "headers", "client", "server")


@dataclass
class TunneledRequest:
    """An HTTP request as the ingress received it, body included (picklable)."""

    scope: Dict[str, Any]
    body: bytes

    @classmethod
    def from_scope(cls, scope: MutableMapping[str, Any], body: bytes) -> "TunneledRequest":
        inner = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
        inner["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
        inner["type"] = "http"
        inner["root_path"] = ""
        inner.setdefault("asgi", {"version": "3.0", "spec_version": "2.3"})
        return cls(scope=inner, body=body)


async def read_body(receive: Callable[[], Awaitable[Message]]) -> Optional[bytes]:
    """The whole request body, or None if the client disconnected first."""
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks)


async def run_app(app: ASGIApp, req: TunneledRequest, response_headers: List[Tuple[bytes, bytes]]) -> \
        AsyncIterator[Message]:
    """Replica side: run ``app`` on ``req``, yielding the messages it sends (``response_headers`` added
    to its response start). Closing the iterator early is the client going away."""
    out: "asyncio.Queue[Optional[Message]]" = asyncio.Queue()
    disconnected = asyncio.Event()
    body_read = False

    async def receive() -> Message:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(msg: Message) -> None:
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": list(msg.get("headers", [])) + response_headers}
        await out.put(msg)

    async def run() -> None:
        try:
            await app(dict(req.scope), receive, send)
        finally:
            await out.put(None)

    task = asyncio.ensure_future(run())
    try:
        while True:
            msg = await out.get()
            if msg is None:
                break
            yield msg
        await task  # its failure, if any, reaches the ingress
    finally:
        if not task.done():
            # cancelled or closed by the ingress: the app sees the disconnect and frees its sequence
            disconnected.set()


class Lifespan:
    """Runs an ASGI app's lifespan (startup now, shutdown on ``close``) outside any server."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._to_app: "asyncio.Queue[Message]" = asyncio.Queue()
        self._from_app: "asyncio.Queue[Message]" = asyncio.Queue()
        self._task: Optional["asyncio.Future[None]"] = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                                     self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        msg = await self._from_app.get()
        if msg["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app did not start: {msg.get('message', msg['type'])}")

    async def close(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()
        await self._task
