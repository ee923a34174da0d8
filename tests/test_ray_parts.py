"""The Ray Serve application's parts that need no cluster: the conversation key, the hash ring, the
merged /metrics, the ingress's error answers and the ASGI tunnel (on the real server app)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, Counter  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from llama_mtp.server.ray import affinity, metrics  # noqa: E402
from llama_mtp.server.ray.router import HashRing  # noqa: E402

CHAT = "/v1/chat/completions"


def _key(path: str, body: Any, headers: List = ()) -> Any:
    return affinity.conversation_key(path, list(headers), json.dumps(body).encode() if not isinstance(body, bytes)
                                     else body)


def test_a_conversation_keeps_its_key_across_turns():
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi, I am Ann"}]
    later = first + [{"role": "assistant", "content": "hello Ann"}, {"role": "user", "content": "and then?"}]
    k = _key(CHAT, {"messages": first, "max_tokens": 5})
    assert k is not None
    assert _key(CHAT, {"messages": later, "temperature": 0.3}) == k  # settings and later turns don't matter
    other = [first[0], {"role": "user", "content": "hi, I am Bob"}]
    assert _key(CHAT, {"messages": other}) != k
    # a completion prompt that grows by appending keeps its key; a different start changes it
    head = "x" * affinity.PROMPT_HEAD_CHARS
    assert _key("/v1/completions", {"prompt": head + " turn 1"}) == _key("/v1/completions", {"prompt": head + " 2"})
    assert _key("/v1/completions", {"prompt": "a" + head}) != _key("/v1/completions", {"prompt": head})
    assert _key("/v1/completions", {"prompt": list(range(100))}) == _key("/v1/completions",
                                                                        {"prompt": list(range(64)) + [7]})


def test_the_session_header_wins_and_other_requests_have_no_key():
    body = {"messages": [{"role": "user", "content": "hi"}]}
    a = _key(CHAT, body, [(b"X-Session-Id", b"conv-1")])
    assert a == _key("/v1/completions", {"prompt": "other"}, [(b"x-session-id", b"conv-1")])
    assert a != _key(CHAT, body)
    for path, raw in [("/v1/models", b""), (CHAT, b"{not json"), (CHAT, b"[1, 2]"), (CHAT, b'{"messages": []}'),
                      ("/v1/completions", b'{"prompt": ""}'), ("/v1/completions", b'{"prompt": 5}'),
                      (CHAT, b"\xff\xfe")]:
        assert affinity.conversation_key(path, [], raw) is None, (path, raw)


def test_the_ring_moves_only_the_keys_of_a_removed_replica():
    keys = [f"conversation-{i}" for i in range(2000)]
    three = HashRing(frozenset({"a", "b", "c"}))
    owners = {k: three.owner(k) for k in keys}
    assert set(owners.values()) == {"a", "b", "c"}
    counts = {r: sum(o == r for o in owners.values()) for r in "abc"}
    assert min(counts.values()) > 2000 / 3 * 0.6, counts  # virtual nodes spread the keys
    two = HashRing(frozenset({"a", "c"}))
    for k in keys:
        if owners[k] != "b":
            assert two.owner(k) == owners[k]  # only b's keys move
        else:
            assert two.owner(k) in {"a", "c"}
    assert HashRing(frozenset()).owner("x") is None


def _registry_text(value: float, position_label: str = "0") -> str:
    r = CollectorRegistry()
    c = Counter("llama_mtp:prompt_tokens", "Prompt tokens.", ["model_name"], registry=r)
    c.labels("m").inc(value)
    p = Counter("llama_mtp:spec_decode_num_accepted_tokens_per_pos", "By position.", ["model_name", "position"],
                registry=r)
    p.labels("m", position_label).inc(2)
    return generate_latest(r).decode()


def test_merged_metrics_label_every_sample_with_its_replica():
    reports = [metrics.ReplicaReport("r1", 11, "node", _registry_text(5), 0.0),
               metrics.ReplicaReport("r2", 22, "node", _registry_text(7), 0.0)]
    body, content_type = metrics.merge(reports)
    assert content_type.startswith("text/plain")
    samples: Dict[tuple, float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("llama_mtp:prompt_tokens_total", (("model_name", "m"), ("replica", "r1")))] == 5
    assert samples[("llama_mtp:prompt_tokens_total", (("model_name", "m"), ("replica", "r2")))] == 7
    assert samples[("llama_mtp:spec_decode_num_accepted_tokens_per_pos_total",
                    (("model_name", "m"), ("position", "0"), ("replica", "r2")))] == 2
    info = {dict(k[1])["replica"]: dict(k[1])["pid"] for k in samples if k[0] == "llama_mtp:replica_info"}
    assert info == {"r1": "11", "r2": "22"}
    # one HELP/TYPE per family, not one per replica
    assert body.decode().count("# TYPE llama_mtp:prompt_tokens_total counter") == 1


def test_the_hub_forgets_a_replica_that_stopped_pushing(monkeypatch):
    hub = metrics.MetricsHub()
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    hub.report("r1", 1, "n", "")
    now[0] += metrics.STALE_AFTER_S / 2
    hub.report("r2", 2, "n", "")
    assert [r.replica for r in hub.reports()] == ["r1", "r2"]
    now[0] += metrics.STALE_AFTER_S * 0.75
    assert [r.replica for r in hub.reports()] == ["r2"]


def _sent(coro_fn: Any, *args: Any, **kwargs: Any) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []

    async def send(msg: Dict[str, Any]) -> None:
        out.append(msg)

    asyncio.run(coro_fn(send, *args, **kwargs))
    return out


def test_ingress_failures_answer_openai_errors():
    from ray.serve.exceptions import BackPressureError

    from llama_mtp.server.ray.ingress import _fail

    busy = _sent(_fail, BackPressureError(num_queued_requests=3, max_queued_requests=3), started=False, sse=False)
    assert busy[0]["status"] == 503
    headers = dict(busy[0]["headers"])
    assert headers[b"retry-after"] == b"1"
    assert json.loads(busy[1]["body"])["error"]["code"] == "queue_full"
    died = _sent(_fail, RuntimeError("The actor died unexpectedly\n\tclass_name: X"), started=False, sse=False)
    assert died[0]["status"] == 503
    err = json.loads(died[1]["body"])["error"]
    assert err["code"] == "replica_failed" and "\n" not in err["message"]
    # mid-stream: an SSE error event closes the stream
    event = _sent(_fail, RuntimeError("gone"), started=True, sse=True)
    assert len(event) == 1 and event[0]["more_body"] is False
    data = event[0]["body"].decode()
    assert data.startswith("data: ") and data.endswith("\n\n")
    assert json.loads(data[len("data: "):])["error"]["type"] == "server_error"


def test_the_tunnel_runs_the_servers_own_app():
    """A request through ``run_app`` gets exactly what the app answers, headers added; the app's
    error bodies come through unchanged."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from llama_mtp.server.ray.tunnel import TunneledRequest, run_app

    app = FastAPI()

    @app.post("/echo")
    async def echo(body: Dict[str, Any]) -> JSONResponse:
        return JSONResponse({"got": body}, status_code=201)

    async def call(path: str, body: bytes) -> List[Dict[str, Any]]:
        scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "headers": [(b"content-type", b"application/json")],
                 "server": ("x", 80), "client": ("y", 1), "extensions": {}}
        req = TunneledRequest.from_scope(scope, body)
        assert "extensions" not in req.scope  # only what the app needs crosses the handle
        return [m async for m in run_app(app, req, [(b"x-llama-mtp-replica", b"r1")])]

    msgs = asyncio.run(call("/echo", b'{"a": 1}'))
    assert msgs[0]["status"] == 201 and (b"x-llama-mtp-replica", b"r1") in msgs[0]["headers"]
    assert json.loads(b"".join(m.get("body", b"") for m in msgs[1:])) == {"got": {"a": 1}}
    missing = asyncio.run(call("/nope", b""))
    assert missing[0]["status"] == 404
