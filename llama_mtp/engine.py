"""Engine: a thread-safe front of the StepEngine for servers (continuous batching).

Any thread may :meth:`Engine.submit` a prompt; one worker thread alone touches
the llama.cpp contexts. It admits waiting requests into free slots between
steps, runs steps while any sequence is in a slot, and hands each request's
committed text to its :class:`RequestHandle` as it is generated::

    target, draft = llama_mtp.load("model.gguf", n_seq=4)
    with llama_mtp.Engine(target, draft) as engine:
        h = engine.submit("Once upon a time", max_tokens=64)
        for piece in h:            # blocks until text is committed
            print(piece, end="")
        h.result().stats           # this sequence's own stats

Requests beyond the free slots wait in a bounded FIFO queue (``max_waiting``);
``submit`` raises :class:`QueueFullError` beyond it. Bad input raises a typed
:class:`MtpArgumentError` at once, and the engine stays usable.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import deque
from typing import Any, Collection, Deque, Iterator, List, Optional, Sequence as Seq, Tuple, Union

import llama_cpp

from .checks import NDraft, integer
from .core import Prompt, Sequence, SequenceParams, StepEngine, sequence_params, tokenize_prompt
from .drafter import resolve_drafter
from .errors import EngineClosedError, QueueFullError
from .prompt_cache import CHECKPOINT_MIN_STEP, slot_cache
from .results import GenerationResult, GenerationStats

log = logging.getLogger("llama_mtp.engine")

_END = object()


class RequestHandle:
    """One submitted request: iterate for text pieces; ``result()`` for the GenerationResult."""

    def __init__(self, engine: "Engine", prompt_tokens: List[int], params: SequenceParams) -> None:
        self._engine = engine
        self.prompt_tokens = prompt_tokens
        self.params = params
        self._pieces: "queue.Queue[Any]" = queue.Queue()
        self._done = threading.Event()
        self._result: Optional[GenerationResult] = None
        self._error: Optional[BaseException] = None
        self.cancelled = False
        self.seq: Optional[Sequence] = None  # set by the worker while the request holds a slot

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._pieces.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def result(self, timeout: Optional[float] = None) -> GenerationResult:
        """The finished generation (blocks); raises the request's error if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request has not finished yet")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """End the request at the next step (finish_reason "cancelled"); its slot is freed."""
        self.cancelled = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- worker side ------------------------------------------------------------------

    def _put(self, text: str) -> None:
        if text:
            self._pieces.put(text)

    def _finish(self, result: Optional[GenerationResult], error: Optional[BaseException] = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._pieces.put(_END)


class Engine:
    """Thread-safe continuous batching over ``load(path, n_seq=N)``'s slots.

    ``n_draft``: default draft length ("auto" or an int; a request may override it,
    0 = plain decoding); ``max_waiting``: requests that may wait for a slot;
    ``prefill``: "shared" (prompt chunks ride in the verify decode) or "separate".
    Drafts come from the session's own draft loop (batched across sequences); a draft mode
    it does not implement (an external drafter on the target's KV, gemma4-assistant) goes
    to upstream's drafter with a logged warning, and ``verify="rejection"`` is then refused.
    Prompt cache: a request goes to the free slot whose memory shares the longest prefix with its
    prompt (llama-server's rule) and decodes only the rest, also across engines on the same target;
    ``ctx_checkpoints``: recurrent-state checkpoints per slot on hybrid/recurrent targets, taken
    near each prompt's end, at user-message starts and every ``checkpoint_min_step`` tokens of a
    long prompt (llama-server's ``--checkpoint-min-step``: also the least spacing of user-message ones);
    ``cache_ram_mib``: a host-memory cache of that many MiB for more conversations than slots (a
    slot about to take another conversation is saved; a prompt a saved one serves better than its
    slot gets it back instead of decoding it); a prompt sharing a prefix with another running slot's
    copies it from there; a request's ``cache_prompt=False`` decodes its whole prompt.
    The engine does not own ``target``/``draft``: close them after :meth:`close`.
    """

    def __init__(self, target: llama_cpp.Llama, draft: llama_cpp.Llama, *, n_draft: NDraft = "auto",
                 verify: str = "match", max_waiting: int = 64, prefill: str = "shared",
                 ctx_checkpoints: int = 8, cache_ram_mib: int = 0,
                 checkpoint_min_step: int = CHECKPOINT_MIN_STEP) -> None:
        # n_draft and verify are validated where the drafter is resolved (the worker; its error is raised here)
        integer("max_waiting", max_waiting, 0)
        self.verify = verify
        self.max_waiting = max_waiting
        self.target = target
        self._cond = threading.Condition()
        self._waiting: Deque[RequestHandle] = deque()
        self._running: List[RequestHandle] = []
        self._closed = False
        self._seed_rng = random.Random()
        # the StepEngine (and its MtpSession) is made by the worker: only it touches the contexts.
        # It hands the core back (or its error), so the engine is whole when __init__ returns
        ready: "queue.Queue[Union[StepEngine, BaseException]]" = queue.Queue()
        integer("cache_ram_mib", cache_ram_mib, 0)
        cache_args = (ctx_checkpoints, cache_ram_mib * 1024 * 1024, checkpoint_min_step)
        self._thread = threading.Thread(target=self._worker, args=(target, draft, n_draft, prefill, cache_args,
                                                                   ready),
                                        name="llama-mtp-engine", daemon=True)
        self._thread.start()
        built = ready.get()
        if isinstance(built, BaseException):
            self._thread.join()
            raise built
        # read-only from here on: submit() checks requests against them on any thread
        self._core: StepEngine = built
        self.n_draft: NDraft = built.n_draft
        self._n_slots, self._n_ctx_slot = built.n_slots, built.n_ctx_slot

    # -- public -----------------------------------------------------------------------

    @property
    def n_slots(self) -> int:
        return self._n_slots

    @property
    def n_running(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def n_waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def n_ctx_slot(self) -> int:
        """Context of one sequence (prompt + generated tokens)."""
        return self._n_ctx_slot

    @property
    def cache_bytes(self) -> int:
        """Bytes of recurrent-state checkpoints the slot cache keeps (any thread may read it)."""
        cache = self._core.cache
        return cache.nbytes if cache is not None else 0

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, prompt: Prompt, *, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 40,
               top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0, repeat_penalty: float = 1.0,
               frequency_penalty: float = 0.0, presence_penalty: float = 0.0, seed: Optional[int] = None,
               stop: Any = None, grammar: Any = None, logit_bias: Any = None, logprobs: Optional[int] = None,
               n_draft: Optional[NDraft] = None, verify: Optional[str] = None,
               cache_prompt: bool = True, special_ids: Collection[int] = frozenset(),
               user_spans: Seq[Tuple[int, int]] = ()) -> RequestHandle:
        """Queue a generation; returns its handle at once.

        ``user_spans``: (start, end) of each user message of a chat template in the prompt
        (chat_templates.user_spans): the slot cache checkpoints recurrent targets at their starts,
        and tells conversations apart by them.

        Raises MtpArgumentError for bad input (an empty or too long prompt, a bad
        sampling value), QueueFullError when ``max_waiting`` requests already wait,
        EngineClosedError after :meth:`close`.
        """
        if self._closed:
            raise EngineClosedError("the engine is closed")
        if seed is None:
            seed = self._seed_rng.getrandbits(32)  # unseeded requests must not share one RNG stream
        params = sequence_params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty,
                                 frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, seed=seed,
                                 stop=stop, grammar=grammar, logit_bias=logit_bias, logprobs=logprobs,
                                 n_draft=n_draft, verify=verify or self.verify, cache_prompt=cache_prompt,
                                 special_ids=special_ids, user_spans=user_spans)
        tokens = tokenize_prompt(self.target, prompt)  # the vocabulary is read-only: any thread may
        self._core.check_request(tokens, params)  # touches no context: safe off the worker thread
        self._core.drafter.check_verify(params.verify)
        handle = RequestHandle(self, tokens, params)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            # requests beyond the slots wait (one just submitted may not be admitted yet)
            n_wait = len(self._running) + len(self._waiting) - self._n_slots
            if n_wait >= self.max_waiting:
                raise QueueFullError(f"{max(0, n_wait)} requests are already waiting for one of {self._n_slots} "
                                     f"slots (max_waiting={self.max_waiting}); retry later")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def close(self) -> None:
        """Cancel every request, stop the worker and free the engine's session. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- worker -----------------------------------------------------------------------

    def _worker(self, target: llama_cpp.Llama, draft: llama_cpp.Llama, n_draft: NDraft, prefill: str,
                cache_args: Tuple[int, int, int], ready: "queue.Queue[Union[StepEngine, BaseException]]") -> None:
        try:
            drafter = resolve_drafter(target, draft, n_draft, self.verify)
            core = StepEngine(target, draft, drafter=drafter, prefill=prefill, keep_memory=True,
                              cache=slot_cache(target, drafter.n_seq, *cache_args))
        except BaseException as e:
            ready.put(e)
            return
        ready.put(core)
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._closed:
                        break
                self._cancel_requested(core)
                self._admit(core)
                if not core.active:
                    continue
                try:
                    events = core.step()
                except Exception as e:  # an engine-level failure ends what was running, not the engine
                    log.exception("a step failed; ending the %d running requests", len(core.active))
                    events = core.fail_all(e)
                self._deliver(events)
        finally:
            with self._cond:
                pending = list(self._waiting) + list(self._running)
                self._waiting.clear()
                self._running.clear()
            core.close()
            for h in pending:
                if not h.done:
                    seq = h.seq
                    h._finish(seq.result() if seq is not None else None,
                              None if seq is not None else EngineClosedError("the engine was closed"))

    def _cancel_requested(self, core: StepEngine) -> None:
        with self._cond:
            waiting = [h for h in self._waiting if h.cancelled]
            for h in waiting:
                self._waiting.remove(h)
            running = [h for h in self._running if h.cancelled]
        for h in waiting:
            h._finish(GenerationResult([], "", "cancelled", GenerationStats(n_prompt_tokens=len(h.prompt_tokens))))
        for h in running:
            assert h.seq is not None
            core.cancel(h.seq)
            self._done(h)

    def _admit(self, core: StepEngine) -> None:
        while core.free_slots():
            with self._cond:
                if not self._waiting:
                    return
                h = self._waiting.popleft()
                self._running.append(h)
            try:
                h.seq = core.add(h.prompt_tokens, h.params)
                h.seq.tag = h
            except Exception as e:  # e.g. a grammar llama.cpp cannot parse: this request only
                self._remove(h)
                h._finish(None, e)

    def _deliver(self, events: List[Any]) -> None:
        for ev in events:
            h: RequestHandle = ev.seq.tag
            h._put(ev.text)
            if ev.done:
                self._done(h)

    def _done(self, h: RequestHandle) -> None:
        self._remove(h)
        seq = h.seq
        assert seq is not None
        if seq.error is not None:
            h._finish(None, seq.error)
        else:
            h._finish(seq.result())

    def _remove(self, h: RequestHandle) -> None:
        with self._cond:
            if h in self._running:
                self._running.remove(h)
