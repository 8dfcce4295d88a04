"""Where the model runs. The engine hands each step's inputs to an Executor and gets back the
logits of the sampling rows. LocalExecutor runs the whole model in this process; the
tensor-parallel executor (worker/parallel/) runs rank 0 here and the other ranks elsewhere."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from shardline.worker.attention.metadata import get_attention_backend
from shardline.worker.config import ConfigError, EngineConfig, ModelConfig
from shardline.worker.engine.model_runner import (
    ModelRunner,
    SeqSlice,
    StepInputs,
    allocate_kv_caches,
    build_step_inputs,
    kv_bytes_per_block,
)
from shardline.worker.model import LlamaForCausalLM, initialize_dummy_weights
from shardline.worker.parallel.context import SINGLE, ParallelContext

log = logging.getLogger(__name__)


class Executor(Protocol):
    num_blocks: int

    def execute(self, inputs: StepInputs) -> torch.Tensor: ...

    def check_health(self) -> None: ...

    def shutdown(self) -> None: ...


@dataclass
class ModelSpec:
    """What every rank needs to build the same model: its shape, where weights come from, how."""

    model_config: ModelConfig
    source_path: str | None  # directory or .gguf file; None for dummy weights
    source_kind: str | None  # "safetensors" | "gguf" | None
    load_format: str
    dtype: torch.dtype
    device: torch.device
    attention_backend: str = "auto"
    seed: int = 0


def build_model(spec: ModelSpec, ctx: ParallelContext = SINGLE, show_progress: bool = True) -> LlamaForCausalLM:
    """Construct the model for this rank and fill its shard of the weights."""
    backend = get_attention_backend(spec.attention_backend, spec.device)
    model = LlamaForCausalLM(spec.model_config, ctx, backend, spec.dtype, spec.device)
    if spec.load_format == "dummy" or spec.source_path is None:
        initialize_dummy_weights(model, seed=spec.seed)
    else:
        from shardline.worker.loader.source import ModelSource

        source = ModelSource(spec=spec.source_path, kind=spec.source_kind, path=Path(spec.source_path))
        model.load_weights(source.iter_weights(show_progress=show_progress and ctx.rank == 0))
    return model.eval()


def num_blocks_for(config: EngineConfig, model_config: ModelConfig, num_kv_heads: int, dtype: torch.dtype,
                   device: torch.device, model: torch.nn.Module | None = None) -> int:
    """Size the KV pool: an explicit block count, an explicit CPU budget, a fraction of free host
    memory on CPU, or gpu_memory_utilization of the GPU after the weights (and a profiling pass)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_block(model_config, num_kv_heads, config.block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free  # weights, activations of the profiling pass, other processes
        peak = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
        budget = total * config.gpu_memory_utilization - used_by_others - peak
    elif config.kv_cache_memory_gb is not None:
        budget = config.kv_cache_memory_gb * 2**30
    else:
        budget = _available_host_memory() * config.cpu_kv_cache_fraction
    blocks = int(budget // per_block)
    if blocks < 2:
        raise ConfigError(
            f"KV cache: the memory budget ({budget / 2**30:.2f} GiB) holds {blocks} blocks of "
            f"{per_block / 2**20:.2f} MiB; raise gpu_memory_utilization / kv_cache_memory_gb or set num_kv_blocks"
        )
    return blocks


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def profile_peak_memory(model: LlamaForCausalLM, config: EngineConfig, num_kv_heads: int, dtype: torch.dtype,
                        device: torch.device) -> None:
    """One forward at the largest step the scheduler may build, so the allocator's peak includes
    the activations before the KV pool takes the rest of the GPU."""
    if device.type != "cuda":
        return
    n = config.max_num_batched_tokens
    bs = config.block_size
    blocks = -(-n // bs) + 1
    caches = allocate_kv_caches(model.config, num_kv_heads, blocks, bs, dtype, device)
    runner = ModelRunner(model, caches, bs, device)
    runner.execute(build_step_inputs([SeqSlice([0] * n, 0, list(range(1, blocks)), True)], bs, device))
    torch.cuda.synchronize(device)
    del caches, runner
    torch.cuda.empty_cache()


class LocalExecutor:
    """The whole model in this process (tensor_parallel_size 1)."""

    def __init__(self, spec: ModelSpec, config: EngineConfig, show_progress: bool = True) -> None:
        self.model = build_model(spec, SINGLE, show_progress)
        kv_heads = self.model.num_kv_heads_per_rank
        if spec.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(spec.device)
            profile_peak_memory(self.model, config, kv_heads, spec.dtype, spec.device)
        self.num_blocks = num_blocks_for(config, spec.model_config, kv_heads, spec.dtype, spec.device)
        caches = allocate_kv_caches(spec.model_config, kv_heads, self.num_blocks, config.block_size, spec.dtype, spec.device)
        self.runner = ModelRunner(self.model, caches, config.block_size, spec.device)

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        return self.runner.execute(inputs)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.runner = None  # type: ignore[assignment]
