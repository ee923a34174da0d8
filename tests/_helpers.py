"""Shared test helpers: tiny models, multi-sequence decoding, the speculative loop
and a plain greedy reference.

Everything here drives llama.cpp through llama-cpp-python's low-level bindings so a
test sees exactly what the session sees: one ``llama_batch`` per target decode,
handed to ``MtpSession.process`` unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

import llama_cpp
import llama_mtp
from llama_mtp import testing
from llama_mtp.checkpoint import TargetCheckpoint, rollback_capacity

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
N_THREADS = 2

# The three tiny models of the suite (each builds in well under a second).
ORACLE_SPEC = testing.TestModelSpec(recipe="oracle", accept=1.0)
ORACLE_HALF_SPEC = testing.TestModelSpec(recipe="oracle", accept=0.5)
# iid hits: the drafts a loop happens to visit are an unbiased sample of the rate
ORACLE_RANDOM_SPEC = testing.TestModelSpec(recipe="oracle", accept=0.5, accept_pattern="random")
CONTEXT_SPEC = testing.TestModelSpec(recipe="context")
# history-dependent hybrid model whose drafts are rejected often (and partially)
CONTEXT_HALF_SPEC = testing.TestModelSpec(recipe="context", accept=0.5, accept_pattern="random")


# --------------------------------------------------------------------------- models


MODEL_CACHE_ENV = "LLAMA_MTP_MODEL_CACHE"  # testing.cache_dir(): models only, not the shim build cache


@contextlib.contextmanager
def models_cache(directory: os.PathLike) -> Iterator[None]:
    """Point testing.cached_test_model at ``directory`` for the duration only.

    (conftest's autouse ``model_dir`` already points it at the session's temporary
    folder; this is for a test that wants a folder of its own.) LLAMA_MTP_CACHE is not
    touched: it is also the *shim build* cache root (build_ffi.cache_root).
    """
    old = os.environ.get(MODEL_CACHE_ENV)
    os.environ[MODEL_CACHE_ENV] = os.fspath(directory)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(MODEL_CACHE_ENV, None)
        else:
            os.environ[MODEL_CACHE_ENV] = old


def build_model(spec: testing.TestModelSpec, directory: os.PathLike) -> pathlib.Path:
    with models_cache(directory):
        return testing.cached_test_model(spec)


def write_model_without_mtp(src: os.PathLike, dst: os.PathLike) -> pathlib.Path:
    """Copy a generated GGUF of any arch without its MTP blocks (nextn_predict_layers = 0).

    The generator stores the MTP (nextn) blocks after the trunk, so this rewrites the
    file: block_count minus the nextn layers, nextn_predict_layers = 0 and no tensors
    of those blocks. Per-layer metadata arrays (a sliding-window pattern, ...) are cut
    to the trunk.
    """
    return rewrite_model(src, dst, keep_mtp=False)


def rewrite_model(src: os.PathLike, dst: os.PathLike, *, keep_mtp: bool = True,
                  chat_template: Optional[str] = None) -> pathlib.Path:
    """Copy a generated GGUF, without its MTP blocks (``keep_mtp=False``, see
    write_model_without_mtp) and/or with another ``chat_template``."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(src))
    arch = str(reader.fields["general.architecture"].contents())
    n_all = int(reader.fields[f"{arch}.block_count"].contents())
    n_layer = n_all if keep_mtp else n_all - int(reader.fields[f"{arch}.nextn_predict_layers"].contents())
    writer = gguf.GGUFWriter(os.fspath(dst), arch)
    try:
        for name, fld in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            if name == "tokenizer.chat_template" and chat_template is not None:
                writer.add_string(name, chat_template)
                continue
            if name == f"{arch}.block_count":
                writer.add_uint32(name, n_layer)
                continue
            if name == f"{arch}.nextn_predict_layers" and not keep_mtp:
                writer.add_uint32(name, 0)
                continue
            vtype = fld.types[0]
            value = fld.contents()
            if vtype == gguf.GGUFValueType.ARRAY:
                if name.startswith(f"{arch}.") and isinstance(value, list) and len(value) == n_all:
                    value = value[:n_layer]  # one entry per block
                writer.add_key_value(name, value, vtype, sub_type=fld.types[-1])
            else:
                writer.add_key_value(name, value, vtype)
        for t in reader.tensors:
            if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layer:
                continue
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                              raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return pathlib.Path(dst)


