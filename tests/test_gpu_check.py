"""The one-command GPU check (benchmarks/gpu_check.sh over `shardline bench check`): its plan fits the
budget, its steps stop at their caps without ending the run, and on CPU with the tiny config the
real command runs every step end to end on a machine without Ray or gguf, writing each result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardline.check.plan import CORRECTNESS_LIMIT_S, DEFAULT_BUDGET_S, SPEC, STEPS
from shardline.check.runner import FAILED, OK, SKIPPED, STOPPED, CheckRun, StepFailed, StepSpec, read_results

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "benchmarks" / "gpu_check.sh"
TINY_CONFIG = REPO / "benchmarks" / "configs" / "tiny-llama"
TINY_MOE_CONFIG = REPO / "benchmarks" / "configs" / "tiny-qwen3-moe"
# Installed here, absent on the GPU machine (tests/test_bare_machine.py hides the same names).
ABSENT = ("ray", "gguf", "jsonschema", "openai", "grpc_tools", "accelerate", "fastapi", "httpx")


def test_the_plan_fits_the_budget_with_correctness_first_and_transformers_last():
    assert sum(s.estimate_s for s in STEPS) <= 0.75 * DEFAULT_BUDGET_S  # room for install, imports and a slow GPU
    assert all(s.estimate_s <= s.cap_s for s in STEPS)
    correctness = [s for s in STEPS if s.phase == "correctness"]
    assert sum(s.estimate_s for s in correctness) <= CORRECTNESS_LIMIT_S <= 90
    phases = [s.phase for s in STEPS]
    assert phases[0] == "environment" and phases[-1] == "moe"  # the MoE steps last: trimmed first
    assert phases.index("baseline") > max(i for i, p in enumerate(phases) if p == "engine")
    assert phases.index("engine") > max(i for i, p in enumerate(phases) if p == "correctness")


def test_the_performance_doc_lists_every_step_with_its_cap_and_estimate():
    doc = (REPO / "docs" / "performance.md").read_text()
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\| `([a-z0-9_]+)` \| [^|]+ \| (\d+) \| (\d+) \|", doc, re.MULTILINE)}
    assert rows == {s.name: (s.cap_s, s.estimate_s) for s in STEPS}
    assert "    benchmarks/gpu_check.sh \"$OUT\"" in doc


def test_the_moe_floor_reads_the_active_parameters_at_batch_1_and_nearly_every_expert_at_64():
    """Qwen3-30B-A3B's published shape: 30.5 B parameters, 3.35 B active (its model card: 3.3 B)."""
    from shardline.bench import decode_step_weight_bytes
    from shardline.worker.config import ModelConfig

    cfg = ModelConfig.from_hf_config(json.loads((REPO / "benchmarks/configs/qwen3-30b-a3b/config.json").read_text()))
    assert round(cfg.num_params / 1e9, 1) == 30.5 and round(cfg.num_active_params / 1e9, 1) == 3.4
    assert decode_step_weight_bytes(cfg, 1, 2) == cfg.num_active_params * 2
    assert 0.98 * cfg.num_params * 2 < decode_step_weight_bytes(cfg, 64, 2) < cfg.num_params * 2
    dense = ModelConfig.from_hf_config(json.loads((TINY_CONFIG / "config.json").read_text()))
    assert decode_step_weight_bytes(dense, 64, 2) == dense.num_params * 2


def _spec(name: str, cap: float) -> StepSpec:
    return StepSpec(name, "engine", cap, cap / 2, "a test step")


def test_a_step_past_its_cap_is_stopped_by_the_alarm_and_the_next_step_runs(tmp_path):
    run = CheckRun(tmp_path, budget_s=60, summary_reserve_s=0)

    def spins(deadline):
        while True:  # never looks at its deadline
            time.sleep(0.01)

    stopped = run.run(_spec("spins", 0.3), spins)
    after = run.run(_spec("after", 5), lambda d: {"value": 1.5})
    assert (stopped.status, stopped.hard_stop) == (STOPPED, True) and 0.3 <= stopped.elapsed_s < 2
    assert after.status == OK and after.metrics == {"value": 1.5}
    assert [r.step for r in read_results(tmp_path)] == ["spins", "after"]


def test_a_cooperative_step_stops_at_its_deadline_check_and_failures_carry_their_figures(tmp_path):
    run = CheckRun(tmp_path, budget_s=60, summary_reserve_s=0)

    def polls(deadline):
        while True:
            deadline.check()
            time.sleep(0.01)

    def fails(deadline):
        raise StepFailed("outside tolerance: attention", {"attention_max_abs_err": 0.5, "passed": False})

    stopped = run.run(_spec("polls", 0.2), polls, cooperative=True)
    failed = run.run(_spec("fails", 5), fails)
    assert (stopped.status, stopped.hard_stop) == (STOPPED, False)
    assert failed.status == FAILED and failed.metrics["attention_max_abs_err"] == 0.5
    log = (tmp_path / "progress.log").read_text()
    assert re.search(r"^\[\d\d:\d\d:\d\d \+ *\d+\.\ds\] polls: STOPPED", log, re.MULTILINE)


