"""The OpenAI-compatible HTTP surface, as pure functions (the ingress does the I/O): a parsed body
(openai_protocol.py) to SamplingParams and prompts, the typed StreamItems of its choices to
OpenAI response objects and SSE chunks, and errors to OpenAI's
`{"error": {"message", "type", "param", "code"}}` shape.

Choice numbering: a completions request with P prompts and n choices has P * n choices; choice
`p * n + i` is choice i of prompt p (OpenAI's and vLLM's order)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from shardline.router.openai_protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from shardline.worker.engine.generation import StreamItem, Usage
from shardline.worker.engine.outputs import TokenLogprob
from shardline.worker.engine.params import RequestError, SamplingParams, StructuredOutput

# SamplingParams fields an OpenAI body sets under the same name (None in the body: unset).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
                   "skip_special_tokens", "n", "prompt_logprobs")

HTTP_STATUS = {"invalid_argument": 400, "unauthenticated": 401, "not_found": 404, "model_not_found": 404,
               "method_not_allowed": 405,
               "resource_exhausted": 429, "unavailable": 503, "deadline_exceeded": 504, "cancelled": 499,
               "internal": 500}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              405: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout",
              499: "cancelled", 500: "internal_error"}
OPENAI_FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "abort": "abort", "error": "error"}
SSE_DONE = "data: [DONE]\n\n"

Decode = Callable[[int], str]


def error_body(code: str, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI-shaped body of an error of canonical kind `code`."""
    status = HTTP_STATUS.get(code, 500)
    return status, {"error": {"message": message, "type": ERROR_TYPE.get(status, "internal_error"),
                              "param": param or None, "code": code}}


def sampling_params(req: SamplingFields, chat: bool, defaults: dict[str, Any]) -> SamplingParams:
    """The request's SamplingParams: fields it sets, else the model's generation_config defaults,
    else SamplingParams' own. max_tokens (or max_completion_tokens) unset or null: the rest of the
    context for chat, OpenAI's 16 for completions. Type errors are the models'; ranges are checked
    later by the one validator."""
    values: dict[str, Any] = dict(defaults)
    values.update({name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None})
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    values["max_tokens"] = max_tokens if max_tokens is not None else (None if chat else 16)
    if req.stop is not None:
        values["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise RequestError("best_of", f"best_of ({req.best_of}) must equal n ({req.n or 1}): shardline returns "
                           "every choice it generates and does not rank hidden ones")
    if req.logit_bias:
        bias: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise RequestError("logit_bias", f"keys must be token ids, got {key!r}") from None
        values["logit_bias"] = bias
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            values["logprobs"] = req.top_logprobs or 0
        elif req.top_logprobs:
            raise RequestError("top_logprobs", "needs logprobs: true")
    elif isinstance(req, CompletionRequest) and req.logprobs is not None:
        values["logprobs"] = req.logprobs
        if req.echo:  # the echoed prompt's tokens get logprobs too (the first one null)
            values["prompt_logprobs"] = max(req.logprobs, req.prompt_logprobs or 0)
    if req.prompt_logprobs is not None and req.stream:
        raise RequestError("prompt_logprobs", "is not available when streaming (vLLM's rule); "
                           "completions' echo with logprobs streams the prompt's logprobs")
    values["structured_output"] = structured_output(req)
    return SamplingParams(**values)


