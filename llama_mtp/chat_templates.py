"""Chat templates and chat output parsing by llama.cpp's own ``common/chat.cpp``, as llama-server runs them.

:class:`ChatTemplates` loads a model's templates (the GGUF's ``tokenizer.chat_template`` and its
``tool_use`` variant) with upstream's jinja engine. :meth:`ChatTemplates.apply` turns an OpenAI
chat body (messages with ``tool_calls`` and ``tool`` results, ``tools``, ``tool_choice``,
``parallel_tool_calls``, ``chat_template_kwargs``, ``reasoning_format``, ``response_format``) into a
:class:`ChatPrompt`: the prompt text, the tool-call grammar with its lazy triggers, extra stops,
and the parser of the reply's format, all chosen by upstream's per-family code and automatic
format detection. :class:`ChatParser` parses the reply as it grows into an OpenAI message
(``content``, ``reasoning_content``, ``tool_calls``) and its streaming deltas.

Every family's quirks thus stay those of the llama.cpp the installed llama-cpp-python vendors.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import llama_cpp

from . import _compat, _loader
from .errors import MtpArgumentError, MtpError, SessionClosedError

log = logging.getLogger("llama_mtp.chat")

# llama-server's defaults (common_params): reasoning split into reasoning_content, thinking on
# where the template supports it, a trailing assistant message continued, past reasoning kept
SERVER_DEFAULTS: Mapping[str, Any] = {
    "reasoning_format": "deepseek",
    "enable_thinking": True,
    "prefill_assistant": True,
    "chat_template_kwargs": {"preserve_reasoning": "true"},
}


def _call_json(status: int, out: Any, what: str) -> Any:
    """Read a shim JSON answer (and free it); a failed status raises with the shim's message."""
    ffi, lib = _loader.load()
    try:
        if status != lib.MTP_OK:
            message = _loader.last_error()
            if status in (lib.MTP_ERR_ARG, lib.MTP_ERR_NULL):
                raise MtpArgumentError(message)
            raise MtpError(f"{what}: {message}")
        return json.loads(ffi.string(out[0]).decode("utf-8"))
    finally:
        if out[0] != ffi.NULL:
            lib.mtp_string_free(out[0])


