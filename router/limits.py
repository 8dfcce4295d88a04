"""Bounds on what one request may cost the ingress before any of it is tokenized or routed
(docs/security.md lists them with their defaults):

- `RequestLimitsMiddleware`: an ASGI middleware refusing an HTTP body over max_request_body_bytes
  (413, from its Content-Length at once, or as soon as the bytes read pass the bound, never
  reading the rest) and headers over max_request_header_bytes (431), in OpenAI's error shape.
- `check_prompt_chars`: a prompt's characters against a bound derived from max_model_len,
  checked before the tokenizer sees it (a 50 MiB prompt used to take 40 s to tokenize and refuse).
- `json_body`: an HTTP body parsed as JSON with its nesting bounded by max_json_depth.
- `request_label`: a client-chosen request id becomes a bounded, printable label; the engine
  always uses the server's own id (router/ingress.py).
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from shardline.worker.engine.params import RequestError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _BodyTooLarge(Exception):
    """Raised from the wrapped `receive` once the body read passes the bound."""


def _error_response_body(status: int, code: str, message: str, param: str) -> bytes:
    from shardline.router.openai_api import error_body

    _, payload = error_body(code, message, param)
    payload["error"]["type"] = "invalid_request_error"
    return json.dumps(payload).encode()


async def _send_error(send: Send, status: int, message: str, param: str) -> None:
    body = _error_response_body(status, "invalid_argument", message, param)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RequestLimitsMiddleware:
    """ASGI middleware: 413 for a body over the body bound, 431 for headers over the header bound.
    `limits()` gives (max body bytes, max header bytes) per request: the ingress's config, read in
    the replica (the FastAPI app is pickled into the replica before any config exists)."""

    def __init__(self, app: Callable[..., Awaitable[None]],
                 limits: Callable[[], tuple[int, int]] | None = None) -> None:
        self.app = app
        self.limits = limits or replica_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        max_body, max_header = self.limits()
        headers = scope.get("headers") or []
        header_bytes = sum(len(k) + len(v) for k, v in headers)
        if header_bytes > max_header:
            await _send_error(send, 431, f"the request's headers are {header_bytes} bytes; the limit is "
                              f"{max_header} (max_request_header_bytes)", "headers")
            return
        declared = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            await _send_error(send, 413, _too_large(max_body, f"{int(declared)} bytes"), "body")
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, 413, _too_large(max_body, f"more than {max_body} bytes"), "body")


def _too_large(max_body: int, size: str) -> str:
    return f"the request body is {size}; the limit is {max_body} bytes (max_request_body_bytes)"


def replica_limits() -> tuple[int, int]:
    """(max_request_body_bytes, max_request_header_bytes) of the ClusterConfig of the Serve replica
    this runs in; the ClusterConfig defaults outside one."""
    from shardline.cluster.config import ClusterConfig

    config = None
    try:
        from ray import serve

        config = getattr(serve.get_replica_context().servable_object, "config", None)
    except Exception:  # noqa: BLE001 - not inside a replica (tests of the middleware alone)
        pass
    if not isinstance(config, ClusterConfig):
        config = ClusterConfig()
    return config.max_request_body_bytes, config.max_request_header_bytes


def prompt_chars(prompt: Any) -> int:
    """Characters a prompt gives the tokenizer: the text, or every chat message's content (a list of
    token ids counts zero: it is bounded by the validator's max_model_len check, no tokenizing needed)."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, dict):
        if "prompt" in prompt:
            return prompt_chars(prompt["prompt"])
        messages = prompt.get("messages")
        if isinstance(messages, (list, tuple)):
            return sum(len(m.get("content") or "") if isinstance(m, dict) and isinstance(m.get("content"), str)
                       else 0 for m in messages)
    return 0


def check_prompt_chars(prompt: Any, limit: int) -> None:
    """Raise RequestError (field prompt or messages, invalid_argument) when the prompt has more
    characters than `limit`; O(number of messages), before any tokenizing."""
    n = prompt_chars(prompt)
    if n > limit:
        field = "messages" if isinstance(prompt, dict) and "messages" in prompt else "prompt"
        raise RequestError(field, f"{n} characters is more than this model's context can hold; the limit is "
                           f"{limit} characters (max_prompt_chars)")


def request_label(client_id: Any, max_chars: int) -> str | None:
    """A client-chosen request id as a label: None when unset; raises RequestError (field
    request_id) when it is not a string of 1..max_chars printable ASCII characters without spaces.
    The label is echoed to the client and logged; it never names the engine's request."""
    if client_id is None or client_id == "":
        return None
    if not isinstance(client_id, str):
        raise RequestError("request_id", f"must be a string, got {type(client_id).__name__}")
    if len(client_id) > max_chars:
        raise RequestError("request_id", f"is {len(client_id)} characters; the limit is {max_chars} (max_request_id_chars)")
    if not all("!" <= c <= "~" for c in client_id):
        raise RequestError("request_id", "must be printable ASCII without spaces or control characters")
    return client_id


def json_nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests objects and arrays more than `limit` deep (a scalar is 0
    deep, `[]` 1). Iterative, and it stops at the first path past the limit."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def json_body(raw: bytes, max_depth: int) -> Any:
    """An HTTP body parsed as JSON, nested at most `max_depth` deep; RequestError (field body,
    400) when it is not JSON or is nested deeper (the parser itself gives up past Python's
    recursion limit: that is reported as deeper than the limit too)."""
    too_deep = RequestError("body", f"JSON nested more than {max_depth} levels deep; the limit is {max_depth} "
                            "(max_json_depth)")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except ValueError as e:
        raise RequestError("body", f"not valid JSON: {str(e)[:200]}") from None
    if json_nested_deeper_than(value, max_depth):
        raise too_deep
    return value
