"""One ``/metrics`` for all replicas: each replica's Prometheus registry, every sample labelled ``replica``.

Each replica renders its own registry (``server.metrics.ServerMetrics``, unchanged) and pushes the
text to the ``MetricsHub`` deployment every ``PUSH_INTERVAL_S``; the ingress's ``/metrics`` merges
what the hub holds into one exposition, adding ``replica="<Serve replica id>"`` to every sample and
a ``llama_mtp:replica_info{replica, pid, node}`` gauge. Nothing is summed: Prometheus aggregates
(``sum without (replica) (...)``), and a restarted replica is a new ``replica`` series, so counters
never go backwards. A replica that stopped pushing drops out after ``STALE_AFTER_S``.
(Ray's own metrics export is left to Ray's metrics: Serve's request counts, latencies and
replica states are on each node's Ray metrics port as usual.)
"""

from __future__ import annotations

import time
from typing import Dict, Iterator, List, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from ..metrics import PREFIX

PUSH_INTERVAL_S = 1.0
STALE_AFTER_S = 5.0
REPLICA_LABEL = "replica"


class ReplicaReport(NamedTuple):
    replica: str
    pid: int
    node: str
    exposition: str
    at: float


class MetricsHub:
    """Holds the latest exposition of each replica (a one-replica deployment, no CPU of its own)."""

    def __init__(self) -> None:
        self._reports: Dict[str, ReplicaReport] = {}

    def report(self, replica: str, pid: int, node: str, exposition: str) -> None:
        self._reports[replica] = ReplicaReport(replica, pid, node, exposition, time.monotonic())

    def reports(self) -> List[ReplicaReport]:
        now = time.monotonic()
        self._reports = {k: r for k, r in self._reports.items() if now - r.at <= STALE_AFTER_S}
        return sorted(self._reports.values())


def merge(reports: List[ReplicaReport]) -> "tuple[bytes, str]":
    """(body, content type) of one exposition holding every replica's samples, labelled."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(reports))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Merged:
    def __init__(self, reports: List[ReplicaReport]) -> None:
        self._reports = reports

    def collect(self) -> Iterator[Metric]:
        families: Dict[str, Metric] = {}
        for rep in self._reports:
            for fam in text_string_to_metric_families(rep.exposition):
                merged = families.get(fam.name)
                if merged is None:
                    merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    merged.add_sample(s.name, {**s.labels, REPLICA_LABEL: rep.replica}, s.value, s.timestamp,
                                      s.exemplar)
        info = GaugeMetricFamily(PREFIX + "replica_info", "Replicas serving, by Serve replica id, process and node.",
                                 labels=[REPLICA_LABEL, "pid", "node"])
        for rep in self._reports:
            info.add_metric([rep.replica, str(rep.pid), rep.node], 1.0)
        yield info
        yield from families.values()
