"""The model's text on every output path, on real vocabularies (llama.cpp's ggml-vocab-*.gguf).

llama-cpp-python 0.3.36 turns every token piece longer than 32 bytes into nothing; real
vocabularies have hundreds (Qwen3.5's 64-space indent, 50-byte ``=====`` rules). Token ids are
checked against the generator's script (greedy follows it by construction, margins asserted);
text is checked against what llama.cpp itself writes for those ids (``llama_token_to_piece``
with a buffer as large as it asks for, :meth:`RealVocab.piece`), never against llama-cpp-python.
"""

from __future__ import annotations

import pathlib
from typing import Iterator, List, Tuple

import hypothesis.strategies as st
import llama_cpp
import pytest
from hypothesis import HealthCheck, given, settings

import llama_mtp
from llama_mtp import _compat, testing as T
from llama_mtp.testing.cache import resolve_spec

import _helpers

THREADS = dict(n_threads=1, n_threads_batch=1)
CTX = dict(n_ctx=512, verbose=False, **THREADS)
LINE = "x = 1" + " " * 65 + "y # done " + "=" * 50 + " 日本語 🦙!"  # a 64-space piece, a 50-byte rule, UTF-8 split


def script_for(vocab: T.RealVocab, start: str = "\n") -> Tuple[int, ...]:
    """``start``'s token, then LINE's tokens and the vocabulary's longest piece: every one distinct.

    A prompt ending in the start token (a chat prompt ends in "\\n") continues with the rest."""
    head = tuple(vocab.tokenize(start))
    body = [t for t in vocab.tokenize(LINE) if t not in head]
    longest = max(vocab.long_pieces(), key=lambda t: len(vocab.piece(t)))
    script = tuple(dict.fromkeys(head + tuple(body) + (longest,)))
    assert max(len(vocab.piece(t)) for t in script) > 32, "the script must hold a piece over 32 bytes"
    return script


def spec_for(arch: str) -> T.TestModelSpec:
    vocab = T.real_vocab(T.get_arch(arch).real_vocab)
    return resolve_spec(None, "tiny", dict(arch=arch, n_embd=64, vocab=vocab.name, script=script_for(vocab),
                                          script_loop=True, accept=0.75, ftype="f16"))


def expected(spec: T.TestModelSpec, n: int) -> Tuple[List[int], str]:
    """The ids greedy writes after the script's first token, and llama.cpp's text for them."""
    vocab = T.real_vocab(spec.vocab)
    ids = [spec.script[(i + 1) % len(spec.script)] for i in range(n)]
    return ids, b"".join(vocab.piece(t) for t in ids).decode("utf-8", errors="ignore")


def load_pair(spec: T.TestModelSpec, **kwargs) -> Tuple[llama_mtp.MtpTargetLlama, llama_cpp.Llama]:
    path, info = T.cached_test_model_info(spec)
    assert info.trunk_margin > 1.0 and info.mtp_margin > 1.0  # greedy far from ties
    if spec.arch == "gemma4":  # an external drafter: the assistant GGUF of the same spec
        _, assistant, _ = T.archs.gemma4.cached_gemma4_pair(spec)
        return llama_mtp.load(str(path), draft_model_path=str(assistant), **kwargs)
    return llama_mtp.load(str(path), **kwargs)


QWEN = spec_for("qwen35")
N = 2 * len(QWEN.script)  # the script twice round: every piece, the rule and the long piece included


@pytest.fixture(scope="module")
def qwen_pair() -> Iterator[Tuple[llama_mtp.MtpTargetLlama, llama_cpp.Llama]]:
    target, draft = load_pair(QWEN, n_draft_max=3, n_seq=2, **CTX)
    yield target, draft
    draft.close()
    target.close()


@pytest.fixture(scope="module")
def qwen_llm() -> Iterator[llama_mtp.MtpLlama]:
    llm = llama_mtp.MtpLlama(str(T.cached_test_model(QWEN)), n_draft=3, **CTX)
    yield llm
    llm.close()


def test_the_script_has_what_breaks_llama_cpp_python() -> None:
    """The fixture itself: long pieces that plain llama-cpp-python drops, and a character split
    across tokens (so these tests see both)."""
    vocab = T.real_vocab(QWEN.vocab)
    ids, text = expected(QWEN, N)
    assert " " * 64 in text and "=" * 50 in text and "🦙" in text
    assert any(len(vocab.piece(t)) > 32 for t in ids)
    assert any(not _decodes(vocab.piece(t)) for t in ids)  # a piece that is part of a character
    plain = llama_cpp.Llama(str(T.cached_test_model(QWEN)), vocab_only=True, verbose=False)
    try:
        assert plain.detokenize(ids).decode("utf-8", errors="ignore") != text  # 0.3.36 drops the long pieces
    finally:
        plain.close()


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ------------------------------------------------------------------------------ paths


