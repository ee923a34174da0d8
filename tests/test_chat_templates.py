"""Chats formatted and parsed by llama.cpp's own chat code (common/chat.cpp through the shim), as
llama-server does it: reasoning split into reasoning_content, tool calls parsed from each family's
format (streamed as OpenAI deltas), tool-call grammars, and the errors a bad request gets.

The model is a qwen35 on Qwen's real vocabulary carrying Qwen3.5's real template; its greedy
reply to any chat is a scripted thinking block and answer, then end-of-generation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from typing import Any, Dict, Iterator

import pytest

import _helpers
import llama_mtp
from llama_mtp import testing
from llama_mtp.chat_templates import ChatTemplates
from llama_mtp.testing.real_vocab import distinct_script, real_vocab, vocab_dir

THINKING = "Let me check the weather."
ANSWER = "It is sunny in Paris today."
REPLY = f"{THINKING}\n</think>\n\n{ANSWER}"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
# the next turn of an agent: the assistant's call (arguments as OpenAI sends them, a JSON string) and its result
TOOL_TURN = USER + [
    {"role": "assistant", "content": "", "reasoning_content": THINKING,
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
]


def scripted_spec() -> testing.TestModelSpec:
    vocab = real_vocab("qwen35")
    # the generation prompt "<|im_start|>assistant\n<think>\n" ends in this token: greedy goes on with the script
    gen_end = vocab.tokenize("<|im_start|>assistant\n<think>\n", special=True)[-1]
    script = (gen_end,) + distinct_script("qwen35", REPLY, avoid=[gen_end])
    return testing.TestModelSpec(arch="qwen35", vocab="qwen35", chat_template="real", script=script,
                                 script_eos=True)


@pytest.fixture(scope="module")
def chat_model(model_dir) -> pathlib.Path:
    return _helpers.build_model(scripted_spec(), model_dir)


@pytest.fixture(scope="module")
def llm(chat_model) -> Iterator[llama_mtp.MtpLlama]:
    with contextlib.closing(llama_mtp.MtpLlama(str(chat_model), n_ctx=1024, verbose=False, n_threads=1,
                                               n_threads_batch=1)) as m:
        yield m


def template(name: str) -> str:
    return (vocab_dir() / "templates" / name).read_text()


# ------------------------------------------------------------------------- rendering


def test_the_models_template_is_qwen35s_and_loads_with_llama_cpp(llm) -> None:
    info = llm.mtp_chat_templates.info()
    assert info["source"] == template("Qwen3.5-4B.jinja")
    assert info["caps"]["supports_tool_calls"] and info["supports_thinking"]


def test_a_tool_turn_renders_arguments_as_the_template_reads_them(llm) -> None:
    """The template iterates arguments|items: llama-server hands it the parsed object (the old path
    gave it the JSON string and failed with HTTP 500)."""
    prompt = llm.mtp_chat_templates.apply({"messages": TOOL_TURN, "tools": TOOLS}).prompt
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in prompt
    assert "<tool_response>\nsunny, 24 C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert '"name": "get_weather"' in prompt  # the tools block of the system turn


def test_template_kwargs_and_generation_prompt(llm) -> None:
    t = llm.mtp_chat_templates
    off = t.apply({"messages": USER, "chat_template_kwargs": {"enable_thinking": False}})
    assert off.prompt.endswith("<think>\n\n</think>\n\n") and not off.enable_thinking
    assert t.apply({"messages": USER, "reasoning_effort": "none"}).prompt == off.prompt
    no_gen = t.apply({"messages": USER, "add_generation_prompt": False}).prompt
    assert no_gen.endswith("<|im_end|>\n") and "assistant" not in no_gen


def test_user_spans_are_llama_servers_message_spans(llm) -> None:
    """Where each user message of the tokenized prompt starts and ends (the slot cache checkpoints
    at the starts): upstream's message delimiters, split on the prompt's tokens. Qwen's template
    renders a tool result as a user turn, so it is one too."""
    from llama_mtp.chat_templates import user_spans
    from llama_mtp.core import tokenize_prompt

    body = {"messages": [{"role": "system", "content": "You are terse."}] + TOOL_TURN
            + [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And tomorrow?"}],
            "tools": TOOLS}
    chat = llm.mtp_chat_templates.apply(body)
    tokens = tokenize_prompt(llm, chat.prompt)
    spans = user_spans(chat, llm, tokens)
    user_open = llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)
    turn_open = llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    starts = [i for i in range(len(tokens)) if tokens[i:i + len(user_open)] == user_open]
    assert [start for start, _ in spans] == starts and len(starts) == 3  # the question, the tool result, the last
    for start, end in spans:  # each runs to the next message's opening (the assistant's)
        assert tokens[end:end + len(turn_open)] == turn_open and turn_open[0] not in tokens[start + 1:end]
    assert chat.prompt.endswith("<|im_start|>assistant\n<think>\n")  # the last one ends at the generation prompt
    assert llm.detokenize(tokens[spans[-1][1]:], special=True).decode() == "<|im_start|>assistant\n<think>\n"


# ------------------------------------------------------------------------- replies


def test_reasoning_is_split_out_streaming_and_not(llm) -> None:
    out = llm.create_chat_completion(USER, temperature=0, max_tokens=64)
    msg = out["choices"][0]["message"]
    assert msg["content"] == ANSWER and msg["reasoning_content"].strip() == THINKING
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks = list(llm.create_chat_completion(USER, temperature=0, max_tokens=64, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content") or "" for d in deltas) == msg["content"]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == msg["reasoning_content"]
    assert sum(1 for d in deltas if d.get("reasoning_content")) > 1  # streamed, not sent at the end
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_reasoning_format_none_keeps_the_think_block_in_content(llm) -> None:
    msg = llm.create_chat_completion(USER, temperature=0, max_tokens=64, reasoning_format="none")["choices"][0]["message"]
    assert msg.get("reasoning_content") is None and msg["content"].endswith(ANSWER) and "</think>" in msg["content"]


def test_mtp_output_under_a_tool_grammar_equals_plain_decoding(llm) -> None:
    """tool_choice="required" forces a call through the template's grammar (not lazy: the generation
    prompt is prefilled into it); drafts are verified against the constrained target, so the greedy
    text is plain decoding's, token for token."""
    kwargs = dict(tools=TOOLS, tool_choice="required", temperature=0, max_tokens=48)
    chat = llm.mtp_chat_templates.apply({"messages": USER, "tools": TOOLS, "tool_choice": "required"})
    assert chat.grammar and not chat.grammar_lazy and chat.grammar_type == "tool_calls"
    mtp = llm.create_chat_completion(USER, **kwargs)
    with contextlib.closing(llama_mtp.MtpLlama(llm.model_path, n_draft=0, n_ctx=1024, verbose=False, n_threads=1,
                                               n_threads_batch=1)) as plain_llm:
        plain = plain_llm.create_chat_completion(USER, **kwargs)
    assert mtp["choices"][0]["message"] == plain["choices"][0]["message"]
    assert mtp["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert mtp["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0


def test_auto_tool_choice_uses_a_lazy_grammar_with_triggers(llm) -> None:
    chat = llm.mtp_chat_templates.apply({"messages": USER, "tools": TOOLS})
    assert chat.grammar_lazy and chat.grammar_triggers and chat.parse_tool_calls
    out = llm.create_chat_completion(USER, tools=TOOLS, temperature=0, max_tokens=64)
    # no trigger in this reply: the lazy grammar never starts, the reply is the model's own
    assert out["choices"][0]["message"]["content"] == ANSWER


# ------------------------------------------------------------------------- parsing recorded outputs

QWEN_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
             "</tool_call>")


