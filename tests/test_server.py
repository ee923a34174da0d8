"""The OpenAI-compatible server (``python -m llama_mtp.server``), driven over HTTP.

Servers run in subprocesses on 127.0.0.1 (a free port each) on a tiny generated
model, and are driven with the official ``openai`` client and, for raw error
cases, with httpx. Outputs are checked against plain llama-cpp-python on the
same file: greedy text must be identical, whatever the engine batches or drafts.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

import _helpers
from llama_mtp import testing

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

HOST = "127.0.0.1"
API_KEY = "sk-test-key"
SPEC = testing.TestModelSpec(recipe="context", accept=0.8)
# llama_cpp.server's request defaults, which our server keeps: a plain reference call needs them too
SERVER_SAMPLING = dict(top_p=0.95, min_p=0.05, top_k=40, repeat_penalty=1.1)
N_CTX_SLOT = 512  # the shared server: --n_ctx 2048 over --n_parallel 4
STARTUP_S = 120
# one thread: ggml's threads spin-wait for each other, so on a busy machine (other test runs) a 2-thread
# decode can crawl; outputs do not depend on the thread count
THREADS = "1"


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m llama_mtp.server`` in a subprocess; always killed by stop()."""

    def __init__(self, model: pathlib.Path, log_path: pathlib.Path, *extra: str, api_key: Optional[str] = None,
                 chat_format: Optional[str] = "chatml") -> None:
        self.port = _free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        cmd = [sys.executable, "-m", "llama_mtp.server", "--model", str(model), "--host", HOST,
               "--port", str(self.port), "--n_threads", THREADS, "--n_threads_batch", THREADS, "--verbose", "false",
               *(["--chat_format", chat_format] if chat_format else []), *extra]
        if api_key:
            cmd += ["--api_key", api_key]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_helpers.REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(_helpers.REPO_ROOT),
                                     env=env)

    @property
    def headers(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.base + "/v1/models", headers=self.headers, timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server was not ready within {STARTUP_S} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.api_key or "unused", max_retries=0,
                             timeout=120)

    # -- observability --------------------------------------------------------------------

    def metrics(self) -> Dict[Tuple[str, frozenset], float]:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        out: Dict[Tuple[str, frozenset], float] = {}
        for fam in prometheus_parser.text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def health(self) -> Dict[str, Any]:
        return httpx.get(self.base + "/health", timeout=10).json()

    def wait_until(self, what: str, ready: Callable[[], Any], timeout: float = 30) -> Any:
        """Poll ``ready()`` until it returns something true, and return that; after ``timeout``
        seconds fail, naming ``what`` (a state the test needs, never a delay it hopes is enough)."""
        return _helpers.wait_for(what, ready, timeout, detail=lambda: f" (health: {self.health()})\n{self.log()}")

    def quiesce(self, timeout: float = 30) -> None:
        """Wait until no request runs or waits."""
        self.wait_until("no request running or waiting", lambda: self.load() == (0, 0), timeout)

    def load(self) -> Tuple[int, int]:
        """(running, waiting) requests, as /health reports them."""
        h = self.health()
        return h["running"], h["waiting"]

    def counted_since(self, before: Dict[Tuple[str, frozenset], float], n: int,
                      timeout: float = 30) -> Dict[Tuple[str, frozenset], float]:
        """The metrics once exactly ``n`` more requests (finished, cancelled or failed) are counted
        than in ``before``. The server counts a cancelled or failed request in its reaper thread once
        the engine lets go of it: possibly after the slot was freed and the client got its answer."""
        def settled() -> Optional[Dict[Tuple[str, frozenset], float]]:
            m = self.metrics()
            counted = n_counted(m) - n_counted(before)
            assert counted <= n, f"{counted} requests were counted, {n} expected"
            return m if counted == n else None
        return self.wait_until(f"{n} requests counted", settled, timeout)


