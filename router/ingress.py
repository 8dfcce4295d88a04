"""The Ingress deployment: the gRPC service `shardline.v1.Generation` (through Ray Serve's gRPC
proxy) and the OpenAI-compatible HTTP API (FastAPI) on one class.

For every request it validates with the engine's own validator and limits, tokenizes (chat
template included), bounds how many requests it holds at once (overload answers
RESOURCE_EXHAUSTED / 429 at once), and streams from a ReplicaGroup chosen by the KV-aware router.
A request ends early (and its engine request is aborted, freeing its KV blocks) when the client
cancels or disconnects, or when its deadline passes: the ingress enforces the deadline itself
because Serve's proxy does not always propagate a cancel (docs/ray-serve-notes.md).

Errors map one way everywhere: RequestError codes -> gRPC status / HTTP status (openai_api.py).
"""

# NOTE: no `from __future__ import annotations`: FastAPI must resolve `Request` on routes that
# serve.ingress pickles by value, where string annotations would not resolve.
import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from shardline.cluster.config import ClusterConfig
from shardline.logging import configure_logging
from shardline.metrics import RouterMetrics, merge_expositions
from shardline.proto import generation_pb2 as pb
from shardline.router import openai_api
from shardline.router.health import HubClient, Readiness
from shardline.router.limits import RequestLimitsMiddleware, check_prompt_chars, request_label
from shardline.router.offload import TokenizerPool
from shardline.router.replica_stream import cancel_replica_stream
from shardline.router.routing_hint import RoutingHint
from shardline.router.tenancy import cache_salt_for
from shardline.worker.engine.params import RequestError, SamplingParams
from shardline.worker.engine.validation import Limits, validate_request
from shardline.worker.tokenizer import encode_prompt, load_tokenizer

log = logging.getLogger(__name__)

GRPC_STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "cancelled": grpc.StatusCode.CANCELLED,
    "internal": grpc.StatusCode.INTERNAL,
}
FINISH_ENUM = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
               "stop_string": pb.FINISH_REASON_STOP_STRING, "abort": pb.FINISH_REASON_ABORT,
               "error": pb.FINISH_REASON_ERROR}
# Metadata keys a gRPC client can use to tell the ingress its deadline (the proxy's context does
# not expose the call's own deadline to the deployment).
DEADLINE_KEYS = ("grpc-timeout", "timeout-ms", "x-shardline-timeout-ms")
_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

web = FastAPI(title="shardline", description="OpenAI-compatible API of a shardline cluster")
web.add_middleware(RequestLimitsMiddleware)  # hardening: 413 / 431 before a body is read (router/limits.py)


def deadline_from_metadata(metadata: list[tuple[str, Any]] | None) -> float | None:
    """Seconds the client allows, from a `grpc-timeout` ("250m", "5S") or `timeout-ms` header."""
    for key, value in metadata or []:
        value = value.decode() if isinstance(value, bytes) else str(value)
        try:
            seconds = None
            if key == "grpc-timeout" and value and value[-1] in _GRPC_TIMEOUT_UNITS:
                seconds = float(value[:-1]) * _GRPC_TIMEOUT_UNITS[value[-1]]
            if key in ("timeout-ms", "x-shardline-timeout-ms"):
                seconds = float(value) / 1000.0
            if seconds is not None:
                if not math.isfinite(seconds) or seconds <= 0:  # hardening: nan, inf, 0, negative
                    raise ValueError
                return seconds
        except ValueError:
            raise RequestError(key, f"not a valid timeout: {value[:32]!r} (a positive, finite number)") from None
    return None


def sampling_from_proto(msg: pb.SamplingParams) -> dict[str, Any]:
    """The set fields of a proto SamplingParams as a SamplingParams dict (same field names)."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            values = list(getattr(msg, fd.name))
            if values:
                out[fd.name] = values
        elif msg.HasField(fd.name):
            out[fd.name] = getattr(msg, fd.name)
    return out


def chat_from_proto(chat: pb.Chat) -> dict[str, Any]:
    return {"messages": [{"role": m.role, "content": m.content} for m in chat.messages]}


class GrpcStatusAbort(RuntimeError):
    """Ends a streaming gRPC method whose status code is already set on its context."""


class _Admission:
    """Counts requests in flight at this ingress and refuses one over the bound at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.closed: str | None = None  # hardening: set by Ingress.drain, every new request is refused

    def __enter__(self) -> "_Admission":
        if self.closed is not None:
            raise RequestError("", self.closed, code="unavailable")
        if self.in_flight >= self.limit:
            raise RequestError("", f"the server is at its limit of {self.limit} requests in flight; retry later",
                               code="resource_exhausted")
        self.in_flight += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self.in_flight -= 1


