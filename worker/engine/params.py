"""Per-request sampling parameters and the typed error every front end maps to its own status."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


class RequestError(ValueError):
    """A request was rejected. `field` names the offending field; `code` is the canonical kind
    (invalid_argument, resource_exhausted, unavailable) that gRPC and HTTP map to their status codes."""

    MAX_MESSAGE_CHARS = 512  # a message quoting a client's value (a 1 MB role) is cut here, not echoed or logged whole

    def __init__(self, field: str, message: str, code: str = "invalid_argument") -> None:
        field = field if len(field) <= 128 else field[:128] + "..."
        if len(message) > self.MAX_MESSAGE_CHARS:
            message = f"{message[:self.MAX_MESSAGE_CHARS]}... ({len(message)} characters in all)"
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.code = code
        self.detail = message

    def __reduce__(self):  # survives pickling across Ray processes with its field and code
        return (type(self), (self.field, self.detail, self.code))


StructuredOutputKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint the output must match, enforced by a token mask each step (worker/structured/).
    `value`: the JSON schema's text (json_schema), the regex, the EBNF grammar (grammar), the
    allowed strings (choice), nothing (json_object: any JSON object). `strict` (json_schema only,
    OpenAI's flag): no object properties beyond the schema's. Frozen and hashable: it is the key of
    the compiled-grammar cache."""

    kind: StructuredOutputKind
    value: str | tuple[str, ...] | None = None
    strict: bool = False


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Defaults follow the OpenAI / vLLM conventions:
    temperature 1, no top-k / top-p / min-p filtering, no penalties, 16 tokens."""

    max_tokens: int | None = 16  # None: until the context (max_model_len) is full
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0: only the sampled token's)
    # top-n logprobs of every prompt token after the first (vLLM's prompt_logprobs; 0: only the
    # prompt token's own). Computed in the prefill from the model's raw logits; such a request
    # takes no prefix-cache hit, since a cached position has no logits.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = None
    n: int = 1  # choices of one prompt; choice i samples with seed + i (see for_choice)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI)

    def for_choice(self, index: int) -> "SamplingParams":
        """The parameters of choice `index` of an n-choice request: n = 1 and, when seeded, seed +
        index (vLLM's convention), so choice i equals a single request with that seed."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_repetition_penalty(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def has_additive_penalties(self) -> bool:
        """Frequency or presence penalty (OpenAI's, subtracted from the logits)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether sampling reads the request's past output tokens."""
        return self.has_repetition_penalty or self.has_additive_penalties

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        """Build from a JSON-like dict, rejecting unknown fields by name."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError(unknown[0], f"unknown sampling field; known fields: {', '.join(sorted(known))}")
        data = dict(data)
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        try:
            if isinstance(data.get("structured_output"), dict):
                so = dict(data["structured_output"])
                if isinstance(so.get("value"), list):
                    so["value"] = tuple(so["value"])
                data["structured_output"] = StructuredOutput(**so)
            return cls(**data)
        except TypeError as e:
            raise RequestError("sampling", str(e)) from None