def metric(m: Dict[Tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


def n_counted(m: Dict[Tuple[str, frozenset], float]) -> float:
    """Requests the metrics have counted: finished (any reason, cancelled included) or failed."""
    return metric(m, "llama_mtp:request_success_total") + metric(m, "llama_mtp:request_failure_total")


@pytest.fixture(scope="module")
def server_model(model_dir) -> pathlib.Path:
    return _helpers.build_model(SPEC, model_dir)


def _serving(srv: ServerProcess) -> Iterator[ServerProcess]:
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(server_model, tmp_path_factory) -> Iterator[ServerProcess]:
    """Four slots of 512 tokens, drafting auto (the defaults otherwise)."""
    yield from _serving(ServerProcess(server_model, tmp_path_factory.mktemp("server") / "server.log",
                                      "--n_parallel", "4", "--n_ctx", str(4 * N_CTX_SLOT)))


@pytest.fixture(scope="module")
def limited(server_model, tmp_path_factory) -> Iterator[ServerProcess]:
    """One slot, one waiting place, an API key and an alias."""
    yield from _serving(ServerProcess(server_model, tmp_path_factory.mktemp("limited") / "server.log",
                                      "--n_parallel", "1", "--max_waiting", "1", "--n_ctx", "4096",
                                      "--model_alias", "tiny", api_key=API_KEY))


@pytest.fixture(scope="module")
def plain(server_model):
    """Plain llama-cpp-python on the same file (logits_all for its logprobs; chatml like the server)."""
    llm = _helpers.plain_llama(server_model, n_ctx=N_CTX_SLOT, logits_all=True, chat_format="chatml",
                               n_threads=int(THREADS), n_threads_batch=int(THREADS))
    yield llm
    llm.close()


def _model_id(srv: ServerProcess) -> str:
    return srv.client().models.list().data[0].id


def plain_text(plain, prompt: str, max_tokens: int) -> str:
    """Greedy text of plain llama-cpp-python's create_completion, with the server's sampling defaults.

    One llama-cpp-python quirk is taken out: when the text ends inside a multi-byte UTF-8
    character, its hold-back ``continue`` skips the max_tokens check and it generates past
    max_tokens; the engine stops at max_tokens. There the reference is the text of the same
    first max_tokens tokens (from plain Llama.generate).
    """
    ref = plain.create_completion(prompt, max_tokens=max_tokens, temperature=0, **SERVER_SAMPLING)
    if ref["usage"]["completion_tokens"] <= max_tokens:
        return ref["choices"][0]["text"]
    tokens: List[int] = []
    sampling = dict(SERVER_SAMPLING, temp=0.0)
    for tok in plain.generate(plain.tokenize(prompt.encode(), add_bos=True, special=True), **sampling):
        tokens.append(tok)
        if len(tokens) == max_tokens:
            break
    return plain.detokenize(tokens).decode("utf-8", errors="ignore")


# --------------------------------------------------------------------------- equality with llama-cpp-python


def test_models_lists_the_served_model(server, limited, server_model):
    assert _model_id(server) == str(server_model)
    assert _model_id(limited) == "tiny"


@pytest.mark.parametrize("prompt,max_tokens,stop", [
    ("Once upon a time", 48, None),
    ("The quick brown fox", 32, None),
])
def test_greedy_completion_equals_llama_cpp(server, plain, prompt, max_tokens, stop):
    out = server.client().completions.create(model=_model_id(server), prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stop=stop)
    ref = plain.create_completion(prompt, max_tokens=max_tokens, temperature=0, stop=stop, **SERVER_SAMPLING)
    assert out.choices[0].text == ref["choices"][0]["text"]
    assert out.choices[0].finish_reason == ref["choices"][0]["finish_reason"]
    assert out.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert out.usage.completion_tokens == ref["usage"]["completion_tokens"]
    d = out.usage.completion_tokens_details
    assert d.accepted_prediction_tokens >= 0 and d.rejected_prediction_tokens >= 0


def test_stop_string_equals_llama_cpp(server, plain):
    prompt = "Once upon a time"
    full = plain.create_completion(prompt, max_tokens=40, temperature=0, **SERVER_SAMPLING)["choices"][0]["text"]
    stop = full[10:13]  # a string the greedy text reaches mid-way
    out = server.client().completions.create(model=_model_id(server), prompt=prompt, max_tokens=40,
                                             temperature=0, stop=[stop])
    ref = plain.create_completion(prompt, max_tokens=40, temperature=0, stop=[stop], **SERVER_SAMPLING)
    assert out.choices[0].text == ref["choices"][0]["text"] == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_greedy_chat_equals_llama_cpp(server, plain):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]
    out = server.client().chat.completions.create(model=_model_id(server), messages=messages, max_tokens=40,
                                                  temperature=0)
    ref = plain.create_chat_completion(messages=messages, max_tokens=40, temperature=0, **SERVER_SAMPLING)
    assert out.choices[0].message.content == ref["choices"][0]["message"]["content"]
    assert out.choices[0].finish_reason == ref["choices"][0]["finish_reason"]
    assert out.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert out.usage.completion_tokens == ref["usage"]["completion_tokens"]


def test_chat_stream_equals_non_stream_and_carries_usage(server):
    client = server.client()
    messages = [{"role": "user", "content": "Count to ten."}]
    whole = client.chat.completions.create(model=_model_id(server), messages=messages, max_tokens=24,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model=_model_id(server), messages=messages, max_tokens=24,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens is not None


def test_concurrent_streams_equal_lone_outputs(server, plain):
    prompts = ["Once upon a time", "The quick brown fox", "In a galaxy far away", "Hello, world"]
    client = server.client()
    model = _model_id(server)
    max_tokens = 64
    lone = [client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text
            for p in prompts]
    assert lone == [plain_text(plain, p, max_tokens) for p in prompts]
    results: Dict[int, Any] = {}
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            c = server.client()
            start.wait(timeout=30)
            pieces: List[str] = []
            times: List[float] = []
            usage = None
            for chunk in c.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0,
                                              stream=True):
                times.append(time.monotonic())
                pieces.append(chunk.choices[0].text)
                usage = chunk.usage or usage
            results[i] = ("".join(pieces), times[0], times[-1], usage)
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    for i in range(len(prompts)):
        assert not isinstance(results[i], Exception), results[i]
        text, _, _, usage = results[i]
        assert text == lone[i], i
        assert usage is not None and usage.completion_tokens == max_tokens
    # they were served together: every stream had started before any had ended
    assert max(r[1] for r in results.values()) < min(r[2] for r in results.values())


# --------------------------------------------------------------------------- plain-decoding requests


def test_logprobs_equal_llama_cpp(server, plain):
    prompt = "Once upon a time"
    # a length at which llama-cpp-python stops at max_tokens (see plain_text)
    n = next(n for n in range(8, 24)
             if plain.create_completion(prompt, max_tokens=n, temperature=0, **SERVER_SAMPLING)["usage"]
             ["completion_tokens"] == n)
    out = server.client().completions.create(model=_model_id(server), prompt=prompt, max_tokens=n, temperature=0,
                                             logprobs=2)
    ref = plain.create_completion(prompt, max_tokens=n, temperature=0, logprobs=2, **SERVER_SAMPLING)
    assert out.choices[0].text == ref["choices"][0]["text"]
    lp, ref_lp = out.choices[0].logprobs, ref["choices"][0]["logprobs"]
    assert lp.tokens == ref_lp["tokens"]
    assert lp.text_offset == ref_lp["text_offset"]
    assert lp.token_logprobs == pytest.approx(ref_lp["token_logprobs"], abs=1e-3)
    for top, ref_top in zip(lp.top_logprobs, ref_lp["top_logprobs"]):
        assert set(top) == set(ref_top)
        assert [top[k] for k in ref_top] == pytest.approx(list(ref_top.values()), abs=1e-3)
    # a logprobs request decodes plainly: nothing drafted
    d = out.usage.completion_tokens_details
    assert d.accepted_prediction_tokens == 0 and d.rejected_prediction_tokens == 0


def test_chat_logprobs_stream_and_not(server):
    client = server.client()
    messages = [{"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(model=_model_id(server), messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(1 <= len(c.top_logprobs) <= 4 and c.logprob <= 0 for c in content)
    chunks = list(client.chat.completions.create(model=_model_id(server), messages=messages, max_tokens=8,
                                                 temperature=0, logprobs=True, top_logprobs=3, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [lp.logprob for lp in streamed] == pytest.approx([c.logprob for c in content])
    # logprobs=true alone: the sampled tokens' logprobs (OpenAI's top_logprobs 0)
    bare = client.chat.completions.create(model=_model_id(server), messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True)
    assert len(bare.choices[0].logprobs.content) == bare.usage.completion_tokens


def test_logit_bias(server, plain):
    tok = plain.tokenize(b"A", add_bos=False)[0]
    client = server.client()
    out = client.completions.create(model=_model_id(server), prompt="Once upon a time", max_tokens=6, temperature=0,
                                    logit_bias={str(tok): 100})
    assert out.choices[0].text == "A" * 6
    chat = client.chat.completions.create(model=_model_id(server), messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0, logit_bias={str(tok): 100})
    assert chat.choices[0].message.content == "A" * 5


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "thing", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
])
def test_response_format_constrains_output(server, response_format):
    out = server.client().chat.completions.create(model=_model_id(server),
                                                  messages=[{"role": "user", "content": "json"}], max_tokens=16,
                                                  temperature=0, response_format=response_format)
    text = out.choices[0].message.content
    assert text.lstrip().startswith("{"), text
    if response_format["type"] == "json_schema":
        assert text.lstrip()[1:].lstrip().startswith('"a"'), text


def test_sampled_request_is_served(server):
    out = server.client().completions.create(model=_model_id(server), prompt="Once upon a time", max_tokens=16,
                                             temperature=0.8, seed=7)
    again = server.client().completions.create(model=_model_id(server), prompt="Once upon a time", max_tokens=16,
                                               temperature=0.8, seed=7)
    assert out.usage.completion_tokens == 16
    assert out.choices[0].text == again.choices[0].text  # same seed, same text


def test_per_request_n_draft(server, plain):
    prompt = "The quick brown fox"
    out = server.client().completions.create(model=_model_id(server), prompt=prompt, max_tokens=16, temperature=0,
                                             extra_body={"n_draft": 0})
    assert out.choices[0].text == plain_text(plain, prompt, 16)
    d = out.usage.completion_tokens_details
    assert d.accepted_prediction_tokens == 0 and d.rejected_prediction_tokens == 0
    fixed = server.client().completions.create(model=_model_id(server), prompt=prompt, max_tokens=16, temperature=0,
                                               extra_body={"n_draft": 2})
    assert fixed.choices[0].text == out.choices[0].text
    assert fixed.usage.completion_tokens_details.rejected_prediction_tokens \
        + fixed.usage.completion_tokens_details.accepted_prediction_tokens > 0


# --------------------------------------------------------------------------- metrics


def test_metrics_count_what_was_served(server):
    server.quiesce()
    before = server.metrics()
    client = server.client()
    model = _model_id(server)
    # a fixed draft length: whether auto drafts on a tiny model is the policy's call, not the metrics'
    usages = [client.completions.create(model=model, prompt=p, max_tokens=24, temperature=0,
                                        extra_body={"n_draft": 2}).usage
              for p in ("Once upon a time", "The quick brown fox")]
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=16, temperature=0, stream=True,
                                                extra_body={"n_draft": 2}):
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert len(usages) == 3
    server.quiesce()
    after = server.counted_since(before, 3)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    accepted = sum(u.completion_tokens_details.accepted_prediction_tokens for u in usages)
    rejected = sum(u.completion_tokens_details.rejected_prediction_tokens for u in usages)
    assert accepted > 0
    assert delta("llama_mtp:spec_decode_num_drafts_total") > 0
    assert delta("llama_mtp:spec_decode_num_accepted_tokens_total") == accepted
    assert delta("llama_mtp:spec_decode_num_draft_tokens_total") == accepted + rejected
    per_pos = [delta("llama_mtp:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(3)]
    assert sum(per_pos) == accepted and per_pos[0] > 0
    assert delta("llama_mtp:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("llama_mtp:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("llama_mtp:request_success_total") == 3
    assert delta("llama_mtp:time_per_output_token_seconds_count") == 3
    assert metric(after, "llama_mtp:num_requests_running") == 0
    assert metric(after, "llama_mtp:num_requests_waiting") == 0


# --------------------------------------------------------------------------- bad input


def _error(r: "httpx.Response", status: int) -> Dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, None),
    ("/v1/chat/completions", b"not json at all", 400, None),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": 12}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 3}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "grammar": "root ::= undefined_rule"}, 400, "grammar"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("/v1/nowhere", {}, 404, None),
])
def test_bad_input_gets_openai_error(server, path, body, status, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.base + path, timeout=60, **kwargs)
    err = _error(r, status)
    if param is not None:
        assert err["param"] == param, err
    assert server.alive()


def test_prompt_longer_than_the_context_is_400(server):
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "a" * (N_CTX_SLOT + 20), "max_tokens": 4},
                   timeout=60)
    err = _error(r, 400)
    assert err["code"] == "context_length_exceeded"
    r = httpx.post(server.base + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "a" * (N_CTX_SLOT + 20)}]}, timeout=60)
    assert _error(r, 400)["code"] == "context_length_exceeded"


