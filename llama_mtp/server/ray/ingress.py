"""The ingress: Serve's HTTP entry point, sending each request to a replica by its conversation key.

It holds no model and knows no route: it reads the body, computes the key (``affinity.py``), and
hands the request to the replicas' deployment through a Serve handle (``tunnel.py``); the request
router (``router.py``) picks the replica. What the ingress adds is what only it can see:

- ``/metrics``: every replica's metrics, labelled per replica (``metrics.py``);
- a replica that dies mid-stream: the stream ends with an OpenAI error event
  (``data: {"error": ...}``, which the ``openai`` client raises as ``APIError``), never a hang;
  before the response started: 503 with ``Retry-After`` (Serve restarts the replica, and the
  router sends the retry to a live one);
- overload: when every replica is at its ``max_ongoing_requests`` and ``max_queued_requests`` are
  already waiting, Serve's ``BackPressureError`` becomes the single-process server's 503
  (``code: queue_full``, ``Retry-After: 1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Awaitable, Callable, List, MutableMapping, Tuple

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ..errors import ApiError
from .affinity import conversation_key
from .metrics import merge
from .router import KEY_KWARG
from .tunnel import Message, TunneledRequest, read_body

log = logging.getLogger("llama_mtp.server")

Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Relay:
    """The ingress's ASGI app."""

    def __init__(self, replicas: DeploymentHandle, hub: DeploymentHandle) -> None:
        self._replicas = replicas.options(stream=True)
        self._hub = hub

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websocket routes
        body = await read_body(receive)
        if body is None:
            return  # gone before it sent its body
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            # unauthenticated, as the single-process server's (scrapers rarely carry the API key)
            content, content_type = merge(await self._hub.reports.remote())
            await _respond(send, 200, content, [(b"content-type", content_type.encode())])
            return
        key = conversation_key(scope["path"], scope.get("headers", []), body)
        call = self._replicas.handle.remote(TunneledRequest.from_scope(scope, body), **{KEY_KWARG: key})
        await self._relay(call, receive, send)

    async def _relay(self, call: Any, receive: Receive, send: Send) -> None:
        state = {"started": False, "sse": False}

        async def pump() -> None:
            async for msg in call:
                if msg["type"] == "http.response.start":
                    state["started"] = True
                    state["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                       for k, v in msg.get("headers", []))
                await send(msg)

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # Serve cancels this request (its client went away)
            call.cancel()
            pumping.cancel()
            watching.cancel()
            raise
        watching.cancel()
        if not pumping.done():
            # the client went away: cancel the replica's request, whose app then reads the
            # disconnect and frees its sequence
            call.cancel()
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping
            return
        exc = pumping.exception()
        if exc is not None:
            await _fail(send, exc, started=state["started"], sse=state["sse"])


async def _fail(send: Send, exc: BaseException, *, started: bool, sse: bool) -> None:
    if isinstance(exc, BackPressureError):
        err = ApiError(f"the server is busy: {exc}", status=503, err_type="server_error", code="queue_full",
                       headers={"Retry-After": "1"})
    else:
        log.warning("a replica failed while serving a request: %s: %s", type(exc).__name__, exc)
        why = (str(exc).strip().splitlines() or [""])[0]  # Ray's actor errors go on for lines of ids
        err = ApiError(f"the replica serving this request failed: {type(exc).__name__}: {why}", status=503,
                       err_type="server_error", code="replica_failed", headers={"Retry-After": "1"})
    if not started:
        headers = [(b"content-type", b"application/json")] + [(k.lower().encode(), v.encode())
                                                              for k, v in err.headers.items()]
        await _respond(send, err.status, json.dumps(err.body()).encode(), headers)
        return
    with contextlib.suppress(Exception):  # the client may be gone too
        if sse:
            # the single-process server's in-band error event (server/errors.sse_error's shape)
            await send({"type": "http.response.body", "body": f"data: {json.dumps(err.body())}\n\n".encode(),
                        "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _respond(send: Send, status: int, body: bytes, headers: List[Tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class MtpIngress:
    """Serve's HTTP ingress deployment (``@serve.ingress()`` late-bound: the app needs the handles)."""

    def __init__(self, replicas: DeploymentHandle, hub: DeploymentHandle) -> None:
        self._app = Relay(replicas, hub)

    def __serve_build_asgi_app__(self) -> Relay:
        return self._app


def ingress_class() -> type:
    """MtpIngress wrapped as Serve's ingress (done on use: ``serve.ingress`` needs Ray imported)."""
    from ray import serve

    return serve.ingress()(MtpIngress)


