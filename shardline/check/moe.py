"""The check's mixture-of-experts phase (issue 17): a second engine, on a Qwen3-30B-A3B-shaped model
with dummy weights (benchmarks/configs/qwen3-30b-a3b: 48 layers, 128 experts of 768, top 8; 30.5 B
parameters, 3.35 B active per token, 61 GB in bf16), started after the dense engine is freed. It
decodes at batch 1 and batch 64 and sets each rate against the bytes-read floor of that batch: a
step streams the attention and embedding weights once and, per layer, the experts its tokens chose
(batch 1: the active parameters, 6.7 GB; batch 64: nearly every expert, ~60 GB, see
shardline.bench.decode_step_weight_bytes) plus the KV of every sequence, at the copy bandwidth the
environment step measured."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from shardline.bench import (
    decode_floor_from_bytes,
    decode_step_weight_bytes,
    kv_bytes_per_token,
    random_prompts,
    release_device_memory,
    timed_decode,
)
from shardline.check.runner import Deadline
from shardline.worker.config import EngineConfig

if TYPE_CHECKING:
    from shardline.worker.engine.engine import LLMEngine


@dataclass(frozen=True)
class MoEWorkload:
    """Decode batches and lengths of the MoE step (at scale 1)."""

    batches: tuple[int, ...] = (1, 64)
    input_len: int = 128
    decode_steps: int = 128

    def scaled(self, scale: float) -> "MoEWorkload":
        """Lengths times `scale` (at least 16 in, 4 steps); the batches stay, they are the point."""
        if scale == 1.0:
            return self
        return replace(self, input_len=max(16, round(self.input_len * scale)),
                       decode_steps=max(4, round(self.decode_steps * scale)))


class MoEPhase:
    """Holds the MoE engine between its two steps; `bandwidth_b_s` is the environment step's copy
    bandwidth in bytes/s (0 when it did not run: the floor is then not computed)."""

    def __init__(self, config: EngineConfig, model_spec: str, workload: MoEWorkload, bandwidth_b_s: float,
                 seed: int = 0) -> None:
        self.config = config.replace(model=model_spec, max_num_seqs=max(config.max_num_seqs, max(workload.batches)))
        self.w = workload
        self.bandwidth = bandwidth_b_s
        self.seed = seed
        self.engine: LLMEngine | None = None
        self.dtype_bytes = torch.tensor([], dtype=config.resolved_dtype()).element_size()

    def startup(self, deadline: Deadline) -> dict[str, Any]:
        """Dummy weights, profiling pass, KV pool, linear choices, graphs, one small generate."""
        from shardline.bench import warm_up
        from shardline.worker.engine.engine import LLMEngine

        t0 = time.perf_counter()
        engine = self.engine = LLMEngine(self.config, show_progress=False)
        warm_up(engine)
        model = engine.model_config
        if model.moe is None:
            raise ValueError(f"--moe-model {self.config.model}: {model.architecture} is not a mixture of experts")
        return {"startup_s": time.perf_counter() - t0, "model": self.config.model, "num_params": model.num_params,
                "num_active_params": model.num_active_params, "num_experts": model.moe.num_experts,
                "num_experts_per_tok": model.moe.num_experts_per_tok, "num_kv_blocks": engine.executor.num_blocks}

    def decode(self, deadline: Deadline) -> dict[str, Any]:
        """Per batch B: decode tok/s after every request has its first token, the floor at the
        mean context (input + steps / 2), and the share of the floor reached."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("the MoE engine is not running (its start-up failed or was skipped)")
        w, model = self.w, engine.model_config
        out: dict[str, Any] = {"input_len": w.input_len, "decode_steps": w.decode_steps}
        kv_token = kv_bytes_per_token(model, self.dtype_bytes)
        for b in w.batches:
            prompts = random_prompts(b, w.input_len, model.vocab_size, self.seed + b)
            r = timed_decode(engine, prompts, w.decode_steps, deadline.check)
            weight_bytes = decode_step_weight_bytes(model, b, self.dtype_bytes)
            floor = (decode_floor_from_bytes(weight_bytes, kv_token, b, w.input_len + w.decode_steps / 2,
                                             self.bandwidth) if self.bandwidth > 0 else None)
            out[f"b{b}_output_tokens_per_s"] = r["output_tokens_per_s"]
            out[f"b{b}_ms_per_step"] = r["ms_per_step"]
            out[f"b{b}_weight_gb_per_step"] = weight_bytes / 1e9
            out[f"b{b}_floor_tokens_per_s"] = floor
            out[f"b{b}_pct_of_floor"] = 100 * r["output_tokens_per_s"] / floor if floor else None
        return out

    def free(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        release_device_memory(self.config.resolved_device())
