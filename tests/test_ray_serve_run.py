"""``serve run`` with the shipped config file (autoscaling 1 -> 2 replicas), the application builder, and
the deployment's failures, each on a local Ray instance of its own (``tests/test_ray_server.py``'s
module has shut its own down by then: one Ray instance at a time on a small machine).
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import signal
import subprocess
import sys
from typing import Dict

import pytest

import _helpers

pytest.importorskip("ray.serve")
yaml = pytest.importorskip("yaml")

import httpx  # noqa: E402
import openai  # noqa: E402

from test_ray_server import N_CTX_SLOT, RAY_STARTUP_S, RayServer, _wait  # noqa: E402
from test_server import HOST, ServerProcess, _free_port, server_model  # noqa: E402,F401

pytestmark = pytest.mark.ray


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_helpers.REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(_helpers.REPO_ROOT))


def test_a_model_that_cannot_load_fails_the_deployment_in_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    proc = _run("-m", "llama_mtp.server", "--model", str(bad), "--replicas", "1", "--n_threads", "1",
                "--port", str(_free_port()), "--host", HOST, "--verbose", "false", timeout=240)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("llama_mtp.server: error")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "could not load the model" in errors[0] and str(bad) in errors[0]


def test_more_replicas_than_cpus_is_refused_in_one_line(server_model):
    proc = _run("-m", "llama_mtp.server", "--model", str(server_model), "--replicas", str(4 * (os.cpu_count() or 1)),
                "--n_threads", "1", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "CPUs" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- serve run + autoscaling


def test_serve_run_config_autoscales_from_one_to_two_replicas(server_model, tmp_path):
    """The shipped config file, run with ``serve run`` as the README says, its delays shortened:
    one replica, and a second once requests pile up on it."""
    shipped = _helpers.REPO_ROOT / "llama_mtp" / "server" / "ray" / "serve_config.yaml"
    cfg = yaml.safe_load(shipped.read_text())
    port = _free_port()
    cfg["http_options"] = {"host": HOST, "port": port}
    app = cfg["applications"][0]
    app["args"] = {"model": str(server_model), "n_ctx": 2 * N_CTX_SLOT, "n_parallel": 2, "n_threads": 1,
                   "n_threads_batch": 1, "chat_format": "chatml", "verbose": False}
    scaling = app["deployments"][0]["autoscaling_config"]
    scaling.update(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1,
                   metrics_interval_s=0.5, look_back_period_s=2)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_helpers.REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    serve_bin = pathlib.Path(sys.executable).with_name("serve")
    log = open(tmp_path / "serve.log", "wb")
    # SIGINT (Ctrl-C) is how serve run shuts down: undo an ignored SIGINT inherited from a background shell
    proc = subprocess.Popen([str(serve_bin), "run", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=str(tmp_path), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    srv = ServerProcess.__new__(RayServer)  # only its HTTP helpers, on serve run's port
    srv.base, srv.api_key = f"http://{HOST}:{port}", None

    def replicas() -> Dict[str, int]:
        try:
            return RayServer.replicas(srv)
        except httpx.HTTPError:
            return {}

    try:
        one = _wait("serve run's first replica", lambda: replicas() if proc.poll() is None else "exited",
                    RAY_STARTUP_S)
        assert one != "exited", (tmp_path / "serve.log").read_text()[-4000:]
        assert len(one) == 1
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        stop = False

        def load(i: int) -> int:
            n = 0
            while not stop:
                client.completions.create(model=model, prompt=f"Load {i}, request {n}: once upon a time",
                                          max_tokens=200, temperature=0, extra_headers={"x-session-id": f"load-{i}"})
                n += 1
            return n

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            runs = [pool.submit(load, i) for i in range(4)]
            try:
                two = _wait("a second replica under load", lambda: len(replicas()) == 2, 180)
            finally:
                stop = True
            assert all(r.result(timeout=300) >= 1 for r in runs)
        assert two
    finally:
        proc.send_signal(signal.SIGINT)  # serve run's own shutdown (Ctrl-C)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def test_serve_run_builder_parses_the_server_flags(server_model):
    from llama_mtp.server.ray import application

    assert application.args_to_argv({"model": "m.gguf", "n_parallel": 2, "verbose": False, "--n_ctx": "64"}) == [
        "--model", "m.gguf", "--n_parallel", "2", "--verbose", "false", "--n_ctx", "64"]
    app = application.app({"model": str(server_model), "n_threads": 1, "replicas": 2, "ray_router": "default"})
    assert app is not None
    from llama_mtp.server.settings import SettingsError

    with pytest.raises(SettingsError, match="no such file"):
        application.app({"model": "/nonexistent.gguf"})
    with pytest.raises(SettingsError, match="unknown argument"):
        application.app({"model": str(server_model), "no_such_flag": 1})
