"""`shardline serve` (a local Ray cluster running the application) and `shardline ask` (stream an
answer from a running cluster over gRPC). Imported by shardline/cli.py when Ray is installed."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:9000"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the `serve` and `ask` subcommands."""
    serve = sub.add_parser("serve", help="start a local Ray cluster with the gRPC + HTTP application")
    serve.add_argument("--config", help="a ClusterConfig YAML/JSON file, or a Serve config such as deploy/serve.yaml")
    serve.add_argument("--model", default=None, help="model to serve (default: smollm2-135m)")
    serve.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=None)
    serve.add_argument("--replicas", type=int, default=None, help="replica groups (fixed; the config may autoscale)")
    serve.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 9000)")
    serve.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8000)")
    serve.add_argument("--host", default=None, help="address the proxies listen on (default 127.0.0.1)")
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    serve.add_argument("--log-json", action="store_true", default=None,
                       help="replicas and ingress log one JSON object per line (request id, replica group, finish reason, tokens)")
    serve.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    serve.add_argument("--log-prompts", action="store_true", default=None,
                       help="also log prompts and completions (user data: off by default)")
    engine = serve.add_argument_group("engine (override the config's engine section)")
    engine.add_argument("--device", default=None, help="auto, cpu or cuda")
    engine.add_argument("--dtype", default=None)
    engine.add_argument("--load-format", default=None, choices=["auto", "safetensors", "gguf", "dummy"])
    engine.add_argument("--num-kv-blocks", type=int, default=None)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--max-num-seqs", type=int, default=None)
    engine.add_argument("--max-num-batched-tokens", type=int, default=None)
    serve.set_defaults(handler=cmd_serve)

    ask = sub.add_parser("ask", help="stream an answer from a running cluster over gRPC")
    ask.add_argument("prompt")
    ask.add_argument("--address", "--target", dest="address", default=DEFAULT_ADDRESS,
                     help=f"gRPC address HOST:PORT (default {DEFAULT_ADDRESS})")
    mode = ask.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="send the prompt as a user chat message (default)")
    mode.add_argument("--text", dest="chat", action="store_false", help="send the prompt as plain text")
    ask.add_argument("--max-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature (default 0: greedy, the same answer every time)")
    ask.add_argument("--application", default=None, help="Serve application name (needed with several)")
    ask.add_argument("--timeout", type=float, default=120.0, help="seconds before the call is abandoned")
    ask.set_defaults(handler=cmd_ask)


