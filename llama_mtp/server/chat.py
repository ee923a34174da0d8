"""Chat completions: through llama.cpp's chat templates (llama-server's behaviour), or through
llama-cpp-python's own chat handler for a ``--chat_format`` the user named.

The handler path calls the request's chat handler (see ``chat_format.py``) with an
:class:`EngineLlama` as its ``llama``, so every chat format, tools and ``response_format``
work unchanged while the completion runs in the engine. The template path is
:mod:`llama_mtp.chat_completion` over the same EngineLlama.
"""

from __future__ import annotations

import contextlib

from typing import Any, Dict, Iterator, Optional, Union

from llama_mtp import chat_completion
from llama_mtp.errors import MtpArgumentError

from .chat_format import ChatHandler
from .completion import Completion, EngineLlama, Prompt, Usage
from .errors import ApiError

ChatCompletion = Dict[str, Any]


def create_chat_completion(handler: ChatHandler, llama: EngineLlama,
                           **kwargs: Any) -> Union[ChatCompletion, Iterator[ChatCompletion]]:
    """Run the chat handler on the engine; a stream's final chunk gets the completion's ``usage``."""
    if not kwargs.get("stream"):
        return handler(llama=llama, **kwargs)  # the handlers copy a whole completion's usage themselves
    tap = _UsageTap(llama)
    return tap.with_usage(handler(llama=tap, **kwargs))


class _UsageTap:
    """The ``llama`` a streaming chat handler gets: the request's EngineLlama, with the ``usage``
    of each completion it returns noted on the way through.

    The handlers' conversion of completion chunks to chat chunks drops ``usage``; the
    completion's own final chunk (or dict) carries it, so it is read there.
    """

    def __init__(self, llama: EngineLlama) -> None:
        self._llama = llama
        self._usage: Optional[Usage] = None

    def __getattr__(self, name: str) -> Any:
        # everything but the completion call is the EngineLlama's (including its refusals)
        return getattr(self._llama, name)

    def __call__(self, prompt: Prompt, **kwargs: Any) -> Union[Completion, Iterator[Completion]]:
        return self.create_completion(prompt, **kwargs)

    def create_completion(self, prompt: Prompt, **kwargs: Any) -> Union[Completion, Iterator[Completion]]:
        out = self._llama.create_completion(prompt, **kwargs)
        if isinstance(out, dict):
            self._usage = out["usage"]
            return out
        return self._noting(out)

    def _noting(self, chunks: Iterator[Completion]) -> Iterator[Completion]:
        for chunk in chunks:
            if "usage" in chunk:  # the completion's final chunk
                self._usage = chunk["usage"]
            yield chunk

    def with_usage(self, chunks: Iterator[ChatCompletion]) -> Iterator[ChatCompletion]:
        """The handler's chat chunks; the one that finishes the message gets the completion's usage."""
        for chunk in chunks:
            choices = chunk.get("choices") or []
            if choices and choices[0].get("finish_reason") is not None and self._usage is not None:
                chunk["usage"] = self._usage
            yield chunk


def create_templated_chat_completion(backend: Any, llama: EngineLlama, kwargs: Dict[str, Any],
                                     raw_body: Dict[str, Any]) -> Union[ChatCompletion, Iterator[ChatCompletion]]:
    """A chat completion through llama.cpp's chat templates (``backend.chat_templates``), as
    llama-server answers it: tool calls, reasoning_content, every family's format.

    ``kwargs``: the route's completion keywords (``bodies.templated_chat_call``); ``raw_body``:
    the request as sent, whose messages keep every field (tool_calls, reasoning_content) the
    template reads.
    """
    with _template_errors():
        return chat_completion.create_chat_completion(backend.chat_templates, backend.target, llama.create_completion,
                                                      raw_body, **kwargs)


def templated_prompt(backend: Any, raw_body: Any) -> str:
    """llama-server's /apply-template: the prompt a chat body renders to."""
    if not isinstance(raw_body, dict):
        raise ApiError("the body must be a JSON object", param=None)
    with _template_errors():
        return chat_completion.chat_prompt(backend.chat_templates, raw_body).prompt


@contextlib.contextmanager
def _template_errors() -> Iterator[None]:
    # what the template (or upstream's checks of messages and tools) refuses is the request's fault
    try:
        yield
    except MtpArgumentError as e:
        raise ApiError(str(e), param="messages") from None
