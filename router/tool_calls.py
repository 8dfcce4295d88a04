"""Tool calling on the OpenAI chat route: `tools`, `tool_choice` and `parallel_tool_calls` become an
output constraint (for "required" and a named function) and a plan for turning the generated text
into OpenAI `tool_calls`, whole or as streamed deltas.

- `tool_choice: {"type": "function", "function": {"name": F}}`: the output is constrained to F's
  `parameters` schema, so the whole text is F's arguments (vLLM's convention); streamed, each text
  delta is an `arguments` delta of call 0, the first one carrying its id and name.
- `tool_choice: "required"`: the output is constrained to a JSON array (one element unless
  parallel_tool_calls) of `{"name": <one of the tools>, "parameters": <that tool's schema>}`;
  streamed, the calls are sent whole when the array is complete.
- `"auto"` (the default with tools): the model decides; its text is parsed with the Hermes format
  (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the format of the Qwen2.5/Qwen3 and
  SmolLM2-style templates). Text before the first call is the message's content; streamed, content
  flows until a call starts (a partial `<tool_call>` is held back) and the calls come at the end.
- `"none"`: no parsing, no constraint.

The arguments of every constrained call parse and validate against the function's schema, because
the grammar allowed nothing else."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, TypeAdapter, ValidationError

from shardline.worker.engine.params import RequestError, SamplingParams, StructuredOutput

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*" + re.escape(HERMES_CLOSE), re.S)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedChoiceFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: NamedChoiceFunction


_TOOLS = TypeAdapter(list[ToolSpec])
_CHOICE: TypeAdapter[Any] = TypeAdapter(Literal["none", "auto", "required"] | NamedToolChoice)
_PARALLEL = TypeAdapter(StrictBool)


def plan(req: Any, params: SamplingParams) -> "tuple[ToolPlan | None, SamplingParams]":
    """The chat request's ToolPlan and its SamplingParams with the tool constraint (checked, errors
    naming `tool_choice`); a tool constraint beside a response_format is an error."""
    from shardline.worker.structured.grammar import checked_as

    tool_plan, constraint = ToolPlan.from_request(req.tools, req.tool_choice, req.parallel_tool_calls)
    if constraint is None:
        return tool_plan, params
    if params.structured_output is not None:
        raise RequestError("tool_choice", "a required or named tool_choice constrains the output itself; "
                           "it cannot be combined with response_format or structured_outputs")
    return tool_plan, dataclasses.replace(params, structured_output=checked_as(constraint, "tools"))


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: an assistant's tool_calls arguments as a mapping
    (OpenAI clients send a JSON string; Qwen-style templates apply `tojson` to it, which would
    encode the string a second time). Arguments that are not a JSON object stay as they are."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and isinstance(calls, list):
            message = dict(message, tool_calls=[_parsed_arguments(c) for c in calls])
        out.append(message)
    return out


def _parsed_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return dict(call, function=dict(function, arguments=arguments)) if isinstance(arguments, dict) else call


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ToolPlan:
    """How one chat request's output becomes tool calls. `mode`: "named", "required" or "auto"."""

    mode: str
    tools: list[ToolSpec]
    named: str | None = None
    call_ids: dict[int, str] = field(default_factory=dict)  # choice index -> the streamed call's id (named)
    held: dict[int, str] = field(default_factory=dict)  # choice index -> text not streamed yet (auto, required)

    @classmethod
    def from_request(cls, tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> "tuple[ToolPlan | None, StructuredOutput | None]":
        """The plan and the output constraint of a chat body (None, None without tools or with "none")."""
        if tools is None:
            if tool_choice not in (None, "none"):
                raise RequestError("tool_choice", "needs tools")
            return None, None
        try:
            specs = _TOOLS.validate_python(tools)
        except ValidationError as e:
            first = e.errors()[0]
            raise RequestError("tools", f"tools{''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in first['loc'])}: "
                               f"{first['msg']}") from None
        try:
            choice = _CHOICE.validate_python("auto" if tool_choice is None else tool_choice)
        except ValidationError:
            raise RequestError("tool_choice", 'must be "none", "auto", "required" or {"type": "function", '
                               f'"function": {{"name": ...}}}}, got {tool_choice!r}') from None
        parallel = True if parallel_tool_calls is None else _PARALLEL.validate_python(parallel_tool_calls)
        if choice == "none" or not specs:
            return None, None
        schemas = {s.function.name: s.function.parameters or {"type": "object"} for s in specs}
        if isinstance(choice, NamedToolChoice):
            name = choice.function.name
            if name not in schemas:
                raise RequestError("tool_choice", f"function {name!r} is not among the tools ({', '.join(schemas)})")
            return cls("named", specs, named=name), StructuredOutput("json_schema", json.dumps(schemas[name]), strict=True)
        if choice == "required":
            call = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                               "required": ["name", "parameters"], "additionalProperties": False}
                              for name, schema in schemas.items()]}
            array: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
            if not parallel:
                array["maxItems"] = 1
            return cls("required", specs), StructuredOutput("json_schema", json.dumps(array), strict=True)
        return cls("auto", specs), None

    # ---- whole responses ----------------------------------------------------------------------------

    def calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The message's content and tool calls for the choice's whole text."""
        if self.mode == "named":
            return None, [_call(self.named or "", text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut short by max_tokens: no complete call to report
            return None, [_call(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]
        calls = []
        for body in _HERMES_CALL.findall(text):
            try:
                parsed = json.loads(body)
                name, arguments = parsed["name"], parsed.get("arguments", parsed.get("parameters", {}))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # not a well-formed call: left in the content
            calls.append(_call(str(name), arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)))
        if not calls:
            return text, []
        content = text[: text.index(HERMES_OPEN)]  # as streamed: content flows before a call starts
        return content or None, calls

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message and the finish reason of a whole choice."""
        content, calls = self.calls(text)
        if not calls:
            return {"role": "assistant", "content": content}, finish_reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, (
            "tool_calls" if finish_reason == "stop" else finish_reason)

    # ---- streaming ------------------------------------------------------------------------------------

    def delta(self, index: int, text: str) -> dict[str, Any] | None:
        """The delta to stream for a choice's new text (None: nothing to send yet)."""
        if self.mode == "named":
            if index not in self.call_ids:
                self.call_ids[index] = f"call_{uuid.uuid4().hex[:24]}"
                return {"tool_calls": [{"index": 0, "id": self.call_ids[index], "type": "function",
                                        "function": {"name": self.named, "arguments": text}}]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else None
        held = self.held.get(index, "") + text
        if self.mode == "required" or HERMES_OPEN in held:
            self.held[index] = held
            return None
        # auto: stream content, holding back a tail that may be the start of "<tool_call>"
        keep = next((k for k in range(min(len(held), len(HERMES_OPEN) - 1), 0, -1)
                     if HERMES_OPEN.startswith(held[-k:])), 0)
        self.held[index] = held[len(held) - keep:] if keep else ""
        out = held[: len(held) - keep]
        return {"content": out} if out else None

    def final_delta(self, index: int, finish_reason: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """What a choice still owes when it finishes (its held text or its calls) and its finish reason."""
        held = self.held.pop(index, "")
        if self.mode == "named":
            return None, "tool_calls" if finish_reason == "stop" else finish_reason
        if self.mode == "auto" and HERMES_OPEN not in held:
            return ({"content": held} if held else None), finish_reason
        content, calls = self.calls(held)
        if not calls:
            return ({"content": held} if held else None), finish_reason
        delta: dict[str, Any] = {"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]}
        if content and self.mode == "auto":
            delta["content"] = content
        return delta, "tool_calls" if finish_reason == "stop" else finish_reason
