"""StepEngine: the speculative step loop for 1..N sequences (the core every API runs on).

A documented internal: ``generate()``, ``generate_many()``, :class:`MtpLlama`
and the threaded :class:`llama_mtp.Engine` drive it; it is importable as
``llama_mtp.core.StepEngine`` but its interface may change between releases.

Each target sequence id is a *slot*. A slot holds one :class:`Sequence` from
:meth:`StepEngine.add` until it finishes or is cancelled; sequences join and
leave between steps (continuous batching). One :meth:`StepEngine.step` runs
these phases, each handing its results to the next in a :class:`StepRecord`:

1. plan: every running sequence chooses its draft length (its own ``auto``
   policy, a fixed k, or 0 for plain-decoding sequences), bounded by its room;
2. draft: one MTP decode per draft position for all drafting sequences
   (``MtpSession.draft_many``), or upstream's drafter per sequence;
3. decode: every sequence's ``[id_last, *draft]`` rows, plus prompt chunks of
   joining sequences (``prefill="shared"``), in ONE target ``llama_decode``,
   handed to the drafter with one ``process()``;
4. verify: each sequence samples its rows with its own sampler chain;
5. settle: EOG, stop strings and max_tokens per sequence; accept (trims both
   contexts); drafts longer than the recurrent rollback restore their
   checkpoint and re-decode the accepted prefix (one decode for all of them).

A finished or cancelled sequence frees its slot; both contexts' memory for that
seq id is cleared before the slot is used again.
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Collection, Dict, FrozenSet, List, Optional, Sequence as Seq, Tuple, Union

import llama_cpp

from . import _compat
from .adaptive import FORGET_AT, FORGET_KEEP, Acceptance, DraftChoice, Planner, StepCosts
from .checkpoint import TargetCheckpoint, restore_partial_state, rollback_capacity
from .checks import NDraft, check_pair, choice, integer, is_int, n_draft as check_n_draft, number
from .drafter import Drafter, resolve_drafter
from .errors import MtpArgumentError, MtpError, SessionClosedError
from .session import DraftRequest, MtpSession
from .prompt_cache import CHECKPOINT_MIN_STEP, SlotCache, common_prefix, swa_floor, user_checkpoints
from .results import GenerationResult, GenerationStats
from .text import TextAssembler
from .verify import RejectionVerifier, make_verifier

log = logging.getLogger("llama_mtp.core")

Prompt = Union[str, bytes, Seq[int]]


# ----------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SequenceParams:
    """A sequence's validated settings (see :func:`sequence_params`)."""

    sampling: Dict[str, Any]            # llama-cpp-python's sampler-chain keywords (temp, top_k, ..., grammar)
    max_tokens: int
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    n_draft: Optional[NDraft] = None    # None: the engine's default; 0: plain decoding
    verify: str = "match"
    logit_bias: Optional[Dict[int, float]] = None
    logprobs: Optional[int] = None      # top-n logprobs per token (plain decoding)
    raw: bool = False                   # commit every token (no EOG/stop/max_tokens): Llama.generate's contract
    cache_prompt: bool = True           # reuse what a slot's memory holds (llama-server's cache_prompt)
    special_ids: FrozenSet[int] = frozenset()  # rendered in the text even if control tokens (chat templates' preserved)
    # (start, end) of a chat template's user messages in the prompt (chat_templates.user_spans): the
    # slot cache checkpoints a recurrent target at their starts, and tells a slot's conversation from
    # another by the end of the last one
    user_spans: Tuple[Tuple[int, int], ...] = ()


def sequence_params(*, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95,
                    min_p: float = 0.05, typical_p: float = 1.0, repeat_penalty: float = 1.0,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0, seed: Optional[int] = None,
                    stop: Union[None, str, Seq[str]] = None, grammar: Any = None,
                    logit_bias: Optional[Dict[int, float]] = None, logprobs: Optional[int] = None,
                    n_draft: Optional[NDraft] = None, verify: str = "match", mirostat_mode: int = 0,
                    mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, tfs_z: float = 1.0,
                    penalize_nl: bool = True, raw: bool = False, cache_prompt: bool = True,
                    special_ids: Collection[int] = frozenset(),
                    user_spans: Seq[Tuple[int, int]] = ()) -> SequenceParams:
    """Validate one sequence's settings (llama-cpp-python's names and defaults for sampling)."""
    integer("max_tokens", max_tokens, 1)
    temp = number("temperature", temperature, 0.0)
    integer("top_k", top_k)  # <= 0: the whole vocabulary
    number("top_p", top_p, 0.0, 1.0)
    number("min_p", min_p, 0.0, 1.0)
    number("typical_p", typical_p, 0.0, 1.0, lo_open=True)
    number("repeat_penalty", repeat_penalty, 0.0, lo_open=True)
    number("frequency_penalty", frequency_penalty, -2.0, 2.0)
    number("presence_penalty", presence_penalty, -2.0, 2.0)
    if seed is not None:
        integer("seed", seed)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) for s in stops):
        raise MtpArgumentError("stop must be a string or a list of strings")
    if logprobs is not None:
        integer("logprobs", logprobs, 0)
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise MtpArgumentError("logit_bias must map token ids to numbers")
        logit_bias = {integer("logit_bias token id", int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k, 0):
                      number("logit_bias value", v) for k, v in logit_bias.items()}
    if n_draft is not None:
        n_draft = check_n_draft(n_draft)
    choice("verify", verify, ("match", "rejection"))
    if not isinstance(cache_prompt, bool):
        raise MtpArgumentError(f"cache_prompt must be true or false, got {cache_prompt!r}")
    sampling = dict(top_k=top_k, top_p=float(top_p), min_p=float(min_p), typical_p=float(typical_p), temp=temp,
                    repeat_penalty=float(repeat_penalty), frequency_penalty=float(frequency_penalty),
                    presence_penalty=float(presence_penalty), tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                    mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, penalize_nl=penalize_nl, grammar=grammar)
    return SequenceParams(sampling=sampling, max_tokens=max_tokens, seed=seed, stop=stops, n_draft=n_draft,
                          verify=verify, logit_bias=logit_bias or None, logprobs=logprobs, raw=raw,
                          cache_prompt=cache_prompt, special_ids=frozenset(int(t) for t in special_ids),
                          user_spans=_spans(user_spans))