def test_running_out_of_context_finishes_with_length(server):
    prompt = "b" * (N_CTX_SLOT - 24)
    r = httpx.post(server.base + "/v1/completions", json={"prompt": prompt, "temperature": 0, "max_tokens": 200},
                   timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length"
    # prompt + completion fill the slot exactly, as llama-cpp-python truncates max_tokens to the context
    assert out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] == N_CTX_SLOT
    assert out["usage"]["completion_tokens"] < 200


def test_missing_model_field_is_accepted(server):
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_api_key(limited):
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
    assert _error(httpx.post(limited.base + "/v1/completions", json=body, timeout=60), 401)["code"] == "invalid_api_key"
    assert httpx.get(limited.base + "/v1/models", timeout=10).status_code == 401
    bad = httpx.post(limited.base + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert bad.status_code == 401
    ok = httpx.post(limited.base + "/v1/completions", json=body, headers=limited.headers, timeout=60)
    assert ok.status_code == 200, ok.text
    # the alias and the file name both name the model
    named = httpx.post(limited.base + "/v1/completions", json={**body, "model": "tiny"}, headers=limited.headers,
                       timeout=60)
    assert named.status_code == 200, named.text


# --------------------------------------------------------------------------- load and disconnects


def test_dropped_stream_frees_its_slot(limited, server_model):
    limited.quiesce()
    before = limited.metrics()
    long_tokens = 4000
    with httpx.Client(base_url=limited.base, headers=limited.headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": long_tokens,
                                                       "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data: ")
                if n >= 2:
                    break
    # the client went away: the server cancels its request, and the one slot is free again
    limited.quiesce(timeout=60)
    # the next request is served, with the file name as model
    r = httpx.post(limited.base + "/v1/completions", headers=limited.headers, timeout=120,
                   json={"prompt": "Hi", "max_tokens": 4, "temperature": 0, "model": server_model.name})
    assert r.status_code == 200, r.text
    after = limited.counted_since(before, 2)  # the dropped stream and the next request
    cancelled = (metric(after, "llama_mtp:request_success_total", finished_reason="cancelled")
                 - metric(before, "llama_mtp:request_success_total", finished_reason="cancelled"))
    assert cancelled == 1
    generated = metric(after, "llama_mtp:generation_tokens_total") - metric(before, "llama_mtp:generation_tokens_total")
    assert generated < long_tokens  # the dropped stream stopped early
    assert limited.alive()


def test_full_queue_answers_503(limited):
    """One slot and one waiting place: while a request runs and another waits, a third is
    refused with 503 (Retry-After, code queue_full); the waiting one is served once the
    running one goes away. Each state is observed on /health before the next step."""
    limited.quiesce()
    body = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 8}
    waiting: List[httpx.Response] = []

    def wait_for_the_slot() -> None:
        waiting.append(httpx.post(limited.base + "/v1/completions", headers=limited.headers, timeout=180, json=body))

    second = threading.Thread(target=wait_for_the_slot, daemon=True)
    with httpx.Client(base_url=limited.base, headers=limited.headers, timeout=60) as c:
        # the whole slot's context to generate: it runs for seconds, unless it is dropped
        with c.stream("POST", "/v1/completions", json={**body, "max_tokens": 4000, "stream": True}) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: a discarded iterator closes the stream
            assert any(line.startswith("data: ") for line in lines)  # it holds the slot
            second.start()
            limited.wait_until("one request running and one waiting", lambda: limited.load() == (1, 1))
            refused = httpx.post(limited.base + "/v1/completions", headers=limited.headers, timeout=60, json=body)
            assert refused.status_code == 503, refused.text
            assert refused.headers.get("retry-after") == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            assert limited.load() == (1, 1), "the running request ended before the third one was refused"
    # the running stream was dropped: the waiting request gets the slot
    second.join(timeout=180)
    assert not second.is_alive()
    assert waiting[0].status_code == 200, waiting[0].text
    assert limited.alive()


