"""Health of the ingress: readiness ("this ingress can serve a request now") and liveness ("this
process answers"), neither of which may hang on, or stay broken after, the loss of one actor.

Readiness is true when a replica group is known live, from the MetricsHub's snapshots (each
replica pushes one every metrics_period_s) or, when the hub has none or cannot be reached, from a
replica answering a direct call. It is false while draining (SIGTERM, router/drain.py). The hub is
only a cache of what replicas report: if it dies it is looked up again (Ray restarts it, or the
next lookup creates a new one) and readiness does not depend on it meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

PROBE_HUB_TIMEOUT_S = 2.0  # a hub being restarted must not hold a health probe (it falls back to a replica)
DATA_HUB_TIMEOUT_S = 10.0  # GetModelInfo and /metrics wait longer for a busy hub
REPLICA_PROBE_TIMEOUT_S = 5.0  # under a Kubernetes probe's usual 10 s timeout


class HubClient:
    """The ingress's view of the application's MetricsHub, re-resolved after any failed call."""

    def __init__(self, app_name: str, ttl_s: float) -> None:
        self.app_name = app_name
        self.ttl_s = ttl_s
        self._hub: Any = None
        self._handle()  # created now, as the ingress starts (replicas find it, or create it if it is gone)

    def _handle(self) -> Any:
        from shardline.cluster.metrics_hub import get_or_create_hub

        if self._hub is None:
            self._hub = get_or_create_hub(self.app_name, self.ttl_s)
        return self._hub

    async def snapshots(self, timeout_s: float = DATA_HUB_TIMEOUT_S) -> list[Any] | None:
        """Every live replica's latest ReplicaSnapshot, or None when the hub cannot be reached now."""
        try:
            return await asyncio.wait_for(self._handle().snapshots.remote(), timeout_s)
        except asyncio.TimeoutError:  # busy, or restarting: not a reason to look it up again
            log.warning("metrics hub did not answer within %.0f s", timeout_s)
            return None
        except Exception as e:  # noqa: BLE001 - dead or unreachable: look it up (or create it) again next time
            log.warning("metrics hub unreachable (%s); it will be looked up again", type(e).__name__)
            self._hub = None
            return None


class Readiness:
    """Readiness of one ingress: not draining, and some replica group live."""

    def __init__(self, replicas: Any, hub: HubClient) -> None:
        self.replicas = replicas
        self.hub = hub
        self.draining = False

    async def check(self) -> tuple[bool, str]:
        """(ready, a one-line reason)."""
        if self.draining:
            return False, "draining: this server is shutting down"
        snapshots = await self.hub.snapshots(PROBE_HUB_TIMEOUT_S)
        if snapshots:
            return True, f"{len(snapshots)} replica group(s) reporting"
        try:  # no snapshot (hub new, restarting or gone): ask a replica itself
            await asyncio.wait_for(self.replicas.model_info.remote(), REPLICA_PROBE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - no replica, or none answering in time
            return False, f"no replica group is ready: {type(e).__name__}"
        return True, "a replica group answered (no metrics snapshot yet)"