def _spans(spans: Seq[Tuple[int, int]]) -> Tuple[Tuple[int, int], ...]:
    """Validated (start, end) prompt spans, in order."""
    try:
        out = sorted((int(start), int(end)) for start, end in spans)
    except (TypeError, ValueError):
        raise MtpArgumentError("user_spans must be (start, end) pairs of prompt positions") from None
    if any(not 0 <= start <= end for start, end in out):
        raise MtpArgumentError(f"user_spans must be (start, end) pairs with 0 <= start <= end, got {out}")
    return tuple(out)


def tokenize_prompt(llm: llama_cpp.Llama, prompt: Prompt) -> List[int]:
    """Tokens of a prompt, as llama-cpp-python's create_completion tokenizes it."""
    if isinstance(prompt, str):
        return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    if isinstance(prompt, bytes):
        return llm.tokenize(prompt, add_bos=True, special=True)
    try:
        tokens = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise MtpArgumentError(f"prompt must be str, bytes or a sequence of token ids, got {type(prompt).__name__}") from None
    n_vocab = llm.n_vocab()
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise MtpArgumentError(f"prompt token {bad[0]} is outside the vocabulary [0, {n_vocab})")
    return tokens


# ------------------------------------------------------------------------- sequences

_PLANNERS: "weakref.WeakKeyDictionary[llama_cpp.Llama, Planner]" = weakref.WeakKeyDictionary()


def auto_planner(target: llama_cpp.Llama) -> Planner:
    """auto's planner for this target: step costs belong to the model, its context and the
    machine, so what one generate() call measured serves the next (one-shot engines included)."""
    planner = _PLANNERS.get(target)
    if planner is None:
        planner = _PLANNERS[target] = Planner(StepCosts(_compat.ubatch_split(target)))
    return planner



@dataclass(frozen=True)
class Donor:
    """Another slot's sequence whose first ``n`` prompt tokens a new sequence copies."""

    seq: "Sequence"
    n: int


# a prefix shorter than this is decoded again rather than copied from another slot (or waited for)
MIN_SHARED_PREFIX = 32


class Sequence:
    """One generation in a slot: its settings, sampler chain, policy, progress and stats."""

    def __init__(self, engine: "StepEngine", seq_id: int, prompt_tokens: List[int], params: SequenceParams) -> None:
        target = engine.target
        self.seq_id = seq_id
        self.params = params
        self.tokens_prompt = prompt_tokens
        self.head = prompt_tokens[:-1]        # decoded by the prefill; the last prompt token is id_last
        self.n_prefilled = 0
        self.n_past = 0
        self.id_last = prompt_tokens[-1]
        self.generated: List[int] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.tag: Any = None                  # the caller's (e.g. the prompt's index)
        sampling = params.sampling
        n_draft = engine.n_draft if params.n_draft is None else params.n_draft
        plain_only = params.logit_bias is not None or params.logprobs is not None
        if plain_only:
            n_draft = 0  # a per-row hook or per-token logprobs: a plain-decoding sequence
        # auto's estimates, starting from what earlier sequences on the target accepted
        self.acceptance = Acceptance(engine.k_max, engine.planner.accepted) if n_draft == "auto" else None
        self.k_fixed = 0 if n_draft == "auto" else int(n_draft)
        self.verifier = make_verifier(target, sampling, verify=params.verify, seed=params.seed,
                                      own_drafts=engine.own_drafts, logit_bias=params.logit_bias,
                                      logprobs=params.logprobs)
        # rejection sampling verifies drafts sampled at the sequence's temperature, with their q
        self.want_q = isinstance(self.verifier, RejectionVerifier)
        self.draft_temp = sampling["temp"] if self.want_q else 0.0
        self.draft_top_k = sampling["top_k"] if sampling["top_k"] > 0 else 40
        self.rng = random.Random(params.seed)
        self.checkpoint = TargetCheckpoint(target)
        k_hist = max(engine.k_max, self.k_fixed)
        self.stats = GenerationStats(n_prompt_tokens=len(prompt_tokens), drafted_per_pos=[0] * k_hist,
                                     accepted_per_pos=[0] * k_hist, draft_len_hist=[0] * (k_hist + 1))
        detokenize = _compat.detokenizer(target, params.special_ids) if params.special_ids else engine.detokenize
        self.text = TextAssembler(detokenize, prompt_tokens, params.stop)
        self.t_added = time.perf_counter()
        self.t_gen = 0.0
        self.idle = 1  # deferred catch-up rows since its last draft (the draft context's backlog)
        users = [(start, end) for start, end in params.user_spans if end <= len(prompt_tokens)]
        self.user_end: Optional[int] = users[-1][1] if users else None  # where the last user message ends
        min_step = engine.cache.checkpoint_min_step if engine.cache is not None else CHECKPOINT_MIN_STEP
        self.user_stops = user_checkpoints([start for start, _ in users], min_step)
        self.donor: Optional[Donor] = None  # another slot's prefix this one copies once decoded there
        # the drafter holds no hidden state of this prompt yet (a prompt cache hit left nothing to
        # prefill): the first step is plain, its verify row hands the drafter the state after id_last
        self.plain_first = False

    @property
    def prefilling(self) -> bool:
        return self.n_prefilled < len(self.head)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> GenerationResult:
        logprobs = getattr(self.verifier, "logprobs", None) if self.params.logprobs is not None else None
        return GenerationResult(list(self.generated), self.text.text, self.finish_reason or "length", self.stats,
                                logprobs=list(logprobs) if logprobs is not None else None)

    def commit(self, new_tokens: List[int], vocab: Any) -> Tuple[int, str]:
        """Apply EOG, stop strings and max_tokens token by token: (tokens kept, final text)."""
        if self.params.raw:
            self.generated.extend(new_tokens)
            if self.grammar_refused is not None:
                self.finish_reason = "stop"  # nothing can follow: the grammar's state is gone
            return len(new_tokens), ""
        out: List[str] = []
        for i, tok in enumerate(new_tokens):
            self.generated.append(tok)
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                self.finish_reason = "stop"
                return i + 1, "".join(out)
            out.append(self.text.feed(tok))
            if self.text.stopped:
                self.finish_reason = "stop"
                return i + 1, "".join(out)
            if len(self.generated) >= self.params.max_tokens:
                self.finish_reason = "length"
                return i + 1, "".join(out)
        if self.grammar_refused is not None:
            self.finish_reason = "stop"  # the grammar refused the last token: the reply ends with it
        return len(new_tokens), "".join(out)

    @property
    def grammar_refused(self) -> Optional[str]:
        """Why the grammar refused the last sampled token (a lazy grammar triggered inside a token
        whose text breaks its rules), or None: the reply ends with that token."""
        return getattr(self.verifier, "refused", None)

    def held_tokens(self) -> List[int]:
        """The tokens the slot's memory holds for this sequence (the last committed one is not decoded)."""
        if self.prefilling:
            return self.head[: self.n_prefilled]
        return (self.tokens_prompt + self.generated)[: self.n_past]

    def close(self) -> None:
        self.verifier.close()


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Part:
    """One sequence's rows in a step's target decode.

    Planned with its draft length ``k``; the draft phase returns it drafted (``proposal``, ``q``,
    ``checkpoint``, ``tokens``), the decode phase placed (``row0``): each phase makes a new one.
    """

    seq: Sequence
    tokens: List[int]
    pos0: int
    verify: bool                     # verify rows (all output logits) or a prompt chunk
    k: int = 0                       # the draft length chosen (the drafter may return fewer)
    n_prefix: int = 0                # leading prompt rows before the verify rows (a prompt's last chunk)
    proposal: Tuple[int, ...] = ()
    q: Any = None
    checkpoint: bool = False         # the target's recurrent state was saved before the decode
    row0: int = 0                    # batch index of its first row