def _strip_field(err: dict[str, Any]) -> str:
    """The message of an error item without its "field: " prefix (RequestError adds it back)."""
    message, field = err.get("message", ""), err.get("field", "")
    return message[len(field) + 2:] if field and message.startswith(field + ": ") else message


def _set_status(grpc_context, error: RequestError) -> None:
    if grpc_context is None:
        return
    grpc_context.set_code(GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL))
    grpc_context.set_details(str(error))


def _stream_owner():
    """This ingress replica as a StreamOwner, or None (outside a named Ray actor, or when the
    name does not resolve: then nothing is watched rather than everything aborted)."""
    import ray

    from shardline.cluster.replica_group import StreamOwner

    try:
        from ray.serve._private.constants import SERVE_NAMESPACE
    except ImportError:
        SERVE_NAMESPACE = "serve"  # noqa: N806 - Serve's documented namespace
    try:
        name = ray.get_runtime_context().get_actor_name()
        # NOTE: Serve's replicas live in Serve's namespace; the runtime context's namespace is the job's.
        owner = StreamOwner(SERVE_NAMESPACE, name) if name else None
        if owner is not None and not owner.alive():
            log.warning("this ingress (%s) cannot find itself by name; replicas will not watch it", name)
            return None
        return owner
    except Exception:  # noqa: BLE001 - not in a Ray actor
        return None


def _to_proto(rid: str, item: dict[str, Any]) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=rid, token_ids=item.get("token_ids", []), text=item.get("text", ""))
    for token_id, logprob, top in item.get("logprobs") or []:
        msg.logprobs.append(pb.TokenLogprob(token_id=token_id, logprob=logprob,
                                            top=[pb.TopLogprob(token_id=k, logprob=v) for k, v in top.items()]))
    reason = item.get("finish_reason")
    if reason:
        msg.finish_reason = FINISH_ENUM.get(reason, pb.FINISH_REASON_ERROR)
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=item.get("prompt_tokens", 0),
                                    completion_tokens=item.get("completion_tokens", 0),
                                    cached_prompt_tokens=item.get("cached_tokens", 0)))
    return msg


