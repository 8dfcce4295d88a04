"""Where the model runs. The engine hands each step's inputs to an Executor and gets back the
logits of the sampling rows. LocalExecutor runs the whole model in this process; the
tensor-parallel executor (worker/parallel/) runs rank 0 here and the other ranks elsewhere."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from shardline.worker.attention.kv_cache_dtype import FP8_KV
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
from shardline.worker.layers.quantization import QuantizationConfig
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
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)  # resolved scheme (none: float)
    kv_cache_dtype: torch.dtype | None = None  # the KV cache's storage (None: the model's dtype; fp8: e4m3)

    @property
    def resolved_kv_cache_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype if self.kv_cache_dtype is not None else self.dtype


def build_model(spec: ModelSpec, ctx: ParallelContext = SINGLE, show_progress: bool = True) -> LlamaForCausalLM:
    """Construct the model for this rank and fill its shard of the weights."""
    backend = get_attention_backend(spec.attention_backend, spec.device)
    model = LlamaForCausalLM(spec.model_config, ctx, backend, spec.dtype, spec.device, spec.quantization)
    if spec.load_format == "dummy" or spec.source_path is None:
        initialize_dummy_weights(model, seed=spec.seed)
        model.finish_loading()
    elif spec.source_kind is None:
        raise ValueError(f"ModelSpec: source_path {spec.source_path!r} comes without its source_kind")
    else:
        from shardline.worker.loader.source import ModelSource

        source = ModelSource(spec=spec.source_path, kind=spec.source_kind, path=Path(spec.source_path))
        model.load_weights(source.iter_weights(show_progress=show_progress and ctx.rank == 0))
    return model.eval()


@dataclass(frozen=True)
class MemoryProfile:
    """What the GPU holds before the KV pool: the two terms subtracted from its budget."""

    in_use_bytes: int  # device memory in use after loading weights: weights, CUDA context, other processes
    peak_activation_bytes: int  # the largest step's activations above that (profiling pass)


def num_blocks_for(config: EngineConfig, model_config: ModelConfig, num_kv_heads: int, kv_dtype: torch.dtype,
                   device: torch.device, model: torch.nn.Module | None = None,
                   profile: MemoryProfile | None = None) -> int:
    """Size the KV pool: an explicit block count, an explicit CPU budget, a fraction of free host
    memory on CPU, or on CUDA total * gpu_memory_utilization - (memory in use after loading the
    weights + the profiling pass's peak activations). Without `profile` the two terms are read now
    (after profile_peak_memory has run and released its activations). Blocks are sized in the KV
    cache's own dtype (`kv_dtype`: an FP8 cache fits twice the blocks of a bf16 one)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_block(model_config, num_kv_heads, config.block_size, kv_dtype, model_config.kv_cache_groups)
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        profile = profile or current_memory_profile(device)
        budget = total * config.gpu_memory_utilization - profile.in_use_bytes - profile.peak_activation_bytes
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


def arm_kv_scale_calibration_if_asked(model: LlamaForCausalLM, config: EngineConfig, kv_dtype: torch.dtype) -> None:
    """After start-up's dummy passes (profiling, CUDA-graph warm-up): an FP8 cache's layers without
    checkpoint scales take theirs from the first real batch (config.calculate_kv_scales)."""
    if kv_dtype == FP8_KV and config.calculate_kv_scales:
        n = model.arm_kv_scale_calibration()
        if n:
            log.info("fp8 KV cache: %d layers compute their k/v scales from the first batch", n)


def current_memory_profile(device: torch.device) -> MemoryProfile:
    """The device's in-use memory and this process's peak above its live tensors, read now.

    NOTE: total - free includes memory torch's allocator keeps cached but unused (left over from the
    profiling pass's activations unless empty_cache ran). The KV pool and later activations reuse
    it, and the peak term already accounts for the activations, so it is not counted as in use.
    """
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached_unused = torch.cuda.memory_reserved(device) - allocated
    peak = torch.cuda.max_memory_allocated(device) - allocated
    return MemoryProfile(in_use_bytes=total - free - cached_unused, peak_activation_bytes=max(0, peak))


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def profile_peak_memory(model: LlamaForCausalLM, config: EngineConfig, num_kv_heads: int, kv_dtype: torch.dtype,
                        device: torch.device) -> MemoryProfile | None:
    """One forward at the largest step the scheduler may build (max_num_batched_tokens tokens, and
    logits for max_num_seqs rows), so the budget leaves room for its activations before the KV pool
    takes the rest of the GPU. Returns the measured profile (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free  # weights, CUDA context, other processes
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    n = config.max_num_batched_tokens
    bs = config.block_size
    # Sequences no longer than the model's positions (the RoPE table ends there), each on its own blocks.
    longest = model.config.max_position_embeddings
    lengths = [min(longest, n - start) for start in range(0, n, longest)]
    slices, next_block = [], 1
    for length in lengths:
        used = -(-length // bs)
        slices.append(SeqSlice([0] * length, 0, list(range(next_block, next_block + used)), True))
        next_block += used
    caches = allocate_kv_caches(model.config, num_kv_heads, next_block, bs, kv_dtype, device)
    cache_bytes = sum(c.numel() * c.element_size() for c in caches)
    runner = ModelRunner(model, caches, bs, device)
    inputs = build_step_inputs(slices, bs, device)
    rows = min(n, config.max_num_seqs)
    inputs.sample_rows = torch.arange(n - rows, n, device=device)  # a full batch of logits
    runner.execute(inputs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - cache_bytes
    del caches, runner, inputs
    torch.cuda.empty_cache()
    return MemoryProfile(in_use_bytes=in_use, peak_activation_bytes=max(0, peak))


class LocalExecutor:
    """The whole model in this process (tensor_parallel_size 1).

    Startup order on CUDA: weights, profiling pass, KV pool, the small-batch linear choices
    (ModelRunner.tune_linears), then (unless enforce_eager) the decode CUDA graphs.
    config.extra["fused_kernels"]: 'auto' (default) | 'triton' | 'torch', see LlamaForCausalLM.set_fused_kernels.
    """

    def __init__(self, spec: ModelSpec, config: EngineConfig, show_progress: bool = True) -> None:
        if spec.device.type == "cuda" and spec.device.index is not None:
            # Graph capture, the memory profile and Triton launches use the current device.
            torch.cuda.set_device(spec.device)
        self.model = build_model(spec, SINGLE, show_progress)
        self.weight_bytes = self.model.weight_bytes()  # this rank's weights as held (packed when quantized)
        self.model.set_fused_kernels(str(config.extra.get("fused_kernels", "auto")))
        kv_heads = self.model.num_kv_heads_per_rank
        kv_dtype = spec.resolved_kv_cache_dtype
        # this rank's KV bytes per token, all layers, keys and values
        self.kv_bytes_per_token = kv_bytes_per_block(spec.model_config, kv_heads, 1, kv_dtype)
        profile = profile_peak_memory(self.model, config, kv_heads, kv_dtype, spec.device)
        self.num_blocks = num_blocks_for(config, spec.model_config, kv_heads, kv_dtype, spec.device, profile=profile)
        groups = spec.model_config.kv_cache_groups
        caches = allocate_kv_caches(spec.model_config, kv_heads, self.num_blocks, config.block_size, kv_dtype,
                                    spec.device, groups)
        self.runner = ModelRunner(self.model, caches, config.block_size, spec.device, groups.num_groups)
        self.runner.tune_linears()  # every decode batch bucket decided now, never while serving
        self.cuda_graphs = False
        if spec.device.type == "cuda" and not config.enforce_eager:
            max_batch = min(config.max_num_seqs, config.max_num_batched_tokens)
            self.cuda_graphs = self.runner.enable_cuda_graphs(max_batch, config.resolved_max_model_len(spec.model_config))
        arm_kv_scale_calibration_if_asked(self.model, config, kv_dtype)

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        return self.runner.execute(inputs)

    def take_expert_load(self) -> list[int] | None:
        """Tokens per (sparse layer, expert) since the last call (MoE models; None for dense ones)."""
        load = self.model.expert_load
        return load.take_host() if load is not None else None

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        """Drop the model, the KV pool and the graphs, so their device memory can be reused."""
        self.runner = None  # type: ignore[assignment]
        self.model = None  # type: ignore[assignment]
