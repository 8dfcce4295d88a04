"""Fixes to Ray Serve 2.60's gRPC proxy, installed inside the proxy's own process, and the two
settings its gRPCOptions lack (the interface it binds and TLS).

How they get into the proxy's process: the servicer function the proxy calls at start-up
(`add_generation_servicer`, listed in grpc_servicer_functions instead of the generated one,
which it then calls) installs fixes 1-3; that is the only hook a Serve config (deploy/, KubeRay)
has. `shardline serve` also passes `ProxyGrpcOptions`, a gRPCOptions subclass, to serve.start:
the proxy unpickles it before it builds its server, and unpickling installs every fix, 4
included (the servicer function runs after the server has bound its port: too late for 4).

1. A client's cancel must reach the engine. The proxy cancels the ingress's response only when
   the cancel arrives while it awaits the next message (`ProxyResponseGenerator.__anext__`). When
   it arrives while the proxy writes a message to the client, grpc.aio cancels the handler
   outside that await, the proxy's generators are finalised without ever calling `cancel()`, and
   the ingress and the engine go on to max_tokens: 7 of 15 cancels were lost here, 17 of 45 in
   the issue. The fix: each response is tied to the proxy task that created (and consumes) it;
   when that task ends (a cancelled RPC ends it) and the response is unfinished, it is
   cancelled, whatever path ended the task. (Waiting for the abandoned generator's collection is
   not enough: the proxy raises the garbage collector's thresholds, and the exception cycle keeps
   the frame alive for seconds or more.)
2. A call whose ingress replica died is UNAVAILABLE (retryable), not INTERNAL: the proxy maps the
   RayActorError of a dead ingress to INTERNAL.
3. Malformed protobuf bytes are INVALID_ARGUMENT naming the request, not UNKNOWN: the proxy keeps
   the generated request deserializer, whose DecodeError grpc.aio turns into UNKNOWN ("Unexpected
   error") before any handler runs. The fix wraps the deserializer (a malformed message becomes a
   `MalformedMessage`) and the unary and server-streaming handlers (which abort with
   INVALID_ARGUMENT on one) of every service registered after it (ours and grpc.health.v1).
4. The gRPC server binds `ProxyGrpcOptions.host` (Ray 2.60 hard-codes `[::]`, every interface,
   whatever `--host` says) and, with `ssl_certfile`/`ssl_keyfile`, serves TLS (`add_secure_port`;
   Ray 2.60 has no TLS option): `default_impl.add_grpc_address` is patched to read the options of
   the `start_grpc_server` call it runs in.

All patch private names of Ray 2.60 (`ray.serve._private`); on another Ray version nothing is
patched and a warning says so (tests/test_hardening.py fails then, as it should).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from ray.serve.config import gRPCOptions

log = logging.getLogger(__name__)

PATCHED_RAY = "2.60."
_MARK = "_shardline_patched"


def add_generation_servicer(servicer: Any, server: Any) -> None:
    """What grpc_servicer_functions names for shardline.v1.Generation: patch the proxy, then
    register the service exactly as the generated `add_GenerationServicer_to_server` does."""
    from shardline.proto.generation_pb2_grpc import add_GenerationServicer_to_server

    install_proxy_fixes()
    add_GenerationServicer_to_server(servicer, server)


class ProxyGrpcOptions(gRPCOptions):
    """Serve's gRPCOptions plus what Ray 2.60's proxy lacks: the interface to bind (`host`, as the
    HTTP proxy's `--host`) and TLS (PEM `ssl_certfile` with its `ssl_keyfile`, read by the proxy on
    its node). Unpickling it, which the proxy does before it starts its server, installs the fixes
    of this module in that process."""

    host: str = "::"  # Ray's own choice: every interface
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __setstate__(self, state: Any) -> None:
        install_proxy_fixes()
        super().__setstate__(state)


@dataclass(frozen=True)
class MalformedMessage:
    """What the wrapped request deserializer returns for bytes that do not parse (fix 3)."""

    message_type: str
    error: str

    @property
    def details(self) -> str:
        return f"request: the message is not a valid {self.message_type} ({self.error[:200]})"


def install_proxy_fixes() -> bool:
    """Patch this process's Serve proxy classes (idempotent); False when Ray is not 2.60.x."""
    import ray
    from ray.serve._private import default_impl, grpc_util, proxy, proxy_response_generator

    generator_cls = proxy_response_generator.ProxyResponseGenerator
    if getattr(generator_cls, _MARK, False):
        return True
    if not ray.__version__.startswith(PATCHED_RAY) or "__del__" in vars(generator_cls):
        log.warning("Ray %s: the gRPC proxy fixes are for Ray %sx and are not installed; a client's cancel "
                    "may not reach the engine (send a deadline)", ray.__version__, PATCHED_RAY)
        return False
    # setattr: patching Ray's class (mypy forbids assigning to a method)
    setattr(generator_cls, "__init__", _tied_to_its_task(generator_cls.__init__))
    setattr(generator_cls, "__del__", _cancel_if_abandoned)
    proxy.get_grpc_response_status = _status_with_dead_ingress_unavailable(grpc_util.get_grpc_response_status)
    server_cls = grpc_util.gRPCGenericServer
    setattr(server_cls, "_override_method_handler", _refusing_malformed_messages(server_cls._override_method_handler))
    setattr(proxy, "start_grpc_server", start_grpc_server)
    setattr(default_impl, "add_grpc_address", add_grpc_address)
    setattr(generator_cls, _MARK, True)
    return True


