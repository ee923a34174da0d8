"""The OpenAI-compatible routes (and llama_cpp.server's extras), as module-level functions on one router.

Routes and shapes follow ``llama_cpp.server`` (its request types, its SSE format),
with three differences that come from the engine: requests run concurrently (no
global model lock), a full queue answers 503 with Retry-After, and a client that
goes away cancels its sequence. Each route gets the app's :class:`Backend` and
:class:`Responder` through ``Depends`` (``create_app`` puts them on ``app.state``).
"""

from __future__ import annotations

import functools
from typing import Any, Dict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from llama_cpp.server.types import (
    DetokenizeInputRequest,
    DetokenizeInputResponse,
    ModelList,
    TokenizeInputCountResponse,
    TokenizeInputRequest,
    TokenizeInputResponse,
)

from . import chat
from .backend import Backend
from .bodies import ChatCompletionRequest, CompletionRequest, chat_call, completion_call, templated_chat_call
from .completion import EngineLlama
from .errors import ApiError
from .responses import Responder

router = APIRouter()


def get_backend(request: Request) -> Backend:
    return request.app.state.backend


def get_responder(request: Request) -> Responder:
    # made by the app's lifespan: its thread limiter needs the running event loop
    return request.app.state.responder


@router.post("/v1/completions", summary="Completion")
@router.post("/v1/engines/copilot-codex/completions", include_in_schema=False)
async def create_completion(request: Request, body: CompletionRequest, backend: Backend = Depends(get_backend),
                            responder: Responder = Depends(get_responder)) -> Response:
    prompt, kwargs = completion_call(body, backend)
    llama = EngineLlama(backend, kind="completion", n_draft=body.n_draft, cache_prompt=body.cache_prompt)
    fn = functools.partial(llama.create_completion, prompt, **kwargs)
    return await responder.respond(request, llama, fn, body.stream, "prompt")


@router.post("/v1/chat/completions", summary="Chat")
async def create_chat_completion(request: Request, body: ChatCompletionRequest,
                                 backend: Backend = Depends(get_backend),
                                 responder: Responder = Depends(get_responder)) -> Response:
    llama = EngineLlama(backend, kind="chat", n_draft=body.n_draft, cache_prompt=body.cache_prompt)
    if backend.chat_templates is not None:
        # the raw body: its messages keep every field a template reads (tool_calls, reasoning_content)
        raw_body = await request.json()
        fn = functools.partial(chat.create_templated_chat_completion, backend, llama,
                               templated_chat_call(body, backend), raw_body)
    else:
        fn = functools.partial(chat.create_chat_completion, backend.chat_handler, llama, **chat_call(body, backend))
    return await responder.respond(request, llama, fn, body.stream, "messages")


@router.post("/apply-template", summary="Apply the chat template")
async def apply_template(request: Request, backend: Backend = Depends(get_backend)) -> Dict[str, Any]:
    """llama-server's: the prompt a chat body renders to (llama.cpp's templates only)."""
    if backend.chat_templates is None:
        raise ApiError("the server formats chats with llama-cpp-python's --chat_format handler, which has no "
                       "template to apply", status=400, code="unsupported_parameter")
    return {"prompt": chat.templated_prompt(backend, await request.json())}


@router.get("/v1/models", summary="Models")
async def get_models(backend: Backend = Depends(get_backend)) -> ModelList:
    return {"object": "list", "data": [{"id": backend.model_alias, "object": "model", "owned_by": "me",
                                        "permissions": []}]}


@router.post("/extras/tokenize", summary="Tokenize")
async def tokenize(body: TokenizeInputRequest, backend: Backend = Depends(get_backend)) -> TokenizeInputResponse:
    backend.check_model(body.model)
    return TokenizeInputResponse(tokens=backend.tokenize(body.input))


@router.post("/extras/tokenize/count", summary="Tokenize Count")
async def count_query_tokens(body: TokenizeInputRequest,
                             backend: Backend = Depends(get_backend)) -> TokenizeInputCountResponse:
    backend.check_model(body.model)
    return TokenizeInputCountResponse(count=len(backend.tokenize(body.input)))


@router.post("/extras/detokenize", summary="Detokenize")
async def detokenize(body: DetokenizeInputRequest, backend: Backend = Depends(get_backend)) -> DetokenizeInputResponse:
    backend.check_model(body.model)
    bad = [t for t in body.tokens if not 0 <= t < backend.n_vocab]
    if bad:
        raise ApiError(f"token {bad[0]} is outside the vocabulary [0, {backend.n_vocab})", param="tokens")
    return DetokenizeInputResponse(text=backend.detok(body.tokens))


@router.get("/metrics", include_in_schema=False)
async def metrics(backend: Backend = Depends(get_backend)) -> Response:
    # unauthenticated, as vLLM's: scrapers rarely carry the API key, and counts reveal no content
    body, content_type = backend.metrics.render()
    return Response(content=body, media_type=content_type)


@router.get("/health", include_in_schema=False)
async def health(backend: Backend = Depends(get_backend)) -> Dict[str, Any]:
    e = backend.engine
    return {"status": "ok", "slots": e.n_slots, "running": e.n_running, "waiting": e.n_waiting}
