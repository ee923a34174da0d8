"""llama.cpp's own rules that llama_mtp mirrors, read off public llama.cpp calls only.

llama.cpp decides things llama_mtp must know in advance: how ``llama_decode`` cuts a batch
into ubatches (auto prices a step by its passes), how many tokens a recurrent state can
drop (longer drafts take a checkpoint), which architectures keep rollback snapshots, and
which external drafters run on which targets (a mismatch aborts the process). Each rule is
written here once, after the vendored llama.cpp source it mirrors; tests compare the ones
that can drift (the ubatch split, the rollback capacity) against llama.cpp itself.

Nothing here touches llama-cpp-python internals: ``_compat`` reads a Llama's context or
its loaded model and hands the raw values to these rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import llama_cpp

from .errors import MtpInitError

Runs = Tuple[Tuple[int, int], ...]  # a step's verify runs in batch order: (seq id, rows), one per sequence


# ------------------------------------------------------------------------ ubatch split


@dataclass(frozen=True)
class UbatchSplit:
    """How the target's llama_decode cuts a batch into ubatches, each one pass over the model.

    llama.cpp's ``llama_batch_allocr::split_equal`` (hybrid and recurrent memories always; an
    attention KV cache with one stream per sequence, i.e. ``kv_unified=False`` and n_seq > 1):
    every sequence in a ubatch contributes the same number of rows, so a 4-sequence step with
    row counts [2, 1, 1, 1] costs two passes, [1, 1, 1, 1] then [1] (measured on the fast model:
    17.5 ms against 10.5 ms for [1, 1, 1, 1] and 6.5 ms for one row). ``sequential``: a ubatch
    holds consecutive seq ids only. ``keep_tail``: a hybrid target keeps each sequence's last
    n_rs_seq + 1 rows in one ubatch (its rollback snapshots). Otherwise one ubatch per n_ubatch rows.
    """

    equal: bool = False
    sequential: bool = False
    keep_tail: int = 0
    n_ubatch: int = 512

    def ubatches(self, runs: Runs) -> List[int]:
        """Rows of each ubatch the target decodes for ``runs`` (upstream's algorithm, run by run)."""
        total = sum(n for _, n in runs)
        if not self.equal or len(runs) <= 1 and total <= self.n_ubatch:
            return [min(self.n_ubatch, total - i) for i in range(0, total, self.n_ubatch)] or [0]
        used = [0] * len(runs)
        out: List[int] = []
        while True:
            cur = self._sequences(runs, used)
            if not cur:
                return out
            take = self._equal_take(runs, used, cur)
            if self.keep_tail > 0:
                cur, take = self._keep_tails(runs, used, cur, take)
            for j, r in enumerate(cur):
                used[r] += take[j]
            out.append(sum(take))

    def _sequences(self, runs: Runs, used: List[int]) -> List[int]:
        """The runs of the next ubatch: each with unused rows (consecutive ids when sequential)."""
        cur: List[int] = []
        last = -1
        for r, (sid, n) in enumerate(runs):
            if used[r] >= n or (self.sequential and cur and sid != last + 1):
                continue
            cur.append(r)
            last = sid
            if len(cur) > self.n_ubatch:
                break
        return cur

    def _equal_take(self, runs: Runs, used: List[int], cur: List[int]) -> List[int]:
        """Rows each of ``cur`` gives the ubatch: as many as the shortest has, within n_ubatch."""
        take = [0] * len(cur)
        while all(used[r] + take[j] < runs[r][1] for j, r in enumerate(cur)):
            take = [t + 1 for t in take]
            if (take[0] + 1) * len(cur) > self.n_ubatch:
                break
        return take

    def _keep_tails(self, runs: Runs, used: List[int], cur: List[int],
                    take: List[int]) -> Tuple[List[int], List[int]]:
        """The ubatch cut short before a sequence whose rest would split its rollback tail."""
        def rem(j: int) -> int:
            return runs[cur[j]][1] - used[cur[j]] - take[j]
        n_keep = 0
        while n_keep < len(cur) and not (0 != rem(n_keep) < self.keep_tail):
            n_keep += 1
        if n_keep == 0:  # the first sequence alone: to its end, or leaving keep_tail rows
            if take[0] + rem(0) <= self.n_ubatch:
                take[0] += rem(0)
            else:
                while rem(0) < self.keep_tail:
                    take[0] -= 1
            n_keep = 1
        return cur[:n_keep], take[:n_keep]


def has_recurrent_state(model: Any) -> bool:
    """Whether a llama_model's memory is recurrent or hybrid (state that seq_rm cannot trim freely)."""
    return bool(llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))


def context_ubatch_split(ctx: Any, *, kv_unified: bool) -> UbatchSplit:
    """How llama_decode on a raw llama_context cuts a multi-sequence batch into ubatches (passes).

    Mirrors the memory modules' init_batch in the vendored llama.cpp: a hybrid or recurrent
    memory always splits equal (with the rollback tail kept together), an attention KV cache
    only with a stream per sequence (kv_unified=False, n_seq_max > 1).
    """
    model = llama_cpp.llama_get_model(ctx)
    n_seq = int(llama_cpp.llama_n_seq_max(ctx))
    n_stream = 1 if kv_unified else n_seq
    n_ubatch = int(llama_cpp.llama_n_ubatch(ctx))
    if has_recurrent_state(model):
        n_rs = int(llama_cpp.llama_n_rs_seq(ctx))
        recurrent_only = llama_cpp.llama_model_is_recurrent(model) and not llama_cpp.llama_model_is_hybrid(model)
        return UbatchSplit(equal=True, sequential=recurrent_only or n_stream > 1,
                           keep_tail=n_rs + 1 if n_rs > 0 else 0, n_ubatch=n_ubatch)
    return UbatchSplit(equal=n_stream > 1, sequential=True, n_ubatch=n_ubatch)


