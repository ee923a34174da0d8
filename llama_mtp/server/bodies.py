"""Request bodies: llama_cpp.server's request models with the engine's additions, and their
translation into the keyword arguments of one completion call.

Fields that mean the same to ``Llama.create_completion`` (and the chat handlers) as to
the API pass through one ``model_dump(include=...)`` per route kind; the few that
need renaming or deriving are built here explicitly, and everything the engine
cannot serve is refused before anything is submitted.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import llama_cpp
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import Field

from .backend import Backend
from .errors import ApiError

_n_draft_field = Field(default=None, ge=0, description="llama_mtp: draft length for this request (0 = plain "
                       "decoding); default: the server's --n_draft.")
_cache_prompt_field = Field(default=True, description="llama-server's field: reuse what a slot holds of this "
                            "prompt (false: decode all of it).")


class CompletionRequest(CreateCompletionRequest):
    """llama_cpp.server's completion request, plus the per-request draft length."""

    n_draft: Optional[int] = _n_draft_field
    cache_prompt: bool = _cache_prompt_field


class ChatCompletionRequest(CreateChatCompletionRequest):
    """llama_cpp.server's chat request; max_tokens may not be negative, response_format may be json_schema."""

    max_tokens: Optional[int] = Field(default=None, ge=0, description="The maximum number of tokens to generate "
                                      "(0 or unset: up to the slot's context).")
    max_completion_tokens: Optional[int] = Field(default=None, ge=0, description="OpenAI's newer name for max_tokens.")
    response_format: Optional[Dict[str, Any]] = Field(default=None, description="text, json_object (optional "
                                                      "schema) or json_schema (json_schema.schema).")
    n_draft: Optional[int] = _n_draft_field
    cache_prompt: bool = _cache_prompt_field
    # read by llama.cpp's chat templates, as llama-server reads them (from the raw body)
    parallel_tool_calls: Optional[bool] = Field(default=None, description="Allow several tool calls in one "
                                                "reply (default: what the template supports).")
    chat_template_kwargs: Optional[Dict[str, Any]] = Field(default=None, description="Extra template variables, "
                                                           "e.g. {\"enable_thinking\": false}.")
    reasoning_format: Optional[str] = Field(default=None, description="llama-server's: none, auto, deepseek "
                                            "(default: reasoning in message.reasoning_content) or deepseek-legacy.")
    reasoning_effort: Optional[str] = Field(default=None, description="OpenAI's; \"none\" turns thinking off.")
    add_generation_prompt: Optional[bool] = Field(default=None, description="Open the assistant's turn "
                                                  "(default true).")


AnyRequest = Union[CompletionRequest, ChatCompletionRequest]

# passed to the completion as they come, by both routes
_SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k", "min_p", "stop", "stream", "seed", "presence_penalty",
                              "frequency_penalty", "repeat_penalty", "mirostat_mode", "mirostat_tau", "mirostat_eta"})
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"suffix", "max_tokens", "echo", "logprobs"}
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages", "functions", "function_call", "tools", "tool_choice"}


def completion_call(body: CompletionRequest, backend: Backend) -> Tuple[str, Dict[str, Any]]:
    """(prompt, keywords of ``EngineLlama.create_completion``) for a completion request."""
    _check(body, backend)
    prompt: Union[str, List[str]] = body.prompt
    if isinstance(prompt, list):
        if len(prompt) > 1:
            raise ApiError("one prompt per request", param="prompt")
        prompt = prompt[0] if prompt else ""
    if prompt == "":
        raise ApiError("the prompt is empty", param="prompt")
    return prompt, {**body.model_dump(include=COMPLETION_FIELDS), **_derived(body, backend)}


def chat_call(body: ChatCompletionRequest, backend: Backend) -> Dict[str, Any]:
    """Keywords of ``chat.create_chat_completion`` (after handler and llama) for a chat request."""
    _check(body, backend)
    if not body.messages:
        raise ApiError("messages must not be empty", param="messages")
    response_format = llama_response_format(body.response_format)
    max_tokens = _max_tokens(body)
    # OpenAI: logprobs=true alone returns the sampled tokens' logprobs (top_logprobs 0)
    top_logprobs = body.top_logprobs if body.top_logprobs is not None else (0 if body.logprobs else None)
    return {**body.model_dump(include=CHAT_FIELDS), **_derived(body, backend), "response_format": response_format,
            "max_tokens": max_tokens, "logprobs": bool(body.logprobs), "top_logprobs": top_logprobs}


def templated_chat_call(body: ChatCompletionRequest, backend: Backend) -> Dict[str, Any]:
    """Keywords of ``chat.create_templated_chat_completion`` for a chat request: the completion's
    sampling settings (the messages, tools, grammar and response_format go to the template)."""
    _check(body, backend)
    if body.stream and body.logprobs:
        raise ApiError("logprobs are not streamed for chats formatted by the model's template",
                       param="logprobs", code="unsupported_parameter")
    sampling = body.model_dump(include=_SAMPLING_FIELDS)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return {**sampling, "model": body.model or backend.model_alias, "logit_bias": _logit_bias(body, backend),
            "max_tokens": _max_tokens(body), "logprobs": logprobs}


def _max_tokens(body: ChatCompletionRequest) -> Optional[int]:
    """max_tokens, or OpenAI's newer name for it."""
    return body.max_tokens if body.max_tokens is not None else body.max_completion_tokens


def _check(body: AnyRequest, backend: Backend) -> None:
    """Refuse what neither route can serve: another model, several choices, min_tokens, a bad grammar."""
    backend.check_model(body.model)
    if (body.n or 1) > 1 or (getattr(body, "best_of", 1) or 1) > 1:
        raise ApiError("n > 1 / best_of > 1 are not supported: send one request per completion", param="n")
    if body.min_tokens > 0:
        raise ApiError("min_tokens needs a logits processor, which cannot run inside the engine",
                       param="min_tokens", code="unsupported_parameter")
    if body.grammar is not None:
        backend.check_grammar(body.grammar)


def _derived(body: AnyRequest, backend: Backend) -> Dict[str, Any]:
    """The keywords both routes derive from their body: the model's name, the grammar, the logit bias."""
    grammar = None if body.grammar is None else llama_cpp.LlamaGrammar.from_string(body.grammar, verbose=False)
    return {"model": body.model or backend.model_alias, "grammar": grammar, "logit_bias": _logit_bias(body, backend)}


def _logit_bias(body: AnyRequest, backend: Backend) -> Optional[Dict[str, float]]:
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


def llama_response_format(rf: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """OpenAI's response_format -> the form llama-cpp-python's handlers turn into a grammar.

    llama-cpp-python knows ``json_object`` (optionally with a ``schema``); OpenAI's
    ``json_schema`` type carries its schema under ``json_schema.schema``.
    """
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object", **({"schema": rf["schema"]} if rf.get("schema") is not None else {})}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError("response_format json_schema needs json_schema.schema (an object)",
                           param="response_format")
        return {"type": "json_object", "schema": spec["schema"]}
    raise ApiError(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                   param="response_format")
