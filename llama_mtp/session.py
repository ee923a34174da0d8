"""MtpSession: upstream's MTP drafter driven from llama-cpp-python objects."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import llama_cpp

from . import _loader
from ._compat import BatchLike, ContextLike, llama_context, context_type, guard_of, loaded_with_mtp, raw_batch, context_address
from .checks import integer, number
from .errors import (
    BadSeqIdError,
    MtpArgumentError,
    MtpError,
    MtpInitError,
    MtpProcessError,
    ProtocolError,
    RollbackError,
    SessionClosedError,
)
from .stats import MtpStats

log = logging.getLogger("llama_mtp")

# upstream's MTP draft modes (common_speculative_impl_draft_mtp), by the shim's MTP_MODE_* value
DRAFT_MODES = ("single", "chain_heads", "mem_shared")
# the modes the session's own draft loop (draft_dist / draft_many) implements
OWN_LOOP_MODES = frozenset({"single", "chain_heads"})


@dataclass(frozen=True)
class DraftMode:
    """How a (target, draft) pair drafts, as upstream derives it.

    ``mode``: "single" (one head drafts every position), "chain_heads" (head i drafts
    position i: at most ``n_heads`` tokens per draft) or "mem_shared" (an external
    drafter on the target's KV, gemma4 assistant); ``n_heads``: the draft model's nextn layers.
    """

    mode: str
    n_heads: int

    @property
    def own_loop(self) -> bool:
        """Whether the session's own draft loop implements this mode."""
        return self.mode in OWN_LOOP_MODES


def draft_mode_of(target: ContextLike, draft: ContextLike) -> DraftMode:
    """The draft mode of a (target, draft) pair, without creating a session."""
    ffi, lib = _loader.load()
    ptr_tgt = context_address(llama_context(target, "target"), "target")
    ptr_dft = context_address(llama_context(draft, "draft"), "draft")
    mode, heads = ffi.new("int32_t *"), ffi.new("int32_t *")
    status = lib.mtp_probe_mode(ffi.cast("struct llama_context *", ptr_tgt),
                                ffi.cast("struct llama_context *", ptr_dft), mode, heads)
    if status != 0:
        raise MtpInitError(_loader.last_error())
    return DraftMode(DRAFT_MODES[mode[0]], int(heads[0]))


@dataclass(frozen=True)
class DraftRequest:
    """One sequence's part of :meth:`MtpSession.draft_many`."""

    seq_id: int
    n_past: int
    id_last: int
    n_max: int
    temperature: float = 0.0   # 0: argmax drafts; > 0: sampled from q (rejection sampling)
    top_k: int = 40
    seed: int = 0
    want_q: bool = False       # return q (only rejection sampling reads it)


class _Native:
    """Owner of one native mtp_session; freed exactly once, before its contexts."""

    def __init__(self, ffi: Any, lib: Any, handle: Any) -> None:
        self.ffi, self.lib, self.handle = ffi, lib, handle
        self.lock = threading.RLock()
        self.closed_reason: Optional[str] = None

    def release(self, reason: str) -> None:
        with self.lock:
            if self.handle is None:
                return
            self.lib.mtp_session_free(self.handle)
            self.handle = None
            self.closed_reason = reason

    def __del__(self) -> None:  # backstop only: close() and the context guards free it first
        try:
            self.release("garbage collected")
        except Exception:
            pass


_STATUS_ERRORS = {
    "MTP_ERR_NULL": MtpArgumentError,
    "MTP_ERR_ARG": MtpArgumentError,
    "MTP_ERR_PROTOCOL": ProtocolError,
    "MTP_ERR_INIT": MtpInitError,
    "MTP_ERR_PROCESS": MtpProcessError,
    "MTP_ERR_DECODE": MtpProcessError,
    "MTP_ERR_ROLLBACK": RollbackError,
    "MTP_ERR_INTERNAL": MtpError,
}


class MtpSession:
    """Speculative drafting with a model's MTP head, on llama-cpp-python objects.

    ``target``: the Llama (or LlamaContext) that verifies; ``draft``: an MTP
    context on the same model (see :func:`llama_mtp.load`). Create the session
    before decoding the prompt and hand every target decode to :meth:`process`.
    Per step: ``draft()`` -> decode ``[id_last, *draft]`` on the target ->
    ``process()`` -> ``accept(n)``, which trims both contexts to the new n_past.

    ``defer_catchup=True`` (needs ``backend_sampling=False``; drafts then come from
    :meth:`draft_dist`): ``process()`` only records what the MTP context must see,
    and the next draft decodes it in the same batch as its first draft token. Steps
    that draft nothing then cost no MTP decode, and a drafting step one decode less.
    """

    def __init__(self, target: ContextLike, draft: ContextLike, *, n_seq: int = 1, n_draft_max: int = 3,
                 n_min: int = 0, p_min: float = 0.0, backend_sampling: bool = True,
                 defer_catchup: bool = False) -> None:
        self._native: Optional[_Native] = None
        for name, value in (("n_seq", n_seq), ("n_draft_max", n_draft_max), ("n_min", n_min)):
            integer(name, value)  # ranges are the shim's to check (it names them)
        number("p_min", p_min)
        # keep the Llama objects alive as long as the session
        self._target_obj, self._draft_obj = target, draft
        self._ctx_tgt = llama_context(target, "target")
        self._ctx_dft = llama_context(draft, "draft")
        if self._ctx_tgt is self._ctx_dft:
            raise MtpInitError("target and draft are the same context; the draft must be an MTP context (llama_mtp.load creates one)")
        self._check_model_loaded_with_mtp()
        ptr_tgt = context_address(self._ctx_tgt, "target")
        ptr_dft = context_address(self._ctx_dft, "draft")

        ffi, lib = _loader.load()
        self._ffi, self._lib = ffi, lib
        if defer_catchup:
            probed = draft_mode_of(self._ctx_tgt, self._ctx_dft)
            if not probed.own_loop:  # the shim refuses it too (MtpInitError); the log names the mode
                log.warning("llama_mtp: defer_catchup=True needs the own draft loop, which does not implement "
                            "draft mode %r", probed.mode)
        cfg = ffi.new("mtp_config *", {"n_seq": _i32(n_seq, "n_seq"), "n_draft_max": _i32(n_draft_max, "n_draft_max"),
                                       "n_min": _i32(n_min, "n_min"), "p_min": float(p_min),
                                       "backend_sampling": int(bool(backend_sampling)),
                                       "defer_catchup": int(bool(defer_catchup)),
                                       "ctx_type_tgt": context_type(self._ctx_tgt),
                                       "ctx_type_dft": context_type(self._ctx_dft)})
        out = ffi.new("mtp_session **")
        status = lib.mtp_session_new(ffi.cast("struct llama_context *", ptr_tgt),
                                     ffi.cast("struct llama_context *", ptr_dft), cfg, out)
        self._raise_for(status)
        native = _Native(ffi, lib, out[0])
        self._native = native
        info = ffi.new("mtp_session_info *")
        self._raise_for(lib.mtp_session_get_info(native.handle, info))
        self._mode = DraftMode(DRAFT_MODES[info.mode], int(info.n_heads))
        self._n_max = int(info.n_max)
        self._n_seq = n_seq
        self._n_draft_max = n_draft_max
        self._defer_catchup = bool(defer_catchup)
        self._draft_buf = ffi.new("int32_t[]", n_draft_max)
        self._draft_n = ffi.new("int32_t *")
        self._many_reqs = ffi.new("mtp_draft_req[]", n_seq)
        self._many_out = ffi.new("int32_t[]", n_seq * n_draft_max)
        self._flag = ffi.new("int32_t *")
        self._vocab_size = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(
            llama_cpp.llama_get_model(ptr_tgt))))
        # free the native session before either llama_context is freed
        key = id(self)
        self._guards = (guard_of(self._ctx_tgt), guard_of(self._ctx_dft))
        for role, guard in zip(("target", "draft"), self._guards):
            guard.attach(key, lambda role=role: native.release(f"the {role} context was closed"))

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Free the native session. Idempotent; the Llama objects stay open."""
        native = self._native
        if native is None:
            return
        native.release("closed")
        for guard in getattr(self, "_guards", ()):
            guard.detach(id(self))

    def __enter__(self) -> "MtpSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        return self._native is None or self._native.handle is None

    # -- properties -------------------------------------------------------------------------

    @property
    def n_seq(self) -> int:
        return self._n_seq

    @property
    def n_draft_max(self) -> int:
        return self._n_draft_max

    @property
    def draft_mode(self) -> DraftMode:
        """The pair's draft mode (upstream's choice; see :class:`DraftMode`)."""
        return self._mode

    @property
    def n_max(self) -> int:
        """The longest draft either loop proposes: n_draft_max, capped at one token per head
        with chained heads (as upstream caps it)."""
        return self._n_max

    @property
    def defer_catchup(self) -> bool:
        """Whether process() defers the MTP context's decodes to the next draft_dist()."""
        return self._defer_catchup

    @property
    def target(self) -> ContextLike:
        return self._target_obj

    @property
    def draft_model(self) -> ContextLike:
        return self._draft_obj

    @property
    def stats(self) -> MtpStats:
        ffi = self._ffi
        st = ffi.new("mtp_stats *")
        n = self._n_draft_max
        drafted, accepted = ffi.new("int64_t[]", n), ffi.new("int64_t[]", n)
        with self._call() as handle:
            self._raise_for(self._lib.mtp_session_stats(handle, st, drafted, accepted, n))
        return MtpStats(
            n_draft_calls=st.n_draft_calls, n_drafts=st.n_drafts, n_drafted=st.n_drafted,
            n_accept_calls=st.n_accept_calls, n_accepted=st.n_accepted,
            n_process_calls=st.n_process_calls, n_process_tokens=st.n_process_tokens,
            drafted_per_pos=tuple(drafted), accepted_per_pos=tuple(accepted),
            t_draft_s=st.t_draft_us / 1e6, t_process_s=st.t_process_us / 1e6, t_accept_s=st.t_accept_us / 1e6,
            n_forget=st.n_forget,
        )

    # -- protocol ---------------------------------------------------------------------------

    def begin(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Start a new generation on seq_id (drops its pending proposal, if any)."""
        self._check_seq(seq_id)
        toks = [_token(t) for t in tokens]
        arr = self._ffi.new("int32_t[]", toks) if toks else self._ffi.NULL
        with self._call() as handle:
            self._raise_for(self._lib.mtp_session_begin(handle, seq_id, arr, len(toks)), seq_id)

    def process(self, batch: BatchLike) -> None:
        """Hand the batch just decoded on the target to the drafter.

        ``batch``: the target Llama (its last decoded batch), a LlamaBatch, or a ctypes llama_batch.
        """
        addr = raw_batch(batch)
        ptr = self._ffi.cast("struct llama_batch *", addr)
        with self._call() as handle:
            status = self._lib.mtp_session_process(handle, ptr)
        if status == self._lib.MTP_ERR_SEQ:
            raise BadSeqIdError(self._last_error(), _first_bad_seq(batch, self._n_seq), self._n_seq)
        self._raise_for(status)

    def draft(self, seq_id: int, n_past: int, id_last: int, n_max: Optional[int] = None) -> List[int]:
        """Propose up to n_max (default n_draft_max) tokens to follow id_last at position n_past.

        A non-empty result is pending until :meth:`accept`.
        """
        self._check_seq(seq_id)
        n_past = _i32(n_past, "n_past")
        id_last = _i32(id_last, "id_last")
        n_max = _n_max(n_max)
        with self._call() as handle:
            self._draft_n[0] = self._n_draft_max
            status = self._lib.mtp_session_draft(handle, seq_id, n_past, id_last, n_max, self._draft_buf, self._draft_n)
            self._raise_for(status, seq_id)
            return list(self._ffi.unpack(self._draft_buf, self._draft_n[0]))

    def draft_dist(self, seq_id: int, n_past: int, id_last: int, n_max: Optional[int] = None, *,
                   temperature: float = 0.0, top_k: int = 40, seed: int = 0) -> Tuple[List[int], Any]:
        """The session's own draft loop: stops at n_max (no wasted MTP decodes) and, with
        temperature > 0, samples each draft token from q = softmax(top_k MTP logits / T).

        Returns (tokens, q) with q a float32 array [len(tokens), n_vocab] (one-hot at T=0).
        Needs a session created with ``backend_sampling=False``.
        """
        self._check_seq(seq_id)
        n = self._n_draft_max if n_max is None else _n_max(n_max)
        (tokens, q), = self.draft_many([DraftRequest(seq_id, n_past, id_last, n, temperature, top_k, seed, True)])
        return tokens, q

    def draft_many(self, requests: Sequence["DraftRequest"]) -> List[Tuple[List[int], Any]]:
        """The own draft loop for several sequences at once (distinct seq ids): draft position i
        of every sequence is one decode on the MTP context. Returns (tokens, q) per request, q
        None unless ``want_q``. Every check runs first: a refused call drafts nothing."""
        import numpy as np

        ffi = self._ffi
        n = len(requests)
        for r in requests:
            if not isinstance(r, DraftRequest):
                raise MtpArgumentError(f"draft_many takes DraftRequest objects, got {type(r).__name__}")
            self._check_seq(r.seq_id)
        # the request and output buffers are the session's (a step drafts every step): filled,
        # passed and read under the session lock, so concurrent callers never share them
        with self._call() as handle:
            if n > self._n_seq:  # duplicates: the shim refuses them, these buffers only hold n_seq
                reqs, outs = ffi.new("mtp_draft_req[]", n), ffi.new("int32_t[]", n * self._n_draft_max)
            else:
                reqs, outs = self._many_reqs, self._many_out
            qs: List[Any] = []
            for i, r in enumerate(requests):
                c = reqs[i]
                c.seq_id, c.pos0, c.id_last = r.seq_id, _i32(r.n_past, "n_past"), _i32(r.id_last, "id_last")
                c.n_max = _n_max(r.n_max)
                c.temp, c.top_k, c.seed = float(r.temperature), _i32(r.top_k, "top_k"), int(r.seed) & 0xFFFFFFFF
                c.out = outs + i * self._n_draft_max
                rows = self._n_draft_max if c.n_max < 0 else min(c.n_max, self._n_draft_max)
                q = np.zeros((max(1, rows), self._vocab_size), dtype=np.float32) if r.want_q else None
                c.q_out = ffi.cast("float *", q.ctypes.data) if q is not None else ffi.NULL
                qs.append(q)
            status = self._lib.mtp_session_draft_many(handle, reqs, n)
            self._raise_for(status, requests[0].seq_id if n == 1 else None)
            return [(list(ffi.unpack(reqs[i].out, reqs[i].n_out)), qs[i][:reqs[i].n_out] if qs[i] is not None else None)
                    for i in range(n)]

    def accept(self, seq_id: int, n_accepted: int) -> None:
        """Settle the pending draft of seq_id: its first n_accepted tokens were accepted.

        Trims the target and draft contexts of seq_id to ``n_past + 1 + n_accepted``.
        """
        self._check_seq(seq_id)
        n_accepted = _i32(n_accepted, "n_accepted")
        with self._call() as handle:
            self._raise_for(self._lib.mtp_session_accept(handle, seq_id, n_accepted), seq_id)

    def forget(self, seq_id: int, keep: int = 0) -> int:
        """Drop seq_id's draft-context history but its last ``keep`` deferred catch-up rows;
        returns how many rows the next draft of seq_id decodes first.

        For a long run of plain steps (``defer_catchup=True`` only): without it every plain
        token costs one MTP row at the next draft, or every n_ubatch tokens. Output stays exact;
        the MTP head sees a shorter past, so acceptance right after may be lower.
        """
        self._check_seq(seq_id)
        keep = _i32(keep, "keep")
        with self._call() as handle:
            self._raise_for(self._lib.mtp_session_forget(handle, seq_id, keep, self._flag), seq_id)
            return int(self._flag[0])

    def drafter_rows(self, seq_id: int, upto: int) -> int:
        """Leading positions of seq_id the drafter can continue from, while the target holds
        positions < ``upto``: a prompt-cache hit may keep at most these (the rest is decoded again:
        the drafter's rows need the target's hidden states). Counts the draft context's rows and the
        deferred catch-up rows this session keeps (a new session has none of an old one's)."""
        self._check_seq(seq_id)
        upto = _i32(upto, "upto")
        with self._call() as handle:
            self._raise_for(self._lib.mtp_session_drafter_rows(handle, seq_id, upto, self._flag), seq_id)
            return int(self._flag[0])

    def catch_up(self, seq_id: int) -> None:
        """Decode seq_id's deferred catch-up rows on the draft context now, so its memory holds
        every row the drafter has seen (before that memory is saved elsewhere)."""
        self._check_seq(seq_id)
        with self._call() as handle:
            self._raise_for(self._lib.mtp_session_catch_up(handle, seq_id), seq_id)

    def pending(self, seq_id: int) -> bool:
        """Whether seq_id has a draft awaiting accept()."""
        self._check_seq(seq_id)
        with self._call() as handle:
            self._raise_for(self._lib.mtp_session_has_pending(handle, seq_id, self._flag), seq_id)
            return bool(self._flag[0])

    # -- internals --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _call(self) -> Iterator[Any]:
        """Hold the session lock for one native call and yield the live handle.

        ``with native.lock`` (not acquire()/release()) so that a KeyboardInterrupt
        delivered right after the acquire still releases it.
        """
        native = self._native
        if native is None:
            raise SessionClosedError("the session was never opened")
        with native.lock:
            if native.handle is None:
                raise SessionClosedError(f"the MtpSession is closed ({native.closed_reason}); create a new one")
            yield native.handle

    def _check_seq(self, seq_id: Any) -> None:
        integer("seq_id", seq_id)
        if not 0 <= seq_id < self._n_seq:
            raise BadSeqIdError(f"seq_id {seq_id} is out of range: this session drafts for seq ids "
                                f"0..{self._n_seq - 1} (n_seq={self._n_seq})", seq_id, self._n_seq)

    def _check_model_loaded_with_mtp(self) -> None:
        # an MTP context on a model loaded without its MTP layers aborts inside llama.cpp
        if loaded_with_mtp(self._ctx_dft) is False:
            raise MtpInitError("the draft context's model was loaded with load_mtp=False: "
                               "load it with llama_mtp.load() so its MTP layers are present")

    def _last_error(self) -> str:
        return _loader.last_error()

    def _raise_for(self, status: int, seq_id: Optional[int] = None) -> None:
        if status == 0:
            return
        message = self._last_error()
        lib = self._lib
        if status == lib.MTP_ERR_SEQ:
            raise BadSeqIdError(message, seq_id, getattr(self, "_n_seq", 0))
        for name, exc in _STATUS_ERRORS.items():
            if status == getattr(lib, name):
                raise exc(message)
        raise MtpError(f"unknown status {status}: {message}")


def _i32(value: Any, name: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise MtpArgumentError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not -(2**31) <= value < 2**31:
        raise MtpArgumentError(f"{name}={value} does not fit in 32 bits")
    return value


def _n_max(value: Optional[int]) -> int:
    """None -> the session's n_draft_max (-1 for the shim); otherwise an int >= 0."""
    if value is None:
        return -1
    value = _i32(value, "n_max")
    if value < 0:
        raise MtpArgumentError(f"n_max must be >= 0 (got {value}); pass None for the session's n_draft_max")
    return value


def _token(value: Any) -> int:
    return _i32(value, "token")


def _first_bad_seq(batch: Any, n_seq: int) -> Optional[int]:
    """The first out-of-range seq id in a batch (error path only)."""
    import ctypes

    try:
        b = ctypes.cast(raw_batch(batch), ctypes.POINTER(llama_cpp.llama_batch)).contents
        for i in range(b.n_tokens):
            for j in range(b.n_seq_id[i] if b.n_seq_id else 1):
                sid = b.seq_id[i][j] if b.seq_id else 0
                if not 0 <= sid < n_seq:
                    return int(sid)
    except Exception:
        pass
    return None
