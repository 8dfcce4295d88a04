"""Specification of the command line's flags: every EngineConfig field is a flag of `generate`,
`bench` and `serve` with the field's default; `serve` takes vLLM's spellings and lays them over a
config file; a vLLM flag shardline does not implement stops with an error naming it. Parse-level
only: nothing here starts an engine or a cluster (tests/test_cluster_cli.py starts one)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from shardline.cli import build_parser
from shardline.cluster.config import API_KEY_ENV, ClusterConfig
from shardline.engine_args import UNSUPPORTED_VLLM_FLAGS, engine_config_from_args
from shardline.serve_cli import ask_metadata, config_from_args
from shardline.worker.config import ConfigError, EngineConfig

# One value per EngineConfig field that differs from its default and is valid. A new field fails
# test_the_table_below_covers_every_engine_field until it has a row, and so a tested flag.
NON_DEFAULT_FLAG_VALUES: dict[str, tuple[str, ...]] = {
    "model": ("--model", "some/model"),
    "dtype": ("--dtype", "float16"),
    "device": ("--device", "cpu"),
    "load_format": ("--load-format", "dummy"),
    "tensor_parallel_size": ("--tensor-parallel-size", "2"),
    "block_size": ("--block-size", "32"),
    "num_kv_blocks": ("--num-kv-blocks", "64"),
    "kv_cache_memory_gb": ("--kv-cache-memory-gb", "0.5"),
    "cpu_kv_cache_fraction": ("--cpu-kv-cache-fraction", "0.25"),
    "gpu_memory_utilization": ("--gpu-memory-utilization", "0.5"),
    "max_model_len": ("--max-model-len", "512"),
    "max_num_seqs": ("--max-num-seqs", "8"),
    "max_num_batched_tokens": ("--max-num-batched-tokens", "256"),
    "enable_prefix_caching": ("--no-enable-prefix-caching",),
    "enable_chunked_prefill": ("--no-enable-chunked-prefill",),
    "enforce_eager": ("--enforce-eager",),
    "attention_backend": ("--attention-backend", "torch"),
    "async_scheduling": ("--async-scheduling",),
    "seed": ("--seed", "7"),
    "max_queue_len": ("--max-queue-len", "16"),
    "max_stop_strings": ("--max-stop-strings", "4"),
    "max_stop_string_len": ("--max-stop-string-len", "32"),
    "extra": ("--extra", '{"fused_kernels": "torch"}'),
    "speculative_method": ("--speculative-method", "ngram", "--num-speculative-tokens", "3"),
    "num_speculative_tokens": ("--speculative-method", "ngram", "--num-speculative-tokens", "3"),
    "speculative_model": ("--speculative-method", "draft_model", "--num-speculative-tokens", "2",
                          "--speculative-model", "some/draft"),
    "prompt_lookup_min": ("--prompt-lookup-min", "3"),
    "prompt_lookup_max": ("--prompt-lookup-max", "7"),
    "speculative_draft_layers": ("--speculative-draft-layers", "2"),
    "speculative_adaptive": ("--no-speculative-adaptive",),
    "speculative_disable_by_batch_size": ("--speculative-disable-by-batch-size", "8"),
    "stream_interval_ms": ("--stream-interval-ms", "20"),
    "stream_items_per_s": ("--stream-items-per-s", "500"),
    "special_tokens_in_content": ("--special-tokens-in-content",),
    "quantization": ("--quantization", "int8"),
    "kv_cache_dtype": ("--kv-cache-dtype", "fp8"),
    "calculate_kv_scales": ("--no-calculate-kv-scales",),
}
# Fields that are only valid together: the flags above set these companions as well.
COMPANION_FIELDS: dict[str, set[str]] = {
    "speculative_method": {"num_speculative_tokens"},
    "num_speculative_tokens": {"speculative_method"},
    "speculative_model": {"speculative_method", "num_speculative_tokens"},
}


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def _minimal(command: str) -> list[str]:
    return {"generate": ["generate", "--prompt", "hi"], "bench": ["bench", "offline"], "serve": ["serve"]}[command]


def _engine_config(parser: argparse.ArgumentParser, argv: list[str]) -> EngineConfig:
    args = parser.parse_args(argv)
    if argv[0] == "serve":
        return config_from_args(args).engine_config()
    return engine_config_from_args(args)


def test_the_table_below_covers_every_engine_field() -> None:
    assert set(NON_DEFAULT_FLAG_VALUES) == {f.name for f in dataclasses.fields(EngineConfig)}


@pytest.mark.parametrize("command", ["generate", "bench", "serve"])
def test_no_flags_give_the_default_engine_config(parser, command) -> None:
    assert _engine_config(parser, _minimal(command)) == EngineConfig()


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_every_engine_flag_defaults_to_its_field(parser, command) -> None:
    sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    defaults = {a.dest: a.default for a in sub._actions}
    for f in dataclasses.fields(EngineConfig):
        expected = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert f.name in defaults, f"{command}: no flag for EngineConfig.{f.name}"
        assert defaults[f.name] == expected, f.name


@pytest.mark.parametrize("command", ["generate", "bench", "serve"])
@pytest.mark.parametrize("name", sorted(NON_DEFAULT_FLAG_VALUES))
def test_each_engine_flag_sets_its_field(parser, command, name) -> None:
    config = _engine_config(parser, [*_minimal(command), *NON_DEFAULT_FLAG_VALUES[name]])
    changed = {f.name for f in dataclasses.fields(EngineConfig) if getattr(config, f.name) != getattr(EngineConfig(), f.name)}
    assert changed == {name} | COMPANION_FIELDS.get(name, set())


@pytest.mark.parametrize("command", ["generate", "bench", "serve"])
def test_speculative_config_json_sets_the_flat_fields(parser, command) -> None:
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    config = _engine_config(parser, [*_minimal(command), "--speculative-config", spec])
    assert (config.speculative_method, config.num_speculative_tokens, config.prompt_lookup_max) == ("ngram", 4, 3)


def test_help_carries_each_fields_documentation(parser, capsys) -> None:
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(EngineConfig):
        assert " ".join(f.metadata["help"].split()[:4]) in text, f.name


def test_the_issues_serve_command_parses_to_its_cluster_config(parser, monkeypatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = parser.parse_args("serve smollm2-135m --port 8000 --served-model-name tiny --api-key sk-x".split())
    config = config_from_args(args)
    assert config == ClusterConfig(model="smollm2-135m", http_port=8000, served_model_names=["tiny"], api_keys=["sk-x"])
    assert config.model_name == "tiny" and config.api_keys == ["sk-x"]
    assert "sk-x" not in repr(config)


def test_vllm_spellings_parse_to_the_right_config(parser, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    generation = tmp_path / "generation"
    generation.mkdir()
    argv = ["serve", "org/model", "-tp", "2", "--host", "0.0.0.0", "--port", "8001", "--grpc-port", "9001",
            "--served-model-name", "a", "b", "--gpu-memory-utilization", "0.8", "--max-model-len", "1024",
            "--max-num-seqs", "32", "--max-num-batched-tokens", "512", "--no-enable-prefix-caching",
            "--enforce-eager", "--block-size", "32", "--dtype", "bfloat16", "--seed", "5",
            "--chat-template", str(template), "--generation-config", str(generation),
            "--api-key", "k1", "--api-key", "k2"]
    config = config_from_args(parser.parse_args(argv))
    assert (config.model, config.tensor_parallel_size, config.host, config.http_port, config.grpc_port) == (
        "org/model", 2, "0.0.0.0", 8001, 9001)
    assert config.served_model_names == ["a", "b"] and config.model_name == "a"
    assert config.api_keys == ["k1", "k2"]
    assert config.chat_template == template.read_text() and config.generation_config == str(generation)
    assert config.engine_config() == EngineConfig(
        model="org/model", tensor_parallel_size=2, gpu_memory_utilization=0.8, max_model_len=1024, max_num_seqs=32,
        max_num_batched_tokens=512, enable_prefix_caching=False, enforce_eager=True, block_size=32,
        dtype="bfloat16", seed=5)


def test_older_spellings_still_parse(parser) -> None:
    args = parser.parse_args(["serve", "--model", "m", "--tp", "2", "--http-port", "8002", "--no-prefix-cache"])
    config = config_from_args(args)
    assert (config.model, config.tensor_parallel_size, config.http_port) == ("m", 2, 8002)
    assert config.engine_config().enable_prefix_caching is False


@pytest.mark.parametrize("command", ["serve", "generate"])
@pytest.mark.parametrize("flag", ["--enable-lora", "--swap-space",
                                  "--pipeline-parallel-size", "-pp"])
def test_an_unsupported_vllm_flag_names_itself(parser, capsys, command, flag) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*_minimal(command), flag, "1"])
    assert exit_info.value.code == 2
    assert f"error: {flag}: not supported by shardline: {UNSUPPORTED_VLLM_FLAGS[flag]}" in capsys.readouterr().err


def test_an_unsupported_flag_with_equals_names_itself(parser, capsys) -> None:
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--swap-space=4"])
    assert "--swap-space: not supported by shardline" in capsys.readouterr().err


def test_an_unknown_flag_keeps_argparses_error(parser, capsys) -> None:
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--frobnicate"])
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_trust_remote_code_is_accepted_with_a_note(parser, capsys) -> None:
    args = parser.parse_args(["serve", "m", "--trust-remote-code"])
    assert config_from_args(args).model == "m"
    assert "--trust-remote-code has no effect" in capsys.readouterr().err


def test_a_model_given_twice_differently_is_an_error(parser) -> None:
    with pytest.raises(ConfigError, match="model: given twice"):
        config_from_args(parser.parse_args(["serve", "a", "--model", "b"]))


def test_serve_flags_are_laid_over_the_config_files_engine_section(parser, tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("model: from-file\nhttp_port: 8100\nengine:\n  max_num_seqs: 8\n  block_size: 32\n")
    args = parser.parse_args(["serve", "--config", str(path), "--block-size", "64", "--port", "8200"])
    config = config_from_args(args)
    assert config.model == "from-file" and config.http_port == 8200
    assert config.engine == {"max_num_seqs": 8, "block_size": 64}
    assert not config.direct_ingress
    assert config_from_args(parser.parse_args(["serve", "--config", str(path), "--direct-ingress"])).direct_ingress


def test_api_keys_come_from_the_environment_when_none_are_given(monkeypatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "k1, k2,")
    assert ClusterConfig().api_keys == ["k1", "k2"]
    assert ClusterConfig(api_keys=["flag"]).api_keys == ["flag"]
    monkeypatch.delenv(API_KEY_ENV)
    assert ClusterConfig().api_keys == []


def test_front_door_fields_are_validated_naming_the_field(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert ClusterConfig(model="m").served_model_names == ["m"]
    with pytest.raises(ConfigError, match="served_model_names"):
        ClusterConfig(served_model_names=["a", "a"])
    with pytest.raises(ConfigError, match=r"api_keys\[0\]") as bad_key:
        ClusterConfig(api_keys=["has space"])
    assert "has space" not in str(bad_key.value)
    with pytest.raises(ConfigError, match="generation_config"):
        ClusterConfig(generation_config=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="chat_template"):
        ClusterConfig(chat_template=str(tmp_path / "missing.jinja"))


def test_ask_sends_the_flags_key_or_the_environments_first(parser, monkeypatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env,second")
    assert ("authorization", "Bearer sk-x") in ask_metadata(parser.parse_args(["ask", "hi", "--api-key", "sk-x"]))
    assert ("authorization", "Bearer from-env") in ask_metadata(parser.parse_args(["ask", "hi"]))
    monkeypatch.delenv(API_KEY_ENV)
    assert [k for k, _ in ask_metadata(parser.parse_args(["ask", "hi", "--timeout", "2"]))] == ["timeout-ms"]


def test_bench_takes_vllms_num_iters_spelling(parser) -> None:
    assert parser.parse_args(["bench", "latency", "--num-iters", "2"]).iters == 2
    assert parser.parse_args(["bench", "latency", "--iters", "5"]).iters == 5


def test_ask_refuses_a_max_tokens_the_request_cannot_carry(parser, capsys) -> None:
    assert parser.parse_args(["ask", "hi", "--max-tokens", "7"]).max_tokens == 7
    for bad, says in (("-1", "must be at least 1 (and below 2^32), got -1"), ("0", "must be at least 1 (and below 2^32), got 0"),
                      ("ten", "must be an integer, got 'ten'")):
        with pytest.raises(SystemExit):
            parser.parse_args(["ask", "hi", "--max-tokens", bad])
        assert f"argument --max-tokens: {says}" in capsys.readouterr().err


def test_vllms_tool_calling_flags_reach_the_cluster_config(parser, capsys) -> None:
    config = config_from_args(parser.parse_args(["serve", "m", "--enable-auto-tool-choice",
                                                 "--tool-call-parser", "llama3_json"]))
    assert config.enable_auto_tool_choice is True and config.tool_call_parser == "llama3_json"
    plain = config_from_args(parser.parse_args(["serve", "m"]))
    assert plain.enable_auto_tool_choice is False and plain.tool_call_parser is None  # the template decides
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "m", "--tool-call-parser", "mistral"])
    assert "invalid choice: 'mistral'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="tool_call_parser"):
        ClusterConfig(model="m", tool_call_parser="mistral")
