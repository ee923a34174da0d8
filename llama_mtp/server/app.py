"""The FastAPI app: OpenAI-compatible routes over one Backend (model + multi-sequence Engine).

Routes and shapes follow ``llama_cpp.server`` (its request types, its SSE
format ``data: {...}\\n\\n ... data: [DONE]``), with three differences that
come from the engine: requests run concurrently (no global model lock), a
full queue answers 503 with Retry-After, and a client that goes away cancels
its sequence so the slot frees at the engine's next step.

Blocking work (chat templating, submitting, waiting for pieces) runs in worker
threads; each request races it against a watcher of the client's connection.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import llama_cpp
from llama_cpp.server.settings import ServerSettings
from llama_cpp.server.types import (
    CreateChatCompletionRequest,
    CreateCompletionRequest,
    DetokenizeInputRequest,
    DetokenizeInputResponse,
    ModelList,
    TokenizeInputCountResponse,
    TokenizeInputRequest,
    TokenizeInputResponse,
)

import llama_mtp

from . import chat
from .backend import Backend
from .completion import EngineLlama
from .errors import ApiError, classify, error_body, sse_error

log = logging.getLogger("llama_mtp.server")

_END = object()
# seconds between checks of a waiting request's connection
_DISCONNECT_POLL_S = 0.2


# ------------------------------------------------------------------------------ request types

_n_draft_field = Field(default=None, ge=0, description="llama_mtp: draft length for this request (0 = plain "
                       "decoding); default: the server's --n_draft.")


class CompletionRequest(CreateCompletionRequest):
    """llama_cpp.server's completion request, plus the per-request draft length."""

    n_draft: Optional[int] = _n_draft_field


class ChatCompletionRequest(CreateChatCompletionRequest):
    """llama_cpp.server's chat request; max_tokens may not be negative, response_format may be json_schema."""

    max_tokens: Optional[int] = Field(default=None, ge=0, description="The maximum number of tokens to generate "
                                      "(0 or unset: up to the slot's context).")
    max_completion_tokens: Optional[int] = Field(default=None, ge=0, description="OpenAI's newer name for max_tokens.")
    response_format: Optional[Dict[str, Any]] = Field(default=None, description="text, json_object (optional "
                                                      "schema) or json_schema (json_schema.schema).")
    n_draft: Optional[int] = _n_draft_field


# ------------------------------------------------------------------------------ app


