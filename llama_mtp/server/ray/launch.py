"""``python -m llama_mtp.server --replicas N [--ray_address ADDR]``: start (or join) Ray, run the app, wait.

Locally the replicas' declared CPUs must fit the machine (Ray would otherwise leave the extra
replicas pending forever); on a cluster Serve waits for room (an autoscaling cluster adds nodes).
A deployment that fails (a replica that cannot load its model) prints one line and exits 1.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from ..settings import ServeConfig, SettingsError
from .application import APP_NAME, build

log = logging.getLogger("llama_mtp.server")


def check_local_resources(cfg: ServeConfig, n_cpus: int) -> None:
    need = cfg.ray.replicas * cfg.model.n_threads
    if cfg.ray.ray_address is None and need > n_cpus:
        raise SettingsError(f"--replicas {cfg.ray.replicas} x --n_threads {cfg.model.n_threads} = {need} CPUs, but "
                            f"this machine has {n_cpus}: lower --n_threads or --replicas (or join a cluster "
                            "with --ray_address)")


def serve_forever(cfg: ServeConfig) -> int:
    """Run until SIGINT/SIGTERM; the exit code for ``main``."""
    import ray
    from ray import serve

    if cfg.ray.replicas == 0:
        cfg.ray.replicas = 1  # --ray_address alone: one replica on the cluster
    check_local_resources(cfg, os.cpu_count() or 1)
    t0 = time.monotonic()
    if cfg.ray.ray_address is None:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=cfg.ray.ray_address, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        host = os.getenv("HOST", cfg.server.host)
        port = int(os.getenv("PORT", cfg.server.port))
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:  # the deployment failed: its status message holds the replica's error
            print(f"llama_mtp.server: error: the Ray Serve deployment failed: {_reason(e, serve)}", file=sys.stderr,
                  flush=True)
            return 1
        log.info("serving %s on http://%s:%d with %d replicas (Ray Serve; started in %.1f s)", cfg.model.model,
                 host, port, cfg.ray.replicas, time.monotonic() - t0)
        while not stop.wait(0.5):
            pass
        log.info("stopping: removing the application")
        return 0
    finally:
        # on a Ray instance of its own this process owns Serve; on a joined cluster it removes its app only
        try:
            serve.delete(APP_NAME) if cfg.ray.ray_address is not None else serve.shutdown()
        except Exception as e:  # shutting down anyway
            log.warning("Serve shutdown: %s", e)
        ray.shutdown()


def _reason(e: BaseException, serve: Any) -> str:
    """Why the deployment failed: the replicas' ReplicaLoadError from the deployment status, else the
    first line of Serve's message."""
    text = str(e)
    try:
        deployments = serve.status().applications[APP_NAME].deployments
        text = "\n".join(d.message for d in deployments.values() if d.message) + "\n" + text
    except Exception:  # no status: Serve's own message is all there is
        pass
    for line in text.splitlines():
        if "ReplicaLoadError:" in line:
            return line.split("ReplicaLoadError:", 1)[-1].strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
