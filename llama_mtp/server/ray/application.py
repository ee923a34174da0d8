"""The Serve application: an ingress, the model replicas and their metrics hub, built from the server's settings.

``build(cfg)`` is what ``python -m llama_mtp.server --replicas N`` runs; ``app(args)`` is the
application builder ``serve run llama_mtp.server.ray:app model=... n_threads=1`` and Serve config
files (``import_path: llama_mtp.server.ray:app``) call, with the same flag names as keys (parsed
and refused by the same ``settings.parse_config``). A config file may override the deployments'
options by name: ``MtpReplica`` (num_replicas, autoscaling_config, max_ongoing_requests, ...),
``MtpIngress``, ``MetricsHub``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from llama_mtp.testing import demo_model

from ..settings import ServeConfig, SettingsError, parse_config
from .ingress import MtpIngress
from .metrics import MetricsHub
from .replica import MtpReplica

APP_NAME = "llama_mtp"
# how often Serve retries a replica constructor that raised before it fails the deployment: a model
# that does not load now will not load on the 20th try (Serve's default)
CONSTRUCTOR_RETRIES = 2
# requests one ingress replica relays at once: it only forwards, the replicas' slots are the limit
INGRESS_MAX_ONGOING = 4096
ROUTER_CLASS = "llama_mtp.server.ray.router.AffinityRouter"


def build(cfg: ServeConfig, *, num_replicas: Optional[int] = None) -> Application:
    """The application for ``cfg``: ``num_replicas`` (else ``cfg.ray.replicas``; 0: Serve's default of 1,
    or whatever a config file's ``MtpReplica`` options say) replicas of the model."""
    m = cfg.mtp
    n = num_replicas if num_replicas is not None else cfg.ray.replicas
    replica_options: Dict[str, Any] = dict(
        name="MtpReplica",
        # a replica's resources: its llama.cpp threads and its GPU share
        ray_actor_options={"num_cpus": cfg.model.n_threads, "num_gpus": cfg.ray.ray_num_gpus},
        # saturated = every engine slot busy: the router then spills a conversation to the least
        # loaded replica rather than queueing it behind its home replica's slots
        max_ongoing_requests=m.n_parallel,
        # beyond this many waiting for a slot (across the replicas): 503 with Retry-After (Serve's
        # queue holds at least one)
        max_queued_requests=max(1, m.max_waiting),
        max_constructor_retry_count=CONSTRUCTOR_RETRIES,
    )
    if n:
        replica_options["num_replicas"] = n
    if cfg.ray.ray_router == "affinity":
        replica_options["request_router_config"] = RequestRouterConfig(request_router_class=ROUTER_CLASS)
    replica = serve.deployment(MtpReplica, **replica_options)
    hub = serve.deployment(MetricsHub, name="MetricsHub", num_replicas=1, ray_actor_options={"num_cpus": 0},
                           logging_config={"enable_access_log": False})  # a push per replica per second
    ingress = serve.deployment(serve.ingress()(MtpIngress), name="MtpIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=INGRESS_MAX_ONGOING)
    hub_app = hub.bind()
    return ingress.bind(replica.bind(cfg, hub_app), hub_app)


def args_to_argv(args: Dict[str, Any]) -> List[str]:
    """``serve run`` / config-file ``args`` (flag names as keys, with or without ``--``) -> server flags."""
    argv: List[str] = []
    for key, value in args.items():
        argv += ["--" + str(key).lstrip("-"), value if isinstance(value, str) else _flag_value(value)]
    return argv


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def app(args: Dict[str, Any]) -> Application:
    """Serve's application builder: ``serve run llama_mtp.server.ray:app model=M n_threads=1 replicas=2``."""
    try:
        cfg = parse_config(args_to_argv(args), demo_model)
    except SystemExit:  # argparse: an unknown key
        raise SettingsError(f"llama_mtp.server.ray: unknown argument in {sorted(args)} "
                            "(keys are python -m llama_mtp.server's flag names)") from None
    return build(cfg)
