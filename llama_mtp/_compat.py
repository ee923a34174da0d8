"""The one seam onto llama-cpp-python internals.

Every private attribute or internal of llama-cpp-python that llama_mtp uses is
touched here and nowhere else (``_ctx``, ``_batch``, ``_model``, ``_stack``,
``_init_sampler``, ``_requires_eval``, ``_logits_all``, ``_internals``, the
ExitStacks, the param structs ``Llama.__init__`` builds), so that a
llama-cpp-python upgrade is one file's work. What ``load()`` injects into the
native param structs is verified on the native objects afterwards
(:func:`verify_mtp_pair`): if a new llama-cpp-python builds them differently,
loading fails loudly instead of silently running without MTP.

It also holds the guard that frees native sessions before llama-cpp-python
frees their contexts: upstream aborts if a speculative session outlives either
of its contexts, so each ``LlamaContext`` gets one guard on its own ExitStack.
It runs before the context's free (ExitStack is LIFO) and releases every
native session still attached, whatever order Python closes or collects
things in.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import threading
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Union

import llama_cpp
from llama_cpp import _internals
from llama_cpp.llama_tokenizer import LlamaTokenizer

from . import llama_rules
from .errors import MtpArgumentError, MtpInitError, SessionClosedError
from .pieces import Detokenizer, Pieces, as_detokenizer

# the range pyproject.toml declares; build_ffi.TESTED_LLAMA_CPP_PYTHON lists the tested versions
SUPPORTED_RANGE = ">=0.3.36,<0.3.37"

LlamaContext = _internals.LlamaContext
LlamaBatch = _internals.LlamaBatch
LlamaSampler = _internals.LlamaSampler
ContextLike = Union[llama_cpp.Llama, _internals.LlamaContext]
BatchLike = Union[llama_cpp.Llama, _internals.LlamaBatch, llama_cpp.llama_batch, "ctypes._Pointer[Any]"]


def llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return getattr(llama_cpp, "__version__", "unknown")


# ------------------------------------------------------------------------- raw handles


# A Llama's context, by what the caller needs: llama-cpp-python's LlamaContext wrapper
# (llama_context), the native llama_context as a ctypes pointer for llama_cpp's functions, None once
# freed (native_context), or its address for the shim, raising once freed (context_address).


def llama_context(obj: Any, role: str) -> _internals.LlamaContext:
    """The LlamaContext of a Llama (or the LlamaContext itself)."""
    if isinstance(obj, _internals.LlamaContext):
        return obj
    if isinstance(obj, llama_cpp.Llama):
        ctx = getattr(obj, "_ctx", None)
        if ctx is None:
            raise SessionClosedError(f"the {role} Llama has no context (was it closed?)")
        return ctx
    raise MtpArgumentError(f"{role} must be a llama_cpp.Llama or llama_cpp._internals.LlamaContext, got {type(obj).__name__}")


def context_address(ctx: _internals.LlamaContext, role: str) -> int:
    """Address of the native llama_context (:func:`native_context`); raises if llama-cpp-python freed it."""
    ptr = native_context(ctx)
    if not ptr:
        raise SessionClosedError(f"the {role} context has been closed (Llama.close() or LlamaContext.close())")
    return int(ptr)


def native_context(obj: Union[llama_cpp.Llama, _internals.LlamaContext]) -> Any:
    """The native llama_context of a Llama or LlamaContext (a ctypes pointer; None once closed)."""
    ctx = obj if isinstance(obj, _internals.LlamaContext) else getattr(obj, "_ctx", None)
    return None if ctx is None else ctx.ctx


def model_ptr(llm: llama_cpp.Llama) -> Any:
    """The native llama_model of a Llama."""
    return llm._model.model


def model_address(llm: llama_cpp.Llama) -> int:
    """The native llama_model of a Llama, as an address (for the shim); refuses a freed model."""
    address = _address(llm._model.model) if llm._model is not None else None
    if not address:
        raise SessionClosedError("the model has been freed (was the Llama closed?)")
    return address


def vocab_ptr(llm: llama_cpp.Llama) -> Any:
    return llm._model.vocab


def swa_window(llm: llama_cpp.Llama) -> int:
    """The sliding window a context's SWA layers keep only (its ``swa_full=False``); 0 with a
    full-size SWA cache (llama.cpp's and llama-cpp-python's default) or no SWA layers."""
    if llm.context_params.swa_full:
        return 0
    return max(0, int(llama_cpp.llama_model_n_swa(llm._model.model)))


def vocab_address(llm: llama_cpp.Llama) -> int:
    """The native llama_vocab of a Llama, as an address (for the shim); refuses a freed model."""
    address = _address(llm._model.vocab) if llm._model is not None else None
    if not address:
        raise SessionClosedError("the model has been freed (was the Llama closed?)")
    return address


def context_type(ctx: _internals.LlamaContext) -> int:
    """The llama_context_type the context was created with (llama.h has no getter)."""
    return int(getattr(ctx.params, "ctx_type", llama_cpp.LLAMA_CONTEXT_TYPE_DEFAULT))


def loaded_with_mtp(ctx: _internals.LlamaContext) -> Optional[bool]:
    """Whether the context's model was loaded with its MTP layers (None: unknown)."""
    params = getattr(getattr(ctx, "model", None), "params", None)
    return None if params is None else bool(getattr(params, "load_mtp", True))


