"""Tests of llama_mtp.testing: the synthetic qwen35 + MTP GGUF generator.

Tiny models only (milliseconds to build), written to a temporary model cache.
The bench-size check is marked ``slow`` (deselected by default; run with -m slow).
"""

from __future__ import annotations

import contextlib
import ctypes
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gguf")

from llama_mtp import testing as T  # noqa: E402

import _helpers  # noqa: E402

N_GEN = 64


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("llama_mtp_models")


@contextlib.contextmanager
def _cache_env(directory: pathlib.Path) -> Iterator[None]:
    # the fallback layout (models/ under LLAMA_MTP_CACHE), so the session-wide
    # LLAMA_MTP_MODEL_CACHE (conftest) is lifted; LLAMA_MTP_CACHE is also the shim build
    # cache root: set it only while building models
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LLAMA_MTP_MODEL_CACHE", raising=False)
        mp.setenv("LLAMA_MTP_CACHE", str(directory))
        yield


@pytest.fixture(scope="module")
def cached(model_cache: pathlib.Path):
    """cached_test_model / cached_test_model_info writing into the temporary cache."""

    def build(*args: Any, info: bool = False, **kw: Any):
        with _cache_env(model_cache):
            if info:
                return T.cached_test_model_info(*args, **kw)
            return T.cached_test_model(*args, **kw)

    return build


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _load(llama_cpp, path: pathlib.Path, **kw):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False, **kw
    )


# ----------------------------------------------------------------- pure python


def test_spec_resolves_recipe_defaults_and_validates() -> None:
    ctx = T.TestModelSpec(recipe="context")
    for key, value in T.RECIPE_DEFAULTS["context"].items():
        assert getattr(ctx, key) == value
    assert T.TestModelSpec(recipe="context", **T.RECIPE_DEFAULTS["context"]).key() == ctx.key()
    assert T.TestModelSpec().key() != T.TestModelSpec(seed=1).key()
    for bad in (dict(recipe="nope"), dict(accept=1.5), dict(ftype="q4_0"), dict(n_layer=3),
                dict(noise=1.0)):
        with pytest.raises(ValueError):
            T.TestModelSpec(**bad)
    assert set(T.SIZES) >= {"tiny", "fast", "bench"}


def test_same_seed_same_bytes(tmp_path: pathlib.Path) -> None:
    for recipe in ("oracle", "context"):
        spec = T.TestModelSpec(recipe=recipe, accept=0.5, ftype="q8_0")
        a, b = tmp_path / f"{recipe}-a.gguf", tmp_path / f"{recipe}-b.gguf"
        T.write_test_model(a, spec)
        T.write_test_model(b, spec)
        assert a.read_bytes() == b.read_bytes()
    other = tmp_path / "other.gguf"
    T.write_test_model(other, T.TestModelSpec(recipe="context", accept=0.5, ftype="q8_0", seed=1))
    assert other.read_bytes() != b.read_bytes()


def test_cache_is_keyed_and_atomic(cached, model_cache: pathlib.Path) -> None:
    path = cached(size="tiny", accept=0.25)
    assert path.parent == model_cache / "models" and path.exists()  # models/ under the cache root
    mtime = path.stat().st_mtime_ns
    assert cached(T.TestModelSpec(accept=0.25)) == path  # same spec, same file
    assert path.stat().st_mtime_ns == mtime  # not rebuilt
    assert cached(size="tiny", accept=0.5) != path
    assert not list((model_cache / "models").glob("*.tmp"))


