"""The check's last output: one row per target of issue 11 (goal, measured value, the roofline bound
and the share of it reached), built from results.jsonl alone, so it can also be printed for a run
that was cut off:

    python -m shardline.check.summary OUT_DIR

Bounds (docs/performance.md, "Roofline"): decode is memory-bound (weights plus every sequence's KV
streamed once per step at the measured copy bandwidth); a prefill is compute-bound (its FLOPs at the
measured bf16 matmul rate); 500 prompts at once need at least the larger of their FLOPs at the matmul
rate and one weight pass per decode step; a shared prefix saves at most the prefill of the shared
tokens, so its speed-up is at most (in + out) / (in - shared + out); a mixture of experts' decode step
streams the experts its batch chose (issue 17, shardline/check/moe.py)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardline.bench import decode_floor_from_bytes
from shardline.check.runner import OK, StepResult, read_results


@dataclass(frozen=True)
class SummaryRow:
    """One target: what it asks, what was measured, the bound, the share of it, and the verdict."""

    target: str
    goal: str
    measured: str
    bound: str
    pct_of_bound: str
    verdict: str  # met | missed | info | the step's status when it did not finish (stopped, failed, skipped)


def _fmt(v: float | None, unit: str, digits: int = 1) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:,.{digits}f} {unit}".strip()


def _pct(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.0f} %"


def build_rows(results: list[StepResult]) -> list[SummaryRow]:
    """The summary rows from the run's results (missing steps read as 'not run')."""
    by = {r.step: r for r in results}

    def ok(step: str) -> dict[str, Any] | None:
        r = by.get(step)
        return r.metrics if r is not None and r.status == OK else None

    def status(*steps: str) -> str:
        for s in steps:
            r = by.get(s)
            if r is None:
                return "not run"
            if r.status != OK:
                return r.status
        return ""

    env = ok("environment") or {}
    bw = env.get("copy_bandwidth_gb_s", 0.0) * 1e9
    flops_rate = env.get("matmul_tflops", 0.0) * 1e12
    weights = env.get("weight_bytes", 0.0)
    kv_tok = env.get("kv_bytes_per_token", 0.0)
    have_roof = bw > 0 and flops_rate > 0 and weights > 0

    def decode_floor(batch: int, context: float) -> float | None:
        return decode_floor_from_bytes(weights, kv_tok, batch, context, bw) if have_roof else None

    def judged(value: float | None, goal: float | None, at_least: bool, *steps: str) -> str:
        if value is None:
            return status(*steps) or "not run"
        if goal is None:
            return "info"
        return "met" if (value >= goal if at_least else value <= goal) else "missed"

    rows = []
    # correctness
    checks = [r for r in results if r.phase == "correctness"]
    if checks:
        passed = [r.step for r in checks if r.status == OK]
        bad = [f"{r.step} ({r.status})" for r in checks if r.status != OK]
        rows.append(SummaryRow("correctness (kernels, graph, engine vs transformers)", "all pass",
                               f"{len(passed)}/{len(checks)} pass", "-", "-",
                               "met" if not bad else "missed: " + ", ".join(bad)))
    # batch-1 decode, overlap on and off
    for step, label, goal in (("latency_b1_overlap", "batch-1 decode, overlap on", 240.0),
                              ("latency_b1_sync", "batch-1 decode, overlap off", None)):
        m = ok(step)
        v = m["output_tokens_per_s"] if m else None
        floor = decode_floor(1, m["input_len"] + m["output_len"] / 2) if m else None
        rows.append(SummaryRow(label, f">= {goal:.0f} tok/s" if goal else "-", _fmt(v, "tok/s"), _fmt(floor, "tok/s"),
                               _pct(100 * v / floor if v and floor else None), judged(v, goal, True, step)))
    # 500 x 200/180 at once
    m = ok("many_500x200_180")
    v = m["requests_per_s"] if m else None
    bound = None
    if m and have_roof:
        n, i, o = m["num_prompts"], m["input_len"], m["output_len"]
        compute_s = 2 * env["num_params"] * n * (i + o) / flops_rate
        waves = math.ceil(n / max(1, env.get("max_num_seqs", n)))
        stream_s = waves * o * weights / bw
        bound = n / max(compute_s, stream_s)
    rows.append(SummaryRow("500 x 200/180 at once", ">= 50 req/s", _fmt(v, "req/s"), _fmt(bound, "req/s"),
                           _pct(100 * v / bound if v and bound else None), judged(v, 50.0, True, "many_500x200_180")))
    # batch 128 against transformers
    m, hf = ok("batch128_128x256"), ok("transformers_128x256")
    ratio = m["output_tokens_per_s"] / hf["hf_output_tokens_per_s"] if m and hf else None
    floor = decode_floor(m["num_prompts"], m["input_len"] + m["output_len"] / 2) if m else None
    engine_rate = m["output_tokens_per_s"] if m else None
    rows.append(SummaryRow("batch 128, 128/256: engine", "-", _fmt(engine_rate, "tok/s"), _fmt(floor, "tok/s"),
                           _pct(100 * engine_rate / floor if engine_rate and floor else None),
                           judged(engine_rate, None, True, "batch128_128x256")))
    rows.append(SummaryRow("batch 128, 128/256: vs transformers", ">= 10x", _fmt(ratio, "x", 2), "-", "-",
                           judged(ratio, 10.0, True, "batch128_128x256", "transformers_128x256")))
    # 75 % shared prefix, cache on vs off
    on, off = ok("prefix75_cache_on"), ok("prefix75_cache_off")
    speedup = on["total_tokens_per_s"] / off["total_tokens_per_s"] if on and off else None
    bound = None
    if on:
        i, o, shared = on["input_len"], on["output_len"], on["shared_prefix_len"]
        bound = (i + o) / (i - shared + o)
    rows.append(SummaryRow("75 % shared prefix: cache on / off", ">= 3.0x", _fmt(speedup, "x", 2), _fmt(bound, "x", 2),
                           _pct(100 * speedup / bound if speedup and bound else None),
                           judged(speedup, 3.0, True, "prefix75_cache_on", "prefix75_cache_off")))
    # TTFT
    m = ok("ttft")
    if m:
        for key in sorted((k for k in m if k.startswith("ttft_ms_")), key=lambda k: int(k.rsplit("_", 1)[1])):
            n = int(key.rsplit("_", 1)[1])
            floor_ms = m[f"flops_{n}"] / flops_rate * 1e3 if flops_rate else None
            is_target = n == m.get("target_prompt_len")
            rows.append(SummaryRow(f"TTFT, {n}-token prompt", "<= 50 ms" if is_target else "-", _fmt(m[key], "ms"),
                                   _fmt(floor_ms, "ms"), _pct(100 * floor_ms / m[key] if floor_ms else None),
                                   judged(m[key], 50.0 if is_target else None, False, "ttft")))
    else:
        rows.append(SummaryRow("TTFT, 2048-token prompt", "<= 50 ms", "-", "-", "-", status("ttft") or "not run"))
    # start-up
    m = ok("startup")
    v = m["startup_s"] if m else None
    rows.append(SummaryRow("start-up (weights, profile, graphs, warm-up)", "<= 60 s", _fmt(v, "s"), "-", "-",
                           judged(v, 60.0, False, "startup")))
    # mixture of experts (issue 17): each step's bound is the bytes of the experts its tokens chose
    m = ok("moe_decode_b1_b64")
    moe_model = Path(str((ok("moe_startup") or {}).get("model", "qwen3-30b-a3b"))).name
    for batch in (1, 64):
        v = m.get(f"b{batch}_output_tokens_per_s") if m else None
        floor = m.get(f"b{batch}_floor_tokens_per_s") if m else None
        rows.append(SummaryRow(f"MoE decode, batch {batch} ({moe_model})", "-", _fmt(v, "tok/s"),
                               _fmt(floor, "tok/s"), _pct(100 * v / floor if v and floor else None),
                               judged(v, None, True, "moe_startup", "moe_decode_b1_b64")))
    return rows