def load_pair(path: os.PathLike, *, n_draft_max: int = 3, n_seq: int = 1, n_ctx: int = 512,
              **kwargs) -> Tuple[llama_mtp.MtpTargetLlama, llama_mtp.MtpDraftLlama]:
    kwargs.setdefault("n_threads", N_THREADS)
    kwargs.setdefault("n_threads_batch", N_THREADS)
    return llama_mtp.load(os.fspath(path), n_draft_max=n_draft_max, n_seq=n_seq, n_ctx=n_ctx, **kwargs)


def plain_llama(path: os.PathLike, *, n_ctx: int = 512, **kwargs) -> llama_cpp.Llama:
    """An ordinary llama_cpp.Llama (no MTP layers, default context) on the same file."""
    kwargs.setdefault("n_threads", N_THREADS)
    kwargs.setdefault("n_threads_batch", N_THREADS)
    kwargs.setdefault("verbose", False)
    return llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, **kwargs)


def tokenize(llm: llama_cpp.Llama, text: str) -> List[int]:
    return llm.tokenize(text.encode(), add_bos=False)


# ------------------------------------------------------------------------ decoding


def native_context(llm) -> int:
    """The raw llama_context of a Llama (or LlamaContext)."""
    ctx = llm._ctx if isinstance(llm, llama_cpp.Llama) else llm
    return ctx.ctx


def pos_max(llm, seq_id: int) -> int:
    return int(llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(native_context(llm)), seq_id))


def seq_rm(llm, seq_id: int, p0: int, p1: int = -1) -> bool:
    return bool(llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(native_context(llm)), seq_id, p0, p1))


