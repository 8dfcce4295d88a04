"""Configuration objects of the worker layer: the model's shape (from a Hugging Face config) and
the engine's knobs. Both are validated once, here, at the edge."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class ConfigError(ValueError):
    """A configuration value is missing, unsupported or out of range; the message names it."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn 'bf16' / 'float32' / torch.float16 into a torch dtype, with an error naming the choices."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"dtype: unsupported value {name!r}; choose one of float32, bfloat16, float16") from None


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). There bf16 halves the
    bytes a decode step reads and runs matrix products several times faster than float32; on other
    CPUs torch emulates bf16 and float32 is the faster choice."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def default_cpu_dtype() -> torch.dtype:
    """What dtype 'auto' means on CPU: $SHARDLINE_CPU_DTYPE when set (the tests set float32, so that
    greedy tokens can be compared exactly with transformers in float32), else bfloat16 where the CPU
    has native bf16 math (as vLLM's CPU backend defaults to), float32 elsewhere."""
    forced = os.environ.get("SHARDLINE_CPU_DTYPE")
    if forced:
        return parse_dtype(forced)
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from a Hugging Face config.json (or GGUF metadata)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face config.json; raises ConfigError naming what is wrong."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "")
        arch = archs[0] if archs else {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }.get(model_type, model_type or "<missing>")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {arch!r} (model_type {model_type!r}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise ConfigError(f"config.json: required field {key!r} is missing")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        # transformers >= 5 nests rope settings in `rope_parameters`; older files use rope_theta / rope_scaling.
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_scaling = cfg.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type == "default":
                rope_scaling = None
            elif rope_type == "freq_factors":  # shardline's own: a GGUF's rope_freqs divisors, one per rotated pair
                factors = rope_scaling.get("freq_factors")
                if not isinstance(factors, list) or len(factors) != int(head_dim) // 2 or not all(
                        isinstance(f, (int, float)) and f > 0 for f in factors):
                    raise ConfigError(f"rope_scaling: freq_factors must be {int(head_dim) // 2} positive numbers "
                                      f"(head_dim / 2), got {factors!r:.80}")
            elif rope_type not in ("llama3", "linear"):
                raise ConfigError(f"rope_scaling: rope_type {rope_type!r} is not supported; supported: llama3, linear")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((int(eos),) if eos is not None else ())
        is_qwen2 = arch == "Qwen2ForCausalLM"
        is_qwen3 = arch == "Qwen3ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else bool(cfg.get("attention_bias", False)),
            qk_norm=is_qwen3,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        )

    @property
    def num_params(self) -> int:
        """Parameter count of the whole (unsharded) model."""
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (2 * d if self.qk_norm else 0)
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h


@dataclass
class EngineConfig:
    """Knobs of one replica group's engine; the same fields in the CLI, the serve YAML and Python."""

    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto: bfloat16 on CUDA; on CPU see default_cpu_dtype
    device: str = "auto"  # auto: cuda when available, else cpu
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    # Weight quantization (vLLM's --quantization): none | gguf | int4 | int8 | fp8. None: the
    # checkpoint's quantization_config, else for GGUF files on CPU 'gguf' (keep Q4_0/Q4_1/Q8_0 packed),
    # else none. 'none' dequantizes a GGUF file to the model dtype. See docs/quantization.md.
    quantization: str | None = None
    tensor_parallel_size: int = 1
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit pool size; overrides the memory budget
    kv_cache_memory_gb: float | None = None  # CPU: explicit budget in GiB (default: a fraction of free memory)
    cpu_kv_cache_fraction: float = 0.1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    attention_backend: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | torch | triton
    # Schedule step N+1 while step N runs on the device (its sampled tokens feed N+1 on the device).
    # None: on for CUDA, off on CPU, where torch runs each op before returning and nothing overlaps.
    async_scheduling: bool | None = None
    seed: int = 0
    max_queue_len: int = 1024  # waiting requests beyond this are rejected as overload
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, ">= 1"),
            ("block_size", self.block_size >= 1 and (self.block_size & (self.block_size - 1)) == 0, "a power of two"),
            ("max_num_seqs", self.max_num_seqs >= 1, ">= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, ">= 1"),
            ("gpu_memory_utilization", 0.0 < self.gpu_memory_utilization <= 1.0, "in (0, 1]"),
            ("cpu_kv_cache_fraction", 0.0 < self.cpu_kv_cache_fraction <= 1.0, "in (0, 1]"),
            ("max_queue_len", self.max_queue_len >= 1, ">= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"{name}: must be {want}, got {getattr(self, name)!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks: must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len: must be >= 1, got {self.max_model_len}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ConfigError(f"load_format: {self.load_format!r} is not one of auto, safetensors, gguf, dummy")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"attention_backend: {self.attention_backend!r} is not one of auto, torch, triton")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        from shardline.worker.layers.quantization.config import QUANTIZATION_NAMES

        if self.quantization is not None and self.quantization not in QUANTIZATION_NAMES:
            raise ConfigError(f"quantization: {self.quantization!r} is not one of {', '.join(QUANTIZATION_NAMES)}")

    def resolved_device(self) -> torch.device:
        """The device the engine runs on: cuda when present (or asked), else cpu."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_async_scheduling(self) -> bool:
        """Whether the engine overlaps scheduling with the device's step (default: on CUDA)."""
        if self.async_scheduling is None:
            return self.resolved_device().type == "cuda"
        return bool(self.async_scheduling)

    def resolved_dtype(self) -> torch.dtype:
        """bfloat16 on CUDA, default_cpu_dtype() on CPU, unless set."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else default_cpu_dtype()
        return parse_dtype(self.dtype)

    def resolved_max_model_len(self, model: ModelConfig) -> int:
        """The context limit: max_model_len when set (never past the model's positions), else the model's."""
        limit = model.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ConfigError(f"max_model_len: {self.max_model_len} exceeds the model's max_position_embeddings {limit}")
        return self.max_model_len or limit

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
