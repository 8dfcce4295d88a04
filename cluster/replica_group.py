"""The ReplicaGroup deployment: one Serve replica = one engine (one tensor-parallel group).

It takes one typed GenerationRequest and streams typed StreamItems (worker/engine/generation.py;
no protobuf or dict crosses the handle), runs the n choices of a request, reports routing
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
from typing import Any, AsyncIterator

from ray import serve

from shardline.cluster.config import ROUTERS, ClusterConfig
from shardline.logging import configure_logging
from shardline.metrics import EngineMetrics
from shardline.router.prefix_scoring import pack_summary
from shardline.router.streams import merge_streams
from shardline.worker.engine.async_engine import AsyncEngine, EngineDeadError
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.generation import GenerationRequest, StreamItem
from shardline.worker.engine.params import RequestError, SamplingParams

log = logging.getLogger(__name__)


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
        self._hub: Any = None  # the application's MetricsHub actor handle, once reached
        self._pusher = threading.Thread(target=self._push_loop, name="shardline-metrics-push", daemon=True)
        self._pusher.start()

    # ---- serving ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, hint: Any = None) -> AsyncIterator[StreamItem]:
        """Stream the request's deltas as StreamItems (choice `index`); each choice's last item has
        its finish_reason, or `error`. Leaving the iteration (the caller cancelled) aborts every
        choice and frees its blocks. `hint` (a router.routing_hint.RoutingHint, positional) is for
        text-based routers only.

        n > 1: choice 0 runs first; the other choices are submitted once it has produced its
        first token, so its prompt's full KV blocks are in the prefix cache and they only compute
        the prompt's last partial block (without prefix caching each choice computes its prompt)."""
        try:
            if request.params.n == 1:
                async for out in self.engine.generate(request):
                    yield StreamItem.from_output(out)
                return
            first = self.engine.generate(request.choice(0))
            try:
                head = await first.__anext__()
            except BaseException:
                await first.aclose()
                raise
            yield StreamItem.from_output(head, 0)
            streams = [first] if not head.finished else []
            indices = [0] if not head.finished else []
            for i in range(1, request.params.n):
                streams.append(self.engine.generate(request.choice(i)))
                indices.append(i)
            async for position, out in merge_streams(streams):
                yield StreamItem.from_output(out, indices[position])
        except RequestError as e:
            yield StreamItem.failure(e)
        except EngineDeadError as e:
            yield StreamItem.failure(RequestError("", str(e), code="unavailable"))

    def params_in_flight(self) -> dict[str, SamplingParams]:
        """The SamplingParams the engine holds for each request in flight, by request id."""
        return self.engine.engine.params_in_flight()

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

    def _push_loop(self) -> None:
        from shardline.cluster.metrics_hub import get_or_create_hub

        while not self._stop.wait(self.config.metrics_period_s):
            try:
                if self._hub is None:
                    self._hub = get_or_create_hub(self.config.app_name, self.config.snapshot_ttl_s)
                self._hub.push.remote(self.replica_id, self.metrics.exposition(), self.stats())
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                log.exception("pushing metrics failed")
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

    # NOTE: passed as a mapping because Ray's pydantic-compat model types every keyword as a dict.
    router_fields: dict[str, Any] = {
        # by import path, so the router and the ingress share the real module (see request_router.py)
        "request_router_class": ROUTERS[config.router],
        "request_router_kwargs": dict(config.routing),
        "request_routing_stats_period_s": config.routing_stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, 5 * config.routing_stats_period_s),
    }
    router = RequestRouterConfig(**router_fields)
    options = config.replica_group_deployment_options()
    return serve.deployment(name="ReplicaGroup")(ReplicaGroup).options(request_router_config=router, **options)