@dataclass(frozen=True)
class Verdict:
    """What verification made of a verify part: accepted drafts and the tokens it samples."""

    part: Part
    n_acc: int
    new_tokens: List[int]


@dataclass
class StepRecord:
    """A step's data, passed from phase to phase."""

    parts: List[Part] = field(default_factory=list)
    t_start: float = 0.0
    t_draft: float = 0.0
    t_decode: float = 0.0
    t_process: float = 0.0
    t_sample: float = 0.0
    decoded: bool = True             # False: the target had no room (every part ends "length")


@dataclass(frozen=True)
class Commit:
    """What settling kept of one verified part: ``n_keep`` of its new tokens (``n_acc`` of its
    drafts) and their final text."""

    part: Part
    n_acc: int
    n_keep: int
    new_tokens: List[int]
    text: str


@dataclass
class SeqEvent:
    """What a step did for one sequence: the tokens it committed, their final text, whether it ended."""

    seq: Sequence
    tokens: List[int]
    text: str
    done: bool


# ---------------------------------------------------------------------------- batch


class _Batch:
    """A llama_batch the engine fills with several sequences' runs."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n = 0
        # the struct's arrays, fetched once: each field read builds a new ctypes pointer object,
        # and right after a decode (caches cold) a handful of them cost ~0.1 ms a step
        b = self.batch
        self._token, self._pos, self._n_seq_id, self._seq_id, self._logits = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits

    def clear(self) -> None:
        self.n = 0

    def add_run(self, seq_id: int, tokens: Seq[int], pos0: int, logits: bool, n_prefix: int = 0) -> int:
        """Append a run (its first n_prefix rows without output); returns its first row.
        The batch's last row always outputs (llama.cpp wants one)."""
        row0 = self.n
        if row0 + len(tokens) > self.capacity:
            raise MtpError(f"internal: a step of {row0 + len(tokens)} rows exceeds the batch of {self.capacity}")
        token, pos, n_seq_id, seq_ids, out = self._token, self._pos, self._n_seq_id, self._seq_id, self._logits
        for i, tok in enumerate(tokens):
            r = row0 + i
            token[r] = tok
            pos[r] = pos0 + i
            n_seq_id[r] = 1
            seq_ids[r][0] = seq_id
            out[r] = logits and i >= n_prefix
        self.n += len(tokens)
        return row0

    def finish(self) -> None:
        self._logits[self.n - 1] = True
        self.batch.n_tokens = self.n

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None


# --------------------------------------------------------------------------- engine