def parse(templates: ChatTemplates, text: str, *, pieces: int = 1, **body: Any) -> Dict[str, Any]:
    """Parse a recorded reply as a stream of ``pieces`` chunks; check the deltas add up to the message."""
    chat = templates.apply({"messages": USER, "tools": TOOLS, **body})
    deltas, final = _helpers.stream_parse(chat, text, pieces)
    msg = final.message
    assert "".join(d.get("content") or "" for d in deltas) == (msg.get("content") or "")
    calls: Dict[int, Dict[str, str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] += tc.get("id", "")
            call["name"] += tc.get("function", {}).get("name", "")
            call["arguments"] += tc.get("function", {}).get("arguments", "")
    assert [calls[i] for i in sorted(calls)] == [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in msg.get("tool_calls", [])]
    return msg


def test_qwen35_tool_call_parses_whole_and_streamed(llm) -> None:
    for pieces in (1, 7, 40):
        msg = parse(llm.mtp_chat_templates, f"{THINKING}\n</think>\n\n{QWEN_CALL}", pieces=pieces)
        assert msg["reasoning_content"].strip() == THINKING and not msg.get("content")
        (call,) = msg["tool_calls"]
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert call["id"]


def test_qwen35_parallel_tool_calls(llm) -> None:
    second = QWEN_CALL.replace("Paris", "Rome")
    msg = parse(llm.mtp_chat_templates, f"{THINKING}\n</think>\n\n{QWEN_CALL}\n{second}", pieces=9,
                parallel_tool_calls=True)
    assert [json.loads(c["function"]["arguments"])["city"] for c in msg["tool_calls"]] == ["Paris", "Rome"]
    assert len({c["id"] for c in msg["tool_calls"]}) == 2


@pytest.mark.parametrize("name,reply", [
    ("GLM-4.6.jinja", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"),
    # thinking on: the generation prompt opens <think>, the reply closes it
    ("deepseek-ai-DeepSeek-V3.1.jinja", "Checking.</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather"
                                        '<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
])
def test_other_families_tool_calls_parse(chat_model, name, reply) -> None:
    plain = _helpers.plain_llama(chat_model, n_ctx=64)
    try:
        with ChatTemplates(plain, override=template(name)) as t:
            msg = parse(t, reply, pieces=5)
    finally:
        plain.close()
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_a_reply_that_breaks_its_format_comes_back_as_content(llm, caplog) -> None:
    # a call in another syntax: upstream's lenient parser would drop it without a word
    broken = f"{THINKING}\n</think>\n\n<tool_call>\nget_weather(city=Paris)\n</tool_call>"
    chat = llm.mtp_chat_templates.apply({"messages": USER, "tools": TOOLS})
    with caplog.at_level(logging.WARNING, logger="llama_mtp.chat"), chat.parser(stream=False) as parser:
        final = parser.update(broken, final=True)
    assert final.parse_error and not final.has_tool_calls
    assert final.message["content"] == broken[broken.index("<tool_call>"):]
    assert final.message["reasoning_content"].strip() == THINKING
    assert [r for r in caplog.records if "does not follow" in r.getMessage()]


# ------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("body,match", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
    ({"tools": [{"type": "function"}]}, "function"),
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"chat_template_kwargs": "x"}, "chat_template_kwargs"),
    ({"messages": "hi"}, "array"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "No user query found"),  # the template raises
])
def test_bad_requests_raise_a_typed_error_and_leave_the_model_usable(llm, body, match) -> None:
    with pytest.raises(llama_mtp.MtpArgumentError, match=match):
        llm.mtp_chat_templates.apply({"messages": USER, **body})
    assert llm.create_chat_completion(USER, temperature=0, max_tokens=64)["choices"][0]["message"]["content"] == ANSWER


