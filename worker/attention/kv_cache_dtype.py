"""The KV cache's storage dtype (vLLM's `--kv-cache-dtype`) and FP8 (e4m3) KV quantization.

`auto` keeps keys and values in the model's dtype. `fp8` / `fp8_e4m3` stores them as e4m3
(torch.float8_e4m3fn) with one float32 scale per tensor per layer, as vLLM does: a stored code is
clamp(x / scale, -448, 448) rounded to e4m3 (round to nearest: within 2^-4 relative of x / scale for
normal values), and it reads back as code * scale. The scales (`KVScales`) come from the checkpoint
when it carries them (`self_attn.k_scale` / `v_scale`, the older shared `kv_scale`, or
compressed-tensors' `k_proj.output_scale` / `v_proj.output_scale`), else computed from the first real batch
(`calculate_kv_scales`, on by default: max |k| / 200 and max |v| / 100 per layer, vLLM's constants),
else 1.0 (vLLM's default). Scale 1.0 keeps full relative precision only above 2^-6 (e4m3's smallest
normal); small models' early-layer values sit below it (docs/quantization.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = float(torch.finfo(FP8_KV).max)  # 448


@dataclass(frozen=True)
class KVScales:
    """One layer's per-tensor KV scales: float32 tensors of one element on the cache's device
    (kernels load them, so a CUDA graph captured before the scales are set reads their later
    values, and setting them needs no host sync): stored = x / scale, read = stored * scale. Only an
    FP8 cache uses them."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def of(cls, k: float, v: float, device: torch.device | str | None = None) -> "KVScales":
        return cls(torch.tensor([k], dtype=torch.float32, device=device),
                   torch.tensor([v], dtype=torch.float32, device=device))

    def values(self) -> tuple[float, float]:
        """(k, v) as Python floats (reads the device: tests and logs only)."""
        return float(self.k), float(self.v)


# Calibrated scales (vLLM's calculate_kv_scales constants): the first batch's max |x| over these,
# leaving headroom for later tokens larger than the first batch's (e4m3 saturates at 448).
K_SCALE_CONSTANT = 200.0
V_SCALE_CONSTANT = 100.0


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's torch dtype for a `kv_cache_dtype` value: the model's dtype for auto, e4m3 for fp8
    and fp8_e4m3. Raises ValueError naming the field for anything else."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_KV
    raise ValueError(f"kv_cache_dtype: {name!r} is not one of {', '.join(KV_CACHE_DTYPES)}")


def is_fp8_kv(cache: torch.Tensor) -> bool:
    """Whether this cache stores e4m3 codes (scales apply) rather than plain values."""
    return cache.dtype == FP8_KV


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """e4m3 codes of x / scale, clamped to e4m3's finite range (x any float dtype, any shape)."""
    return (x.float() / scale).clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Values in `dtype` from e4m3 codes (codes * scale); a non-FP8 tensor is only cast."""
    if codes.dtype != FP8_KV:
        return codes.to(dtype)
    return (codes.float() * scale).to(dtype)


def scales_or_unit(scales: KVScales | None, device: torch.device) -> KVScales:
    """The given scales, or 1.0 for both (callers that pass none: tests, benchmarks)."""
    return scales if scales is not None else KVScales.of(1.0, 1.0, device)
