"""Tests of real vocabularies and scripted greedy output in the model generator.

llama.cpp's ``models/ggml-vocab-*.gguf`` (llama_mtp.testing.real_vocab) give generated
models real tokenizers: pieces longer than 32 bytes, UTF-8 split across byte tokens, real
control tokens.  ``script`` makes greedy decoding follow given tokens.  Models are tiny
(n_embd 64: the vocab-sized tables dominate, 40-70 MB in f16) and built once per session.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from llama_mtp import testing as T  # noqa: E402
from llama_mtp.testing.cache import resolve_spec  # noqa: E402

import _helpers  # noqa: E402

# CJK and an emoji: their UTF-8 bytes end up split across tokens (byte tokens or partial pieces)
TEXT = "Real text: 日本語 🦙!"
SMALL = dict(n_embd=64)  # tiny trunk; margins stay >= 5 on 150-260k token directions
ARCHS = ("qwen35", "deepseek2", "gemma4")


@pytest.fixture(scope="module")
def qwen() -> T.RealVocab:
    return T.real_vocab("qwen35")


def _rule_pieces(vocab: T.RealVocab) -> list[int]:
    """Long pieces of whitespace / comment rules: the 64-space token, 50-byte ``====`` / ``//---`` lines."""
    def is_rule(piece: bytes) -> bool:
        return len(piece) == 50 and not piece.strip(b" =-/") and (b"=" in piece or b"-" in piece)

    return [t for t in vocab.long_pieces() if vocab.piece(t) == b" " * 64 or is_rule(vocab.piece(t))]


def _script(vocab: T.RealVocab) -> tuple[int, ...]:
    """TEXT's tokens, then whitespace / rule pieces and the vocab's longest piece (all > 32 bytes)."""
    text = T.script_from_text(vocab.name, TEXT)
    longest = max(vocab.long_pieces(), key=lambda t: len(vocab.piece(t)))
    extra = [t for t in _rule_pieces(vocab)[:3] + [longest] if t not in text]
    return text + tuple(dict.fromkeys(extra))


def _spec(arch: str, **kw) -> T.TestModelSpec:
    vocab = T.real_vocab(T.get_arch(arch).real_vocab)
    return resolve_spec(None, "tiny", dict(SMALL, arch=arch, vocab=vocab.name, script=_script(vocab),
                                          script_loop=True, accept=0.75, ftype="f16", **kw))


# --------------------------------------------------------------------------- RealVocab


def test_real_vocab_pieces(qwen: T.RealVocab) -> None:
    assert (qwen.name, qwen.path.name, qwen.n_vocab) == ("qwen35", "ggml-vocab-qwen35.gguf", 151936)
    long = qwen.long_pieces()
    assert len(long) == 240  # runs of spaces, ==== / ---- rules, //---- comment lines
    assert min(len(qwen.piece(t)) for t in long) == 33 and max(len(qwen.piece(t)) for t in long) > 64
    rules = _rule_pieces(qwen)
    assert any(qwen.piece(t) == b" " * 64 for t in rules) and any(len(qwen.piece(t)) == 50 for t in rules)
    # tokenize and piece are llama.cpp's: 65 spaces before a word = the 64-space piece + " y"
    spaces64 = next(t for t in rules if qwen.piece(t) == b" " * 64)
    assert qwen.tokenize("x" + " " * 65 + "y")[1] == spaces64
    # an emoji split across tokens: no single piece decodes, the concatenation does
    toks = qwen.tokenize(" 🦙")
    assert len(toks) > 1 and b"".join(map(qwen.piece, toks)) == " 🦙".encode()
    with pytest.raises(UnicodeDecodeError):
        qwen.piece(toks[-1]).decode("utf-8")


def test_real_vocab_control_tokens(qwen: T.RealVocab) -> None:
    (im_end,) = qwen.tokenize("<|im_end|>", special=True)
    assert qwen.is_control(im_end) and not qwen.is_ordinary(im_end)
    assert qwen.piece(im_end) == b"<|im_end|>"
    assert len(qwen.tokenize("<|im_end|>")) > 1  # as plain text: ordinary pieces
    # "</s>" is a NORMAL token in the file, but llama.cpp makes it an end-of-generation control
    # token: a generated model must never emit it
    (eos_text,) = qwen.tokenize("</s>", special=True)
    assert qwen.is_control(eos_text) and not qwen.is_ordinary(eos_text)
    hello = qwen.tokenize("Hello")[0]
    assert qwen.is_ordinary(hello) and not qwen.is_control(hello)
    assert len(qwen.ordinary) == 151642  # 151936 less 3 control, 1 NORMAL-but-EOG and 290 [PAD] tokens
    for bad in (qwen.n_vocab, -1):
        with pytest.raises(ValueError, match="outside"):
            qwen.piece(bad)
        with pytest.raises(ValueError, match="outside"):
            qwen.is_control(bad)
    with pytest.raises(ValueError, match="available: .*qwen35"):
        T.real_vocab("no-such-vocab")
    assert {"qwen35", "qwen2", "deepseek-llm", "gemma-4", "llama-bpe"} <= set(T.real_vocab_names())
    assert {layout.real_vocab for layout in T.ARCHS.values()} <= set(T.real_vocab_names())