def format_table(rows: list[SummaryRow], results: list[StepResult]) -> str:
    """A plain-text table, then one line per step that did not finish (the tail is what comes back)."""
    header = SummaryRow("target", "goal", "measured", "roofline bound", "% of bound", "verdict")
    cols = list(zip(*[(r.target, r.goal, r.measured, r.bound, r.pct_of_bound, r.verdict) for r in [header, *rows]]))
    widths = [max(len(x) for x in col) for col in cols]
    lines = ["== summary"]
    for r in [header, *rows]:
        cells = (r.target, r.goal, r.measured, r.bound, r.pct_of_bound, r.verdict)
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    env = next((res.metrics for res in results if res.step == "environment" and res.status == OK), {})
    if env:
        lines.append(f"device {env.get('device_name', '?')}: copy {env.get('copy_bandwidth_gb_s', 0):,.0f} GB/s, "
                     f"matmul {env.get('matmul_tflops', 0):,.3g} TFLOP/s; model {env.get('model', '?')}")
    for res in results:
        if res.status != OK:
            lines.append(f"{res.step}: {res.status} after {res.elapsed_s:.1f} s (cap {res.cap_s:.0f} s): {res.error}")
    last = max((res.since_start_s for res in results), default=0.0)
    lines.append(f"{len(results)} steps, {sum(res.status == OK for res in results)} ok; {last:.0f} s since the start")
    return "\n".join(lines)


def summarize(out_dir: Path) -> str:
    results = read_results(out_dir)
    return format_table(build_rows(results), results)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m shardline.check.summary OUT_DIR", file=sys.stderr)
        return 2
    print(summarize(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
