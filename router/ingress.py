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
import hashlib
import hmac
import json
import logging
import math
import time
import uuid
from typing import Any, AsyncGenerator, AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from shardline.cluster.config import ClusterConfig
from shardline.logging import configure_logging
from shardline.metrics import RouterMetrics, merge_expositions
from shardline.proto import generation_pb2 as pb
from shardline.router import openai_api, openai_protocol, tool_calls, tool_parsers
from shardline.router.health import HubClient, Readiness
from shardline.router.limits import RequestLimitsMiddleware, check_prompt_chars, json_body, request_label
from shardline.router.offload import TokenizerPool
from shardline.router.replica_stream import cancel_replica_stream
from shardline.router.routing_hint import RoutingHint
from shardline.router.sampling_defaults import load_sampling_defaults
from shardline.router.streams import merge_streams
from shardline.router.tenancy import cache_salt_for
from shardline.worker.engine.generation import GenerationRequest, StreamItem
from shardline.worker.engine.outputs import TokenLogprob
from shardline.worker.engine.params import RequestError, SamplingParams, StructuredOutput
from shardline.worker.engine.validation import Limits
from shardline.worker.tokenizer import encode_prompt, load_tokenizer

log = logging.getLogger(__name__)

# A request whose replica group dies before its first item is sent again, at most this many times,
# after REPLICA_RETRY_DELAY_S x the attempt number (time for Serve to see the replica gone).
REPLICA_FAILURE_RETRIES = 2
REPLICA_RETRY_DELAY_S = 0.5

GRPC_STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "model_not_found": grpc.StatusCode.NOT_FOUND,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "cancelled": grpc.StatusCode.CANCELLED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
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


@web.exception_handler(StarletteHTTPException)
async def http_error_in_openai_shape(request: Request, exc: StarletteHTTPException) -> Response:
    """Unknown routes (404) and known routes called with another method (405) answer in OpenAI's
    error shape, not FastAPI's {"detail": ...}."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_argument")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    status, payload = openai_api.error_body(code, message, None)
    return JSONResponse(payload, status_code=exc.status_code, headers=getattr(exc, "headers", None))


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


def sampling_from_proto(msg: pb.SamplingParams, defaults: dict[str, Any], chat: bool) -> SamplingParams:
    """SamplingParams from the set fields of a proto SamplingParams (same field names) over the
    model's defaults; max_tokens unset: the rest of the context for chat input, 16 otherwise."""
    values: dict[str, Any] = dict(defaults)
    values["max_tokens"] = None if chat else 16
    values["structured_output"] = structured_output_from_proto(msg)
    for fd in msg.DESCRIPTOR.fields:
        if fd.containing_oneof is not None and fd.containing_oneof.name == "structured_output":
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            if fd.name == "logit_bias" and len(msg.logit_bias):
                values["logit_bias"] = {int(k): float(v) for k, v in msg.logit_bias.items()}
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED  # type: ignore[union-attr]  # protobuf < 5.28 has no is_repeated
        if repeated:
            items = list(getattr(msg, fd.name))
            if items:
                values[fd.name] = items
        elif msg.HasField(fd.name):
            values[fd.name] = getattr(msg, fd.name)
    return SamplingParams(**values)


def structured_output_from_proto(msg: pb.SamplingParams) -> StructuredOutput | None:
    """The `structured_output` oneof as a checked StructuredOutput (errors name sampling.<kind>)."""
    from shardline.worker.structured.grammar import checked_as

    kind = msg.WhichOneof("structured_output")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    if kind == "json_object":
        constraint = StructuredOutput("json_object")
    elif kind == "json_schema":
        constraint = StructuredOutput("json_schema", msg.json_schema.schema, strict=msg.json_schema.strict)
    elif kind == "choice":
        constraint = StructuredOutput("choice", tuple(msg.choice.choices))
    else:
        constraint = StructuredOutput(kind, getattr(msg, kind))
    return checked_as(constraint, f"sampling.{kind}")


def chat_from_proto(chat: pb.Chat) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content} for m in chat.messages]


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


def _token_logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=k, logprob=v) for k, v in lp.top.items()])


def _to_proto(rid: str, item: StreamItem) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=rid, token_ids=item.token_ids, text=item.text, index=item.index)
    msg.logprobs.extend(_token_logprob_to_proto(lp) for lp in item.logprobs or [])
    msg.prompt_logprobs.extend(_token_logprob_to_proto(lp) for lp in item.prompt_logprobs or [] if lp is not None)
    if item.finish_reason:
        msg.finish_reason = FINISH_ENUM.get(item.finish_reason, pb.FINISH_REASON_ERROR)
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=item.usage.prompt_tokens,
                                    completion_tokens=item.usage.completion_tokens,
                                    cached_prompt_tokens=item.usage.cached_tokens))
    return msg