def test_script_from_text(qwen: T.RealVocab) -> None:
    script = T.script_from_text("qwen35", TEXT)
    assert isinstance(script, tuple) and b"".join(map(qwen.piece, script)) == TEXT.encode()
    with pytest.raises(ValueError, match=r"repeats token \d+ \('Ġtwo'\)"):
        T.script_from_text("qwen35", "one two, three two")


# ------------------------------------------------------------------------------- spec


def test_real_vocab_spec_sets_n_vocab_and_keeps_old_keys(qwen: T.RealVocab) -> None:
    assert T.TestModelSpec(vocab="qwen35").n_vocab == qwen.n_vocab
    # a size preset's n_vocab is the synthetic vocabulary's: a real one replaces it
    assert resolve_spec(None, "fast", dict(vocab="qwen35")).n_vocab == qwen.n_vocab
    assert T.TestModelSpec(vocab="qwen35", n_vocab=qwen.n_vocab).n_vocab == qwen.n_vocab
    with pytest.raises(ValueError, match="151936 tokens, got n_vocab=384"):
        T.TestModelSpec(vocab="qwen35", n_vocab=384)
    # the fields added later stay out of the key at their defaults: older specs keep their files
    assert not {"vocab", "script", "script_loop"} & set(T.TestModelSpec().recorded_fields())
    assert T.TestModelSpec().n_vocab == 384
    keys = {T.TestModelSpec().key(), T.TestModelSpec(script=(300, 301)).key(),
            T.TestModelSpec(script=(300, 301), script_loop=True).key(), T.TestModelSpec(vocab="qwen35").key()}
    assert len(keys) == 4


def test_bad_scripts_raise() -> None:
    specials = T.describe_test_model(T.TestModelSpec()).special_ids
    for script, match in (((300, 301, 300), r"repeats token 300 \('Ġ\w+'\)"),
                          ((300, specials[0]), f"token {specials[0]} .* not an ordinary token"),
                          ((300, 384), "token 384 is not an ordinary token"),
                          ((300, -1), "token -1 is not"),
                          ((300, "a"), "must be ints")):
        with pytest.raises(ValueError, match=match):
            T.TestModelSpec(script=script)
    with pytest.raises(ValueError, match="script_loop needs a script"):
        T.TestModelSpec(script_loop=True)
    with pytest.raises(ValueError, match="not an ordinary token"):
        T.TestModelSpec(vocab="qwen35", script=T.real_vocab("qwen35").tokenize("<|im_start|>", special=True))


# ----------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("accept_pattern", ["spread", "random"])
def test_script_shapes_pi(loop: bool, accept_pattern: str) -> None:
    script = (300, 65, 66, 310, 290, 200, 120, 77)
    info = T.describe_test_model(T.TestModelSpec(script=script, script_loop=loop, accept=0.5,
                                                 accept_pattern=accept_pattern))
    ordinary = [t for t in range(info.n_vocab) if t not in set(info.special_ids)]
    assert info.pi_chain(script[0], len(script) - 1) == list(script[1:])
    after = info.pi_chain(script[-1], len(ordinary))
    if loop:  # the script is its own cycle; the other ordinary tokens form one more
        assert after[:len(script)] == list(script)
        start = next(t for t in ordinary if t not in script)
        rest = info.pi_chain(start, len(ordinary) - len(script))
        assert rest[-1] == start and sorted(rest) == sorted(set(ordinary) - set(script))
    else:  # a run inside the single cycle through every ordinary token
        assert sorted(after) == sorted(ordinary) and after[-1] == script[-1]
    # a special token as the last input starts the script (specials alias its predecessor)
    assert all(int(info.successor[s]) == script[0] for s in info.special_ids)
    assert not set(info.successor[ordinary].tolist()) & set(info.special_ids)
    if accept_pattern == "spread":  # the accept pattern runs along the script too
        assert info.mtp_correct[list(script)].sum() == len(script) // 2
    assert info.trunk_margin >= 5.0 and info.mtp_margin >= 5.0


# ------------------------------------------------------------------ through llama.cpp


