"""The one request validator every front end (gRPC, HTTP, CLI, engine) calls, so a bad request is
rejected the same way everywhere: a RequestError naming the field and the numbers involved."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .params import RequestError, SamplingParams

_SEED_MIN = -(2**63)
_SEED_END = 2**64


@dataclass(frozen=True)
class Limits:
    """What the serving engine can accept: its context, vocabulary, cache and front-end bounds."""

    max_model_len: int
    vocab_size: int
    max_stop_strings: int = 16
    max_stop_string_len: int = 256
    max_logprobs: int = 20
    max_n: int = 16  # choices per request (each one is a running sequence)
    max_logit_bias: int = 1024  # entries of logit_bias per request (each one is a scattered add)
    max_kv_tokens: int | None = None  # total KV cache capacity in tokens


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(name: str, value: object) -> int:
    if not _is_int(value):
        raise RequestError(name, f"must be an integer, got {type(value).__name__} {value!r}")
    return value  # type: ignore[return-value]


def _finite(name: str, value: object) -> float:
    if not _is_number(value):
        raise RequestError(name, f"must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise RequestError(name, f"must be finite, got {value}")
    return float(value)  # type: ignore[arg-type]


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise RequestError(name, f"must be true or false, got {type(value).__name__} {value!r}")


def validate_request(prompt_token_ids: list[int], params: SamplingParams, limits: Limits) -> int:
    """Check a tokenized request against the engine's limits; return the resolved max_tokens
    (params.max_tokens, or what is left of the context and cache when it is None)."""
    prompt_len = _validate_prompt(prompt_token_ids, limits)
    max_tokens = _resolve_max_tokens(prompt_len, params.max_tokens, limits)
    _validate_sampling(params, max_tokens, limits)
    _validate_stops(params, limits)
    if params.structured_output is not None:
        from shardline.worker.structured.grammar import validate_structured_output  # imports xgrammar

        validate_structured_output(params.structured_output)
    return max_tokens


def _validate_prompt(prompt_token_ids: list[int], limits: Limits) -> int:
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise RequestError("prompt", f"must be a list of token ids, got {type(prompt_token_ids).__name__}")
    if len(prompt_token_ids) == 0:
        raise RequestError("prompt", "must not be empty")
    for position, token in enumerate(prompt_token_ids):
        if not _is_int(token):
            raise RequestError("prompt", f"token at position {position} must be an integer, got {token!r}")
        if not 0 <= token < limits.vocab_size:
            raise RequestError(
                "prompt",
                f"token {token} at position {position} is outside the vocabulary [0, {limits.vocab_size})",
            )
    prompt_len = len(prompt_token_ids)
    if prompt_len >= limits.max_model_len:
        raise RequestError(
            "prompt",
            f"the prompt has {prompt_len} tokens but the model's context (max_model_len) is {limits.max_model_len}"
            f" tokens, and at least one must be left to generate",
        )
    if limits.max_kv_tokens is not None and prompt_len >= limits.max_kv_tokens:
        raise RequestError(
            "prompt",
            f"the prompt has {prompt_len} tokens but the KV cache holds only {limits.max_kv_tokens} tokens in all",
        )
    return prompt_len


def _resolve_max_tokens(prompt_len: int, max_tokens: object, limits: Limits) -> int:
    room = limits.max_model_len - prompt_len
    if limits.max_kv_tokens is not None:
        room = min(room, limits.max_kv_tokens - prompt_len)
    if max_tokens is None:
        return room
    max_tokens = _int("max_tokens", max_tokens)
    if max_tokens < 1:
        raise RequestError("max_tokens", f"must be at least 1, got {max_tokens}")
    if prompt_len + max_tokens > limits.max_model_len:
        raise RequestError(
            "max_tokens",
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} exceeds the"
            f" model's context (max_model_len) of {limits.max_model_len}; at most {room} new tokens fit",
        )
    if limits.max_kv_tokens is not None and prompt_len + max_tokens > limits.max_kv_tokens:
        raise RequestError(
            "max_tokens",
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} exceeds the"
            f" KV cache capacity of {limits.max_kv_tokens} tokens",
        )
    return max_tokens


def _validate_sampling(params: SamplingParams, max_tokens: int, limits: Limits) -> None:
    temperature = _finite("temperature", params.temperature)
    if temperature < 0:
        raise RequestError("temperature", f"must be >= 0, got {temperature}")
    top_p = _finite("top_p", params.top_p)
    if not 0 < top_p <= 1:
        raise RequestError("top_p", f"must be in (0, 1], got {top_p}")
    top_k = _int("top_k", params.top_k)
    if top_k < -1:
        raise RequestError("top_k", f"must be -1 or 0 (disabled) or at least 1, got {top_k}")
    min_p = _finite("min_p", params.min_p)
    if not 0 <= min_p <= 1:
        raise RequestError("min_p", f"must be in [0, 1], got {min_p}")
    repetition = _finite("repetition_penalty", params.repetition_penalty)
    if repetition <= 0:
        raise RequestError("repetition_penalty", f"must be > 0, got {repetition}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _finite(name, getattr(params, name))
        if not -2 <= value <= 2:
            raise RequestError(name, f"must be in [-2, 2], got {value}")
    min_tokens = _int("min_tokens", params.min_tokens)
    if min_tokens < 0:
        raise RequestError("min_tokens", f"must be >= 0, got {min_tokens}")
    if min_tokens > max_tokens:
        raise RequestError("min_tokens", f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")
    if params.seed is not None:
        seed = _int("seed", params.seed)
        if not _SEED_MIN <= seed < _SEED_END:
            raise RequestError("seed", f"must be in [{_SEED_MIN}, {_SEED_END}), got {seed}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None:
            value = _int(name, value)
            if not 0 <= value <= limits.max_logprobs:
                raise RequestError(name, f"must be in [0, {limits.max_logprobs}], got {value}")
    for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
        _bool(name, getattr(params, name))
    n = _int("n", params.n)
    if not 1 <= n <= limits.max_n:
        raise RequestError("n", f"must be in [1, {limits.max_n}], got {n}")
    _validate_logit_bias(params.logit_bias, limits)


def _validate_logit_bias(bias: object, limits: Limits) -> None:
    """OpenAI's logit_bias: token id -> bias in [-100, 100], ids inside the vocabulary."""
    if not isinstance(bias, dict):
        raise RequestError("logit_bias", f"must be an object of token id -> bias, got {type(bias).__name__}")
    if len(bias) > limits.max_logit_bias:
        raise RequestError("logit_bias", f"at most {limits.max_logit_bias} entries are allowed, got {len(bias)}")
    for token, value in bias.items():
        if not _is_int(token) or not 0 <= token < limits.vocab_size:
            raise RequestError("logit_bias", f"token {token!r} is not an id in the vocabulary [0, {limits.vocab_size})")
        value = _finite("logit_bias", value)
        if not -100 <= value <= 100:
            raise RequestError("logit_bias", f"the bias of token {token} must be in [-100, 100], got {value}")