def raw_batch(batch: Any) -> int:
    """Address of a native llama_batch struct."""
    if isinstance(batch, llama_cpp.Llama):
        batch = getattr(batch, "_batch", None)
        if batch is None:
            raise SessionClosedError("the Llama has no batch (was it closed?)")
    if isinstance(batch, _internals.LlamaBatch):
        batch = batch.batch
        if batch is None:
            raise SessionClosedError("the LlamaBatch has been closed")
    if isinstance(batch, llama_cpp.llama_batch):
        return ctypes.addressof(batch)
    if isinstance(batch, ctypes._Pointer) and isinstance(batch.contents, llama_cpp.llama_batch):  # type: ignore[attr-defined]
        return ctypes.addressof(batch.contents)
    raise MtpArgumentError(
        f"process() takes the target Llama, a LlamaBatch or a ctypes llama_batch, got {type(batch).__name__}")


def token_capacity(llm: llama_cpp.Llama) -> int:
    """Tokens the Llama's own token buffer holds (llama.cpp may round n_ctx up; the buffer keeps
    the requested size, and plain llama-cpp-python stops there)."""
    return len(llm.input_ids)


def logits_all(llm: llama_cpp.Llama) -> bool:
    return bool(getattr(llm, "_logits_all", False))


def on_close(llm: llama_cpp.Llama, callback: Callable[[], None]) -> None:
    """Run ``callback`` when ``llm.close()`` unwinds its ExitStack (before what was pushed earlier)."""
    llm._stack.callback(callback)


def close_before(target: llama_cpp.Llama, draft: llama_cpp.Llama) -> None:
    """Free ``draft`` first whenever ``target`` is closed: a drafter whose context runs on the
    target's context (ctx_other: it reads the target's KV buffers and token embeddings) must not
    outlive it. ``target.close()`` unwinds its ExitStack last-in first-out, so ``draft.close()``
    runs before the target's context is freed; closing either one again is a no-op."""
    on_close(target, draft.close)


# ------------------------------------------------------------------------------ samplers


def init_sampler(llm: llama_cpp.Llama, sampling: Dict[str, Any], seed: Optional[int] = None) -> _internals.LlamaSampler:
    """The exact sampler chain plain llama-cpp-python builds for these settings.

    ``seed``: the dist sampler's seed (``Llama._init_sampler`` reads the Llama's own).
    """
    if seed is not None:
        llm.set_seed(seed)
    return _sampler_chain(llm, llama_cpp.Llama._init_sampler, sampling)


