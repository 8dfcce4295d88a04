"""What every rank of a tensor-parallel group does: join the group, build its shard of the model,
agree with the others on the KV pool size, and run steps. Rank 0 holds a RankRuntime inside the
engine's process; ranks 1..tp-1 run rank_main, whatever started them (a spawned process today, a
Ray actor later), so nothing here assumes how the rank was launched."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
import traceback
from typing import Any, Protocol

import torch
import torch.distributed as dist

from shardline.worker.config import ConfigError, EngineConfig, ModelConfig
from shardline.worker.engine.executor import (
    ModelSpec,
    arm_kv_scale_calibration_if_asked,
    build_model,
    num_blocks_for,
    profile_peak_memory,
)
from shardline.worker.engine.model_runner import ModelRunner, StepInputs, allocate_kv_caches, kv_bytes_per_block
from shardline.worker.parallel.channel import Command, StepChannel
from shardline.worker.parallel.context import ParallelContext

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
# NOTE: ranks 1..tp-1 wait for rank 0's next header for as long as the engine idles, so the
# control group's deadline is effectively none; a dead rank 0 still ends them (its sockets close,
# and the process launcher watches the parent).
_IDLE_TIMEOUT = datetime.timedelta(days=3650)
FAULT_ENV = "SHARDLINE_TP_FAULT_INJECTION"


class ErrorSink(Protocol):
    """Where a failing rank reports (rank, unix time, exception type, message, traceback) before it
    exits: a pipe for spawned processes, anything with put() elsewhere (a Ray queue)."""

    def put(self, item: tuple[int, float, str, str, str]) -> None: ...


def collective_timeout(config: EngineConfig) -> datetime.timedelta:
    """Deadline of every collective of a step (config.extra["tp_timeout_s"], default 120 s)."""
    return datetime.timedelta(seconds=float(config.extra.get("tp_timeout_s", DEFAULT_TIMEOUT_S)))


def startup_timeout(config: EngineConfig) -> datetime.timedelta:
    """Deadline of joining the group and building the shards (spawning, importing torch and
    loading weights take far longer than a step): config.extra["tp_startup_timeout_s"], default
    300 s, never shorter than the collective timeout."""
    seconds = float(config.extra.get("tp_startup_timeout_s", 300.0))
    return max(datetime.timedelta(seconds=seconds), collective_timeout(config))


def validate_tensor_parallel(cfg: ModelConfig, tp: int, device: torch.device) -> None:
    """Raise ConfigError, before any process starts, when the model cannot be split tp ways."""
    if tp < 1:
        raise ConfigError(f"tensor_parallel_size: must be >= 1, got {tp}")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % tp:
        raise ConfigError(f"tensor_parallel_size {tp}: num_attention_heads {heads} is not divisible by it")
    if kv >= tp and kv % tp:
        raise ConfigError(f"tensor_parallel_size {tp}: num_key_value_heads {kv} is not divisible by it")
    if kv < tp and tp % kv:
        raise ConfigError(f"tensor_parallel_size {tp}: not a multiple of num_key_value_heads {kv}, "
                          "so key/value heads cannot be replicated evenly")
    moe = cfg.moe
    has_dense_mlp = moe is None or not all(moe.is_sparse_layer(i) for i in range(cfg.num_hidden_layers))
    if has_dense_mlp and cfg.intermediate_size % tp:
        raise ConfigError(f"tensor_parallel_size {tp}: intermediate_size {cfg.intermediate_size} is not divisible by it")
    if moe is not None:
        from shardline.worker.layers.moe import ExpertPlacement

        try:
            ExpertPlacement.plan(moe, ParallelContext(0, tp))
        except ValueError as e:
            raise ConfigError(f"tensor_parallel_size {tp}: {e}") from None
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if tp > n:
            raise ConfigError(f"tensor_parallel_size {tp}: only {n} CUDA device(s) visible")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of `rank`: cpu stays cpu; on CUDA, ranks take consecutive visible GPUs from the
    configured one (a Ray actor that sees one GPU gets cuda:0)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", ((device.index or 0) + rank) % torch.cuda.device_count())


def fault_step_for(config: EngineConfig, rank: int) -> int | None:
    """Test hook: the 0-based step at which this rank raises inside forward, from
    config.extra["fault_injection"] = {"rank": R, "step": K} or $SHARDLINE_TP_FAULT_INJECTION="R:K"."""
    spec: Any = config.extra.get("fault_injection")
    if spec is None and os.environ.get(FAULT_ENV):
        r, _, k = os.environ[FAULT_ENV].partition(":")
        spec = {"rank": int(r), "step": int(k or 0)}
    if spec and int(spec["rank"]) == rank:
        return int(spec["step"])
    return None


class InjectedFault(RuntimeError):
    """Raised by the fault-injection test hook inside a rank's forward."""


def joined_key(rank: int) -> str:
    return f"shardline_tp_joined_{rank}"


