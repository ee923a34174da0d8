"""OpenAI-style error bodies, ``{"error": {"message", "type", "param", "code"}}``, for every failure.

Each request failure becomes one of these with a fitting status code; nothing a
client sends can take the process down or leak a traceback into a response.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, Optional

from llama_mtp.errors import EngineClosedError, MtpArgumentError, QueueFullError

log = logging.getLogger("llama_mtp.server")


class ApiError(Exception):
    """A request error with its HTTP status and OpenAI error fields."""

    def __init__(self, message: str, *, param: Optional[str] = None, status: int = 400,
                 err_type: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.err_type = err_type
        self.code = code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return error_body(self.message, self.err_type, self.param, self.code)


class UnsupportedParameterError(ApiError):
    """A request (or chat format) needs something the engine cannot do."""

    def __init__(self, message: str, *, param: Optional[str] = None, status: int = 400) -> None:
        super().__init__(message, param=param, status=status,
                         err_type="invalid_request_error" if status < 500 else "server_error",
                         code="unsupported_parameter" if status < 500 else "unsupported_chat_format")


def error_body(message: str, err_type: str, param: Optional[str] = None, code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def classify(exc: BaseException, *, param: str = "prompt") -> ApiError:
    """Map any exception a request raised to an ApiError (unexpected ones are logged with a traceback)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(f"the server is busy: {exc}", status=503, err_type="server_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(exc, EngineClosedError):
        return ApiError("the server is shutting down", status=503, err_type="server_error", code="engine_closed")
    if isinstance(exc, (MtpArgumentError, ValueError)):
        msg = str(exc)
        if "context" in msg.lower() or "n_ctx" in msg:
            return ApiError(msg, param=param, code="context_length_exceeded")
        return ApiError(msg, param=None)
    log.exception("request failed: %s", exc)
    return ApiError(f"internal error: {type(exc).__name__}: {exc}", status=500, err_type="server_error")


def sse_error(err: ApiError) -> str:
    """The SSE data of an error that happens after a stream started (the openai client raises it)."""
    return json.dumps(err.body())
