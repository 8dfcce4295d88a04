"""`shardline serve` starts a local Ray cluster with the application, prints its endpoints, serves
`shardline ask`, and on SIGTERM drains and exits 0 leaving no Ray processes behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

from cluster_fixtures import free_port, wait_serving, write_tiny_model_with_tokenizer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_shardline_serve_prints_endpoints_answers_and_stops_on_sigterm(tmp_path) -> None:
    model = tmp_path / "tiny"
    write_tiny_model_with_tokenizer(model)
    grpc_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        # vLLM's spellings: positional model, --port for HTTP, --served-model-name
        [sys.executable, "-m", "shardline", "serve", str(model), "--replicas", "1", "--served-model-name", "tiny",
         "--grpc-port", str(grpc_port), "--port", str(http_port), "--num-kv-blocks", "64", "--device", "cpu",
         "--num-cpus", "2"],
        # stderr to a file: an unread pipe fills up (Ray and the replicas log there) and blocks the server
        stdout=subprocess.PIPE, stderr=(tmp_path / "serve.log").open("w"), text=True, start_new_session=True)
    try:
        try:
            wait_serving(grpc_port, timeout_s=180)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n--- serve's stderr (tail) ---\n"
                                 f"{(tmp_path / 'serve.log').read_text()[-4000:]}") from None
        banner = proc.stdout.readline() + proc.stdout.readline() + proc.stdout.readline()
        assert f":{grpc_port}" in banner and f"http://127.0.0.1:{http_port}/v1" in banner
        assert "serving tiny" in banner
        ask = subprocess.run([sys.executable, "-m", "shardline", "ask", "hello world", "--address",
                              f"127.0.0.1:{grpc_port}", "--max-tokens", "4", "--temperature", "0"],
                             capture_output=True, text=True, timeout=120)
        assert ask.returncode == 0, ask.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
