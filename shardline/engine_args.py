"""Engine flags generated from EngineConfig's fields, as vLLM's EngineArgs does: one flag per field
(`--max-num-seqs` for max_num_seqs), its type, default, choices and help taken from the field
(worker/config.py `knob`). `generate`, `bench` and `serve` all register them here, so a new engine
field is a flag everywhere at once and the three commands cannot drift apart.

Also here: the vLLM flags that shardline does not implement. Each one is registered so that using it
stops with an error naming it ("--quantization: not supported by shardline: ..."), never a silent
no-op and never argparse's generic "unrecognized arguments"."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any, NoReturn

from shardline.worker.config import EngineConfig, speculative_fields_from_json

# vLLM flags shardline does not implement, and why (the error says it). Spellings as `vllm serve
# --help` prints them (vLLM 0.11); a short alias maps to the same message.
UNSUPPORTED_VLLM_FLAGS: dict[str, str] = {
    "--enable-lora": "LoRA adapters are not implemented",
    "--lora-modules": "LoRA adapters are not implemented",
    "--max-loras": "LoRA adapters are not implemented",
    "--max-lora-rank": "LoRA adapters are not implemented",
    "--pipeline-parallel-size": "only tensor parallelism is implemented; scale out with replica groups (--replicas)",
    "-pp": "only tensor parallelism is implemented; scale out with replica groups (--replicas)",
    "--data-parallel-size": "data parallelism is replica groups here: use --replicas or the config's autoscaling",
    "-dp": "data parallelism is replica groups here: use --replicas or the config's autoscaling",
    "--enable-expert-parallel": "mixture-of-experts models are not supported",
    "--cpu-offload-gb": "weights stay on the engine's device",
    "--swap-space": "preempted requests are recomputed, never swapped to host memory",
    "--tokenizer": "the tokenizer is always the model's own (directory or GGUF metadata)",
    "--tokenizer-mode": "the tokenizer is always the model's own (directory or GGUF metadata)",
    "--revision": "pass a local directory or a cached Hugging Face id; revisions are not fetched",
    "--download-dir": "models are cached in ~/.cache/shardline",
    "--hf-overrides": "the model's config.json is used as it is",
    "--rope-scaling": "rope scaling is read from the model's config.json",
    "--reasoning-parser": "reasoning parsers are not implemented",
    "--structured-outputs-config": "structured outputs always use xgrammar (docs/structured-outputs.md)",
    "--guided-decoding-backend": "structured outputs always use xgrammar (docs/structured-outputs.md)",
    "--limit-mm-per-prompt": "multimodal models are not supported",
}

# vLLM flags accepted because shardline already behaves as they ask; a note is printed when used.
VLLM_FLAGS_WITHOUT_EFFECT: dict[str, str] = {
    "--trust-remote-code": "shardline never runs code from a checkpoint; its own model classes cover every "
                           "supported architecture",
    "--disable-log-requests": "prompts are never logged unless --log-prompts is given",
}


def add_engine_args(parser: argparse.ArgumentParser, *, overrides_only: bool = False,
                    title: str = "engine") -> None:
    """Register one flag per EngineConfig field in an argument group named `title`.

    With `overrides_only` a flag that is not given leaves no attribute on the namespace (argparse's
    SUPPRESS), so that `serve` applies only what the user typed on top of a config file; otherwise
    every attribute holds the field's default."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        default = _field_default(f)
        names = (f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", ()))
        shown = "" if default is None else f" (default: {json.dumps(default) if isinstance(default, dict) else default})"
        help_text = f"{f.metadata['help']}{shown}".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text,
                                  "default": argparse.SUPPRESS if overrides_only else default}
        value_type = _value_type(hints[f.name], f.name)
        if value_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = value_type
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = f.name.upper()
        group.add_argument(*names, **kwargs)
        if f.metadata.get("legacy"):  # older spellings: still parsed, no longer shown
            group.add_argument(*f.metadata["legacy"], **dict(kwargs, help=argparse.SUPPRESS))
    # vLLM's JSON spelling of the flat speculative_* fields (engine_overrides expands it).
    group.add_argument("--speculative-config", dest="speculative_config", type=_json_object, metavar="JSON",
                       default=argparse.SUPPRESS if overrides_only else None,
                       help='speculative decoding as vLLM spells it, e.g. \'{"method": "ngram", '
                            '"num_speculative_tokens": 4}\' (keys: method, num_speculative_tokens, model, '
                            'prompt_lookup_min, prompt_lookup_max, draft_layers, adaptive); '
                            'docs/speculative-decoding.md')


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields present on `args` (all of them, or with overrides_only the ones given);
    --speculative-config's JSON becomes the speculative_* fields it names. Raises ConfigError
    naming a bad key."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    fields.update(speculative_fields_from_json(getattr(args, "speculative_config", None)))
    return fields


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of `generate` and `bench`; raises ConfigError naming a bad value."""
    return EngineConfig(**engine_overrides(args))


def add_vllm_compatibility_flags(parser: argparse.ArgumentParser) -> None:
    """Register the vLLM flags shardline does not implement (each stops with an error naming it) and
    the ones without effect here (accepted with a note). Hidden from --help; README lists them."""
    for flag, reason in UNSUPPORTED_VLLM_FLAGS.items():
        parser.add_argument(flag, nargs="?", action=_Unsupported, reason=reason, help=argparse.SUPPRESS)
    for flag, reason in VLLM_FLAGS_WITHOUT_EFFECT.items():
        parser.add_argument(flag, nargs=0, action=_WithoutEffect, reason=reason, help=argparse.SUPPRESS)


class _ExplainedFlag(argparse.Action):
    """A vLLM flag registered only to explain itself: it stores nothing, `reason` says why."""

    def __init__(self, option_strings: list[str], dest: str, reason: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.reason = reason


class _Unsupported(_ExplainedFlag):
    """Stops parsing with "FLAG: not supported by shardline: REASON" (exit status 2, as argparse)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        parser.error(f"{option_string}: not supported by shardline: {self.reason}")


class _WithoutEffect(_ExplainedFlag):
    """Accepts the flag and prints why it changes nothing."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"shardline: {option_string} has no effect: {self.reason}", file=sys.stderr)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _value_type(hint: Any, name: str) -> Any:
    """The argparse type of a field's annotation: str, int, float, bool (Optional unwrapped), or a
    JSON object for dict fields."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"EngineConfig.{name}: no flag type for {hint}")
        hint = members[0]
    if hint in (str, int, float, bool):
        return hint
    if typing.get_origin(hint) is dict or hint is dict:
        return _json_object
    raise TypeError(f"EngineConfig.{name}: no flag type for {hint}")


def _json_object(text: str) -> dict[str, Any]:
    """A flag value that must be a JSON object (argparse reports the ArgumentTypeError with the flag)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value
