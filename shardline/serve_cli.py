"""`shardline serve` (a local Ray cluster running the application) and `shardline ask` (stream an
answer from a running cluster over gRPC). Imported by shardline/cli.py when Ray is installed."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from shardline.cluster.config import API_KEY_ENV
from shardline.engine_args import add_engine_args, add_vllm_compatibility_flags, engine_overrides
from shardline.router.tool_parsers import TOOL_CALL_PARSERS
from shardline.worker.config import ConfigError

if TYPE_CHECKING:
    from shardline.cluster.config import ClusterConfig

DEFAULT_ADDRESS = "127.0.0.1:9000"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the `serve` and `ask` subcommands."""
    serve = sub.add_parser(
        "serve", help="start a local Ray cluster with the gRPC + HTTP application",
        description="Start a local Ray cluster serving MODEL over gRPC and an OpenAI-compatible HTTP API. "
                    "Flags use vLLM's spellings; engine flags override the config file's engine section.")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="model to serve, as --model (vLLM's positional model)")
    serve.add_argument("--config", help="a ClusterConfig YAML/JSON file, or a Serve config such as deploy/serve.yaml")
    serve.add_argument("--replicas", type=int, default=None, help="replica groups (fixed; the config may autoscale)")
    serve.add_argument("--port", "--http-port", dest="http_port", type=int, default=None,
                       help="HTTP port of the OpenAI-compatible API and /metrics (default 8000)")
    serve.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 9000)")
    serve.add_argument("--host", default=None, help="address the proxies listen on (default 127.0.0.1)")
    serve.add_argument("--served-model-name", dest="served_model_names", nargs="+", default=None, metavar="NAME",
                       help="names clients may request; the first is the one reported (default: the model)")
    serve.add_argument("--api-key", dest="api_keys", action="append", default=None, metavar="KEY",
                       help="a key clients must send (Authorization: Bearer KEY; gRPC `authorization` metadata); "
                            "repeat for several; default: $SHARDLINE_API_KEY (comma-separated), else no auth")
    serve.add_argument("--generation-config", default=None, metavar="auto|vllm|DIR",
                       help="default sampling parameters: auto (the model's generation_config.json, default), "
                            "vllm (the server's own), or a directory holding a generation_config.json")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a chat template (file, or the Jinja text) replacing the model's own")
    serve.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                       help='chat requests may let the model decide to call tools (tool_choice "auto", the default '
                            "with tools); without it such a request is a 400, as in vLLM")
    serve.add_argument("--tool-call-parser", default=None, metavar="NAME", choices=sorted(TOOL_CALL_PARSERS),
                       help="how the model's tool calls are read: hermes (<tool_call> JSON; Qwen, Hermes, "
                            "SmolLM2) or llama3_json (Llama 3.x JSON); default: the one the chat template implies")
    serve.add_argument("--ssl-certfile", default=None, metavar="FILE", help="HTTPS for the HTTP API (with --ssl-keyfile)")
    serve.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="the HTTPS private key (with --ssl-certfile)")
    serve.add_argument("--grpc-ssl-certfile", default=None, metavar="FILE",
                       help="TLS for the gRPC API: PEM certificate chain (with --grpc-ssl-keyfile)")
    serve.add_argument("--grpc-ssl-keyfile", default=None, metavar="FILE",
                       help="the gRPC TLS private key (with --grpc-ssl-certfile)")
    serve.add_argument("--tenant-isolation", action="store_true", default=None,
                       help="each API key gets its own prefix-cache partition: cache hits, cached_tokens and TTFT "
                            "never reveal another tenant's prompts (docs/security.md)")
    serve.add_argument("--direct-ingress", action="store_true", default=None,
                       help="the Ingress replicas also serve gRPC and HTTP on ports of their own (Serve's direct "
                            "ingress: no proxy hop; ports printed at start-up; no TLS; docs/performance.md)")
    serve.add_argument("--max-request-body-bytes", type=int, default=None, metavar="N",
                       help="HTTP bodies beyond this are refused with 413 before they are read (default 8 MiB)")
    serve.add_argument("--max-grpc-message-bytes", type=int, default=None, metavar="N",
                       help="gRPC messages beyond this are refused (default 8 MiB)")
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    serve.add_argument("--log-json", action="store_true", default=None,
                       help="replicas and ingress log one JSON object per line (request id, replica group, finish reason, tokens)")
    serve.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    serve.add_argument("--log-prompts", action="store_true", default=None,
                       help="also log prompts and completions (user data: off by default)")
    add_engine_args(serve, overrides_only=True, title="engine (generated from EngineConfig; they override the "
                                                       "config file's engine section)")
    add_vllm_compatibility_flags(serve)
    serve.set_defaults(handler=cmd_serve)

    ask = sub.add_parser("ask", help="stream an answer from a running cluster over gRPC")
    ask.add_argument("prompt")
    ask.add_argument("--address", "--target", dest="address", default=DEFAULT_ADDRESS,
                     help=f"gRPC address HOST:PORT (default {DEFAULT_ADDRESS})")
    mode = ask.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="send the prompt as a user chat message (default)")
    mode.add_argument("--text", dest="chat", action="store_false", help="send the prompt as plain text")
    ask.add_argument("--max-tokens", type=_max_tokens, default=256, help="at least 1 (the proto's uint32)")
    ask.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature (default 0: greedy, the same answer every time)")
    ask.add_argument("--application", default=None, help="Serve application name (needed with several)")
    ask.add_argument("--timeout", type=float, default=120.0, help="seconds before the call is abandoned")
    ask.add_argument("--api-key", default=None, metavar="KEY",
                     help="sent as `authorization: Bearer KEY` metadata (default: the first key of $SHARDLINE_API_KEY)")
    ask.set_defaults(handler=cmd_ask)


