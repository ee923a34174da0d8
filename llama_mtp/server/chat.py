"""Chat completions through llama-cpp-python's own chat handler machinery.

The request's chat handler (see ``chat_format.py``) is called with an
:class:`EngineLlama` as its ``llama``, so every chat format, tools and
``response_format`` work unchanged while the completion runs in the engine.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Union

from .chat_format import ChatHandler
from .completion import Completion, EngineLlama, Prompt, Usage

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
