"""Logging set-up for every shardline process: one JSON object per line for log collectors in the
cluster, or readable text for a terminal, with request fields passed through `extra=`.

Prompts and generated text are user data: they are dropped from every record unless the
operator turns on `log_prompts`.
"""

from __future__ import annotations

import datetime as _dt
import json as _json
import logging
import sys
from typing import Any, TextIO

# Fields of this name in `extra=` carry user text; they are logged only with log_prompts.
PROMPT_FIELDS = frozenset({"prompt", "prompt_token_ids", "messages", "text", "completion"})

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

_HANDLER_MARK = "_shardline_handler"

# A logged value (a message, an `extra=` field) may come from a client: a request id, a role, a
# model name. It is cut to this many characters and its control characters are escaped, so one
# request can neither forge log lines (a newline) nor grow the logs by megabytes.
MAX_VALUE_CHARS = 512
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
_CONTROL_ESCAPES |= {0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\x85"}


def escape_log_value(value: Any, max_chars: int = MAX_VALUE_CHARS) -> str:
    """`value` as one bounded line: cut to max_chars (saying how long it was), control characters escaped."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > max_chars:
        text = f"{text[:max_chars]}...({len(text)} chars)"
    return text.translate(_CONTROL_ESCAPES)


def _bounded(value: Any) -> Any:
    """A JSON-ready extra value: numbers, booleans and None as they are, anything else bounded."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else f"{text[:MAX_VALUE_CHARS]}...({len(text)} chars)"


def record_extras(record: logging.LogRecord, log_prompts: bool) -> dict[str, Any]:
    """The `extra=` fields of a record, without prompt fields unless log_prompts is set."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRS and not key.startswith("_")
        and (log_prompts or key not in PROMPT_FIELDS)
    }


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg, then its `extra=` fields
    (request_id, replica_group, finish_reason, prompt_tokens, completion_tokens, ...)."""

    def __init__(self, log_prompts: bool = False) -> None:
        super().__init__()
        self.log_prompts = log_prompts

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": _bounded(record.getMessage()),
        }
        for key, value in record_extras(record, self.log_prompts).items():
            entry.setdefault(key, _bounded(value))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd value (a Path, an enum) must never cost the log line.
        return _json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Formats a record for a terminal: time, level, logger, message, then key=value extras."""

    def __init__(self, log_prompts: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.log_prompts = log_prompts

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_log_value(record.message)  # one line, bounded (a traceback follows it as usual)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = record_extras(record, self.log_prompts)
        if extras:
            line += " " + " ".join(f"{key}={escape_log_value(value)}" for key, value in extras.items())
        return line


class _StaticFields(logging.Filter):
    """Stamps fields that hold for the whole process (e.g. replica_group) on every record."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def configure_logging(json: bool, level: str = "INFO", log_prompts: bool = False,
                      stream: TextIO | None = None, static_fields: dict[str, Any] | None = None) -> logging.Logger:
    """Send the `shardline` loggers to `stream` (stderr by default) as JSON lines or text;
    `static_fields` (e.g. {"replica_group": ...}) are added to every record.

    Calling it again replaces the handler it installed before; other handlers (Ray's) are left alone.
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else None
    if not isinstance(numeric, int):
        raise ValueError(f"level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {level!r}")
    logger = logging.getLogger("shardline")
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter(log_prompts) if json else TextFormatter(log_prompts))
    if static_fields:
        handler.addFilter(_StaticFields(dict(static_fields)))
    logger.addHandler(handler)
    logger.setLevel(numeric)
    # Our handler writes the record; passing it on to the root would print it twice.
    logger.propagate = False
    return logger