def test_generate_and_its_stream(qwen_pair) -> None:
    target, draft = qwen_pair
    ids, text = expected(QWEN, N)
    res = llama_mtp.generate(target, draft, [QWEN.script[0]], max_tokens=N, n_draft=3)
    assert res.tokens == ids and res.text == text
    stream = llama_mtp.generate(target, draft, [QWEN.script[0]], max_tokens=N, n_draft="auto", stream=True)
    assert "".join(stream) == text and stream.result is not None and stream.result.tokens == ids


def test_generate_many_and_engine_handles(qwen_pair) -> None:
    target, draft = qwen_pair
    ids, text = expected(QWEN, N)
    results = llama_mtp.generate_many(target, draft, [[QWEN.script[0]]] * 3, max_tokens=N, n_draft=2)
    assert [r.text for r in results] == [text] * 3 and all(r.tokens == ids for r in results)
    with llama_mtp.Engine(target, draft, n_draft=3) as engine:
        handles = [engine.submit([QWEN.script[0]], max_tokens=N) for _ in range(2)]
        assert ["".join(h) for h in handles] == [text, text]
        assert all(h.result().text == text for h in handles)


def test_stop_strings_see_the_whole_pieces(qwen_pair, qwen_llm) -> None:
    """A stop string inside a long piece: the text ends right before it on every path."""
    target, draft = qwen_pair
    _, text = expected(QWEN, N)
    want = text[: text.index("=====")]
    res = llama_mtp.generate(target, draft, [QWEN.script[0]], max_tokens=N, stop=["====="])
    assert res.text == want and res.finish_reason == "stop"
    got = qwen_llm.create_completion([QWEN.script[0]], max_tokens=N, temperature=0.0, stop=["====="])
    assert got["choices"][0]["text"] == want and got["choices"][0]["finish_reason"] == "stop"


def test_mtp_llama_completion_stream_plain_and_detokenize(qwen_llm) -> None:
    llm = qwen_llm
    ids, text = expected(QWEN, N)
    assert llm.detokenize(ids).decode() == b"".join(T.real_vocab(QWEN.vocab).piece(t) for t in ids).decode()
    for n_draft in (3, 0):  # 0: llama-cpp-python's own decoding, which MtpLlama's tokenizer fixes too
        llm.mtp_n_draft = n_draft
        try:
            got = llm.create_completion([QWEN.script[0]], max_tokens=N, temperature=0.0)
            chunks = llm.create_completion([QWEN.script[0]], max_tokens=N, temperature=0.0, stream=True)
            assert got["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks) == text
        finally:
            llm.mtp_n_draft = 3


def test_mtp_llama_logprobs_name_whole_pieces() -> None:
    ids, _ = expected(QWEN, N)
    llm = llama_mtp.MtpLlama(str(T.cached_test_model(QWEN)), n_draft=3, logits_all=True, **CTX)
    try:
        got = llm.create_completion([QWEN.script[0]], max_tokens=N, temperature=0.0, logprobs=1)
    finally:
        llm.close()
    tokens = got["choices"][0]["logprobs"]["tokens"]
    vocab = T.real_vocab(QWEN.vocab)
    assert tokens == [vocab.piece(t).decode("utf-8", errors="ignore") for t in ids]
    assert [t for t in tokens if len(t.encode()) > 32], "the long pieces must be among them"


def test_mtp_llama_chat(qwen_llm) -> None:
    """A chat prompt ends in "\\n" (the script's first token): the reply is the script's text."""
    prompt = qwen_llm.tokenize(b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_bos=False, special=True)
    assert prompt[-1] == QWEN.script[0]
    _, text = expected(QWEN, N)
    got = qwen_llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=N, temperature=0.0)
    assert got["choices"][0]["message"]["content"] == text


