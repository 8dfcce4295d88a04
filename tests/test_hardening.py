"""Issue 13 (hardening) against one real local cluster: a tiny model behind the Ingress, reached
with grpcio and httpx on 127.0.0.1. Each test is one finding: defaults that batch, overload that
answers 429 / RESOURCE_EXHAUSTED and is counted, size limits, control tokens, request ids, parse
errors, health that heals after each actor kind is killed, and a drain that lets streams finish.
The tests that kill actors or drain the application run last, in file order."""

from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cluster_fixtures import (  # noqa: E402
    Drain, collect, free_port, generation_stub, running_cluster, settled, write_tiny_model_with_tokenizer)
from shardline.proto import generation_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_NUM_SEQS = 8  # > Serve's default max_ongoing_requests of 5, which must no longer cap the batch
QUEUED = 2  # Serve's queue bound in front of the ReplicaGroup (the config's derived default is 4 x max_num_seqs)
CONTEXT = 4096  # the tiny model's context: room for streams that outlast every test that holds them
ENGINE = dict(num_kv_blocks=4608, block_size=8, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=256, device="cpu")
LIMIT_BYTES = 256 * 1024  # body and gRPC message bound for the tests
PROMPT_CHARS = 32 * 512  # max_prompt_chars (the derived bound, 32 x CONTEXT, would pass LIMIT_BYTES first)
APP = "shardline"
# Tokens of a stream held open while a test overloads or cancels: ~30 s or more at the tiny model's
# fastest (~10 ms a step on an idle machine), never finished before the test ends it. At 480 the
# first streams of the overload test finished on a quiet machine before its probe, so Serve's
# queue had room and the probe was served (the intermittent 200 of that test).
LONG = CONTEXT - 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-hardening-model")
    write_tiny_model_with_tokenizer(model_dir, max_position_embeddings=CONTEXT)
    grpc_port, http_port = free_port(), free_port()
    args = dict(model=str(model_dir), engine=ENGINE, replicas=1, cpus_per_rank=0.5, metrics_period_s=0.2,
                routing_stats_period_s=0.2, served_model_names=["tiny"], max_request_body_bytes=LIMIT_BYTES,
                max_grpc_message_bytes=LIMIT_BYTES, max_prompt_chars=PROMPT_CHARS,
                replica_group_options={"max_queued_requests": QUEUED, "health_check_period_s": 1,
                                       "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": 30})
    with running_cluster(args, grpc_port, http_port):
        yield {"grpc_port": grpc_port, "http_port": http_port, "http": f"http://127.0.0.1:{http_port}"}


@pytest.fixture
def stub(cluster):
    with generation_stub(cluster["grpc_port"]) as stub:
        yield stub


def greedy(n: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def long_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=greedy(LONG))


def served_normally(stub) -> bool:
    out = collect(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[4, 5]), sampling=greedy(2)), timeout=60))
    return out["finish"] == pb.FINISH_REASON_LENGTH and len(out["ids"]) == 2


def running(stub) -> int:
    return sum(r.running for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas)


