"""llama_mtp.load(): a target Llama with MTP heads and an MTP draft Llama on the same weights.

``llama_cpp.Llama(...)`` exposes none of the settings MTP needs (``load_mtp``,
``n_rs_seq``, the MTP context type, ``ctx_other``) and always loads its own
model. Without editing llama-cpp-python, these subclasses adjust the native
param structs the moment ``Llama.__init__`` assigns them (it never touches
those fields afterwards), and the draft swaps its throw-away vocab-only model
for the target's ``LlamaModel`` before its context is created, so the draft
context lives on the target's weights and llama-cpp-python's own ExitStacks
free everything in the right order on ``close()``.

A target without MTP heads of its own whose drafter is a separate GGUF (gemma4 and its
gemma4-assistant: upstream's ``is_mem_shared`` mode) is loaded with
``load(target, draft_model_path=assistant)``: the draft is then an
:class:`MtpAssistantLlama` on the assistant's own weights whose context runs on the
target's context (``ctx_other``) and attends over the target's KV cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import llama_cpp

from . import _compat
from .checks import integer
from .errors import MtpArgumentError, MtpError, MtpInitError
from .session import draft_mode_of

# Llama kwargs that would break the MTP setup
_RESERVED = ("draft_model", "vocab_only", "embedding")


def _model_overrides(use_extra_bufts: bool | None) -> Dict[str, Any]:
    # use_extra_bufts=False avoids repacked weight buffers (ggml's AMX q8_0 kernels crash on
    # multi-token batches on some CPUs, upstream issue 20824)
    return {} if use_extra_bufts is None else {"use_extra_bufts": bool(use_extra_bufts)}


class PlainLlama(_compat.HookedLlama):
    """A plain ``llama_cpp.Llama`` that also takes ``use_extra_bufts`` (for fair comparisons)."""

    def __init__(self, model_path: str, *, use_extra_bufts: bool | None = None, **kwargs: Any) -> None:
        super().__init__(model_path=model_path, llama_mtp_hook=_compat.ParamsHook(_model_overrides(use_extra_bufts), {}),
                         **kwargs)


@dataclass(frozen=True)
class PairLimits:
    """What a target was loaded for, fixed when its context is made: ``n_draft_max`` (the
    recurrent rollback depth and verify rows per sequence: the longest draft) and ``n_seq``
    (the sequence slots, the draft context's too)."""

    n_draft_max: int
    n_seq: int


def limits_of(target: Any) -> PairLimits:
    """The limits ``target`` was loaded with; raises MtpArgumentError for a Llama that is no
    MTP target (its context has no rollback depth or verify rows to draft into)."""
    if not isinstance(target, MtpTargetLlama):
        raise MtpArgumentError("the target must be an MTP target Llama (llama_mtp.load or MtpLlama make one), "
                               f"got {type(target).__name__}; or pass an MtpSession made for it")
    return target.mtp_limits


class MtpTargetLlama(_compat.HookedLlama):
    """A ``llama_cpp.Llama`` loaded with its MTP layers and rollback-capable context.

    ``mtp_limits``: the :class:`PairLimits` it was loaded with (also ``mtp_n_draft_max`` and
    ``mtp_n_seq``).
    """

    def __init__(self, model_path: str, *, n_draft_max: int = 3, n_seq: int = 1,
                 use_extra_bufts: bool | None = None, **kwargs: Any) -> None:
        logits_all = bool(kwargs.get("logits_all", False))
        ctx = {"n_seq_max": n_seq, "n_rs_seq": n_draft_max}
        if not logits_all:
            # the verify step outputs 1 + n_draft rows per sequence (upstream's output limits)
            ctx["n_outputs_max_per_seq"] = 1 + n_draft_max
        # an external drafter (gemma4-assistant) cannot be a target: say how to load it instead
        hook = _compat.ParamsHook({"load_mtp": True, **_model_overrides(use_extra_bufts)}, ctx,
                                  check_model=_compat.refuse_external_drafter(model_path))
        super().__init__(model_path=model_path, llama_mtp_hook=hook, **kwargs)
        self.mtp_limits = PairLimits(n_draft_max=n_draft_max, n_seq=n_seq)
        self.mtp_n_layer_nextn = int(llama_cpp.llama_model_n_layer_nextn(_compat.model_ptr(self)))
        try:
            _compat.verify_mtp_pair(self, None, n_rs_seq=n_draft_max, n_seq=n_seq)
        except MtpInitError:
            self.close()
            raise

    @property
    def mtp_n_draft_max(self) -> int:
        return self.mtp_limits.n_draft_max

    @property
    def mtp_n_seq(self) -> int:
        return self.mtp_limits.n_seq


def _draft_context_params(target: MtpTargetLlama) -> Dict[str, Any]:
    """The context fields of a draft context on ``target`` (its own nextn layers or an external
    drafter): an MTP context whose ``ctx_other`` is the target's, no recurrent snapshots, and
    one output (the next draft token) per drafting sequence, as upstream."""
    return {
        "ctx_type": llama_cpp.LLAMA_CONTEXT_TYPE_MTP,
        "ctx_other": _compat.native_context(target),
        "n_rs_seq": 0,
        "n_seq_max": target.mtp_limits.n_seq,
        "n_outputs_max": target.mtp_limits.n_seq,
        "n_outputs_max_per_seq": 1,
    }


class MtpDraftLlama(_compat.HookedLlama):
    """A ``llama_cpp.Llama`` whose context is the MTP draft context on the target's model."""

    def __init__(self, target: MtpTargetLlama, *, use_extra_bufts: bool | None = None, **kwargs: Any) -> None:
        del use_extra_bufts  # weight placement is the target's: the draft runs on its model
        ctx = _draft_context_params(target)
        # vocab_only: Llama.__init__ loads a model first; it must not be a second copy of the weights
        kwargs = dict(kwargs, n_ctx=target.n_ctx(), n_batch=target.n_batch, vocab_only=True)
        # its batches are a step's few rows (a prompt comes in n_ubatch pieces): a small
        # n_ubatch keeps its compute buffer at a few MB instead of ~18 MB at 512
        kwargs.setdefault("n_ubatch", min(DRAFT_N_UBATCH, target.n_batch))
        hook = _compat.ParamsHook({}, ctx, shared_model=_compat.model_of(target))
        if target.mtp_n_layer_nextn <= 0:
            raise MtpInitError(f"{target.model_path} has no MTP heads (nextn_predict_layers = 0): "
                               "an MTP draft context needs them")
        try:
            super().__init__(model_path=target.model_path, llama_mtp_hook=hook, **kwargs)
        except ValueError as e:
            raise MtpInitError(f"llama.cpp could not create the MTP draft context for {target.model_path}: {e}") from None
        self.mtp_target = target
        try:
            _compat.verify_mtp_pair(target, self, n_rs_seq=target.mtp_limits.n_draft_max, n_seq=target.mtp_limits.n_seq)
        except MtpInitError:
            self.close()
            raise


class MtpAssistantLlama(_compat.HookedLlama):
    """A ``llama_cpp.Llama`` on an external MTP drafter GGUF (a gemma4-assistant), as
    upstream's common_speculative_init_result builds it: its own weights (loaded with their
    nextn layers), an MTP context whose ``ctx_other`` is the target's context, so it reads the
    target's token embeddings and attends over the target's KV cache (no KV of its own).

    It is freed before the target whenever the target is closed (its context borrows the
    target's KV buffers); closing it first, or twice, is fine too.
    """

    def __init__(self, target: MtpTargetLlama, model_path: Union[str, "os.PathLike[str]"], *,
                 use_extra_bufts: bool | None = None, **kwargs: Any) -> None:
        if not isinstance(target, MtpTargetLlama):
            raise MtpArgumentError("an external MTP drafter runs on its target's context: pass the target, an "
                                   "MtpTargetLlama (llama_mtp.load(target_path, draft_model_path=...) builds both), "
                                   f"got {type(target).__name__}")
        if not _compat.native_context(target):
            raise MtpArgumentError("the target Llama is closed")
        path = _draft_path(model_path)
        if target.mtp_n_layer_nextn > 0:
            raise MtpArgumentError(f"{target.model_path} has MTP heads of its own ({target.mtp_n_layer_nextn} nextn "
                                   "layers), which llama_mtp drafts with; an external drafter (draft_model_path) is for "
                                   "targets without them (gemma4 + gemma4-assistant): drop draft_model_path")
        ctx = _draft_context_params(target)
        kwargs = {k: v for k, v in kwargs.items() if k != "logits_all"}
        kwargs.update(n_ctx=target.n_ctx(), n_batch=target.n_batch)
        kwargs.setdefault("n_ubatch", min(DRAFT_N_UBATCH, target.n_batch))
        # its own weights this time (no vocab_only / shared model), checked against the target's
        # shapes before its context is built on them
        hook = _compat.ParamsHook({"load_mtp": True, **_model_overrides(use_extra_bufts)}, ctx,
                                  check_model=_compat.check_external_drafter(target, path))
        try:
            super().__init__(model_path=path, llama_mtp_hook=hook, **kwargs)
        except MtpError:
            raise
        except ValueError as e:
            raise MtpInitError(f"llama.cpp could not create the draft context for {path} on the target "
                               f"{target.model_path}: {e}") from None
        self.mtp_target = target
        _compat.close_before(target, self)
        try:
            _compat.verify_mtp_pair(target, self, n_rs_seq=target.mtp_limits.n_draft_max,
                                    n_seq=target.mtp_limits.n_seq, external=True,
                                    draft_mode=draft_mode_of(target, self).mode)
        except MtpInitError:
            self.close()
            raise


DraftLlama = Union[MtpDraftLlama, MtpAssistantLlama]

DRAFT_N_UBATCH = 32


def _draft_path(draft_model_path: Any) -> str:
    if not isinstance(draft_model_path, (str, os.PathLike)):
        raise MtpArgumentError(f"draft_model_path must be a path, got {type(draft_model_path).__name__}")
    path = os.fspath(draft_model_path)
    if not os.path.isfile(path):
        raise MtpInitError(f"draft model file not found: {path}")
    return path


def _validate(path: str, n_draft_max: int, n_seq: int, llama_kwargs: Dict[str, Any]) -> None:
    for name, value in (("n_draft_max", n_draft_max), ("n_seq", n_seq)):
        integer(name, value, 1)
    bad = [k for k in _RESERVED if llama_kwargs.get(k)]
    if bad:
        raise MtpArgumentError(f"MTP loading does not support {', '.join(bad)}")
    if not os.path.isfile(path):
        raise MtpInitError(f"model file not found: {path}")
    n_batch = int(llama_kwargs.get("n_batch", 512))
    if n_draft_max + 1 > n_batch:
        raise MtpArgumentError(f"n_batch={n_batch} is smaller than a verify batch of n_draft_max+1={n_draft_max + 1}")


def _open_draft(target: MtpTargetLlama, path: str, llama_kwargs: Dict[str, Any],
                draft_path: Optional[str] = None) -> DraftLlama:
    """Check the target has MTP heads, then put an MTP draft context on its model; with
    ``draft_path``, open that external drafter on the target's context instead. The target is
    closed if this fails."""
    draft_kwargs = {k: v for k, v in llama_kwargs.items() if k not in ("n_ctx", "n_batch", "logits_all")}
    if draft_path is not None:
        try:
            return MtpAssistantLlama(target, draft_path, **draft_kwargs)
        except BaseException:
            target.close()
            raise
    if target.mtp_n_layer_nextn <= 0:
        arch = _compat.arch_of(target)
        target.close()
        raise MtpInitError(f"{path} (architecture {arch!r}) has no MTP heads (nextn_predict_layers = 0): use a "
                           "GGUF that keeps its nextn layers, of an architecture llama.cpp builds an MTP graph for "
                           "(e.g. qwen35, qwen35moe, qwen3next, glm4moe, deepseek2, mimo2, step35), or, for a "
                           "target whose MTP drafter is a GGUF of its own (gemma4), pass it as draft_model_path")
    try:
        return MtpDraftLlama(target, **draft_kwargs)
    except MtpInitError:
        target.close()
        raise
    except ValueError as e:
        target.close()
        raise MtpInitError(f"llama.cpp could not create the MTP draft context for {path}: {e}") from None


def load(model_path: str | os.PathLike[str], *, n_draft_max: int = 3, n_seq: int = 1,
         draft_model_path: Optional[str | os.PathLike[str]] = None,
         **llama_kwargs: Any) -> Tuple[MtpTargetLlama, DraftLlama]:
    """Load a model with MTP heads: returns ``(target, draft)``, both ``llama_cpp.Llama``.

    The target has its MTP layers loaded, ``n_rs_seq = n_draft_max`` (recurrent
    rollback) and room for 1 + n_draft_max outputs per sequence; the draft is an
    MTP context on the *same* ``llama_model`` (no second copy of the weights).

    ``draft_model_path``: an external MTP drafter GGUF for a target without MTP heads of its
    own (a gemma4-assistant for its gemma4 target): the draft is then an
    :class:`MtpAssistantLlama` on its own weights whose context shares the target's KV. It is
    refused for a target that has MTP heads (MtpArgumentError), and a drafter whose width,
    vocabulary or head sizes are not the target's raises MtpInitError before its context exists.
    Other keyword arguments go to both ``llama_cpp.Llama`` constructors.
    """
    llama_kwargs.setdefault("verbose", False)
    return open_pair(MtpTargetLlama, model_path, n_draft_max=n_draft_max, n_seq=n_seq,
                     draft_model_path=draft_model_path, llama_kwargs=llama_kwargs)


TargetFactory = Callable[..., MtpTargetLlama]


def open_pair(make_target: TargetFactory, model_path: str | os.PathLike[str], *, n_draft_max: int, n_seq: int,
              draft_model_path: Optional[str | os.PathLike[str]],
              llama_kwargs: Dict[str, Any]) -> Tuple[MtpTargetLlama, DraftLlama]:
    """load()'s path, for any way of making the target: validate, make the target with
    ``make_target(path, n_draft_max=..., n_seq=..., **llama_kwargs)`` (an MtpTargetLlama, or
    a subclass initialising itself: MtpLlama), then open its draft (the target is closed if
    that fails)."""
    path = os.fspath(model_path)
    _validate(path, n_draft_max, n_seq, llama_kwargs)
    draft_path = None if draft_model_path is None else _draft_path(draft_model_path)
    try:
        target = make_target(path, n_draft_max=n_draft_max, n_seq=n_seq, **llama_kwargs)
    except MtpError:
        raise
    except ValueError as e:
        raise MtpInitError(f"llama.cpp could not load {path}: {e}") from None
    return target, _open_draft(target, path, llama_kwargs, draft_path)