def test_a_named_tool_is_the_only_one_offered_and_required(llm) -> None:
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    named = llm.mtp_chat_templates.apply({"messages": USER, "tools": TOOLS + [other],
                                          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    required = llm.mtp_chat_templates.apply({"messages": USER, "tools": TOOLS, "tool_choice": "required"})
    assert named.prompt == required.prompt and named.grammar == required.grammar


# ------------------------------------------------------------------------- the server, with the openai client


@pytest.fixture(scope="module")
def chat_server(chat_model, tmp_path_factory):
    from test_server import ServerProcess

    srv = ServerProcess(chat_model, tmp_path_factory.mktemp("chat") / "server.log", "--n_ctx", "2048",
                        chat_format=None)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_server_splits_reasoning_and_renders_tool_turns(chat_server, llm) -> None:
    openai = pytest.importorskip("openai")
    client = chat_server.client()
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=USER, tools=TOOLS, temperature=0, max_tokens=64)
    msg = out.choices[0].message
    assert msg.content == ANSWER and msg.model_extra["reasoning_content"].strip() == THINKING
    assert out.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=model, messages=USER, tools=TOOLS, temperature=0,
                                                 max_tokens=64, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                   for c in chunks if c.choices).strip() == THINKING
    # the agent's next turn: its call and the tool's result (HTTP 500 before llama.cpp's templates)
    nxt = client.chat.completions.create(model=model, messages=TOOL_TURN, tools=TOOLS, temperature=0, max_tokens=64)
    assert nxt.choices[0].message.content == ANSWER
    httpx = pytest.importorskip("httpx")
    r = httpx.post(chat_server.base + "/apply-template", json={"messages": TOOL_TURN, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200
    assert r.json()["prompt"] == llm.mtp_chat_templates.apply({"messages": TOOL_TURN, "tools": TOOLS}).prompt
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model=model, messages=USER, tools=TOOLS, max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_a_generated_call_that_breaks_the_grammar_ends_the_reply_as_content(model_dir, caplog) -> None:
    """A token that triggers the lazy tool-call grammar and goes on with text its rules refuse: llama.cpp's
    grammar throws on it (which would abort the process); the reply ends there, comes back as content
    with a log line, and the model keeps serving."""
    broken = "<tool_call>\nget_weather(Paris)\n</tool_call>"
    spec = testing.TestModelSpec(arch="qwen35", chat_template="real", script_eos=True,
                                 script_text=("\n", "Checking.\n</think>\n\n", broken))
    path = _helpers.build_model(spec, model_dir)
    with contextlib.closing(llama_mtp.MtpLlama(str(path), n_ctx=4096, verbose=False)) as llm, \
            caplog.at_level(logging.WARNING):
        for _ in range(2):  # and again: nothing broke
            out = llm.create_chat_completion(USER, tools=TOOLS, temperature=0, max_tokens=32)
            msg = out["choices"][0]["message"]
            assert msg["content"] == broken and not msg.get("tool_calls")
            assert msg["reasoning_content"].strip() == "Checking."
            assert out["choices"][0]["finish_reason"] == "stop"
    assert [r for r in caplog.records if "grammar refused" in r.getMessage()]
    assert [r for r in caplog.records if "does not follow" in r.getMessage()]


def test_a_template_llama_cpp_cannot_load_falls_back_to_llama_cpp_pythons_handler(oracle_model, tmp_path,
                                                                               caplog) -> None:
    """jinja2 takes ``{% with %}``, llama.cpp's jinja engine does not: such a GGUF still loads, with
    one warning, and chats go through llama-cpp-python's handler (llama-server would not start)."""
    path = _helpers.rewrite_model(oracle_model, tmp_path / "with.gguf", chat_template=(
        "{% for m in messages %}{% with c = m['content'] %}<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n"
        "{% endwith %}{% endfor %}<|im_start|>assistant\n"))
    with caplog.at_level(logging.WARNING, logger="llama_mtp.chat"), \
            contextlib.closing(llama_mtp.MtpLlama(str(path), n_ctx=256, verbose=False)) as llm, \
            contextlib.closing(_helpers.plain_llama(path, n_ctx=256)) as plain:
        assert llm.mtp_chat_templates is None
        got = llm.create_chat_completion(USER, max_tokens=8, temperature=0)
        want = plain.create_chat_completion(USER, max_tokens=8, temperature=0)
        _helpers.assert_capped_like_plain(got, want, 8)  # llama-cpp-python's handler, its formatting
    assert [r for r in caplog.records if "cannot load the model's chat template" in r.getMessage()]
