"""MtpLlama is a drop-in llama_cpp.Llama: same outputs and dict shapes, MTP inside."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Tuple

import llama_cpp
import pytest

import llama_mtp
from llama_mtp import testing

import _helpers

CTX = dict(n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)


@pytest.fixture(scope="module")
def pair() -> Iterator[Tuple[llama_mtp.MtpLlama, llama_cpp.Llama]]:
    path = str(testing.cached_test_model(testing.TestModelSpec(recipe="context", accept=0.8)))
    llm = llama_mtp.MtpLlama(path, n_draft=3, **CTX)
    plain = llama_cpp.Llama(path, **CTX)
    yield llm, plain
    llm.close()
    plain.close()


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=0.9, seed=7)])
def test_completion_matches_plain(pair, kwargs) -> None:
    llm, plain = pair
    got = llm.create_completion("Hello there", max_tokens=40, **kwargs)
    want = plain.create_completion("Hello there", max_tokens=40, **kwargs)
    _helpers.assert_capped_like_plain(got, want, 40)
    assert set(want) <= set(got) and set(want["usage"]) <= set(got["usage"])
    details = got["usage"]["completion_tokens_details"]
    stats = llm.last_mtp_stats
    assert stats is not None and stats.drafted > 0
    assert details["accepted_prediction_tokens"] == stats.accepted
    streamed = "".join(c["choices"][0]["text"] for c in llm.create_completion("Hello there", max_tokens=40, stream=True, **kwargs))
    assert streamed == got["choices"][0]["text"]
    assert llm("Hello there", max_tokens=40, **kwargs)["choices"][0]["text"] == got["choices"][0]["text"]


def test_max_tokens_is_a_hard_cap_on_every_path(pair) -> None:
    """A max_tokens that ends inside a UTF-8 character: plain llama-cpp-python generates on (this
    byte-level model emits lead bytes), MtpLlama stops at max_tokens, plain or streamed, with
    generate()'s tokens and text, and the partial character dropped."""
    llm, plain = pair
    target, draft = llama_mtp.load(llm.model_path, n_draft_max=3, **CTX)
    overshot = 0
    try:
        for m in range(1, 24):
            want = plain.create_completion("Hello there", max_tokens=m, temperature=0.0)
            overshot += want["usage"]["completion_tokens"] > m
            got = llm.create_completion("Hello there", max_tokens=m, temperature=0.0)
            chunks = list(llm.create_completion("Hello there", max_tokens=m, temperature=0.0, stream=True))
            res = llama_mtp.generate(target, draft, "Hello there", max_tokens=m, n_draft=3)
            assert got["usage"]["completion_tokens"] == len(res.tokens) == m
            assert got["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks) == res.text
            assert got["choices"][0]["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert want["choices"][0]["text"].startswith(res.text)
    finally:
        draft.close()
        target.close()
    assert overshot, "some max_tokens must end inside a character for this test to test the cap"


def test_chat_completion_shape(pair) -> None:
    """A GGUF template formats chats as llama-server does (its <think> block split out): the reply
    is plain llama-cpp-python's greedy completion of the template's prompt, parsed by the template's
    parser."""
    llm, plain = pair
    msgs = [{"role": "user", "content": "hi"}]
    chat = llm.mtp_chat_templates.apply({"messages": msgs})
    assert chat.prompt.endswith("<think>\n") and chat.prompt.startswith("<|im_start|>user\nhi")
    got = _helpers.assert_chat_like_plain(llm, plain, msgs, 12)
    msg = got["choices"][0]["message"]
    assert msg["reasoning_content"].strip() and not msg["content"]  # the model never closes its <think>
    assert got["object"] == "chat.completion"


def test_chat_format_named_keeps_llama_cpp_pythons_handler(oracle_model) -> None:
    """chat_format= names llama-cpp-python's handler: its formatting and message shapes, unchanged."""
    with contextlib.closing(llama_mtp.MtpLlama(str(oracle_model), n_ctx=256, verbose=False, chat_format="chatml")) as llm, \
            contextlib.closing(_helpers.plain_llama(oracle_model, n_ctx=256, chat_format="chatml")) as plain:
        assert llm.mtp_chat_templates is None
        msgs = [{"role": "user", "content": "hi"}]
        got = llm.create_chat_completion(msgs, max_tokens=12, temperature=0.0)
        want = plain.create_chat_completion(msgs, max_tokens=12, temperature=0.0)
        assert got["choices"][0]["message"] == want["choices"][0]["message"]
        with pytest.raises(llama_mtp.MtpArgumentError, match="chat_template_kwargs"):
            llm.create_chat_completion(msgs, chat_template_kwargs={"enable_thinking": False})


def test_unsupported_features_fall_back_to_plain(pair) -> None:
    llm, plain = pair
    seen = []

    def processor(input_ids, scores):  # a per-token Python hook MTP cannot batch
        seen.append(len(input_ids))
        return scores

    got = llm.create_completion("Hello", max_tokens=8, temperature=0.0, logits_processor=[processor])
    want = plain.create_completion("Hello", max_tokens=8, temperature=0.0)
    _helpers.assert_capped_like_plain(got, want, 8)
    assert seen and llm.last_mtp_stats is None


def test_close_frees_everything_once() -> None:
    path = str(testing.cached_test_model(testing.TestModelSpec(recipe="oracle", accept=1.0)))
    llm = llama_mtp.MtpLlama(path, n_draft=2, **CTX)
    llm.create_completion("abc", max_tokens=4, temperature=0.0)
    draft = llm.mtp_draft
    llm.close()
    llm.close()
    assert draft._ctx.ctx is None and llm._ctx.ctx is None


def test_model_without_mtp_heads_is_refused(no_mtp_model) -> None:
    """A GGUF without MTP blocks (nextn_predict_layers = 0) is refused with a message naming the problem."""
    with pytest.raises(llama_mtp.MtpInitError) as e:
        llama_mtp.MtpLlama(str(no_mtp_model), n_draft=2, **CTX)
    assert str(e.value).startswith(f"{no_mtp_model} (architecture 'qwen35') has no MTP heads (nextn_predict_layers = 0)")


def test_model_llama_cpp_cannot_load_raises_init_error(oracle_model) -> None:
    """Overriding nextn_predict_layers to 0 does NOT strip the MTP head: llama.cpp then takes
    the MTP block for an ordinary trunk layer, misses its recurrent tensors and fails to load
    the file; that failure comes back as MtpInitError naming the file."""
    kv = {"qwen35.nextn_predict_layers": 0}
    with pytest.raises(llama_mtp.MtpInitError, match=f"^llama.cpp could not load {re.escape(str(oracle_model))}"):
        llama_mtp.MtpLlama(str(oracle_model), n_draft=2, kv_overrides=kv, **CTX)