def test_steps_left_without_budget_are_skipped_and_later_reserves_are_kept(tmp_path):
    run = CheckRun(tmp_path, budget_s=5, summary_reserve_s=0)
    last = StepSpec("last", "baseline", 10, 5, "kept for last", reserve_s=2.5)
    first = run.run(_spec("first", 10), lambda d: {"cap_seen": d.cap_s}, later=[last])
    assert first.status == OK and 1.0 <= first.metrics["cap_seen"] <= 2.5  # 5 s budget - 2.5 s reserved
    limited = run.run(_spec("in_a_phase", 10), lambda d: {"cap_seen": d.cap_s}, phase_left_s=1.5)
    assert limited.status == OK and limited.metrics["cap_seen"] <= 1.5
    phase_over = run.run(_spec("phase_over", 10), lambda d: {}, phase_left_s=0.2)
    assert phase_over.status == SKIPPED and phase_over.error.startswith("phase limit")
    run2 = CheckRun(tmp_path / "spent", budget_s=0.5, summary_reserve_s=0)
    assert run2.run(_spec("late", 10), lambda d: {}).status == SKIPPED


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_cpu_without_ray_and_a_capped_step_does_not_end_the_run(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        f"import sys\nfor _name in {ABSENT!r}:\n    sys.modules[_name] = None  # as if not installed\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "MODEL": str(TINY_CONFIG), "MOE_MODEL": str(TINY_MOE_CONFIG),
           "BUDGET_S": "400",
           "PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the check itself chooses the interpreter on CPU
    # 128-token steps: the scaled shared-prefix prompts (3 x 102 tokens) then span steps, so later
    # prompts find the first one's blocks cached, as the 2048-token prompts do at full size.
    proc = subprocess.run(["bash", str(CHECK), str(out), "--device", "cpu", "--kv-cache-memory-gb", "0.25",
                           "--max-num-batched-tokens", "128", "--cap", "many_500x200_180=0.001"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = read_results(out)
    assert [r.step for r in results] == [s.name for s in STEPS]  # every step wrote its line, in order
    status = {r.step: r.status for r in results}
    assert status.pop("many_500x200_180") == STOPPED
    assert set(status.values()) == {OK}, {r.step: r.error for r in results if r.status != OK}
    by = {r.step: r.metrics for r in results}
    for spec in STEPS:
        if spec.phase == "correctness":
            assert by[spec.name]["passed"] is True, spec.name
    assert by["engine_vs_transformers"]["mismatched_sequences"] == 0
    assert by["environment"]["copy_bandwidth_gb_s"] > 0 and by["environment"]["matmul_tflops"] > 0
    for name in ("latency_b1_overlap", "latency_b1_sync", "batch128_128x256", "prefix75_cache_on", "prefix75_cache_off"):
        assert by[name]["output_tokens_per_s" if name.startswith("latency") else "requests_per_s"] > 0, name
    assert by["prefix75_cache_on"]["prefix_cache_hit_rate"] > 0 and by["prefix75_cache_off"]["prefix_cache_hit_rate"] == 0
    assert by["transformers_128x256"]["hf_output_tokens_per_s"] > 0
    moe = by["moe_decode_b1_b64"]
    assert by["moe_startup"]["num_active_params"] < by["moe_startup"]["num_params"]
    for b in (1, 64):  # a rate, its floor from the bytes the batch's experts read, and the share
        assert moe[f"b{b}_output_tokens_per_s"] > 0 and moe[f"b{b}_floor_tokens_per_s"] > 0
        assert moe[f"b{b}_pct_of_floor"] == pytest.approx(100 * moe[f"b{b}_output_tokens_per_s"]
                                                          / moe[f"b{b}_floor_tokens_per_s"])
    assert moe["b1_weight_gb_per_step"] < moe["b64_weight_gb_per_step"]
    assert results[-1].since_start_s <= 400
    # The summary is the output's tail, and the same table can be rebuilt from results.jsonl alone.
    summary = (out / "summary.txt").read_text().strip()
    assert proc.stdout.strip().endswith(summary)
    assert "batch 128, 128/256: vs transformers" in summary and "many_500x200_180: stopped" in summary
    assert "MoE decode, batch 64" in summary
    rebuilt = subprocess.run([sys.executable, "-m", "shardline.check.summary", str(out)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.stdout.strip() == summary
    for line in (out / "progress.log").read_text().splitlines():
        assert re.match(r"\[\d\d:\d\d:\d\d \+ *\d+\.\ds\] ", line), line
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["step"] == "environment"
    assert SPEC["transformers_128x256"].reserve_s > 0