def _sampler_chain(llm: llama_cpp.Llama, init: Callable[..., _internals.LlamaSampler],
                   sampling: Dict[str, Any]) -> _internals.LlamaSampler:
    """``Llama._init_sampler``'s chain; a grammar that builds its own sampler (a chat template's
    lazy or prefilled tool-call grammar, :class:`llama_mtp.chat_templates.ToolGrammar`) takes the
    place llama-cpp-python gives a grammar: right after the penalties, before the chain's choice."""
    grammar = sampling.get("grammar")
    make = getattr(grammar, "make_sampler", None)
    if make is None:
        return init(llm, **sampling)
    chain = init(llm, **dict(sampling, grammar=None))
    if chain.custom_samplers:  # a logits processor sits first: the penalties' index moves
        chain.close()
        raise MtpArgumentError("a chat template's tool-call grammar cannot be combined with logits processors")
    native = chain.sampler
    rest = [llama_cpp.llama_sampler_chain_remove(native, 1) for _ in range(llama_cpp.llama_sampler_chain_n(native) - 1)]
    grammar_sampler = ctypes.cast(ctypes.c_void_p(make(vocab_address(llm))), llama_cpp.llama_sampler_p_ctypes)
    llama_cpp.llama_sampler_chain_add(native, grammar_sampler)
    for sampler in rest:
        llama_cpp.llama_sampler_chain_add(native, sampler)
    return chain


def sampler_address(chain: _internals.LlamaSampler) -> int:
    """The native llama_sampler of a llama-cpp-python sampler chain (for the shim)."""
    address = _address(chain.sampler)
    if not address:
        raise SessionClosedError("the sampler has been freed")
    return address


def token_data_array(n_vocab: int) -> _internals.LlamaTokenDataArray:
    return _internals.LlamaTokenDataArray(n_vocab=n_vocab)


def new_sampler_chain() -> _internals.LlamaSampler:
    return _internals.LlamaSampler()


# ------------------------------------------------------------------ Llama token state


def sync_llama_tokens(llm: llama_cpp.Llama, tokens: Sequence[int], n_past: int) -> None:
    """Tell the Llama its context holds ``tokens[:n_past]`` (after we decoded on it ourselves),
    so its own eval/generate continue from there."""
    n_past = min(n_past, len(tokens))
    if n_past and native_context(llm):
        llm.input_ids[:n_past] = tokens[:n_past]
    llm.n_tokens = n_past
    llm._requires_eval = True


# --------------------------------------------------------------- param-struct injection


class ParamsHook:
    """Applies settings llama-cpp-python does not expose to the native param structs
    the moment ``Llama.__init__`` assigns them (it never touches those fields afterwards)."""

    def __init__(self, model_overrides: Dict[str, Any], context_overrides: Dict[str, Any],
                 shared_model: Any = None, check_model: Optional[Callable[[Any], None]] = None) -> None:
        self.model_overrides = model_overrides
        self.context_overrides = context_overrides
        # a LlamaModel to use instead of the one Llama.__init__ loads (the draft: vocab only)
        self.shared_model = shared_model
        self.own_model: Any = None
        # called with the LlamaModel Llama.__init__ just loaded, before its context is created
        # (it raises to stop there: llama.cpp aborts on some mismatches while building a context)
        self.check_model = check_model

    def apply(self, name: str, value: Any) -> Any:
        if name == "model_params" and isinstance(value, llama_cpp.llama_model_params):
            for field, v in self.model_overrides.items():
                setattr(value, field, v)
        elif name == "context_params" and isinstance(value, llama_cpp.llama_context_params):
            for field, v in self.context_overrides.items():
                setattr(value, field, v)
        elif name == "_model" and value is not self.shared_model:
            if self.check_model is not None:
                self.check_model(value)
            if self.shared_model is not None:
                # Llama.__init__ just loaded the vocab-only model: its context goes on the shared weights
                self.own_model = value
                value = self.shared_model
        return value


class HookedLlama(llama_cpp.Llama):
    """A Llama whose native params get settings llama-cpp-python does not expose."""

    def __init__(self, *args: Any, llama_mtp_hook: Optional[ParamsHook] = None, **kwargs: Any) -> None:
        self.__dict__["_llama_mtp_hook"] = llama_mtp_hook
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self.close()  # free now what Llama.__init__ built before it raised (its model), not at GC
            raise
        finally:
            hook = self.__dict__.pop("_llama_mtp_hook", None)
        if hook is not None and hook.own_model is not None:
            # from here on tokenize/detokenize/metadata use the Llama's own vocab-only model, so
            # it stays usable for them after the Llama whose weights it ran on is closed
            object.__setattr__(self, "_model", hook.own_model)
            if isinstance(self.tokenizer_, LlamaTokenizer):
                self.tokenizer_ = LlamaTokenizer(self)
        install_piece_tokenizer(self)

    def close(self) -> None:
        # a constructor that raised before Llama.__init__ built its ExitStack leaves nothing to free
        # (Llama.__del__ still calls close())
        if "_stack" in self.__dict__:
            super().close()

    def __setattr__(self, name: str, value: Any) -> None:
        hook = self.__dict__.get("_llama_mtp_hook")
        if hook is not None:
            value = hook.apply(name, value)
        object.__setattr__(self, name, value)


