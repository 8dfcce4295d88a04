"""The GPU check and the longer benchmark grid run first time on a bare GPU machine: `shardline bench`
(the check included) and the GPU test modules import without the packages such a machine lacks (Ray,
gguf, jsonschema, openai, grpc-tools, accelerate, the HTTP stack), every step of
benchmarks/run_gpu_suite.sh parses with the real command-line parser and fits the model's context,
so no flag typo costs GPU minutes, and docs/performance.md's GPU-box commands are those that exist.
(tests/test_gpu_check.py runs the check itself on CPU.)"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from shardline.cli import build_parser, engine_config_from_args
from shardline.worker.config import ModelConfig
from shardline.worker.loader.source import resolve_model

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "run_gpu_suite.sh"
TINY_CONFIG = REPO / "benchmarks" / "configs" / "tiny-llama"
GPU_TEST_FILES = ["tests/test_kernels_attention.py", "tests/test_kernels_elementwise.py",
                  "tests/test_kernels_matvec.py", "tests/test_fast_path.py", "tests/test_no_host_sync.py"]
# Installed here, absent on the GPU machine. A None entry in sys.modules makes `import x` raise
# ModuleNotFoundError and importlib.util.find_spec("x") return None, exactly as when x is missing.
ABSENT = ("ray", "gguf", "jsonschema", "openai", "grpc_tools", "accelerate", "fastapi", "httpx")
BARE_PRELUDE = f"""
import sys
for _name in {ABSENT!r}:
    sys.modules[_name] = None
