"""Every MTP family's real chat template, family by family, against llama-server.

For each arch's real template (llama.cpp's models/templates, on the arch's real vocabulary):
- **render**: our prompt equals native ``llama-server``'s ``/apply-template`` answer for the same
  bodies (tools, an agent's tool turn, reasoning in the history, enable_thinking off);
- **parse**: the call the template itself writes into the history parses back into the same
  tool call, whole and streamed in pieces (the deltas add up to the message); thinking in the
  family's own tags splits out into reasoning_content;
- **grammar**: ``tool_choice: "required"``'s grammar accepts that call after the generation
  prompt (tokens fed to llama.cpp's grammar sampler), and refuses a corrupted one;
- **agent**: a model whose greedy reply is that call (scripted on the synthetic vocabulary) calls
  the tool through MtpLlama's chat, streaming and not, under ``tool_choice: "auto"``'s lazy
  grammar, exactly as plain decoding does;
- **agent loop** (every arch's own real template): call -> result -> answer through our server with
  the official openai client, whole and streamed (the answer after the result: a second script the
  test model takes where the result's prompt ends differently, or, ending alike, after its
  switch_marker ``<tool_response>``).

llama-server is built once from the same sources (bench/native.py, several minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import _helpers
from llama_mtp import testing
from llama_mtp.chat_templates import ChatPrompt, ChatTemplates, sampling_plan
from llama_mtp.errors import MtpArgumentError
from llama_mtp.testing.archs import ARCHS

httpx = pytest.importorskip("httpx")

# one model per real template: each arch's own (qwen35moe and qwen3next share qwen35's), plus the
# other releases of two families the issue names
TEMPLATES = {f"{arch}": (arch, layout.real_template_file) for arch, layout in sorted(ARCHS.items())
             if layout.real_template_file and arch not in ("qwen35moe", "qwen3next")}
TEMPLATES.update({"glm4moe-4.7": ("glm4moe", "GLM-4.7-Flash.jinja"),
                  "deepseek2-v3.2": ("deepseek2", "deepseek-ai-DeepSeek-V3.2.jinja")})
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
TOOL_TURN = USER + [{"role": "assistant", "content": "", "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}]
BODIES = {
    "chat": {"messages": [{"role": "system", "content": "You are terse."}] + USER},
    "tools": {"messages": USER, "tools": TOOLS},
    "tool_turn": {"messages": TOOL_TURN, "tools": TOOLS},
    "reasoning_history": {"messages": USER + [
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "It is summer."},
        {"role": "user", "content": "And tomorrow?"}]},
    "thinking_off": {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}},
}


@pytest.fixture(scope="module")
def native_server_binary() -> pathlib.Path:
    from bench import native

    return native.server_binary(quiet=True)


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def family(request, model_dir) -> Tuple[str, str, pathlib.Path]:
    """(arch, template file, a model of the arch on its real vocabulary carrying that template)."""
    arch, template = TEMPLATES[request.param]
    spec = testing.TestModelSpec(arch=arch, vocab=ARCHS[arch].real_vocab, chat_template=template)
    return arch, template, _helpers.build_model(spec, model_dir)


@pytest.fixture(scope="module")
def templates(family) -> Iterator[ChatTemplates]:
    llm = _helpers.plain_llama(family[2], n_ctx=256)
    try:
        yield ChatTemplates(llm)
    finally:
        llm.close()


@contextlib.contextmanager
def native_server(binary: pathlib.Path, model: pathlib.Path, log: pathlib.Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary), "-m", str(model), "--port", str(port), "-c", "512", "-t", "1",
                                 "--no-warmup"], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"llama-server exited:\n{log.read_text(errors='replace')[-3000:]}"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama-server did not start"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_render_equals_llama_server(family, templates, native_server_binary, tmp_path) -> None:
    arch, _, model = family
    with native_server(native_server_binary, model, tmp_path / "llama-server.log") as base:
        for name, body in BODIES.items():
            r = httpx.post(base + "/apply-template", json=body, timeout=60)
            assert r.status_code == 200, f"{arch} {name}: llama-server answered {r.status_code} {r.text[:300]}"
            assert templates.apply(body).prompt == r.json()["prompt"], f"{arch} {name}"


def written_call(templates: ChatTemplates) -> Tuple[ChatPrompt, str]:
    """The tool call as the template itself writes it: the tool turn's render, from the end of the
    generation prompt on (what a reply to USER would be), up to where the turn's history goes on."""
    chat = templates.apply({"messages": USER, "tools": TOOLS})
    history = templates.apply({"messages": TOOL_TURN, "tools": TOOLS}).prompt
    start = len(os.path.commonprefix([chat.prompt, history]))
    if start < len(chat.prompt) and "<" in history[:start] and ">" not in history[history.rfind("<", 0, start):start]:
        # the two part inside a tag (GLM-4.7: the prompt opens <think>, the history closes it): the reply
        # starts with that whole tag
        start = history.rfind("<", 0, start)
    return chat, history[start:]


