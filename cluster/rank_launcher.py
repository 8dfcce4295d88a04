"""Tensor-parallel ranks 1..tp-1 as Ray actors in the replica's placement group, behind the
worker's RankLauncher interface (worker/parallel/launcher.py): the same `rank_main` a local
process runs, so the cluster adds placement and nothing else.

Rank r is pinned to bundle r of the replica's placement group (the replica actor, rank 0, holds
bundle 0), so a replica group's ranks share one node (STRICT_PACK) and each gets its own GPU.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardline.worker.parallel.launcher import RankArgs, RankError, RankHandle

log = logging.getLogger(__name__)


class _ListSink:
    """An ErrorSink that keeps reports in the actor until run() returns them."""

    def __init__(self) -> None:
        self.items: list[tuple] = []

    def put(self, item: tuple) -> None:
        self.items.append(item)


@ray.remote(max_restarts=0)
class RankActor:
    """Runs rank_main for one rank; returns (exit code, error reports) when the rank ends."""

    def run(self, rank: int, world_size: int, args: RankArgs, cpu_threads: int) -> tuple[int, list[tuple]]:
        from shardline.worker.parallel.rank import rank_main

        if args.spec.device.type == "cpu":
            import torch

            torch.set_num_threads(max(1, cpu_threads))
        sink = _ListSink()
        code = rank_main(rank, world_size, args.master_addr, args.master_port, args.spec, args.config, sink)
        return code, sink.items

    def pid(self) -> int:
        return os.getpid()


class RayRankLauncher:
    """Starts ranks 1..tp-1 as RankActors in the current placement group (or anywhere, outside one)."""

    def __init__(self, cpus_per_rank: float = 1.0, gpus_per_rank: float = 0.0, name_prefix: str | None = None) -> None:
        self.name_prefix = name_prefix  # actors named f"{prefix}-rank{r}" (findable by operators and tests)
        self.cpus_per_rank = cpus_per_rank
        self.gpus_per_rank = gpus_per_rank
        self._actors: list[Any] = []
        self._runs: list[Any] = []
        self._handles: list[RankHandle] = []
        self._done: dict[int, tuple[int, list[tuple]] | BaseException] = {}
        self._reported: set[int] = set()
        self._stopped = False

    def start(self, world_size: int, args: RankArgs) -> list[RankHandle]:
        pg = get_current_placement_group()
        threads = max(1, int(self.cpus_per_rank))
        for rank in range(1, world_size):
            options: dict[str, Any] = {"num_cpus": self.cpus_per_rank, "num_gpus": self.gpus_per_rank}
            if self.name_prefix:
                options["name"] = f"{self.name_prefix}-rank{rank}"
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank)
            # ray.remote's typing hands back the class itself; the actor class it makes has .options.
            actor = RankActor.options(**options).remote()  # type: ignore[attr-defined]
            self._actors.append(actor)
            self._runs.append(actor.run.remote(rank, world_size, args, threads))
            self._handles.append(RankHandle(rank, None, actor))
        return list(self._handles)

    def _poll(self) -> None:
        pending = [(i, ref) for i, ref in enumerate(self._runs) if i not in self._done]
        if not pending:
            return
        ready, _ = ray.wait([ref for _, ref in pending], num_returns=len(pending), timeout=0)
        ready_set = set(ready)
        for i, ref in pending:
            if ref in ready_set:
                try:
                    self._done[i] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the actor died (killed, OOM, node lost)
                    self._done[i] = e

    def alive(self) -> list[bool]:
        self._poll()
        return [i not in self._done for i in range(len(self._runs))]

    def errors(self) -> list[RankError]:
        self._poll()
        out: list[RankError] = []
        for i, result in self._done.items():
            if i in self._reported:
                continue
            self._reported.add(i)
            rank = i + 1
            if isinstance(result, BaseException):
                out.append(RankError(rank, time.time(), type(result).__name__, str(result), ""))
            else:
                out.extend(RankError(*item) for item in result[1])
        return out

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._runs and timeout > 0:
            ray.wait(self._runs, num_returns=len(self._runs), timeout=timeout)
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
