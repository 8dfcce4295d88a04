"""What structured outputs cost: offline throughput with none, half and all of the requests under a
JSON schema, in one process on one engine, and the per-step host and device costs of the mask.

The schema asks for a list of 40 short strings, so a constrained answer is longer than the output
budget and every request, constrained or not, generates exactly --output-len tokens (the
unconstrained ones with ignore_eos): the runs differ only in the masking work. Two figures per run:
output tokens per second of wall time, and engine CPU milliseconds per output token (this process's
CPU time, all its threads: the engine step, torch's threads and the grammar's). On a shared machine
wall time moves with the other processes' load while CPU time per token does not, so the CPU ratio
is the cost figure. Repetitions are interleaved (none, half, all, none, half, all, ...) so a change
of load hits every run alike; each figure is the median over --repeats; ratios are against the run
without constraints. The load average is printed before and after. The grammar is compiled before
timing (a warm cache, as in steady serving).

Usage:  .venv/bin/python benchmarks/structured_outputs.py [--model smollm2-135m] [--num-prompts 16]
        [--output-len 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch

from shardline.worker.config import EngineConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import SamplingParams, StructuredOutput

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 40, "maxItems": 40,
                                                     "items": {"type": "string", "maxLength": 12}}},
          "required": ["items"], "additionalProperties": False}
CONSTRAINT = StructuredOutput("json_schema", json.dumps(SCHEMA), strict=True)


@dataclass(frozen=True)
class RunFigures:
    """One timed run: output tokens per wall second and process CPU milliseconds per output token."""

    tokens_per_s: float
    cpu_ms_per_token: float


def timed_run(engine: LLMEngine, prompts: list, constrained: list[bool], output_len: int) -> RunFigures:
    params = [SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                             structured_output=CONSTRAINT if c else None) for c in constrained]
    start, cpu_start = time.perf_counter(), time.process_time()
    results = engine.generate(prompts, params)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert all(r.completion_tokens == output_len for r in results), [r.finish_reason for r in results]
    tokens = output_len * len(prompts)
    return RunFigures(tokens / seconds, cpu_seconds / tokens * 1e3)


def mask_costs(engine: LLMEngine, rows: int) -> tuple[float, float]:
    """Mean ms per step to fill `rows` constrained rows on the host, and to apply them on the
    engine's device, walking a matching answer token by token."""
    from shardline.worker.structured.bitmask import TokenBitmask
    from shardline.worker.structured.matcher import GrammarState

    compiled, _ = engine._grammar_pool().submit(CONSTRAINT)
    answer = engine.tokenizer.encode(json.dumps({"items": [f"w{i}" for i in range(40)]}), add_special_tokens=False)
    states = [GrammarState(compiled.result()) for _ in range(rows)]
    vocab = engine.model_config.vocab_size
    logits = torch.randn(max(rows, 1) * 2, vocab, device=engine.device)
    fill = apply = 0.0
    for k in range(len(answer)):
        for s in states:
            s.advance(answer[:k])
        t0 = time.perf_counter()
        mask = TokenBitmask.fill([(2 * i, s) for i, s in enumerate(states)], vocab, engine.device)
        t1 = time.perf_counter()
        mask.apply(logits)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        fill, apply = fill + t1 - t0, apply + time.perf_counter() - t1
    return fill / len(answer) * 1e3, apply / len(answer) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=args.num_prompts), show_progress=False)
    prompts = [{"messages": [{"role": "user", "content": f"List {40 + i} short words as JSON."}]}
               for i in range(args.num_prompts)]
    n = args.num_prompts
    runs = {"none": [False] * n, "half": [i % 2 == 0 for i in range(n)], "all": [True] * n}
    timed_run(engine, prompts[:2], [True, False], 4)  # warm: kernels, the tokenizer info, the compile
    load_before = os.getloadavg()
    figures: dict[str, list[RunFigures]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: none, half, all, none, half, all, ...
        for name, constrained in runs.items():
            figures[name].append(timed_run(engine, prompts, constrained, args.output_len))
    load_after = os.getloadavg()
    rows = [(name, sum(runs[name]), statistics.median(f.tokens_per_s for f in runs_of),
             statistics.median(f.cpu_ms_per_token for f in runs_of)) for name, runs_of in figures.items()]
    base_tps, base_cpu = rows[0][2], rows[0][3]
    print(f"model {args.model}, device {engine.device}, {n} prompts x {args.output_len} output tokens, "
          f"median of {args.repeats} interleaved repetitions, torch threads {torch.get_num_threads()}")
    print("load average (1, 5, 15 min): before " + ", ".join(f"{x:.2f}" for x in load_before)
          + "; after " + ", ".join(f"{x:.2f}" for x in load_after))
    print(f"{'constrained':>12} {'requests':>9} {'out tok/s':>10} {'ratio':>6} {'CPU ms/tok':>11} {'CPU ratio':>10}")
    for name, count, tps, cpu in rows:
        print(f"{name:>12} {count:>9} {tps:>10.1f} {tps / base_tps:>6.3f} {cpu:>11.2f} {cpu / base_cpu:>10.3f}")
    print(f"{'rows':>5} {'fill ms/step':>13} {'apply ms/step':>14}")
    for r in (1, 8, n):
        fill, apply = mask_costs(engine, r)
        print(f"{r:>5} {fill:>13.3f} {apply:>14.3f}")
    engine.shutdown()


if __name__ == "__main__":
    main()