# --------------------------------------------------------------------- detokenizing


class PieceTokenizer(LlamaTokenizer):
    """llama-cpp-python's own tokenizer, except that token pieces come whole from
    :class:`~llama_mtp.pieces.Pieces` (0.3.36 cuts every piece longer than 32 bytes to nothing).

    A subclass, so code that checks for a ``LlamaTokenizer`` still finds one.
    """

    def __init__(self, llama: llama_cpp.Llama) -> None:
        super().__init__(llama)
        self.pieces = pieces_of_model(self._model)
        # tokens rendered as text even when they are control tokens (see rendering_special)
        self.special_ids: FrozenSet[int] = frozenset()

    def detokenize(self, tokens: List[int], prev_tokens: Optional[List[int]] = None, special: bool = False) -> bytes:
        return self.pieces.detokenize(tokens, special=special, special_ids=self.special_ids)


@contextlib.contextmanager
def rendering_special(llm: llama_cpp.Llama, special_ids: FrozenSet[int]) -> Iterator[None]:
    """Within the block, ``llm``'s own completion text renders ``special_ids`` (a chat template's
    preserved tokens: tool-call and thinking markers its parser needs to see)."""
    tok = llm.tokenizer_
    if not isinstance(tok, PieceTokenizer):
        if special_ids:
            raise MtpArgumentError("this Llama's tokenizer cannot render the chat template's preserved tokens")
        yield
        return
    saved, tok.special_ids = tok.special_ids, frozenset(special_ids)
    try:
        yield
    finally:
        tok.special_ids = saved


def pieces_of_model(model: _internals.LlamaModel) -> Pieces:
    """The (one, cached) Pieces of a LlamaModel's vocabulary; it refuses once the model is freed."""
    pieces = model.__dict__.get("_llama_mtp_pieces")
    if pieces is None:
        pieces = Pieces(lambda: model.vocab if model.model is not None else None)
        model.__dict__["_llama_mtp_pieces"] = pieces
    return pieces


def install_piece_tokenizer(llm: llama_cpp.Llama) -> None:
    """Give a Llama that uses llama.cpp's tokenizer whole token pieces on every path it has
    (``detokenize``, ``create_completion`` text, logprobs and stops, chat formatters), then check
    on the object that ``Llama.detokenize`` really goes through them. A tokenizer of the user's
    own (``tokenizer=``, e.g. a Hugging Face one) is kept as it is."""
    if type(llm.tokenizer_) is not LlamaTokenizer:
        return
    tok = PieceTokenizer(llm)
    llm.tokenizer_ = tok
    # Llama.detokenize must now fill the Pieces cache: a token it has not cached shows it does
    probe = int(llama_cpp.llama_vocab_n_tokens(llm._model.vocab)) - 1
    tok.pieces.evict(probe)
    llm.detokenize([probe])
    if llm.tokenizer_ is not tok or not tok.pieces.cached(probe):
        raise MtpInitError(f"llama_mtp could not install its detokenizer on llama-cpp-python "
                           f"{llama_cpp_python_version()}; supported: llama-cpp-python{SUPPORTED_RANGE}")


def detokenizer(llm: llama_cpp.Llama, special_ids: FrozenSet[int] = frozenset()) -> Detokenizer:
    """How every llama_mtp output path turns a Llama's tokens into bytes: llama.cpp's whole
    pieces for llama.cpp's tokenizer (on any Llama, ours or not), else the Llama's own
    tokenizer (one the user supplied, e.g. a Hugging Face one, which needs the previous tokens).
    ``special_ids``: tokens rendered even when they are control tokens (a chat template's
    preserved tokens)."""
    tok = llm.tokenizer_
    if isinstance(tok, PieceTokenizer):
        return as_detokenizer(tok.pieces, special_ids)
    if type(tok) is LlamaTokenizer:
        return as_detokenizer(pieces_of_model(llm._model), special_ids)
    if special_ids:
        raise MtpArgumentError("this Llama's tokenizer cannot render the chat template's preserved tokens")
    return lambda tokens, prev_tokens=None: llm.detokenize(tokens, prev_tokens=prev_tokens)


