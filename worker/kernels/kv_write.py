"""Scatter a step's new key/value rows into the paged KV cache by slot (one program per token)."""

from __future__ import annotations

import torch

from shardline.worker.kernels.runtime import kernel, next_pow2, tl, use_triton


@kernel
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
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
    dst = blk * stride_cb + off * stride_co + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_reference(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Plain-torch scatter: cache[slot] = row for every slot >= 0."""
    valid = slot_mapping >= 0
    slots, key, value = slot_mapping[valid], key[valid], value[valid]
    kv_cache[0].view(-1, key.shape[-2], key.shape[-1]).index_copy_(0, slots, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, value.shape[-2], value.shape[-1]).index_copy_(0, slots, value.to(kv_cache.dtype))


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, impl: str = "auto"
) -> None:
    """Store key/value [num_tokens, kv_heads, head_dim] into kv_cache [2, blocks, block_size, kv_heads,
    head_dim] at slot_mapping (flat slot = block * block_size + offset; -1 skips the token)."""
    if not use_triton(key, impl):
        write_kv_reference(key, value, kv_cache, slot_mapping)
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
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
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
    )