def test_model_cache_env_takes_precedence(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLAMA_MTP_MODEL_CACHE holds the models themselves and wins over LLAMA_MTP_CACHE."""
    monkeypatch.setenv("LLAMA_MTP_CACHE", str(tmp_path / "root"))
    monkeypatch.setenv("LLAMA_MTP_MODEL_CACHE", str(tmp_path / "models-only"))
    assert T.cache_dir() == tmp_path / "models-only"
    path = T.cached_test_model(size="tiny", accept=0.25)
    assert path.parent == tmp_path / "models-only" and path.exists()
    assert not (tmp_path / "root").exists()
    monkeypatch.delenv("LLAMA_MTP_MODEL_CACHE")
    assert T.cache_dir() == tmp_path / "root" / "models"
    monkeypatch.delenv("LLAMA_MTP_CACHE")
    assert T.cache_dir() == pathlib.Path.home() / ".cache" / "llama_mtp" / "models"


def test_session_models_stay_out_of_the_user_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """conftest points the model cache at a temporary folder for the whole session."""
    assert T.cache_dir().resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve())


@pytest.mark.parametrize("accept,h_miss", [(1.0, 0.0), (0.75, 0.0), (0.5, 0.5), (0.0, 1.0)])
def test_oracle_info_is_consistent(accept: float, h_miss: float) -> None:
    info = T.describe_test_model(T.TestModelSpec(accept=accept, h_miss_fraction=h_miss))
    specials = set(info.special_ids)
    ordinary = np.array([t for t in range(info.n_vocab) if t not in specials])
    assert {info.eos_id, info.bos_id} <= specials
    # one cycle through every ordinary token, never into a special token
    cycle = info.pi_chain(int(ordinary[0]), len(ordinary))
    assert sorted(cycle) == sorted(ordinary.tolist()) and cycle[-1] == ordinary[0]
    assert (info.predecessor[info.successor[ordinary]] == ordinary).all()
    # "spread" pattern: exact rate over the cycle, within one token in any window
    assert abs(info.mtp_correct[ordinary].sum() - round(accept * len(ordinary))) <= 1
    window = cycle[:N_GEN]
    assert abs(info.accept_rate(window) - accept) <= 1.0 / N_GEN + 1e-9
    drafts = np.array([info.mtp_draft(t) for t in range(info.n_vocab)])
    assert (drafts == info.mtp_prediction).all()
    assert ((drafts == info.successor) == info.mtp_correct)[ordinary].all()
    # misses split between the fed token and the fed hidden state as requested
    n_tok, n_h = int((info.token_decoy[ordinary] >= 0).sum()), int((info.h_decoy[ordinary] >= 0).sum())
    n_miss = int((~info.mtp_correct[ordinary]).sum())
    assert n_tok + n_h == n_miss
    if n_miss:
        assert abs(n_h / n_miss - h_miss) < 0.15
    # chained drafts: the first reads the target hidden state, the rest only the tokens
    t = int(ordinary[3])
    chain = info.draft_chain(t, 3)
    assert chain[0] == info.mtp_draft(t) and chain[2] == info.mtp_draft(chain[1], -1)
    assert info.trunk_margin >= 5.0 and info.mtp_margin >= 5.0


# ------------------------------------------------------------ through llama.cpp


@pytest.mark.parametrize("ftype", ["f32", "f16", "q8_0"])
def test_oracle_greedy_follows_successor(llama_cpp, no_extra_bufts, cached, ftype: str) -> None:
    path, info = cached(accept=0.5, ftype=ftype, info=True)
    llm = _load(llama_cpp, path)
    prompt = llm.tokenize(b"Hello world", add_bos=False)
    assert prompt == list(b"Hello world")  # byte tokens are ids 0..255 (no merge applies)
    assert _helpers.greedy_tokens(llm, prompt, N_GEN) == info.greedy_continuation(prompt[-1], N_GEN)
    # the specials never win, so completions run to the length limit
    res = llm.create_completion("Hi", max_tokens=16, temperature=0.0)
    assert res["choices"][0]["finish_reason"] == "length"
    llm.close()


def test_context_recipe_margin_and_history(llama_cpp, cached) -> None:
    path, info = cached(recipe="context", info=True)
    tokens, margins = T.reference_greedy(path, T.CONTEXT_TEST_PROMPT, T.CONTEXT_TEST_N_TOKENS)
    assert len(tokens) == T.CONTEXT_TEST_N_TOKENS
    assert margins.min() >= T.CONTEXT_MIN_MARGIN
    # history matters: greedy leaves the oracle's successor map somewhere ...
    llm = _load(llama_cpp, path, logits_all=True)
    prompt = llm.tokenize(T.CONTEXT_TEST_PROMPT.encode(), add_bos=False)
    prev = [prompt[-1], *tokens[:-1]]
    assert sum(int(info.successor[p]) != t for p, t in zip(prev, tokens)) > 0
    # ... and the same tokens after a different prefix give different logits
    other = llm.tokenize(b"Another prefix entirely.", add_bos=False)
    llm.reset()
    llm.eval(prompt + tokens)
    a = llm.scores[len(prompt):len(prompt) + len(tokens)].copy()
    llm.reset()
    llm.eval(other + tokens)
    b = llm.scores[len(other):len(other) + len(tokens)].copy()
    assert np.abs(a - b).max() > 1.0
    llm.close()
    # the trunk ignores the MTP flags: other accept values keep the same greedy path
    path_half = cached(recipe="context", accept=0.5, accept_pattern="random")
    assert T.reference_greedy(path_half, T.CONTEXT_TEST_PROMPT, 32)[0] == tokens[:32]


def test_context_batch_vs_single_noise_is_far_below_margin(llama_cpp, cached) -> None:
    path = cached(recipe="context")
    tokens, margins = T.reference_greedy(path, T.CONTEXT_TEST_PROMPT, T.CONTEXT_TEST_N_TOKENS)
    llm = _load(llama_cpp, path, logits_all=True)
    seq = llm.tokenize(T.CONTEXT_TEST_PROMPT.encode(), add_bos=False) + tokens
    runs = []
    for n_batch in (1, 3, 512):
        llm.reset()
        llm.n_batch = n_batch  # Llama.eval splits the tokens into n_batch chunks
        llm.eval(seq)
        runs.append(llm.scores[: len(seq)].copy())
    llm.close()
    noise = max(float(np.abs(r - runs[0]).max()) for r in runs[1:])
    assert noise < 0.1 * margins.min()


# ---------------------------------------------------- MTP head, low-level API


class _MtpProbe:
    """Target + MTP contexts on one model, fed like common/speculative.cpp does."""

    def __init__(self, llama_cpp, path: pathlib.Path, extra_bufts: bool) -> None:
        self.L = L = llama_cpp.llama_cpp
        self.X = pytest.importorskip("llama_cpp.llama_cpp_ext")
        mp = L.llama_model_default_params()
        mp.load_mtp = True
        mp.use_extra_bufts = extra_bufts
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        assert self.model
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_embd = L.llama_model_n_embd(self.model)

        def ctx_params(**kw):
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 512, 512, 2, 2
            for k, v in kw.items():
                setattr(cp, k, v)
            return cp

        self.tgt = L.llama_init_from_model(self.model, ctx_params())
        assert self.tgt
        self.mtp = L.llama_init_from_model(
            self.model, ctx_params(ctx_type=L.LLAMA_CONTEXT_TYPE_MTP, ctx_other=self.tgt, n_rs_seq=0)
        )
        assert self.mtp, "creating the MTP context failed"
        self.X.llama_set_embeddings_nextn(self.tgt, True, False)
        self.X.llama_set_embeddings_nextn(self.mtp, True, True)

    def _process(self, ctx, items: list[tuple[int, int, np.ndarray | None]]) -> None:
        """items: (token, pos, hidden row or None); every entry is an output."""
        L = self.L
        batch = L.llama_batch_ext_init(ctx)
        rows = []
        try:
            for tok, pos, h in items:
                idx = L.llama_batch_ext_add_token(batch, 0, tok)
                assert idx >= 0
                assert L.llama_batch_ext_set_pos(batch, idx, (L.llama_pos * 4)(pos, 0, 0, 0))
                if h is not None:
                    # upstream pairs h via set_embd_token; set_embd_state is a stub returning false
                    row = np.ascontiguousarray(h, dtype=np.float32)
                    rows.append(row)
                    embd = L.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, row.size)
                    assert L.llama_batch_ext_set_embd_token(batch, idx, embd)
                L.llama_batch_ext_set_output_logits(batch, idx, True)
            assert L.llama_process(ctx, L.LLAMA_PROCESS_TYPE_DECODE, batch) == 0
        finally:
            L.llama_batch_ext_free(batch)

    def target_hidden(self, seq: list[int]) -> np.ndarray:
        self._process(self.tgt, [(t, p, None) for p, t in enumerate(seq)])
        h = self.X.llama_get_embeddings_nextn(self.tgt)
        return np.ctypeslib.as_array(h, shape=(len(seq), self.n_embd)).copy()

    def mtp_argmax(self, items: list[tuple[int, int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """MTP argmax and the MTP's own h_nextn row for each item (fresh MTP memory)."""
        L, n = self.L, len(items)
        L.llama_memory_clear(L.llama_get_memory(self.mtp), True)
        self._process(self.mtp, items)
        argmax = np.array([
            int(np.ctypeslib.as_array(L.llama_get_logits_ith(self.mtp, i), shape=(self.n_vocab,)).argmax())
            for i in range(n)
        ])
        own_h = np.stack([
            np.ctypeslib.as_array(self.X.llama_get_embeddings_nextn_ith(self.mtp, i), shape=(self.n_embd,))
            for i in range(n)
        ])
        return argmax, own_h.copy()

    def close(self) -> None:
        self.L.llama_free(self.mtp)
        self.L.llama_free(self.tgt)
        self.L.llama_model_free(self.model)


@pytest.mark.parametrize("ftype", ["f32", "q8_0"])
def test_mtp_head_drafts_match_info(llama_cpp, cached, ftype: str) -> None:
    path, info = cached(accept=0.5, h_miss_fraction=0.5, ftype=ftype, info=True)
    probe = _MtpProbe(llama_cpp, path, extra_bufts=ftype != "q8_0")
    try:
        seq = [65, *info.pi_chain(65, N_GEN)]
        hidden = probe.target_hidden(seq)
        ks = range(1, len(seq))
        # token x_{p+1} at position p+1 paired with the target's h_p (upstream convention)
        drafts, own_h = probe.mtp_argmax([(seq[k], k, hidden[k - 1]) for k in ks])
        assert drafts.tolist() == [info.mtp_draft(seq[k]) for k in ks]
        accepted = np.mean(drafts == np.array([info.successor[seq[k]] for k in ks]))
        assert accepted == pytest.approx(info.accept_rate(seq[1:]))
        # a stale or missing hidden state changes the drafts, exactly as predicted
        stale, _ = probe.mtp_argmax([(seq[k], k, hidden[max(k - 2, 0)]) for k in ks])
        assert stale.tolist() == [info.mtp_draft(seq[k], seq[max(k - 2, 0)]) for k in ks]
        assert (stale != drafts).any()
        zero = np.zeros(probe.n_embd, dtype=np.float32)
        zeros, _ = probe.mtp_argmax([(seq[k], k, zero) for k in ks])
        assert zeros.tolist() == [info.mtp_draft(seq[k], -1) for k in ks]
        assert (zeros != drafts).any()
        # chained step: draft 1 at the next position with the MTP's own h_nextn
        second, _ = probe.mtp_argmax([(int(drafts[k - 1]), k + 1, own_h[k - 1]) for k in ks])
        assert second.tolist() == [info.draft_chain(seq[k], 2)[1] for k in ks]
    finally:
        probe.close()


# ----------------------------------------------------------------------- slow


@pytest.mark.slow
def test_bench_size_q8_0(llama_cpp, no_extra_bufts, tmp_path: pathlib.Path) -> None:
    spec = T.TestModelSpec(**T.SIZES["bench"], ftype="q8_0", accept=0.75)
    path = tmp_path / "bench.gguf"
    try:
        info = T.write_test_model(path, spec)
        assert 1.0e9 < path.stat().st_size < 1.4e9
        llm = _load(llama_cpp, path)
        prompt = list(b"Hello")
        assert _helpers.greedy_tokens(llm, prompt, 8) == info.greedy_continuation(prompt[-1], 8)
        llm.close()
    finally:
        path.unlink(missing_ok=True)  # ~1.2 GB: do not leave it to pytest's tmp retention
