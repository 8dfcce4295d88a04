"""The ReplicaGroup deployment: one Serve replica = one engine (one tensor-parallel group).

It streams token deltas as small plain dicts (no protobuf crosses the handle), reports routing
stats (free blocks, queue, a packed summary of its cached block hashes) to the KV-aware router,
pushes its metrics to the application's MetricsHub, fails `check_health` when the engine is dead
or stalled, and lets Serve drain it (graceful_shutdown_timeout_s) before the engine is shut down.

Placement: `build_app` gives the deployment `placement_group_bundles` (one bundle per rank,
STRICT_PACK, GPUs when the engine runs on CUDA); the replica actor is rank 0 in bundle 0.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ray import serve

from shardline.cluster.config import ROUTERS, ClusterConfig
from shardline.logging import configure_logging
from shardline.metrics import EngineMetrics
from shardline.router.prefix_scoring import pack_summary
from shardline.worker.engine.async_engine import AsyncEngine, EngineDeadError
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.outputs import RequestOutput
from shardline.worker.engine.params import RequestError, SamplingParams

log = logging.getLogger(__name__)


def output_to_dict(out: RequestOutput) -> dict[str, Any]:
    """One engine delta as the plain dict the ingress converts to gRPC or OpenAI messages."""
    item: dict[str, Any] = {"token_ids": list(out.new_token_ids), "text": out.text_delta}
    if out.logprobs:
        item["logprobs"] = [(lp.token_id, lp.logprob, dict(lp.top)) for lp in out.logprobs]
    if out.finished:
        item.update(finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens)
        if out.error:
            item["error"] = {"code": "unavailable", "field": "", "message": f"the engine failed: {out.error}"}
    return item


@dataclass(frozen=True)
class StreamOwner:
    """The named Ray actor (the ingress replica) a generate stream is for: when it dies, nobody
    reads the stream, and the replica aborts the stream's engine request (Ray does not stop an
    actor's streaming call whose caller died)."""

    namespace: str
    name: str

    def alive(self) -> bool:
        """Whether the actor still exists (a dead actor's name is gone at once)."""
        import ray

        try:
            ray.get_actor(self.name, namespace=self.namespace)
        except ValueError:
            return False
        return True


def error_item(code: str, field: str, message: str) -> dict[str, Any]:
    """A terminal stream item saying why the request did not run (errors never cross the handle
    as exceptions: Ray's wrapping of a custom exception type is lossy)."""
    return {"error": {"code": code, "field": field, "message": message}}