# NOTE: last in the file: serve.ingress pickles the routes when the class is decorated, so every
# module-level helper the methods use must already exist.
@serve.ingress(web)
class Ingress:
    """Front door of the cluster: gRPC methods (Generate, Tokenize, GetModelInfo, Health, and
    grpc.health.v1 Check) and OpenAI HTTP routes, both on the same validation and streaming path."""

    def __init__(self, replica_group, config: ClusterConfig) -> None:
        from shardline.router.request_router import register_decision_sink  # the real module, see there
        from shardline.worker.config import ModelConfig
        from shardline.worker.loader.source import resolve_model

        self.config = config
        configure_logging(config.log_json, config.log_level, config.log_prompts,
                          static_fields={"replica_group": "ingress", "model_name": config.model_name})
        self.replicas = replica_group
        self.model_name = config.model_name
        source = resolve_model(config.model, weights_required=config.engine_config().load_format != "dummy")
        self.model_config = ModelConfig.from_hf_config(source.hf_config())
        self.tokenizer = load_tokenizer(source, config.engine_config().special_tokens_in_content)
        self.metrics = RouterMetrics(self.model_name)
        register_decision_sink(self.metrics.on_decision)
        self.admission = _Admission(config.max_in_flight)
        self.hub = HubClient(config.app_name, config.snapshot_ttl_s)  # hardening: re-resolved when it dies
        self.readiness = Readiness(replica_group, self.hub)
        self.tokenizer_pool = TokenizerPool(config.tokenizer_threads)  # hardening: tokenize off the event loop
        self.owner = _stream_owner()  # hardening: replicas abort this ingress's requests if it dies
        self._info: dict[str, Any] | None = None
        self._info_lock = asyncio.Lock()

    # ---- shared path ------------------------------------------------------------------------------

    async def model_info(self) -> dict[str, Any]:
        """Model and limits as a replica reports them (fetched once: every replica runs the same config)."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    try:
                        self._info = await self.replicas.model_info.remote()
                    except Exception as e:  # noqa: BLE001 - no replica up yet
                        raise RequestError("", f"no replica group is ready: {e}", code="unavailable") from None
        return self._info

    def encode(self, prompt: Any, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of a text prompt, chat messages ({"messages": [...]}), or a token-id list."""
        return encode_prompt(self.tokenizer, prompt, add_special_tokens)

    async def prepare(self, prompt: Any, sampling: dict[str, Any]) -> list[int]:
        """Tokenize and validate exactly as the engine will (same validator, same limits)."""
        info = await self.model_info()
        check_prompt_chars(prompt, self.config.prompt_chars_limit(info["max_model_len"]))  # hardening: before tokenizing
        token_ids = await self.tokenizer_pool.run(self.encode, prompt)  # hardening: off the event loop
        if not isinstance(sampling, dict):
            raise RequestError("sampling", "must be an object")
        try:
            params = SamplingParams.from_dict(sampling)
        except TypeError as e:
            raise RequestError("sampling", str(e)) from None
        validate_request(token_ids, params, Limits(**info["limits"]))
        return token_ids

    async def stream(self, token_ids: list[int], sampling: dict[str, Any], request_id: str, priority: int,
                     cache_salt: str | None, timeout_s: float | None,
                     tenant: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Admit, route and stream one request's items; raises RequestError for errors (codes
        resource_exhausted, unavailable, deadline_exceeded, ...). Leaving early cancels the replica's
        stream, which aborts the engine request."""
        from ray.serve.exceptions import BackPressureError

        caps = [t for t in (timeout_s, self.config.request_timeout_s) if t is not None]
        deadline = time.monotonic() + min(caps) if caps else None
        with self.admission:
            cache_salt = cache_salt_for(self.config.tenant_isolation, tenant, cache_salt)  # hardening: router/tenancy.py
            args = [token_ids, sampling, request_id, priority, cache_salt]
            if self.config.router_needs_text:  # positional: Ray's text router only scans args
                args.append(self.routing_hint(token_ids))
            response = self.replicas.options(stream=True).generate.remote(*args, owner=self.owner)
            finished = False
            try:
                while True:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise asyncio.TimeoutError
                    try:
                        item = await asyncio.wait_for(response.__anext__(), remaining)
                    except StopAsyncIteration:
                        finished = True
                        return
                    if "error" in item:  # a rejection, or the engine failing mid-stream (finish_reason "error")
                        finished = True
                        err = item["error"]
                        error = RequestError(err.get("field", ""), _strip_field(err), code=err.get("code", "internal"))
                        error.counted = True  # the engine counted its own rejection already
                        raise error
                    if "finish_reason" in item:
                        finished = True
                    yield item
                    if finished:
                        return
            except asyncio.TimeoutError:
                raise RequestError("", f"the request's deadline ({min(caps):.3g} s) passed",
                                   code="deadline_exceeded") from None
            except BackPressureError as e:
                raise RequestError("", f"all replica groups are at capacity; retry later ({e})",
                                   code="resource_exhausted") from None
            except RequestError:
                raise
            except Exception as e:  # noqa: BLE001 - a replica died mid-stream, no replica, ...
                log.warning("stream %s failed: %s", request_id, e)
                raise RequestError("", f"the replica group serving the request failed: {type(e).__name__}",
                                   code="unavailable") from None
            finally:
                if not finished:
                    cancel_replica_stream(response)  # hardening: never blocks the loop nor raises

    def routing_hint(self, token_ids: list[int]) -> RoutingHint:
        """The prompt as text for a text-prefix router: decoded from the token ids, so text, chat
        (template applied) and token-id input all give the text the engine will see."""
        if self.tokenizer is None:
            return RoutingHint(" ".join(map(str, token_ids)))
        return RoutingHint(self.tokenizer.decode(token_ids, skip_special_tokens=False))

    def reject(self, error: RequestError, started: bool = False) -> None:
        """Count a request refused before it ran (not a failure mid-stream, not one the engine counted)."""
        if not started and not getattr(error, "counted", False):
            self.metrics.on_reject(error.code)
        # hardening: one INFO line, the message bounded (RequestError), no traceback
        log.info("request refused: %s", error, extra={"code": error.code, "field": error.field[:64]})

    # ---- drain (cluster/drain.py; hardening) ----------------------------------------------------------

    async def drain(self) -> int:
        """Stop admitting: new requests get UNAVAILABLE / 503 and readiness fails; requests in flight
        go on. Returns how many are in flight."""
        self.readiness.draining = True
        self.admission.closed = "the server is draining (shutting down); retry on another instance"
        return self.admission.in_flight

    async def in_flight(self) -> int:
        """Requests this ingress holds now (admitted and not yet finished)."""
        return self.admission.in_flight

    # ---- gRPC: shardline.v1.Generation ---------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        """Server-streaming generation; errors become the call's status with the field named."""
        rid = f"gen-{uuid.uuid4().hex[:16]}"  # hardening: the engine always gets the server's own id
        reply_id = rid
        started = False
        try:
            reply_id = request_label(request.request_id, self.config.max_request_id_chars) or rid
            kind = request.WhichOneof("input")
            if kind is None:
                raise RequestError("input", "set one of text, chat or token_ids")
            prompt = {"text": lambda: request.text, "chat": lambda: chat_from_proto(request.chat),
                      "token_ids": lambda: list(request.token_ids.ids)}[kind]()
            sampling = sampling_from_proto(request.sampling)
            timeout_s = deadline_from_metadata(grpc_context.invocation_metadata() if grpc_context else None)
            token_ids = await self.prepare(prompt, sampling)
            items = self.stream(token_ids, sampling, rid, request.priority, request.cache_salt or None, timeout_s)
            async with contextlib.aclosing(items):  # a cancel at our yield still cancels the replica's stream
                async for item in items:
                    started = True
                    yield _to_proto(reply_id, item)
        except RequestError as e:
            self.reject(e, started)
            _set_status(grpc_context, e)
            # NOTE: a streaming method's status only reaches the client when the method raises
            # after setting it (the replica wraps the error in gRPCStatusError with that code),
            # and the raised error must unpickle in the proxy (RequestError's signature does not).
            raise GrpcStatusAbort(str(e)) from None

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        """Token ids of a text or chat prompt, exactly as Generate would compute them."""
        try:
            kind = request.WhichOneof("input")
            if kind is None:
                raise RequestError("input", "set one of text or chat")
            prompt = chat_from_proto(request.chat) if kind == "chat" else request.text
            check_prompt_chars(prompt, self.config.prompt_chars_limit(self.model_config.max_position_embeddings))
            add = request.add_special_tokens if kind == "text" and request.HasField("add_special_tokens") else None
            ids = await self.tokenizer_pool.run(self.encode, prompt, add)  # hardening: off the event loop
            return pb.TokenizeResponse(token_ids=ids, count=len(ids))
        except RequestError as e:
            _set_status(grpc_context, e)
            return pb.TokenizeResponse()

    async def GetModelInfo(self, request: pb.ModelInfoRequest, grpc_context=None) -> pb.ModelInfo:
        """The model, limits, tensor parallelism and each live replica group's load."""
        try:
            info = await self.model_info()
        except RequestError as e:
            _set_status(grpc_context, e)
            return pb.ModelInfo()
        snapshots = await self._snapshots()
        replicas = [pb.ReplicaStats(
            replica_id=s.replica_id, free_blocks=s.stats.get("free_blocks", 0), num_blocks=s.stats.get("num_blocks", 0),
            running=s.stats.get("num_running", 0), waiting=s.stats.get("num_waiting", 0),
            prefix_cache_hit_tokens=s.stats.get("prefix_cache_hits", 0),
            prefix_cache_query_tokens=s.stats.get("prefix_cache_queries", 0)) for s in snapshots]
        return pb.ModelInfo(model=self.model_name, max_model_len=info["max_model_len"], vocab_size=info["vocab_size"],
                            tensor_parallel_size=info["tensor_parallel_size"], replica_groups=len(replicas),
                            block_size=info["block_size"], replicas=replicas)

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        """SERVING once a replica group answered and reports itself alive."""
        serving, detail = await self._ready()
        status = pb.HealthResponse.SERVING if serving else pb.HealthResponse.NOT_SERVING
        return pb.HealthResponse(status=status, detail=detail)

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1.Health/Check (Kubernetes gRPC probes) with the same readiness as Health."""
        from grpc_health.v1 import health_pb2

        serving, _ = await self._ready()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def _snapshots(self):
        return await self.hub.snapshots() or []  # [] while the hub is unreachable

    async def _ready(self) -> tuple[bool, str]:
        """Readiness (router/health.py): not draining and a replica group live."""
        return await self.readiness.check()

    # ---- HTTP: OpenAI-compatible -----------------------------------------------------------------------

    @web.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._openai(request, chat=False)

    @web.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, chat=True)

    @web.get("/v1/models")
    async def models(self) -> Response:
        try:
            info = await self.model_info()
        except RequestError:
            info = {}
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "shardline",
            "max_model_len": info.get("max_model_len")}]})

    @web.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        snapshots = await self._snapshots()
        text = merge_expositions([self.metrics.exposition()] + [s.exposition for s in snapshots])
        return PlainTextResponse(text.decode(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @web.get("/health")
    @web.get("/health/ready")
    async def health(self) -> Response:
        """Readiness: 200 when this ingress can serve a request now, else 503 (draining, no replica)."""
        serving, detail = await self._ready()
        return JSONResponse({"status": "ok" if serving else "unavailable", "detail": detail},
                            status_code=200 if serving else 503)

    @web.get("/health/live")
    async def liveness(self) -> Response:
        """Liveness: the ingress process and its event loop answer (replicas and the hub may not)."""
        return JSONResponse({"status": "ok"})

    async def _openai(self, request: Request, chat: bool) -> Response:
        try:
            try:
                body = await request.json()
            except (ValueError, RecursionError):  # hardening: nesting past Python's recursion limit too
                raise RequestError("body", "not valid JSON (or nested too deeply)") from None
            try:
                req = openai_api.parse_chat(body) if chat else openai_api.parse_completion(body)
            except RequestError:
                raise
            except (TypeError, ValueError, AttributeError, RecursionError) as e:  # hardening: 400, never 500
                raise RequestError("body", f"malformed request ({type(e).__name__})") from None
            model = body.get("model")
            if model not in (None, self.model_name, self.config.model):
                raise RequestError("model", f"the model {model!r} does not exist; this server serves "
                                   f"{self.model_name!r}", code="not_found")
            request_label(req.request_id, self.config.max_request_id_chars)  # hardening: validated, never the engine's id
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            token_ids = await self.prepare(req.prompt, req.sampling)
            items = self.stream(token_ids, req.sampling, rid, req.priority, req.cache_salt, None)
            first = await items.__anext__()  # errors before any byte is sent become a proper status
        except RequestError as e:
            self.reject(e)
            status, payload = openai_api.error_body(e.code, str(e), e.field)
            return JSONResponse(payload, status_code=status)
        except StopAsyncIteration:
            status, payload = openai_api.error_body("internal", "the replica ended the stream without a result", None)
            return JSONResponse(payload, status_code=status)
        if not req.stream:
            collected = [first]
            try:
                if "finish_reason" not in first:
                    async for item in items:
                        collected.append(item)
            except RequestError as e:
                self.reject(e, started=True)
                status, payload = openai_api.error_body(e.code, str(e), e.field)
                return JSONResponse(payload, status_code=status)
            finally:
                await items.aclose()  # releases the admission slot now, not at garbage collection
            decode = self._decode_token
            return JSONResponse(openai_api.completion_response(rid, self.model_name, collected, decode, chat))
        return StreamingResponse(self._sse(rid, first, items, chat, req.include_usage), media_type="text/event-stream")

    async def _sse(self, rid: str, first: dict[str, Any], items: AsyncIterator[dict[str, Any]], chat: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks; a client that disconnects cancels this generator, which cancels the stream."""
        try:
            if chat:
                yield openai_api.stream_chunk(rid, self.model_name, None, chat, first=True)
            item = first
            while True:
                yield openai_api.stream_chunk(rid, self.model_name, item, chat)
                if "finish_reason" in item:
                    break
                item = await items.__anext__()
            if include_usage:
                yield openai_api.stream_chunk(rid, self.model_name, None, chat, usage=openai_api.usage_dict(item))
            yield openai_api.SSE_DONE
        except RequestError as e:
            self.reject(e, started=True)
            _, payload = openai_api.error_body(e.code, str(e), e.field)
            yield f"data: {json.dumps(payload)}\n\n"
        finally:
            await items.aclose()

    def _decode_token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
