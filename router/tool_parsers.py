"""Tool-call parsers: where a model's text holds tool calls, and a scanner that finds each call's
name and the raw text of its arguments while the text is still growing, so that streamed
`arguments` deltas concatenate to exactly the non-streamed `arguments` (both are the substring the
model wrote, as OpenAI sends them).

Parsers (vLLM's `--tool-call-parser` names):
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them after
  optional content (Qwen2.5 / Qwen3 / Hermes / SmolLM2-style templates).
- `llama3_json`: Llama 3.x's JSON calls, `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`, several separated by `;`. The text is a call only when it starts with one of
  those (whitespace aside); otherwise it is all content, as in vLLM's parser.

Both accept either key for the arguments ("arguments" or "parameters")."""

from __future__ import annotations

import json
from dataclasses import dataclass

_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ScannedCall:
    """One call object found in the text. `name`: None until its string is complete.
    `arguments_start`: offset of the arguments value's first character (None until it starts);
    `arguments_end`: one past its last (None until it is complete); `end`: one past the object's
    closing brace (None while it is open)."""

    start: int
    name: str | None = None
    arguments_start: int | None = None
    arguments_end: int | None = None
    end: int | None = None

    def arguments(self, text: str) -> str | None:
        """The arguments as OpenAI sends them: the raw JSON the model wrote (a string value is
        decoded, since some models write the arguments as a JSON string). None until complete."""
        if self.arguments_start is None or self.arguments_end is None:
            return None
        raw = text[self.arguments_start:self.arguments_end]
        if raw.startswith('"'):
            try:
                decoded = json.loads(raw)
            except json.JSONDecodeError:
                return raw
            return decoded if isinstance(decoded, str) else raw
        return raw

    def streamable_arguments(self, text: str) -> str:
        """The arguments' raw text so far, as far as it can be sent before it is complete ("" for a
        string value, which is sent decoded once complete)."""
        if self.arguments_start is None:
            return ""
        if self.arguments_end is not None:
            return self.arguments(text) or ""
        if text[self.arguments_start] == '"':
            return ""
        return text[self.arguments_start:]


def scan_calls(text: str, start: int = 0, call_depth: int = 0) -> list[ScannedCall]:
    """The call objects in text[start:]: JSON objects opened at nesting depth `call_depth` (0: calls
    side by side, as Hermes' and Llama's; 1: the elements of one array, as a `required` call list).
    Characters outside objects (tags, separators, whitespace) are skipped. An unfinished call is
    reported with what is known so far."""
    calls: list[ScannedCall] = []
    depth = 0
    in_string = escaped = False
    string_start = 0
    call: ScannedCall | None = None
    key: str | None = None  # the current key at the call object's top level
    expect_key = False  # at the call object's top level, the next string is a key
    value_depth: int | None = None  # depth at which the arguments value is open (object or array)
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if call is not None and depth == call_depth + 1:
                    literal = text[string_start:i + 1]
                    if expect_key:
                        key = _decoded(literal)
                        expect_key = False
                    elif key == "name" and call.name is None:
                        call.name = _decoded(literal)
                    elif key in _ARGUMENT_KEYS and call.arguments_start == string_start:
                        call.arguments_end = i + 1
            continue
        if ch == '"':
            in_string = True
            string_start = i
            if call is not None and depth == call_depth + 1 and not expect_key and key in _ARGUMENT_KEYS \
                    and call.arguments_start is None:
                call.arguments_start = i
            continue
        if ch in "{[":
            if ch == "{" and depth == call_depth:
                call = ScannedCall(start=i)
                calls.append(call)
                key, expect_key = None, True
            elif call is not None and depth == call_depth + 1 and key in _ARGUMENT_KEYS and call.arguments_start is None:
                call.arguments_start = i
                value_depth = depth + 1
            depth += 1
        elif ch in "}]":
            depth -= 1
            if call is not None and value_depth is not None and depth == value_depth - 1:
                call.arguments_end = i + 1
                value_depth = None
            if call is not None and depth == call_depth:
                if call.arguments_start is not None and call.arguments_end is None:
                    call.arguments_end = len(text[:i].rstrip())  # a number or literal value ended
                call.end = i + 1
                call = None
            if depth < 0:
                depth = 0  # a stray closer outside any call: not JSON we track
        elif call is not None and depth == call_depth + 1:
            if ch == ",":
                if key in _ARGUMENT_KEYS and call.arguments_start is not None and call.arguments_end is None:
                    call.arguments_end = len(text[:i].rstrip())  # a number or literal value ended
                key, expect_key = None, True
            elif not ch.isspace() and ch != ":" and key in _ARGUMENT_KEYS and call.arguments_start is None:
                call.arguments_start = i  # a number, true, false or null
    return calls


