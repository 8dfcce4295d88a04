"""The request bounds of router/limits.py and the config fields behind them, without a cluster
(tests/test_hardening.py checks the same bounds through the real HTTP and gRPC front ends)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardline.cluster.config import ClusterConfig
from shardline.router.limits import json_body, json_nested_deeper_than
from shardline.worker.config import ConfigError
from shardline.worker.engine.params import RequestError


def nested(depth: int) -> bytes:
    """A JSON object whose deepest array is `depth` levels down (the object itself is level 1)."""
    return b'{"x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_a_body_at_the_depth_limit_parses_and_one_level_more_is_refused_naming_the_limit() -> None:
    assert json_body(nested(8), max_depth=8) == json.loads(nested(8))
    with pytest.raises(RequestError) as error:
        json_body(nested(9), max_depth=8)
    assert error.value.field == "body" and "max_json_depth" in str(error.value) and "8" in str(error.value)


def test_nesting_past_the_parsers_recursion_limit_is_the_same_refusal() -> None:
    with pytest.raises(RequestError) as error:
        json_body(b"[" * 100_000 + b"]" * 100_000, max_depth=64)
    assert error.value.field == "body" and "max_json_depth" in str(error.value)


def test_depth_counts_objects_and_arrays_on_the_deepest_path_only() -> None:
    wide = {"a": [1, 2, {"b": [3]}], "c": list(range(10_000))}  # 4 deep at most
    assert not json_nested_deeper_than(wide, 4) and json_nested_deeper_than(wide, 3)
    assert not json_nested_deeper_than(7, 0) and not json_nested_deeper_than("[[[", 0)


def test_invalid_json_is_a_400_naming_the_body() -> None:
    with pytest.raises(RequestError) as error:
        json_body(b'{"prompt": ', max_depth=64)
    assert error.value.field == "body" and error.value.code == "invalid_argument"


def test_grpc_tls_needs_both_files_and_they_must_exist(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here: the proxy reads it")
    with pytest.raises(ConfigError, match="grpc_ssl_certfile"):
        ClusterConfig(grpc_ssl_certfile=str(cert))
    with pytest.raises(ConfigError, match="grpc_ssl_keyfile: no such file"):
        ClusterConfig(grpc_ssl_certfile=str(cert), grpc_ssl_keyfile=str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="max_json_depth"):
        ClusterConfig(max_json_depth=0)


def test_the_grpc_proxy_options_carry_host_and_tls_through_pickling(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from ray import cloudpickle

    from shardline.cluster.proxies import serve_start_options
    from shardline.router.grpc_proxy import ProxyGrpcOptions, listen_address

    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("-")
    config = ClusterConfig(host="10.1.2.3", grpc_port=9123, grpc_ssl_certfile=str(tmp_path / "cert.pem"),
                           grpc_ssl_keyfile=str(tmp_path / "key.pem"))
    options = cloudpickle.loads(cloudpickle.dumps(serve_start_options(config)["grpc_options"]))
    assert isinstance(options, ProxyGrpcOptions)
    assert (options.host, options.port, options.ssl_certfile) == ("10.1.2.3", 9123, str(tmp_path / "cert.pem"))
    assert listen_address(options.host, options.port) == "10.1.2.3:9123"
    assert listen_address("::1", 9000) == "[::1]:9000" and listen_address("[::]", 9000) == "[::]:9000"


def test_serve_flags_set_the_tls_files_and_the_limits(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from shardline.cli import build_parser
    from shardline.serve_cli import config_from_args

    files = [tmp_path / name for name in ("c.pem", "k.pem", "gc.pem", "gk.pem")]
    for f in files:
        f.write_text("-")
    args = build_parser().parse_args(
        ["serve", "--ssl-certfile", str(files[0]), "--ssl-keyfile", str(files[1]), "--grpc-ssl-certfile",
         str(files[2]), "--grpc-ssl-keyfile", str(files[3]), "--max-stop-strings", "4", "--max-stop-string-len", "32"])
    config = config_from_args(args)
    assert (config.ssl_certfile, config.ssl_keyfile, config.grpc_ssl_certfile, config.grpc_ssl_keyfile) == tuple(
        map(str, files))
    assert (config.engine_config().max_stop_strings, config.engine_config().max_stop_string_len) == (4, 32)
