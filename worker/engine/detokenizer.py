"""Incremental detokenization: turn each step's new token ids into a text delta that never splits a
UTF-8 character and never shows a stop string, or part of one, that the request asked to cut.

Each step decodes only a short window of tokens, tokens[prefix_offset:], and keeps the part beyond
the text of tokens[prefix_offset:read_offset] (as vLLM and TGI do). Decoding a window rather than
single tokens keeps tokenizer-specific joins (leading spaces, byte-level merges) right; the window
only grows while the decoded text ends in U+FFFD, i.e. while a character's bytes are still arriving.
"""

from __future__ import annotations

from typing import Any

from .params import SamplingParams

# Prompt tokens decoded before the first output token, so the first delta joins the prompt the way
# a full decode would (e.g. a leading space that depends on the previous token).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """One request's detokenizer. `tokenizer` needs only `.hf` (a transformers tokenizer, unused here
    but part of the interface) and `.decode(ids, skip_special_tokens)`."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = [s for s in params.stop if s]
        self.include_stop = params.include_stop_str_in_output
        # Characters held back so a stop string split across steps is never emitted in part.
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = list(prompt_token_ids)
        self.prefix_offset = max(len(self.token_ids) - _PROMPT_CONTEXT_TOKENS, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""  # all output text decoded so far (emitted or held back)
        self.emitted = 0  # characters of `text` already emitted
        self.stopped: str | None = None

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        return self.text[: self.emitted]

    def step(self, new_token_ids: list[int], check_stop: bool = True) -> tuple[str, str | None]:
        """Add a step's tokens; return (text to emit now, the stop string that matched or None).
        After a match the text is cut at the stop string (kept only with include_stop_str_in_output)
        and later calls emit nothing. check_stop=False (before min_tokens) never matches."""
        if self.stopped is not None:
            return "", None
        self.token_ids.extend(new_token_ids)
        start = max(len(self.text) - self.hold_back, 0)  # a match may begin in the held-back tail
        self.text += self._decode_new()

        match = self._find_stop(start) if check_stop else None
        if match is not None:
            index, stop = match
            self.stopped = stop
            self.text = self.text[: index + len(stop) if self.include_stop else index]
            return self._emit(len(self.text)), stop
        return self._emit(len(self.text) - self.hold_back), None

    def flush(self) -> str:
        """Everything held back, for a request that finishes without a stop string: the stop-string
        tail and any trailing bytes that never completed a character (decoded as U+FFFD)."""
        if self.stopped is None and self.read_offset < len(self.token_ids):
            self.text += self._decode_new(allow_partial=True)
        return self._emit(len(self.text))

    def _decode_new(self, allow_partial: bool = False) -> str:
        """Text of the tokens past read_offset, or "" while they end inside a character."""
        window = self.token_ids[self.prefix_offset :]
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(window)
        if len(new_text) <= len(prefix_text) and not allow_partial:
            return ""  # e.g. a skipped special token, or bytes that do not yet make a character
        if new_text.endswith(_REPLACEMENT_CHAR) and not allow_partial:
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """The earliest stop string occurrence that ends in the newly decoded text."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
