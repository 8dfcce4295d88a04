"""Shared pieces of the cluster tests: a tiny model directory with a word-level tokenizer and a
chat template, free ports, a real local Ray + Serve start, and small gRPC/HTTP helpers."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path
from typing import Any

from tiny_models import write_chat_tokenizer, write_tiny_checkpoint

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant{% endif %}"
)
WORDS = "the capital of france is paris what hello world user assistant system".split()


def write_tiny_model_with_tokenizer(directory: Path, seed: int = 7):
    """A tiny random Llama (vocab 384) plus a word-level tokenizer over its first ids; returns the
    transformers model (the reference for greedy tokens)."""
    model = write_tiny_checkpoint("llama", directory, seed=seed)
    write_chat_tokenizer(directory, WORDS, CHAT_TEMPLATE, specials=("<unk>", "<s>", "</s>", "<eot>"))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(app_args: dict[str, Any], grpc_port: int, http_port: int, app_name: str = "shardline",
                  from_yaml: dict[str, Any] | None = None) -> None:
    """ray.init on 2 CPUs, Serve's proxies on the given ports, and the application; returns when
    its Health says SERVING."""
    import ray
    from ray import serve

    from shardline.cluster.app import build_app
    from shardline.cluster.config import ClusterConfig
    from shardline.cluster.proxies import apply_proxy_environment, serve_start_options

    config = ClusterConfig.from_dict(dict(app_args, grpc_port=grpc_port, http_port=http_port, host="127.0.0.1"))
    apply_proxy_environment(config)  # the same proxies as `shardline serve` starts
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never join a leftover cluster
    serve.start(**serve_start_options(config))
    serve.run(build_app(app_args), name=app_name, route_prefix="/", blocking=False)
    wait_serving(grpc_port)


def stop_cluster() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def wait_serving(port: int, timeout_s: float = 180.0) -> None:
    import grpc

    from shardline.proto import generation_pb2 as pb, generation_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        last = None
        while time.monotonic() < deadline:
            try:
                reply = stub.Health(pb.HealthRequest(), timeout=15)
                if reply.status == pb.HealthResponse.SERVING:
                    return
                last = reply.detail
            except grpc.RpcError as e:
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"the application never became ready: {last}")


def collect(responses) -> dict[str, Any]:
    """Token ids, text, finish reason and usage of a Generate stream."""
    ids: list[int] = []
    text: list[str] = []
    last = None
    for r in responses:
        ids.extend(r.token_ids)
        text.append(r.text)
        last = r
    return {"ids": ids, "text": "".join(text), "finish": last.finish_reason, "usage": last.usage}


@contextlib.contextmanager
def running_cluster(app_args: dict[str, Any], grpc_port: int, http_port: int):
    """The application running for the duration of the block (a module fixture's body)."""
    start_cluster(app_args, grpc_port, http_port)
    try:
        yield
    finally:
        stop_cluster()


@contextlib.contextmanager
def generation_stub(grpc_port: int):
    """A grpcio client of the Generation service on this machine's gRPC port."""
    import grpc

    from shardline.proto import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield pb_grpc.GenerationStub(channel)
