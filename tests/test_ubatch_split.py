"""llama_rules.UbatchSplit against llama.cpp itself: how llama_decode cuts a batch into ubatches.

auto prices a multi-sequence step by its passes over the model, so the mirror of
``llama_batch_allocr::split_equal`` must agree with what llama.cpp runs. The graph-eval
callback (``cb_eval``) sees every node of every graph llama.cpp computes: a decode asks
about N nodes per ubatch (N from a one-row decode), and the last node of each graph is the
logits, whose ne[1] is that ubatch's rows (every row outputs here). Both are compared with
``UbatchSplit.ubatches`` on seeded random shapes, for a hybrid target (qwen35, with the
rollback tail n_rs_seq + 1) and an attention-only one (glm4moe), one KV stream per sequence
(llama-cpp-python's default) or one unified stream.
"""

from __future__ import annotations

import ctypes
import pathlib
import random
from typing import Iterator, List, Tuple

import llama_cpp
import pytest

import _helpers
from llama_mtp import _compat, llama_rules, testing
from llama_mtp.llama_rules import UbatchSplit

N_SEQ = 4
N_RS = 3
NE1_OFFSET = 24  # struct ggml_tensor: enum type (4, padded to 8), buffer pointer (8), int64 ne[4]


class CountingContext:
    """A raw llama_context on a model whose cb_eval records each graph's last node's ne[1]."""

    def __init__(self, path: pathlib.Path, *, kv_unified: bool) -> None:
        self.nodes = 0
        self.ne1: List[int] = []

        @llama_cpp.ggml_backend_sched_eval_callback
        def on_node(tensor: int, ask: bool, _user: int) -> bool:
            if ask:
                self.nodes += 1
                self.ne1.append(ctypes.c_int64.from_address(tensor + NE1_OFFSET).value)
            return False  # ask only: no tensor data is copied

        self._callback = on_node  # kept alive as long as the context
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 1024, 64, 64
        params.n_seq_max, params.n_rs_seq, params.kv_unified = N_SEQ, N_RS, kv_unified
        params.cb_eval = on_node
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        assert self.ctx, "could not create the context"
        self.batch = llama_cpp.llama_batch_init(64, 0, 1)
        self.per_graph = 0
        self.decode([(0, 1)])
        self.per_graph = self.nodes  # the nodes of one graph (one ubatch), asked about once each

    def decode(self, runs: List[Tuple[int, int]]) -> List[int]:
        """Rows of each ubatch llama.cpp computed for one run per (seq id, rows)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        b, r = self.batch, 0
        for sid, n in runs:
            for i in range(n):
                b.token[r], b.pos[r], b.n_seq_id[r], b.logits[r] = 5 + i, i, 1, True
                b.seq_id[r][0] = sid
                r += 1
        b.n_tokens = r
        self.nodes, self.ne1 = 0, []
        assert llama_cpp.llama_decode(self.ctx, b) == 0
        if not self.per_graph:
            return []
        assert self.nodes % self.per_graph == 0, (self.nodes, self.per_graph)
        return [self.ne1[g * self.per_graph - 1] for g in range(1, self.nodes // self.per_graph + 1)]

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


@pytest.fixture(scope="module", params=["qwen35", "glm4moe"])
def arch_model(request, model_dir) -> pathlib.Path:
    return _helpers.build_model(testing.TestModelSpec(recipe="oracle", arch=request.param), model_dir)


@pytest.fixture(scope="module", params=[False, True], ids=["stream-per-seq", "unified"])
def counting(request, arch_model) -> Iterator[Tuple[CountingContext, UbatchSplit]]:
    ctx = CountingContext(arch_model, kv_unified=request.param)
    split = llama_rules.context_ubatch_split(ctx.ctx, kv_unified=request.param)  # the rule auto prices steps by
    yield ctx, split
    ctx.close()


def test_the_mirror_cuts_batches_as_llama_cpp_does(counting) -> None:
    ctx, split = counting
    rng = random.Random(7)
    shapes = [[(0, 2), (1, 1), (2, 1), (3, 1)], [(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 2), (1, 2), (2, 2), (3, 2)],
              [(0, 1), (2, 1), (3, 2)], [(1, 5), (3, 1)]]
    for _ in range(30):
        sids = sorted(rng.sample(range(N_SEQ), rng.randint(1, N_SEQ)))
        shapes.append([(sid, rng.randint(1, 5)) for sid in sids])
    multi = 0
    for runs in shapes:
        got = ctx.decode(runs)
        assert got == split.ubatches(tuple(runs)), runs
        multi += len(got) > 1
    if split.equal:
        assert multi >= 10  # the shapes exercise real splits


def test_compat_reads_the_rule_off_a_target(arch_model) -> None:
    target = _helpers.load_pair(arch_model, n_seq=N_SEQ, n_ctx=N_SEQ * 128, n_draft_max=N_RS)
    try:
        split = _compat.ubatch_split(target[0])
        hybrid = _compat.arch_of(target[0]) == "qwen35"
        assert split.equal  # one KV stream per sequence: llama-cpp-python's kv_unified=False
        assert split.sequential
        assert split.keep_tail == (N_RS + 1 if hybrid else 0)
        assert split.n_ubatch == int(target[0].context_params.n_ubatch)
        single = _helpers.load_pair(arch_model, n_seq=1, n_ctx=256, n_draft_max=N_RS)
        try:
            one = _compat.ubatch_split(single[0])
            assert one.ubatches(((0, 3),)) == [3]
            assert one.sequential == (not hybrid)  # hybrid: one stream, unified; attention: no split at all
            assert one.equal == hybrid
        finally:
            single[1].close()
            single[0].close()
    finally:
        target[1].close()
        target[0].close()
