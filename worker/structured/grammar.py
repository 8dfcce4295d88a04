"""A StructuredOutput as an xgrammar Grammar: the one check of a constraint, shared by every front
end (through validation.validate_request) and the engine's compiler. Parsing is cheap (about a
millisecond for a small schema) and needs no tokenizer; compiling against the vocabulary is the
expensive part and runs later, off the engine thread (compiler.py)."""

from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING

from shardline.worker.engine.params import RequestError, StructuredOutput

if TYPE_CHECKING:
    import xgrammar

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# Bound on a constraint's text (a schema, a regex, a grammar, all choices together), in characters.
MAX_CONSTRAINT_CHARS = 65536
# xgrammar's messages start with "[hh:mm:ss] /project/cpp/file.cc:123: "; the rest is the reason.
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def field_name(constraint: StructuredOutput) -> str:
    """The name RequestErrors use for the constraint's value, e.g. structured_output.json_schema."""
    return f"structured_output.{constraint.kind}"


def validate_structured_output(constraint: object) -> None:
    """Raise RequestError (naming the field) unless `constraint` is a well-formed StructuredOutput
    whose schema / regex / grammar xgrammar accepts."""
    if not isinstance(constraint, StructuredOutput):
        raise RequestError("structured_output", f"must be a StructuredOutput, got {type(constraint).__name__}")
    if constraint.kind not in KINDS:
        raise RequestError("structured_output.kind", f"must be one of {', '.join(KINDS)}, got {constraint.kind!r}")
    if not isinstance(constraint.strict, bool):
        raise RequestError("structured_output.strict", f"must be true or false, got {constraint.strict!r}")
    name, value = field_name(constraint), constraint.value
    if constraint.kind == "json_object":
        if value is not None:
            raise RequestError(name, "takes no value")
    elif constraint.kind == "choice":
        if not isinstance(value, tuple) or not value:
            raise RequestError(name, f"must be a non-empty list of strings, got {value!r}")
        for index, choice in enumerate(value):
            if not isinstance(choice, str) or not choice:
                raise RequestError(name, f"choice[{index}] must be a non-empty string, got {choice!r}")
    elif not isinstance(value, str) or not value.strip():
        raise RequestError(name, f"must be a non-empty string, got {value!r}")
    size = sum(len(v) for v in value) if isinstance(value, tuple) else len(value or "")
    if size > MAX_CONSTRAINT_CHARS:
        raise RequestError(name, f"has {size} characters, the limit is {MAX_CONSTRAINT_CHARS}")
    parse_grammar(constraint)


def checked_as(constraint: StructuredOutput, field: str) -> StructuredOutput:
    """Validate a constraint a front end built from its own field (e.g. response_format.json_schema):
    the same checks, with errors naming that field. Returns the constraint."""
    try:
        validate_structured_output(constraint)
    except RequestError as e:
        raise RequestError(field, e.detail) from None
    return constraint


@functools.lru_cache(maxsize=256)
def parse_grammar(constraint: StructuredOutput) -> "xgrammar.Grammar":
    """The constraint's grammar (not yet compiled against a vocabulary). Cached by the constraint,
    so the validation at the edge and the engine's compile parse a schema once per process.
    Raises RequestError naming the field when xgrammar rejects it."""
    import xgrammar as xgr

    kind, value = constraint.kind, constraint.value
    try:
        if kind in ("json_object", "json_schema"):
            # NOTE: any_whitespace=False: one canonical spacing. With free whitespace, small models
            # (and any model at a high temperature) can emit whitespace until max_tokens runs out.
            schema = '{"type": "object"}' if kind == "json_object" else str(value)
            strict = constraint.strict and kind == "json_schema"
            return _no_control_characters(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict))
        if kind == "regex":
            return xgr.Grammar.from_regex(str(value))
        if kind == "choice":
            literals = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in value or ())
            return xgr.Grammar.from_ebnf(f"root ::= {literals}")
        return xgr.Grammar.from_ebnf(str(value))
    except RuntimeError as e:  # xgrammar reports every parse failure as RuntimeError
        reason = _XGRAMMAR_PREFIX.sub("", str(e).strip()).strip()
        raise RequestError(field_name(constraint), f"invalid {kind.replace('_', ' ')}: {reason}") from None


# xgrammar 0.2.9 writes the characters of a length-bounded JSON string as [^"\\\r\n], which lets
# raw control characters (U+0000-U+001F other than CR, LF) into the output; RFC 8259 forbids them
# unescaped and strict parsers (Python's json, pydantic) reject the document. Narrowed here.
_BOUNDED_STRING_CHARS = r'[^\"\\\r\n]'
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\]'


def _no_control_characters(grammar: "xgrammar.Grammar") -> "xgrammar.Grammar":
    import xgrammar as xgr

    ebnf = str(grammar)
    if _BOUNDED_STRING_CHARS not in ebnf:
        return grammar
    return xgr.Grammar.from_ebnf(ebnf.replace(_BOUNDED_STRING_CHARS, _JSON_STRING_CHARS))