def parsed_call(chat: ChatPrompt, text: str, pieces: int) -> Dict[str, Any]:
    """The message ``text`` parses to, streamed in ``pieces``; the deltas must add up to it."""
    deltas, final = _helpers.stream_parse(chat, text, pieces)
    args = "".join(tc.get("function", {}).get("arguments", "") for d in deltas for tc in d.get("tool_calls", []))
    names = [tc["function"]["name"] for d in deltas for tc in d.get("tool_calls", []) if tc.get("function", {}).get("name")]
    calls = final.message.get("tool_calls", [])
    assert names == [c["function"]["name"] for c in calls]
    assert args == "".join(c["function"]["arguments"] for c in calls)
    return final.message


def reply_of(chat: ChatPrompt, rest: str) -> str:
    """The shortest prefix of ``rest`` that parses into the call (the turn's own end marker and
    whatever follows it are history, not reply)."""
    for end in range(1, len(rest) + 1):
        with chat.parser(stream=False) as parser:
            calls = parser.update(rest[:end], final=True).message.get("tool_calls", [])
        if [(c["function"]["name"], _json_or_none(c["function"]["arguments"])) for c in calls] == \
                [("get_weather", {"city": "Paris"})]:
            return rest[:end]
    raise AssertionError(f"no prefix of the template's own call parses back into it: {rest!r}")


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def test_the_templates_own_call_parses_back_whole_and_streamed(family, templates) -> None:
    chat, rest = written_call(templates)
    reply = reply_of(chat, rest)
    for pieces in (1, 5, len(reply)):
        (call,) = parsed_call(chat, reply, pieces)["tool_calls"]
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_reasoning_splits_out_whole_and_streamed(family, templates) -> None:
    """A reply that thinks in the family's own tags (the template's answer names them): the
    thinking comes back as reasoning_content, the rest as content, streamed as deltas of each. A
    template upstream finds no thinking in (MiMo-VL's) keeps everything as content."""
    chat = templates.apply({"messages": USER})
    start, ends = chat.raw["thinking_start_tag"], chat.raw["thinking_end_tags"]
    opened = bool(start) and chat.generation_prompt.rstrip().endswith(start.strip())
    reply = ("" if opened else start) + "It is summer." + (ends[0] if ends else "") + "Sunny."
    for pieces in (1, 6, len(reply)):
        deltas, final = _helpers.stream_parse(chat, reply, pieces)
        msg = final.message
        if chat.raw["supports_thinking"]:
            assert (msg["reasoning_content"].strip(), msg["content"]) == ("It is summer.", "Sunny.")
        else:
            assert msg.get("reasoning_content") is None and msg["content"] == reply
        assert "".join(d.get("reasoning_content", "") for d in deltas) == (msg.get("reasoning_content") or "")
        assert "".join(d.get("content", "") for d in deltas) == msg["content"]


