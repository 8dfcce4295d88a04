"""The check's first step: what the machine is (GPU, driver, versions, commit) and its two ceilings
(copy bandwidth and matmul rate, measured now by shardline.bench.measure_roofline), plus the model's
byte counts that the summary's bounds need. Triton's version is read from its package metadata, not
by importing it: on CPU the interpreter must be chosen before triton's first import."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from shardline.bench import kv_bytes_per_token, measure_roofline
from shardline.worker.config import EngineConfig, ModelConfig

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> str | None:
    """A command's first output line, or None when it is missing or fails (no nvidia-smi, no git)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_environment(device: torch.device, dtype: torch.dtype, model: ModelConfig, model_spec: str,
                         config: EngineConfig) -> dict[str, Any]:
    """Versions, the device, the commit, the model's byte counts and the measured ceilings."""
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "driver": _run(["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]),
        "commit": _run(["git", "rev-parse", "HEAD"]),
        "model": model_spec,
        "dtype": str(dtype).removeprefix("torch."),
        "num_params": model.num_params,
        "weight_bytes": model.num_params * dtype_bytes,
        "kv_bytes_per_token": kv_bytes_per_token(model, dtype_bytes),
        "max_num_seqs": config.max_num_seqs,
    }
    info.update(measure_roofline(device))
    return info
