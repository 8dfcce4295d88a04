"""deploy/serve.yaml is a valid Serve config whose application `serve run` starts as a new user
would: the default model answers `shardline ask "What is the capital of France?"` over gRPC and
the same question through the openai client over HTTP, both with Paris."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from cluster_fixtures import free_port, wait_serving  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SERVE_YAML = Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml"
QUESTION = "What is the capital of France?"


def test_serve_yaml_validates_with_serve_deploy_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    [app] = schema.applications
    assert app.import_path == "shardline.cluster.app:build_app"


def test_serve_yaml_args_and_deployments_make_one_cluster_config() -> None:
    from shardline.cluster.config import ClusterConfig

    config = ClusterConfig.from_file(SERVE_YAML)
    options = config.replica_group_deployment_options()
    assert config.model == "smollm2-135m" and config.grpc_port == 9000 and config.http_port == 8000
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert len(options["placement_group_bundles"]) == config.tensor_parallel_size
    assert options["autoscaling_config"]["max_replicas"] >= options["autoscaling_config"]["min_replicas"]
    assert options["max_ongoing_requests"] == 96


def test_an_unknown_config_key_is_an_error_naming_it() -> None:
    from shardline.cluster.config import ClusterConfig
    from shardline.worker.config import ConfigError

    with pytest.raises(ConfigError, match="^replcas: unknown"):
        ClusterConfig.from_dict({"replcas": 2})
    with pytest.raises(ConfigError, match="^engine.max_num_seq: unknown"):
        ClusterConfig.from_dict({"engine": {"max_num_seq": 2}})


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_source):
    """`serve run` on a copy of deploy/serve.yaml with free ports and a small CPU KV pool."""
    config = yaml.safe_load(SERVE_YAML.read_text())
    grpc_port, http_port = free_port(), free_port()
    config["http_options"].update(host="127.0.0.1", port=http_port)
    config["grpc_options"]["port"] = grpc_port
    app = config["applications"][0]
    app["args"]["engine"].update(num_kv_blocks=128, device="cpu")
    app["args"]["cpus_per_rank"] = 0.5
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    # `serve run`, through this interpreter (a copied venv's `serve` script may name another one)
    serve_cli = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    proc = subprocess.Popen([*serve_cli, "run", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=dict(os.environ, RAY_DISABLE_DASHBOARD="1"))
    try:
        wait_serving(grpc_port, timeout_s=300)
        yield {"grpc_port": grpc_port, "http_port": http_port}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_shardline_ask_streams_an_answer_with_paris(served) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardline", "ask", QUESTION, "--target", f"127.0.0.1:{served['grpc_port']}",
         "--max-tokens", "40"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_openai_client_gets_paris_over_http(served) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served['http_port']}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=40, temperature=0.0)
    assert "Paris" in reply.choices[0].message.content


def test_ask_reports_invalid_argument_with_the_field(served) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardline", "ask", QUESTION, "--address", f"127.0.0.1:{served['grpc_port']}",
         "--temperature", "-1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: temperature:" in result.stderr
