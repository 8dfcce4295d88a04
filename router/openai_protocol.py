"""The OpenAI request bodies (/v1/completions, /v1/chat/completions, /tokenize, /detokenize) as
pydantic models: the types of every field the server reads, strict (a token id of 1.9, True or "7"
is an error naming `prompt`, never coerced), and unknown fields allowed (vLLM, SGLang and TGI accept
and ignore them; the ingress logs each unknown name once with a warning).

Ranges and limits are not checked here: the one validator (worker/engine/validation.py) does that
once the request is a GenerationRequest. openai_api.py turns these models into that request."""

from __future__ import annotations

import reprlib
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from shardline.worker.engine.params import RequestError

Number = Union[StrictInt, StrictFloat]
TokenIds = list[StrictInt]


class OpenAIModel(BaseModel):
    """A body or part of one: unknown fields are kept in `model_extra`, not rejected."""

    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        """Names of the fields the server does not read (they are ignored)."""
        return sorted(self.model_extra or {})


class StreamOptions(OpenAIModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM: usage on every chunk


class JsonSchemaFormat(OpenAIModel):
    """response_format.json_schema: OpenAI's named schema; `strict` forbids properties beyond it."""

    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(OpenAIModel):
    """OpenAI's response_format: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(OpenAIModel):
    """vLLM's `structured_outputs` extra: exactly one of these constraints."""

    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None


class SamplingFields(OpenAIModel):
    """Fields completions and chat share: OpenAI's, plus vLLM's extensions clients send. None: unset
    (the model's generation_config default, or SamplingParams' own)."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: StrictBool | None = None
    skip_special_tokens: StrictBool | None = None
    n: StrictInt | None = None
    prompt_logprobs: StrictInt | None = None  # vLLM's: top-n logprobs of every prompt token
    best_of: StrictInt | None = None
    logit_bias: dict[str, Number] | None = None  # token id (as a JSON key string) -> bias
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    priority: StrictInt = 0
    cache_salt: StrictStr | None = None
    request_id: StrictStr | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older spellings of the same constraints (still sent by many clients).
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: StrictStr | TokenIds | list[StrictStr] | list[TokenIds]
    echo: StrictBool | None = False
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(OpenAIModel):
    """One message; `content` may be null (an assistant turn that only calls tools)."""

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template reads it: text parts joined, null content as "",
        other fields (tool_calls, tool_call_id, ...) passed through."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = dict(self.model_extra or {})
        out.update(role=self.role, content=content or "")
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # checked by router/tool_calls.py
    parallel_tool_calls: StrictBool | None = None


class TokenizeRequest(OpenAIModel):
    """POST /tokenize (vLLM's shape): a prompt or chat messages."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(OpenAIModel):
    """POST /detokenize (vLLM's shape)."""

    model: StrictStr | None = None
    tokens: TokenIds


_SHORT_REPR = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = 8
_PROMPT_SHAPES = "a string, a list of token ids (integers), a list of strings or a list of token-id lists"


def parse(model: type[OpenAIModel], body: Any) -> Any:
    """Validate a JSON body as `model`; a RequestError naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        if e.errors()[0]["loc"][:1] == ("prompt",):
            raise RequestError("prompt", f"must be {_PROMPT_SHAPES}; got {_SHORT_REPR.repr(body.get('prompt'))}") from None
        raise validation_error(e) from None


def _is_union_member(part: str | int) -> bool:
    """Whether a pydantic error location part names a member of a union (`int`, `list[str]`,
    `TextPart`, `function-after[...]`) rather than a field (our fields are snake_case) or an index."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part or "-" in part
                                      or part[:1].isupper())


def validation_error(error: ValidationError, prefix: tuple[str, ...] = ()) -> RequestError:
    """The RequestError of a failed validation of a body (or of its `prefix` field alone): its
    first field, the path to the bad value without pydantic's union member names, and, when every
    member of a union failed at the value itself, what each would have taken ("a valid integer or
    a valid number"). A member that got further into the value (a list with one bad item) names
    that item instead."""
    errors = [(prefix + tuple(p for p in err["loc"] if not _is_union_member(p)), err) for err in error.errors()]
    loc, first = errors[0]
    field = str(loc[0]) if loc else "body"
    if len(first["loc"]) + len(prefix) > len(loc):  # a union: the errors of its members follow one another
        members = [(member_loc, err) for member_loc, err in errors if member_loc[:len(loc)] == loc]
        deepest = max(members, key=lambda m: len(m[0]))
        if len(deepest[0]) > len(loc):
            loc, first = deepest
        else:
            wants = dict.fromkeys(err["msg"].removeprefix("Input should be ") for _, err in members)
            first = {**first, "msg": "Input should be " + " or ".join(wants)}
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
    where = "" if path == field else f"{path}: "
    # hardening: a bounded repr (reprlib), never the whole of a large value
    return RequestError(field, f"{where}{first['msg']} (got {_SHORT_REPR.repr(first.get('input'))})")