class StepEngine:
    """Speculative steps over the slots of one (target, draft) pair; not thread-safe.

    ``drafter``: the run's :class:`llama_mtp.drafter.Drafter` (its default draft length,
    the own draft loop, batched across sequences with deferred MTP catch-up, or upstream's
    drafter with backend sampling, and the draft length and slots its session is sized for);
    left out, :func:`llama_mtp.drafter.resolve_drafter` picks it for ``n_draft`` (default
    "auto") and ``session``. ``prefill``:
    "shared" (a joining sequence's prompt chunks ride in the step's decode) or
    "separate" (its whole prompt is decoded before the step). ``keep_memory``:
    a finished sequence leaves its tokens in the contexts (one-shot runs that
    leave the target Llama usable); they are cleared when its slot is reused.
    ``cache``: a :class:`~llama_mtp.prompt_cache.SlotCache` of the target (with
    ``keep_memory``): a sequence added without an explicit ``n_reuse`` goes to the slot
    whose memory shares the longest prefix with its prompt and decodes only the rest.
    """

    def __init__(self, target: llama_cpp.Llama, draft: llama_cpp.Llama, *, drafter: Optional[Drafter] = None,
                 n_draft: Optional[NDraft] = None, prefill: str = "shared", session: Optional[MtpSession] = None,
                 keep_memory: bool = False, cache: Optional[SlotCache] = None) -> None:
        check_pair(target, draft)
        if drafter is None:  # a direct caller: the one rule, for the default verification
            drafter = resolve_drafter(target, draft, "auto" if n_draft is None else n_draft, session=session)
        elif n_draft is not None and check_n_draft(n_draft) != drafter.n_draft:
            raise MtpArgumentError(f"n_draft={n_draft!r} disagrees with the drafter's n_draft={drafter.n_draft!r}")
        choice("prefill", prefill, ("shared", "separate"))
        self.target, self.draft = target, draft
        self.drafter = drafter
        self.n_draft = drafter.n_draft
        self.own_drafts = drafter.own_loop
        self.prefill = prefill
        self.keep_memory = keep_memory
        self.k_max = drafter.k_max
        n_slots = drafter.n_seq
        if session is not None:
            if session.target is not target:
                raise MtpArgumentError("the session was created for another target Llama")
            if self.own_drafts != session.defer_catchup:
                raise MtpArgumentError("the session's defer_catchup must match the drafter "
                                       "(own: defer_catchup=True, backend_sampling=False; upstream: the defaults)")
        self.owns_session = session is None
        self.session = session or MtpSession(target, draft, n_seq=n_slots, n_draft_max=self.k_max,
                                             backend_sampling=not self.own_drafts, defer_catchup=self.own_drafts)
        self.k_max = min(self.k_max, self.session.n_max)  # chained heads draft at most one token per head
        self.ctx = _compat.native_context(target)
        self.vocab = _compat.vocab_ptr(target)
        self.n_batch = int(target.n_batch)
        if n_slots * (self.k_max + 1) > self.n_batch:
            raise MtpArgumentError(f"n_batch={self.n_batch} cannot hold a verify step of {n_slots} sequences x "
                                   f"(n_draft_max+1)={self.k_max + 1} rows")
        self.n_ctx_slot = min(int(llama_cpp.llama_n_ctx_seq(self.ctx)), _compat.token_capacity(target))
        self.n_vocab = int(target.n_vocab())
        self.detokenize = _compat.detokenizer(target)  # whole token pieces (see llama_mtp.pieces)
        self.rollback_cap = rollback_capacity(target)
        self.planner = auto_planner(target)
        self.slots: List[Optional[Sequence]] = [None] * n_slots
        if cache is not None:
            if not keep_memory or cache.n_slots != n_slots:
                raise MtpArgumentError("a slot cache needs keep_memory=True and one entry per slot")
            cache.check(self._n_decoded())  # forgets every slot if something else decoded meanwhile
        self.cache = cache
        # a recurrent target's slot cache checkpoints the state after each prompt's head (all but
        # its last token, which the first step decodes): so that last chunk decodes on its own
        self._checkpoints_prompts = cache is not None and self.rollback_cap is not None
        self.n_ubatch = int(llama_cpp.llama_n_ubatch(self.ctx))
        self._rows = _Batch(self.n_batch)
        self.closed = False

    # -- slots ------------------------------------------------------------------------

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @property
    def active(self) -> List[Sequence]:
        return [s for s in self.slots if s is not None]

    def free_slots(self) -> int:
        return sum(1 for s in self.slots if s is None)

    def check_prompt(self, tokens: List[int]) -> None:
        if not tokens:
            raise MtpArgumentError("the prompt is empty")
        if len(tokens) >= self.n_ctx_slot:
            raise MtpArgumentError(f"the prompt has {len(tokens)} tokens, more than a sequence's context allows "
                                   f"(n_ctx per sequence = {self.n_ctx_slot}); shorten it or load with a larger n_ctx")

    def check_request(self, tokens: List[int], params: SequenceParams) -> None:
        """Everything add() would refuse, checked without touching a context (any thread may call it)."""
        self.check_prompt(tokens)
        if isinstance(params.n_draft, int) and params.n_draft > self.k_max:
            raise MtpArgumentError(f"n_draft={params.n_draft} exceeds the engine's n_draft_max={self.k_max}")
        bad = [t for t in (params.logit_bias or {}) if t >= self.n_vocab]
        if bad:
            raise MtpArgumentError(f"logit_bias token {bad[0]} is outside the vocabulary [0, {self.n_vocab})")

    def add(self, prompt_tokens: List[int], params: SequenceParams, n_reuse: Optional[int] = None) -> Sequence:
        """Put a new sequence in a free slot (its prompt is decoded by the next steps).

        ``n_reuse``: leading prompt tokens both contexts of slot 0 (the first free one) already
        hold (a prompt cache hit, checked by the caller); only the rest is decoded. At most
        len(prompt) - 1. None: the engine's slot cache chooses the slot and what it reuses
        (``params.cache_prompt=False``: nothing), or, without one, the first free slot, from 0.
        """
        self._check_open()
        self.check_request(prompt_tokens, params)
        if n_reuse is not None and (not is_int(n_reuse) or not 0 <= n_reuse < len(prompt_tokens)):
            raise MtpArgumentError(f"n_reuse must be an int in [0, len(prompt) - 1], got {n_reuse!r}")
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not free:
            raise MtpArgumentError(f"all {self.n_slots} slots are busy")
        sid, n_reuse = self._place(list(prompt_tokens), params, free, n_reuse)
        seq = Sequence(self, sid, list(prompt_tokens), params)
        seq.stats.n_cached_tokens = n_reuse
        try:
            self._clear_memory(sid, n_reuse)
            if n_reuse and self.cache is not None and self.session.drafter_rows(sid, n_reuse) < n_reuse:
                # the drafter cannot continue from the trimmed prefix after all: decode the whole prompt
                log.info("slot %d: the draft context cannot continue from the %d cached tokens; prefilling "
                         "the whole prompt", sid, n_reuse)
                self.cache.forget(sid)
                self._clear_memory(sid, 0)
                n_reuse = seq.stats.n_cached_tokens = 0
        except BaseException:
            seq.close()
            raise
        seq.n_prefilled = n_reuse
        self.session.begin(sid, [])
        self.slots[sid] = seq
        if self.cache is not None and params.cache_prompt and seq.prefilling:
            self._find_donor(seq)
        if not seq.prefilling:
            # the first draft would read the hidden state the drafter last got for this slot (of the
            # slot's previous sequence, not of the prompt's last cached token): draft from the next step
            seq.plain_first = n_reuse > 0
            self._begin(seq)
        elif self.prefill == "separate":
            seq.donor = None  # every other prompt is decoded already: what was not copied is decoded here
            self._prefill_now(seq)
        return seq

    def _place(self, prompt: List[int], params: SequenceParams, free: List[int],
               n_reuse: Optional[int]) -> Tuple[int, int]:
        """The slot a new sequence takes and the prompt tokens its memory keeps."""
        if n_reuse is not None or self.cache is None:
            return free[0], n_reuse or 0
        sid = self.cache.choose(prompt, free, params.cache_prompt)
        if params.cache_prompt:
            # a drafter on the target's KV has no memory of its own to save or restore
            own_memory = None if self.drafter.mode == "mem_shared" else _compat.native_context(self.draft)
            self.cache.swap(sid, prompt, self.ctx, own_memory, self.session.catch_up)
        if self.drafter.mode == "mem_shared":
            # a drafter on the target's KV keeps only the hidden state after the last token a decode
            # handed it (another conversation's): re-decode at least one prompt token to renew it
            limit = len(prompt) - 2
        else:
            # the drafter's rows need the target's hidden states, which only a target decode makes:
            # past what the drafter can continue from (its context's rows and this session's
            # deferred ones: none after a forget, or of another session's) the target re-decodes
            held = len(self.cache.held(sid))
            limit = self.session.drafter_rows(sid, held)
            if limit < held and self.own_drafts:
                # the draft context cannot continue the held prefix (its memory restarted after a
                # forget, or another session's deferred rows are gone): rather than re-decode the
                # target, drop the drafter's history of this slot, as a long plain run does
                # (forget): its drafts see a shorter past, the output stays exact. At least one
                # prompt token is decoded again, so the emptied memory restarts from a processed row
                self.session.forget(sid, 0)
                limit = min(self.session.drafter_rows(sid, held), len(prompt) - 2)
        return sid, self.cache.take(sid, prompt, params.cache_prompt, limit, swa_floor(self.target, sid))

    def cancel(self, seq: Sequence) -> None:
        """End a sequence between steps (finish_reason "cancelled") and free its slot."""
        if self.slots[seq.seq_id] is seq:
            seq.finish_reason = "cancelled"
            self._release(seq)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for seq in self.active:
            seq.finish_reason = seq.finish_reason or "cancelled"
            self._release(seq)
        self._rows.close()
        if self.cache is not None and _compat.native_context(self.target):
            self.cache.seal(self._n_decoded())
        if self.owns_session:
            self.session.close()

    def __enter__(self) -> "StepEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- step -------------------------------------------------------------------------

    def step(self) -> List[SeqEvent]:
        """One step over every sequence in a slot; events for those that committed tokens or ended."""
        self._check_open()
        rec = StepRecord(t_start=time.perf_counter())
        events = self._plan(rec)
        self._draft(rec)
        self._add_prefill(rec)
        if not rec.parts:
            return events
        self._decode(rec)
        if not rec.decoded:
            return events + self._out_of_room(rec)
        return events + self._settle(rec, self._verify(rec))

    def _plan(self, rec: StepRecord) -> List[SeqEvent]:
        """Choose each running sequence's draft length; sequences out of context end here.

        Fixed-k and plain sequences take their k; the ``auto`` ones are planned jointly
        around them (adaptive.Planner), as the whole batch shares one verify decode.
        """
        events = []
        auto: List[Tuple[Sequence, int]] = []
        for seq in self.active:
            if seq.prefilling:
                continue
            # prompt + generated tokens (n_past + 1) fill the slot: llama-cpp-python stops there too
            if seq.n_past + 1 >= self.n_ctx_slot:
                seq.finish_reason = "length"
                self._release(seq)
                events.append(SeqEvent(seq, [], seq.text.finish() if not seq.params.raw else "", True))
                continue
            # never overrun the context or max_tokens (a step commits up to k+1 tokens)
            room = self.n_ctx_slot - seq.n_past - 2
            if not seq.params.raw:
                room = min(room, seq.params.max_tokens - len(seq.generated) - 1)
            if seq.plain_first:
                room, seq.plain_first = 0, False
            if seq.acceptance is not None:
                auto.append((seq, room))
            else:
                rec.parts.append(Part(seq, [seq.id_last], seq.n_past, verify=True, k=max(0, min(seq.k_fixed, room))))
        if auto:
            ks = self.planner.plan([DraftChoice(seq.acceptance, room, seq.seq_id) for seq, room in auto], self.k_max,
                                   fixed=[(p.seq.seq_id, p.k) for p in rec.parts])
            rec.parts += [Part(seq, [seq.id_last], seq.n_past, verify=True, k=k) for (seq, _), k in zip(auto, ks)]
        return events

    def _draft(self, rec: StepRecord) -> None:
        """Draft for the parts that chose k > 0; every planned part comes back drafted."""
        t0 = time.perf_counter()
        drafting = [p for p in rec.parts if p.k]
        drafts: Dict[int, Tuple[List[int], Any]] = {}
        if self.own_drafts and drafting:
            reqs = [DraftRequest(p.seq.seq_id, p.pos0, p.seq.id_last, p.k, p.seq.draft_temp,
                                 p.seq.draft_top_k, p.seq.rng.getrandbits(32), p.seq.want_q) for p in drafting]
            drafts = {p.seq.seq_id: out for p, out in zip(drafting, self.session.draft_many(reqs))}
        else:
            drafts = {p.seq.seq_id: (self.session.draft(p.seq.seq_id, p.pos0, p.seq.id_last, n_max=p.k), None)
                      for p in drafting}
        # the checkpoint saves below are verify-side costs (auto prices them with the rows that need them)
        rec.t_draft = time.perf_counter() - t0
        rec.parts = [self._drafted(p, *drafts.get(p.seq.seq_id, ([], None))) for p in rec.parts]

    def _drafted(self, p: Part, proposal: List[int], q: Any) -> Part:
        # a draft longer than the recurrent state can roll back: checkpoint first (upstream's path)
        checkpoint = bool(proposal) and self.rollback_cap is not None and len(proposal) > self.rollback_cap
        if checkpoint:
            p.seq.checkpoint.save(p.seq.seq_id)
        return replace(p, tokens=[p.seq.id_last, *proposal], proposal=tuple(proposal), q=q, checkpoint=checkpoint)

    # -- prefixes shared across slots ------------------------------------------------------

    def _find_donor(self, seq: Sequence) -> None:
        """A prompt that shares a prefix with another slot's prompt (a system prompt every client
        sends) copies it from that slot rather than decoding it again (llama-server decodes it in
        each slot): at once if it is decoded there, else once it is (the sequence waits, and the
        batch goes to the other prompt meanwhile)."""
        best: Optional[Donor] = None
        for other in self.active:
            if other is seq or other.donor is not None:
                continue
            n = self._copy_point(other, seq)
            if n >= seq.n_prefilled + MIN_SHARED_PREFIX and (best is None or n > best.n):
                best = Donor(other, n)
        seq.donor = best
        self._take_from_donor(seq)

    def _copy_point(self, donor: Sequence, seq: Sequence) -> int:
        """How much of ``seq``'s prompt it can copy from ``donor``'s slot: their common prefix (at
        least one prompt token left to decode); on a recurrent target only up to a position the
        donor's slot has, or will have on its way through its prompt, a checkpoint at."""
        common = min(common_prefix(donor.head, seq.head), len(seq.head) - 1)
        if self.rollback_cap is None:
            return common
        assert self.cache is not None
        ahead = [p for p in (*self._checkpoint_stops(donor), len(donor.head)) if p >= donor.n_prefilled]
        return max([p for p in (*ahead, *self.cache.checkpoint_positions(donor.seq_id, seq.head)) if p <= common],
                   default=0)

    def _take_from_donor(self, seq: Sequence) -> None:
        """Copy the donor's prefix into ``seq``'s slot if the donor has decoded it; give up if the
        donor is gone or the checkpoint it was to leave is not there."""
        donor = seq.donor
        if donor is None:
            return
        if self.slots[donor.seq.seq_id] is not donor.seq or donor.seq.error is not None:
            seq.donor = None
            return
        if donor.seq.n_prefilled < donor.n:
            return  # not decoded there yet
        seq.donor = None
        assert self.cache is not None
        state = None
        if self.rollback_cap is not None:
            state = self.cache.checkpoint_state(donor.seq.seq_id, seq.head[:donor.n])
            if state is None:
                return
        sid, n = seq.seq_id, donor.n
        own_memory = self.drafter.mode != "mem_shared"
        if own_memory:
            self.session.catch_up(donor.seq.seq_id)  # the donor's deferred draft rows, into its memory first
        # a whole-sequence copy, then a trim: llama.cpp copies across KV streams (one per sequence,
        # llama-cpp-python's default) only whole
        for ctx in (self.target, self.draft) if own_memory else (self.target,):
            memory = llama_cpp.llama_get_memory(_compat.native_context(ctx))
            llama_cpp.llama_memory_seq_rm(memory, sid, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, donor.seq.seq_id, sid, -1, -1)
        if state is not None:
            # the recurrent state after the prefix (the copy gave the slot the donor's current one)
            restore_partial_state(self.target, state, len(state), sid, "shared prefix checkpoint")
            self.cache.checkpoint_from(sid, seq.head[:n], state)
        self._clear_memory(sid, n)
        if own_memory and self.session.drafter_rows(sid, n) < n:
            # the draft rows stop short of the prefix: drop them (drafts see a shorter past; exact all the same)
            log.debug("slot %d: the copied draft rows stop short of the %d-token prefix; dropped", sid, n)
            self.session.forget(sid, 0)
        self.cache.shared(seq.n_prefilled, n)
        seq.n_prefilled = seq.stats.n_cached_tokens = n

    def _add_prefill(self, rec: StepRecord) -> None:
        """prefill="shared": joining sequences' next prompt chunks fill the rest of the batch.

        With the own drafter a prompt's last chunk also carries the sequence's first verify
        row (a plain step), so a joining sequence commits its first token in the same decode
        instead of one step later.
        """
        budget = self.n_batch - sum(len(p.tokens) for p in rec.parts)
        for seq in self.active:
            self._take_from_donor(seq)
        for seq in self.active:
            if budget <= 0:
                break
            if not seq.prefilling or seq.donor is not None:
                continue
            start = seq.n_prefilled
            chunk = seq.head[start: self._chunk_end(seq, start, budget)]
            budget -= len(chunk)
            if start + len(chunk) == len(seq.head) and self.own_drafts and budget > 0 and not self._checkpoints_prompts:
                seq.n_prefilled = len(seq.head)
                self._begin(seq)  # own drafter: begin() only resets the slot's draft bookkeeping
                rec.parts.append(Part(seq, [*chunk, seq.id_last], start, verify=True, n_prefix=len(chunk)))
                budget -= 1
            else:
                rec.parts.append(Part(seq, chunk, start, verify=False))

    def _prefill_now(self, seq: Sequence) -> None:
        """prefill="separate": the whole prompt in n_batch chunks, before the next step."""
        while seq.prefilling:
            rec = StepRecord(t_start=time.perf_counter())
            chunk = seq.head[seq.n_prefilled: self._chunk_end(seq, seq.n_prefilled, self.n_batch)]
            rec.parts.append(Part(seq, chunk, seq.n_prefilled, verify=False))
            self._decode(rec)
            if not rec.decoded:
                raise MtpError("the target has no room for the prompt (llama_decode returned 1)")
            self._prefilled(rec.parts[0])

    def _decode(self, rec: StepRecord) -> None:
        """Every part in ONE target decode, handed to the drafter with one process()."""
        t0 = time.perf_counter()
        b = self._rows
        b.clear()
        # rows in seq-id order: llama.cpp splits a hybrid model's batch into ubatches of consecutive,
        # increasing seq ids, and with sequences out of order (a joining prompt chunk after the
        # others' verify rows) a later partial rollback restored the wrong recurrent state (measured)
        rec.parts = [replace(p, row0=b.add_run(p.seq.seq_id, p.tokens, p.pos0, logits=p.verify, n_prefix=p.n_prefix))
                     for p in sorted(rec.parts, key=lambda p: p.seq.seq_id)]
        b.finish()
        rc = llama_cpp.llama_decode(self.ctx, b.batch)
        t1 = time.perf_counter()
        rec.t_decode = t1 - t0
        if rc == 1:
            rec.decoded = False  # no room in the KV cache
            return
        if rc != 0:
            raise MtpError(f"llama_decode failed on the target (status {rc})")
        self.session.process(b.batch)
        rec.t_process = time.perf_counter() - t1

    def _verify(self, rec: StepRecord) -> List[Verdict]:
        """Each verify part's rows through its sequence's verifier (a failing sampler ends that sequence)."""
        t0 = time.perf_counter()
        verdicts = []
        for p in rec.parts:
            if p.verify:
                try:
                    verdicts.append(Verdict(p, *p.seq.verifier.verify(list(p.proposal), p.q, p.row0 + p.n_prefix)))
                except Exception as e:  # one sequence's sampler failing ends that sequence only
                    p.seq.error = e
        rec.t_sample = time.perf_counter() - t0
        return verdicts

    def _settle(self, rec: StepRecord, verdicts: List[Verdict]) -> List[SeqEvent]:
        """Commit, roll back and account per sequence; one re-decode for checkpointed drafts."""
        for p in rec.parts:
            if not p.verify:
                self._prefilled(p)
        commits = [self._commit(v) for v in verdicts]
        redo = [(c.part, c.n_acc) for c in commits if c.part.checkpoint and c.n_acc < len(c.part.proposal)]
        if redo:
            self._redo(redo)
        t_end = time.perf_counter()
        self._observe_costs(rec, t_end)
        events = [self._fail(p.seq, p.seq.error) for p in rec.parts if p.verify and p.seq.error is not None]
        return events + [self._advance(c, rec, t_end) for c in commits]

    def _commit(self, v: Verdict) -> Commit:
        """A verdict's tokens through EOG, stop strings and max_tokens."""
        n_keep, piece = v.part.seq.commit(v.new_tokens, self.vocab)
        return Commit(v.part, min(v.n_acc, n_keep - 1), n_keep, v.new_tokens, piece)

    def _advance(self, c: Commit, rec: StepRecord, t_end: float) -> SeqEvent:
        """Accept the kept drafts on both contexts and move the sequence past what it committed."""
        p, seq, piece = c.part, c.part.seq, c.text
        if p.proposal:
            self.session.accept(seq.seq_id, c.n_acc)  # trims target and draft to n_past + 1 + n_acc
        self._account(seq, c, rec, t_end)
        if seq.acceptance is not None:
            seq.acceptance.observe(len(p.proposal), c.n_acc)
        if p.proposal:
            seq.idle = 1 + c.n_acc
        seq.n_past += 1 + c.n_acc
        seq.id_last = c.new_tokens[c.n_keep - 1]
        done = seq.finished  # commit() ends it at EOG, a stop string or max_tokens
        if not done and not p.proposal:
            self._forget_idle(seq)
        if done:
            if not seq.params.raw:
                piece += seq.text.finish()
            self._release(seq)
        return SeqEvent(seq, c.new_tokens[:c.n_keep], piece, done)

    def _forget_idle(self, seq: Sequence) -> None:
        """After a plain step: a long run of them drops the draft context's history but the last
        FORGET_KEEP rows (own drafter), so plain tokens stop costing MTP catch-up rows (one per
        token, decoded every n_ubatch of them) for drafts that may not come; a plain-only
        sequence keeps none. The next draft decodes the kept rows; output stays exact."""
        seq.idle += 1
        if not self.own_drafts or seq.idle < FORGET_AT:
            return
        keep = 0 if seq.acceptance is None and seq.k_fixed == 0 else FORGET_KEEP
        kept = self.session.forget(seq.seq_id, keep)
        seq.idle = kept
        if seq.acceptance is not None:
            seq.acceptance.pending = max(1, kept)

    def _observe_costs(self, rec: StepRecord, t_end: float) -> None:
        """The step's shape and times for auto's cost model (steps that carry prompt rows are no sample)."""
        if not any(p.seq.acceptance is not None for p in rec.parts) or any(p.n_prefix or not p.verify for p in rec.parts):
            return
        drafting = [p for p in rec.parts if p.proposal]
        # the own loop's first draft decode also takes each sequence's deferred catch-up rows
        draft_rows = sum(len(p.proposal) - 1 + (p.seq.acceptance.pending if p.seq.acceptance else 1) for p in drafting)
        # the verify runs in batch (seq-id) order: how llama.cpp split the decode into passes
        self.planner.observe(tuple((p.seq.seq_id, len(p.tokens)) for p in rec.parts), t_end - rec.t_start - rec.t_draft,
                             max((len(p.proposal) for p in drafting), default=0), draft_rows, rec.t_draft)

    @staticmethod
    def _account(seq: Sequence, c: Commit, rec: StepRecord, t_end: float) -> None:
        seq.stats.record_step(n_drafted=len(c.part.proposal), n_accepted=c.n_acc, n_kept=c.n_keep,
                              times=(rec.t_draft, rec.t_decode, rec.t_process, rec.t_sample),
                              generation_seconds=t_end - seq.t_gen)

    def _redo(self, redo: List[Tuple[Part, int]]) -> None:
        """Restore checkpoints and re-decode [id_last, accepted drafts] of each, in one decode."""
        rec = StepRecord(t_start=time.perf_counter())
        for p, n_acc in redo:
            sid = p.seq.seq_id
            p.seq.checkpoint.restore(sid, p.pos0)
            self._seq_rm(_compat.native_context(self.draft), sid, p.pos0)
            rec.parts.append(Part(p.seq, [p.seq.id_last, *p.proposal[:n_acc]], p.pos0, verify=False))
        self._decode(rec)
        if not rec.decoded:
            raise MtpError("the target has no room to re-decode accepted drafts after a checkpoint restore")

    def _checkpoint_stops(self, seq: Sequence) -> Tuple[int, ...]:
        """Prompt positions a recurrent target's slot cache checkpoints during the prefill: 4 +
        n_ubatch and 4 tokens before the prompt's end, as llama-server does (a next turn's history
        often diverges there: chat templates render a reply differently from its generation
        prompt), and 16 before it (a generation prompt ending in a thinking-block opener spans
        more than 4 tokens on a vocabulary without a <think> token), and at user-message starts
        as llama-server does (prompt_cache.user_checkpoints), and every checkpoint_min_step tokens
        of a long prompt; besides the end of the head."""
        if not self._checkpoints_prompts:
            return ()
        assert self.cache is not None
        n, step = len(seq.tokens_prompt), self.cache.checkpoint_min_step
        stops = (*seq.user_stops, *range(step, n, step), n - 4 - self.n_ubatch, n - 16, n - 4)
        return tuple(p for p in stops if 0 < p < len(seq.head))

    def _chunk_end(self, seq: Sequence, start: int, budget: int) -> int:
        """Where a prompt chunk from ``start`` ends: ``budget`` tokens on, or at a checkpoint stop."""
        end = min(start + budget, len(seq.head))
        return min([p for p in self._checkpoint_stops(seq) if start < p < end] + [end])

    def _prefilled(self, p: Part) -> None:
        seq = p.seq
        seq.n_prefilled += len(p.tokens)
        if seq.n_prefilled in self._checkpoint_stops(seq):
            self.cache.checkpoint(seq.seq_id, seq.head[: seq.n_prefilled])  # type: ignore[union-attr]
        if not seq.prefilling:
            if self.cache is not None:
                self.cache.checkpoint(seq.seq_id, seq.head)  # the end of the prompt's prefill
            self._begin(seq)

    def _begin(self, seq: Sequence) -> None:
        self.session.begin(seq.seq_id, seq.head)
        seq.n_past = len(seq.head)
        seq.t_gen = time.perf_counter()
        seq.stats.prompt_seconds = seq.t_gen - seq.t_added

    def _out_of_room(self, rec: StepRecord) -> List[SeqEvent]:
        events = []
        for p in rec.parts:
            seq = p.seq
            if seq.finished:
                continue
            if p.verify and p.proposal:
                self.session.begin(seq.seq_id, [])  # drop the proposal that could not be verified
            seq.finish_reason = "length"
            self._release(seq)
            events.append(SeqEvent(seq, [], "" if seq.params.raw else seq.text.finish(), True))
        return events

    def _fail(self, seq: Sequence, error: BaseException) -> SeqEvent:
        seq.error = error
        seq.finish_reason = "error"
        self._release(seq)
        return SeqEvent(seq, [], "", True)

    def fail_all(self, error: BaseException) -> List[SeqEvent]:
        """After a step raised: end every sequence in a slot with ``error`` (the engine stays usable)."""
        return [self._fail(seq, error) for seq in self.active]

    def _release(self, seq: Sequence) -> None:
        if self.slots[seq.seq_id] is seq:
            self.slots[seq.seq_id] = None
            if not self.session.closed and self.session.pending(seq.seq_id):
                self.session.begin(seq.seq_id, [])  # a draft that will never be verified
            if not self.keep_memory or seq.error is not None:
                if self.cache is not None:
                    self.cache.forget(seq.seq_id)
                self._clear_memory(seq.seq_id)
            elif self.cache is not None:
                self.cache.release(seq.seq_id, seq.held_tokens(), seq.user_end)
        seq.close()

    def _clear_memory(self, sid: int, p0: int = 0) -> None:
        """Drop positions >= p0 of seq sid on both contexts (p0 = 0: all of them)."""
        if _compat.native_context(self.target) and _compat.native_context(self.draft):
            p0 = p0 if p0 > 0 else -1
            if not self._seq_rm(self.ctx, sid, p0):
                raise MtpError(f"the target context could not drop positions >= {p0} of seq {sid}")
            self._seq_rm(_compat.native_context(self.draft), sid, p0)

    @staticmethod
    def _seq_rm(ctx: Any, sid: int, p0: int) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), sid, p0, -1))

    def _n_decoded(self) -> int:
        """Tokens llama.cpp decoded on both contexts so far (the slot cache's check for outside use)."""
        return _compat.n_decoded(self.target) + _compat.n_decoded(self.draft)

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosedError("the engine is closed")
        if self.session.closed:
            raise SessionClosedError("the engine's MtpSession is closed (was the target or draft closed?)")

    # -- the one-sequence case --------------------------------------------------------

    def sync_target(self, seq: Sequence) -> None:
        """Leave the target Llama consistent with seq's tokens in its context (seq 0 only)."""
        if seq.seq_id == 0 and _compat.native_context(self.target):
            _compat.sync_llama_tokens(self.target, seq.tokens_prompt + seq.generated, seq.n_past)