# `serve` flags that are ClusterConfig fields of the same name (engine flags are handled apart).
_CLUSTER_FLAGS = ("replicas", "grpc_port", "http_port", "host", "served_model_names", "api_keys",
                  "generation_config", "chat_template", "enable_auto_tool_choice", "tool_call_parser",
                  "ssl_certfile", "ssl_keyfile", "grpc_ssl_certfile", "grpc_ssl_keyfile", "tenant_isolation", "direct_ingress",
                  "max_request_body_bytes", "max_grpc_message_bytes", "log_json", "log_level", "log_prompts")


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """The ClusterConfig of `shardline serve`: the file (if any), then the flags on top. Engine
    flags go to the engine section, except model and tensor_parallel_size (top-level fields)."""
    from shardline.cluster.config import ClusterConfig

    top = {k: getattr(args, k) for k in _CLUSTER_FLAGS if getattr(args, k) is not None}
    engine = engine_overrides(args)
    if args.model_tag is not None:
        if engine.get("model", args.model_tag) != args.model_tag:
            raise ConfigError(f"model: given twice, as {args.model_tag!r} and --model {engine['model']!r}")
        engine["model"] = args.model_tag
    for key in ("model", "tensor_parallel_size"):
        if key in engine:
            top[key] = engine.pop(key)
    if args.replicas is not None:
        top["autoscaling"] = None  # an explicit replica count wins over the file's autoscaling
    data = ClusterConfig.read_file(args.config) if args.config else {}
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
    # address="local": always a new local cluster (ray.init alone would join any Ray running here)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)

    def on_signal(*_: Any) -> None:
        (give_up if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM exit
        signal.signal(sig, on_signal)
    try:
        serve.start(**serve_start_options(config))
        serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
        _wait_ready(config, stop)
        if not stop.is_set():
            host = config.host if config.host not in ("0.0.0.0", "::") else "localhost"
            scheme = "https" if config.ssl_certfile else "http"
            print(f"shardline: serving {config.model_name}\n"
                  f"  gRPC    {host}:{config.grpc_port}{' (TLS)' if config.grpc_ssl_certfile else ''}   "
                  "(shardline.v1.Generation; try: shardline ask "
                  f"--address {host}:{config.grpc_port} \"What is the capital of France?\")\n"
                  f"  HTTP    {scheme}://{host}:{config.http_port}/v1   (OpenAI-compatible)\n"
                  f"  metrics {scheme}://{host}:{config.http_port}/metrics\n"
                  f"{direct_ingress_banner(config, host)}"
                  "Ctrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            pass
        timeout_s = config.graceful_shutdown_timeout_s
        print(f"shardline: draining (new requests refused; up to {timeout_s:.0f} s for those in flight; "
              "Ctrl-C again to stop now)", file=sys.stderr, flush=True)
        try:
            report = drain_application(config.app_name, timeout_s, give_up=give_up)
            print(f"shardline: drained: {report.in_flight_at_start} request(s) were in flight on "
                  f"{report.ingress_replicas} ingress replica(s), {report.in_flight_at_end} left after "
                  f"{report.waited_s:.1f} s (proxies drained: {report.proxies_drained}); shutting down",
                  file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - the application never came up: nothing to drain
            print(f"shardline: nothing to drain ({type(e).__name__}: {e}); shutting down", file=sys.stderr, flush=True)
        serve.shutdown()  # proxies, then replicas (each drains within graceful_shutdown_timeout_s)
    finally:
        ray.shutdown()
    return 0


def direct_ingress_banner(config: ClusterConfig, host: str) -> str:
    """The Ingress's own addresses under direct ingress (cluster/direct_ingress.py), else ''."""
    if not config.direct_ingress:
        return ""
    from shardline.cluster.direct_ingress import direct_ingress_ports

    grpc_port, http_port = direct_ingress_ports(config.app_name)
    return (f"  direct  gRPC {host}:{grpc_port}, HTTP http://{host}:{http_port}/v1   (the Ingress's own ports, "
            "no proxy hop; gRPC on every interface whatever --host says)\n")


def _wait_ready(config: ClusterConfig, stop: threading.Event, timeout_s: float = 900.0) -> None:
    """Until the application can serve: gRPC Health answers SERVING through the proxy, on the host it
    binds. With gRPC TLS the CLI cannot know which root the certificate chains to (nor a name it
    matches on this host), so it waits for Serve to report the application RUNNING instead."""
    import grpc
    from ray import serve

    from shardline.proto import generation_pb2 as pb, generation_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    address = f"[{host}]:{config.grpc_port}" if ":" in host else f"{host}:{config.grpc_port}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while not stop.is_set():
            try:
                if config.grpc_ssl_certfile:
                    app = serve.status().applications.get(config.app_name)
                    if app is not None and app.status == "RUNNING":
                        return
                elif stub.Health(pb.HealthRequest(), timeout=15).status == pb.HealthResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the application did not become ready within {timeout_s:.0f} s")
            stop.wait(1.0)


def _max_tokens(text: str) -> int:
    """--max-tokens: an int of at least 1 (a negative one cannot be encoded in the request's uint32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 1 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be at least 1 (and below 2^32), got {value}")
    return value


def ask_metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The gRPC metadata of `shardline ask`: its deadline, the Serve application when named, and
    `authorization: Bearer KEY` when a key is given (--api-key, else $SHARDLINE_API_KEY's first)."""
    metadata = [("timeout-ms", str(int(args.timeout * 1000)))]  # the ingress enforces it too
    if args.application:
        metadata.append(("application", args.application))
    api_key = args.api_key or os.environ.get(API_KEY_ENV, "").split(",")[0].strip()
    if api_key:
        metadata.append(("authorization", f"Bearer {api_key}"))
    return metadata


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
    metadata = ask_metadata(args)
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
