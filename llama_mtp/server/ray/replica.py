"""A model replica: its own model copy and Engine, serving the single-process server's app (``create_app``).

Serve starts ``num_replicas`` of these (or as many as autoscaling asks for), each an actor that
declares ``--n_threads`` CPUs and ``--ray_num_gpus`` GPUs. Requests arrive through ``handle``
(see ``tunnel.py``); each response says which replica served it (``x-llama-mtp-replica``).
A model that fails to load raises ``ReplicaLoadError`` from the constructor, which Serve reports
as the deployment's failure message.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import AsyncIterator, Optional

from ray import serve
from ray.serve.handle import DeploymentHandle

from llama_mtp.errors import MtpError

from ..app import create_app
from ..backend import Backend, load_backend
from ..settings import ServeConfig, SettingsError
from .metrics import PUSH_INTERVAL_S
from .tunnel import Lifespan, Message, TunneledRequest, run_app

log = logging.getLogger("llama_mtp.server")

REPLICA_HEADER = b"x-llama-mtp-replica"


class ReplicaLoadError(RuntimeError):
    """The replica could not load its model (the deployment fails with this message)."""


class MtpReplica:
    async def __init__(self, cfg: ServeConfig, hub: DeploymentHandle) -> None:
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        try:
            # off the replica's event loop: Serve's health checks keep being answered while it loads
            backend = await asyncio.to_thread(load_backend, cfg)
        except (MtpError, SettingsError, ValueError, OSError) as e:
            raise ReplicaLoadError(f"replica {self.replica_id} could not load the model {cfg.model.model}: "
                                   f"{type(e).__name__}: {e}") from None
        self._backend: Optional[Backend] = backend
        self._app = create_app(backend, cfg.server)
        self._lifespan = Lifespan(self._app)
        await self._lifespan.start()
        self._headers = [(REPLICA_HEADER, self.replica_id.encode())]
        self._hub = hub
        self._pusher = asyncio.ensure_future(self._push_metrics())
        log.info("replica %s serving %s (pid %d)", self.replica_id, cfg.model.model, os.getpid())

    async def handle(self, req: TunneledRequest, affinity_key: Optional[str] = None) -> AsyncIterator[Message]:
        """Serve one HTTP request with the app (``affinity_key`` is the router's, unused here)."""
        async for msg in run_app(self._app, req, self._headers):
            yield msg

    def check_health(self) -> None:
        # Serve restarts a replica whose check fails: an engine whose worker is gone serves nothing
        if self._backend is None or self._backend.engine.closed:
            raise RuntimeError(f"replica {self.replica_id}: the engine is closed")

    async def _push_metrics(self) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()
        pid = os.getpid()
        while True:
            try:
                body, _ = self._backend.metrics.render() if self._backend else (b"", "")
                await self._hub.report.remote(self.replica_id, pid, node, body.decode("utf-8"))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the hub restarting: the next push gets through
                log.warning("replica %s: metrics push failed: %s", self.replica_id, e)
            await asyncio.sleep(PUSH_INTERVAL_S)

    async def __del__(self) -> None:
        if not hasattr(self, "_lifespan"):
            return  # the constructor failed: nothing was loaded
        self._pusher.cancel()
        await self._lifespan.close()  # closes the backend (engine, then the contexts)
        self._backend = None
