"""Serve's direct ingress (`ClusterConfig.direct_ingress`, cluster/direct_ingress.py) on a real
local cluster: the Ingress replica's own gRPC and HTTP ports serve exactly what the proxy's do
(tokens, text, logprobs, finish reason, usage; SSE through the official openai client), a gRPC
stream cancelled on the direct port aborts its engine request, and a deadline passing there ends
the call with DEADLINE_EXCEEDED. The proxy keeps serving its own ports beside them.

The engine is the stand-in (`load_format="stand-in"`: the real scheduler, sampler, detokenizer and
stop checks without a model), one step every 40 ms, so a 500-token request (20 s) outlives a cancel by far."""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from cluster_fixtures import free_port, generation_stub, running_cluster, write_tiny_model_with_tokenizer  # noqa: E402
from shardline.proto import generation_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ENGINE = dict(load_format="stand-in", num_kv_blocks=96, block_size=8, max_num_seqs=8, max_num_batched_tokens=256,
              device="cpu", extra={"stand_in_step_ms": 40.0})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from shardline.cluster.direct_ingress import direct_ingress_ports

    model_dir = tmp_path_factory.mktemp("tiny-direct-ingress-model")
    write_tiny_model_with_tokenizer(model_dir)
    grpc_port, http_port = free_port(), free_port()
    args = dict(model=str(model_dir), engine=ENGINE, replicas=1, cpus_per_rank=0.5, served_model_names=["tiny"],
                metrics_period_s=0.2, direct_ingress=True, replica_group_options={"graceful_shutdown_timeout_s": 5})
    saved = dict(os.environ)
    try:
        with running_cluster(args, grpc_port, http_port):
            direct_grpc, direct_http = direct_ingress_ports("shardline")
            yield {"grpc_port": grpc_port, "http_port": http_port, "direct_grpc": direct_grpc,
                   "direct_http": direct_http}
    finally:  # the proxy environment (direct ingress on) must not reach other modules' clusters
        os.environ.clear()
        os.environ.update(saved)


def stream(port: int, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    with generation_stub(port) as stub:
        return list(stub.Generate(request, timeout=60))


def busy(port: int) -> int:
    with generation_stub(port) as stub:
        return sum(r.running + r.waiting for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas)


def test_the_ingress_serves_grpc_on_its_own_port_exactly_as_through_the_proxy(cluster) -> None:
    assert cluster["direct_grpc"] not in (cluster["grpc_port"], cluster["http_port"])
    request = pb.GenerateRequest(text="hello the", sampling=pb.SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2))
    direct, proxied = stream(cluster["direct_grpc"], request), stream(cluster["grpc_port"], request)

    def flat(items):
        return ([t for m in items for t in m.token_ids], "".join(m.text for m in items),
                [(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top]) for m in items for lp in m.logprobs],
                items[-1].finish_reason, (items[-1].usage.prompt_tokens, items[-1].usage.completion_tokens))

    ids, text, logprobs, finish, usage = flat(direct)
    assert (ids, text, logprobs, finish, usage) == flat(proxied)
    assert len(ids) == 24 and "capital of france" in text and len(logprobs) == 24
    assert finish == pb.FINISH_REASON_LENGTH and usage[1] == 24


def test_the_ingress_serves_openai_sse_on_its_own_port_exactly_as_through_the_proxy(cluster) -> None:
    from openai import OpenAI

    def completion(port: int):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
        chunks = list(client.completions.create(model="tiny", prompt="the", max_tokens=12, temperature=0.0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        return ("".join(c.choices[0].text for c in chunks if c.choices),
                [c.choices[0].finish_reason for c in chunks if c.choices][-1],
                (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens))

    direct = completion(cluster["direct_http"])
    assert direct == completion(cluster["http_port"])
    assert direct[1] == "length" and direct[2][1] == 12 and direct[0]


def test_a_cancel_on_the_direct_port_aborts_the_engine_request(cluster) -> None:
    long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                              sampling=pb.SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
    with generation_stub(cluster["direct_grpc"]) as stub:
        for i in range(3):  # no deadline: only the cancel can end these before 500 tokens (20 s)
            call = stub.Generate(long, timeout=300)
            for _ in range(1 + i):
                next(call)
            call.cancel()
            deadline = time.monotonic() + 10.0
            while busy(cluster["direct_grpc"]):
                assert time.monotonic() < deadline, f"try {i}: the engine request outlived its cancel"
                time.sleep(0.05)


def test_a_deadline_on_the_direct_port_is_deadline_exceeded(cluster) -> None:
    long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                              sampling=pb.SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        with generation_stub(cluster["direct_grpc"]) as stub:
            for _ in stub.Generate(long, metadata=[("timeout-ms", "500")], timeout=60):
                pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 10  # the server's deadline, not 500 tokens
