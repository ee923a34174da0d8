"""``python -m llama_mtp.server --replicas 1 --ray_address ADDR`` joins an existing Ray cluster.

A Ray head started with ``ray start --head --block`` in a subprocess of the test (its own
``--temp-dir``, so no other ``ray.init()`` on this machine finds it, and, were ``--ray_address``
ignored, the server's own ``ray.init()`` would not find it either: it would start a local instance
of its own). The cluster uses token authentication, Ray's default for a ``ray start`` head once
a token exists (as ``~/.ray/auth_token`` does after any local ``ray.init()``), with a token of the
test's own: a driver that joins by an explicit address needs ``RAY_AUTH_MODE=token`` and the token
(Ray never turns it on for an explicit address), here through the environment, as a user would set
it. The server's replica must live in that cluster: its ``x-llama-mtp-replica`` id names a
Serve replica actor that a separate driver, connected to the head's address, lists. Stopping the
server removes its application only; the cluster stays up. The head is stopped by signalling the
``ray start --block`` process this test started (never ``ray stop``, which would stop every Ray
instance of this user, other test runs' included).
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

import pytest

pytest.importorskip("ray.serve")

import httpx  # noqa: E402

import _helpers  # noqa: E402
from llama_mtp.server.ray.application import APP_NAME  # noqa: E402
from test_ray_server import REPLICA_HEADER, RayServer, _wait  # noqa: E402
from test_server import HOST, SERVER_SAMPLING, _free_port, plain, server_model  # noqa: E402,F401

pytestmark = pytest.mark.ray

HEAD_STARTUP_S = 90
DEPLOYMENT = "MtpReplica"  # the app's model deployment

# a separate driver on the cluster: its named actors in every namespace (the GCS answers, no dashboard)
_PROBE = """
import json, logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({"actors": ray.util.list_named_actors(all_namespaces=True),
                  "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes), "nodes": len(nodes)}))
ray.shutdown()
"""


def _env(token: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_helpers.REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("RAY_ADDRESS", None)  # the server must find the cluster through --ray_address alone
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def _probe(address: str, token: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True, timeout=120,
                          env=_env(token), cwd=str(_helpers.REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _replica_actors(state: Dict[str, Any], deployment: str = "") -> List[str]:
    """The cluster's Serve replica actors of the app (``SERVE_REPLICA::app#deployment#id``)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}"
    return [a["name"] for a in state["actors"] if a["name"].startswith(prefix)]


def _stop_head(head: subprocess.Popen) -> None:
    # SIGTERM to `ray start --block`: the node shuts its processes down (they also share its fate);
    # its process group (its own session) is killed only if it does not exit
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=15)


def test_ray_address_joins_an_existing_cluster(server_model, plain, tmp_path, monkeypatch):
    t0 = time.monotonic()
    token = secrets.token_hex(32)
    # the server subprocess (RayServer) inherits this process's environment
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    port = _free_port()
    address = f"{HOST}:{port}"
    # a short temp dir: Ray's Unix socket paths live under it (108-byte limit)
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    head_log_path = tmp_path / "head.log"
    head_log = open(head_log_path, "wb")
    head = subprocess.Popen(
        [str(pathlib.Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
         "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(200 << 20),
         "--disable-usage-stats", "--include-dashboard=false", "--temp-dir", temp_dir],
        stdout=head_log, stderr=subprocess.STDOUT, cwd=str(tmp_path), start_new_session=True,
        env={**_env(token), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})  # its SIGTERM: no 30 s drain
    srv = None
    try:
        _wait("the Ray head started", lambda: head.poll() is not None
              or "Ray runtime started" in head_log_path.read_text(errors="replace"), HEAD_STARTUP_S)
        assert head.poll() is None, head_log_path.read_text(errors="replace")[-3000:]
        before = _probe(address, token)
        assert before["nodes"] == 1 and before["cpus"] == 2, before
        assert not _replica_actors(before), before

        srv = RayServer(server_model, tmp_path / "server.log", "--replicas", "1", "--ray_address", address)

        def serving() -> Any:
            if srv.proc.poll() is not None:
                raise AssertionError(f"the server exited with {srv.proc.returncode}:\n{srv.log()}")
            try:
                return srv.replicas()
            except (httpx.HTTPError, ValueError):
                return None

        replicas = _wait("the server's replica serving", serving, 180)
        assert len(replicas) == 1, replicas

        prompt, max_tokens = "Once upon a time", 32
        client = srv.client()
        model = client.models.list().data[0].id
        raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                          temperature=0)
        out = raw.parse()
        ref = plain.create_completion(prompt, max_tokens=max_tokens, temperature=0, **SERVER_SAMPLING)
        assert out.choices[0].text == ref["choices"][0]["text"]
        assert out.usage.completion_tokens == ref["usage"]["completion_tokens"]
        replica_id = raw.headers.get(REPLICA_HEADER)
        assert replica_id, dict(raw.headers)
        assert set(replicas) == {replica_id}

        # the replica that answered is an actor of the cluster the test started, not of a local instance
        during = _probe(address, token)
        names = _replica_actors(during, DEPLOYMENT + "#")
        assert names == [f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT}#{replica_id}"], (replica_id, during)
        assert during["nodes"] == 1, during

        # stopping the server removes its application from the cluster, and leaves the cluster up
        srv.stop()
        assert srv.proc.returncode == 0, srv.log()
        after = _probe(address, token)
        assert not _replica_actors(after), after
        assert head.poll() is None
        print(f"\njoined the cluster at {address}: {time.monotonic() - t0:.1f} s")
    finally:
        if srv is not None:
            srv.stop()
        _stop_head(head)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