def _decoded(literal: str) -> str | None:
    try:
        value = json.loads(literal)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def complete_call(text: str, call: ScannedCall) -> tuple[str, str] | None:
    """(name, arguments) of a finished, well-formed call object; None otherwise."""
    if call.end is None or call.name is None:
        return None
    try:
        parsed = json.loads(text[call.start:call.end])
    except json.JSONDecodeError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        return None
    arguments = call.arguments(text)
    return call.name, arguments if arguments is not None else "{}"


class ToolCallParser:
    """Where a model family's text holds its tool calls (subclasses name the format)."""

    name = ""

    def calls_start(self, text: str) -> int | None:
        """Offset where the calls begin (content is text before it); None when the text (so far)
        holds no call."""
        raise NotImplementedError

    def undecided(self, text: str) -> bool:
        """Whether text so far could still turn into a call start, so its tail must not be streamed
        as content yet. `held_back` says how much of it to hold."""
        return self.held_back(text) > 0

    def held_back(self, text: str) -> int:
        """How many characters at the end of `text` (which holds no call start) may still become one."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """Content and (name, arguments) calls of a whole text; text that holds no well-formed
        call is all content."""
        start = self.calls_start(text)
        if start is None:
            return text, []
        calls = [c for c in (complete_call(text, s) for s in scan_calls(text, start)) if c is not None]
        if not calls:
            return text, []
        return text[:start] or None, calls


class HermesToolParser(ToolCallParser):
    name = "hermes"
    OPEN = "<tool_call>"

    def calls_start(self, text: str) -> int | None:
        i = text.find(self.OPEN)
        return None if i < 0 else i

    def held_back(self, text: str) -> int:
        return next((k for k in range(min(len(text), len(self.OPEN) - 1), 0, -1) if self.OPEN.startswith(text[-k:])), 0)


class Llama3JsonToolParser(ToolCallParser):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def calls_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith(self.PYTHON_TAG) or stripped.startswith("{"):
            return 0  # the whole text is calls: no content, not even the leading whitespace
        return None

    def held_back(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or self.PYTHON_TAG.startswith(stripped):
            return len(text)  # nothing but whitespace or the start of the tag yet: undecided
        return 0

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        content, calls = super().parse(text)
        return (None, calls) if calls else (content, calls)


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}


def parser_for_template(chat_template: str | None) -> str:
    """The parser a chat template implies when --tool-call-parser is not given: `llama3_json` for
    Llama 3.x templates (they mention `<|python_tag|>` or ask for `"parameters"` JSON), `hermes`
    otherwise (the `<tool_call>` format of Qwen, Hermes and SmolLM2-style templates, and the
    format shardline's own tool prompt asks for)."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return HermesToolParser.name
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return Llama3JsonToolParser.name
    return HermesToolParser.name


def make_parser(name: str) -> ToolCallParser:
    """The parser called `name` (a ValueError listing the known ones otherwise)."""
    try:
        return TOOL_CALL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(TOOL_CALL_PARSERS)}") from None