def chat_logprobs(completion_logprobs: Any) -> Any:
    """A completion's logprobs in the chat shape llama-cpp-python's chat handlers give them."""
    from llama_cpp import llama_chat_format

    return llama_chat_format._convert_text_completion_logprobs_to_chat(completion_logprobs)


# ------------------------------------------------------------------ create_completion


class CompletionCap:
    """``max_tokens`` as a hard cap inside llama-cpp-python's create_completion loop.

    That loop checks max_tokens only after a token that leaves the text on a character boundary,
    so it generates past the cap while a UTF-8 character is incomplete (without bound on invalid
    byte runs, measured: 8 extra tokens on a byte-level vocabulary). A generate() whose tokens
    run through :meth:`tokens` stops at the cap; if the loop still asks for more (it is waiting
    for the rest of a character), it gets an end-of-generation token, on which it ends with the
    text of the tokens it has (the partial character dropped, as llama-server drops it), and
    :meth:`finish` turns that "stop" back into "length".
    """

    def __init__(self, max_tokens: Any, eog: int) -> None:
        ok = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0
        self.max_tokens: Optional[int] = max_tokens if ok else None  # <= 0: up to the context
        self.eog = eog
        self.cut = False

    def tokens(self, source: Any) -> Any:
        if self.max_tokens is None:
            yield from source
            return
        with contextlib.closing(source):  # settles the run at exactly max_tokens tokens
            for i, token in enumerate(source):
                yield token
                if i + 1 >= self.max_tokens:
                    break
        if self.eog >= 0:
            self.cut = True
            yield self.eog

    def finish(self, item: Any) -> Any:
        if self.cut and isinstance(item, dict):
            for choice in item.get("choices", ()):
                if choice.get("finish_reason") == "stop":
                    choice["finish_reason"] = "length"
        return item


class CompletionMaxTokens(llama_cpp.Llama):
    """A Llama whose completions stop at max_tokens exactly (see :class:`CompletionCap`).

    ``_create_completion`` is a generator in both modes: the cap is set at its first step,
    right before llama-cpp-python's own body calls generate(), which takes it.
    """

    def _init_sampler(self, *args: Any, **kwargs: Any) -> _internals.LlamaSampler:
        # llama-cpp-python's own decode paths (MtpLlama's plain fallbacks) build their chains here:
        # a chat template's tool-call grammar goes in as init_sampler puts it
        if args:
            raise TypeError("_init_sampler takes keyword arguments only")
        return _sampler_chain(self, llama_cpp.Llama._init_sampler, kwargs)

    def _create_completion(self, *args: Any, **kwargs: Any) -> Any:
        cap = CompletionCap(kwargs.get("max_tokens"), eog_token(self))
        self.__dict__["_llama_mtp_cap"] = cap
        with contextlib.closing(super()._create_completion(*args, **kwargs)) as items:
            for item in items:
                yield cap.finish(item)


def completion_cap(llm: llama_cpp.Llama) -> Optional[CompletionCap]:
    """The cap of the completion now calling ``llm.generate()`` (taken once; None outside one)."""
    return llm.__dict__.pop("_llama_mtp_cap", None)


def eog_token(llm: llama_cpp.Llama) -> int:
    """The end-of-generation token llama-cpp-python stops a completion at (EOS, else EOT; -1: none)."""
    eos = int(llm.token_eos())
    if eos >= 0 and llama_cpp.llama_vocab_is_eog(vocab_ptr(llm), eos):
        return eos
    eot = int(llama_cpp.llama_vocab_eot(vocab_ptr(llm)))
    return eot if eot >= 0 and llama_cpp.llama_vocab_is_eog(vocab_ptr(llm), eot) else -1


def model_of(llm: llama_cpp.Llama) -> Any:
    """The LlamaModel object (to share with a draft Llama)."""
    return llm._model


# ------------------------------------------------------------------ verification


