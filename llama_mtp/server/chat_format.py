"""Which chat handler formats a request's messages: chosen as llama-cpp-python chooses it.

The handler is chosen as ``llama_cpp.Llama.create_chat_completion`` chooses it
(``chat_handler``, else the GGUF template named by ``chat_format``, else the
registered format of that name) and built as ``llama_cpp.server`` builds it
(``hf-tokenizer-config``, ``chat_template_kwargs``). The chat route later calls
it with an engine-backed stand-in as its ``llama`` (see ``chat.py``).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional

import llama_cpp
from llama_cpp import llama_chat_format
from llama_cpp.server.settings import ModelSettings

from .settings import SettingsError

ChatHandler = Callable[..., Any]


def metadata_handlers(target: llama_cpp.Llama) -> Dict[str, ChatHandler]:
    """The chat handlers ``Llama.__init__`` builds from the GGUF's chat templates, by format name.

    Rebuilt from public data (the metadata and the vocabulary) rather than read from the
    Llama's private handler table.
    """
    metadata = target.metadata or {}
    templates = {name[len("tokenizer.chat_template."):]: tpl for name, tpl in metadata.items()
                 if name.startswith("tokenizer.chat_template.")}
    if "tokenizer.chat_template" in metadata:
        templates["chat_template.default"] = metadata["tokenizer.chat_template"]
    vocab = llama_cpp.llama_model_get_vocab(target.model)
    eos_id, bos_id = target.token_eos(), target.token_bos()

    def text(tok: int) -> str:
        return llama_cpp.llama_vocab_get_text(vocab, tok).decode("utf-8") if tok != -1 else ""

    return {name: llama_chat_format.Jinja2ChatFormatter(template=tpl, eos_token=text(eos_id), bos_token=text(bos_id),
                                                        stop_token_ids=[eos_id]).to_chat_handler()
            for name, tpl in templates.items()}


def resolve_handler(target: llama_cpp.Llama, settings: ModelSettings) -> ChatHandler:
    """The chat handler for ``target`` (whose ``chat_format`` Llama.__init__ already settled)."""
    handler: Optional[ChatHandler] = target.chat_handler
    if handler is None and settings.chat_format == "hf-tokenizer-config":
        if settings.hf_tokenizer_config_path is None:
            raise SettingsError("--chat_format hf-tokenizer-config needs --hf_tokenizer_config_path")
        with open(settings.hf_tokenizer_config_path) as f:
            handler = llama_chat_format.hf_tokenizer_config_to_chat_completion_handler(json.load(f))
    if handler is None:
        handler = metadata_handlers(target).get(target.chat_format)
    if handler is None:
        try:
            handler = llama_chat_format.get_chat_completion_handler(target.chat_format)
        except llama_chat_format.LlamaChatCompletionHandlerNotFoundException as e:
            raise SettingsError(f"--chat_format {target.chat_format}: {e}") from None
    extra = settings.chat_template_kwargs
    if extra:
        base = handler

        def with_template_kwargs(*args: Any, **kwargs: Any) -> Any:
            return base(*args, **{**extra, **kwargs})

        handler = with_template_kwargs
    return handler