def config_from_args(args: argparse.Namespace):
    """The ClusterConfig of `shardline serve`: the file (if any), then the flags on top."""
    from shardline.cluster.config import ClusterConfig

    top = {"model": args.model, "tensor_parallel_size": args.tensor_parallel_size, "replicas": args.replicas,
           "grpc_port": args.grpc_port, "http_port": args.http_port, "host": args.host,
           "log_json": args.log_json, "log_level": args.log_level, "log_prompts": args.log_prompts}
    top = {k: v for k, v in top.items() if v is not None}
    engine = {k: getattr(args, k) for k in ("device", "dtype", "load_format", "num_kv_blocks", "max_model_len",
                                             "max_num_seqs", "max_num_batched_tokens") if getattr(args, k) is not None}
    if args.replicas is not None:
        top["autoscaling"] = None  # an explicit replica count wins over the file's autoscaling
    if args.config:
        base = ClusterConfig.from_file(args.config)
        data = {f: getattr(base, f) for f in base.__dataclass_fields__}
    else:
        data = {}
    data.update(top)
    data["engine"] = dict(data.get("engine") or {}, **engine)
    return ClusterConfig.from_dict(data)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start Ray, Serve's proxies and the application; wait for Ctrl-C / SIGTERM; drain and exit.

    Draining (cluster/drain.py): the ingress stops admitting (UNAVAILABLE / 503, readiness fails),
    requests in flight finish within graceful_shutdown_timeout_s, then the proxies and Ray stop. A
    second Ctrl-C / SIGTERM stops waiting."""
    import ray
    from ray import serve

    from shardline.cluster.app import build_app
    from shardline.cluster.drain import drain_application
    from shardline.cluster.proxies import apply_proxy_environment, serve_start_options

    config = config_from_args(args)
    stop, give_up = threading.Event(), threading.Event()
    print(f"shardline: starting a local Ray cluster for {config.model} "
          f"(tp={config.tensor_parallel_size}, replicas={config.autoscaling or config.replicas})", file=sys.stderr)
    apply_proxy_environment(config)  # before ray.init: the proxies inherit the node's environment
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)

    def on_signal(*_: Any) -> None:
        (give_up if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM exit
        signal.signal(sig, on_signal)
    try:
        serve.start(**serve_start_options(config))
        serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
        _wait_ready(f"127.0.0.1:{config.grpc_port}", stop)
        if not stop.is_set():
            host = config.host if config.host not in ("0.0.0.0", "::") else "localhost"
            scheme = "https" if config.ssl_certfile else "http"
            print(f"shardline: serving {config.model_name}\n"
                  f"  gRPC    {host}:{config.grpc_port}   (shardline.v1.Generation; try: shardline ask "
                  f"--address {host}:{config.grpc_port} \"What is the capital of France?\")\n"
                  f"  HTTP    {scheme}://{host}:{config.http_port}/v1   (OpenAI-compatible)\n"
                  f"  metrics {scheme}://{host}:{config.http_port}/metrics\n"
                  "Ctrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            pass
        timeout_s = config.graceful_shutdown_timeout_s
        print(f"shardline: draining (new requests refused; up to {timeout_s:.0f} s for those in flight; "
              "Ctrl-C again to stop now)", file=sys.stderr, flush=True)
        try:
            report = drain_application(config.app_name, timeout_s, give_up=give_up)
            print(f"shardline: drained: {report.in_flight_at_start} request(s) were in flight, "
                  f"{report.in_flight_at_end} left after {report.waited_s:.1f} s; shutting down",
                  file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - the application never came up: nothing to drain
            print(f"shardline: nothing to drain ({type(e).__name__}: {e}); shutting down", file=sys.stderr, flush=True)
        serve.shutdown()  # proxies, then replicas (each drains within graceful_shutdown_timeout_s)
    finally:
        ray.shutdown()
    return 0


def _wait_ready(address: str, stop: threading.Event, timeout_s: float = 900.0) -> None:
    import grpc

    from shardline.proto import generation_pb2 as pb, generation_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while not stop.is_set():
            try:
                if stub.Health(pb.HealthRequest(), timeout=15).status == pb.HealthResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the application did not become ready within {timeout_s:.0f} s")
            stop.wait(1.0)


def cmd_ask(args: argparse.Namespace) -> int:
    """Stream one answer to stdout; errors print the gRPC status and exit 1."""
    import grpc

    from shardline.proto import generation_pb2 as pb, generation_pb2_grpc as pb_grpc

    sampling: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if args.chat:
        request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=args.prompt)]),
                                     sampling=pb.SamplingParams(**sampling))
    else:
        request = pb.GenerateRequest(text=args.prompt, sampling=pb.SamplingParams(**sampling))
    metadata = [("timeout-ms", str(int(args.timeout * 1000)))]  # the ingress enforces it too
    if args.application:
        metadata.append(("application", args.application))
    try:
        with grpc.insecure_channel(args.address) as channel:
            last = None
            for response in pb_grpc.GenerationStub(channel).Generate(request, metadata=metadata, timeout=args.timeout):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                last = response
            sys.stdout.write("\n")
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if last is not None and last.finish_reason == pb.FINISH_REASON_ERROR:
        print("error: the engine failed while answering", file=sys.stderr)
        return 1
    return 0
