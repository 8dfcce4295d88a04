"""A small named Ray actor where every ReplicaGroup replica pushes its latest metrics exposition
and load, so the ingress can serve one /metrics and per-replica stats (GetModelInfo) without
addressing replicas one by one (a DeploymentHandle only reaches "some replica")."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray


@dataclass(frozen=True)
class ReplicaSnapshot:
    """What one replica last reported: its id, metrics text, load stats, and when."""

    replica_id: str
    exposition: bytes
    stats: dict[str, Any]
    age_s: float


@ray.remote(num_cpus=0)
class MetricsHub:
    """Latest snapshot per replica; snapshots older than ttl_s (a dead replica's) are dropped."""

    def __init__(self, ttl_s: float = 15.0) -> None:
        self._ttl_s = ttl_s
        self._latest: dict[str, tuple[float, bytes, dict[str, Any]]] = {}

    def push(self, replica_id: str, exposition: bytes, stats: dict[str, Any]) -> None:
        self._latest[replica_id] = (time.monotonic(), exposition, stats)

    def remove(self, replica_id: str) -> None:
        self._latest.pop(replica_id, None)

    def snapshots(self) -> list[ReplicaSnapshot]:
        now = time.monotonic()
        for rid in [r for r, (t, _, _) in self._latest.items() if now - t > self._ttl_s]:
            del self._latest[rid]
        return [ReplicaSnapshot(rid, exp, stats, now - t) for rid, (t, exp, stats) in sorted(self._latest.items())]


def hub_name(app_name: str) -> str:
    """The actor name of an application's hub."""
    return f"shardline-metrics-{app_name}"


def get_or_create_hub(app_name: str, ttl_s: float = 15.0):
    """The application's hub, created on first use (detached: it outlives any one replica)."""
    # ray.remote's typing hands back the class itself; the actor class it makes has .options.
    return MetricsHub.options(name=hub_name(app_name), namespace="shardline",  # type: ignore[attr-defined]
                              get_if_exists=True, lifetime="detached").remote(ttl_s)
