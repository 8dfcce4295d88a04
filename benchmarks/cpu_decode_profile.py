"""Where one batch-1 decode step of the engine spends its CPU time (docs/quantization.md, "Where a
CPU decode step goes").

Runs one request (random prompt of --input-len ids, greedy, ignore_eos) through an LLMEngine in this
process and splits each decode step's process CPU time (`time.process_time`, all threads of the
process: on a shared machine CPU time, unlike wall time, is not inflated by other processes) into:
the model's forward (embedding .. final norm), the LM head, sampling, and the rest of engine.step
(scheduler, input building, detokenizer, bookkeeping). Then torch.profiler over a few more decode
steps: aten op counts per step and self CPU time per op, grouped (matmul kernels, attention, the
other ops), and the time the profiler attributes to no op at all (Python between ops).

    python benchmarks/cpu_decode_profile.py --model smollm2-135m --quantization gguf --threads 1

Figures are per decode step (= per output token at batch 1).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

MATMUL_OPS = ("aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm", "aten::linear", "aten::mm",
              "aten::addmm", "aten::matmul", "aten::_scaled_mm", "aten::bmm")
ATTENTION_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::index_copy_", "aten::index_select")


@dataclass
class CpuClock:
    """Accumulated process CPU seconds of wrapped callables, by label."""

    seconds: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    active: bool = False

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(*args, **kwargs)
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.process_time() - t0

        return timed


def build_engine(args: argparse.Namespace):
    from shardline.worker.config import EngineConfig
    from shardline.worker.engine.engine import LLMEngine

    cfg = EngineConfig(model=args.model, quantization=args.quantization, num_kv_blocks=args.num_kv_blocks,
                       dtype=args.dtype)
    return LLMEngine(cfg, show_progress=False)


def decode_steps(engine, prompt: list[int], steps: int, on_decode: Callable[[int], None] | None = None) -> None:
    """Prefill `prompt`, then run `steps` decode steps, calling on_decode(i) before each."""
    from shardline.worker.engine.params import SamplingParams

    rid = engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill + first token
    for i in range(steps):
        if on_decode is not None:
            on_decode(i)
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    del rid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed by process_time")
    p.add_argument("--profile-steps", type=int, default=8, help="decode steps under torch.profiler")
    p.add_argument("--num-kv-blocks", type=int, default=256)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args)
    model = engine.executor.runner.model if hasattr(engine.executor, "runner") else None
    rng = random.Random(0)
    prompt = [rng.randrange(10, engine.model_config.vocab_size) for _ in range(args.input_len)]
    engine.generate([[11] * 16], None)  # warm-up

    clock = CpuClock()
    if model is not None:
        model.forward = clock.wrap("model forward (layers)", model.forward)  # type: ignore[method-assign]
        model.compute_logits = clock.wrap("LM head", model.compute_logits)  # type: ignore[method-assign]
    engine.sampler.__class__.__call__  # noqa: B018 (the sampler is an instance; wrap its bound call)
    sampler_call = engine.sampler.__call__
    engine.sampler = _Proxy(engine.sampler, clock.wrap("sampling", sampler_call))
    engine.step = clock.wrap("engine.step (total)", engine.step)  # type: ignore[method-assign]
    if model is not None:  # the quantized matmuls (activation casts included), inside the layers' time
        from shardline.worker.layers.quantization import QuantMethod

        for module in model.modules():
            if isinstance(module, QuantMethod) and module is not model.lm_head.quant_method:
                module.forward = clock.wrap("  of which linear kernels", module.forward)  # type: ignore[method-assign]

    def on(i: int) -> None:
        clock.active = True

    decode_steps(engine, prompt, args.steps, on)
    clock.active = False
    per_step = {k: v / args.steps * 1e3 for k, v in clock.seconds.items()}
    total = per_step.get("engine.step (total)", 0.0)
    parts = {k: v for k, v in per_step.items() if k != "engine.step (total)"}
    parts["engine bookkeeping (the rest of step)"] = total - sum(v for k, v in parts.items() if not k.startswith(" "))

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_steps(engine, prompt, args.profile_steps)
    # the prefill step and the final step are in the trace too: count per decode step approximately
    n = args.profile_steps + 1
    events = prof.key_averages()
    rows = []
    groups: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, float] = collections.defaultdict(float)
    op_total_us = 0.0
    for e in events:
        if not e.key.startswith("aten::"):
            continue
        group = "matmul kernels" if e.key in MATMUL_OPS else "attention ops" if e.key in ATTENTION_OPS else "other aten ops"
        groups[group] += e.self_cpu_time_total
        counts[group] += e.count
        op_total_us += e.self_cpu_time_total
        rows.append((e.key, e.count / n, e.self_cpu_time_total / n / 1e3))
    rows.sort(key=lambda r: -r[2])
    report = {
        "model": args.model, "quantization": engine.quantization.name, "dtype": str(engine.dtype),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "cpu_ms_per_decode_step": per_step, "cpu_ms_split": parts,
        "aten_ops_per_step": sum(counts.values()) / n,
        "profiler_self_cpu_ms_per_step_by_group": {k: v / n / 1e3 for k, v in groups.items()},
        "profiler_ops_per_step_by_group": {k: v / n for k, v in counts.items()},
        "top_ops": [{"op": k, "calls_per_step": c, "self_cpu_ms_per_step": t} for k, c, t in rows[: args.top]],
    }
    engine.shutdown()
    if args.json:
        print(json.dumps(report))
        return
    print(f"model={args.model} quantization={report['quantization']} dtype={report['dtype']} "
          f"threads={report['threads']} load_average={report['load_average']}")
    print(f"process CPU ms per decode step (over {args.steps} steps):")
    for k, v in parts.items():
        print(f"  {k:40s} {v:8.2f}  {100 * v / total:5.1f} %")
    print(f"  {'engine.step (total)':40s} {total:8.2f}")
    print(f"aten ops per decode step: {report['aten_ops_per_step']:.0f}")
    for k, v in report["profiler_self_cpu_ms_per_step_by_group"].items():
        print(f"  {k:40s} {v:8.2f} ms  {report['profiler_ops_per_step_by_group'][k]:6.0f} ops")
    print("top ops (self CPU ms per step, calls per step):")
    for r in report["top_ops"]:
        print(f"  {r['op']:55s} {r['self_cpu_ms_per_step']:8.3f}  {r['calls_per_step']:7.1f}")


class _Proxy:
    """The sampler with its __call__ replaced (instances' dunder calls go through the class)."""

    def __init__(self, inner: Any, call: Callable[..., Any]) -> None:
        self._inner, self._call = inner, call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


if __name__ == "__main__":
    main()