class ReplicaGroup:
    """One replica group: an AsyncEngine on rank 0, ranks 1..tp-1 in the replica's placement group."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests of the class itself)
            self.replica_id = "local"
        configure_logging(config.log_json, config.log_level, config.log_prompts,
                          static_fields={"replica_group": self.replica_id, "model_name": config.model_name})
        self.metrics = EngineMetrics(config.model_name, replica_group=self.replica_id)
        launcher = None
        if config.tensor_parallel_size > 1:
            from shardline.cluster.rank_launcher import RayRankLauncher

            launcher = RayRankLauncher(config.cpus_per_rank, 1.0 if config.wants_gpu() else 0.0,
                                       name_prefix=f"shardline-{config.app_name}-{self.replica_id}")
        engine = LLMEngine(config.engine_config(), show_progress=False, metrics=self.metrics, launcher=launcher)
        self.engine = AsyncEngine(engine, stall_timeout_s=config.stall_timeout_s)
        self._last_stats: dict[str, Any] = {}
        self._stop = threading.Event()
        self._hub = None
        self._pusher = threading.Thread(target=self._push_loop, name="shardline-metrics-push", daemon=True)
        self._pusher.start()
        self._owners: dict[str, StreamOwner] = {}  # engine request id -> the ingress it streams to
        self._owner_watch = threading.Thread(target=self._watch_owners, name="shardline-owner-watch", daemon=True)
        self._owner_watch.start()

    # ---- serving ------------------------------------------------------------------------------

    async def generate(self, token_ids: list[int], params: dict[str, Any], request_id: str | None = None,
                       priority: int = 0, cache_salt: str | None = None,
                       hint: Any = None, owner: StreamOwner | None = None) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's deltas as dicts; the last has finish_reason and usage, or `error`.
        Leaving the iteration (the caller cancelled) aborts the request and frees its blocks.
        `hint` (a router.routing_hint.RoutingHint, positional) is for text-based routers only;
        `owner`: the calling ingress, watched so that its death aborts the request."""
        if owner is not None and request_id is not None:
            self._owners[request_id] = owner
        try:
            sampling = SamplingParams.from_dict(params)
            async for out in self.engine.generate(list(token_ids), sampling, request_id, priority, cache_salt):
                yield output_to_dict(out)
        except RequestError as e:
            yield error_item(e.code, e.field, str(e))
        except EngineDeadError as e:
            yield error_item("unavailable", "", str(e))
        except TypeError as e:  # SamplingParams(**params) with a wrongly shaped value
            yield error_item("invalid_argument", "sampling", str(e))
        finally:
            if request_id is not None:
                self._owners.pop(request_id, None)

    def model_info(self) -> dict[str, Any]:
        """The model, its limits (for the ingress's validator) and this replica's pool."""
        engine = self.engine.engine
        return {
            "model": self.config.model_name,
            "max_model_len": engine.max_model_len,
            "vocab_size": engine.model_config.vocab_size,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "block_size": engine.config.block_size,
            "num_blocks": engine.block_manager.num_blocks,
            "limits": dataclasses.asdict(engine.limits),
            "replica_id": self.replica_id,
        }

    # ---- Serve hooks ------------------------------------------------------------------------------

    def record_routing_stats(self) -> dict[str, Any]:
        """Load and cached-block summary for the KV-aware router (polled by Serve's controller)."""
        engine = self.engine.engine
        bm = engine.block_manager
        limit = self.config.summary_blocks
        for _ in range(3):  # NOTE: read while the engine thread steps; a dict resized mid-read retries
            try:
                summary = pack_summary(bm.hash_summary(limit), limit)
                self._last_stats = {
                    "replica": self.replica_id,
                    "free_blocks": bm.num_free_blocks,
                    "num_blocks": bm.num_blocks,
                    "running": engine.scheduler.num_running,
                    "waiting": engine.scheduler.num_waiting,
                    "block_size": bm.block_size,
                    "summary": summary,
                }
                break
            except RuntimeError:
                continue
        return self._last_stats

    def check_health(self) -> None:
        """Raise when the engine's loop died, a rank failed, or no progress was made while busy."""
        self.engine.check_health()

    def stats(self) -> dict[str, Any]:
        """The engine's counters and pool state (what GetModelInfo reports per replica)."""
        return dict(self.engine.stats(), replica_id=self.replica_id)

    def metrics_exposition(self) -> bytes:
        """This replica's metrics in the Prometheus text format."""
        return self.metrics.exposition()

    def _watch_owners(self, period_s: float = 1.0) -> None:
        """Abort the engine requests of every ingress that died (checked once a period)."""
        while not self._stop.wait(period_s):
            by_owner: dict[StreamOwner, list[str]] = {}
            for rid, owner in list(self._owners.items()):
                by_owner.setdefault(owner, []).append(rid)
            for owner, rids in by_owner.items():
                try:
                    if owner.alive():
                        continue
                except Exception:  # noqa: BLE001 - GCS unreachable: decide next period
                    continue
                log.warning("the ingress %s died; aborting its %d request(s)", owner.name, len(rids))
                for rid in rids:
                    self._owners.pop(rid, None)
                    self.engine.abort(rid)

    def _push_loop(self) -> None:
        import ray

        from shardline.cluster.metrics_hub import get_or_create_hub

        while not self._stop.wait(self.config.metrics_period_s):
            try:
                if self._hub is None:
                    self._hub = get_or_create_hub(self.config.app_name, self.config.snapshot_ttl_s)
                # Waited for: a push to a dead hub fails only here, and then the hub is looked up
                # (or created) again on the next period, so a killed hub comes back.
                ray.get(self._hub.push.remote(self.replica_id, self.metrics.exposition(), self.stats()),
                        timeout=max(5.0, 5 * self.config.metrics_period_s))
            except Exception as e:  # noqa: BLE001 - metrics must never take the replica down
                log.warning("pushing metrics failed (%s); looking the metrics hub up again", type(e).__name__)
                self._hub = None

    def __del__(self) -> None:
        # Serve calls this after draining (graceful_shutdown_timeout_s): nothing is in flight now.
        self._stop.set()
        try:
            if self._hub is not None:
                self._hub.remove.remote(self.replica_id)
        except Exception:  # noqa: BLE001
            pass
        self.engine.shutdown()


def replica_group_deployment(config: ClusterConfig):
    """The ReplicaGroup deployment with the config's request router (KV-aware by default),
    placement and scaling."""
    from ray.serve.config import RequestRouterConfig

    router = RequestRouterConfig(
        # by import path, so the router and the ingress share the real module (see request_router.py)
        request_router_class=ROUTERS[config.router],
        request_router_kwargs=dict(config.routing),
        request_routing_stats_period_s=config.routing_stats_period_s,
        request_routing_stats_timeout_s=max(5.0, 5 * config.routing_stats_period_s),
    )
    options = config.replica_group_deployment_options()
    return serve.deployment(ReplicaGroup, name="ReplicaGroup").options(request_router_config=router, **options)