class Decoder:
    """One heap ``llama_batch`` for decoding runs of tokens on any seq id of a context.

    ``decode`` fills it with one sequence's tokens at consecutive positions, decodes it
    on the context and returns the logits of every row (a copy). ``batch`` is the
    ctypes struct to hand to ``MtpSession.process``.
    """

    def __init__(self, llm, capacity: int = 512, n_seq_max: int = 1) -> None:
        self.llm = llm
        self.capacity = capacity
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(
            llama_cpp.llama_get_model(native_context(llm)))))
        self.batch = llama_cpp.llama_batch_init(capacity, 0, n_seq_max)
        self.batch.n_tokens = 0

    def fill(self, seq_id: int, tokens: Sequence[int], pos0: int, logits: Optional[Sequence[bool]] = None) -> None:
        self.fill_runs([(seq_id, tokens, pos0)], logits)

    def fill_runs(self, runs: Sequence[Tuple[int, Sequence[int], int]],
                  logits: Optional[Sequence[bool]] = None) -> None:
        """Fill the batch with runs of (seq_id, tokens, pos0), one after the other."""
        b = self.batch
        i = 0
        for seq_id, tokens, pos0 in runs:
            for j, tok in enumerate(tokens):
                assert i < self.capacity
                b.token[i] = int(tok)
                b.pos[i] = pos0 + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq_id
                b.logits[i] = 1 if logits is None else int(bool(logits[i]))
                i += 1
        b.n_tokens = i

    def decode(self, seq_id: int, tokens: Sequence[int], pos0: int,
               logits: Optional[Sequence[bool]] = None) -> np.ndarray:
        """Decode ``tokens`` at ``pos0..`` on ``seq_id``; rows of logits for output tokens."""
        return self.decode_runs([(seq_id, tokens, pos0)], logits)

    def decode_runs(self, runs: Sequence[Tuple[int, Sequence[int], int]],
                    logits: Optional[Sequence[bool]] = None) -> np.ndarray:
        """Decode several runs in one batch; logits rows of the output tokens, in batch order."""
        self.fill_runs(runs, logits)
        rc = llama_cpp.llama_decode(native_context(self.llm), self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        rows = [i for i in range(self.batch.n_tokens) if self.batch.logits[i]]
        out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        for r, i in enumerate(rows):
            ptr = llama_cpp.llama_get_logits_ith(native_context(self.llm), i)
            out[r] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefill(session: llama_mtp.MtpSession, dec: Decoder, seq_id: int, tokens: Sequence[int],
            pos0: int = 0, chunk: int = 64) -> int:
    """Decode a prompt on the target in chunks, handing each chunk to process(); returns n_past."""
    pos = pos0
    for lo in range(0, len(tokens), chunk):
        part = list(tokens[lo:lo + chunk])
        dec.decode(seq_id, part, pos, logits=[False] * (len(part) - 1) + [True])
        session.process(dec.batch)
        pos += len(part)
    return pos


@dataclass
class LoopResult:
    tokens: List[int]
    steps: List[Tuple[int, int]]      # (len(draft), n_accepted) of every step
    stats: llama_mtp.MtpStats
    logits: np.ndarray                # (n_tokens, n_vocab): the target row each token was chosen from
    qs: List[np.ndarray] = field(default_factory=list)  # draft_dist's q of every drafting step
    drafts: List[Tuple[int, List[int]]] = field(default_factory=list)  # (id_last, draft) of every drafting step

    @property
    def partial_rejections(self) -> int:
        return sum(1 for n, a in self.steps if 0 < a < n)

    @property
    def full_rejections(self) -> int:
        return sum(1 for n, a in self.steps if n > 0 and a == 0)


def spec_loop(target, draft, session: llama_mtp.MtpSession, prompt_tokens: Sequence[int], n_tokens: int,
              n_draft: int, *, seq_id: int = 0, dec: Optional[Decoder] = None,
              check_positions: bool = True, draft_dist: Optional[dict] = None,
              schedule: Optional[Sequence[int]] = None) -> LoopResult:
    """Greedy speculative decoding with ``session`` from a fresh sequence ``seq_id``.

    Prefill prompt[:-1], then per step: draft from id_last at n_past, decode
    [id_last, *draft] on the target, process() it, accept the longest prefix that
    matches the target's argmax and emit it plus the target's own next token.
    Returns the first ``n_tokens`` generated tokens, the per-step (drafted,
    accepted) pairs and the session's stats. With ``check_positions`` it asserts
    after every step that target and draft memories both end at n_past - 1.
    ``draft_dist``: draft with ``session.draft_dist(**draft_dist)`` instead of ``draft``.
    ``schedule``: step i drafts ``schedule[i % len(schedule)]`` tokens (0 = a plain step)
    instead of n_draft. A session with defer_catchup may leave the draft memory behind.
    """
    prompt = [int(t) for t in prompt_tokens]
    assert len(prompt) >= 1
    own = dec is None
    if own:
        dec = Decoder(target, capacity=max(64, n_draft + 1))
    try:
        n_past = prefill(session, dec, seq_id, prompt[:-1]) if len(prompt) > 1 else 0
        session.begin(seq_id, prompt[:-1])
        id_last = prompt[-1]
        out: List[int] = []
        rows: List[np.ndarray] = []
        steps: List[Tuple[int, int]] = []
        qs: List[np.ndarray] = []
        drafts: List[Tuple[int, List[int]]] = []
        cap = rollback_capacity(target)
        checkpoint = TargetCheckpoint(target)
        while len(out) < n_tokens:
            k = schedule[len(steps) % len(schedule)] if schedule else n_draft
            if k == 0 and schedule:
                d = []
            elif draft_dist is None:
                d = session.draft(seq_id, n_past, id_last, n_max=k)
            else:
                d, q = session.draft_dist(seq_id, n_past, id_last, n_max=k, **draft_dist)
                assert q.shape == (len(d), dec.n_vocab)
                qs.append(q)
            assert len(d) <= k
            # a draft longer than the recurrent state can roll back: checkpoint first (core's path)
            checkpointed = cap is not None and len(d) > cap
            if checkpointed:
                checkpoint.save(seq_id)
            logits = dec.decode(seq_id, [id_last, *d], n_past)
            session.process(dec.batch)
            ids = logits.argmax(axis=-1)
            acc = 0
            while acc < len(d) and d[acc] == ids[acc]:
                acc += 1
            if checkpointed and acc < len(d):
                checkpoint.restore(seq_id, n_past)
                seq_rm(draft, seq_id, n_past)
                dec.decode(seq_id, [id_last, *d[:acc]], n_past)
                session.process(dec.batch)
            if d:
                session.accept(seq_id, acc)
                drafts.append((id_last, [int(t) for t in d]))
            assert not session.pending(seq_id)
            out += [int(t) for t in d[:acc]] + [int(ids[acc])]
            rows += list(logits[:acc + 1])
            steps.append((len(d), acc))
            n_past += 1 + acc
            id_last = out[-1]
            if check_positions:
                assert pos_max(target, seq_id) == n_past - 1, (pos_max(target, seq_id), n_past)
                if session.defer_catchup:
                    assert pos_max(draft, seq_id) <= n_past - 1, (pos_max(draft, seq_id), n_past)
                else:
                    assert pos_max(draft, seq_id) == n_past - 1, (pos_max(draft, seq_id), n_past)
        return LoopResult(out[:n_tokens], steps, session.stats, np.array(rows[:n_tokens]), qs, drafts)
    finally:
        if own:
            dec.close()


def spec_loop_multi(target, draft, session: llama_mtp.MtpSession, prompts: Dict[int, Sequence[int]],
                    n_tokens: int, n_draft: int, *, dec: Optional[Decoder] = None) -> Dict[int, List[int]]:
    """spec_loop for several sequences at once: ONE target decode (and one process())
    per step holds every sequence's verify run [id_last, *draft]."""
    own = dec is None
    if own:
        dec = Decoder(target, capacity=max(64, len(prompts) * (n_draft + 1)), n_seq_max=1)
    try:
        n_past: Dict[int, int] = {}
        id_last: Dict[int, int] = {}
        out: Dict[int, List[int]] = {sid: [] for sid in prompts}
        for sid, prompt in prompts.items():
            prompt = [int(t) for t in prompt]
            n_past[sid] = prefill(session, dec, sid, prompt[:-1]) if len(prompt) > 1 else 0
            session.begin(sid, prompt[:-1])
            id_last[sid] = prompt[-1]
        while any(len(o) < n_tokens for o in out.values()):
            live = [sid for sid in prompts if len(out[sid]) < n_tokens]
            drafts = {sid: session.draft(sid, n_past[sid], id_last[sid], n_max=n_draft) for sid in live}
            logits = dec.decode_runs([(sid, [id_last[sid], *drafts[sid]], n_past[sid]) for sid in live])
            session.process(dec.batch)
            row = 0
            for sid in live:
                d = drafts[sid]
                ids = logits[row:row + len(d) + 1].argmax(axis=-1)
                row += len(d) + 1
                acc = 0
                while acc < len(d) and d[acc] == ids[acc]:
                    acc += 1
                if d:
                    session.accept(sid, acc)
                out[sid] += [int(t) for t in d[:acc]] + [int(ids[acc])]
                n_past[sid] += 1 + acc
                id_last[sid] = out[sid][-1]
                assert pos_max(target, sid) == n_past[sid] - 1
                assert pos_max(draft, sid) == n_past[sid] - 1
        return {sid: o[:n_tokens] for sid, o in out.items()}
    finally:
        if own:
            dec.close()


_greedy_cache: Dict[Tuple[str, Tuple[int, ...], int], Tuple[List[int], np.ndarray]] = {}


def draft_log(path: os.PathLike, *, own: bool, defer: bool = False, schedule: Sequence[int] = (3,),
              n_tokens: int = 48, n_draft_max: int = 3, text: bytes = b"The quick brown fox") -> List[Tuple[int, List[int]]]:
    """(id_last, draft) of every drafting step of a greedy spec_loop on ``path``, drafted by
    the session's own loop (``own``; eager or deferred catch-up) or by upstream's drafter."""
    target, draft = load_pair(path, n_draft_max=n_draft_max)
    try:
        with llama_mtp.MtpSession(target, draft, n_draft_max=n_draft_max, backend_sampling=False,
                                  defer_catchup=defer) as s:
            return spec_loop(target, draft, s, target.tokenize(text, add_bos=False), n_tokens, n_draft_max,
                             draft_dist={} if own else None, schedule=schedule).drafts
    finally:
        draft.close()
        target.close()


def oracle_fixed_k(chain, successor: np.ndarray, prompt: Sequence[int], n_tokens: int,
                   k_max: int) -> Tuple[List[int], List[int], List[int]]:
    """What greedy generate() with fixed k drafts and accepts on an oracle model:
    (tokens, drafted_per_pos, accepted_per_pos), with the engine's room rule (k <= left - 1).
    ``chain(id_last, k)`` gives the drafts, ``successor`` the target's greedy next token."""
    tokens: List[int] = []
    drafted, accepted = [0] * k_max, [0] * k_max
    while len(tokens) < n_tokens:
        last = tokens[-1] if tokens else int(prompt[-1])
        k = max(0, min(k_max, n_tokens - len(tokens) - 1))
        d = chain(last, k)
        truth = [int(successor[last])]
        while len(truth) < k + 1:
            truth.append(int(successor[truth[-1]]))
        acc = 0
        while acc < len(d) and d[acc] == truth[acc]:
            acc += 1
        for i in range(len(d)):
            drafted[i] += 1
        for i in range(acc):
            accepted[i] += 1
        tokens += truth[:acc + 1]
    return tokens[:n_tokens], drafted, accepted


def greedy_reference_logits(path: os.PathLike, prompt_tokens: Sequence[int], n_tokens: int, *,
                            n_ctx: int = 512) -> Tuple[List[int], np.ndarray]:
    """Plain greedy decoding with an ordinary llama_cpp.Llama: the reference output.

    Uses ``Llama.eval`` (prompt in one batch, then one token at a time) and the argmax
    of the last logits row: no MTP layers, no speculative machinery. Returns the
    tokens and the logits row each was chosen from.
    """
    key = (os.fspath(path), tuple(int(t) for t in prompt_tokens), n_tokens)
    if key not in _greedy_cache:
        llm = plain_llama(path, n_ctx=n_ctx)
        try:
            n_vocab = llm.n_vocab()
            llm.eval(list(key[1]))
            out: List[int] = []
            rows = np.empty((n_tokens, n_vocab), dtype=np.float32)
            for i in range(n_tokens):
                rows[i] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
                tok = int(rows[i].argmax())
                out.append(tok)
                llm.eval([tok])
        finally:
            llm.close()
        _greedy_cache[key] = (out, rows)
    out, rows = _greedy_cache[key]
    return list(out), rows.copy()


def greedy_reference(path: os.PathLike, prompt_tokens: Sequence[int], n_tokens: int, *,
                     n_ctx: int = 512) -> List[int]:
    return greedy_reference_logits(path, prompt_tokens, n_tokens, n_ctx=n_ctx)[0]


def counters(stats: llama_mtp.MtpStats) -> llama_mtp.MtpStats:
    """The stats without their timings (what a rejected call must leave unchanged)."""
    return dataclasses.replace(stats, t_draft_s=0.0, t_process_s=0.0, t_accept_s=0.0)


# ------------------------------------------------------------------------ statistics


def chi_square_p(a: Counter, b: Counter) -> float:
    """Two-sample chi-square homogeneity test (scipy-free), sparse cells pooled."""
    from math import exp, lgamma, log

    keys = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    rows, pool_a, pool_b = [], 0, 0
    for k in keys:
        if a[k] + b[k] >= 10:
            rows.append((a[k], b[k]))
        else:
            pool_a, pool_b = pool_a + a[k], pool_b + b[k]
    if pool_a + pool_b:
        rows.append((pool_a, pool_b))
    stat = 0.0
    for x, y in rows:
        tot = x + y
        for obs, n in ((x, na), (y, nb)):
            exp_ = tot * n / (na + nb)
            stat += (obs - exp_) ** 2 / exp_
    dof = max(1, len(rows) - 1)
    # regularized upper incomplete gamma Q(dof/2, stat/2) by series (good enough for p-values)
    s, x = dof / 2.0, stat / 2.0
    if x == 0:
        return 1.0
    term = total = 1.0 / s
    n = 1
    while term > 1e-12 * total and n < 10000:
        term *= x / (s + n)
        total += term
        n += 1
    lower = exp(-x + s * log(x) - lgamma(s)) * total
    return max(0.0, 1.0 - lower)


# Temperature sampling over the whole vocabulary (no truncation): a chi-square test of a few hundred
# samples of a few tokens compares the distributions.
SAMPLING: Dict[str, float] = dict(top_k=0, top_p=1.0, min_p=0.0)


def plain_samples(plain: llama_cpp.Llama, prompt: Sequence[int], n: int, n_tok: int, temperature: float,
                  seed0: int = 10_000) -> List[List[int]]:
    """``n`` samples of ``n_tok`` tokens (fewer at end-of-generation) from plain llama-cpp-python's
    ``generate`` with SAMPLING at ``temperature``, seeds ``seed0``, ``seed0 + 1``, ..."""
    out = []
    for seed in range(n):
        plain.set_seed(seed0 + seed)
        got: List[int] = []
        for tok in plain.generate(list(prompt), temp=temperature, **SAMPLING):
            got.append(int(tok))
            if len(got) == n_tok or llama_cpp.llama_vocab_is_eog(plain._model.vocab, tok):
                break
        out.append(got)
    return out


def assert_sampled_alike(got: Sequence[Sequence[int]], want: Sequence[Sequence[int]], n_tok: int) -> None:
    """Position by position, the tokens of two sets of samples are drawn from one distribution
    (chi-square homogeneity, p > 0.01); a missing token (ended early) counts as -1."""
    for pos in range(n_tok):
        a = Counter(t[pos] if pos < len(t) else -1 for t in got)
        b = Counter(t[pos] if pos < len(t) else -1 for t in want)
        assert len(a) > 3, "the test must make sampling non-degenerate"
        p = chi_square_p(a, b)
        assert p > 0.01, (pos, p)


# ------------------------------------------------------------------------ processes


def read_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_python(code: str, *, timeout: float = 120, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (tests/ and the repo on sys.path)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT / "tests"), str(REPO_ROOT), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env.setdefault("PYTHONFAULTHANDLER", "1")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(REPO_ROOT))


