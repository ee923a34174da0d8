"""OpenAI chat completions over llama.cpp's chat templates: what ``MtpLlama.create_chat_completion``
and the server's ``/v1/chat/completions`` answer for a model whose GGUF carries a template.

The request goes through :meth:`ChatTemplates.apply` (llama-server's rendering, tool-call
grammar and format detection), one completion runs on the prompt with the template's grammar,
stops and preserved tokens, and the reply is parsed as it is generated into ``content``,
``reasoning_content`` and ``tool_calls`` (``finish_reason: "tool_calls"``), streamed as
OpenAI's ``delta`` chunks exactly as llama-server builds them.

The completion itself is the caller's (a llama-cpp-python style ``create_completion``
returning a completion dict or an iterator of chunks): MTP decoding, the prompt cache and the
engine are all below it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

from . import _compat
from .chat_templates import ChatParser, ChatPrompt, ChatTemplates, ParsedReply, sampling_plan, user_spans
from .core import tokenize_prompt
from .errors import MtpArgumentError

ChatCompletion = Dict[str, Any]
# (prompt, **keywords) -> a completion dict or an iterator of completion chunks
Complete = Callable[..., Union[Dict[str, Any], Iterator[Dict[str, Any]]]]

# fields of the chat body that shape the prompt (the rest are sampling settings of the completion)
TEMPLATE_FIELDS = frozenset({
    "messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "reasoning_format",
    "add_generation_prompt", "continue_final_message", "reasoning_effort", "response_format", "json_schema",
    "grammar",
})


def chat_prompt(templates: ChatTemplates, body: Mapping[str, Any]) -> ChatPrompt:
    """The rendered prompt and reply plan of a chat body (its template fields only)."""
    return templates.apply({k: v for k, v in body.items() if k in TEMPLATE_FIELDS and v is not None})


def create_chat_completion(templates: ChatTemplates, llm: Any, complete: Complete, body: Mapping[str, Any], *,
                           model: str, stream: bool = False, stop: Any = None, with_user_spans: bool = True,
                           **completion_kwargs: Any) -> Union[ChatCompletion, Iterator[ChatCompletion]]:
    """One chat completion: ``body``'s template fields render the prompt (see TEMPLATE_FIELDS),
    ``complete(prompt_tokens, stream=..., stop=..., grammar=..., special_ids=..., [user_spans=...,]
    **completion_kwargs)`` generates the reply; ``user_spans`` (where the prompt's user messages
    start and end, for a slot cache) only ``with_user_spans``. ``llm``: the Llama whose vocabulary
    tokenizes the template's markers.

    Raises MtpArgumentError for a request the template refuses, before anything is generated.
    """
    chat = chat_prompt(templates, body)
    grammar, special_ids = sampling_plan(chat, llm)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stops += [s for s in chat.additional_stops if s not in stops]
    tokens = tokenize_prompt(llm, chat.prompt)
    kwargs = dict(completion_kwargs, stop=stops or None, special_ids=special_ids)
    if with_user_spans:
        kwargs["user_spans"] = user_spans(chat, llm, tokens)
    if grammar is not None:
        kwargs["grammar"] = grammar
    elif completion_kwargs.get("grammar") is not None:
        raise MtpArgumentError("a grammar must go through the template (the body's grammar field)")
    reply = _Reply(chat, model)
    if not stream:
        return reply.whole(complete(tokens, stream=False, **kwargs))
    chunks = complete(tokens, stream=True, **kwargs)
    return reply.stream(chunks)


class _Reply:
    """The chat response for one completion: parsed as llama-server parses it, shaped as OpenAI's."""

    def __init__(self, chat: ChatPrompt, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @staticmethod
    def finish_reason(completion_reason: Optional[str], parsed: ParsedReply) -> Optional[str]:
        # llama-server: a reply that ended by itself (EOG or a stop) and holds tool calls ends "tool_calls"
        if completion_reason == "stop" and parsed.has_tool_calls:
            return "tool_calls"
        return completion_reason

    def whole(self, completion: Dict[str, Any]) -> ChatCompletion:
        choice = completion["choices"][0]
        with self.chat.parser(stream=False) as parser:
            parsed = parser.update(choice["text"], final=True)
        message = dict(parsed.message)
        out: ChatCompletion = {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": _compat.chat_logprobs(choice.get("logprobs")),
                         "finish_reason": self.finish_reason(choice.get("finish_reason"), parsed)}],
        }
        if "usage" in completion:
            out["usage"] = completion["usage"]
        return out

    def chunk(self, delta: Dict[str, Any], finish_reason: Optional[str] = None) -> ChatCompletion:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def stream(self, chunks: Iterator[Dict[str, Any]]) -> Iterator[ChatCompletion]:
        """The reply's chunks: a role chunk, one chunk per parsed delta (content, reasoning_content,
        tool call name/arguments), the deltas of the final strict parse, then the finish chunk
        (with the completion's ``usage``)."""
        parser: ChatParser = self.chat.parser(stream=True)
        try:
            yield self.chunk({"role": "assistant", "content": None})
            finish: Optional[str] = None
            usage = None
            for item in chunks:
                choice = item["choices"][0]
                if "usage" in item:
                    usage = item["usage"]
                if choice.get("finish_reason") is not None:
                    finish = choice["finish_reason"]
                if choice.get("text"):
                    for delta in parser.update(choice["text"]).deltas:
                        yield self.chunk(delta)
            parsed = parser.update("", final=True)
            for delta in parsed.deltas:
                yield self.chunk(delta)
            last = self.chunk({}, self.finish_reason(finish, parsed))
            if usage is not None:
                last["usage"] = usage
            yield last
        finally:
            parser.close()
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # the client went away: the completion stops too