def _quiet_cancel(response: Any) -> None:
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - already cancelled, failed assignment: nothing runs
        pass


def _cancel_if_abandoned(self: Any) -> None:
    """ProxyResponseGenerator.__del__: cancel the response unless it finished or was cancelled."""
    response = getattr(self, "_response", None)
    if response is None or getattr(self, "_done", True) or response.cancelled():
        return
    assignment = getattr(response, "_replica_result_future", None)
    if assignment is not None and not assignment.done():
        # cancel() would wait for the assignment on this (the proxy's) loop: do it once assigned
        assignment.add_done_callback(lambda _: _quiet_cancel(response))
        return
    _quiet_cancel(response)


def _tied_to_its_task(original_init: Any) -> Any:
    """ProxyResponseGenerator.__init__, then: when the current task ends, cancel the response if
    it is still unfinished (a finished stream or unary call is `_done`, and nothing happens)."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        if task is None:
            return
        ref = weakref.ref(self)

        def on_task_done(_: Any) -> None:
            generator = ref()
            if generator is not None:
                _cancel_if_abandoned(generator)

        task.add_done_callback(on_task_done)

    return __init__


def _status_with_dead_ingress_unavailable(original: Any) -> Any:
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    import grpc
    from ray.serve._private.proxy_request_response import ResponseStatus

    def get_grpc_response_status(exc: BaseException, request_timeout_s: Any, request_id: str) -> Any:
        if isinstance(exc, (ActorDiedError, ActorUnavailableError)):
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True,
                                  message="the ingress serving this call stopped; retry the call")
        return original(exc, request_timeout_s, request_id)

    return get_grpc_response_status


# ---- fix 3: malformed protobuf is INVALID_ARGUMENT ------------------------------------------------------


def _tolerant(deserialize: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or any parse failure of these bytes
            return MalformedMessage(message_type, f"{type(e).__name__}: {e}")

    return parse


def _refusing_malformed_messages(original: Any) -> Any:
    """gRPCGenericServer._override_method_handler, then fix 3 on its unary and server-streaming
    handlers (client-streaming methods are left as they are: shardline has none)."""
    import grpc

    def _override_method_handler(self: Any, service_method: str, method_handler: Any) -> Any:
        handler = original(self, service_method, method_handler)
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        message_type = service_method.rsplit("/", 1)[-1] + " request"
        serving_unary, serving_stream = handler.unary_unary, handler.unary_stream

        async def unary_unary(request: Any, context: Any) -> Any:
            if isinstance(request, MalformedMessage):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            return await serving_unary(request, context)

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, MalformedMessage):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            async for message in serving_stream(request, context):
                yield message

        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer, message_type),
                                unary_unary=unary_unary, unary_stream=unary_stream)

    return _override_method_handler


# ---- fix 4: the interface and TLS of the gRPC server --------------------------------------------------

_LISTEN: contextvars.ContextVar[ProxyGrpcOptions | None] = contextvars.ContextVar("shardline_grpc_listen",
                                                                                  default=None)


def listen_address(host: str, port: int) -> str:
    """A gRPC server address: `host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start_grpc_server(service_handler_factory: Any, grpc_options: Any, **kwargs: Any) -> Any:
    """proxy.start_grpc_server once fix 4 is installed: Ray's own (grpc_util's), with ProxyGrpcOptions
    visible to add_grpc_address below (same task). NOTE: module-level functions, not closures: the
    Serve controller (which unpickles the options too) pickles the ProxyActor class by value, and
    this function with it, by reference only when it is importable."""
    from ray.serve._private import grpc_util

    token = _LISTEN.set(grpc_options if isinstance(grpc_options, ProxyGrpcOptions) else None)
    try:
        return await grpc_util.start_grpc_server(service_handler_factory, grpc_options, **kwargs)
    finally:
        _LISTEN.reset(token)


def add_grpc_address(server: Any, server_address: str) -> None:
    """default_impl.add_grpc_address once fix 4 is installed: with ProxyGrpcOptions, bind its host
    (TLS with its files) instead of Ray's `[::]`; otherwise Ray's own plaintext port."""
    import grpc

    options = _LISTEN.get()
    if options is None:
        server.add_insecure_port(server_address)  # what Ray 2.60's add_grpc_address does
        return
    port = int(server_address.rsplit(":", 1)[1])
    address = listen_address(options.host, port)
    if options.ssl_certfile and options.ssl_keyfile:
        credentials = grpc.ssl_server_credentials(
            [(Path(options.ssl_keyfile).read_bytes(), Path(options.ssl_certfile).read_bytes())])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    log.info("gRPC proxy listening on %s%s", address, " (TLS)" if options.ssl_certfile else "")
    if not bound:
        raise RuntimeError(f"the gRPC proxy could not bind {address}")