# --------------------------------------------------------------------------- settings


def _run_server(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_helpers.REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(_helpers.REPO_ROOT))


@pytest.mark.parametrize("flags,needle", [
    (["--logits_all", "true"], "--logits_all"),
    (["--embedding", "true"], "--embedding"),
    (["--vocab_only", "true"], "--vocab_only"),
    (["--draft_model", "prompt-lookup-decoding"], "--draft_model"),
    (["--draft_model_num_pred_tokens", "5"], "--draft_model_num_pred_tokens"),
    (["--cache", "true"], "--cache"),
    (["--n_draft", "lots"], "n_draft"),
    (["--chat_format", "no-such-format"], "no-such-format"),
    (["--config_file", "{models2}"], "2 models"),
])
def test_unsupported_settings_are_refused_in_one_line(server_model, tmp_path, flags, needle):
    cfg = tmp_path / "two.json"
    cfg.write_text(json.dumps({"models": [{"model": str(server_model)}, {"model": str(server_model)}]}))
    flags = [str(cfg) if f == "{models2}" else f for f in flags]
    proc = _run_server("llama_mtp.server", "--model", str(server_model), "--verbose", "false", *flags)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_config_file_and_flags(server_model, tmp_path):
    """llama_cpp.server's config file format, with the engine's keys beside host/port; flags override those."""
    from llama_mtp.server import settings

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"host: 127.0.0.1\nport: 9999\nn_parallel: 2\nmax_waiting: 3\n"
                        f"models:\n  - model: {server_model}\n    n_ctx: 1024\n    model_alias: tiny\n")
    cfg = settings.parse_config(["--config_file", str(cfg_file), "--n_draft", "2"], lambda: "unused")
    assert (cfg.server.port, cfg.mtp.n_parallel, cfg.mtp.max_waiting, cfg.mtp.n_draft) == (9999, 2, 3, 2)
    assert (cfg.model.n_ctx, cfg.model.model_alias) == (1024, "tiny")
    flags = settings.parse_config(["--model", str(server_model), "--n_draft", "5", "--n_ctx", "4096"],
                                  lambda: "unused")
    assert flags.mtp.n_draft == 5 and flags.mtp.n_draft_max == 5  # a fixed draft length raises the bound
    demo = settings.parse_config([], lambda: str(server_model))  # no --model: the demo model
    assert demo.model.model == str(server_model)
    kwargs = settings.llama_kwargs(flags.model)
    assert kwargs["n_ctx"] == 4096 and "logits_all" not in kwargs and "draft_model" not in kwargs


