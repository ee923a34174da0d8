"""Conversation affinity as a Ray Serve request router (``ray.serve.request_router``, Serve's custom router API).

Each request carries its conversation key (``affinity.conversation_key``, computed by the ingress,
passed as the call's ``affinity_key`` keyword). Replicas sit on a consistent-hash ring (virtual
nodes per replica), so a key keeps its replica while the replica set is unchanged, and when a
replica dies or the deployment scales only the keys of the moved ring arcs change replica. The
key's replica is the first rank; every other replica is the second: Serve's own selection takes
the least loaded replica of a rank that is below ``max_ongoing_requests`` (its engine slots), so a
saturated home replica spills the request to the least loaded other one. Requests without a key
(``/v1/models``, ``/health``, bad bodies) go to the least loaded replica.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Dict, FrozenSet, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

KEY_KWARG = "affinity_key"
DEFAULT_VIRTUAL_NODES = 64


def _hash(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing:
    """Replica ids on a ring of 64-bit hashes, ``virtual_nodes`` points each (plain data: unit-tested alone)."""

    def __init__(self, replica_ids: FrozenSet[str], virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        points = sorted((_hash(f"{rid}:{i}"), rid) for rid in replica_ids for i in range(virtual_nodes))
        self.replica_ids = replica_ids
        self._hashes = [h for h, _ in points]
        self._owners = [rid for _, rid in points]

    def owner(self, key: str) -> Optional[str]:
        """The replica id that holds ``key`` (None on an empty ring)."""
        if not self._hashes:
            return None
        i = bisect.bisect_right(self._hashes, _hash(key)) % len(self._hashes)
        return self._owners[i]


class AffinityRouter(RequestRouter):
    """Routes a conversation to its ring replica; spills to the least loaded one when that is saturated."""

    def initialize_state(self, virtual_nodes: int = DEFAULT_VIRTUAL_NODES, **kwargs: object) -> None:
        if not isinstance(virtual_nodes, int) or virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be a positive int, got {virtual_nodes!r}")
        self._virtual_nodes = virtual_nodes
        self._ring = HashRing(frozenset(), virtual_nodes)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        ids = frozenset(r.replica_id.unique_id for r in replicas)
        if ids != self._ring.replica_ids:
            self._ring = HashRing(ids, self._virtual_nodes)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        # every replica full: wait with Serve's backoff instead of spinning through the ranks
        pending_request.routing_context.should_backoff = True
        key = pending_request.kwargs.get(KEY_KWARG) or pending_request.metadata.session_id or None
        if not key:
            return [candidate_replicas]
        by_id: Dict[str, RunningReplica] = {r.replica_id.unique_id: r for r in candidate_replicas}
        home = by_id.get(self._ring.owner(key) or "")
        if home is None:  # the ring is a step behind the candidates: rebuilt at the next update
            return [candidate_replicas]
        others = [r for r in candidate_replicas if r is not home]
        return [[home], others] if others else [[home]]


__all__ = ["AffinityRouter", "HashRing", "KEY_KWARG", "ReplicaID"]