def arch_of(llm: llama_cpp.Llama) -> str:
    """general.architecture of the loaded model."""
    return str(llm.metadata.get("general.architecture", "?"))


def ubatch_split(llm: llama_cpp.Llama) -> llama_rules.UbatchSplit:
    """How llama_decode on this Llama's context cuts a multi-sequence batch into ubatches."""
    return llama_rules.context_ubatch_split(native_context(llm), kv_unified=bool(llm.context_params.kv_unified))


def verify_mtp_pair(target: llama_cpp.Llama, draft: Optional[llama_cpp.Llama], *, n_rs_seq: int,
                    n_seq: int, external: bool = False, draft_mode: Optional[str] = None) -> None:
    """Check on the native objects that what load() injected took effect.

    ``external``: the draft is an external drafter on its own model (a gemma4-assistant) whose
    context must run on the target's context (``ctx_other``, upstream's is_mem_shared mode, which
    ``draft_mode`` must then be: the shim's probe, upstream's own test ctx_other == target);
    otherwise the draft is an MTP context on the target's own ``llama_model``.
    Raises MtpInitError naming the installed llama-cpp-python otherwise: a newer
    version that builds its param structs differently must not run silently without MTP.
    """
    version = llama_cpp_python_version()

    def fail(what: str) -> None:
        raise MtpInitError(f"llama_mtp could not set up MTP on llama-cpp-python {version} ({what}); "
                           f"supported: llama-cpp-python{SUPPORTED_RANGE}")

    tctx = native_context(target)
    if not tctx:
        fail("the target has no context")
    if n_rs_seq and llama_rules.keeps_rs_snapshots(model_ptr(target), arch_of(target)):
        got = int(llama_cpp.llama_n_rs_seq(tctx))
        if got < n_rs_seq:
            fail(f"the target context keeps {got} recurrent snapshots, n_rs_seq={n_rs_seq} was requested")
    if int(llama_cpp.llama_n_seq_max(tctx)) < n_seq:
        fail(f"the target context has n_seq_max={int(llama_cpp.llama_n_seq_max(tctx))}, {n_seq} requested")
    if context_type(target._ctx) != llama_cpp.LLAMA_CONTEXT_TYPE_DEFAULT:
        fail("the target context is not a DEFAULT context")
    if draft is None:
        return
    dctx = native_context(draft)
    if not dctx:
        fail("the draft has no context")
    if context_type(draft._ctx) != llama_cpp.LLAMA_CONTEXT_TYPE_MTP:
        fail("the draft context was not created as an MTP context")
    t_model = llama_cpp.llama_get_model(tctx)
    d_model = llama_cpp.llama_get_model(dctx)
    if not external and _address(t_model) != _address(d_model):
        fail("the draft context does not run on the target's llama_model")
    if int(llama_cpp.llama_n_seq_max(dctx)) < n_seq:
        fail(f"the draft context has n_seq_max={int(llama_cpp.llama_n_seq_max(dctx))}, {n_seq} requested")
    if external:
        if _address(t_model) == _address(d_model):
            fail("the external draft context runs on the target's llama_model, not on its own")
        if loaded_with_mtp(draft._ctx) is False or llama_cpp.llama_model_n_layer_nextn(d_model) <= 0:
            fail("the draft model was loaded without its MTP (nextn) layers")
        if draft_mode != "mem_shared":
            fail("the draft context does not run on the target's context (ctx_other was not applied)")


# ------------------------------------------------------------------ external drafters


def _loaded(model: _internals.LlamaModel, path: str) -> llama_rules.LoadedModel:
    meta = model.metadata()  # a walk over every GGUF key: once
    return llama_rules.LoadedModel(path, str(meta.get("general.architecture", "?")), model.model, meta)


def _loaded_llama(llm: llama_cpp.Llama) -> llama_rules.LoadedModel:
    return llama_rules.LoadedModel(llm.model_path, arch_of(llm), model_ptr(llm), llm.metadata)


def refuse_external_drafter(path: str) -> Callable[[_internals.LlamaModel], None]:
    """A ParamsHook check for a target: the LlamaModel Llama.__init__ just loaded must not be an
    external drafter (llama_rules.refuse_drafter_as_target)."""

    def check(model: _internals.LlamaModel) -> None:
        llama_rules.refuse_drafter_as_target(_loaded(model, path))

    return check


