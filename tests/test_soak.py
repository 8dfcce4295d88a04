"""Issue 13's soak: 2,000 mixed gRPC requests against one real local cluster (the stand-in engine:
the real scheduler, block manager, sampler, detokenizer and Serve path, no model compute), 24 at a
time: plain streams, streams the client cancels after their first message, streams whose client
deadline passes mid-stream, and bad inputs. Afterwards every KV block is free, nothing runs or
waits, and the server's counters add up to what the client saw: each request the engine received
is counted once as finished or aborted, each refused one once as rejected.

A request the client gives up on before its first message may never have reached the ingress; the
client counts those (`unseen`) and the totals are checked within them."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cluster_fixtures import free_port, running_cluster, settled, write_tiny_model_with_tokenizer  # noqa: E402
from shardline.proto import generation_pb2 as pb, generation_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REQUESTS = 2000
CONCURRENCY = 24
CONTEXT = 512  # the tiny model's
ENGINE = dict(load_format="stand-in", num_kv_blocks=256, block_size=8, max_num_seqs=32, device="cpu",
              extra={"stand_in_step_ms": 2})
KINDS = ("plain", "cancel", "deadline", "bad")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-soak-model")
    write_tiny_model_with_tokenizer(model_dir)
    grpc_port, http_port = free_port(), free_port()
    args = dict(model=str(model_dir), engine=ENGINE, replicas=1, ingress_replicas=1, cpus_per_rank=0.5,
                metrics_period_s=0.2, routing_stats_period_s=0.2, served_model_names=["tiny"])
    with running_cluster(args, grpc_port, http_port):
        yield {"grpc_port": grpc_port, "http": f"http://127.0.0.1:{http_port}"}


def bad_request(rng: random.Random) -> pb.GenerateRequest:
    """One of several inputs the ingress must refuse with INVALID_ARGUMENT."""
    choice = rng.randrange(5)
    ids = pb.TokenIds(ids=[5, 6])
    if choice == 0:
        return pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=2))  # no input
    if choice == 1:
        return pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingParams(max_tokens=CONTEXT * 2))
    if choice == 2:
        return pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingParams(max_tokens=2, temperature=-1.0))
    if choice == 3:
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**6]), sampling=pb.SamplingParams(max_tokens=2))
    return pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingParams(max_tokens=2), request_id="bad id\n")


async def one(stub, kind: str, rng: random.Random) -> str:
    """Send one request of `kind`; returns what the client saw: finished, cancelled, deadline,
    invalid, or unseen (given up before any message: the server may never have had it)."""
    prompt = pb.TokenIds(ids=[rng.randrange(3, 380) for _ in range(rng.randrange(1, 24))])
    if kind == "bad":
        try:
            async for _ in stub.Generate(bad_request(rng), timeout=120):
                pass
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
            return "invalid"
        raise AssertionError("a bad input was served")
    long = kind in ("cancel", "deadline")
    sampling = pb.SamplingParams(max_tokens=rng.randrange(200, 400) if long else rng.randrange(1, 12),
                                 temperature=rng.choice([0.0, 0.8]), ignore_eos=True)
    timeout = rng.uniform(0.3, 1.0) if kind == "deadline" else 120
    cancel_after = rng.randrange(1, 4)  # messages read before a "cancel" request is cancelled
    call = stub.Generate(pb.GenerateRequest(token_ids=prompt, sampling=sampling), timeout=timeout)
    seen = 0
    try:
        async for message in call:
            seen += 1
            if message.finish_reason:
                assert message.finish_reason == pb.FINISH_REASON_LENGTH
                return "finished"
            if kind == "cancel" and seen >= cancel_after:
                call.cancel()
                return "cancelled"
    except grpc.aio.AioRpcError as e:
        if kind == "deadline" and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "deadline" if seen else "unseen"
        raise
    raise AssertionError(f"a {kind} stream ended without a finish reason")


def counters(cluster) -> Counter:
    text = httpx.get(f"{cluster['http']}/metrics", timeout=30).text
    out: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "shardline:request_success_total":
                out["success:" + s.labels["finished_reason"]] += s.value
            elif s.name == "shardline:request_rejected_total":
                out["rejected:" + s.labels["reason"]] += s.value
    return out


def wait_idle(stub_sync, timeout_s: float = 120.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = stub_sync.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas
        if replicas and all(r.free_blocks == r.num_blocks and r.running == 0 and r.waiting == 0 for r in replicas):
            return list(replicas)
        assert time.monotonic() < deadline, f"not idle: {replicas}"
        time.sleep(0.2)


def test_two_thousand_mixed_requests_leave_every_block_free_and_the_counters_adding_up(cluster) -> None:
    rng = random.Random(13)
    kinds = rng.choices(KINDS, weights=[50, 20, 15, 15], k=REQUESTS)
    with grpc.insecure_channel(f"127.0.0.1:{cluster['grpc_port']}") as channel:
        stub_sync = pb_grpc.GenerationStub(channel)
        wait_idle(stub_sync)
        before = settled(lambda: counters(cluster))

        async def run() -> Counter:
            seen: Counter = Counter()
            queue: asyncio.Queue = asyncio.Queue()
            for i, kind in enumerate(kinds):
                queue.put_nowait((kind, random.Random(i)))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster['grpc_port']}") as aio_channel:
                stub = pb_grpc.GenerationStub(aio_channel)

                async def worker() -> None:
                    while not queue.empty():
                        kind, request_rng = queue.get_nowait()
                        seen[await one(stub, kind, request_rng)] += 1

                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return seen

        started = time.monotonic()
        seen = asyncio.run(run())
        took = time.monotonic() - started
        replicas = wait_idle(stub_sync)  # every block back in the pool, nothing running or waiting
        after = settled(lambda: counters(cluster))
    delta = {k: after[k] - before[k] for k in set(after) | set(before) if after[k] != before[k]}
    print(f"\nsoak: {REQUESTS} requests in {took:.1f} s; client saw {dict(seen)}; server counted {delta}")
    assert sum(seen.values()) == REQUESTS and seen["finished"] >= kinds.count("plain")
    assert delta.get("rejected:invalid_argument", 0) == seen["invalid"] == kinds.count("bad")
    engine_counted = sum(v for k, v in delta.items() if k.startswith("success:"))
    counted = engine_counted + sum(v for k, v in delta.items() if k.startswith("rejected:"))
    # each request once: finished, aborted or rejected (an unseen one may not have reached the server)
    assert REQUESTS - seen["unseen"] <= counted <= REQUESTS, (delta, seen)
    assert delta.get("success:length", 0) >= seen["finished"]
    assert delta.get("success:length", 0) + delta.get("success:abort", 0) == engine_counted
    assert all(r.num_blocks == 256 for r in replicas)