def test_required_grammar_accepts_the_templates_own_call(family, templates) -> None:
    arch, _, model = family
    chat, rest = written_call(templates)
    reply = reply_of(chat, rest)
    required = templates.apply({"messages": USER, "tools": TOOLS, "tool_choice": "required"})
    assert required.grammar and not required.grammar_lazy
    llm = _helpers.plain_llama(model, n_ctx=256)
    try:
        grammar, _ = sampling_plan(required, llm)
        assert grammar is not None
        tokens = list(llm.tokenize(reply.encode(), add_bos=False, special=True))
        accepting = type(grammar)(grammar._grammar, lazy=False, patterns=(), tokens=(),
                                  prefill=grammar.prefill + tuple(tokens))
        _free(accepting.make_sampler(_vocab(llm)))
        corrupt = list(llm.tokenize(reply.replace("get_weather", "get_wether").encode(), add_bos=False,
                                    special=True))
        refusing = type(grammar)(grammar._grammar, lazy=False, patterns=(), tokens=(),
                                 prefill=grammar.prefill + tuple(corrupt))
        with pytest.raises(MtpArgumentError, match="grammar"):
            refusing.make_sampler(_vocab(llm))
    finally:
        llm.close()


def _vocab(llm) -> int:
    import ctypes

    import llama_cpp

    return ctypes.cast(llama_cpp.llama_model_get_vocab(llm.model), ctypes.c_void_p).value


def _free(sampler_address: int) -> None:
    import ctypes

    import llama_cpp

    llama_cpp.llama_sampler_free(ctypes.cast(ctypes.c_void_p(sampler_address), llama_cpp.llama_sampler_p_ctypes))


def until_control(text: str, control_texts: List[str]) -> str:
    """``text`` up to its first control token (the turn's end-of-generation and what follows it)."""
    return text[:min([text.find(c) for c in control_texts if c in text] + [len(text)])]


def full_reply(chat: ChatPrompt, rest: str, control_texts: List[str]) -> str:
    """The whole reply the template writes for the call: the longest prefix of ``rest`` that still
    parses into the call and holds no control token (the turn's end-of-generation and after)."""
    rest = until_control(rest, control_texts)
    best = reply_of(chat, rest)
    for end in range(len(best) + 1, len(rest) + 1):
        text = rest[:end]
        with chat.parser(stream=False) as parser:
            calls = parser.update(text, final=True).message.get("tool_calls", [])
        if [(c["function"]["name"], _json_or_none(c["function"]["arguments"])) for c in calls] == \
                [("get_weather", {"city": "Paris"})]:
            best = text
    return best


def chunks_of(first: str, reply: str, taken: Tuple[str, ...] = ()) -> Tuple[str, ...]:
    """``reply`` cut into distinct chunks (lines, a repeated one, or one in ``taken``, joined to the
    next), after ``first`` (the prompt's last token, where greedy decoding picks up the script)."""
    lines = reply.splitlines(keepends=True)
    out: List[str] = [first]
    pending = ""
    for line in lines:
        pending += line
        if pending not in out and pending not in taken:
            out.append(pending)
            pending = ""
    if pending:
        out[-1] += pending
    return tuple(out)


def control_texts(llm) -> List[str]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    texts = [llm.detokenize([i], special=True).decode("utf-8", "replace") for i in range(llm.n_vocab())
             if llama_cpp.llama_vocab_is_control(vocab, i)]
    return [t for t in texts if t]


def prompt_end(llm, prompt: str) -> Tuple[int, str]:
    """The prompt's last token and its text where it is ordinary ("" for a special one).

    A special token as the prompt's end (a turn marker, <think>) leads into the script by itself (the
    generator's specials alias the script's predecessor); an ordinary one is the script's first chunk."""
    import llama_cpp

    last = llm.tokenize(prompt.encode(), add_bos=False, special=True)[-1]
    ordinary = llama_cpp.llama_vocab_get_attr(llama_cpp.llama_model_get_vocab(llm.model), last) & \
        llama_cpp.LLAMA_TOKEN_ATTR_NORMAL
    return last, llm.detokenize([last]).decode() if ordinary else ""


