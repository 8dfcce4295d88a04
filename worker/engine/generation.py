"""The typed request that travels from a front end (HTTP, gRPC, the CLI) to the engine, and the
typed items that stream back. One object each way across every hop (the Serve DeploymentHandle
pickles them as they are), so nothing is re-parsed or re-validated on the way.

A GenerationRequest is built once at the edge by `GenerationRequest.validated`, which runs the one
validator (validation.py) against the serving engine's Limits and stores the resolved output limit;
the engine trusts it (LLMEngine.submit). It imports neither torch, Ray nor gRPC.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .outputs import RequestOutput, TokenLogprob
from .params import RequestError, SamplingParams
from .validation import Limits, validate_request


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to generate from, tokenized and validated.

    prompt_token_ids: the prompt (chat template already applied), ids in [0, vocab_size).
    params: how to sample; `params.n` choices are generated from the one prompt.
    max_tokens: the resolved output limit (params.max_tokens, or the rest of the context when None).
    request_id: unique while in flight; choice i of an n > 1 request runs as f"{request_id}-{i}".
    priority: higher runs earlier when the scheduler must choose.
    cache_salt: mixed into prefix-cache block hashes (tenants never share cached blocks).
    deadline: wall-clock time (time.time(), seconds) after which the request is not worth
        finishing, or None; the ingress enforces it (the engine does not read it yet).
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    request_id: str
    priority: int = 0
    cache_salt: str | None = None
    deadline: float | None = None

    @classmethod
    def validated(cls, prompt_token_ids: list[int], params: SamplingParams, limits: Limits, request_id: str,
                  priority: int = 0, cache_salt: str | None = None,
                  deadline: float | None = None) -> "GenerationRequest":
        """Validate (RequestError naming the field) and build. The only constructor front ends use."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise RequestError("priority", f"must be an integer, got {priority!r}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise RequestError("cache_salt", f"must be a string, got {type(cache_salt).__name__}")
        max_tokens = validate_request(prompt_token_ids, params, limits)
        return cls(list(prompt_token_ids), params, max_tokens, request_id, priority, cache_salt or None, deadline)

    def choice(self, index: int) -> "GenerationRequest":
        """The single-choice request of choice `index` (its own id and seed stream, see
        SamplingParams.for_choice); the request itself when n is 1."""
        if self.params.n == 1:
            return self
        return dataclasses.replace(self, params=self.params.for_choice(index), request_id=f"{self.request_id}-{index}")


@dataclass(frozen=True)
class Usage:
    """Token counts of one choice so far (OpenAI's usage; cached_tokens are prompt tokens served
    from the prefix cache)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class StreamItem:
    """One delta of one choice, as a ReplicaGroup streams it.

    index: the choice (0..n-1) of the request this delta belongs to.
    token_ids / text: produced since the choice's previous item (text never splits a character).
    logprobs: one TokenLogprob per token in token_ids when the request asked (params.logprobs), else None.
    finish_reason: set on the choice's last item (outputs.FINISH_*), else None.
    usage: the choice's counts so far (every item carries it).
    error: set on a terminal item when the request was refused or the engine failed.
    prompt_logprobs: on the choice's first item when params.prompt_logprobs was set: one entry per
        prompt token, the first None.
    """

    index: int
    token_ids: list[int]
    text: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: RequestError | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @classmethod
    def from_output(cls, out: RequestOutput, index: int = 0) -> "StreamItem":
        """An engine delta as a stream item of choice `index`; an engine failure becomes an
        `unavailable` error."""
        error = RequestError("", f"the engine failed: {out.error}", code="unavailable") if out.error else None
        return cls(index=index, token_ids=list(out.new_token_ids), text=out.text_delta,
                   usage=Usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens),
                   logprobs=list(out.logprobs) if out.logprobs else None,
                   finish_reason=out.finish_reason if out.finished else None, error=error,
                   prompt_logprobs=out.prompt_logprobs)

    @classmethod
    def failure(cls, error: RequestError, index: int = 0) -> "StreamItem":
        """The terminal item of a request that did not run (errors cross the handle as items:
        Ray's wrapping of a custom exception is lossy)."""
        return cls(index=index, token_ids=[], text="", usage=Usage(0, 0), error=error)