def test_cli_serve_subcommand_runs_the_server_main(tmp_path):
    proc = _run_server("llama_mtp", "serve", "--model", str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2, proc.stderr
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_ray_flags(server_model, monkeypatch):
    """--replicas / --ray_address / --ray_router / --ray_num_gpus parse into cfg.ray; Ray's own RAY_ADDRESS
    (set inside every Ray worker) does not turn a plain server into a Ray one."""
    from llama_mtp.server import settings

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    plain_cfg = settings.parse_config(["--model", str(server_model)], lambda: "unused")
    assert not plain_cfg.ray.enabled and plain_cfg.ray.replicas == 0
    cfg = settings.parse_config(["--model", str(server_model), "--replicas", "3", "--ray_router", "default",
                                 "--ray_num_gpus", "0.5"], lambda: "unused")
    assert (cfg.ray.replicas, cfg.ray.ray_router, cfg.ray.ray_num_gpus, cfg.ray.enabled) == (3, "default", 0.5, True)
    joined = settings.parse_config(["--model", str(server_model), "--ray_address", "auto"], lambda: "unused")
    assert joined.ray.enabled and joined.ray.ray_address == "auto"
    with pytest.raises(settings.SettingsError, match="ray_router"):
        settings.parse_config(["--model", str(server_model), "--ray_router", "random"], lambda: "unused")