def test_server_completions_chat_and_logprobs(tmp_path: pathlib.Path) -> None:
    """llama_mtp.server through the official openai client: completions plain and streamed, chat,
    and the logprobs' token strings."""
    from test_server import ServerProcess

    ids, text = expected(QWEN, N)
    prompt = "hi\n"  # its last token is the script's first (the server takes text prompts)
    assert T.real_vocab(QWEN.vocab).tokenize(prompt)[-1] == QWEN.script[0]
    server = ServerProcess(T.cached_test_model(QWEN), tmp_path / "server.log", "--n_ctx", "1024", "--model_alias", "m")
    try:
        server.wait_ready()
        client = server.client()
        got = client.completions.create(model="m", prompt=prompt, max_tokens=N, temperature=0.0, logprobs=1)
        assert got.choices[0].text == text
        vocab = T.real_vocab(QWEN.vocab)
        assert got.choices[0].logprobs.tokens == [vocab.piece(t).decode("utf-8", errors="ignore") for t in ids]
        stream = client.completions.create(model="m", prompt=prompt, max_tokens=N, temperature=0.0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == text
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=N,
                                              temperature=0.0)
        assert chat.choices[0].message.content == text
        detok = _helpers_post(server, "/extras/detokenize", {"tokens": ids})
        assert detok["text"] == text
    finally:
        server.stop()


def _helpers_post(server, route: str, body: dict) -> dict:
    import httpx

    r = httpx.post(server.base + route, json=body, headers=server.headers, timeout=30)
    r.raise_for_status()
    return r.json()


# ------------------------------------------------------------------------ every arch


@pytest.mark.parametrize("arch", sorted(T.ARCHS))
def test_every_arch_on_its_real_vocabulary(arch: str) -> None:
    """generate() and MtpLlama write llama.cpp's text, long pieces whole, on each arch's real
    vocabulary (gemma4 with its assistant)."""
    spec = spec_for(arch)
    n = len(spec.script) + 2
    ids, text = expected(spec, n)
    target, draft = load_pair(spec, n_draft_max=2, **CTX)
    try:
        res = llama_mtp.generate(target, draft, [spec.script[0]], max_tokens=n, n_draft=2)
        assert res.tokens == ids and res.text == text
        assert "".join(llama_mtp.generate(target, draft, [spec.script[0]], max_tokens=n, stream=True)) == text
    finally:
        draft.close()
        target.close()
    path = str(T.cached_test_model(spec))
    kwargs = {}
    if arch == "gemma4":
        kwargs["draft_model_path"] = str(T.archs.gemma4.cached_gemma4_pair(spec)[1])
    llm = llama_mtp.MtpLlama(path, n_draft=2, **kwargs, **CTX)
    try:
        got = llm.create_completion([spec.script[0]], max_tokens=n, temperature=0.0)
        assert got["choices"][0]["text"] == text
    finally:
        llm.close()


# ------------------------------------------------------------------------- round trip

ROUND_TRIP_VOCABS = ("qwen35", "llama-bpe", "deepseek-llm", "gemma-4")
PIECES = st.sampled_from([" " * 4, " " * 40, " " * 64, " " * 129, "\t\t", "\n\n", "=" * 50, "-" * 70,
                          "//" + "-" * 60, "#" * 33, "日本語", "中文字符", "🦙", "👩‍💻", "é", "def f(x):",
                          "return x", "<|im_start|>", "<|endoftext|>", "<start_of_turn>", "<|turn>"])


@pytest.fixture(scope="module", params=ROUND_TRIP_VOCABS)
def vocab_llama(request) -> Iterator[llama_cpp.Llama]:
    """A vocab-only Llama on each real vocabulary, given MtpLlama's tokenizer by the compat seam."""
    llm = llama_cpp.Llama(str(T.real_vocab(request.param).path), vocab_only=True, verbose=False)
    _compat.install_piece_tokenizer(llm)
    yield llm
    llm.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(PIECES, st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)), min_size=1, max_size=8))
def test_round_trip(vocab_llama, parts: List[str]) -> None:
    """detokenize(tokenize(x)) == x: whitespace runs, rules, CJK, emoji and control-token text
    (tokenized as text: special=False)."""
    text = "".join(parts)
    toks = vocab_llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    back = vocab_llama.detokenize(toks)
    assert back == text.encode("utf-8") or _normalised(vocab_llama, text, back)


def _normalised(llm: llama_cpp.Llama, text: str, back: bytes) -> bool:
    """SentencePiece vocabularies (gemma-4) map some characters on the way in (e.g. a leading
    space marker); then detokenize must at least be stable: tokenizing its output gives the same."""
    again = llm.detokenize(llm.tokenize(back, add_bos=False, special=False))
    return again == back and llm.metadata.get("tokenizer.ggml.model") != "gpt2"
