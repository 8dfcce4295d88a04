"""The serving cluster end to end on a real local Ray: two replica groups of a tiny model behind
the Ingress, reached with a real grpcio client and the official openai client. Streams match the
offline engine, the KV-aware router sends a shared prefix where it is cached, bad input, overload,
cancellation and deadlines map to the right status codes and free their blocks, /metrics counts
exactly, and a killed replica group is replaced while survivors serve."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

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

BLOCK = 8
ENGINE = dict(num_kv_blocks=96, block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=256, device="cpu")
MAX_IN_FLIGHT = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-cluster-model")
    hf = write_tiny_model_with_tokenizer(model_dir)
    grpc_port, http_port = free_port(), free_port()
    args = dict(model=str(model_dir), engine=ENGINE, replicas=2, cpus_per_rank=0.5, max_in_flight=MAX_IN_FLIGHT,
                routing_stats_period_s=0.2, metrics_period_s=0.2, served_model_names=["tiny"],
                replica_group_options={"health_check_period_s": 1, "health_check_timeout_s": 10,
                                       "graceful_shutdown_timeout_s": 5})
    with running_cluster(args, grpc_port, http_port):
        yield {"grpc_port": grpc_port, "http_port": http_port, "hf": hf, "model_dir": model_dir}


@pytest.fixture
def stub(cluster):
    with generation_stub(cluster["grpc_port"]) as stub:
        yield stub


def greedy(n: int, **kw) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def generate_ids(stub, ids: list[int], n: int = 8, **kw) -> dict:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=greedy(n), **kw)
    return collect(stub.Generate(request, timeout=60))


def wait_for_stats() -> None:
    time.sleep(1.0)  # routing stats (0.2 s period) and metrics pushes reach the router / hub


def test_streaming_generate_returns_the_offline_engines_tokens(cluster, stub) -> None:
    for prompt in prompts(3, seed=21, min_len=5, max_len=30):
        out = generate_ids(stub, prompt, n=10)
        assert out["ids"] == hf_greedy(cluster["hf"], prompt, 10)
        assert out["finish"] == pb.FINISH_REASON_LENGTH
        assert out["usage"].prompt_tokens == len(prompt) and out["usage"].completion_tokens == 10


def test_text_and_chat_input_are_tokenized_by_the_ingress(cluster, stub) -> None:
    text = "what is the capital of france"
    ids = list(stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30).token_ids)
    by_text = collect(stub.Generate(pb.GenerateRequest(text=text, sampling=greedy(6)), timeout=60))
    assert by_text["ids"] == hf_greedy(cluster["hf"], ids, 6)
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content=text)])
    chat_ids = list(stub.Tokenize(pb.TokenizeRequest(chat=chat), timeout=30).token_ids)
    assert chat_ids[0] == 1 and len(chat_ids) > len(ids)  # <s>user ... </s><s>assistant
    by_chat = collect(stub.Generate(pb.GenerateRequest(chat=chat, sampling=greedy(6)), timeout=60))
    assert by_chat["ids"] == hf_greedy(cluster["hf"], chat_ids, 6)
    assert by_chat["usage"].prompt_tokens == len(chat_ids)


def test_a_shared_prefix_lands_on_the_replica_that_caches_it(stub) -> None:
    # 6 full blocks of shared prefix; each follow-up can only hit the cache on the replica that
    # served the first request, so cached tokens in usage say where it was routed.
    prefix = prompts(1, seed=5, min_len=6 * BLOCK, max_len=6 * BLOCK)[0]
    first = generate_ids(stub, prefix + [7, 8, 9], n=2)
    assert first["usage"].cached_prompt_tokens == 0
    wait_for_stats()
    for i, tail in enumerate(prompts(6, seed=77, min_len=3, max_len=9)):
        out = generate_ids(stub, prefix + tail, n=2)
        assert out["usage"].cached_prompt_tokens >= 6 * BLOCK, f"follow-up {i} missed the cached prefix"


def test_a_repeated_prompt_reports_cached_tokens(stub) -> None:
    prompt = prompts(1, seed=99, min_len=4 * BLOCK + 3, max_len=4 * BLOCK + 3)[0]
    assert generate_ids(stub, prompt)["usage"].cached_prompt_tokens == 0
    wait_for_stats()
    assert generate_ids(stub, prompt)["usage"].cached_prompt_tokens == 4 * BLOCK


def test_unrelated_prompts_spread_over_both_replica_groups(stub) -> None:
    before = {r.replica_id: r.prefix_cache_query_tokens for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas}
    assert len(before) == 2
    for prompt in prompts(12, seed=1234, min_len=2 * BLOCK, max_len=3 * BLOCK):
        generate_ids(stub, prompt, n=1)
    wait_for_stats()
    after = {r.replica_id: r.prefix_cache_query_tokens for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas}
    assert all(after[r] > before[r] for r in before), (before, after)


def test_bad_input_is_invalid_argument_naming_the_field(stub) -> None:
    cases = [
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), sampling=pb.SamplingParams(top_p=0.0)), "top_p"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), sampling=pb.SamplingParams(temperature=-1)), "temperature"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 100000])), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 600)), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), sampling=pb.SamplingParams(max_tokens=10_000)), "max_tokens"),
        (pb.GenerateRequest(), "input"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(request, timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.value)
        assert error.value.details().startswith(field + ":"), error.value.details()
    assert generate_ids(stub, [5, 6, 7], n=3)["finish"] == pb.FINISH_REASON_LENGTH


def _total(stub, key: str) -> int:
    return sum(getattr(r, key) for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas)


def _wait_all_free(stub, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        if all(r.free_blocks == r.num_blocks and r.running == 0 and r.waiting == 0 for r in info.replicas):
            return
        assert time.monotonic() < deadline, f"blocks still held: {info.replicas}"
        time.sleep(0.2)


def test_a_deadline_aborts_the_request_and_frees_its_blocks(stub) -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(3, 40))), sampling=greedy(400))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request, metadata=[("timeout-ms", "700")], timeout=60))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 20
    _wait_all_free(stub)


def test_a_cancelled_stream_frees_its_blocks_and_others_finish(stub) -> None:
    other = {}
    worker = threading.Thread(target=lambda: other.update(generate_ids(stub, prompts(1, seed=3)[0], n=30)))
    worker.start()
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(3, 40))), sampling=greedy(400)),
                         metadata=[("timeout-ms", "15000")], timeout=60)
    next(call)
    next(call)
    call.cancel()
    worker.join(60)
    assert other["finish"] == pb.FINISH_REASON_LENGTH and len(other["ids"]) == 30
    _wait_all_free(stub, timeout_s=30)  # the cancel, or at worst the 15 s deadline, aborts it


def test_overload_is_resource_exhausted_at_once_and_others_finish(stub) -> None:
    long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=greedy(120))
    calls = [stub.Generate(long, timeout=120) for _ in range(MAX_IN_FLIGHT)]
    for call in calls:
        next(call)  # each is admitted and streaming
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(long, timeout=60))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 5
    assert all(len(collect(call)["ids"]) == 119 for call in calls)
    _wait_all_free(stub)


def test_model_info_and_health(stub) -> None:
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert (info.model, info.max_model_len, info.vocab_size, info.block_size) == ("tiny", 512, 384, BLOCK)
    assert info.tensor_parallel_size == 1 and info.replica_groups == 2
    assert stub.Health(pb.HealthRequest(), timeout=30).status == pb.HealthResponse.SERVING


def test_grpc_health_v1_check_answers_serving(cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{cluster['grpc_port']}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- HTTP: the official openai client --------------------------------------------------------------


@pytest.fixture
def openai_client(cluster):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{cluster['http_port']}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_openai_completions_match_grpc_streaming_and_not(openai_client, stub) -> None:
    prompt = prompts(1, seed=31, min_len=6, max_len=6)[0]
    expected = generate_ids(stub, prompt, n=6)
    reply = openai_client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0.0,
                                             extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected["text"] and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 6
    chunks = list(openai_client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0.0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_openai_chat_streaming_and_not(openai_client, stub) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hello world")])
    expected = collect(stub.Generate(pb.GenerateRequest(chat=chat, sampling=greedy(5)), timeout=60))
    reply = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0.0,
                                                  extra_body={"ignore_eos": True})
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.prompt_tokens == expected["usage"].prompt_tokens
    stream = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0.0,
                                                   stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [m.id for m in openai_client.models.list().data] == ["tiny"]


def test_http_bad_input_is_400_in_the_openai_error_shape(cluster, openai_client) -> None:
    import httpx
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        openai_client.completions.create(model="tiny", prompt=[5, 6], max_tokens=4, top_p=0.0)
    body = error.value.body
    assert body["param"] == "top_p" and body["type"] == "invalid_request_error" and "top_p" in body["message"]
    raw = httpx.post(f"http://127.0.0.1:{cluster['http_port']}/v1/chat/completions",
                     json={"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, timeout=30)
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.json()["error"]["param"].startswith("messages[0]")
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="gpt-4", prompt="hello", max_tokens=2)


def test_http_overload_is_429(cluster, stub) -> None:
    import httpx

    long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=greedy(100))
    calls = [stub.Generate(long, timeout=120) for _ in range(MAX_IN_FLIGHT)]
    for call in calls:
        next(call)
    reply = httpx.post(f"http://127.0.0.1:{cluster['http_port']}/v1/completions",
                       json={"model": "tiny", "prompt": [5, 6], "max_tokens": 2}, timeout=30)
    assert reply.status_code == 429 and reply.json()["error"]["type"] == "rate_limit_error"
    for call in calls:
        call.cancel()
    _wait_all_free(stub, timeout_s=30)


def test_a_dropped_sse_stream_frees_its_blocks(cluster, stub) -> None:
    import httpx

    body = {"model": "tiny", "prompt": list(range(3, 40)), "max_tokens": 400, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{cluster['http_port']}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # the connection is closed here, mid-stream
    _wait_all_free(stub, timeout_s=40)


# ---- metrics (issue 6): exact counters for the requests sent ---------------------------------------------


def scrape(cluster) -> dict[tuple, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{cluster['http_port']}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def summed(samples: dict[tuple, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_metrics_count_exactly_the_requests_sent(cluster, stub) -> None:
    _wait_all_free(stub)
    time.sleep(1.0)  # the last pushes of every replica reached the hub
    before = scrape(cluster)
    sent = prompts(5, seed=4242, min_len=4, max_len=12)
    for p in sent:
        generate_ids(stub, p, n=3)
    with pytest.raises(grpc.RpcError):
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), sampling=pb.SamplingParams(top_p=2.0)),
                           timeout=30))
    expected = {
        ("shardline:request_success_total", "length"): 5,
        ("shardline:prompt_tokens_total", None): sum(map(len, sent)),
        ("shardline:generation_tokens_total", None): 15,
        ("shardline:time_to_first_token_seconds_count", None): 5,
        ("shardline:inter_token_latency_seconds_count", None): 10,
        ("shardline:e2e_request_latency_seconds_count", None): 5,
    }
    deadline = time.monotonic() + 20
    while True:
        after = scrape(cluster)
        got = {}
        for (name, reason) in expected:
            labels = {"finished_reason": reason} if reason else {}
            got[(name, reason)] = summed(after, name, **labels) - summed(before, name, **labels)
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert got == expected
    assert summed(after, "shardline:request_rejected_total", reason="invalid_argument") - summed(
        before, "shardline:request_rejected_total", reason="invalid_argument") == 1
    assert summed(after, "shardline:router_decisions_total") - summed(before, "shardline:router_decisions_total") >= 5
    groups = {dict(ls).get("replica_group") for (n, ls) in after if n == "shardline:num_requests_running"}
    assert len(groups) == 2


# ---- failure: a replica group dies -----------------------------------------------------------------------


def test_a_killed_replica_group_is_replaced_while_survivors_serve(stub) -> None:
    from ray import serve  # noqa: F401

    before = {r.replica_id for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas}
    assert len(before) == 2
    victim_id = sorted(before)[0]
    victim = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "ReplicaGroup" in a["name"] and victim_id in a["name"]]
    assert victim, ray.util.list_named_actors(all_namespaces=True)
    ray.kill(ray.get_actor(victim[0]["name"], namespace=victim[0]["namespace"]), no_restart=True)
    started = time.monotonic()
    served = 0
    while time.monotonic() - started < 90:
        out = generate_ids(stub, prompts(1, seed=int(time.monotonic() * 1000) % 10_000)[0], n=2)
        served += out["finish"] == pb.FINISH_REASON_LENGTH
        now = {r.replica_id for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas}
        if len(now) == 2 and victim_id not in now:
            break
        time.sleep(0.5)
    assert served >= 1
    assert len(now) == 2 and victim_id not in now, now