try:
    import ray
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the prelude failed to hide ray")
"""
RESULT_KEYS = {"mode", "model", "load_format", "rows", "roofline"}
ROW_KEYS = {"ttft_ms", "ms_per_output_token", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
            "floor_tokens_per_s", "pct_of_floor"}


def run_bare(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter, from the repository root, with ABSENT hidden."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", BARE_PRELUDE + code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def suite_plan(**env: str) -> dict[str, list[str]]:
    """The suite's steps (LIST=1): name -> the exact argv it would run."""
    proc = subprocess.run(["bash", str(SUITE)], env={**os.environ, "LIST": "1", **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = {}
    for line in proc.stdout.splitlines():
        name, _, cmd = line.partition(": ")
        plan[name] = shlex.split(cmd)
    return plan


def test_bench_latency_runs_and_prints_json_without_the_optional_packages():
    argv = ["shardline", "bench", "latency", "--model", str(TINY_CONFIG), "--load-format", "dummy",
            "--device", "cpu", "--num-kv-blocks", "64", "--input-len", "16", "--output-len", "4",
            "--iters", "1", "--roofline", "--json"]
    proc = run_bare(f"import runpy\nsys.argv = {argv!r}\nrunpy.run_module('shardline', run_name='__main__', alter_sys=True)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = proc.stdout.strip().splitlines()  # stdout is the JSON object and nothing else
    result = json.loads(line)
    assert RESULT_KEYS <= result.keys() and result["mode"] == "latency"
    [row] = result["rows"]
    assert ROW_KEYS <= row.keys()
    assert row["output_tokens_per_s"] > 0 and row["floor_tokens_per_s"] > 0


def test_the_gpu_check_imports_and_parses_without_the_optional_packages():
    proc = run_bare("import shardline.check.plan, shardline.check.correctness, shardline.check.workloads\n"
                    "import shardline.check.summary, shardline.check.environment\n"
                    "from shardline.cli import build_parser\n"
                    "args = build_parser().parse_args(['bench', 'check', '--model', 'benchmarks/configs/llama-3-8b', "
                    "'--load-format', 'dummy', '--out-dir', '/tmp/x', '--budget-s', '300', '--cap', 'ttft=5'])\n"
                    "assert args.mode == 'check' and args.budget_s == 300 and args.cap == ['ttft=5']\n"
                    "for name in ('ray', 'gguf'):\n"
                    "    assert sys.modules.get(name) is None, name\n")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_gpu_test_modules_import_and_collect_without_the_optional_packages():
    proc = run_bare("import pytest\nsys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', "
                    f"*{GPU_TEST_FILES!r}]))")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path in GPU_TEST_FILES:
        assert f"{path}::" in proc.stdout, f"{path} collected no tests"


@pytest.mark.parametrize("quick", ["0", "1"])
def test_every_suite_step_parses_and_fits_the_models_context(quick):
    plan = suite_plan(QUICK=quick)
    assert plan["gpu_tests"][-len(GPU_TEST_FILES):] == GPU_TEST_FILES
    assert all((REPO / f).is_file() for f in GPU_TEST_FILES)
    benches = {name: argv for name, argv in plan.items() if name != "gpu_tests"}
    assert len(benches) == 14
    for name, argv in benches.items():
        assert argv[1:4] == ["-m", "shardline", "bench"], (name, argv)
        try:
            args = build_parser().parse_args(argv[3:])
        except SystemExit as e:  # argparse has printed why on stderr
            pytest.fail(f"{name}: its command line does not parse (exit {e.code}): {shlex.join(argv)}")
        config = engine_config_from_args(args)  # validates the engine flags
        model = ModelConfig.from_hf_config(resolve_model(args.model, weights_required=False).hf_config())
        if args.mode == "prefill":
            longest = max(args.prompt_lens) + 1
        elif args.random_range:
            longest = 2 * args.random_range[1]
        else:
            longest = args.input_len + args.output_len
        assert longest <= config.resolved_max_model_len(model), (name, longest)
        assert args.json and args.roofline and args.load_format == "dummy"


def test_only_selects_steps_and_rejects_unknown_names():
    plan = suite_plan(ONLY="offline_grid_2048_2048 latency_b1_128_512", EXTRA_ARGS="--device cpu --num-kv-blocks 64")
    assert list(plan) == ["latency_b1_128_512", "offline_grid_2048_2048"]  # suite order, tests left out
    assert plan["latency_b1_128_512"][-4:] == ["--device", "cpu", "--num-kv-blocks", "64"]
    proc = subprocess.run(["bash", str(SUITE)], env={**os.environ, "LIST": "1", "ONLY": "latency_b1_128_512 lateny"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step: lateny" in proc.stderr


@pytest.mark.slow
def test_suite_quick_steps_run_on_cpu_with_the_tiny_config(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "MODEL": str(TINY_CONFIG), "QUICK": "1",
           "ONLY": "latency_b1_128_512 prefill_ttft", "EXTRA_ARGS": "--device cpu --kv-cache-memory-gb 0.25"}
    proc = subprocess.run(["bash", str(SUITE), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(0 failed)" in proc.stdout
    for name, mode in [("latency_b1_128_512", "latency"), ("prefill_ttft", "prefill")]:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["mode"] == mode and result["rows"] and "roofline" in result
    environment = (tmp_path / "environment.txt").read_text()
    assert "torch " in environment and "steps latency_b1_128_512 prefill_ttft" in environment


def test_the_performance_doc_runs_the_one_command_check_first_and_the_longer_grid_step_by_step():
    doc = (REPO / "docs" / "performance.md").read_text()
    gpu_box = doc[doc.index("## Running on a GPU box"):doc.index("### The longer grid")]
    assert "benchmarks/gpu_check.sh" in gpu_box and "first command" in gpu_box
    assert doc.index("    benchmarks/gpu_check.sh \"$OUT\"") < doc.index("run_gpu_suite.sh")
    commands = [line.strip() for line in doc.splitlines()
                if line.startswith("    ONLY=") and "run_gpu_suite.sh" in line]
    assert len(commands) == 4
    steps: list[str] = []
    for command in commands:
        only = shlex.split(command)[0].removeprefix("ONLY=")
        plan = suite_plan(ONLY=only)
        assert list(plan) == only.split(), "ONLY lists its steps in the suite's order"
        steps += plan
    assert sorted(steps) == sorted(suite_plan())
