"""Every `shardline bench` mode runs end to end on CPU with a tiny checkpoint and random weights,
and reports positive throughput figures in its --json output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardline.cli import build_parser
from shardline.worker.config import ModelConfig
from shardline.worker.loader.source import ModelLoadError, resolve_model
from tiny_models import write_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
THROUGHPUT_KEYS = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
TINY_ARGS = ["--load-format", "dummy", "--json", "--num-kv-blocks", "128", "--input-len", "16", "--output-len", "4",
             "--num-prompts", "3", "--iters", "1", "--batch-sizes", "1", "2", "--decode-steps", "3",
             "--prompt-lens", "8", "16", "--shared-fractions", "0", "0.5"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-tiny")
    write_tiny_checkpoint("llama", d, seed=1)
    return d


def run_bench(capsys, mode: str, model: Path, *extra: str) -> dict:
    args = build_parser().parse_args(["bench", mode, "--model", str(model), *TINY_ARGS, *extra])
    capsys.readouterr()
    assert args.handler(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["offline", "latency", "sweep", "prefill", "prefix", "serve", "verify"])
def test_every_bench_mode_reports_positive_throughput(capsys, checkpoint, mode):
    result = run_bench(capsys, mode, checkpoint)
    assert result["mode"] == mode and result["rows"]
    for row in result["rows"]:
        for key in THROUGHPUT_KEYS:
            assert row[key] > 0, (key, row)


def test_offline_compare_hf_reports_transformers_rate_and_speedup(capsys, checkpoint):
    result = run_bench(capsys, "offline", checkpoint, "--compare-hf")
    [row] = result["rows"]
    assert row["hf_output_tokens_per_s"] > 0 and row["speed_vs_hf"] > 0
    assert row["speed_vs_hf"] == pytest.approx(row["output_tokens_per_s"] / row["hf_output_tokens_per_s"])


def test_roofline_adds_the_floor_and_the_share_of_it(capsys, checkpoint):
    result = run_bench(capsys, "latency", checkpoint, "--roofline")
    assert result["roofline"]["copy_bandwidth_gb_s"] > 0
    assert result["rows"][0]["floor_tokens_per_s"] > 0 and result["rows"][0]["pct_of_floor"] > 0


def test_llama3_8b_config_directory_resolves_for_dummy_weights():
    source = resolve_model(str(REPO / "benchmarks/configs/llama-3-8b"), weights_required=False)
    cfg = ModelConfig.from_hf_config(source.hf_config())
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128256, 4096, 14336, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert (cfg.rope_theta, cfg.max_position_embeddings) == (500000.0, 8192)
    assert 8.0e9 < cfg.num_params < 8.1e9
    with pytest.raises(ModelLoadError, match="load-format dummy"):
        resolve_model(str(REPO / "benchmarks/configs/llama-3-8b"))


def test_bench_runs_on_a_config_only_directory_with_dummy_weights(capsys, checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    result = run_bench(capsys, "latency", tmp_path)
    assert result["rows"][0]["output_tokens_per_s"] > 0


def test_latency_with_speculation_reports_the_baseline_and_the_speedup_in_one_run(capsys, checkpoint):
    result = run_bench(capsys, "latency", checkpoint, "--speculative-config",
                       '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}')
    rows = result["rows"]
    assert [r["engine"] for r in rows] == ["baseline", "ngram"]
    assert rows[1]["speed_vs_baseline"] == pytest.approx(rows[1]["output_tokens_per_s"] / rows[0]["output_tokens_per_s"])
    assert 0 <= rows[1]["acceptance_rate"] <= 1 and rows[1]["mean_accepted_length"] >= 1
    assert rows[1]["num_drafts"] >= 0


def test_verify_reports_each_query_length_against_one(capsys, checkpoint):
    result = run_bench(capsys, "verify", checkpoint, "--query-lens", "1", "3")
    rows = result["rows"]
    assert [(r["batch"], r["query_len"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert rows[0]["step_cost_vs_1"] == 1.0
    assert rows[1]["step_cost_vs_1"] == pytest.approx(rows[1]["ms_per_step"] / rows[0]["ms_per_step"])


def test_latency_compares_quantization_schemes_in_the_same_run(capsys, checkpoint):
    """Dummy weights quantized at load: one engine per scheme, rows interleaved, ratios to the first."""
    result = run_bench(capsys, "latency", checkpoint, "--compare-quantization", "int8", "int4")
    rows = result["rows"]
    assert [r["quantization"] for r in rows] == ["none", "int8", "int4"]
    assert rows[0]["speed_vs_first"] == 1.0
    assert rows[1]["speed_vs_first"] == pytest.approx(rows[0]["ms_per_output_token"] / rows[1]["ms_per_output_token"])
    assert rows[2]["weight_mb"] < rows[1]["weight_mb"] < rows[0]["weight_mb"]


def test_bench_reports_each_engines_quantization_kv_dtype_and_bytes(capsys, checkpoint):
    """--kv-cache-dtype fp8: the engine record names the scheme and the KV dtype, and its KV bytes per
    token are one byte per element (2 layers x K and V x 2 KV heads x 16 dims); the printed header
    carries the same line (float32 KV: four bytes per element)."""
    result = run_bench(capsys, "latency", checkpoint, "--kv-cache-dtype", "fp8", "--quantization", "int8")
    (engine,) = result["engines"]
    assert engine["quantization"] == "int8" and engine["kv_cache_dtype"] == "float8_e4m3fn"
    assert engine["kv_bytes_per_token"] == 2 * 2 * 2 * 16
    assert 0 < engine["weight_bytes"] and engine["num_kv_blocks"] == 128
    args = build_parser().parse_args(["bench", "latency", "--model", str(checkpoint), "--load-format", "dummy",
                                      "--num-kv-blocks", "64", "--input-len", "8", "--output-len", "2", "--iters", "1"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "engine: quantization=none weights=" in printed and "kv_cache_dtype=float32 kv=512 B/token" in printed


@pytest.mark.parametrize("mode", ["latency", "offline"])
def test_compare_llama_cpp_without_the_package_names_it_and_how_to_install(capsys, monkeypatch, mode):
    """llama-cpp-python is optional: without it the flag stops the run at once with a message
    naming the package and the install command (no engine is built first)."""
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    args = build_parser().parse_args(["bench", mode, "--model", "smollm2-135m", "--compare-llama-cpp", *TINY_ARGS])
    with pytest.raises(SystemExit) as exc:
        args.handler(args)
    message = str(exc.value)
    assert "--compare-llama-cpp" in message and "llama-cpp-python" in message and "pip install" in message


def test_compare_llama_cpp_refuses_a_checkpoint_that_is_not_gguf(capsys, checkpoint):
    """llama.cpp reads GGUF files only: a safetensors directory is refused naming the flag and the kind."""
    args = build_parser().parse_args(["bench", "latency", "--model", str(checkpoint), "--compare-llama-cpp", *TINY_ARGS])
    with pytest.raises(SystemExit) as exc:
        args.handler(args)
    assert "--compare-llama-cpp" in str(exc.value) and "safetensors" in str(exc.value)


def test_offline_compares_quantization_schemes_in_the_same_run(capsys, checkpoint):
    """offline --compare-quantization: the same prompts through one engine per scheme, with each
    one's throughput and CPU time per token over the first's."""
    result = run_bench(capsys, "offline", checkpoint, "--compare-quantization", "int4")
    rows = result["rows"]
    assert [r["quantization"] for r in rows] == ["none", "int4"]
    assert rows[0]["speed_vs_first"] == 1.0 and rows[0]["cpu_speed_vs_first"] == 1.0
    assert rows[1]["speed_vs_first"] == pytest.approx(rows[1]["output_tokens_per_s"] / rows[0]["output_tokens_per_s"])
    assert rows[1]["cpu_ms_per_output_token"] > 0 and rows[1]["weight_mb"] < rows[0]["weight_mb"]
