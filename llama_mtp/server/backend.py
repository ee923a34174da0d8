"""The served model: the target/draft pair, the Engine running on it, and per-request accounting.

One Backend per app. Request threads only read from the target (tokenizer,
vocabulary, metadata); all decoding happens on the engine's worker thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, List, Optional, Set

import llama_cpp

from llama_mtp import _compat
from llama_mtp.chat_templates import ChatTemplates, llama_cpp_templates
from llama_mtp.engine import Engine, RequestHandle
from llama_mtp.loading import load
from llama_mtp.results import GenerationResult

from .chat_format import ChatHandler, resolve_handler
from .errors import ApiError
from .metrics import ServerMetrics
from .settings import ServeConfig, llama_kwargs

log = logging.getLogger("llama_mtp.server")


class RequestRecord:
    """One submitted engine handle and what the server needs to account for it once."""

    def __init__(self, handle: RequestHandle, kind: str, t_start: float) -> None:
        self.handle = handle
        self.kind = kind
        self.t_start = t_start
        self._recorded = False
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """True exactly once: the caller records metrics and the log line."""
        with self._lock:
            if self._recorded:
                return False
            self._recorded = True
            return True


class Backend:
    """Engine + model + metrics; what the routes work with."""

    def __init__(self, engine: Engine, target: llama_cpp.Llama, draft: llama_cpp.Llama, *, model_path: str,
                 model_alias: Optional[str], chat_handler: ChatHandler, n_draft_max: int,
                 chat_templates: Optional[ChatTemplates] = None) -> None:
        self.engine = engine
        self.target = target
        self.draft = draft
        self.model_path = model_path
        self.model_alias = model_alias or model_path
        self.chat_handler = chat_handler
        # llama.cpp's templates format chats unless the user named a llama-cpp-python chat format
        self.chat_templates = chat_templates
        self.n_vocab = int(target.n_vocab())
        # each slot gets an equal share of the context (llama.cpp's server splits -c across -np the same way)
        self.slot_ctx = int(engine.n_ctx_slot)
        self._vocab = llama_cpp.llama_model_get_vocab(target.model)
        self._detokenize = _compat.detokenizer(target)  # whole token pieces (see llama_mtp.pieces)
        self.metrics = ServerMetrics(self.model_alias, n_draft_max, lambda: engine.n_running,
                                     lambda: engine.n_waiting, lambda: engine.cache_bytes)
        # handles whose client went away: a thread waits for their (cancelled) results so their
        # work is still counted, without holding up the request that gave up on them
        self._reap_queue: "queue.Queue[Optional[RequestRecord]]" = queue.Queue()
        self._reaper = threading.Thread(target=self._reap_loop, name="llama_mtp-server-reaper", daemon=True)
        self._reaper.start()
        self._closed = False

    # -- names -----------------------------------------------------------------------------

    def model_names(self) -> Set[str]:
        """Names a request's ``model`` may use: the alias, the path, the file name (with and without .gguf)."""
        base = os.path.basename(self.model_path)
        return {self.model_alias, self.model_path, base, os.path.splitext(base)[0]}

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name not in self.model_names():
            raise ApiError(f"The model `{name}` does not exist; this server serves `{self.model_alias}`",
                           param="model", status=404, code="model_not_found")

    # -- tokens ----------------------------------------------------------------------------

    def detok_bytes(self, tokens: List[int]) -> bytes:
        return self._detokenize(tokens, None)

    def detok(self, tokens: List[int]) -> str:
        return self.detok_bytes(tokens).decode("utf-8", errors="ignore")

    def token_str(self, token: int) -> str:
        return self.detok_bytes([token]).decode("utf-8", errors="ignore")

    def tokenize(self, text: str, add_bos: bool = True) -> List[int]:
        return self.target.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def n_completion_tokens(self, res: GenerationResult) -> int:
        """Tokens of the completion: the generated ones without a final end-of-generation token."""
        toks = res.tokens
        if toks and res.finish_reason == "stop" and llama_cpp.llama_vocab_is_eog(self._vocab, int(toks[-1])):
            return len(toks) - 1
        return len(toks)

    def check_grammar(self, grammar: Any) -> None:
        """Refuse a GBNF string llama.cpp cannot parse before it reaches the engine (reads the vocabulary only)."""
        text = grammar if isinstance(grammar, str) else None
        if text is None:
            return  # LlamaGrammar objects from chat handlers come from JSON schemas and parse
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode("utf-8"), b"root")
        if not sampler:
            raise ApiError("the grammar does not parse (GBNF with a `root` rule expected)", param="grammar")
        llama_cpp.llama_sampler_free(sampler)

    # -- accounting ------------------------------------------------------------------------

    def finished(self, rec: RequestRecord, res: GenerationResult) -> None:
        """A request's result is in: count it (once)."""
        if rec.claim():
            self._record(rec, res)

    def reap(self, rec: RequestRecord) -> None:
        """A request was abandoned or failed: count it when the engine is done with it."""
        if rec.claim():
            self._reap_queue.put(rec)

    def _reap_loop(self) -> None:
        while True:
            rec = self._reap_queue.get()
            if rec is None:
                return
            try:
                res = rec.handle.result(timeout=600)
            except Exception as e:  # the request's own failure, already answered to its client
                self.metrics.failed()
                log.info("%s failed: %s: %s", rec.kind, type(e).__name__, e)
                continue
            self._record(rec, res)

    def _record(self, rec: RequestRecord, res: GenerationResult) -> None:
        seconds = time.perf_counter() - rec.t_start
        self.metrics.observe(res, seconds)
        st = res.stats
        log.info("%s: %d prompt + %d generated tokens, finish %s; drafted %d, accepted %d (%.0f%%); "
                 "%.1f tok/s; %.2f s", rec.kind, st.n_prompt_tokens, st.n_generated, res.finish_reason,
                 st.drafted, st.accepted, 100.0 * st.acceptance_rate, st.tokens_per_second, seconds)

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.engine.close()
        finally:
            self._reap_queue.put(None)
            self._reaper.join(timeout=5)
            # the draft context runs on the target's model (or context): free it first
            self.draft.close()
            self.target.close()


def load_backend(cfg: ServeConfig) -> Backend:
    """Load the model with MTP heads (or with its external drafter) for n_parallel sequences and
    start the engine on it."""
    kwargs = llama_kwargs(cfg.model)
    target, draft = load(cfg.model.model, n_seq=cfg.mtp.n_parallel, n_draft_max=cfg.mtp.n_draft_max,
                         draft_model_path=cfg.mtp.draft_model_path, **kwargs)
    try:
        handler = resolve_handler(target, cfg.model)
        templates = llama_cpp_templates(target, cfg.model.chat_format, None)
        engine = Engine(target, draft, n_draft=cfg.mtp.n_draft, max_waiting=cfg.mtp.max_waiting,
                        ctx_checkpoints=cfg.mtp.ctx_checkpoints, cache_ram_mib=cfg.mtp.cache_ram_mib,
                        checkpoint_min_step=cfg.mtp.checkpoint_min_step)
    except BaseException:
        draft.close()
        target.close()
        raise
    return Backend(engine, target, draft, model_path=cfg.model.model, model_alias=cfg.model.model_alias,
                   chat_handler=handler, n_draft_max=cfg.mtp.n_draft_max, chat_templates=templates)
