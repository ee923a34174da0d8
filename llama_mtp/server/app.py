"""The FastAPI app: the routes of ``routes.py`` over one Backend, with errors, auth, CORS and lifespan.

Every failure answers OpenAI's error body (``errors.py``); with ``--api_key`` the
``/v1/`` and ``/extras/`` paths need ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence, Tuple

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from llama_cpp.server.settings import ServerSettings
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_mtp.version import __version__

from .backend import Backend
from .errors import ApiError, classify, error_body
from .responses import Responder
from .routes import router

# worker threads beyond one per slot and waiting place (tokenize calls, streams' last reads)
_SPARE_THREADS = 16


def create_app(backend: Backend, server_settings: Optional[ServerSettings] = None) -> FastAPI:
    """The app serving ``backend``; closing the app (lifespan end) closes the backend."""
    settings = server_settings or ServerSettings()
    app = FastAPI(title="llama_mtp server", version=__version__, root_path=settings.root_path, lifespan=_lifespan)
    # what the routes' dependencies, the middleware and the lifespan read
    app.state.backend = backend
    app.state.settings = settings
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    app.middleware("http")(_authenticate)  # added last: the outermost, so it runs before CORS
    for exc_type, handler in _EXCEPTION_HANDLERS:
        app.add_exception_handler(exc_type, handler)
    app.include_router(router)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    backend: Backend = app.state.backend
    settings: ServerSettings = app.state.settings
    # one thread per waiting request at most: blocked reads never queue behind each other
    # (made here: a CapacityLimiter needs the running event loop)
    limiter = anyio.CapacityLimiter(backend.engine.n_slots + backend.engine.max_waiting + _SPARE_THREADS)
    app.state.responder = Responder(limiter, ping=not settings.disable_ping_events)
    try:
        yield
    finally:
        await anyio.to_thread.run_sync(backend.close)


async def _authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    # a middleware, not a dependency: the key is checked before the body is even read
    key = request.app.state.settings.api_key
    path = request.url.path
    if key is not None and (path.startswith("/v1/") or path.startswith("/extras/")):
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != key:
            return JSONResponse(error_body("Invalid API key", "invalid_request_error", None, "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


# -- errors: every one answers OpenAI's error body -----------------------------------------


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # the top-level field: deeper loc entries mix in pydantic's union member tags ("prompt.str")
    param = loc[0] if loc else None
    if first.get("type") == "json_invalid":
        param = None  # its loc is a character offset
        msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    else:
        msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
    return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"), status_code=400)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    err = classify(exc)  # logs the traceback
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(exc.detail), err_type), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


_EXCEPTION_HANDLERS: Sequence[Tuple[type, Callable[[Request, Any], Awaitable[Response]]]] = (
    (ApiError, _api_error),
    (RequestValidationError, _validation_error),
    (Exception, _unexpected),
    (StarletteHTTPException, _http_error),
)