@pytest.mark.parametrize("arch", ARCHS)
def test_real_vocab_model_follows_script(arch: str) -> None:
    spec = _spec(arch)
    vocab = T.real_vocab(spec.vocab)
    path, info = T.cached_test_model_info(spec)
    assert f"{arch}-{spec.vocab}-mtp" in path.name
    assert info.n_vocab == vocab.n_vocab == spec.n_vocab
    # margins on a sample of the vocabulary (256 of 100-260k tokens) plus every script token
    assert info.margin_tokens >= 256 and info.trunk_margin >= 5.0 and info.mtp_margin >= 5.0
    script = list(spec.script)
    assert max(len(vocab.piece(t)) for t in script) > 32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        out = _helpers.greedy_tokens(llm, [script[0]], 2 * len(script))
        assert out == script[1:] + script + script[:1] == info.greedy_continuation(script[0], len(out))
        text = b"".join(map(vocab.piece, out))
        assert TEXT.encode() in text and all(vocab.piece(t) in text for t in script)
        # the written model's tokenizer is the vocab file's: same tokens, attributes (control
        # tokens stay control), tokenization with special tokens, and bos/eos
        model_vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llama_cpp.llama_vocab_n_tokens(model_vocab) == vocab.n_vocab
        attrs = np.array([llama_cpp.llama_vocab_get_attr(model_vocab, t) for t in range(vocab.n_vocab)])
        assert (attrs == vocab.attrs).all()
        controls = [t for t in range(vocab.n_vocab) if vocab.is_control(t)]
        assert controls and all(attrs[t] & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL for t in controls)
        special_text = "<|im_start|>user\n" + TEXT if arch != "gemma4" else "<|turn>user\n" + TEXT
        assert llm.tokenize(special_text.encode(), add_bos=False, special=True) == vocab.tokenize(special_text, True)
        assert (llm.token_bos(), llm.token_eos()) == (vocab.bos_id, vocab.eos_id)
        # the vocab file's chat template, else the arch's own
        template = llm.metadata.get("tokenizer.chat_template")
        has_own = any(kv.key == "tokenizer.chat_template" for kv in vocab.metadata(None))
        assert template and (has_own or template == T.get_arch(arch).chat_template)
    finally:
        llm.close()


def test_real_vocab_model_cache_reuse(model_dir: pathlib.Path) -> None:
    spec = _spec("qwen35")
    path = T.cached_test_model(spec)
    assert path.parent == model_dir
    mtime = path.stat().st_mtime_ns
    assert T.cached_test_model(resolve_spec(None, "tiny", dict(
        SMALL, vocab="qwen35", script=spec.script, script_loop=True, accept=0.75, ftype="f16"))) == path
    assert path.stat().st_mtime_ns == mtime  # not rebuilt
    assert resolve_spec(spec, "tiny", dict(script_loop=False)).key() != spec.key()


@pytest.fixture(scope="module")
def mtp_run():
    """(spec, info, result): MTP generation (one token drafted per step) on the qwen35 script model."""
    import llama_mtp

    spec = _spec("qwen35")
    path, info = T.cached_test_model_info(spec)
    target, draft = llama_mtp.load(str(path), n_draft_max=1, n_ctx=256, n_threads=1, n_threads_batch=1)
    try:
        yield spec, info, llama_mtp.generate(target, draft, [spec.script[0]], max_tokens=3 * len(spec.script),
                                             n_draft=1)
    finally:
        draft.close()
        target.close()


def test_mtp_generation_on_real_vocab(mtp_run) -> None:
    """MTP speculative decoding on a real vocabulary follows the script, drafts as designed."""
    spec, info, res = mtp_run
    assert res.tokens == info.greedy_continuation(spec.script[0], 3 * len(spec.script))
    # each step drafts after the last committed token x, right iff mtp_correct[x]; a right draft
    # commits it and the target's next token, a wrong one the target's token only
    i, accepted = 0, 0
    while i < len(res.tokens) - 1:
        hit = bool(info.mtp_correct[res.tokens[i]])
        accepted += hit
        i += 2 if hit else 1
    assert 0 < res.stats.accepted < res.stats.drafted and abs(res.stats.accepted - accepted) <= 1, (res.stats, accepted)


def test_mtp_text_keeps_long_pieces(mtp_run) -> None:
    _, _, res = mtp_run
    assert res.text.encode() == b"".join(map(T.real_vocab("qwen35").piece, res.tokens))


# ------------------------------------------------------------------------------- demo


def test_demo_script(qwen: T.RealVocab) -> None:
    """The demo model recites DEMO_TEXT in a loop, opening with DEMO_PROMPT and closed by a newline."""
    spec = T.demo_spec()  # a valid spec: every token of the text distinct
    assert (spec.vocab, spec.script_loop, spec.n_vocab) == ("qwen35", True, qwen.n_vocab)
    prompt = qwen.tokenize(T.DEMO_PROMPT)
    assert list(spec.script[:len(prompt)]) == prompt  # the default prompt continues word for word
    assert b"".join(map(qwen.piece, spec.script)).decode() == T.DEMO_TEXT + "\n"
    assert qwen.tokenize("<|im_start|>assistant\n", special=True)[-1] == spec.script[-1]  # chat prompts too


def test_demo_prompt_continues_text(capsys: pytest.CaptureFixture[str]) -> None:
    """`generate` on a tiny demo-script model prints DEMO_TEXT after the default prompt."""
    from llama_mtp import cli

    path = T.cached_test_model(T.demo_spec(**SMALL, size="tiny", n_layer=4, ftype="f16"))
    n = len(T.script_from_text("qwen35", T.DEMO_TEXT)) + 8  # once round the loop and into the next
    assert cli.main(["generate", "-m", str(path), "--max-tokens", str(n), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(T.DEMO_TEXT + "\n" + T.DEMO_PROMPT[:20])