def model_files(spec: testing.TestModelSpec, model_dir) -> Dict[str, str]:
    """The model of ``spec`` as MtpLlama's (and the server's) model_path / draft_model_path."""
    if not ARCHS[spec.arch].has_mtp_heads:  # gemma4: its MTP drafter is an assistant GGUF of its own
        from llama_mtp.testing.archs import gemma4

        with _helpers.models_cache(model_dir):
            target, assistant, _ = gemma4.cached_gemma4_pair(spec)
        return {"model_path": str(target), "draft_model_path": str(assistant)}
    return {"model_path": str(_helpers.build_model(spec, model_dir))}


@pytest.fixture(scope="module")
def agent_model(family, model_dir) -> Dict[str, str]:
    """A model of the family's arch (synthetic vocabulary, real template) whose greedy reply to USER is
    the template's own call of get_weather, then end-of-generation."""
    arch, template, _ = family
    bare = _helpers.build_model(testing.TestModelSpec(arch=arch, chat_template=template), model_dir)
    llm = _helpers.plain_llama(bare, n_ctx=512)
    try:
        with ChatTemplates(llm) as t:
            chat, rest = written_call(t)
        reply = full_reply(chat, rest, control_texts(llm))
        first = prompt_end(llm, chat.prompt)[1]
    finally:
        llm.close()
    chunks = chunks_of(first, reply)[0 if first else 1:]
    return model_files(testing.TestModelSpec(arch=arch, chat_template=template, script_text=chunks, script_eos=True),
                       model_dir)


