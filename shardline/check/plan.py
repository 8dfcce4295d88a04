"""`shardline bench check`: the GPU check of issue 11 in one process and one budget (default 540 s).

Order (each step writes its JSON line to OUT_DIR/results.jsonl as soon as it ends):
1. environment: versions, device, commit, copy bandwidth and matmul rate;
2. correctness (at most CORRECTNESS_LIMIT_S = 90 s in all): every Triton kernel against its torch reference at the model's
   shapes, a real engine on a tiny Llama against transformers' greedy tokens, one graph-replayed
   decode step against eager;
3. ONE engine on the model's shape (dummy weights): start-up, then each workload of
   shardline/check/workloads.py under its own cap, then the engine is freed;
4. transformers' generate on the batch-128 workload, for the ratio;
5. a second engine on a Qwen3-30B-A3B-shaped mixture of experts (dummy weights, --moe-model):
   decode at batch 1 and 64 against the bytes-read floor of the experts each step runs
   (shardline/check/moe.py), last so that it never takes time from the steps before;
6. the summary table (shardline/check/summary.py), printed last and written to summary.txt.

STEPS holds every step's cap and its estimate on an H200 (docs/performance.md lists them; the
estimates add up to well under the budget, the caps bound the worst case and the budget cuts them
so the run ends in time; the transformers step keeps `reserve_s` for itself)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from shardline.check.runner import FAILED, OK, CheckRun, Deadline, StepSpec

STEPS: list[StepSpec] = [
    StepSpec("environment", "environment", 20, 8, "versions, device, commit; copy bandwidth and matmul rate"),
    StepSpec("attention_decode", "correctness", 30, 10, "paged attention, pure decode (split-K), vs torch"),
    StepSpec("attention_mixed", "correctness", 25, 10, "paged attention, prefills + cached prefixes + decodes, vs torch"),
    StepSpec("kv_write", "correctness", 10, 2, "KV-write kernel vs torch, padding rows store nothing"),
    StepSpec("matvec", "correctness", 30, 8, "skinny GEMM at QKV/O/gate-up/down shapes, M = 1, 4, 16, vs fp32 matmul"),
    StepSpec("fused_norm_rope_act", "correctness", 15, 5, "RMSNorm+residual, RoPE, SiLU-and-mul vs torch"),
    StepSpec("engine_vs_transformers", "correctness", 30, 12, "tiny Llama engine (graphs on GPU) vs transformers, greedy"),
    StepSpec("graph_vs_eager", "correctness", 10, 1, "one graph-replayed decode step vs the same step eager"),
    StepSpec("startup", "engine", 120, 75, "weights, profiling pass, KV pool, linear choices, graphs, warm-up"),
    StepSpec("latency_b1_overlap", "engine", 20, 5, "batch 1, 128 in / 256 out, overlapped scheduling"),
    StepSpec("latency_b1_sync", "engine", 20, 5, "batch 1, 128 in / 256 out, overlap off"),
    StepSpec("many_500x200_180", "engine", 50, 15, "500 prompts of 200 in / 180 out at once"),
    StepSpec("batch128_128x256", "engine", 30, 8, "128 prompts of 128 in / 256 out at once"),
    StepSpec("prefix75_cache_on", "engine", 30, 6, "64 x 2048 in / 128 out, 75 % shared prefix, cache on"),
    StepSpec("prefix75_cache_off", "engine", 40, 10, "the same prompts' shape, cache cleared and off"),
    StepSpec("ttft", "engine", 30, 8, "TTFT of 512, 2048, 8191-token prompts, median of 3"),
    StepSpec("transformers_128x256", "baseline", 100, 50, "transformers' generate, 128 x 128/256, batch 128", reserve_s=60),
    StepSpec("moe_startup", "moe", 120, 60, "Qwen3-30B-A3B shape, 61 GB dummy weights, profiling, KV pool, graphs"),
    StepSpec("moe_decode_b1_b64", "moe", 45, 15, "MoE decode at batch 1 and 64, 128 in / 128 steps, vs bytes floor"),
]
SPEC = {s.name: s for s in STEPS}
DEFAULT_BUDGET_S = 540.0
DEFAULT_MOE_MODEL = "benchmarks/configs/qwen3-30b-a3b"  # relative to the repository (gpu_check.sh runs there)
# The correctness phase as a whole stops after this many seconds (its steps' own caps are wider,
# since first Triton compiles on a fresh machine vary: what one step saves, the next may use).
CORRECTNESS_LIMIT_S = 90.0
CPU_CAP_FACTOR = 4.0


def later_than(name: str) -> list[StepSpec]:
    names = [s.name for s in STEPS]
    return STEPS[names.index(name) + 1:]


def parse_caps(items: list[str]) -> dict[str, float]:
    """--cap NAME=SECONDS items; errors name the bad item and the known steps."""
    caps = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in SPEC:
            raise SystemExit(f"error: --cap {item!r}: no step {name!r}; steps: {', '.join(SPEC)}")
        try:
            caps[name] = float(value)
        except ValueError:
            raise SystemExit(f"error: --cap {item!r}: seconds must be a number") from None
    return caps


def run_check(args: argparse.Namespace) -> int:
    """Run every step of STEPS within args.budget_s; print and write the summary. Exit status 1
    when a step failed (a check outside tolerance, an error), 0 otherwise (stopped steps included)."""
    from shardline.engine_args import engine_config_from_args

    config = engine_config_from_args(args)
    device = config.resolved_device()
    if device.type == "cpu" and "triton" not in sys.modules:
        # The kernels can run on CPU only through Triton's interpreter, chosen at triton's import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from shardline.bench import release_device_memory
    from shardline.check.correctness import KernelChecks, TinyEngineChecks
    from shardline.check.environment import describe_environment
    from shardline.check.moe import MoEPhase, MoEWorkload
    from shardline.check.summary import summarize
    from shardline.check.workloads import EnginePhase, Workloads
    from shardline.worker.config import ModelConfig
    from shardline.worker.kernels.linear_choice import save_linear_choices
    from shardline.worker.kernels.runtime import HAS_TRITON, interpreter_ready
    from shardline.worker.loader.source import resolve_model

    out_dir = Path(args.out_dir)
    # The caps are sized for an H200; on CPU the kernels run in Triton's interpreter.
    run = CheckRun(out_dir, args.budget_s, started_at=args.started_at, cap_overrides=parse_caps(args.cap or []),
                   cap_factor=1.0 if device.type == "cuda" else CPU_CAP_FACTOR)
    model = ModelConfig.from_hf_config(resolve_model(args.model, weights_required=args.load_format != "dummy").hf_config())
    dtype = config.resolved_dtype()
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.05)
    workloads = Workloads().scaled(scale)
    run.log(f"check: model {args.model} ({args.load_format}), device {device}, dtype {dtype}, "
            f"budget {args.budget_s:.0f} s, workload scale {scale}; results in {out_dir}")

    phase_end: float | None = None  # run.elapsed_s() at which the current phase's limit ends

    def step(name: str, fn: Callable[[Deadline], dict[str, Any]], cooperative: bool = False):
        left = None if phase_end is None else phase_end - run.elapsed_s()
        return run.run(SPEC[name], fn, later_than(name), cooperative=cooperative, phase_left_s=left)

    # 1. the machine
    env = step("environment", lambda d: describe_environment(device, dtype, model, args.model, config))

    # 2. correctness, CORRECTNESS_LIMIT_S in all (x CPU_CAP_FACTOR on CPU, like the caps)
    phase_end = run.elapsed_s() + CORRECTNESS_LIMIT_S * run.cap_factor
    kernels_run = HAS_TRITON and (device.type == "cuda" or interpreter_ready())
    kernel_dtype = dtype if device.type == "cuda" else torch.float32  # the interpreter's bf16 dots are emulated
    kernels = KernelChecks(model, device, kernel_dtype)
    for name, fn in (("attention_decode", kernels.attention_decode), ("attention_mixed", kernels.attention_mixed),
                     ("kv_write", kernels.kv_write), ("matvec", kernels.matvec), ("fused_norm_rope_act", kernels.fused)):
        if kernels_run:
            step(name, fn)
        else:
            run.skip(SPEC[name], "no Triton here (or it was imported before the interpreter could be chosen)")
    tiny = TinyEngineChecks(out_dir / "tiny-llama", device)
    step("engine_vs_transformers", tiny.engine_vs_transformers)
    step("graph_vs_eager", tiny.graph_vs_eager)
    tiny.close()
    release_device_memory(device)
    phase_end = None

    # 3. one engine, every workload
    phase = EnginePhase(config, model, workloads, seed=args.seed, linear_choice_table=args.linear_choice_table)
    if step("startup", phase.startup).status == OK and device.type == "cuda":
        # For the next run on this machine (or on one like it, once the file is committed).
        save_linear_choices(out_dir / "linear_choice.json", device)
    workload_steps: list[tuple[str, Callable[[Deadline], dict[str, Any]]]] = [
        ("latency_b1_overlap", lambda d: phase.latency(d, overlap=True)),
        ("latency_b1_sync", lambda d: phase.latency(d, overlap=False)),
        ("many_500x200_180", phase.many_at_once),
        ("batch128_128x256", phase.batch),
        ("prefix75_cache_on", lambda d: phase.prefix(d, cache_on=True)),
        ("prefix75_cache_off", lambda d: phase.prefix(d, cache_on=False)),
        ("ttft", phase.ttft),
    ]
    for name, workload in workload_steps:
        if phase.engine is None:
            run.skip(SPEC[name], "no engine: start-up did not finish, or a hard stop dropped it")
            continue
        result = step(name, workload, cooperative=True)
        if result.hard_stop:  # interrupted at an arbitrary point: its state cannot be trusted
            phase.free()

    # 4. the baseline (frees the engine first)
    step("transformers_128x256", lambda d: phase.transformers_baseline(d, args.model, args.load_format))
    phase.free()

    # 5. the mixture of experts, its own engine
    if args.moe_model.lower() == "none":
        for spec in (SPEC["moe_startup"], SPEC["moe_decode_b1_b64"]):
            run.skip(spec, "--moe-model none")
    else:
        bandwidth = float(env.metrics.get("copy_bandwidth_gb_s", 0.0)) * 1e9 if env.status == OK else 0.0
        moe = MoEPhase(config, args.moe_model, MoEWorkload().scaled(scale), bandwidth, seed=args.seed)
        if step("moe_startup", moe.startup).status == OK and moe.engine is not None:
            if device.type == "cuda":  # the table now holds the MoE model's linear shapes too
                save_linear_choices(out_dir / "linear_choice.json", device)
            step("moe_decode_b1_b64", moe.decode, cooperative=True)
        else:
            run.skip(SPEC["moe_decode_b1_b64"], "no MoE engine: its start-up did not finish")
        moe.free()

    # 6. the summary, last: only the tail of the output may come back
    text = summarize(out_dir)
    (out_dir / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return 1 if any(r.status == FAILED for r in run.results) else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The check's own flags on `shardline bench` (the engine flags are shared)."""
    g = p.add_argument_group("check (mode 'check')")
    g.add_argument("--out-dir", default="benchmarks/results/check", help="check: where results.jsonl, progress.log, summary.txt go")
    g.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="check: the whole run's time budget in seconds")
    g.add_argument("--started-at", type=float, default=None,
                   help="check: Unix time the budget counts from (default: now; gpu_check.sh passes its own start)")
    g.add_argument("--cap", action="append", metavar="STEP=SECONDS", help="check: override one step's time cap (repeatable)")
    g.add_argument("--linear-choice-table", type=Path, default=None,
                   help="check: a linear_choice.json an earlier run wrote; shapes it holds are not timed again "
                        "(used only if GPU, torch, Triton and the kernels' source are the same)")
    g.add_argument("--moe-model", default=DEFAULT_MOE_MODEL,
                   help="check: config directory of the mixture-of-experts steps (dummy weights); none: skip them")
    g.add_argument("--scale", type=float, default=None,
                   help="check: workload sizes times this (default 1 on CUDA, 0.05 on CPU)")
