"""The tensor-parallel executor: rank 0 runs its shard inside the engine's process and sends each
step to ranks 1..tp-1 over the step channel; a failed or dead rank turns into a
TensorParallelError naming it, within seconds, and the group is torn down."""

from __future__ import annotations

import datetime
import logging
import threading
import time

import torch
import torch.distributed as dist

from shardline.worker.config import EngineConfig
from shardline.worker.engine.executor import ModelSpec
from shardline.worker.engine.model_runner import StepInputs
from shardline.worker.parallel.channel import Command
from shardline.worker.parallel.launcher import ProcessLauncher, RankArgs, RankError, RankHandle, RankLauncher
from shardline.worker.parallel.rank import (
    RankRuntime,
    startup_timeout,
    joined_key,
    validate_tensor_parallel,
)

log = logging.getLogger(__name__)

_MONITOR_INTERVAL_S = 0.2
_DIAGNOSE_WAIT_S = 3.0  # how long a failed collective waits for the rank that caused it to show


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed or died; the group is unusable."""


class TensorParallelExecutor:
    """tensor_parallel_size ranks, rank 0 here. Implements the engine's Executor protocol."""

    def __init__(self, spec: ModelSpec, config: EngineConfig, show_progress: bool = True,
                 launcher: RankLauncher | None = None, master_addr: str = "127.0.0.1") -> None:
        self.world_size = config.tensor_parallel_size
        validate_tensor_parallel(spec.model_config, self.world_size, spec.device)
        self.launcher: RankLauncher = launcher or ProcessLauncher()
        self.handles: list[RankHandle] = []
        self.runtime: RankRuntime | None = None
        self.num_blocks = 0
        self._reports: list[RankError] = []
        self._failure: str | None = None
        self._step = 0
        self._closed = False
        self._step_lock = threading.Lock()  # one step (or command) on the channel at a time
        self._state_lock = threading.Lock()  # failure bookkeeping, shared with the monitor
        self._stop_event = threading.Event()
        timeout = startup_timeout(config)
        store = dist.TCPStore(master_addr, 0, self.world_size, True, timeout=timeout, wait_for_workers=False)
        self.master_port = store.port
        try:
            self.handles = self.launcher.start(self.world_size, RankArgs(master_addr, store.port, spec, config))
            self._monitor = threading.Thread(target=self._monitor_loop, daemon=True, name="tp-monitor")
            self._monitor.start()
            self._wait_for_ranks(store, timeout)
            self.runtime = RankRuntime(0, self.world_size, store, spec, config, show_progress)
            self.num_blocks = self.runtime.num_blocks
            self.weight_bytes = self.runtime.model.weight_bytes()  # rank 0's shard as held (packed when quantized)
            self.kv_bytes_per_token = self.runtime.kv_bytes_per_token
        except BaseException as exc:
            err = self._fail(exc)
            self.shutdown()
            raise err from exc

    # ---- Executor protocol ----------------------------------------------------------------------

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step on every rank; returns the sampling rows' logits (fp32, full vocabulary)."""
        self.check_health()
        with self._step_lock:
            runtime = self._runtime()
            step = self._step
            try:
                runtime.channel.send(Command.STEP, step, inputs)
                logits = runtime.run_step(step, inputs)
            except Exception as exc:
                raise self._fail(exc) from exc
            self._step += 1
            return logits

    def take_expert_load(self) -> list[int] | None:
        """Tokens per (sparse layer, expert) since the last call, from rank 0 (the router is
        replicated, so rank 0 counts every expert's tokens; None for dense models)."""
        load = self._runtime().model.expert_load
        return load.take_host() if load is not None else None

    def check_health(self) -> None:
        """Raise TensorParallelError if any rank has failed or died."""
        if self._failure is None and not self._closed:
            self._poll()
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        if self._closed:
            raise TensorParallelError("the tensor-parallel executor was shut down")

    def shutdown(self) -> None:
        """Stop every rank (asking first, then killing), leave the process group; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_event.set()
        clean = self._failure is None and self.runtime is not None
        if clean:
            with self._step_lock:
                try:
                    self.runtime.channel.send(Command.SHUTDOWN)  # type: ignore[union-attr]
                except Exception:  # noqa: BLE001 - the ranks are stopped below either way
                    log.warning("tensor-parallel shutdown: could not reach every rank", exc_info=True)
                    clean = False
        self.launcher.stop(timeout=5.0 if clean else 0.0)
        if self.runtime is not None:
            try:
                self.runtime.close()
            except Exception:  # noqa: BLE001
                log.warning("tensor-parallel shutdown: destroying the process group failed", exc_info=True)

    # ---- introspection (tests, diagnostics) -----------------------------------------------------

    @property
    def rank_pids(self) -> list[int | None]:
        """Process ids of ranks 1..tp-1 (None where a rank is not a local process)."""
        return [h.pid for h in self.handles]

    def parameter_counts(self) -> list[dict[str, int]]:
        """Each rank's parameter element counts by name, gathered over the group (no pickling)."""
        self.check_health()
        with self._step_lock:
            runtime = self._runtime()
            try:
                runtime.channel.send(Command.REPORT)
                return runtime.parameter_counts()
            except Exception as exc:
                raise self._fail(exc) from exc

    # ---- failure handling -----------------------------------------------------------------------

    def _runtime(self) -> RankRuntime:
        if self.runtime is None:
            raise TensorParallelError("the tensor-parallel executor is not running")
        return self.runtime

    def _wait_for_ranks(self, store: dist.Store, timeout: datetime.timedelta) -> None:
        """Wait until every rank reached the store, failing at once if one dies first (rather than
        at init_process_group's deadline)."""
        keys = [joined_key(h.rank) for h in self.handles]
        deadline = time.monotonic() + timeout.total_seconds()
        while not store.check(keys):
            self.check_health()
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks did not start within {timeout.total_seconds():.0f} s")
            time.sleep(0.05)

    def _diagnose(self) -> str | None:
        """What went wrong, if anything: a rank that died without a word first (killed), else the
        earliest report (the rank that raised; the others then fail on its closed sockets)."""
        self._reports.extend(self.launcher.errors())
        reported = {r.rank for r in self._reports}
        for handle, alive in zip(self.handles, self.launcher.alive()):
            if not alive and handle.rank not in reported:
                pid = f" (pid {handle.pid})" if handle.pid is not None else ""
                return f"tensor-parallel rank {handle.rank}{pid} died: {handle.exit_description()}"
        if self._reports:
            first = min(self._reports, key=lambda r: r.time)
            more = len({r.rank for r in self._reports}) - 1
            tail = f" ({more} other rank(s) failed after it)" if more else ""
            return f"tensor-parallel rank {first.rank} failed: {first.type}: {first.message}{tail}"
        return None

    def _poll(self) -> None:
        with self._state_lock:
            if self._failure is not None or self._closed:
                return
            cause = self._diagnose()
            if cause is None:
                return
            self._failure = cause
        log.error("%s; stopping the tensor-parallel group", cause)
        self._abort()

    def _fail(self, exc: BaseException) -> TensorParallelError:
        """Record a failure seen by rank 0 (waiting briefly for its cause to show), tear the group
        down and return the error to raise."""
        if isinstance(exc, TensorParallelError) and self._failure is not None:
            return exc
        deadline = time.monotonic() + _DIAGNOSE_WAIT_S
        with self._state_lock:
            while self._failure is None:
                cause = self._diagnose()
                if cause is not None:
                    self._failure = cause
                elif time.monotonic() > deadline:
                    self._failure = f"tensor-parallel rank 0 failed: {type(exc).__name__}: {exc}"
                else:
                    time.sleep(0.05)
        self._abort()
        return TensorParallelError(self._failure)

    def _abort(self) -> None:
        """Stop the surviving ranks now: the group is unusable, and a rank blocked on a collective
        with a dead peer must not linger (on NCCL it would wait for the collective timeout)."""
        if self.runtime is not None and self.runtime.backend == "nccl":
            try:
                self.runtime.data_group.abort()  # wakes rank 0 if it is inside an NCCL collective
            except Exception:  # noqa: BLE001
                log.debug("NCCL abort failed", exc_info=True)
        self.launcher.stop(timeout=0.0)

    def _monitor_loop(self) -> None:
        # Notices a dead or failed rank while the engine is idle, so check_health() says so.
        while not self._stop_event.wait(_MONITOR_INTERVAL_S):
            if self._failure is not None:
                return
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - the monitor must not die of a diagnosis error
                log.debug("tensor-parallel monitor poll failed", exc_info=True)
