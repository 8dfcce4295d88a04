"""The OpenAI-compatible HTTP surface: request bodies of /v1/completions and /v1/chat/completions
to shardline's (prompt, sampling dict), stream items to OpenAI response objects and SSE chunks,
and errors to OpenAI's `{"error": {"message", "type", "param", "code"}}` shape. Pure functions; the
ingress does the I/O."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from shardline.worker.engine.params import RequestError

# OpenAI fields mapped one to one onto SamplingParams, plus vLLM's extensions clients send.
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                    "include_stop_str_in_output", "skip_special_tokens")
# Accepted and ignored: they do not change what is generated.
_IGNORED_FIELDS = ("model", "user", "stream", "stream_options", "n", "logit_bias", "suffix", "echo",
                   "best_of", "metadata", "store", "service_tier", "parallel_tool_calls", "modalities")

HTTP_STATUS = {"invalid_argument": 400, "not_found": 404, "resource_exhausted": 429, "unavailable": 503,
               "deadline_exceeded": 504, "cancelled": 499, "internal": 500}
ERROR_TYPE = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
              503: "service_unavailable", 504: "timeout", 499: "cancelled", 500: "internal_error"}
OPENAI_FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "abort": "abort", "error": "error"}


@dataclass
class OpenAIRequest:
    """A parsed completions or chat request."""

    prompt: Any  # str, list[int] or {"messages": [...]}
    sampling: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    priority: int = 0
    cache_salt: str | None = None
    request_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def error_body(code: str, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI-shaped body of an error of canonical kind `code`."""
    status = HTTP_STATUS.get(code, 500)
    return status, {"error": {"message": message, "type": ERROR_TYPE.get(status, "internal_error"),
                              "param": param or None, "code": code}}


def _common(body: dict[str, Any], chat: bool) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    n = body.get("n", 1)
    if n not in (1, None):
        raise RequestError("n", f"only n=1 is supported, got {n!r}")
    if body.get("echo"):
        raise RequestError("echo", "echo is not supported")
    known = set(_SAMPLING_FIELDS) | set(_IGNORED_FIELDS) | {"prompt", "messages", "stop", "logprobs", "top_logprobs",
                                                             "max_completion_tokens", "priority", "cache_salt",
                                                             "request_id"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(unknown[0], "unknown field")
    sampling = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    if chat and body.get("max_completion_tokens") is not None:
        sampling["max_tokens"] = body["max_completion_tokens"]
    stop = body.get("stop")
    if stop is not None:
        sampling["stop"] = [stop] if isinstance(stop, str) else stop
    logprobs: int | None = None
    if chat:
        if body.get("logprobs"):
            logprobs = int(body.get("top_logprobs") or 0)
    elif body.get("logprobs") is not None:
        logprobs = body["logprobs"]
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    options = body.get("stream_options") or {}
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise RequestError("cache_salt", "must be a string")
    priority = body.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise RequestError("priority", "must be an integer")
    return OpenAIRequest(prompt=None, sampling=sampling, stream=bool(body.get("stream")),
                         include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
                         logprobs=logprobs, priority=priority, cache_salt=salt or None,
                         request_id=body.get("request_id"))


def parse_completion(body: dict[str, Any]) -> OpenAIRequest:
    """A /v1/completions body: `prompt` is a string or a list of token ids (one prompt)."""
    req = _common(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        req.prompt = list(prompt)
    else:
        raise RequestError("prompt", "must be a string or a list of token ids (one prompt per request)")
    return req


def parse_chat(body: dict[str, Any]) -> OpenAIRequest:
    """A /v1/chat/completions body: `messages` with string contents (or lists of text parts)."""
    req = _common(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "must be a non-empty list of {role, content} objects")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]", "must be an object with role and content")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content):
                raise RequestError(f"messages[{i}].content", "only text parts are supported")
            content = "".join(parts)
        flat.append({"role": m.get("role"), "content": content})
    req.prompt = {"messages": flat}
    return req


def usage_dict(final: dict[str, Any]) -> dict[str, Any]:
    """OpenAI usage (with prompt_tokens_details.cached_tokens) from the last stream item."""
    p, c = int(final.get("prompt_tokens", 0)), int(final.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": int(final.get("cached_tokens", 0))}}


def _completion_logprobs(items: list[dict[str, Any]], decode) -> dict[str, Any] | None:
    entries = [lp for item in items for lp in item.get("logprobs") or []]
    if not entries:
        return None
    return {"tokens": [decode(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{decode(k): v for k, v in top.items()} for _, _, top in entries], "text_offset": []}


def completion_response(rid: str, model: str, items: list[dict[str, Any]], decode, chat: bool) -> dict[str, Any]:
    """The whole (non-streaming) response object from every stream item of a request."""
    final = items[-1]
    text = "".join(item.get("text", "") for item in items)
    finish = OPENAI_FINISH.get(final.get("finish_reason") or "", final.get("finish_reason"))
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish, "logprobs": None}
        entries = [lp for item in items for lp in item.get("logprobs") or []]
        if entries:
            choice["logprobs"] = {"content": [
                {"token": decode(t), "logprob": lp,
                 "top_logprobs": [{"token": decode(k), "logprob": v} for k, v in top.items()]}
                for t, lp, top in entries]}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": _completion_logprobs(items, decode)}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage_dict(final)}


def stream_chunk(rid: str, model: str, item: dict[str, Any] | None, chat: bool, first: bool = False,
                 usage: dict[str, Any] | None = None) -> str:
    """One SSE `data:` line: a text delta (item), the role header (first, chat) or the usage chunk."""
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model}
    if usage is not None:
        base["choices"] = []
        base["usage"] = usage
    elif chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {"content": item.get("text", "")}
        finish = None if first or item is None else item.get("finish_reason")
        base["choices"] = [{"index": 0, "delta": delta, "finish_reason": OPENAI_FINISH.get(finish or "", finish),
                            "logprobs": None}]
    else:
        finish = item.get("finish_reason") if item else None
        base["choices"] = [{"index": 0, "text": item.get("text", "") if item else "",
                            "finish_reason": OPENAI_FINISH.get(finish or "", finish), "logprobs": None}]
    return f"data: {json.dumps(base)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