def describe(proc: subprocess.CompletedProcess) -> str:
    return (f"returncode={proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-4000:]}")


# ------------------------------------------------------------------------ completions


def assert_capped_like_plain(got: dict, want: dict, max_tokens: int) -> None:
    """MtpLlama's completion is plain llama-cpp-python's, except that max_tokens is a hard cap:
    where plain generated past it to finish a UTF-8 character, ours is a prefix of plain's text."""
    text, ref = _choice_text(got), _choice_text(want)
    if want["choices"][0]["finish_reason"] == "length" and want["usage"]["completion_tokens"] > max_tokens:
        assert got["choices"][0]["finish_reason"] == "length" and got["usage"]["completion_tokens"] == max_tokens
        assert ref.startswith(text)
    else:
        assert text == ref
        assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
        assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]


def _choice_text(result: dict) -> str:
    """A completion's text, or a chat completion's message content."""
    choice = result["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def greedy_tokens(llm: llama_cpp.Llama, prompt: List[int], n: int) -> List[int]:
    """The first ``n`` tokens plain llama-cpp-python's greedy ``generate`` yields after ``prompt``."""
    out: List[int] = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def assert_chat_like_plain(llm, plain, messages: list, max_tokens: int) -> dict:
    """A chat through llama.cpp's templates on MtpLlama: its prompt's completion is plain
    llama-cpp-python's (max_tokens a hard cap), and its message is that completion parsed by the
    template's parser. Returns the chat completion."""
    got = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0)
    chat = llm.mtp_chat_templates.apply({"messages": messages})
    mine = llm.create_completion(chat.prompt, max_tokens=max_tokens, temperature=0.0)
    assert_capped_like_plain(mine, plain.create_completion(chat.prompt, max_tokens=max_tokens, temperature=0.0),
                             max_tokens)
    with chat.parser(stream=False) as parser:
        assert got["choices"][0]["message"] == parser.update(_choice_text(mine), final=True).message
    assert got["choices"][0]["finish_reason"] == mine["choices"][0]["finish_reason"]
    return got


def stream_parse(chat, text: str, pieces: int):
    """Feed ``text`` to a ChatPrompt's stream parser in ``pieces`` chunks: (every delta, the final update)."""
    deltas = []
    with chat.parser(stream=True) as parser:
        step = max(1, len(text) // pieces)
        for i in range(0, len(text), step):
            deltas += parser.update(text[i:i + step]).deltas
        final = parser.update("", final=True)
    return deltas + final.deltas, final


def wait_for(what: str, ready, timeout: float, poll: float = 0.05, detail=lambda: ""):
    """Poll ``ready()`` until it returns something true, and return that; after ``timeout`` seconds
    fail, naming ``what`` (a state the test needs, never a delay it hopes is enough) and ``detail()``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}{detail()}")
        time.sleep(poll)