def test_the_model_calls_the_tool_streaming_and_not_as_plain_decoding_does(family, agent_model) -> None:
    import llama_mtp

    kwargs = dict(tools=TOOLS, temperature=0, max_tokens=96)
    with contextlib.closing(llama_mtp.MtpLlama(**agent_model, n_ctx=4096, verbose=False)) as llm, \
            contextlib.closing(llama_mtp.MtpLlama(**agent_model, n_ctx=4096, verbose=False, n_draft=0)) as plain:
        out = llm.create_chat_completion(USER, **kwargs)
        (call,) = out["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert out["choices"][0]["finish_reason"] == "tool_calls"
        ref = plain.create_chat_completion(USER, **kwargs)
        assert {k: v for k, v in ref["choices"][0]["message"].items() if k != "tool_calls"} == \
            {k: v for k, v in out["choices"][0]["message"].items() if k != "tool_calls"}
        assert [c["function"] for c in ref["choices"][0]["message"]["tool_calls"]] == [call["function"]]
        assert out["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
        if out["usage"]["completion_tokens"] > 2:  # a reply of one chunk token leaves nothing to draft
            assert out["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0
        chunks = list(llm.create_chat_completion(USER, stream=True, **kwargs))
        streamed = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
        assert streamed[0]["function"]["name"] == "get_weather" and streamed[0]["id"]
        assert json.loads("".join(tc.get("function", {}).get("arguments", "") for tc in streamed)) == {"city": "Paris"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ------------------------------------------------------------------------- the agent loop, over HTTP

PARALLEL = [dict(CALL, id="call_1"), {"id": "call_2", "type": "function",
                                      "function": {"name": "get_weather", "arguments": json.dumps({"city": "Rome"})}}]


def test_agent_loop_through_the_server_with_the_openai_client(model_dir, tmp_path) -> None:
    """qwen35's format through a real server and the official client: the model calls the tool
    (whole and streamed, ``finish_reason: "tool_calls"``), the client sends the result and gets an
    answer rendered from that history; a reply with two calls comes back as two parallel calls."""
    openai = pytest.importorskip("openai")
    from test_server import ServerProcess

    bare = _helpers.build_model(testing.TestModelSpec(arch="qwen35", chat_template="real"), model_dir)
    llm = _helpers.plain_llama(bare, n_ctx=512)
    try:
        with ChatTemplates(llm) as t:
            chat = t.apply({"messages": USER, "tools": TOOLS})
            two = t.apply({"messages": USER + [{"role": "assistant", "content": "", "tool_calls": PARALLEL},
                                               {"role": "tool", "tool_call_id": "call_1", "content": "x"}],
                           "tools": TOOLS}).prompt
    finally:
        llm.close()
    # the reply the template writes for two calls, cut at its end-of-turn marker
    reply = two[len(os.path.commonprefix([chat.prompt, two])):two.index("<|im_end|>", len(chat.prompt))]
    spec = testing.TestModelSpec(arch="qwen35", chat_template="real", script_eos=True,
                                 script_text=chunks_of("\n", reply))
    srv = ServerProcess(_helpers.build_model(spec, model_dir), tmp_path / "server.log", "--n_ctx", "8192",
                        chat_format=None)
    try:
        srv.wait_ready()
        client = srv.client()
        model = client.models.list().data[0].id
        first = client.chat.completions.create(model=model, messages=USER, tools=TOOLS, temperature=0,
                                               parallel_tool_calls=True, max_tokens=128)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
            [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
        assert len({c.id for c in calls}) == 2
        stream = list(client.chat.completions.create(model=model, messages=USER, tools=TOOLS, temperature=0,
                                                     parallel_tool_calls=True, max_tokens=128, stream=True))
        deltas = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        by_index: Dict[int, str] = {}
        for tc in deltas:
            by_index[tc.index] = by_index.get(tc.index, "") + (tc.function.arguments or "")
        assert {i: json.loads(a) for i, a in by_index.items()} == {0: {"city": "Paris"}, 1: {"city": "Rome"}}
        assert stream[-1].choices[0].finish_reason == "tool_calls"
        # the agent sends the results back: the history renders (the bigram test model answers as it
        # always does: with the same calls) and is served
        history = USER + [choice.message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": c.id, "content": f"sunny in {json.loads(c.function.arguments)['city']}"}
            for c in calls]
        nxt = client.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=128)
        assert nxt.choices[0].finish_reason == "tool_calls" and nxt.usage.prompt_tokens > first.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model, messages=history, tools=[{"type": "function"}], max_tokens=8)
    finally:
        srv.stop()


ANSWER = "It is sunny in Paris, 24 C."
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}
# the tag a tool result comes in: a token of its own in the real vocabularies (an added token), and
# in the test model's the switch_marker that turns its greedy reply from the call to the answer
MARKER = "<tool_response>"


def agent_loop_spec(arch: str, template: str, model_dir) -> testing.TestModelSpec:
    """A model of ``arch`` (synthetic vocabulary, ``template``) that runs an agent's loop: its greedy
    reply to USER is the template's own call of get_weather, and after the tool's result the
    template's own assistant turn saying ANSWER, each then end-of-generation.

    Where the result's prompt ends on a token of its own (Gemma 4, DeepSeek-V3.1), the answer is a
    chain of its own starting there; where it ends like the first prompt, the answer's chunks part
    from the call's after those they share, once MARKER (in the result's prompt only) was read."""
    bare = _helpers.build_model(testing.TestModelSpec(arch=arch, chat_template=template), model_dir)
    llm = _helpers.plain_llama(bare, n_ctx=512)
    try:
        with ChatTemplates(llm) as t:
            chat, rest = written_call(t)
            history = USER + [{"role": "assistant", "content": "", "tool_calls": [CALL]}, RESULT]
            second = t.apply({"messages": history, "tools": TOOLS}).prompt
            answered = t.apply({"messages": history + [{"role": "assistant", "content": ANSWER}], "tools": TOOLS}).prompt
        controls = control_texts(llm)
        call = full_reply(chat, rest, controls)
        answer = until_control(answered[len(os.path.commonprefix([second, answered])):], controls)
        (end1, first), (end2, first2) = prompt_end(llm, chat.prompt), prompt_end(llm, second)
    finally:
        llm.close()
    script = chunks_of(first, call)[0 if first else 1:]
    base = dict(arch=arch, chat_template=template, script_text=script, script_eos=True)
    if end2 != end1 and first2:
        return testing.TestModelSpec(**base, more_scripts_text=((first2, *chunks_of("", answer, script)[1:]),))
    assert MARKER in second and MARKER not in chat.prompt
    # the answer may open like the call (the think block both start with): greedy follows those chunks
    # either way, and the two part after the last of them
    shared, text = 0, first + answer
    while shared < len(script) and text.startswith(script[shared]) and len(script[shared]) < len(text):
        text = text[len(script[shared]):]
        shared += 1
    return testing.TestModelSpec(**base, switch_marker=MARKER,
                                 more_scripts_text=(script[:shared] + chunks_of("", text, script)[1:],))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_agent_loop_call_result_answer(arch: str, model_dir, tmp_path) -> None:
    """An agent's whole loop through the server with the official client, in every arch's real
    template: the model calls the tool (``finish_reason: "tool_calls"``), the client sends the result
    and gets the answer (``"stop"``), whole and streamed; MTP drafting on (gemma4: its assistant GGUF)."""
    pytest.importorskip("openai")
    from test_server import ServerProcess

    files = model_files(agent_loop_spec(arch, ARCHS[arch].real_template_file, model_dir), model_dir)
    extra = ["--draft_model_path", files["draft_model_path"]] if "draft_model_path" in files else []
    srv = ServerProcess(pathlib.Path(files["model_path"]), tmp_path / "server.log", "--n_ctx", "8192", *extra,
                        chat_format=None)
    try:
        srv.wait_ready()
        client = srv.client()
        model = client.models.list().data[0].id
        for stream in (False, True):
            kwargs = dict(model=model, tools=TOOLS, temperature=0, max_tokens=96, stream=stream)
            out = client.chat.completions.create(messages=USER, **kwargs)
            if not stream and out.usage.completion_tokens > 2:  # a reply of one chunk token leaves nothing to draft
                assert out.usage.completion_tokens_details.accepted_prediction_tokens > 0
            message, finish = _reply(out, stream)
            assert finish == "tool_calls", (stream, message)
            (tc,) = message["tool_calls"]
            assert tc["function"]["name"] == "get_weather" and json.loads(tc["function"]["arguments"]) == {"city": "Paris"}
            history = USER + [message, dict(RESULT, tool_call_id=tc["id"])]
            message, finish = _reply(client.chat.completions.create(messages=history, **kwargs), stream)
            assert (message.get("content"), finish) == (ANSWER, "stop"), (stream, message)
            assert not message.get("tool_calls")
    finally:
        srv.stop()


def _reply(out, stream: bool) -> Tuple[Dict[str, Any], str]:
    """(the assistant message as a history entry, finish_reason) of a completion, whole or streamed."""
    if not stream:
        return out.choices[0].message.model_dump(exclude_none=True), out.choices[0].finish_reason
    chunks = [c for c in out if c.choices]
    message: Dict[str, Any] = {"role": "assistant", "content": "".join(c.choices[0].delta.content or "" for c in chunks)}
    calls: Dict[int, Dict[str, Any]] = {}
    for tc in (tc for c in chunks for tc in c.choices[0].delta.tool_calls or []):
        call = calls.setdefault(tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = tc.id or call["id"]
        if tc.function:
            call["function"]["name"] += tc.function.name or ""
            call["function"]["arguments"] += tc.function.arguments or ""
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, chunks[-1].choices[0].finish_reason