def _validate_stops(params: SamplingParams, limits: Limits) -> None:
    stop = params.stop
    if not isinstance(stop, (list, tuple)):
        raise RequestError("stop", f"must be a list of strings, got {type(stop).__name__}")
    if len(stop) > limits.max_stop_strings:
        raise RequestError("stop", f"at most {limits.max_stop_strings} stop strings are allowed (max_stop_strings), "
                           f"got {len(stop)}")
    for index, text in enumerate(stop):
        if not isinstance(text, str):
            raise RequestError("stop", f"stop[{index}] must be a string, got {type(text).__name__} {text!r}")
        if not text:
            raise RequestError("stop", f"stop[{index}] must not be empty")
        if len(text) > limits.max_stop_string_len:
            raise RequestError(
                "stop", f"stop[{index}] has {len(text)} characters, the limit is {limits.max_stop_string_len} "
                "(max_stop_string_len)"
            )
    stop_ids = params.stop_token_ids
    if not isinstance(stop_ids, (list, tuple)):
        raise RequestError("stop_token_ids", f"must be a list of token ids, got {type(stop_ids).__name__}")
    for index, token in enumerate(stop_ids):
        if not _is_int(token):
            raise RequestError("stop_token_ids", f"stop_token_ids[{index}] must be an integer, got {token!r}")
        if not 0 <= token < limits.vocab_size:
            raise RequestError(
                "stop_token_ids", f"token {token} is outside the vocabulary [0, {limits.vocab_size})"
            )
