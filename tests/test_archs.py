"""Per-arch checks of the generated models, parametrised over llama_mtp.testing.ARCHS
(so every registered arch is picked up): tiny oracle greedy path, MTP drafts,
context-recipe margins and the q4_k_m copy made by llama.cpp's quantizer."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from llama_mtp import testing as T  # noqa: E402
from llama_mtp.testing.vocab import MERGES  # noqa: E402
from test_testing_models import _MtpProbe, _greedy, _load  # noqa: E402  (tests/ is on sys.path)

N_GEN = 32
ARCH_NAMES = sorted(T.ARCHS)


def test_arch_is_part_of_key_and_name() -> None:
    spec = T.TestModelSpec()
    assert spec.arch == "qwen35" and "qwen35" in T.ARCHS
    with pytest.raises(ValueError):
        T.TestModelSpec(arch="nope")
    with pytest.raises(ValueError):
        T.TestModelSpec(arch_params={"no_such_knob": 1})
    path = T.cached_test_model(size="tiny", arch="qwen35", accept=0.5)
    assert path.name.startswith("qwen35-mtp-oracle-")
    assert spec.key() in T.cached_test_model(spec).name


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_oracle_greedy_and_mtp_drafts(arch: str) -> None:
    path, info = T.cached_test_model_info(size="tiny", arch=arch, accept=0.5, h_miss_fraction=0.5)
    llm = _load(llama_cpp, path)
    prompt = llm.tokenize(b"Hello world", add_bos=False)
    assert _greedy(llm, prompt, N_GEN) == info.greedy_continuation(prompt[-1], N_GEN)
    llm.close()
    probe = _MtpProbe(llama_cpp, path, extra_bufts=True)
    try:
        seq = [65, *info.pi_chain(65, N_GEN)]
        hidden = probe.target_hidden(seq)
        drafts, _ = probe.mtp_argmax([(seq[k], k, hidden[k - 1]) for k in range(1, len(seq))])
        assert drafts.tolist() == [info.mtp_draft(t) for t in seq[1:]]
        assert (drafts != np.array([info.successor[t] for t in seq[1:]])).any()  # accept=0.5 misses
    finally:
        probe.close()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_context_margins(arch: str) -> None:
    path, info = T.cached_test_model_info(size="tiny", arch=arch, recipe="context")
    tokens, margins = T.reference_greedy(path, T.CONTEXT_TEST_PROMPT, T.CONTEXT_TEST_N_TOKENS)
    assert len(tokens) == T.CONTEXT_TEST_N_TOKENS
    assert margins.min() >= T.CONTEXT_MIN_MARGIN
    # history matters somewhere along the path (else "context" would be the oracle)
    llm = _load(llama_cpp, path)
    prompt = llm.tokenize(T.CONTEXT_TEST_PROMPT.encode(), add_bos=False)
    llm.close()
    prev = [prompt[-1], *tokens[:-1]]
    assert sum(int(info.successor[p]) != t for p, t in zip(prev, tokens)) > 0


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_q4_k_m_follows_the_oracle(arch: str, no_extra_bufts, model_dir: pathlib.Path) -> None:
    import gguf

    path, info = T.cached_test_model_info(size="tiny", arch=arch, accept=0.5, ftype="q4_k_m")
    types = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    # llama.cpp's quantizer ran: k-quants where rows allow, its own fallbacks elsewhere
    assert gguf.GGMLQuantizationType.Q4_K in types and gguf.GGMLQuantizationType.F16 not in types
    assert path.stat().st_size < T.cached_test_model(size="tiny", arch=arch, accept=0.5, ftype="f16").stat().st_size
    llm = _load(llama_cpp, path)
    prompt = list(b"Hello world")
    assert _greedy(llm, prompt, N_GEN) == info.greedy_continuation(prompt[-1], N_GEN)
    llm.close()


@pytest.mark.parametrize("arch", [a for a in ARCH_NAMES if T.ARCHS[a].chat_template])
def test_chat_template_renders_through_create_chat_completion(arch: str) -> None:
    path, info = T.cached_test_model_info(size="tiny", arch=arch)
    llm = _load(llama_cpp, path)
    try:
        # llama-cpp-python picked the GGUF's template (Jinja2ChatFormatter), not a built-in format
        assert llm.metadata["tokenizer.chat_template"] == T.ARCHS[arch].chat_template
        assert llm.chat_format == "chat_template.default"
        messages = [{"role": "user", "content": "Hello world"}]
        res = llm.create_chat_completion(messages, max_tokens=8, temperature=0.0)
        # the oracle continues from the prompt's last token: the rendered template decides it
        import jinja2

        rendered = jinja2.Template(T.ARCHS[arch].chat_template).render(messages=messages, add_generation_prompt=True)
        prompt = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        expected = info.greedy_continuation(prompt[-1], 8)
        assert res["choices"][0]["message"]["content"] == llm.detokenize(expected).decode(errors="ignore")
        assert res["usage"]["prompt_tokens"] == len(prompt)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_filler_tokens_read_as_words(arch: str) -> None:
    path, info = T.cached_test_model_info(size="tiny", arch=arch)
    llm = _load(llama_cpp, path)
    try:
        filler = [t for t in range(256, info.n_vocab) if t not in info.special_ids and len(info.tokens[t]) > 3]
        assert len(filler) > 50
        texts = [llm.detokenize([t]) for t in filler]
        assert len(set(texts)) == len(texts)
        assert all(t[:1] == b" " and t[1:].isalpha() and t[1:].islower() for t in texts)
        # BPE never builds a filler from text: a filler word tokenizes back to bytes / merges
        assert all(x < 256 + len(MERGES) for x in llm.tokenize(texts[0] + texts[1], add_bos=False))
    finally:
        llm.close()
