"""Two fixes to Ray Serve 2.60's gRPC proxy, installed inside the proxy's own process by the
servicer function the proxy calls at start-up (`add_generation_servicer`, listed in
grpc_servicer_functions instead of the generated one, which it then calls).

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

Both patch private names of Ray 2.60 (`ray.serve._private`); on another Ray version nothing is
patched and a warning says so (tests/test_hardening.py fails then, as it should).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

log = logging.getLogger(__name__)

PATCHED_RAY = "2.60."
_MARK = "_shardline_patched"


def add_generation_servicer(servicer: Any, server: Any) -> None:
    """What grpc_servicer_functions names for shardline.v1.Generation: patch the proxy, then
    register the service exactly as the generated `add_GenerationServicer_to_server` does."""
    from shardline.proto.generation_pb2_grpc import add_GenerationServicer_to_server

    install_proxy_fixes()
    add_GenerationServicer_to_server(servicer, server)


def install_proxy_fixes() -> bool:
    """Patch this process's Serve proxy classes (idempotent); False when Ray is not 2.60.x."""
    import ray
    from ray.serve._private import grpc_util, proxy, proxy_response_generator

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
