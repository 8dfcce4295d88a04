"""`shardline serve` drains on SIGTERM (issue 13, finding 2): a stream in flight when the signal
arrives finishes whole, a call that arrives meanwhile is refused with UNAVAILABLE, and then the
process stops the proxies and Ray and exits 0. Before, serve.shutdown() stopped the proxies first
and cut every open stream with UNAVAILABLE "Stream removed"; and once the drain returned when the
ingress had yielded the stream's last message, the proxy could still be writing it (loaded
machine): the drain now also waits for Serve's proxies to have no request open (cluster/drain.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("ray")

from cluster_fixtures import collect, free_port, generation_stub, wait_serving, write_tiny_model_with_tokenizer  # noqa: E402
from shardline.proto import generation_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOKENS = 400


def test_sigterm_lets_the_stream_in_flight_finish_and_refuses_new_calls(tmp_path) -> None:
    model = tmp_path / "tiny"
    write_tiny_model_with_tokenizer(model)
    grpc_port, http_port = free_port(), free_port()
    log = (tmp_path / "serve.stderr").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline", "serve", "--model", str(model), "--replicas", "1",
         "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--num-kv-blocks", "128", "--device", "cpu",
         "--num-cpus", "2"],
        stdout=subprocess.DEVNULL, stderr=log, text=True, start_new_session=True)
    try:
        wait_serving(grpc_port, timeout_s=240)
        with generation_stub(grpc_port) as stub:
            sampling = pb.SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
            call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=sampling),
                                 timeout=300)
            first = next(call)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as refused:
                for _ in range(600):  # until the drain closed admission (bounded: ~60 s)
                    list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[4]),
                                                          sampling=pb.SamplingParams(max_tokens=1)), timeout=30))
                    time.sleep(0.1)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = collect(call)
        assert rest["finish"] == pb.FINISH_REASON_LENGTH and len(first.token_ids) + len(rest["ids"]) == TOKENS
        assert proc.wait(180) == 0
        stderr = (tmp_path / "serve.stderr").read_text()
        # the stream, and perhaps a probe call admitted just before admission closed; then the proxies
        # had no request open (the stream's last messages had left them) before they were stopped
        drained = re.search(r"drained: (\d+) request\(s\) were in flight on (\d+) ingress replica\(s\), 0 left "
                            r"after [\d.]+ s \(proxies drained: True\)", stderr)
        assert drained and int(drained[1]) >= 1 and int(drained[2]) >= 1, stderr[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