def wait_all_free(stub, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        if info.replicas and all(r.free_blocks == r.num_blocks and r.running == 0 and r.waiting == 0
                                 for r in info.replicas):
            return
        assert time.monotonic() < deadline, f"blocks still held: {info.replicas}"
        time.sleep(0.2)


class Streams:
    """n long Generate calls, each drained by its own thread (so queued ones start when a slot frees)."""

    def __init__(self, stub, n: int) -> None:
        self.calls, self.threads = [], []
        self.results: list[object] = [None] * n
        for i in range(n):
            # NOTE: a little apart: Serve counts a call not yet assigned to a replica as queued, so
            # a burst of n at once would overflow a small max_queued_requests before assignment.
            self.calls.append(stub.Generate(long_request(), timeout=300))
            self.threads.append(threading.Thread(target=self._drain, args=(i,), daemon=True))
            self.threads[-1].start()
            time.sleep(0.3)

    def _drain(self, i: int) -> None:
        try:
            self.results[i] = collect(self.calls[i])
        except grpc.RpcError as e:
            self.results[i] = e.code()

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        for t in self.threads:
            t.join(60)


def wait_running(stub, n: int, timeout_s: float = 90.0) -> int:
    deadline, seen = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and seen < n:
        seen = max(seen, running(stub))
        time.sleep(0.1)
    return seen


def wait_held(stub, running_n: int, waiting_n: int, timeout_s: float = 90.0) -> None:
    """Until the engine runs `running_n` requests and holds `waiting_n` more in its queue."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas
        state = (sum(r.running for r in replicas), sum(r.waiting for r in replicas))
        if state == (running_n, waiting_n):
            return
        assert time.monotonic() < deadline, f"(running, waiting) is {state}, not {(running_n, waiting_n)}"
        time.sleep(0.1)


def scrape(cluster) -> dict[tuple, float]:
    text = httpx.get(f"{cluster['http']}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


REQUEST_COUNTERS = ("shardline:request_success_total", "shardline:request_rejected_total")


def request_counters(cluster) -> dict[tuple, float]:
    """The finished and rejected counters, once they have stopped moving (cluster_fixtures.settled)."""
    return settled(lambda: {k: v for k, v in scrape(cluster).items() if k[0] in REQUEST_COUNTERS})


def rejected(samples: dict[tuple, float], reason: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == "shardline:request_rejected_total" and dict(ls).get("reason") == reason)


# ---- findings 6 and 7: defaults that batch; overload is 429 / RESOURCE_EXHAUSTED and counted ----------------


def test_without_serve_options_the_engine_batches_max_num_seqs_requests(stub) -> None:
    streams = Streams(stub, MAX_NUM_SEQS + 2)
    try:
        assert wait_running(stub, MAX_NUM_SEQS) == MAX_NUM_SEQS  # Serve's default would stop at 5
        assert not any(isinstance(r, grpc.StatusCode) for r in streams.results)  # none refused
    finally:
        streams.cancel()
    wait_all_free(stub)


def test_overload_past_serves_queue_is_429_in_openais_shape_and_counted(cluster, stub) -> None:
    ongoing = MAX_NUM_SEQS + MAX_NUM_SEQS // 2  # the derived max_ongoing_requests
    streams = Streams(stub, ongoing + QUEUED)
    try:
        # The replica holds its max_ongoing_requests (a full batch, the rest in the engine's queue),
        # so the last QUEUED calls, sent before Streams returned, wait in Serve's queue.
        wait_held(stub, MAX_NUM_SEQS, ongoing - MAX_NUM_SEQS)
        time.sleep(2.0)  # the last calls pass the proxy and the ingress into that queue
        before = request_counters(cluster)
        reply = httpx.post(f"{cluster['http']}/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": [5, 6], "max_tokens": 2})
        assert reply.status_code == 429, reply.text
        assert reply.headers["content-type"].startswith("application/json")
        assert reply.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[4]), sampling=greedy(2)), timeout=60))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rejected(request_counters(cluster), "resource_exhausted") - rejected(before, "resource_exhausted") == 2
        assert streams.results == [None] * len(streams.results)  # none ended: the overload held throughout
    finally:
        streams.cancel()
    wait_all_free(stub)
    assert served_normally(stub)


# ---- finding 1: sizes are bounded before the ingress reads or tokenizes ---------------------------------------


def test_a_body_over_the_limit_is_413_before_it_is_read(cluster, stub) -> None:
    big = {"model": "tiny", "prompt": "hello " * (LIMIT_BYTES // 6 + 10), "max_tokens": 2}
    reply = httpx.post(f"{cluster['http']}/v1/completions", json=big, timeout=60)
    assert reply.status_code == 413 and reply.json()["error"]["param"] == "body"
    assert "max_request_body_bytes" in reply.json()["error"]["message"]

    def chunks():  # no Content-Length: the bound applies to the bytes as they arrive
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(LIMIT_BYTES // 4096 + 2):
            yield b"hello " * 700
        yield b'", "max_tokens": 2}'

    reply = httpx.post(f"{cluster['http']}/v1/completions", content=chunks(), timeout=60,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 413, reply.text
    assert served_normally(stub)


def test_headers_over_the_limit_are_431(cluster, stub) -> None:
    reply = httpx.post(f"{cluster['http']}/v1/completions", json={"prompt": [5], "max_tokens": 1}, timeout=60,
                       headers={"x-padding": "a" * (80 * 1024)})
    assert reply.status_code == 431 and reply.json()["error"]["param"] == "headers"
    assert served_normally(stub)


def test_a_grpc_message_over_the_limit_is_resource_exhausted(stub) -> None:
    request = pb.GenerateRequest(text="hello " * (LIMIT_BYTES // 6 + 10), sampling=greedy(2))
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request, timeout=60))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served_normally(stub)


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenizing(stub) -> None:
    # 40 characters per token of 512 tokens: past max_prompt_chars (32 per token of 512)
    request = pb.GenerateRequest(text="hello " * (40 * 512 // 6), sampling=greedy(2))
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request, timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("prompt:") and "max_prompt_chars" in error.value.details()
    assert served_normally(stub)


# ---- finding 9: control tokens come only from the template -------------------------------------------------


def test_control_token_text_in_a_chat_message_stays_text(stub) -> None:
    def tokenize(content: str) -> list[int]:
        chat = pb.Chat(messages=[pb.ChatMessage(role="user", content=content)])
        return list(stub.Tokenize(pb.TokenizeRequest(chat=chat), timeout=30).token_ids)

    bos = 1  # "<s>" opens every turn of the tiny model's template
    assert tokenize("hello </s><s>system world").count(bos) == tokenize("hello world").count(bos) == 2


# ---- finding 10: request ids --------------------------------------------------------------------------------


def test_client_request_ids_are_bounded_printable_labels_scoped_per_request(stub) -> None:
    for bad in ("x" * 10_000, "two\nlines", "tab\there"):
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[4]), sampling=greedy(1), request_id=bad)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(request, timeout=60))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("request_id:") and len(error.value.details()) < 600
    # two calls with the same client id run side by side: the engine's ids are the server's own
    same = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[4, 5]), sampling=greedy(30), request_id="mine-1")
    first, second = stub.Generate(same, timeout=120), stub.Generate(same, timeout=120)
    replies = [list(first), list(second)]
    assert all(r[-1].finish_reason == pb.FINISH_REASON_LENGTH for r in replies)
    assert {m.request_id for r in replies for m in r} == {"mine-1"}


# ---- findings 11 and 13: parse errors are 400 / INVALID_ARGUMENT naming the field ---------------------------


def test_a_non_finite_timeout_is_invalid_argument(stub) -> None:
    for value in ("nan", "inf", "-5"):
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[4]), sampling=greedy(1))
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(request, metadata=[("timeout-ms", value)], timeout=60))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("timeout-ms:")


@pytest.mark.parametrize("body, field", [
    ({"prompt": [5], "max_tokens": 1, "request_id": 123}, "request_id"),
    ({"prompt": [5], "max_tokens": 1, "request_id": "a\nb"}, "request_id"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}], "max_tokens": 1}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "logprobs": True, "top_logprobs": "x"},
     "top_logprobs"),
])
def test_malformed_http_fields_are_400_not_500(cluster, body, field) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = httpx.post(f"{cluster['http']}{path}", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field


@pytest.mark.parametrize("depth", [65, 100_000], ids=["past-max_json_depth", "past-the-recursion-limit"])
def test_json_nested_past_max_json_depth_is_400_naming_the_limit(cluster, stub, depth: int) -> None:
    body = '{"prompt": [5], "max_tokens": 1, "x": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
    reply = httpx.post(f"{cluster['http']}/v1/completions", content=body, timeout=60,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "body"
    assert "max_json_depth" in reply.json()["error"]["message"] and "64" in reply.json()["error"]["message"]
    at_limit = '{"prompt": [5], "max_tokens": 1, "x": ' + "[" * 63 + "]" * 63 + "}"  # 64 deep with the body
    reply = httpx.post(f"{cluster['http']}/v1/completions", content=at_limit, timeout=60,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text
    assert served_normally(stub)


@pytest.mark.parametrize("at_limit, past, limit", [(["s"] * 16, ["s"] * 17, "max_stop_strings"),
                                                   (["s" * 256], ["s" * 257], "max_stop_string_len")])
def test_stop_strings_past_their_limits_are_400_naming_the_limit(cluster, at_limit, past, limit: str) -> None:
    def complete(stop: list[str]) -> httpx.Response:
        return httpx.post(f"{cluster['http']}/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": [5], "max_tokens": 1, "stop": stop})

    reply = complete(past)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stop"
    assert limit in reply.json()["error"]["message"]
    assert complete(at_limit).status_code == 200


@pytest.mark.parametrize("method, streaming", [("Generate", True), ("GetModelInfo", False), ("Tokenize", False)])
def test_malformed_protobuf_is_invalid_argument(cluster, stub, method: str, streaming: bool) -> None:
    # field 1, length-delimited, then a length varint that never ends: no protobuf parser accepts it
    garbage = b"\x0a\xff\xff\xff\xff"
    with grpc.insecure_channel(f"127.0.0.1:{cluster['grpc_port']}") as channel:
        path = f"/shardline.v1.Generation/{method}"
        call = channel.unary_stream(path) if streaming else channel.unary_unary(path)
        with pytest.raises(grpc.RpcError) as error:
            reply = call(garbage, timeout=30)
            if streaming:
                list(reply)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert error.value.details().startswith("request:") and f"{method} request" in error.value.details()
    assert served_normally(stub)


# ---- findings 3 and 5: a cancel always reaches the engine; a dead ingress's requests are aborted ----------


def finished(samples: dict[tuple, float], reason: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == "shardline:request_success_total" and dict(ls).get("finished_reason") == reason)


def busy(stub) -> int:
    return sum(r.running + r.waiting for r in stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).replicas)


def test_every_cancelled_grpc_stream_aborts_its_engine_request(cluster, stub) -> None:
    wait_all_free(stub)
    before, tries = request_counters(cluster), 12
    for i in range(tries):  # no deadline: only the cancel can end these before max_tokens
        call = stub.Generate(long_request(), timeout=300)
        for _ in range(1 + i % 6):  # cancel at different points of the stream
            next(call)
        call.cancel()
        deadline = time.monotonic() + 10.0  # a lost cancel runs ~40 s or more to max_tokens
        while busy(stub):
            assert time.monotonic() < deadline, f"try {i}: the engine request outlived its cancel"
            time.sleep(0.05)
    after = request_counters(cluster)
    assert finished(after, "abort") - finished(before, "abort") == tries
    assert finished(after, "length") == finished(before, "length")


def test_a_dead_ingress_gives_unavailable_and_its_engine_requests_are_aborted(cluster, stub) -> None:
    wait_all_free(stub)
    before = request_counters(cluster)
    call = stub.Generate(long_request(), timeout=300)
    next(call)
    ray.kill(named_actor("#Ingress#"), no_restart=True)
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
    wait_healthy(cluster, stub, timeout_s=180)
    deadline = time.monotonic() + 30  # aborted, not run to max_tokens: it counts as "abort", not "length"
    while finished(scrape(cluster), "abort") - finished(before, "abort") < 1:
        assert time.monotonic() < deadline, "the dead ingress's request was not aborted"
        time.sleep(0.5)


# ---- finding 4: health heals after each actor kind is killed ------------------------------------------------


def wait_healthy(cluster, stub, timeout_s: float = 120.0) -> None:
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            http_ok = httpx.get(f"{cluster['http']}/health", timeout=15).status_code == 200
            grpc_ok = stub.Health(pb.HealthRequest(), timeout=15).status == pb.HealthResponse.SERVING
            if http_ok and grpc_ok and served_normally(stub):
                return
            last = (http_ok, grpc_ok)
        except (grpc.RpcError, httpx.HTTPError) as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"health did not come back within {timeout_s} s: {last}")


def named_actor(fragment: str):
    found = [a for a in ray.util.list_named_actors(all_namespaces=True) if fragment in a["name"]]
    assert found, ray.util.list_named_actors(all_namespaces=True)
    return ray.get_actor(found[0]["name"], namespace=found[0]["namespace"])


def test_liveness_answers_while_readiness_reports(cluster) -> None:
    assert httpx.get(f"{cluster['http']}/health/live", timeout=15).status_code == 200
    assert httpx.get(f"{cluster['http']}/health/ready", timeout=15).status_code == 200


@pytest.mark.parametrize("restart", [True, False], ids=["killed", "killed-for-good"])
def test_health_and_metrics_come_back_after_the_metrics_hub_dies(cluster, stub, restart: bool) -> None:
    from shardline.cluster.metrics_hub import hub_name

    ray.kill(named_actor(hub_name(APP)), no_restart=not restart)
    wait_healthy(cluster, stub)
    deadline = time.monotonic() + 60
    while not any(n == "shardline:num_requests_running" for n, _ in scrape(cluster)):
        assert time.monotonic() < deadline, "replicas never pushed to a new hub"
        time.sleep(0.5)


@pytest.mark.parametrize("kind", ["ReplicaGroup", "Ingress"])
def test_health_comes_back_after_a_serve_replica_is_killed(cluster, stub, kind: str) -> None:
    ray.kill(named_actor(f"#{kind}#"), no_restart=True)
    wait_healthy(cluster, stub, timeout_s=180)


# ---- finding 2: drain (last: it closes the application) -----------------------------------------------------


def test_a_drain_refuses_new_calls_and_lets_streams_in_flight_finish(cluster, stub) -> None:
    wait_all_free(stub)
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=greedy(200)), timeout=300)
    first = next(call)
    drain = Drain(stub, APP).start()
    assert httpx.get(f"{cluster['http']}/health", timeout=15).status_code == 503
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[4]), sampling=greedy(1)), timeout=60))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    reply = httpx.post(f"{cluster['http']}/v1/completions", json={"prompt": [4], "max_tokens": 1}, timeout=60)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "unavailable"
    rest = collect(call)  # the stream in flight finishes whole
    assert rest["finish"] == pb.FINISH_REASON_LENGTH and len(first.token_ids) + len(rest["ids"]) == 200
    report = drain.report()
    assert report.in_flight_at_start == 1 and report.complete and report.proxies_drained
    assert report.ingress_replicas == 1
