"""What the engine streams back for each request: deltas while it runs, usage and a finish reason
at the end. Every front end (offline generate, asyncio stream, gRPC, HTTP) converts from these."""

from __future__ import annotations

from dataclasses import dataclass, field

# Finish reasons, as the gRPC API names them.
FINISH_STOP = "stop"  # an EOS or stop token id
FINISH_STOP_STRING = "stop_string"  # a stop string matched
FINISH_LENGTH = "length"  # max_tokens or the context is full
FINISH_ABORT = "abort"  # the caller cancelled
FINISH_ERROR = "error"  # the engine failed while the request was in flight


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the top-n alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """One delta of a request: the tokens and text produced since the previous delta."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # set with finish_reason "error"
    # On the request's first delta when it asked for params.prompt_logprobs: one entry per prompt
    # token, the first None (no logits precede it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_into(held: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Append `later` (the next delta of the same request) to `held` in place and return it.
    Token ids, text and logprobs concatenate in order; the end state (finished, finish reason,
    usage, error) is the later delta's, since usage counts are cumulative."""
    held.new_token_ids.extend(later.new_token_ids)
    held.text_delta += later.text_delta
    if later.logprobs:
        if held.logprobs is None:
            held.logprobs = []
        held.logprobs.extend(later.logprobs)
    if held.prompt_logprobs is None:
        held.prompt_logprobs = later.prompt_logprobs
    held.finished = later.finished
    held.finish_reason = later.finish_reason
    held.prompt_tokens = later.prompt_tokens
    held.completion_tokens = later.completion_tokens
    held.cached_tokens = later.cached_tokens
    held.error = later.error
    return held


@dataclass
class CompletionResult:
    """A finished request as the offline `generate` API returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # params.prompt_logprobs: per prompt token
