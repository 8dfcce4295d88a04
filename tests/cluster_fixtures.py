"""Shared pieces of the cluster tests: a tiny model directory with a word-level tokenizer and a
chat template, free ports, a real local Ray + Serve start, and small gRPC/HTTP helpers."""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from tiny_models import write_chat_tokenizer, write_tiny_checkpoint

T = TypeVar("T")

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant{% endif %}"
)
WORDS = "the capital of france is paris what hello world user assistant system".split()


def write_tiny_model_with_tokenizer(directory: Path, seed: int = 7, **overrides: Any):
    """A tiny random Llama (vocab 384; `overrides` change its config, e.g. max_position_embeddings)
    plus a word-level tokenizer over its first ids; returns the transformers model (the reference
    for greedy tokens)."""
    model = write_tiny_checkpoint("llama", directory, seed=seed, **overrides)
    write_chat_tokenizer(directory, WORDS, CHAT_TEMPLATE, specials=("<unk>", "<s>", "</s>", "<eot>"))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(app_args: dict[str, Any], grpc_port: int, http_port: int, app_name: str = "shardline",
                  from_yaml: dict[str, Any] | None = None, grpc_credentials: Any = None) -> None:
    """ray.init on 2 CPUs, Serve's proxies on the given ports, and the application; returns when
    its Health says SERVING (over TLS with `grpc_credentials`)."""
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
    wait_serving(grpc_port, credentials=grpc_credentials)


def stop_cluster() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def channel_to(port: int, credentials: Any = None) -> Any:
    """A grpcio channel to this machine's port: TLS with `credentials`, else plaintext."""
    import grpc

    target = f"127.0.0.1:{port}"
    return grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)


def wait_serving(port: int, timeout_s: float = 180.0, credentials: Any = None) -> None:
    import grpc

    from shardline.proto import generation_pb2 as pb, generation_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    with channel_to(port, credentials) as channel:
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
def running_cluster(app_args: dict[str, Any], grpc_port: int, http_port: int, grpc_credentials: Any = None):
    """The application running for the duration of the block (a module fixture's body)."""
    start_cluster(app_args, grpc_port, http_port, grpc_credentials=grpc_credentials)
    try:
        yield
    finally:
        stop_cluster()


@contextlib.contextmanager
def generation_stub(grpc_port: int, credentials: Any = None):
    """A grpcio client of the Generation service on this machine's gRPC port (TLS with `credentials`)."""
    from shardline.proto import generation_pb2_grpc as pb_grpc

    with channel_to(grpc_port, credentials) as channel:
        yield pb_grpc.GenerationStub(channel)


def settled(read: Callable[[], T], apart_s: float = 1.0, timeout_s: float = 60.0) -> T:
    """`read()` once two reads `apart_s` apart agree. For counters a replica pushes to the
    MetricsHub: one push reads its counters and its idle state at slightly different moments, so
    the first snapshot that shows the engine idle may still lack the last request's finish."""
    deadline = time.monotonic() + timeout_s
    last = read()
    while True:
        time.sleep(apart_s)
        now = read()
        if now == last:
            return now
        assert time.monotonic() < deadline, f"still moving after {timeout_s} s: {last} -> {now}"
        last = now


class Drain:
    """`drain_application(app, timeout_s)` on a thread of its own, started at once; `start()`
    returns when readiness (gRPC Health through `stub`) has failed, `report()` joins it."""

    def __init__(self, stub: Any, app: str = "shardline", timeout_s: float = 120.0) -> None:
        import threading

        from shardline.cluster.drain import drain_application

        self._reports: list[Any] = []
        self._thread = threading.Thread(target=lambda: self._reports.append(drain_application(app, timeout_s)))
        self._stub = stub

    def start(self, ready_fails_within_s: float = 30.0) -> "Drain":
        from shardline.proto import generation_pb2 as pb

        self._thread.start()
        deadline = time.monotonic() + ready_fails_within_s
        while self._stub.Health(pb.HealthRequest(), timeout=15).status == pb.HealthResponse.SERVING:
            assert time.monotonic() < deadline, "readiness never failed"
            time.sleep(0.1)
        return self

    def report(self, timeout_s: float = 120.0) -> Any:
        """The DrainReport (cluster/drain.py)."""
        self._thread.join(timeout_s)
        assert self._reports, "the drain did not return"
        return self._reports[0]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA and of a server certificate it signed for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path


def write_test_certificates(directory: Path) -> TlsFiles:
    """A fresh CA (EC P-256) and a server certificate for IP 127.0.0.1 and DNS localhost, valid
    for a day, written as PEM files under `directory` (the key unencrypted, as the proxies read it)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                            critical=True)
        else:
            builder = (builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("shardline test CA", ca_key, "shardline test CA", ca_key, ca=True)
    server_cert = certificate("localhost", server_key, "shardline test CA", ca_key, ca=False)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return files