def bearer_token(value: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header value (None when absent or malformed)."""
    if not value:
        return None
    scheme, _, key = value.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


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
        # generate's streams, over config.serve_transport (built once: options() copies the handle)
        self.generate_handle = replica_group.options(**config.stream_handle_options())
        self.model_name = config.model_name
        source = resolve_model(config.model, weights_required=config.engine_config().needs_weights)
        self.model_config = ModelConfig.from_hf_config(source.hf_config())
        self.tokenizer = load_tokenizer(source, chat_template=config.chat_template,
                                        special_tokens_in_content=config.engine_config().special_tokens_in_content)
        self.metrics = RouterMetrics(self.model_name)
        register_decision_sink(self.metrics.on_decision)
        self.admission = _Admission(config.max_in_flight)
        self.hub = HubClient(config.app_name, config.snapshot_ttl_s)  # hardening: re-resolved when it dies
        self.readiness = Readiness(replica_group, self.hub)
        self.tokenizer_pool = TokenizerPool(config.tokenizer_threads)  # hardening: tokenize off the event loop
        self.owner = _stream_owner()  # hardening: replicas abort this ingress's requests if it dies
        self._info: dict[str, Any] | None = None
        self._info_lock = asyncio.Lock()

        self.sampling_defaults = load_sampling_defaults(
            config.generation_config, source.path if source.kind == "safetensors" else None)
        self._api_keys = [key.encode() for key in config.api_keys]
        self._warned_fields: set[str] = set()
        template = getattr(self.tokenizer.hf, "chat_template", None) if self.tokenizer is not None else None
        parser_name = config.tool_call_parser or tool_parsers.parser_for_template(template if isinstance(template, str) else None)
        self.tool_parser = tool_parsers.make_parser(parser_name)  # reads tool_choice "auto" calls
        log.info("tool-call parser: %s%s", parser_name, "" if config.tool_call_parser else " (from the chat template)")

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

    def authorized(self, key: str | None) -> bool:
        """Whether `key` is one of config.api_keys (always, when none is configured). Constant-time
        comparison against every key, so timing says nothing about which one nearly matched."""
        if not self._api_keys:
            return True
        given = (key or "").encode()
        return any([hmac.compare_digest(given, k) for k in self._api_keys])

    @staticmethod
    def tenant_of(key: str | None) -> str | None:
        """The tenant identity of a caller whose key passed `authorized`, for cache isolation
        (router/tenancy.py): a digest of its API key (the key itself is never kept or logged),
        None when anonymous."""
        return hashlib.sha256(key.encode()).hexdigest()[:32] if key else None

    def check_model(self, model: str | None) -> None:
        """A request naming a model this server does not serve is 404 model_not_found."""
        if model is not None and model not in self.config.model_names:
            raise RequestError("model", f"the model {model!r} does not exist; this server serves "
                               f"{', '.join(map(repr, self.config.model_names))}", code="model_not_found")

    def warn_unknown(self, fields: list[str]) -> None:
        """Log each unknown request field once (they are ignored, as vLLM and SGLang do)."""
        new = [f for f in fields if f not in self._warned_fields]
        if new:
            self._warned_fields.update(new)
            log.warning("ignoring request fields this server does not use: %s", ", ".join(new))

    def encode(self, prompt: Any, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of a text prompt or a token-id list."""
        return encode_prompt(self.tokenizer, prompt, add_special_tokens)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of chat messages rendered with the chat template (control-token text in a
        content stays plain text: worker/tokenizer.py); RequestError naming `messages`."""
        if self.tokenizer is None:
            raise RequestError("messages", "this model has no tokenizer; send token ids")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt, continue_final_message,
                                                      tools, template_kwargs)
        except Exception as e:  # noqa: BLE001 - malformed messages, a template that refuses them
            message = str(e)
            field, sep, rest = message.partition(": ")
            raise RequestError(field if sep and field.startswith("messages") else "messages",
                               rest if sep and field.startswith("messages") else message) from None

    async def encode_off_loop(self, prompt: Any, add_special_tokens: bool | None = None) -> list[int]:
        """`encode` on the tokenizer pool, after the cheap character bound (router/limits.py), so a
        huge prompt is refused at once and no tokenization blocks another request's bytes."""
        await self._check_prompt_chars(prompt)
        return await self.tokenizer_pool.run(self.encode, prompt, add_special_tokens)

    async def encode_chat_off_loop(self, messages: list[dict[str, Any]], *options: Any) -> list[int]:
        """`encode_chat` (same options) on the tokenizer pool, after the character bound."""
        await self._check_prompt_chars({"messages": messages})
        return await self.tokenizer_pool.run(self.encode_chat, messages, *options)

    async def _check_prompt_chars(self, prompt: Any) -> None:
        if isinstance(prompt, (str, dict)):
            info = await self.model_info()
            check_prompt_chars(prompt, self.config.prompt_chars_limit(info["max_model_len"]))

    async def build(self, token_ids: list[int], params: SamplingParams, request_id: str, priority: int,
                    cache_salt: str | None, timeout_s: float | None, tenant: str | None = None) -> GenerationRequest:
        """The typed request, validated once against the replicas' limits. The cache salt the
        engine gets is the tenant's when tenant isolation is on (router/tenancy.py)."""
        info = await self.model_info()
        cache_salt = cache_salt_for(self.config.tenant_isolation, tenant, cache_salt)
        caps = [t for t in (timeout_s, self.config.request_timeout_s) if t is not None]
        deadline = time.time() + min(caps) if caps else None
        return GenerationRequest.validated(token_ids, params, Limits(**info["limits"]), request_id, priority,
                                           cache_salt, deadline)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
        """Admit, route and stream one request's items (all its choices); raises RequestError for
        errors (codes resource_exhausted, unavailable, deadline_exceeded, ...). Leaving early
        cancels the replica's stream, which aborts the engine requests."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError

        budget = None if request.deadline is None else request.deadline - time.time()
        deadline = None if budget is None else time.monotonic() + budget
        remaining_choices = request.params.n
        with self.admission:
            args: list[Any] = [request]
            if self.config.router_needs_text:  # positional: Ray's text router only scans args
                args.append(self.routing_hint(request.prompt_token_ids))
            retries = 0
            while True:
                response = self.generate_handle.generate.remote(*args, owner=self.owner)
                finished = delivered = retry = False
                try:
                    while True:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            raise asyncio.TimeoutError
                        try:
                            item: StreamItem = await asyncio.wait_for(response.__anext__(), remaining)
                        except StopAsyncIteration:
                            finished = True
                            return
                        if item.error is not None:  # a rejection, or the engine failing mid-stream
                            finished = True
                            item.error.counted = True  # type: ignore[attr-defined] # the engine counted its own rejection
                            raise item.error
                        if item.finish_reason is not None:
                            remaining_choices -= 1
                        finished = remaining_choices == 0
                        delivered = True
                        yield item
                        if finished:
                            return
                except asyncio.TimeoutError:
                    raise RequestError("", f"the request's deadline ({budget:.3g} s) passed",
                                       code="deadline_exceeded") from None
                except BackPressureError as e:
                    raise RequestError("", f"all replica groups are at capacity; retry later ({e})",
                                       code="resource_exhausted") from None
                except RequestError:
                    raise
                except (ActorDiedError, ActorUnavailableError) as e:
                    # The replica group died. Before any item reached the client the request is
                    # sent again (Serve routes around a dead replica once it notices); after
                    # one, the client has part of an answer and gets UNAVAILABLE.
                    if delivered or retries >= REPLICA_FAILURE_RETRIES:
                        log.warning("stream %s failed: %s", request.request_id, e)
                        raise RequestError("", f"the replica group serving the request failed: {type(e).__name__}",
                                           code="unavailable") from None
                    retries += 1
                    retry = True
                    log.warning("stream %s: its replica group failed before the first item (%s); sending it "
                                "again (%d of %d)", request.request_id, type(e).__name__, retries,
                                REPLICA_FAILURE_RETRIES)
                except Exception as e:  # noqa: BLE001 - a replica died mid-stream, no replica, ...
                    log.warning("stream %s failed: %s", request.request_id, e)
                    raise RequestError("", f"the replica group serving the request failed: {type(e).__name__}",
                                       code="unavailable") from None
                finally:
                    if not finished and not retry:
                        cancel_replica_stream(response)  # hardening: never blocks the loop nor raises
                if retry:
                    await asyncio.sleep(REPLICA_RETRY_DELAY_S * retries)

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

    def _grpc_authorize(self, grpc_context) -> str | None:
        """Check the call's API key (UNAUTHENTICATED without a valid one); returns its tenant."""
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else []
        value = next((v for k, v in metadata or [] if k == "authorization"), None)
        value = value.decode() if isinstance(value, bytes) else value
        key = bearer_token(value)
        if not self.authorized(key):
            raise RequestError("authorization", "a valid API key is required (metadata `authorization: Bearer KEY`)",
                               code="unauthenticated")
        return self.tenant_of(key)

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        """Server-streaming generation; errors become the call's status with the field named."""
        rid = f"gen-{uuid.uuid4().hex[:16]}"  # hardening: the engine always gets the server's own id
        reply_id = rid
        started = False
        try:
            tenant = self._grpc_authorize(grpc_context)
            reply_id = request_label(request.request_id, self.config.max_request_id_chars) or rid
            kind = request.WhichOneof("input")
            if kind is None:
                raise RequestError("input", "set one of text, chat or token_ids")
            if kind == "chat":
                token_ids = await self.encode_chat_off_loop(chat_from_proto(request.chat))
            elif kind == "text":
                token_ids = await self.encode_off_loop(request.text)
            else:
                token_ids = list(request.token_ids.ids)
            params = sampling_from_proto(request.sampling, self.sampling_defaults, chat=kind == "chat")
            timeout_s = deadline_from_metadata(grpc_context.invocation_metadata() if grpc_context else None)
            typed = await self.build(token_ids, params, rid, request.priority, request.cache_salt or None, timeout_s,
                                     tenant)
            items = self.stream(typed)
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
            self._grpc_authorize(grpc_context)
            kind = request.WhichOneof("input")
            if kind is None:
                raise RequestError("input", "set one of text or chat")
            if kind == "chat":
                ids = await self.encode_chat_off_loop(chat_from_proto(request.chat))
            else:
                add = request.add_special_tokens if request.HasField("add_special_tokens") else None
                ids = await self.encode_off_loop(request.text, add)
            return pb.TokenizeResponse(token_ids=ids, count=len(ids))
        except RequestError as e:
            _set_status(grpc_context, e)
            return pb.TokenizeResponse()

    async def GetModelInfo(self, request: pb.ModelInfoRequest, grpc_context=None) -> pb.ModelInfo:
        """The model, limits, tensor parallelism and each live replica group's load."""
        try:
            self._grpc_authorize(grpc_context)
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

    def _http_authorize(self, request: Request) -> str | None:
        """Check the request's API key (401 without a valid one); returns its tenant."""
        key = bearer_token(request.headers.get("authorization"))
        if not self.authorized(key):
            raise RequestError("authorization", "a valid API key is required (header `Authorization: Bearer KEY`)",
                               code="unauthenticated")
        return self.tenant_of(key)

    @staticmethod
    def _error(error: RequestError) -> Response:
        status, payload = openai_api.error_body(error.code, str(error), error.field)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(payload, status_code=status, headers=headers)

    async def _body(self, request: Request, model: Any) -> tuple[str | None, Any]:
        """Authorize, read the JSON body and parse it as `model` (unknown fields logged once);
        returns (the caller's tenant, the parsed body)."""
        tenant = self._http_authorize(request)
        body = json_body(await request.body(), self.config.max_json_depth)  # hardening: depth bounded
        parsed = openai_protocol.parse(model, body)
        self.warn_unknown(parsed.unknown_fields())
        self.check_model(getattr(parsed, "model", None))
        return tenant, parsed

    @web.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._openai(request, chat=False)

    @web.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, chat=True)

    def _model_card(self, name: str, info: dict[str, Any]) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "shardline", "root": self.config.model,
                "max_model_len": info.get("max_model_len")}

    async def _info_or_empty(self) -> dict[str, Any]:
        try:
            return await self.model_info()
        except RequestError:
            return {}

    @web.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._http_authorize(request)
        except RequestError as e:
            return self._error(e)
        info = await self._info_or_empty()
        return JSONResponse({"object": "list", "data": [self._model_card(n, info) for n in self.config.model_names]})

    @web.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> Response:
        try:
            self._http_authorize(request)
            self.check_model(model_id)
        except RequestError as e:
            return self._error(e)
        return JSONResponse(self._model_card(model_id, await self._info_or_empty()))

    @web.get("/version")
    async def version(self) -> Response:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return JSONResponse({"version": version("shardline")})
        except PackageNotFoundError:
            return JSONResponse({"version": "unknown"})

    @web.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: {"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens"}."""
        try:
            _, req = await self._body(request, openai_protocol.TokenizeRequest)
            if req.messages is not None:
                ids = await self.encode_chat_off_loop([m.template_dict() for m in req.messages],
                                                      req.add_generation_prompt, req.continue_final_message,
                                                      req.tools, req.chat_template_kwargs)
            elif req.prompt is not None:
                ids = await self.encode_off_loop(req.prompt, req.add_special_tokens)
            else:
                raise RequestError("prompt", "set prompt or messages")
            info = await self._info_or_empty()
        except RequestError as e:
            return self._error(e)
        return JSONResponse({"count": len(ids), "max_model_len": info.get("max_model_len"), "tokens": ids})

    @web.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: {"tokens"} -> {"prompt"}."""
        try:
            _, req = await self._body(request, openai_protocol.DetokenizeRequest)
            if self.tokenizer is None:
                raise RequestError("tokens", "this model has no tokenizer")
            vocab = self.model_config.vocab_size
            bad = [t for t in req.tokens if not 0 <= t < vocab]
            if bad:
                raise RequestError("tokens", f"token {bad[0]} is outside the vocabulary [0, {vocab})")
            text = self.tokenizer.decode(req.tokens, skip_special_tokens=False)
        except RequestError as e:
            return self._error(e)
        return JSONResponse({"prompt": text})

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
            tenant, req = await self._body(request, openai_protocol.ChatCompletionRequest if chat
                                           else openai_protocol.CompletionRequest)
            params = openai_api.sampling_params(req, chat, self.sampling_defaults)
            tool_plan = None
            if chat:
                tool_plan, params = tool_calls.plan(req, params, self.tool_parser, self.config.enable_auto_tool_choice)
            request_label(req.request_id, self.config.max_request_id_chars)  # validated; never the engine's id
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            echo: list[str] | None = None
            if chat:
                prompts: list[Any] = [await self.encode_chat_off_loop(
                    tool_calls.for_template([m.template_dict() for m in req.messages]), req.add_generation_prompt,
                    req.continue_final_message, req.tools, req.chat_template_kwargs)]
            else:
                raw = openai_api.completion_prompts(req)
                prompts = [await self.encode_off_loop(p) for p in raw]
                if req.echo:
                    echo = [p if isinstance(p, str) else self._decode(p) for p in raw]
            typed = [await self.build(ids, params, rid if len(prompts) == 1 else f"{rid}-p{i}", req.priority,
                                      req.cache_salt, None, tenant) for i, ids in enumerate(prompts)]
            streams = [self.stream(t) for t in typed]
            items = merge_streams(streams)
            first = await items.__anext__()  # errors before any byte is sent become a proper status
        except RequestError as e:
            self.reject(e)
            return self._error(e)
        except StopAsyncIteration:
            return self._error(RequestError("", "the replica ended the stream without a result", code="internal"))
        n = params.n
        builder = openai_api.ResponseBuilder(rid, req.model or self.model_name, chat, n, n * len(prompts), self._decode_token,
                                             want_logprobs=params.logprobs is not None, echo=echo,
                                             prompt_token_ids=[list(ids) for ids in prompts],
                                             want_prompt_logprobs=req.prompt_logprobs is not None)
        builder.tools = tool_plan
        if not req.stream:
            try:
                position, item = first
                builder.add(position * n + item.index, item)
                async for position, item in items:
                    builder.add(position * n + item.index, item)
            except RequestError as e:
                self.reject(e, started=True)
                return self._error(e)
            finally:
                await items.aclose()  # releases the admission slots now, not at garbage collection
            return JSONResponse(builder.response())
        options = req.stream_options
        return StreamingResponse(self._sse(builder, first, items, bool(options and options.include_usage),
                                           bool(options and options.continuous_usage_stats)),
                                 media_type="text/event-stream")

    async def _sse(self, builder: openai_api.ResponseBuilder, first: tuple[int, StreamItem],
                   items: AsyncGenerator[tuple[int, StreamItem], None], include_usage: bool,
                   continuous_usage: bool) -> AsyncIterator[str]:
        """SSE chunks as OpenAI ends a stream; a client that disconnects cancels this generator,
        which cancels the streams."""
        try:
            for chunk in builder.opening_chunks(continuous_usage):
                yield chunk
            position, item = first
            while True:
                index = position * builder.n + item.index
                builder.add(index, item)
                for chunk in builder.item_chunks(index, item, continuous_usage):
                    yield chunk
                try:
                    position, item = await items.__anext__()
                except StopAsyncIteration:
                    break
            if include_usage:
                yield builder.usage_chunk()
            yield openai_api.SSE_DONE
        except RequestError as e:
            self.reject(e, started=True)
            _, payload = openai_api.error_body(e.code, str(e), e.field)
            yield f"data: {json.dumps(payload)}\n\n"
        finally:
            await items.aclose()

    def _decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(f"<{t}>" for t in token_ids)
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def _decode_token(self, token_id: int) -> str:
        return self._decode([token_id])
