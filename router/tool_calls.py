"""Tool calling on the OpenAI chat route: `tools`, `tool_choice` and `parallel_tool_calls` become an
output constraint (for "required" and a named function) and a plan for turning the generated text
into OpenAI `tool_calls`, whole or as streamed deltas.

- `tool_choice: {"type": "function", "function": {"name": F}}`: the output is constrained to F's
  `parameters` schema, so the whole text is F's arguments (vLLM's convention); streamed, each text
  delta is an `arguments` delta of call 0, the first one carrying its id and name.
- `tool_choice: "required"`: the output is constrained to a JSON array (one element unless
  parallel_tool_calls) of `{"name": <one of the tools>, "parameters": <that tool's schema>}`.
- `"auto"` (the default with tools, as in vLLM): the model decides; its text is parsed by the
  server's tool-call parser (router/tool_parsers.py: `hermes` or `llama3_json`, vLLM's
  `--tool-call-parser`). It needs `--enable-auto-tool-choice` (vLLM's rule: a 400 naming the flag
  otherwise). Content before the first call is the message's content.
- `"none"`: no parsing, no constraint.

Streamed ("required" and "auto"), each call is sent as OpenAI sends it: a first delta with its
index, id, type, the function's name and empty arguments as soon as the name is complete, then
`arguments` fragments as the model writes them; the fragments concatenate to the non-streamed
call's arguments (both are the raw JSON the model wrote). Content streams until a call starts.

The arguments of every constrained call parse and validate against the function's schema, because
the grammar allowed nothing else."""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, TypeAdapter, ValidationError

from shardline.router.openai_protocol import validation_error
from shardline.router.tool_parsers import HermesToolParser, ToolCallParser, complete_call, scan_calls
from shardline.worker.engine.params import RequestError, SamplingParams, StructuredOutput

AUTO_NEEDS_FLAG = ('"auto" tool choice requires --enable-auto-tool-choice (and a tool-call parser: '
                   '--tool-call-parser, or the one the chat template implies) to be set')

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


def plan(req: Any, params: SamplingParams, parser: ToolCallParser | None = None,
         auto_tool_choice: bool = True) -> "tuple[ToolPlan | None, SamplingParams]":
    """The chat request's ToolPlan and its SamplingParams with the tool constraint (checked, errors
    naming `tool_choice`); a tool constraint beside a response_format is an error. `parser` reads
    "auto" calls (Hermes when None); `auto_tool_choice` is the server's --enable-auto-tool-choice."""
    from shardline.worker.structured.grammar import checked_as

    tool_plan, constraint = ToolPlan.from_request(req.tools, req.tool_choice, req.parallel_tool_calls)
    if tool_plan is not None and tool_plan.mode == "auto":
        if not auto_tool_choice:
            raise RequestError("tool_choice", AUTO_NEEDS_FLAG)
        tool_plan.parser = parser or HermesToolParser()
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
    parser: ToolCallParser = field(default_factory=HermesToolParser)  # reads "auto" calls
    call_ids: dict[int, str] = field(default_factory=dict)  # choice index -> the streamed call's id (named)
    streams: dict[int, "_CallStream"] = field(default_factory=dict)  # choice index -> its stream (auto, required)

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
            raise validation_error(e, ("tools",)) from None
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
                json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut short by max_tokens: no complete call to report
            found = [complete_call(text, c) for c in scan_calls(text, 0, call_depth=1)]
            return None, [_call(name, arguments) for name, arguments in (f for f in found if f is not None)]
        content, calls = self.parser.parse(text)
        return content, [_call(name, arguments) for name, arguments in calls]

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
        stream = self.streams.setdefault(index, _CallStream(self.mode == "required", self.parser))
        return stream.advance(text)

    def final_delta(self, index: int, finish_reason: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """What a choice still owes when it finishes (held content, the rest of its calls) and its
        finish reason ("tool_calls" when it called any and stopped by itself)."""
        if self.mode == "named":
            return None, "tool_calls" if finish_reason == "stop" else finish_reason
        stream = self.streams.pop(index, None) or _CallStream(self.mode == "required", self.parser)
        owed = stream.finish()
        return owed, "tool_calls" if stream.num_calls and finish_reason == "stop" else finish_reason


@dataclass
class _CallStream:
    """One streamed choice of an "auto" or "required" request: content until the calls start, then
    each call's header once its name is complete and its arguments as fragments."""

    required: bool
    parser: ToolCallParser
    text: str = ""
    content_sent: int = 0  # characters of text sent as content
    calls_start: int | None = None  # where the calls begin, once known
    ids: list[str] = field(default_factory=list)  # the announced calls' ids
    arguments_sent: list[int] = field(default_factory=list)  # characters of each call's arguments sent

    @property
    def num_calls(self) -> int:
        return len(self.ids)

    def advance(self, text: str, final: bool = False) -> dict[str, Any] | None:
        self.text += text
        delta: dict[str, Any] = {}
        if self.calls_start is None:
            self.calls_start = 0 if self.required else self.parser.calls_start(self.text)
        if self.calls_start is None:  # content only so far; hold a tail that may start a call
            keep = 0 if final else self.parser.held_back(self.text)
            end = len(self.text) - keep
        else:
            end = self.calls_start
        if end > self.content_sent:
            delta["content"] = self.text[self.content_sent:end]
            self.content_sent = end
        if self.calls_start is not None:
            calls = self._call_deltas()
            if calls:
                delta["tool_calls"] = calls
        return delta or None

    def _call_deltas(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        assert self.calls_start is not None
        for i, call in enumerate(scan_calls(self.text, self.calls_start, call_depth=1 if self.required else 0)):
            if call.name is None:
                break  # later calls cannot be announced before this one
            if i == len(self.ids):
                self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self.arguments_sent.append(0)
                out.append({"index": i, "id": self.ids[i], "type": "function",
                            "function": {"name": call.name, "arguments": ""}})
            arguments = call.streamable_arguments(self.text)
            if len(arguments) > self.arguments_sent[i]:
                out.append({"index": i, "function": {"arguments": arguments[self.arguments_sent[i]:]}})
                self.arguments_sent[i] = len(arguments)
        return out

    def finish(self) -> dict[str, Any] | None:
        """The choice ended: send the held tail (content when no call started)."""
        return self.advance("", final=True)
