"""RoPE and the KV-cache write in one kernel: a decode layer's two smallest launches made one.

One program per token: rotates the token's q heads in place (rotate-half layout, fp32 math, as
rope.apply_rope), rotates its k heads and stores them both in place and, with its v heads, into
the paged cache at the token's slot (slot -1: a padding row, nothing stored in the cache; as
kv_write.write_kv). Dims past the rotary dims (partial rotary) are copied unrotated.
"""

from __future__ import annotations

import torch

from shardline.worker.kernels.kv_write import write_kv
from shardline.worker.kernels.rope import apply_rope
from shardline.worker.kernels.runtime import kernel, next_pow2, tl, use_triton


@kernel
def _rope_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_sin_ptr,
    pos_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c,
    stride_cb,
    stride_co,
    stride_ch,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_D: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, HALF_PAD)
    c_ok = offs < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_c + offs, mask=c_ok, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_c + HALF + offs, mask=c_ok, other=0.0).to(tl.float32)
    hq = tl.arange(0, Q_HEADS_PAD)
    mq = (hq[:, None] < NUM_Q_HEADS) & c_ok[None, :]
    pq = q_ptr + t * stride_qt + hq[:, None] * stride_qh + offs[None, :]
    q1 = tl.load(pq, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(pq + HALF, mask=mq, other=0.0).to(tl.float32)
    tl.store(pq, (q1 * cos[None, :] - q2 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(pq + HALF, (q2 * cos[None, :] + q1 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mq)

    hk = tl.arange(0, KV_HEADS_PAD)
    mk = (hk[:, None] < NUM_KV_HEADS) & c_ok[None, :]
    pk = k_ptr + t * stride_kt + hk[:, None] * stride_kh + offs[None, :]
    k1 = tl.load(pk, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(pk + HALF, mask=mk, other=0.0).to(tl.float32)
    r1 = k1 * cos[None, :] - k2 * sin[None, :]
    r2 = k2 * cos[None, :] + k1 * sin[None, :]
    tl.store(pk, r1.to(k_ptr.dtype.element_ty), mask=mk)
    tl.store(pk + HALF, r2.to(k_ptr.dtype.element_ty), mask=mk)

    slot = tl.load(slot_ptr + t).to(tl.int64)  # int64: blk * stride_cb may pass 2**31
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        row = k_cache_ptr + blk * stride_cb + off * stride_co + hk[:, None] * stride_ch
        tl.store(row + offs[None, :], r1.to(k_cache_ptr.dtype.element_ty), mask=mk)
        tl.store(row + HALF + offs[None, :], r2.to(k_cache_ptr.dtype.element_ty), mask=mk)
        offs_d = tl.arange(0, HEAD_D_PAD)
        heads_ok = hk[:, None] < NUM_KV_HEADS
        tail = heads_ok & (offs_d[None, :] >= 2 * HALF) & (offs_d[None, :] < HEAD_D)  # unrotated dims
        k_tail = tl.load(k_ptr + t * stride_kt + hk[:, None] * stride_kh + offs_d[None, :], mask=tail)
        tl.store(row + offs_d[None, :], k_tail.to(k_cache_ptr.dtype.element_ty), mask=tail)
        m_v = heads_ok & (offs_d[None, :] < HEAD_D)
        v = tl.load(v_ptr + t * stride_vt + hk[:, None] * stride_vh + offs_d[None, :], mask=m_v)
        dst = blk * stride_cb + off * stride_co + hk[:, None] * stride_ch + offs_d[None, :]
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=m_v)


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    impl: str = "auto",
) -> None:
    """Rotate q [tokens, q_heads, d] and k [tokens, kv_heads, d] in place by positions [tokens]
    (cos_sin_cache [max_position, rotary_dim], rope.cos_sin_cache), and store the rotated k and v
    [tokens, kv_heads, d] into kv_cache [2, blocks, block_size, kv_heads, d] at slot_mapping
    (-1 skips the token). The same result as apply_rope then write_kv, in one launch.

    Raises ValueError for an odd rotary_dim or one above head_dim, or a non-contiguous last
    dimension of q, k, v, the cos/sin cache or the KV cache."""
    rotary_dim = cos_sin_cache.shape[-1]
    head_dim = q.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rope_and_write_kv: rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}")
    if not use_triton(q, impl):
        apply_rope(q, k, positions, cos_sin_cache, impl="torch")
        write_kv(k, v, kv_cache, slot_mapping, impl="torch")
        return
    if any(t.stride(-1) != 1 for t in (q, k, v, cos_sin_cache, kv_cache)):
        raise ValueError("rope_and_write_kv: q, k, v, the cos/sin cache and the KV cache need a contiguous last dimension")
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _rope_write_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        cos_sin_cache,
        positions,
        slot_mapping,
        k_cache,
        v_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_Q_HEADS=q.shape[1],
        NUM_KV_HEADS=k.shape[1],
        HEAD_D=head_dim,
        HALF=rotary_dim // 2,
        HALF_PAD=next_pow2(rotary_dim // 2),
        HEAD_D_PAD=next_pow2(head_dim),
        Q_HEADS_PAD=next_pow2(q.shape[1]),
        KV_HEADS_PAD=next_pow2(k.shape[1]),
        BLOCK_SIZE=kv_cache.shape[2],
    )