def check_external_drafter(target: llama_cpp.Llama, path: str) -> Callable[[_internals.LlamaModel], None]:
    """A ParamsHook check for an external drafter's LlamaModel, before its context is created:
    the pair must fit (llama_rules.check_external_drafter raises MtpInitError)."""

    def check(model: _internals.LlamaModel) -> None:
        llama_rules.check_external_drafter(_loaded(model, path), _loaded_llama(target))

    return check


def _address(ptr: Any) -> Optional[int]:
    return ptr if isinstance(ptr, int) or ptr is None else ctypes.cast(ptr, ctypes.c_void_p).value


# ------------------------------------------------------------------ context guards


class _ContextGuard:
    """Releases attached native sessions right before a LlamaContext is freed.

    No lock: finalizers (MtpSession.__del__ -> detach) may run from the garbage
    collector at any allocation, on a thread already inside attach() or fire();
    single dict operations are atomic under the GIL.
    """

    def __init__(self) -> None:
        self._releasers: Dict[int, Callable[[], None]] = {}
        self.fired = False

    def attach(self, key: int, release: Callable[[], None]) -> None:
        self._releasers[key] = release

    def detach(self, key: int) -> None:
        self._releasers.pop(key, None)

    def fire(self) -> None:
        self.fired = True
        releasers, self._releasers = self._releasers, {}
        for release in list(releasers.values()):
            release()


_guards_lock = threading.Lock()


def guard_of(ctx: _internals.LlamaContext) -> _ContextGuard:
    """The (single) guard of a LlamaContext, installed on first use."""
    with _guards_lock:
        guard = ctx.__dict__.get("_llama_mtp_guard")
        if guard is None:
            guard = _ContextGuard()
            ctx._exit_stack.callback(guard.fire)
            ctx.__dict__["_llama_mtp_guard"] = guard
        return guard


def apply_chain(chain: _internals.LlamaSampler, cand: _internals.LlamaTokenDataArray, logits: Any) -> Any:
    """Run a sampler chain's transforms over one row of logits: a structured numpy view
    (fields id, logit, p) of the candidates that survive, valid until ``cand`` is reused."""
    import numpy as np

    cand.copy_logits(logits)
    llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(cand.candidates))
    n = cand.candidates.size
    data = ctypes.cast(cand.candidates.data, ctypes.POINTER(llama_cpp.llama_token_data * n)).contents
    return np.frombuffer(data, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True),
                         count=n)


def chat_eog_stop_ids(criteria: Any, llm: llama_cpp.Llama) -> Optional[frozenset]:
    """The token ids of the stopping criterion llama-cpp-python gives every GGUF chat template
    (``Jinja2ChatFormatter``'s ``stop_on_last_token``), if ``criteria`` is that alone and every id
    is an end-of-generation token; None for any other criteria.

    ``Llama.generate`` checks it on the last *evaluated* token, so it only fires on a prompt
    ending in one of them: create_completion stops at an end-of-generation token before feeding it.
    """
    if not isinstance(criteria, llama_cpp.StoppingCriteriaList) or len(criteria) != 1:
        return None
    fn = criteria[0]
    if getattr(fn, "__qualname__", "") != "Jinja2ChatFormatter.__call__.<locals>.stop_on_last_token":
        return None
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    ids = getattr(cells.get("self"), "stop_token_ids", None)
    if not ids:
        return None
    ids = frozenset(int(t) for t in ids)
    return ids if all(llama_cpp.llama_vocab_is_eog(vocab_ptr(llm), t) for t in ids) else None


# ------------------------------------------------------------------ prompt cache


def context_tokens(llm: llama_cpp.Llama) -> List[int]:
    """The tokens the Llama's context holds, as llama-cpp-python tracks them (input_ids[:n_tokens])."""
    return [int(t) for t in llm.input_ids[:llm.n_tokens]]


def n_decoded(llm: llama_cpp.Llama) -> int:
    """Tokens llama.cpp decoded on the Llama's context since it was created (prompt + eval counters)."""
    data = llama_cpp.llama_perf_context(native_context(llm))
    # llama_perf_context reports max(1, n) per counter: an idle context reads 1 + 1
    return int(data.n_p_eval) + int(data.n_eval)
