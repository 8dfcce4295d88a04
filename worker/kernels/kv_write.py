"""Scatter a step's new key/value rows into the paged KV cache by slot (one program per token).
An FP8 (e4m3) cache stores clamp(x / scale, -448, 448) per element with the layer's per-tensor
KVScales (worker/attention/kv_cache_dtype.py); other caches store x cast to their dtype."""

from __future__ import annotations

import torch

from shardline.worker.attention.kv_cache_dtype import FP8_KV_MAX, KVScales, is_fp8_kv, quantize_kv, scales_or_unit
from shardline.worker.kernels.runtime import interpreter_ready, kernel, next_pow2, tl, use_triton


@kernel
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    ROUND_E4M3_IN_FP32: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # int64: blk * stride_cb may pass 2**31 (see paged_attention)
    if slot < 0:  # padding token: nothing to store
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_D_PAD)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_D)
    t64 = t.to(tl.int64)
    k = tl.load(key_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if FP8:  # e4m3 codes of x / scale, clamped to the finite range (e4m3fn has no infinity)
        k = tl.minimum(tl.maximum(k.to(tl.float32) / tl.load(k_scale_ptr), -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / tl.load(v_scale_ptr), -FP8_MAX), FP8_MAX)
        if ROUND_E4M3_IN_FP32:
            # NOTE: the Triton interpreter's float32 -> e4m3 cast rounds ties up and drops the carry
            # out of the mantissa (31.5 -> 16); round to e4m3's grid here so that its cast is exact.
            # Step 2^(e - 3) for exponent e (e >= -6: subnormals share -6's step); adding and taking
            # away 1.5 * 2^23 rounds |y| < 2^22 to an integer, ties to even.
            kv = tl.join(k, v)
            e = tl.maximum(((kv.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
            step = ((e + 124) << 23).to(tl.float32, bitcast=True)
            kv = ((kv / step + 12582912.0) - 12582912.0) * step
            k, v = tl.split(kv)
    dst = blk * stride_cb + off * stride_co + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_rows(kv_cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scales: KVScales | None = None) -> None:
    """Plain-torch scatter of rows [n, kv_heads, head_dim] to flat slots (all valid): cast to the
    cache's dtype, or e4m3 codes of x / scale for an FP8 cache (stored through a uint8 view: CPU
    torch has no index_copy_ for float8)."""
    if is_fp8_kv(kv_cache):
        scales = scales_or_unit(scales, kv_cache.device)
        cache = kv_cache.view(torch.uint8)
        key, value = quantize_kv(key, scales.k).view(torch.uint8), quantize_kv(value, scales.v).view(torch.uint8)
    else:
        cache, key, value = kv_cache, key.to(kv_cache.dtype), value.to(kv_cache.dtype)
    cache[0].view(-1, key.shape[-2], key.shape[-1]).index_copy_(0, slots, key)
    cache[1].view(-1, value.shape[-2], value.shape[-1]).index_copy_(0, slots, value)


def write_kv_reference(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       scales: KVScales | None = None) -> None:
    """Plain-torch scatter: cache[slot] = row for every slot >= 0."""
    valid = slot_mapping >= 0
    store_rows(kv_cache, slot_mapping[valid], key[valid], value[valid], scales)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, impl: str = "auto",
    scales: KVScales | None = None,
) -> None:
    """Store key/value [num_tokens, kv_heads, head_dim] into kv_cache [2, blocks, block_size, kv_heads,
    head_dim] at slot_mapping (flat slot = block * block_size + offset; -1 skips the token); an FP8
    cache gets e4m3 codes of x / scales (per-tensor)."""
    if not use_triton(key, impl):
        write_kv_reference(key, value, kv_cache, slot_mapping, scales)
        return
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if kv_cache.stride(-1) != 1:
        raise ValueError("write_kv: the KV cache's last dimension must be contiguous")
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    fp8 = is_fp8_kv(kv_cache)
    s = scales_or_unit(scales, kv_cache.device) if fp8 else None
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        s.k if s is not None else key,  # read only for an FP8 cache
        s.v if s is not None else key,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_D=head_dim,
        HEADS_PAD=next_pow2(num_kv_heads),
        HEAD_D_PAD=next_pow2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2],
        FP8=fp8,
        FP8_MAX=FP8_KV_MAX,
        ROUND_E4M3_IN_FP32=interpreter_ready() and not key.is_cuda,
    )