# -------------------------------------------------------------------- rollback capacity


# llama.cpp's llm_arch_supports_rs_rollback (src/llama-arch.cpp): the recurrent/hybrid archs
# whose state keeps n_rs_seq snapshots. On the others (qwen3next, ...) llama.cpp clamps n_rs_seq
# to 0, so every partial rejection restores a state checkpoint instead (checkpoint.py).
RS_ROLLBACK_ARCHS = frozenset({
    "kimi-k3", "qwen35", "qwen35moe", "qwen4exp", "deepseek4", "glm5-next", "nemotron_h",
    "nemotron_h_moe", "lfm2", "lfm2moe", "bailingmoe3",
})


def keeps_rs_snapshots(model: Any, arch: str) -> bool:
    """Whether a context on this llama_model keeps the n_rs_seq snapshots it is asked for."""
    return arch in RS_ROLLBACK_ARCHS and has_recurrent_state(model)


def context_rollback_capacity(ctx: Any) -> Optional[int]:
    """Tokens a raw llama_context can drop with seq_rm; None when unbounded (attention-only)."""
    if has_recurrent_state(llama_cpp.llama_get_model(ctx)):
        return int(llama_cpp.llama_n_rs_seq(ctx))
    return None


# ------------------------------------------------------------------- external drafters


# llama.cpp's external MTP drafters: GGUFs of their own whose context runs on a target's context
# (llama_context_params.ctx_other; src/llama-context.cpp applies it to these archs only) and
# attends over the target's KV. Drafter arch -> the target archs it drafts for.
EXTERNAL_DRAFTER_TARGETS: Dict[str, frozenset] = {"gemma4-assistant": frozenset({"gemma4"})}


@dataclass(frozen=True)
class LoadedModel:
    """What the external-drafter rules read off a loaded model: its file, architecture, native
    llama_model and GGUF metadata."""

    path: str
    arch: str
    model: Any
    metadata: Mapping[str, str]


def refuse_drafter_as_target(model: LoadedModel) -> None:
    """An external drafter loaded as a model of its own cannot create a context (llama.cpp
    needs its target's): MtpInitError saying how to load it instead."""
    if model.arch in EXTERNAL_DRAFTER_TARGETS:
        targets = ", ".join(sorted(EXTERNAL_DRAFTER_TARGETS[model.arch]))
        raise MtpInitError(f"{model.path} is a {model.arch} model, an external MTP drafter that runs only on its "
                           f"target's context: load its target ({targets}) with draft_model_path={model.path!r}")


def check_external_drafter(drafter: LoadedModel, target: LoadedModel) -> None:
    """Before the drafter's context exists: llama.cpp builds the drafter's graph on the target's
    embeddings and KV and aborts the process on a width mismatch, so every shape the pair
    shares is checked first (MtpInitError)."""
    path, arch, t_arch = drafter.path, drafter.arch, target.arch
    if arch not in EXTERNAL_DRAFTER_TARGETS:
        known = ", ".join(sorted(EXTERNAL_DRAFTER_TARGETS))
        what = ("has no MTP (nextn) layers" if llama_cpp.llama_model_n_layer_nextn(drafter.model) <= 0
                else "is not an external MTP drafter")
        raise MtpInitError(f"draft model {path} (architecture {arch!r}) {what}: draft_model_path takes a "
                           f"drafter that runs on its target's context ({known})")
    if t_arch not in EXTERNAL_DRAFTER_TARGETS[arch]:
        raise MtpInitError(f"draft model {path} is a {arch}, which drafts for "
                           f"{', '.join(sorted(EXTERNAL_DRAFTER_TARGETS[arch]))} targets; the target is {t_arch!r}")
    d_out = int(llama_cpp.llama_model_n_embd_out(drafter.model))
    t_out = int(llama_cpp.llama_model_n_embd_out(target.model))
    if d_out != t_out:
        raise MtpInitError(f"draft model {path} drafts for a target of width {d_out} (embedding_length_out); "
                           f"the target {target.path} has width {t_out}: use the target's own assistant")
    d_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(drafter.model)))
    t_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(target.model)))
    if d_vocab != t_vocab:
        raise MtpInitError(f"draft model {path} has a vocabulary of {d_vocab} tokens, the target {target.path} "
                           f"{t_vocab}: use the target's own assistant")
    # its Q-only attention reads the target's K/V: the head sizes must be the target's
    for key in ("attention.key_length", "attention.key_length_swa"):
        d_val, t_val = drafter.metadata.get(f"{arch}.{key}"), target.metadata.get(f"{t_arch}.{key}")
        if d_val is not None and t_val is not None and d_val != t_val:
            raise MtpInitError(f"draft model {path} has {key}={d_val}, the target {target.path} {t_val}: "
                               "use the target's own assistant")
