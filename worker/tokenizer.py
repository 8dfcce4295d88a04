"""The model's tokenizer and chat template, from a Hugging Face tokenizer directory or GGUF metadata.

A thin layer over a transformers tokenizer: it fixes the set of end-of-sequence ids (config and
tokenizer together), validates chat messages before rendering, and always renders a chat template to
text first and encodes it without adding special tokens (the template already places them)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Callable

from .loader.source import ModelLoadError, ModelSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


log = logging.getLogger(__name__)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(self, hf: "PreTrainedTokenizerBase", eos_token_ids: list[int], bos_token_id: int | None) -> None:
        self.hf = hf
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.vocab_size = len(hf)

    @classmethod
    def from_source(cls, source: ModelSource, chat_template: str | None = None) -> "Tokenizer":
        """Load the tokenizer that belongs to `source`; raises ModelLoadError when there is none.
        `chat_template` (Jinja text, see read_chat_template) replaces the model's own template."""
        from transformers import AutoTokenizer

        try:
            if source.kind == "gguf":
                hf = _gguf_tokenizer(source.path)
            else:
                hf = AutoTokenizer.from_pretrained(str(source.path))
        except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is missing
            raise ModelLoadError(
                f"{source.path}: cannot load a tokenizer ({type(e).__name__}: {e}); a safetensors directory needs "
                "tokenizer.json (or the files of a slow tokenizer) and tokenizer_config.json"
            ) from None
        cfg = source.hf_config()
        eos: list[int] = []
        for value in (cfg.get("eos_token_id"), _generation_config_eos(source), hf.eos_token_id):
            for token_id in value if isinstance(value, (list, tuple)) else [value]:
                if token_id is not None and int(token_id) not in eos:
                    eos.append(int(token_id))
        bos = hf.bos_token_id if hf.bos_token_id is not None else cfg.get("bos_token_id")
        if chat_template is not None:
            hf.chat_template = chat_template
        return cls(hf, eos, bos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (with the tokenizer's BOS etc. when add_special_tokens)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        text = self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text if isinstance(text, str) else "".join(text)  # one flat id list gives one string

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template (instruct models do; base models often not)."""
        return bool(getattr(self.hf, "chat_template", None))

    def chat_prompt_text(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                         template_kwargs: dict[str, Any] | None = None) -> str:
        """Render chat messages with the model's template; raises ValueError for bad messages.
        continue_final_message: the last (assistant) message is left open for the model to continue
        (no generation prompt after it); tools and template_kwargs are passed to the template."""
        _validate_messages(messages)
        if not self.has_chat_template:
            raise ModelLoadError(
                "this model has no chat template; send a plain text prompt (completions) instead of chat messages"
            )
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message: cannot be combined with add_generation_prompt: set "
                             "add_generation_prompt to false to continue the last message")
        from jinja2 import TemplateError

        tool_list: list[dict[Any, Any] | Callable[..., Any]] | None = list(tools) if tools is not None else None
        try:
            text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                               continue_final_message=continue_final_message, tools=tool_list,
                                               **(template_kwargs or {}))
        except TemplateError as e:  # templates raise for e.g. roles that do not alternate
            raise ValueError(f"messages: rejected by the model's chat template: {e}") from None
        return text if isinstance(text, str) else str(text[0])

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat prompt; the template places special tokens, none are added."""
        return self.encode(self.chat_prompt_text(messages, add_generation_prompt), add_special_tokens=False)


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role: {role!r} is not one of {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string, got {type(content).__name__}")


def _generation_config_eos(source: ModelSource) -> Any:
    """eos_token_id of generation_config.json (Llama 3 lists several stop ids there), if any."""
    if source.kind != "safetensors":
        return None
    path = source.path / "generation_config.json"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None


def _gguf_tokenizer(path):
    """transformers' tokenizer built from GGUF metadata (seconds), saved once as tokenizer files in
    the GGUF's derived cache and loaded from there afterwards (a fraction of a second)."""
    from transformers import AutoTokenizer

    from shardline.worker.loader.gguf_source import derived_dir, write_derived

    saved = derived_dir(path)
    if (saved / "tokenizer_config.json").exists() and (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(saved))
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    write_derived(path, lambda d: hf.save_pretrained(str(d)))
    return hf


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(source: ModelSource, chat_template: str | None = None) -> Tokenizer | None:
    """The model's tokenizer, or None for a safetensors directory that ships none: such a model
    (random test checkpoints, benchmark configs) takes token ids and returns no text.
    `chat_template` (Jinja text) replaces the model's own template (vLLM's --chat-template)."""
    if source.kind == "safetensors" and not any((source.path / f).exists() for f in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files: token ids in, token ids out, no text", source.path)
        return None
    return Tokenizer.from_source(source, chat_template=chat_template)


def read_chat_template(value: str) -> str:
    """The text of a chat template given as a file path or as the Jinja text itself (vLLM's rule:
    an existing file is read; a value with Jinja markup is the template; anything else is a
    ConfigError, so that a mistyped path is never served as a template)."""
    from pathlib import Path

    from shardline.worker.config import ConfigError

    is_jinja = "{{" in value or "{%" in value
    try:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # template text too long (or with NUL) to be a path name lands here
        if not is_jinja:
            raise ConfigError(f"chat_template: cannot read {value!r}: {e}") from None
    if is_jinja:
        return value
    raise ConfigError(f"chat_template: {value!r} is neither a readable file nor a Jinja template")


def encode_prompt(tokenizer: Tokenizer | None, prompt: Any, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of any prompt form every front end accepts: text, a token-id list, or a dict with
    "messages" (rendered with the chat template), "prompt" or "prompt_token_ids". Raises
    RequestError naming the field, so that bad input is the caller's error, never a crash."""
    from shardline.worker.engine.params import RequestError

    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        elif "messages" not in prompt:
            raise RequestError("prompt", "a dict prompt needs 'messages', 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, (list, tuple)):
        # NOTE: no int() coercion: 1.9, True or "7" are the caller's mistake, not token ids.
        for position, token in enumerate(prompt):
            if not isinstance(token, int) or isinstance(token, bool):
                raise RequestError("prompt", f"token at position {position} must be an integer, got {token!r}")
        return list(prompt)
    if not isinstance(prompt, (str, dict)):
        raise RequestError("prompt", f"must be text, token ids or chat messages, got {type(prompt).__name__}")
    if tokenizer is None:
        raise RequestError("prompt", "this model has no tokenizer; send token ids")
    try:
        if isinstance(prompt, dict):
            return tokenizer.apply_chat_template(prompt["messages"])
        if add_special_tokens is None:
            return tokenizer.encode(prompt)
        return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    except RequestError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed messages, a template that refuses them
        field = "messages" if isinstance(prompt, dict) else "prompt"
        message = str(e)
        if message.startswith("messages"):
            field, _, message = message.partition(": ")
        raise RequestError(field, message) from None
