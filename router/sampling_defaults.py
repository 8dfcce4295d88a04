"""Sampling defaults from the model's generation_config.json, applied to every request field the
client leaves unset (as vLLM does by default): what the model's authors tuned it to sample with.

`generation_config` (ClusterConfig, `--generation-config`): "auto" reads the file of the model's
Hugging Face directory; "vllm" applies none (SamplingParams' own defaults, OpenAI's); a directory
reads that directory's generation_config.json. A GGUF file carries no generation_config.json, so
"auto" applies none there."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# generation_config.json keys that are SamplingParams fields of the same name.
DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def load_sampling_defaults(setting: str, model_dir: Path | None) -> dict[str, Any]:
    """The SamplingParams defaults for `setting` ("auto", "vllm" or a directory); `model_dir` is the
    model's HF directory (None for a GGUF file or a dummy model). Unreadable files give none."""
    if setting == "vllm":
        return {}
    directory = model_dir if setting == "auto" else Path(setting)
    if directory is None:
        return {}
    path = directory / "generation_config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: not readable (%s); no sampling defaults applied", path, e)
        return {}
    if not isinstance(data, dict):
        return {}
    defaults = {k: data[k] for k in DEFAULT_FIELDS if isinstance(data.get(k), (int, float))
                and not isinstance(data.get(k), bool)}
    if not data.get("do_sample", True) and "temperature" in defaults:
        defaults["temperature"] = 0.0  # greedy checkpoints say so with do_sample: false
    if defaults:
        log.info("sampling defaults from %s: %s", path, defaults)
    return defaults