def _json_arg(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise MtpArgumentError(f"the chat request is not JSON-serialisable: {e}") from None


@dataclass(frozen=True)
class GrammarTrigger:
    """When a lazy grammar starts: a word, a regex pattern (``pattern_full``: anchored) or a token."""

    type: str
    value: str
    token: int = -1


@dataclass(frozen=True)
class ChatPrompt:
    """What upstream's ``common_chat_templates_apply`` made of one request."""

    prompt: str
    format: str
    grammar: str
    grammar_lazy: bool
    grammar_type: str  # "none", "user" (the request's own) or "tool_calls" (the template's)
    grammar_triggers: Tuple[GrammarTrigger, ...]
    preserved_tokens: Tuple[str, ...]
    additional_stops: Tuple[str, ...]
    generation_prompt: str
    parse_tool_calls: bool
    reasoning_format: str
    enable_thinking: bool
    raw: Mapping[str, Any] = field(repr=False)  # the shim's answer, what the parser is built from
    # (role, text) where each message starts, as the template renders it (autoparsed templates only)
    message_delimiters: Tuple[Tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ChatPrompt":
        return cls(
            prompt=d["prompt"], format=d["format"], grammar=d["grammar"], grammar_lazy=bool(d["grammar_lazy"]),
            grammar_type=d["grammar_type"],
            grammar_triggers=tuple(GrammarTrigger(t["type"], t["value"], int(t["token"])) for t in d["grammar_triggers"]),
            preserved_tokens=tuple(d["preserved_tokens"]), additional_stops=tuple(d["additional_stops"]),
            generation_prompt=d["generation_prompt"], parse_tool_calls=bool(d["parse_tool_calls"]),
            reasoning_format=d["reasoning_format"], enable_thinking=bool(d["enable_thinking"]), raw=dict(d),
            message_delimiters=tuple((m["role"], m["delimiter"]) for m in d.get("message_delimiters") or ()
                                     if m.get("role") and m.get("delimiter")))

    def parser(self, *, stream: bool) -> "ChatParser":
        """A parser for the reply to this prompt (``stream``: as llama-server streams it)."""
        return ChatParser(dict(self.raw, stream=bool(stream)))


def llama_cpp_templates(llm: llama_cpp.Llama, chat_format: Optional[str], chat_handler: Any) -> Optional["ChatTemplates"]:
    """The one rule for who formats chats: llama.cpp's templates (llama-server's default ``--jinja``
    behaviour: tool calls, reasoning, every family's format) when the GGUF carries a chat template
    and the user named no chat format or handler of llama-cpp-python's; else None, and
    llama-cpp-python's handler for that format. A template llama.cpp's jinja engine cannot load
    falls back to llama-cpp-python's handler, with one warning (llama-server would refuse to start)."""
    if chat_format is not None or chat_handler is not None or not (llm.metadata or {}).get("tokenizer.chat_template"):
        return None
    try:
        return ChatTemplates(llm)
    except MtpArgumentError as e:
        log.warning("llama.cpp cannot load the model's chat template (%s): chats go through llama-cpp-python's "
                    "handler instead, without tool-call or reasoning parsing", e)
        return None


class ChatTemplates:
    """A model's chat templates, loaded by upstream's ``common_chat_templates_init``.

    ``override``: a template of the caller's (llama-server's ``--chat-template``), else the
    GGUF's own. ``defaults``: server-wide options (:data:`SERVER_DEFAULTS`' keys). Thread-safe:
    applying a template reads the loaded templates only. ``close()`` frees them (also on the
    Llama's close); a template is freed once, whichever comes first.
    """

    def __init__(self, llm: llama_cpp.Llama, override: Optional[str] = None,
                 defaults: Optional[Mapping[str, Any]] = None) -> None:
        ffi, lib = _loader.load()
        self._ffi, self._lib = ffi, lib
        self._lock = threading.Lock()
        self.defaults = dict(SERVER_DEFAULTS, **(defaults or {}))
        out = ffi.new("mtp_chat_templates **")
        model = ffi.cast("struct llama_model *", _compat.model_address(llm))
        status = lib.mtp_chat_templates_init(model, (override or "").encode("utf-8"), out)
        if status != lib.MTP_OK:
            raise MtpArgumentError("the chat template does not load: "
                                   + _loader.last_error())
        self._handle: Any = out[0]
        self._info: Optional[Dict[str, Any]] = None
        _compat.on_close(llm, self.close)  # the templates hold the model's bos/eos text only; freed with it

    @property
    def closed(self) -> bool:
        return self._handle is None

    def _live(self) -> Any:
        if self._handle is None:
            raise SessionClosedError("the chat templates have been freed (was the Llama closed?)")
        return self._handle

    def close(self) -> None:
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.mtp_chat_templates_free(handle)

    def __enter__(self) -> "ChatTemplates":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def info(self) -> Dict[str, Any]:
        """The templates' sources and capabilities (llama-server's /props ``chat_template_caps``)."""
        if self._info is None:
            out = self._ffi.new("char **")
            self._info = _call_json(self._lib.mtp_chat_templates_info(self._live(), out), out, "chat template info")
        return self._info

    def apply(self, body: Mapping[str, Any]) -> ChatPrompt:
        """An OpenAI chat request body -> the prompt and how to sample and parse its reply.

        Raises MtpArgumentError for what upstream refuses (no messages, a bad message or tool
        list, an unknown named tool, a role the template rejects).
        """
        out = self._ffi.new("char **")
        status = self._lib.mtp_chat_apply(self._live(), _json_arg(dict(body)), _json_arg(self.defaults), out)
        return ChatPrompt.from_json(_call_json(status, out, "applying the chat template"))


@dataclass(frozen=True)
class ParsedReply:
    """The reply parsed so far: the OpenAI ``message`` and the ``deltas`` since the last update."""

    message: Dict[str, Any]
    deltas: List[Dict[str, Any]]
    parse_error: Optional[str]

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.message.get("tool_calls"))


class ChatParser:
    """Upstream's parser of one reply's format, fed the generated text as it grows
    (llama-server's ``task_result_state``): each update parses the whole text so far and
    returns the message and its deltas since the last update. The last update
    (``final=True``) parses strictly; a reply that broke its own format then comes back as
    plain content, with one log line, never an error."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        ffi, lib = _loader.load()
        self._ffi, self._lib = ffi, lib
        out = ffi.new("mtp_chat_stream **")
        status = lib.mtp_chat_stream_new(_json_arg(dict(params)), out)
        if status != lib.MTP_OK:
            raise MtpArgumentError(_loader.last_error())
        self._handle: Any = ffi.gc(out[0], lib.mtp_chat_stream_free)  # backstop; close() frees first
        self._format = params.get("format", "")

    def update(self, text: str, *, final: bool = False) -> ParsedReply:
        if self._handle is None:
            raise SessionClosedError("the chat parser is closed")
        data = text.encode("utf-8")
        out = self._ffi.new("char **")
        status = self._lib.mtp_chat_stream_update(self._handle, data, len(data), 0 if final else 1, out)
        d = _call_json(status, out, "parsing the reply")
        if final and d["parse_error"]:
            log.warning("the model's reply does not follow its %s format (%s); returned as content",
                        self._format, d["parse_error"])
        return ParsedReply(d["message"], d["diffs"], d["parse_error"])

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._ffi.release(handle)  # runs the gc destructor (mtp_chat_stream_free) now, once

    def __enter__(self) -> "ChatParser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- sampling side


def _regex_escape(word: str) -> str:
    # upstream's regex_escape (common/common.cpp): the characters [.^$|()*+?[]{}\ get a backslash
    return re.sub(r"([.^$|()*+?\[\]{}\\])", r"\\\1", word)


class ToolGrammar(llama_cpp.LlamaGrammar):
    """A chat template's grammar as llama-server samples with it (common/sampling.cpp): lazy ones
    wait for a trigger (a word, pattern or token) and constrain what follows it; eager ones
    (``tool_choice`` "required" or a named tool, ``response_format``) start with the generation
    prompt's tokens already accepted (``prefill``). A llama_cpp.LlamaGrammar, so every sampler
    path takes it where a grammar goes; :func:`llama_mtp._compat.init_sampler` builds it."""

    def __init__(self, grammar: str, *, lazy: bool, patterns: Sequence[str], tokens: Sequence[int],
                 prefill: Sequence[int]) -> None:
        super().__init__(_grammar=grammar)
        self.lazy = lazy
        self.trigger_patterns = tuple(patterns)
        self.trigger_tokens = tuple(int(t) for t in tokens)
        self.prefill = tuple(int(t) for t in prefill)

    def make_sampler(self, vocab_address: int) -> int:
        """A new llama_sampler for this grammar (its address; the caller owns it), prefilled."""
        ffi, lib = _loader.load()
        patterns = [ffi.new("char[]", p.encode("utf-8")) for p in self.trigger_patterns]
        out = ffi.new("struct llama_sampler **")
        status = lib.mtp_grammar_sampler_new(
            ffi.cast("struct llama_vocab *", vocab_address), self._grammar.encode("utf-8"), int(self.lazy),
            ffi.new("const char *[]", patterns) if patterns else ffi.NULL, len(patterns),
            ffi.new("int32_t[]", self.trigger_tokens) if self.trigger_tokens else ffi.NULL, len(self.trigger_tokens),
            ffi.new("int32_t[]", self.prefill) if self.prefill else ffi.NULL, len(self.prefill), out)
        if status != lib.MTP_OK:
            raise MtpArgumentError("the tool-call grammar cannot be used: "
                                   + _loader.last_error())
        return int(ffi.cast("uintptr_t", out[0]))


def _template_tokens(llm: llama_cpp.Llama, text: str) -> List[int]:
    """A template marker's tokens, as llama-server tokenizes them (special tokens parsed, no BOS)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def user_spans(chat: ChatPrompt, llm: llama_cpp.Llama, tokens: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
    """(start, end) of each user message of the tokenized prompt, as llama-server finds them to
    checkpoint at (upstream's common_chat_msg_delimiters, through the shim): a message runs to the
    next one's delimiter. None for a template whose format gives no message delimiters."""
    if not chat.message_delimiters or not tokens:
        return ()
    ffi, lib = _loader.load()
    out = ffi.new("char **")
    delims = [{"role": role, "delimiter": text} for role, text in chat.message_delimiters]
    status = lib.mtp_chat_message_spans(ffi.cast("struct llama_vocab *", _compat.vocab_address(llm)),
                                        _json_arg(delims), ffi.new("int32_t[]", list(tokens)), len(tokens), out)
    return tuple((int(span["pos"]), int(span["pos"]) + int(span["len"]))
                 for span in _call_json(status, out, "message spans") if span["role"] == "user")


def sampling_plan(chat: ChatPrompt, llm: llama_cpp.Llama) -> Tuple[Optional[ToolGrammar], FrozenSet[int]]:
    """The grammar and the preserved token ids of a reply, as llama-server derives them from the
    template's answer (tools/server/server-schema.cpp, common/sampling.cpp).

    Preserved tokens are those the template's format needs to see in the text (tool-call and
    thinking markers): they are rendered even when they are control tokens.
    """
    def tokenize(text: str) -> List[int]:
        return _template_tokens(llm, text)

    preserved = frozenset(ids[0] for ids in map(tokenize, chat.preserved_tokens) if len(ids) == 1)
    if not chat.grammar:
        return None, preserved
    patterns: List[str] = []
    tokens: List[int] = []
    for trigger in chat.grammar_triggers:
        if trigger.type == "word":
            ids = tokenize(trigger.value)
            if len(ids) == 1:  # a one-token word triggers on that token, which must be preserved
                if ids[0] not in preserved:
                    raise MtpArgumentError(f"grammar trigger word {trigger.value!r} is not a preserved token")
                tokens.append(ids[0])
            else:
                patterns.append(_regex_escape(trigger.value))
        elif trigger.type == "pattern":
            patterns.append(trigger.value)
        elif trigger.type == "pattern_full":
            p = trigger.value
            patterns.append(("" if p.startswith("^") else "^") + p + ("" if p.endswith("$") else "$") if p else "^$")
        elif trigger.type == "token":
            tokens.append(trigger.token)
        else:
            raise MtpError(f"internal: unknown grammar trigger type {trigger.type!r}")
    if chat.grammar_lazy and not (patterns or tokens):
        raise MtpArgumentError("the template's lazy grammar has no triggers")
    prefill: List[int] = []
    if not chat.grammar_lazy and chat.grammar_type == "tool_calls" and chat.generation_prompt:
        # common_sampler_init: the generation prompt's tokens, minus a space some tokenizers
        # put before the first special token
        gen = chat.generation_prompt
        for i, tok in enumerate(tokenize(gen)):
            piece = _compat.pieces_of_model(_compat.model_of(llm)).piece(tok, True)
            if i == 0 and piece[:1].isspace() and not gen[:1].isspace():
                continue
            prefill.append(tok)
    grammar = ToolGrammar(chat.grammar, lazy=chat.grammar_lazy, patterns=patterns, tokens=tokens, prefill=prefill)
    return grammar, preserved
