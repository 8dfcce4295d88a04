"""The KV cache's storage dtype (vLLM's `--kv-cache-dtype`) and FP8 (e4m3) KV quantization.

`auto` keeps keys and values in the model's dtype. `fp8` / `fp8_e4m3` stores them as e4m3
(torch.float8_e4m3fn) with one float32 scale per tensor per layer, as vLLM does: a stored code is
clamp(x / scale, -448, 448) rounded to e4m3 (round to nearest: within 2^-4 relative of x / scale for
normal values), and it reads back as code * scale. The scales (`KVScales`) come from the checkpoint
when it carries them (`self_attn.k_scale` / `v_scale`, the older shared `kv_scale`, or
compressed-tensors' `k_proj.output_scale` / `v_proj.output_scale`), else 1.0: vLLM's default when it
is not asked to compute them from the first batch (`calculate_kv_scales`, not implemented here).
With scale 1.0 e4m3 covers |x| up to 448 and keeps full relative precision above 2^-6, the range of
post-RoPE keys and of values in the Llama family."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = float(torch.finfo(FP8_KV).max)  # 448


@dataclass(frozen=True)
class KVScales:
    """One layer's per-tensor KV scales (float32 values as Python floats, so kernels take them as
    scalar arguments without a device read): stored = x / scale, read = stored * scale. Only an FP8
    cache uses them."""

    k: float = 1.0
    v: float = 1.0


UNIT_SCALES = KVScales()


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


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3 codes of x / scale, clamped to e4m3's finite range (x any float dtype, any shape)."""
    return (x.float() / scale).clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV)


def dequantize_kv(codes: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Values in `dtype` from e4m3 codes (codes * scale); a non-FP8 tensor is only cast."""
    if codes.dtype != FP8_KV:
        return codes.to(dtype)
    return (codes.float() * scale).to(dtype)
