"""Issue 13 against one real local cluster that serves TLS on both front ends, bound to 127.0.0.1,
with two Ingress replicas and the stand-in engine (tokens every STEP_MS, no model compute):

- gRPC: TLS with a certificate from a CA made here (grpc_ssl_certfile / grpc_ssl_keyfile; Ray
  2.60's proxy has no TLS option and binds every interface, router/grpc_proxy.py adds both), a
  plaintext client refused, and nothing listening on another address of the machine;
- HTTPS (ssl_certfile / ssl_keyfile) reached with the official openai client verifying that CA;
- a drain that closes every Ingress replica (Serve's handle broadcast), not the one a handle call
  happens to reach, and lets the streams of both finish before the proxies stop (last: it closes
  the application)."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("cryptography")

from cluster_fixtures import (  # noqa: E402
    Drain, collect, free_port, generation_stub, running_cluster, write_test_certificates, write_tiny_model_with_tokenizer)
from shardline.proto import generation_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

APP = "shardline"
STEP_MS = 20  # the stand-in engine's step time: a 300-token stream lasts ~6 s
ENGINE = dict(load_format="stand-in", num_kv_blocks=512, block_size=8, max_num_seqs=8, device="cpu",
              extra={"stand_in_step_ms": STEP_MS})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-tls-model")
    write_tiny_model_with_tokenizer(model_dir)
    tls = write_test_certificates(tmp_path_factory.mktemp("tls"))
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes())
    grpc_port, http_port = free_port(), free_port()
    args = dict(model=str(model_dir), engine=ENGINE, replicas=1, ingress_replicas=2, cpus_per_rank=0.5,
                metrics_period_s=0.2, routing_stats_period_s=0.2, served_model_names=["tiny"],
                ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key),
                grpc_ssl_certfile=str(tls.cert), grpc_ssl_keyfile=str(tls.key),
                replica_group_options={"graceful_shutdown_timeout_s": 30})
    with running_cluster(args, grpc_port, http_port, grpc_credentials=credentials):
        yield {"grpc_port": grpc_port, "http_port": http_port, "credentials": credentials, "tls": tls}


@pytest.fixture
def stub(cluster):
    with generation_stub(cluster["grpc_port"], cluster["credentials"]) as stub:
        yield stub


def generate(n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                              sampling=pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


def accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:  # refused: nothing listens on that address
        return False


def test_grpc_serves_tls_on_the_host_it_binds_and_nowhere_else(cluster, stub) -> None:
    out = collect(stub.Generate(generate(4), timeout=60))
    assert out["finish"] == pb.FINISH_REASON_LENGTH and len(out["ids"]) == 4
    with generation_stub(cluster["grpc_port"]) as plaintext, pytest.raises(grpc.RpcError) as error:
        plaintext.Health(pb.HealthRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # no plaintext HTTP/2 on a TLS port
    # 127.0.0.2 is this machine too (the loopback /8): a port bound to every interface accepts there
    assert accepts_tcp("127.0.0.1", cluster["grpc_port"])
    assert not accepts_tcp("127.0.0.2", cluster["grpc_port"])
    assert not accepts_tcp("127.0.0.2", cluster["http_port"])


def test_https_serves_the_openai_client_verifying_the_certificate(cluster) -> None:
    verify = ssl.create_default_context(cafile=str(cluster["tls"].ca))
    with httpx.Client(verify=verify, timeout=60) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{cluster['http_port']}/v1", api_key="unused",
                               http_client=http, max_retries=0)
        completion = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0.0,
                                               extra_body={"ignore_eos": True})
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 4
    with httpx.Client(timeout=30) as unverified, pytest.raises(httpx.ConnectError):  # default roots: untrusted
        unverified.get(f"https://127.0.0.1:{cluster['http_port']}/health")


# ---- last: the drain closes the application --------------------------------------------------------------


def running(stub) -> int:
    return sum(r.running for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas)


def test_a_drain_closes_every_ingress_replica_and_lets_their_streams_finish(stub) -> None:
    tokens, streams = 300, 4
    calls = [stub.Generate(generate(tokens), timeout=300) for _ in range(streams)]
    firsts = [next(call) for call in calls]
    deadline = time.monotonic() + 60
    while running(stub) < streams:
        assert time.monotonic() < deadline, "the streams never all ran"
        time.sleep(0.1)
    drain = Drain(stub, APP).start()
    # Each call goes to either Ingress replica: one left open would serve about half of them.
    for _ in range(10):
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(generate(1), timeout=60))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    for first, call in zip(firsts, calls):
        rest = collect(call)  # every stream in flight, on either replica, finishes whole
        assert rest["finish"] == pb.FINISH_REASON_LENGTH and len(first.token_ids) + len(rest["ids"]) == tokens
    drained = drain.report()
    assert drained.ingress_replicas == 2 and drained.in_flight_at_start == streams
    assert drained.complete and drained.proxies_drained