class RankRuntime:
    """One rank's process-group membership, model shard, KV pool and step channel."""

    def __init__(self, rank: int, world_size: int, store: dist.Store, spec: ModelSpec, config: EngineConfig,
                 show_progress: bool = False) -> None:
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group; "
                               "one tensor-parallel group per process")
        self.rank = rank
        self.world_size = world_size
        self.device = rank_device(spec.device, rank)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._closed = False
        timeout = startup_timeout(config)
        dist.init_process_group(self.backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        try:
            self._setup(spec, config, timeout, show_progress)
            self.data_group.set_timeout(collective_timeout(config))  # from now on a step's deadline
        except BaseException:
            dist.destroy_process_group()  # leave no half-built group behind in this process
            raise

    def _setup(self, spec: ModelSpec, config: EngineConfig, timeout: datetime.timedelta, show_progress: bool) -> None:
        rank = self.rank
        world = dist.group.WORLD
        if world is None:  # init_process_group (the caller's) sets it
            raise RuntimeError("torch.distributed: no default process group after init_process_group")
        self.data_group: dist.ProcessGroup = world
        self.control_group = dist.new_group(backend="gloo", timeout=timeout)
        self.control_group.set_timeout(_IDLE_TIMEOUT)
        self.ctx = ParallelContext(rank, self.world_size, self.data_group)
        spec = dataclasses.replace(spec, device=self.device)
        self.model = build_model(spec, self.ctx, show_progress and rank == 0)
        kv_heads = self.model.num_kv_heads_per_rank
        kv_dtype = spec.resolved_kv_cache_dtype
        self.kv_bytes_per_token = kv_bytes_per_block(spec.model_config, kv_heads, 1, kv_dtype)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            profile_peak_memory(self.model, config, kv_heads, kv_dtype, self.device)
        local = num_blocks_for(config, spec.model_config, kv_heads, kv_dtype, self.device)
        agreed = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.control_group)
        self.num_blocks = int(agreed.item())
        groups = spec.model_config.kv_cache_groups
        caches = allocate_kv_caches(spec.model_config, kv_heads, self.num_blocks, config.block_size, kv_dtype,
                                    self.device, groups)
        self.runner = ModelRunner(self.model, caches, config.block_size, self.device, groups.num_groups)
        arm_kv_scale_calibration_if_asked(self.model, config, kv_dtype)
        self.runner.tune_linears()  # this rank's shards, every decode batch bucket, before serving
        self.channel = StepChannel(self.control_group, self.data_group, self.device)
        self.fault_step = fault_step_for(config, rank)

    def run_step(self, step: int, inputs: StepInputs) -> torch.Tensor:
        """Run this rank's shard of one forward; every rank returns the full sampled logits."""
        if step == self.fault_step:
            return self._run_faulty_step(step, inputs)
        return self.runner.execute(inputs)

    def _run_faulty_step(self, step: int, inputs: StepInputs) -> torch.Tensor:
        # Raise half-way through the layers, so the other ranks are inside a collective.
        layer = self.model.layers[len(self.model.layers) // 2]

        def explode(*_: Any) -> None:
            raise InjectedFault(f"fault injected into rank {self.rank} at step {step} (test hook)")

        hook = layer.register_forward_pre_hook(explode)
        try:
            return self.runner.execute(inputs)
        finally:
            hook.remove()

    def parameter_counts(self) -> list[dict[str, int]]:
        """Every rank's parameter element counts by name (a collective: all ranks call it)."""
        names = [n for n, _ in self.model.named_parameters()]
        mine = torch.tensor([p.numel() for _, p in self.model.named_parameters()], dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.control_group)
        return [dict(zip(names, p.tolist())) for p in parts]

    def close(self) -> None:
        """Leave the process group (this process may then join another); idempotent."""
        self.runner = None  # type: ignore[assignment]
        if not self._closed:
            self._closed = True
            dist.destroy_process_group()


def report_error(sink: ErrorSink | None, rank: int, exc: BaseException) -> None:
    """Send what went wrong to rank 0 (never raises)."""
    if sink is None:
        return
    try:
        sink.put((rank, time.time(), type(exc).__name__, str(exc), traceback.format_exc()))
    except Exception:  # noqa: BLE001 - the rank is failing already; the exit code still tells
        log.exception("rank %d could not report its error", rank)


def rank_main(rank: int, world_size: int, master_addr: str, master_port: int, spec: ModelSpec,
              config: EngineConfig, error_queue: ErrorSink | None = None) -> int:
    """The life of rank 1..tp-1: join rank 0's group, build the shard, run steps until SHUTDOWN.
    Returns 0 after a clean shutdown; on any error reports it to `error_queue` and returns 1, and
    the caller must then end the process (its group's sockets closing is what tells the others)."""
    try:
        timeout = startup_timeout(config)
        store = dist.TCPStore(master_addr, master_port, world_size, False, timeout=timeout)
        store.set(joined_key(rank), str(os.getpid()))
        runtime = RankRuntime(rank, world_size, store, spec, config)
        while True:
            msg = runtime.channel.recv()
            if msg.command == Command.STEP and msg.inputs is not None:
                runtime.run_step(msg.step, msg.inputs)
            elif msg.command == Command.REPORT:
                runtime.parameter_counts()
            elif msg.command == Command.SHUTDOWN:
                runtime.close()
                return 0
    except BaseException as exc:  # noqa: BLE001 - every failure must reach rank 0
        report_error(error_queue, rank, exc)
        return 1
