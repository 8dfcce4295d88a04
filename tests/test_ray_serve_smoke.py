"""What the cluster relies on in Ray Serve 2.60, checked on a real local Ray with a real grpcio client:
the gRPC proxy routes shardline.v1 methods to same-named deployment methods, streams a generator,
returns the status code a method sets on grpc_context, cancels the replica's generator when the
client goes away, answers grpc.health.v1 through a deployment method, serves FastAPI routes on
the same ingress, and hands a custom RequestRouter the request args and each replica's
record_routing_stats(). See docs/ray-serve-notes.md and docs/grpc.md."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import AsyncIterator

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
grpc = pytest.importorskip("grpc")

from fastapi import FastAPI  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402
from ray.serve.config import HTTPOptions, RequestRouterConfig, gRPCOptions  # noqa: E402
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica  # noqa: E402

from shardline.proto import generation_pb2 as pb, generation_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

APP = "smoke"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ParityRouter(RequestRouter):
    """Routes a token-id prompt to replica number (first id mod 2) in the order of the replica ids
    they report through record_routing_stats; until both have reported, it offers every replica
    (Serve then picks the shorter queue). An exception here would leave the request pending
    forever (Serve only logs it), so anything unexpected falls back too."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        args = pending_request.args if pending_request is not None else []
        reported = sorted(
            (r for r in candidate_replicas if r.routing_stats.get("replica")),
            key=lambda r: r.routing_stats["replica"],
        )
        if len(reported) < 2 or not args or not isinstance(args[0], list) or not args[0]:
            return [candidate_replicas]
        return [[reported[args[0][0] % 2]]]


@serve.deployment(
    num_replicas=2,
    ray_actor_options={"num_cpus": 0},
    request_router_config=RequestRouterConfig(
        request_router_class=ParityRouter, request_routing_stats_period_s=0.2
    ),
)
class Backend:
    """Stands in for a ReplicaGroup: echoes which replica served each token."""

    def __init__(self) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id

    def record_routing_stats(self) -> dict:
        return {"replica": self.replica}

    async def generate(self, token_ids: list[int]) -> AsyncIterator[tuple[int, str]]:
        for token in token_ids:
            yield token, self.replica


web = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(web)
class Ingress:
    """One class serving shardline.v1 gRPC methods, grpc.health.v1 Check and HTTP routes."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.cancelled = 0
        self.other_exit = ""

    async def Generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        if request.WhichOneof("input") == "token_ids":
            stream = self.backend.options(stream=True).generate.remote(list(request.token_ids.ids))
            async for token, replica in stream:
                yield pb.GenerateResponse(request_id=replica, token_ids=[token])
            yield pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH)
            return
        try:  # a long stream (about 2 minutes) for the cancellation check
            for i in range(2000):
                yield pb.GenerateResponse(token_ids=[i], text="x")
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        except BaseException as error:
            self.other_exit = repr(error)
            raise

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context) -> pb.TokenizeResponse:
        if not request.text:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details("text: must not be empty")
            return pb.TokenizeResponse()
        ids = [ord(c) for c in request.text]
        return pb.TokenizeResponse(token_ids=ids, count=len(ids))

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, detail=f"cancelled={self.cancelled} {self.other_exit}")

    async def Check(self, request):  # grpc.health.v1.Health/Check lands here
        from grpc_health.v1 import health_pb2

        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    @web.get("/stream")
    def http_stream(self, n: int = 3) -> StreamingResponse:
        return StreamingResponse((f"data: {i}\n\n" for i in range(n)), media_type="text/event-stream")


@pytest.fixture(scope="module")
def serve_app():
    grpc_port, http_port = _free_port(), _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never join a leftover cluster
    try:
        serve.start(
            grpc_options=gRPCOptions(
                port=grpc_port,
                grpc_servicer_functions=[
                    "shardline.proto.generation_pb2_grpc.add_GenerationServicer_to_server",
                    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
                ],
            ),
            http_options=HTTPOptions(host="127.0.0.1", port=http_port),
        )
        backend = Backend.bind()
        serve.run(Ingress.bind(backend), name=APP, route_prefix="/", blocking=False)
        _wait_until_ready(grpc_port)
        yield {"grpc_port": grpc_port, "http_port": http_port}
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_until_ready(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        while True:
            try:
                stub.Health(pb.HealthRequest(), metadata=[("application", APP)], timeout=5)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


@pytest.fixture
def stub(serve_app):
    with grpc.insecure_channel(f"127.0.0.1:{serve_app['grpc_port']}") as channel:
        yield pb_grpc.GenerationStub(channel), channel


META = [("application", APP)]


def test_unary_method_routes_by_name_and_application_metadata(stub) -> None:
    s, _ = stub
    reply = s.Tokenize(pb.TokenizeRequest(text="hi"), metadata=META, timeout=30)
    assert list(reply.token_ids) == [104, 105] and reply.count == 2


def test_status_code_set_on_grpc_context_reaches_the_client(stub) -> None:
    s, _ = stub
    with pytest.raises(grpc.RpcError) as error:
        s.Tokenize(pb.TokenizeRequest(text=""), metadata=META, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "text: must not be empty"


def test_single_application_answers_whatever_application_metadata_says(stub) -> None:
    # The proxy's route lookup falls back to the only application when there is exactly one
    # (ProxyRouter.get_handle_for_endpoint): a wrong or missing name is not NOT_FOUND then.
    s, _ = stub
    for metadata in ([("application", "nope")], []):
        reply = s.Tokenize(pb.TokenizeRequest(text="a"), metadata=metadata, timeout=30)
        assert list(reply.token_ids) == [97]


def test_grpc_health_v1_check_is_routed_to_a_deployment_method(stub) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, channel = stub
    health = health_pb2_grpc.HealthStub(channel)
    # With a single application the proxy routes even without `application` metadata, so a
    # standard probe (Kubernetes grpc probe, grpc_health_probe) works unchanged.
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_custom_router_reads_args_and_routing_stats(stub, serve_app) -> None:
    s, _ = stub
    def served_by(first_token: int) -> str:
        replies = list(s.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[first_token, 7])),
                                  metadata=META, timeout=30))
        assert [list(r.token_ids) for r in replies[:-1]] == [[first_token], [7]]
        assert replies[-1].finish_reason == pb.FINISH_REASON_LENGTH
        return replies[0].request_id

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until both replicas' stats have reached the router
        if served_by(0) != served_by(1):
            break
        time.sleep(0.3)
    even = {served_by(t) for t in (0, 2, 4, 6)}
    odd = {served_by(t) for t in (1, 3, 5, 7)}
    assert len(even) == 1 and len(odd) == 1 and even != odd


@pytest.mark.xfail(
    strict=False,
    reason="intermittent: in 2 of 5 runs on a 2-core machine the replica's generator was not "
    "cancelled within 30 s of the client's cancel (see docs/ray-serve-notes.md); not yet understood",
)
def test_client_cancel_cancels_the_replica_generator(stub) -> None:
    s, _ = stub
    before = s.Health(pb.HealthRequest(), metadata=META, timeout=30).detail
    call = s.Generate(pb.GenerateRequest(text="long"), metadata=META, timeout=60)
    first = [next(call) for _ in range(3)]
    assert [list(m.token_ids) for m in first] == [[0], [1], [2]]
    call.cancel()
    expected = f"cancelled={int(before.split()[0].split('=')[1]) + 1}"
    deadline = time.monotonic() + 30
    while not (detail := s.Health(pb.HealthRequest(), metadata=META, timeout=30).detail).startswith(expected):
        assert time.monotonic() < deadline, f"the replica's generator never saw CancelledError: {detail}"
        time.sleep(0.2)


def test_http_streaming_route_on_the_same_ingress(serve_app) -> None:
    import httpx

    with httpx.stream("GET", f"http://127.0.0.1:{serve_app['http_port']}/stream?n=3", timeout=30) as r:
        assert r.status_code == 200
        body = "".join(r.iter_text())
    assert body == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
