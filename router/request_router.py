"""The KV-aware Ray Serve RequestRouter of the ReplicaGroup deployment.

Every DeploymentHandle to ReplicaGroup (the ingress holds one) runs an instance in its own
process. For a `generate(request: GenerationRequest[, hint])` call it hashes the
prompt's full blocks exactly as the engine keys its prefix cache (same block size, same salt),
matches them against the block-hash summary each replica reported through
`record_routing_stats`, and ranks replicas with `router.prefix_scoring.choose_replica`.

NOTE: Serve only logs an exception raised in `choose_replicas` and leaves the request pending
forever (docs/ray-serve-notes.md), so every failure falls back to power of two choices.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import random
import time
from collections.abc import Callable, Container
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from shardline.worker.engine.generation import GenerationRequest
from shardline.router.prefix_scoring import (
    ReplicaLoad,
    ScoringConfig,
    choose_replica,
    prompt_block_hashes,
    truncate_hash,
    unpack_summary,
)

log = logging.getLogger(__name__)

# NOTE: Serve builds the router itself, so the ingress cannot hand it a metrics object; the
# ingress registers its RouterMetrics.on_decision here instead (one per process, the ingress's).
# Serve ships the router class pickled by value, and a by-value copy of this code has its own
# globals, so both sides look the list up on the imported module (_sinks), never as a global.
_decision_sinks: list[Callable[[str], None]] = []


def _sinks() -> list[Callable[[str], None]]:
    return importlib.import_module("shardline.router.request_router")._decision_sinks


def register_decision_sink(sink: Callable[[str], None]) -> None:
    """Have every routing decision in this process reported to `sink` ("prefix_hit" / "fallback")."""
    sinks = _sinks()
    if sink not in sinks:
        sinks.append(sink)


def _report(decision: str) -> None:
    for sink in list(_sinks()):
        try:
            sink(decision)
        except Exception:  # noqa: BLE001 - metrics must never break routing
            log.exception("routing decision sink failed")


def prompt_of(pending_request: PendingRequest | None) -> tuple[list[int], str | None] | None:
    """The prompt token ids and cache salt of a `generate(request: GenerationRequest, ...)` call,
    read by attribute from the typed request; None for any other call."""
    if pending_request is None:
        return None
    args, kwargs = pending_request.args or [], pending_request.kwargs or {}
    request = args[0] if args else kwargs.get("request")
    if not isinstance(request, GenerationRequest) or not request.prompt_token_ids:
        return None
    return request.prompt_token_ids, request.cache_salt


def load_from_stats(stats: dict[str, Any]) -> ReplicaLoad | None:
    """A replica's routing stats as a ReplicaLoad; None before its first report."""
    if not stats or "free_blocks" not in stats:
        return None
    return ReplicaLoad(
        free_blocks=int(stats["free_blocks"]),
        num_blocks=int(stats["num_blocks"]),
        running=int(stats["running"]),
        waiting=int(stats["waiting"]),
        summary=unpack_summary(stats.get("summary", b"")),
    )


class _ReportedOrRouted:
    """A replica's reported block hashes plus those of prompts this router sent it since: a burst
    of requests sharing a new prefix must follow the first one before any report shows it."""

    __slots__ = ("reported", "routed")

    def __init__(self, reported: Container[int], routed: dict[int, float]) -> None:
        self.reported = reported
        self.routed = routed

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self.reported or block_hash in self.routed


class KVAwareRouter(FIFOMixin, RequestRouter):
    """Routes a prompt to the replica group whose prefix cache holds the most of it, weighed
    against load; power of two choices when no replica holds a useful prefix. It remembers what
    it routed until the replicas' reports catch up (`routed_ttl_s`)."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Scoring knobs come from request_router_kwargs (the ClusterConfig's `routing`)."""
        knobs = {k: v for k, v in kwargs.items() if k in ScoringConfig.__dataclass_fields__ and k != "block_size"}
        self._knobs = knobs
        self._rng = random.Random(kwargs.get("seed"))
        self._routed_ttl_s = float(kwargs.get("routed_ttl_s", 3.0))
        self._summaries: dict[str, tuple[bytes, Container[int]]] = {}  # replica -> (packed, unpacked) cache
        self._routed: dict[str, dict[int, float]] = {}  # replica -> {truncated block hash: expiry}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        try:
            ranked = self._rank(candidate_replicas, pending_request)
        except Exception:  # noqa: BLE001 - see the module note: never raise out of here
            log.exception("KV-aware routing failed; falling back to power of two choices")
            ranked = None
        if ranked is not None:
            return ranked
        _report("fallback")
        return [self._rng.sample(candidate_replicas, k=min(2, len(candidate_replicas)))]

    def _rank(self, candidates: list[RunningReplica], pending_request: PendingRequest | None):
        if not candidates:
            return [[]]
        prompt = prompt_of(pending_request)
        if prompt is None:  # not a generate call (model info, health): any replica will do
            return [candidates]
        now = time.monotonic()
        loads: dict[str, ReplicaLoad] = {}
        by_id: dict[str, RunningReplica] = {}
        block_size = None
        for replica in candidates:
            rid = replica.replica_id.unique_id
            stats = getattr(replica, "routing_stats", None) or {}
            load = self._load(rid, stats)
            if load is None:
                continue
            routed = self._routed.setdefault(rid, {})
            for h in [h for h, expiry in routed.items() if expiry < now]:
                del routed[h]
            loads[rid] = dataclasses.replace(load, summary=_ReportedOrRouted(load.summary, routed))
            by_id[rid] = replica
            block_size = block_size or int(stats.get("block_size", 16))
        if not loads:  # nobody has reported yet
            return None
        config = ScoringConfig(block_size=block_size or 16, **self._knobs)
        token_ids, salt = prompt
        hashes = prompt_block_hashes(token_ids, config.block_size, salt)
        decision = choose_replica(hashes, loads, config, self._rng)
        _report("prefix_hit" if decision.reason == "prefix" else "fallback")
        chosen = decision.replica_id
        expiry = now + self._routed_ttl_s
        self._routed[chosen].update((truncate_hash(h), expiry) for h in hashes)
        rest = [r for r in candidates if r.replica_id.unique_id != chosen]
        return [[by_id[chosen]], rest] if rest else [[by_id[chosen]]]

    def _load(self, rid: str, stats: dict[str, Any]) -> ReplicaLoad | None:
        packed = stats.get("summary", b"") if stats else b""
        cached = self._summaries.get(rid)
        if cached is None or cached[0] is not packed:
            load = load_from_stats(stats)
            if load is None:
                return None
            self._summaries[rid] = (packed, load.summary)
            return load
        return ReplicaLoad(int(stats["free_blocks"]), int(stats["num_blocks"]), int(stats["running"]),
                           int(stats["waiting"]), cached[1])

    def on_replica_actor_died(self, replica_id) -> None:
        rid = getattr(replica_id, "unique_id", replica_id)
        self._summaries.pop(rid, None)
        self._routed.pop(rid, None)
        super().on_replica_actor_died(replica_id)
