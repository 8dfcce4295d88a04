"""A tensor-parallel replica group on the cluster: rank 1 runs as a Ray actor in the replica's
placement group (gloo on CPU), the stream matches the offline single-process engine, and killing
the rank actor fails the group, which Serve replaces."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from cluster_fixtures import (  # noqa: E402
    collect,
    free_port,
    generation_stub,
    running_cluster,
    write_tiny_model_with_tokenizer,
)
from shardline.proto import generation_pb2 as pb  # noqa: E402
from tiny_models import hf_greedy, prompts  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-tp-model")
    hf = write_tiny_model_with_tokenizer(model_dir)
    grpc_port, http_port = free_port(), free_port()
    args = dict(model=str(model_dir), tensor_parallel_size=2, replicas=1, cpus_per_rank=0.5,
                engine=dict(num_kv_blocks=64, block_size=8, max_num_seqs=8, device="cpu",
                            extra={"tp_timeout_s": 20}),
                routing_stats_period_s=0.2, metrics_period_s=0.2,
                replica_group_options={"health_check_period_s": 1, "health_check_timeout_s": 10,
                                       "graceful_shutdown_timeout_s": 5})
    with running_cluster(args, grpc_port, http_port):
        yield {"grpc_port": grpc_port, "hf": hf}


@pytest.fixture
def stub(cluster):
    with generation_stub(cluster["grpc_port"]) as stub:
        yield stub


def generate(stub, ids, n=8):
    sampling = pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return collect(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling), timeout=60))


def test_tp2_replica_group_streams_the_offline_tokens(cluster, stub) -> None:
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.tensor_parallel_size == 2
    for prompt in prompts(3, seed=8, min_len=4, max_len=30):
        assert generate(stub, prompt)["ids"] == hf_greedy(cluster["hf"], prompt, 8)


def rank_actors() -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if "-rank1" in a["name"]]


def test_a_killed_rank_fails_the_group_and_serve_replaces_it(cluster, stub) -> None:
    [rank] = rank_actors()
    before = {r.replica_id for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas}
    ray.kill(ray.get_actor(rank["name"], namespace=rank["namespace"]), no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            out = generate(stub, [5, 6, 7, 8], n=4)
            now = {r.replica_id for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas}
            if out["finish"] == pb.FINISH_REASON_LENGTH and now and not (now & before):
                break
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), e
        assert time.monotonic() < deadline, "the group was not replaced"
        time.sleep(1.0)
    assert generate(stub, prompts(1, seed=8, min_len=4, max_len=30)[0])["ids"] == hf_greedy(
        cluster["hf"], prompts(1, seed=8, min_len=4, max_len=30)[0], 8)