def structured_output(req: SamplingFields) -> StructuredOutput | None:
    """The one output constraint of a body: OpenAI's response_format, vLLM's structured_outputs
    extra, or vLLM's older guided_* fields. Checked here (the schema, regex or grammar parsed),
    so an error names the body's own field; more than one constraint is an error."""
    from shardline.worker.structured.grammar import checked_as

    found: list[tuple[str, StructuredOutput]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", StructuredOutput("json_object")))
    elif fmt is not None and fmt.type == "json_schema":
        spec = fmt.json_schema
        if spec is None or spec.schema_ is None:
            raise RequestError("response_format.json_schema", 'type "json_schema" needs json_schema.schema')
        found.append(("response_format.json_schema.schema",
                      StructuredOutput("json_schema", json.dumps(spec.schema_), strict=bool(spec.strict))))
    so = req.structured_outputs
    named = [("json", so.json_ if so else None, req.guided_json), ("regex", so.regex if so else None, req.guided_regex),
             ("choice", so.choice if so else None, req.guided_choice),
             ("grammar", so.grammar if so else None, req.guided_grammar)]
    for name, value, guided in named:
        for field_name, v in ((f"structured_outputs.{name}", value), (f"guided_{name}", guided)):
            if v is None:
                continue
            if name == "json":
                found.append((field_name, StructuredOutput("json_schema", v if isinstance(v, str) else json.dumps(v))))
            elif name == "choice":
                found.append((field_name, StructuredOutput("choice", tuple(v))))
            else:
                found.append((field_name, StructuredOutput(name, v)))  # type: ignore[arg-type]
    if so is not None and so.json_object:
        found.append(("structured_outputs.json_object", StructuredOutput("json_object")))
    if len(found) > 1:
        raise RequestError(found[1][0], f"only one output constraint per request; {found[0][0]} is already set")
    return checked_as(found[0][1], found[0][0]) if found else None


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions body (a batch is a list of strings or of token-id lists); also
    the body checks that only completions has (suffix, echo with logprobs)."""
    if req.suffix:
        raise RequestError("suffix", "fill-in-the-middle (suffix) is not supported")
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt", "must not be empty")
    if isinstance(prompt[0], (str, list)):
        return list(prompt)
    return [list(prompt)]


def total_usage(final: dict[int, Usage], n: int) -> dict[str, Any]:
    """OpenAI usage over all choices: each prompt counted once (its choice 0), completions summed."""
    prompt = sum(u.prompt_tokens for i, u in final.items() if i % n == 0)
    cached = sum(u.cached_tokens for i, u in final.items() if i % n == 0)
    completion = sum(u.completion_tokens for u in final.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_logprobs(entries: list[TokenLogprob], decode: Decode) -> dict[str, Any]:
    """Chat's `logprobs` object: one entry per token with its top alternatives."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = decode(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [dict(one(e.token_id, e.logprob),
                             top_logprobs=[one(k, v) for k, v in e.top.items()]) for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], decode: Decode, offset: int,
                        prompt: tuple[list[int], list[TokenLogprob | None]] | None = None) -> dict[str, Any]:
    """Completions' `logprobs` object; text_offset counts characters from the start of the
    choice's text as the decoded tokens add up. `prompt` (echo with logprobs): the prompt's token
    ids and their prompt logprobs, listed first from offset 0 (the first token's logprob and top
    are null, as OpenAI and vLLM send them); `offset` is then where the generated text starts."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if prompt is not None:
        position = 0
        for token_id, entry in zip(*prompt):
            text = decode(token_id)
            tokens.append(text)
            token_logprobs.append(entry.logprob if entry is not None else None)
            top_logprobs.append({decode(k): v for k, v in entry.top.items()} if entry is not None else None)
            offsets.append(position)
            position += len(text)
    for e in entries:
        text = decode(e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top_logprobs.append({decode(k): v for k, v in e.top.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def vllm_prompt_logprobs(token_ids: list[int], entries: list[TokenLogprob | None],
                         decode: Decode) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {"logprob",
    "decoded_token"}} holding the prompt token and its top-n alternatives."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for token_id, entry in zip(token_ids, entries):
        if entry is None:
            out.append(None)
            continue
        ranked = {entry.token_id: entry.logprob, **entry.top}
        out.append({str(k): {"logprob": v, "decoded_token": decode(k)} for k, v in ranked.items()})
    return out


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    prefix: str = ""  # the echoed prompt (completions with echo)
    echo: bool = False  # completions with echo (the prompt may decode to "")
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    offset: int = 0  # characters of logprob tokens so far (text_offset of the next one)
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # from the choice's first item, when asked

    def add(self, item: StreamItem) -> None:
        if item.prompt_logprobs is not None:
            self.prompt_logprobs = item.prompt_logprobs
        self.text.append(item.text)
        self.logprobs.extend(item.logprobs or [])
        self.usage = item.usage
        if item.finish_reason is not None:
            self.finish_reason = OPENAI_FINISH.get(item.finish_reason, item.finish_reason)


class ResponseBuilder:
    """Collects the choices of one request and renders OpenAI's whole response or its SSE chunks."""

    def __init__(self, rid: str, model: str, chat: bool, n: int, num_choices: int, decode: Decode,
                 want_logprobs: bool, echo: list[str] | None = None, prompt_token_ids: list[list[int]] | None = None,
                 want_prompt_logprobs: bool = False) -> None:
        """`prompt_token_ids`: each prompt's tokens (for prompt logprobs); `want_prompt_logprobs`:
        the body set vLLM's prompt_logprobs (the response then carries that field)."""
        self.rid, self.model, self.chat, self.n, self.decode = rid, model, chat, n, decode
        self.created = int(time.time())
        self.want_logprobs = want_logprobs
        self.want_prompt_logprobs = want_prompt_logprobs
        self.choices = [Choice(i) for i in range(num_choices)]
        self.tools: Any = None  # a tool_calls.ToolPlan when the chat request has tools
        for i, choice in enumerate(self.choices):
            if prompt_token_ids is not None:
                choice.prompt_token_ids = prompt_token_ids[i // n]
            if echo is not None:
                choice.echo = True
                choice.prefix = echo[i // n]
                choice.offset = len(choice.prefix)

    def _echoed_prompt(self, c: Choice) -> tuple[list[int], list[TokenLogprob | None]] | None:
        """The echoed prompt's tokens and logprobs of a completions choice with echo and logprobs."""
        if self.chat or not c.echo or not self.want_logprobs or c.prompt_logprobs is None:
            return None
        return c.prompt_token_ids, c.prompt_logprobs

    def _prompt_logprobs_field(self, c: Choice) -> list[Any] | None:
        if c.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(c.prompt_token_ids, c.prompt_logprobs, self.decode)

    def usage(self) -> dict[str, Any]:
        return total_usage({c.index: c.usage for c in self.choices if c.usage is not None}, self.n)

    def response(self) -> dict[str, Any]:
        """The non-streaming response object (after every item went through `add`)."""
        out = []
        for c in self.choices:
            text = "".join(c.text)
            if self.chat:
                message, finish = ({"role": "assistant", "content": text}, c.finish_reason) if self.tools is None \
                    else self.tools.message(text, c.finish_reason)
                out.append({"index": c.index, "message": message, "finish_reason": finish,
                            "logprobs": chat_logprobs(c.logprobs, self.decode) if self.want_logprobs else None})
            else:
                lps = (completion_logprobs(c.logprobs, self.decode, len(c.prefix), self._echoed_prompt(c))
                       if self.want_logprobs else None)
                out.append({"index": c.index, "text": c.prefix + text, "finish_reason": c.finish_reason,
                            "logprobs": lps})
                if self.want_prompt_logprobs:
                    out[-1]["prompt_logprobs"] = self._prompt_logprobs_field(c)
        body: dict[str, Any] = {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                                "created": self.created, "model": self.model, "choices": out, "usage": self.usage()}
        if self.chat and self.want_prompt_logprobs:  # vLLM puts chat's beside the choices (one prompt)
            body["prompt_logprobs"] = self._prompt_logprobs_field(self.choices[0])
        return body

    def add(self, index: int, item: StreamItem) -> None:
        self.choices[index].add(item)

    # ---- streaming --------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def opening_chunks(self, continuous_usage: bool) -> list[str]:
        """Chat: the role header of each choice; completions with echo: each echoed prompt."""
        usage = self.usage() if continuous_usage else None
        if self.chat:
            return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}], usage) for c in self.choices]
        if self.want_logprobs:
            return []  # each echo goes out with its prompt's logprobs, when its first item brings them
        return [self._chunk([{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}], usage)
                for c in self.choices if c.prefix]

    def item_chunks(self, index: int, item: StreamItem, continuous_usage: bool) -> list[str]:
        """The chunks of one item after `add`: its content (with logprobs when asked), then, on the
        choice's last item, a chunk with an empty delta and the finish reason."""
        c = self.choices[index]
        usage = self.usage() if continuous_usage else None
        chunks = []
        echoed = self._echoed_prompt(c) if item.prompt_logprobs is not None else None
        if echoed is not None:  # completions, echo with logprobs: the prompt first, with its logprobs
            chunks.append(self._chunk([{"index": index, "text": c.prefix, "finish_reason": None,
                                        "logprobs": completion_logprobs([], self.decode, 0, echoed)}], usage))
        if item.text or item.token_ids:
            entries = item.logprobs or []
            if self.chat:
                lps = chat_logprobs(entries, self.decode) if self.want_logprobs else None
                delta = {"content": item.text} if self.tools is None else self.tools.delta(index, item.text)
                if delta is not None:
                    chunks.append(self._chunk([{"index": index, "delta": delta, "logprobs": lps,
                                                "finish_reason": None}], usage))
            else:
                lps = completion_logprobs(entries, self.decode, c.offset) if self.want_logprobs else None
                if lps is not None and lps["tokens"]:
                    c.offset = lps["text_offset"][-1] + len(lps["tokens"][-1])
                chunks.append(self._chunk([{"index": index, "text": item.text, "logprobs": lps,
                                            "finish_reason": None}], usage))
        if item.finish_reason is not None:
            finish = c.finish_reason
            if self.chat and self.tools is not None:
                owed, finish = self.tools.final_delta(index, finish)
                if owed is not None:
                    chunks.append(self._chunk([{"index": index, "delta": owed, "logprobs": None,
                                                "finish_reason": None}], usage))
            empty: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
            chunks.append(self._chunk([{"index": index, **empty, "logprobs": None,
                                        "finish_reason": finish}], usage))
        return chunks

    def usage_chunk(self) -> str:
        """The last chunk before [DONE] when stream_options.include_usage: no choices, the usage."""
        return self._chunk([], self.usage())
