"""``llama_mtp.server`` on Ray Serve: N replicas, each its own model copy and Engine, behind one port.

Needs the ``ray`` extra (``pip install 'llama-mtp[ray]'``). Three ways to start it:

- ``python -m llama_mtp.server --model M --replicas 2`` (a local Ray instance, one port);
- ``python -m llama_mtp.server --model M --replicas 2 --ray_address ADDR`` (joins a cluster);
- ``serve run llama_mtp.server.ray:app model=M replicas=2``, or a Serve config file
  (``serve run llama_mtp/server/ray/serve_config.yaml``, with autoscaling).

Modules: ``affinity`` (a request's conversation key), ``router`` (Serve request router: the key's
replica, else the least loaded), ``tunnel`` (an HTTP request through a handle to a replica's
app), ``replica`` (model + engine + ``create_app``), ``metrics`` (one ``/metrics``, per replica),
``ingress`` (the HTTP front), ``application`` (the deployments), ``launch`` (``--replicas``).
"""

from __future__ import annotations

from .application import app, build

__all__ = ["app", "build"]