def create_app(backend: Backend, server_settings: Optional[ServerSettings] = None) -> FastAPI:
    """The app serving ``backend``; closing the app (lifespan end) closes the backend."""
    settings = server_settings or ServerSettings()
    state: Dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # one thread per waiting request at most: blocked reads never queue behind each other
        state["limiter"] = anyio.CapacityLimiter(backend.engine.n_slots + _max_waiting(backend) + 16)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(backend.close)

    app = FastAPI(title="llama_mtp server", version=llama_mtp.__version__, root_path=settings.root_path,
                  lifespan=lifespan)
    app.state.backend = backend
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    # --disable_ping_events: no keep-alive comments (some clients choke on them)
    ping_kwargs: Dict[str, Any] = {"ping": 365 * 24 * 3600} if settings.disable_ping_events else {}

    # -- errors ---------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = classify(exc)  # logs the traceback
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), err_type), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    # -- auth ------------------------------------------------------------------------------

    @app.middleware("http")
    async def _authenticate(request: Request, call_next: Callable[..., Any]) -> Response:
        # a middleware, not a dependency: the key is checked before the body is even parsed
        key = settings.api_key
        path = request.url.path
        if key is not None and (path.startswith("/v1/") or path.startswith("/extras/")):
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or token.strip() != key:
                return JSONResponse(error_body("Invalid API key", "invalid_request_error", None, "invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    # -- plumbing --------------------------------------------------------------------------

    async def blocking(request: Request, llama: EngineLlama, fn: Callable[[], Any], param: str) -> Any:
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
                result = await anyio.to_thread.run_sync(fn, limiter=state["limiter"])
            except Exception as e:  # raised outside the task group, or it arrives as an ExceptionGroup
                error = e
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise classify(error, param=param) from None
        return result

    async def events(llama: EngineLlama, it: Any, first: Any) -> AsyncIterator[Dict[str, str]]:
        try:
            chunk = first
            while chunk is not _END:
                yield {"data": json.dumps(chunk)}
                # abandon the blocked read on cancellation (client gone): llama.cancel() below ends it
                chunk = await _run_abandonable(functools.partial(next, it, _END), state["limiter"])
            yield {"data": "[DONE]"}
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as e:  # a failure after the stream started: tell the client in-band
            yield {"data": sse_error(classify(e))}
        finally:
            llama.cancel()  # no-op once finished; otherwise frees the slot at the next step

    async def respond(request: Request, llama: EngineLlama, fn: Callable[[], Any], stream: bool,
                      param: str) -> Response:
        if not stream:
            return JSONResponse(await blocking(request, llama, fn, param))
        it = await blocking(request, llama, fn, param)
        # read the first chunk before answering, so errors at the start still get their status code
        first = await blocking(request, llama, functools.partial(next, it, _END), param)
        return EventSourceResponse(events(llama, it, first), sep="\n", **ping_kwargs)

    def common_checks(body: Union[CompletionRequest, ChatCompletionRequest]) -> None:
        backend.check_model(body.model)
        if (body.n or 1) > 1 or (getattr(body, "best_of", 1) or 1) > 1:
            raise ApiError("n > 1 / best_of > 1 are not supported: send one request per completion", param="n")
        if body.min_tokens > 0:
            raise ApiError("min_tokens needs a logits processor, which cannot run inside the engine",
                           param="min_tokens", code="unsupported_parameter")
        if body.grammar is not None:
            backend.check_grammar(body.grammar)

    def logit_bias(body: Union[CompletionRequest, ChatCompletionRequest]) -> Optional[Dict[str, float]]:
        if body.logit_bias is None:
            return None
        if body.logit_bias_type != "tokens":
            return dict(body.logit_bias)
        # llama_cpp.server's "tokens" type: bias every token of each key's text
        out: Dict[str, float] = {}
        for text, score in body.logit_bias.items():
            for tok in backend.tokenize(text, add_bos=False):
                out[str(tok)] = score
        return out

    def grammar(body: Union[CompletionRequest, ChatCompletionRequest]) -> Optional[llama_cpp.LlamaGrammar]:
        return None if body.grammar is None else llama_cpp.LlamaGrammar.from_string(body.grammar, verbose=False)

    # -- routes ----------------------------------------------------------------------------

    @app.post("/v1/completions", summary="Completion")
    @app.post("/v1/engines/copilot-codex/completions", include_in_schema=False)
    async def create_completion(request: Request, body: CompletionRequest) -> Response:
        common_checks(body)
        prompt: Union[str, List[str]] = body.prompt
        if isinstance(prompt, list):
            if len(prompt) > 1:
                raise ApiError("one prompt per request", param="prompt")
            prompt = prompt[0] if prompt else ""
        if prompt == "":
            raise ApiError("the prompt is empty", param="prompt")
        llama = EngineLlama(backend, kind="completion", n_draft=body.n_draft)
        fn = functools.partial(
            llama.create_completion, prompt, suffix=body.suffix, max_tokens=body.max_tokens,
            temperature=body.temperature, top_p=body.top_p, min_p=body.min_p, echo=body.echo, stop=body.stop,
            stream=body.stream, logprobs=body.logprobs, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logit_bias=logit_bias(body), seed=body.seed,
            top_k=body.top_k, repeat_penalty=body.repeat_penalty, mirostat_mode=body.mirostat_mode,
            mirostat_tau=body.mirostat_tau, mirostat_eta=body.mirostat_eta, grammar=grammar(body),
            model=body.model or backend.model_alias)
        return await respond(request, llama, fn, body.stream, "prompt")

    @app.post("/v1/chat/completions", summary="Chat")
    async def create_chat_completion(request: Request, body: ChatCompletionRequest) -> Response:
        common_checks(body)
        if not body.messages:
            raise ApiError("messages must not be empty", param="messages")
        dumped = body.model_dump(include={"messages", "functions", "function_call", "tools", "tool_choice"})
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        # OpenAI: logprobs=true alone returns the sampled tokens' logprobs (top_logprobs 0)
        top_logprobs = body.top_logprobs if body.top_logprobs is not None else (0 if body.logprobs else None)
        llama = EngineLlama(backend, kind="chat", n_draft=body.n_draft)
        fn = functools.partial(
            chat.create_chat_completion, backend.chat_handler, llama, **dumped,
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            stream=body.stream, stop=body.stop, seed=body.seed,
            response_format=chat.llama_response_format(body.response_format), max_tokens=max_tokens,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repeat_penalty=body.repeat_penalty, mirostat_mode=body.mirostat_mode, mirostat_tau=body.mirostat_tau,
            mirostat_eta=body.mirostat_eta, model=body.model or backend.model_alias, grammar=grammar(body),
            logit_bias=logit_bias(body), logprobs=bool(body.logprobs), top_logprobs=top_logprobs)
        return await respond(request, llama, fn, body.stream, "messages")

    @app.get("/v1/models", summary="Models")
    async def get_models() -> ModelList:
        return {"object": "list", "data": [{"id": backend.model_alias, "object": "model", "owned_by": "me",
                                            "permissions": []}]}

    @app.post("/extras/tokenize", summary="Tokenize")
    async def tokenize(body: TokenizeInputRequest) -> TokenizeInputResponse:
        backend.check_model(body.model)
        return TokenizeInputResponse(tokens=backend.tokenize(body.input))

    @app.post("/extras/tokenize/count", summary="Tokenize Count")
    async def count_query_tokens(body: TokenizeInputRequest) -> TokenizeInputCountResponse:
        backend.check_model(body.model)
        return TokenizeInputCountResponse(count=len(backend.tokenize(body.input)))

    @app.post("/extras/detokenize", summary="Detokenize")
    async def detokenize(body: DetokenizeInputRequest) -> DetokenizeInputResponse:
        backend.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < backend.n_vocab]
        if bad:
            raise ApiError(f"token {bad[0]} is outside the vocabulary [0, {backend.n_vocab})", param="tokens")
        return DetokenizeInputResponse(text=backend.detok(body.tokens))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # unauthenticated, as vLLM's: scrapers rarely carry the API key, and counts reveal no content
        body, content_type = backend.metrics.render()
        return Response(content=body, media_type=content_type)

    @app.get("/health", include_in_schema=False)
    async def health() -> Dict[str, Any]:
        e = backend.engine
        return {"status": "ok", "slots": e.n_slots, "running": e.n_running, "waiting": e.n_waiting}

    return app


def _max_waiting(backend: Backend) -> int:
    return int(getattr(backend.engine, "max_waiting", 64))


# anyio >= 4.1 calls it abandon_on_cancel; older versions cancellable
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(anyio.to_thread.run_sync).parameters
            else "cancellable")


async def _run_abandonable(fn: Callable[[], Any], limiter: anyio.CapacityLimiter) -> Any:
    """to_thread.run_sync that returns at once when cancelled (the thread finishes on its own)."""
    return await anyio.to_thread.run_sync(fn, limiter=limiter, **{_ABANDON: True})
