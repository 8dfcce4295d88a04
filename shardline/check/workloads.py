"""The check's engine phase: ONE engine, started once, runs every workload in turn, then is freed
for transformers' baseline. Each workload is a method taking the step's Deadline, whose check()
runs between engine steps; a workload stopped there aborts its requests and drains the engine
(shardline.bench.run_to_completion / stream_one), so the next workload starts on an idle engine.

Workloads (issue 11; sizes at scale 1, the field's benchmark shapes, see docs/performance.md):
batch-1 latency 128 in / 256 out with overlapped scheduling on, then off; 500 prompts of
200 in / 180 out at once; 128 prompts of 128 in / 256 out (the transformers comparison);
64 prompts of 2048 in / 128 out with 75 % shared prefix, prefix cache on, then cleared and off;
TTFT of 512, 2048 and 8191-token prompts (8191: the prompt and its token fit 8192 positions)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shardline.bench import (
    hf_generate_throughput,
    prefill_flops,
    random_prompts,
    release_device_memory,
    run_offline_once,
    stream_one,
)
from shardline.check.runner import Deadline
from shardline.worker.config import EngineConfig, ModelConfig

if TYPE_CHECKING:
    from shardline.worker.engine.engine import LLMEngine


@dataclass(frozen=True)
class Workloads:
    """Sizes of every engine-phase workload (tokens and prompt counts)."""

    latency_input_len: int = 128
    latency_output_len: int = 256
    latency_iters: int = 2
    many_prompts: int = 500
    many_input_len: int = 200
    many_output_len: int = 180
    batch_prompts: int = 128
    batch_input_len: int = 128
    batch_output_len: int = 256
    prefix_prompts: int = 64
    prefix_input_len: int = 2048
    prefix_output_len: int = 128
    prefix_shared_fraction: float = 0.75
    ttft_prompt_lens: tuple[int, ...] = (512, 2048, 8191)
    ttft_iters: int = 3

    def scaled(self, scale: float) -> "Workloads":
        """Every count and length times `scale` (at least 1 prompt, 2 output and 16 input tokens):
        the same steps in a few seconds on a CPU with a tiny model."""
        if scale == 1.0:
            return self

        def n(x: int, least: int) -> int:
            return max(least, round(x * scale))

        return replace(self, latency_input_len=n(self.latency_input_len, 16), latency_output_len=n(self.latency_output_len, 4),
                       many_prompts=n(self.many_prompts, 2), many_input_len=n(self.many_input_len, 16),
                       many_output_len=n(self.many_output_len, 2), batch_prompts=n(self.batch_prompts, 2),
                       batch_input_len=n(self.batch_input_len, 16), batch_output_len=n(self.batch_output_len, 2),
                       prefix_prompts=n(self.prefix_prompts, 2), prefix_input_len=n(self.prefix_input_len, 64),
                       prefix_output_len=n(self.prefix_output_len, 2),
                       ttft_prompt_lens=tuple(n(x, 16) for x in self.ttft_prompt_lens))

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_input_len * self.prefix_shared_fraction)


class EnginePhase:
    """Holds the phase's one engine; each public method is one step of the check."""

    def __init__(self, config: EngineConfig, model: ModelConfig, workloads: Workloads, seed: int = 0,
                 linear_choice_table: Path | None = None) -> None:
        longest = max(workloads.ttft_prompt_lens)
        # The engine is sized (profiling pass, activations) for one prefill step of the longest TTFT
        # prompt, as `shardline bench prefill` does; the other workloads run at the configured
        # per-step budget (2048 by default, as `shardline bench`): with 8192, the first step of the
        # shared-prefix workload would prefill four prompts before any could hit the cache.
        self.step_budget = config.max_num_batched_tokens
        self.config = config.replace(max_num_batched_tokens=max(config.max_num_batched_tokens, longest + 1))
        self.w = workloads
        self.vocab_size = model.vocab_size
        self.linear_choice_table = linear_choice_table  # a saved cuBLAS-or-matvec table to load first
        self.seed = seed
        self.engine: LLMEngine | None = None  # between startup() and free()
        self.device: torch.device = config.resolved_device()
        self.dtype: torch.dtype = config.resolved_dtype()

    # ---- start and free -----------------------------------------------------------------------

    def startup(self, deadline: Deadline) -> dict[str, Any]:
        """Weights, the profiling pass, the KV pool, the linear-choice timing (every decode batch
        bucket of every linear; skipped for the shapes a saved table of this machine holds), the
        decode graphs, then one small generate that compiles the prefill kernels."""
        from shardline.bench import warm_up
        from shardline.worker.engine.engine import LLMEngine
        from shardline.worker.kernels.linear_choice import linear_choices, load_linear_choices

        loaded = load_linear_choices(self.linear_choice_table, self.device) if self.linear_choice_table else 0
        t0 = time.perf_counter()
        engine = self.engine = LLMEngine(self.config, show_progress=False)
        built = time.perf_counter() - t0
        warm_up(engine)
        runner = getattr(engine.executor, "runner", None)
        graphs = getattr(runner, "graphs", None)
        choices = list(linear_choices().items())
        return {
            "startup_s": time.perf_counter() - t0,
            "engine_build_s": built,
            "cuda_graphs": bool(getattr(engine.executor, "cuda_graphs", False)),
            "graph_capture_s": getattr(graphs, "capture_seconds", 0.0),
            "graph_batch_sizes": len(getattr(graphs, "batch_sizes", []) or []),
            "num_kv_blocks": engine.executor.num_blocks,
            "max_num_batched_tokens": self.config.max_num_batched_tokens,
            "linear_choices": len(choices),
            "linear_choices_loaded": loaded,  # from a saved table of this machine: not measured again
            "linear_choices_triton": sum(1 for _, impl in choices if impl.kind == "triton"),
            # per bucket and weight shape: choice, cuBLAS ms, best correct Triton ms (graph-timed over
            # rotating weight copies), the chosen one's weight stream in GB/s, candidates rejected
            "linear_choice_table": {f"M{k[0]} N{k[1]} K{k[2]} {str(k[3]).removeprefix('torch.')}":
                                    [impl.kind, impl.torch_ms, impl.triton_ms, impl.weight_gb_per_s(k[1], k[2], k[3]),
                                     impl.rejected]
                                    for k, impl in choices},
        }

    def free(self) -> None:
        """Shut the engine down and return its memory (transformers needs the GPU next)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        release_device_memory(self.device)

    # ---- workloads ----------------------------------------------------------------------------

    def _ready(self, step_budget: int, overlap: bool | None = None) -> LLMEngine:
        """The engine, idle, set for the next workload: this per-step token budget (the scheduler
        reads it at every step) and overlapped scheduling as given (default: the config's)."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("the engine is not running (start-up failed or it was freed)")
        engine.scheduler.max_num_batched_tokens = step_budget
        engine.async_scheduling = self.config.resolved_async_scheduling() if overlap is None else overlap
        return engine

    def _prompts(self, n: int, input_len: int, salt: int, prefix_len: int = 0) -> list[list[int]]:
        return random_prompts(n, input_len, self.vocab_size, self.seed + salt, prefix_len)

    def latency(self, deadline: Deadline, overlap: bool) -> dict[str, Any]:
        """Batch 1, one request at a time; decode rate between the 2nd and the last token."""
        engine = self._ready(self.step_budget, overlap)
        w = self.w
        prompt = self._prompts(1, w.latency_input_len, salt=1)[0]
        per_token, ttfts = [], []
        for _ in range(w.latency_iters):
            timing = stream_one(engine, prompt, w.latency_output_len, deadline.check)
            per_token.append(timing.seconds_per_decode_token(w.latency_output_len))
            ttfts.append(timing.ttft_s)
        s = statistics.median(per_token)
        return {"overlap": overlap, "input_len": w.latency_input_len, "output_len": w.latency_output_len,
                "iters": w.latency_iters, "ms_per_output_token": s * 1e3, "output_tokens_per_s": 1.0 / s,
                "ttft_ms": statistics.median(ttfts) * 1e3}

    def many_at_once(self, deadline: Deadline) -> dict[str, Any]:
        """500 prompts of 200 in / 180 out submitted at once."""
        w = self.w
        prompts = self._prompts(w.many_prompts, w.many_input_len, salt=2)
        r = run_offline_once(self._ready(self.step_budget), prompts, [w.many_output_len] * len(prompts), deadline.check)
        return {"num_prompts": len(prompts), "input_len": w.many_input_len, "output_len": w.many_output_len, **r}

    def batch_prompts(self) -> list[list[int]]:
        """The 128 x 128/256 prompts: the same ids for the engine and for transformers."""
        return self._prompts(self.w.batch_prompts, self.w.batch_input_len, salt=3)

    def batch(self, deadline: Deadline) -> dict[str, Any]:
        w = self.w
        prompts = self.batch_prompts()
        r = run_offline_once(self._ready(self.step_budget), prompts, [w.batch_output_len] * len(prompts), deadline.check)
        return {"num_prompts": len(prompts), "input_len": w.batch_input_len, "output_len": w.batch_output_len, **r}

    def prefix(self, deadline: Deadline, cache_on: bool) -> dict[str, Any]:
        """2048 in / 128 out, 75 % of each prompt shared. Cache off: the cache is cleared first and
        stays off for the TTFT step (whose repeated prompts must not hit it)."""
        engine = self._ready(self.step_budget)
        bm = engine.block_manager
        if not cache_on:
            if not bm.reset_prefix_cache():
                raise RuntimeError("the prefix cache could not be cleared: blocks are still referenced")
        bm.enable_prefix_caching = cache_on
        w = self.w
        prompts = self._prompts(w.prefix_prompts, w.prefix_input_len, salt=4, prefix_len=w.prefix_len)
        r = run_offline_once(engine, prompts, [w.prefix_output_len] * len(prompts), deadline.check)
        return {"prefix_cache": cache_on, "num_prompts": len(prompts), "input_len": w.prefix_input_len,
                "output_len": w.prefix_output_len, "shared_prefix_len": w.prefix_len, **r}

    def ttft(self, deadline: Deadline) -> dict[str, Any]:
        """Time to the first token of one prompt alone, prefix cache off; median of ttft_iters."""
        engine = self._ready(self.config.max_num_batched_tokens)
        bm = engine.block_manager
        bm.reset_prefix_cache()
        bm.enable_prefix_caching = False
        lens = self.w.ttft_prompt_lens
        # The target is the 2048-token prompt (the second length, also when scaled).
        out: dict[str, Any] = {"iters": self.w.ttft_iters, "target_prompt_len": lens[min(1, len(lens) - 1)]}
        for n in lens:
            prompt = self._prompts(1, n, salt=5 + n)[0]
            times = [stream_one(engine, prompt, 1, deadline.check).ttft_s for _ in range(self.w.ttft_iters)]
            out[f"ttft_ms_{n}"] = statistics.median(times) * 1e3
            out[f"flops_{n}"] = prefill_flops(engine.model_config, n)
        return out

    # ---- the baseline -------------------------------------------------------------------------

    def transformers_baseline(self, deadline: Deadline, model_spec: str, load_format: str) -> dict[str, Any]:
        """transformers' generate on the 128 x 128/256 prompts, after the engine is freed."""
        self.free()
        prompts = self.batch_prompts()
        r = hf_generate_throughput(self.device, self.dtype, prompts, self.w.batch_output_len, model_spec, load_format,
                                   max_batch=self.w.batch_prompts)
        return {"num_prompts": len(prompts), "input_len": self.w.batch_input_len, "output_len": self.w.batch_output_len, **r}
