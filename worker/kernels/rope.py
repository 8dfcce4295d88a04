"""Rotary position embedding applied in place to q and k (neox / HF Llama rotate-half layout),
alone or, in the same kernel, with the step's k and v stored into the paged KV cache."""

from __future__ import annotations

import torch

from shardline.worker.kernels.kv_write import write_kv_reference
from shardline.worker.kernels.runtime import kernel, next_pow2, tl, use_triton


@kernel
def _rope_kernel(
    q_ptr,
    k_ptr,
    cache_ptr,
    pos_ptr,
    v_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_c,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    WRITE_KV: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, HALF_PAD)
    c_ok = offs < HALF
    cos = tl.load(cache_ptr + pos * stride_c + offs, mask=c_ok, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + offs, mask=c_ok, other=0.0).to(tl.float32)

    hq = tl.arange(0, Q_HEADS_PAD)
    mq = (hq[:, None] < NUM_Q_HEADS) & c_ok[None, :]
    pq = q_ptr + t * stride_qt + hq[:, None] * stride_qh + offs[None, :]
    q1 = tl.load(pq, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(pq + HALF, mask=mq, other=0.0).to(tl.float32)
    tl.store(pq, (q1 * cos[None, :] - q2 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(pq + HALF, (q2 * cos[None, :] + q1 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mq)

    hk = tl.arange(0, K_HEADS_PAD)
    mk = (hk[:, None] < NUM_K_HEADS) & c_ok[None, :]
    pk = k_ptr + t * stride_kt + hk[:, None] * stride_kh + offs[None, :]
    k1 = tl.load(pk, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(pk + HALF, mask=mk, other=0.0).to(tl.float32)
    r1 = k1 * cos[None, :] - k2 * sin[None, :]
    r2 = k2 * cos[None, :] + k1 * sin[None, :]
    tl.store(pk, r1.to(k_ptr.dtype.element_ty), mask=mk)
    tl.store(pk + HALF, r2.to(k_ptr.dtype.element_ty), mask=mk)
    if WRITE_KV:  # the rotated k and v into the paged cache at the token's slot (-1: padding, skipped)
        slot = tl.load(slot_ptr + t).to(tl.int64)  # int64: blk * stride_cb may pass 2**31
        if slot >= 0:
            row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + hk[:, None] * stride_ch
            tl.store(k_cache_ptr + row + offs[None, :], r1.to(k_cache_ptr.dtype.element_ty), mask=mk)
            tl.store(k_cache_ptr + row + HALF + offs[None, :], r2.to(k_cache_ptr.dtype.element_ty), mask=mk)
            offs_d = tl.arange(0, HEAD_D_PAD)
            heads_ok = hk[:, None] < NUM_K_HEADS
            tail = heads_ok & (offs_d[None, :] >= 2 * HALF) & (offs_d[None, :] < HEAD_D)  # unrotated dims
            k_tail = tl.load(k_ptr + t * stride_kt + hk[:, None] * stride_kh + offs_d[None, :], mask=tail)
            tl.store(k_cache_ptr + row + offs_d[None, :], k_tail.to(k_cache_ptr.dtype.element_ty), mask=tail)
            m_v = heads_ok & (offs_d[None, :] < HEAD_D)
            v = tl.load(v_ptr + t * stride_vt + hk[:, None] * stride_vh + offs_d[None, :], mask=m_v)
            tl.store(v_cache_ptr + row + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=m_v)


def rope_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The unscaled inverse frequencies base^(-2i/rotary_dim), fp32 [rotary_dim // 2]."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def cos_sin_cache(inv_freq: torch.Tensor, max_position: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_position, rotary_dim] fp32: cos(p * f) in the first half of each row, sin in the second.
    Scaled RoPE variants (e.g. Llama 3) only change inv_freq."""
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq.float().cpu())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    half = cos.shape[-1]
    x1 = x[..., :half].float().clone()  # .float() is a view for fp32 inputs: copy before writing back
    x2 = x[..., half : 2 * half].float().clone()
    x[..., :half] = (x1 * cos - x2 * sin).to(x.dtype)
    x[..., half : 2 * half] = (x2 * cos + x1 * sin).to(x.dtype)


def rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> None:
    """In-place rotate-half RoPE in plain torch, fp32 math (the first rotary_dim dims rotate)."""
    half = cache.shape[-1] // 2
    rows = cache[positions.long()].float()
    cos, sin = rows[:, None, :half], rows[:, None, half:]
    _rotate_reference(q, cos, sin)
    _rotate_reference(k, cos, sin)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, impl: str = "auto") -> None:
    """Rotate q [tokens, q_heads, head_dim] and k [tokens, k_heads, head_dim] in place by
    positions [tokens] using cache [max_position, rotary_dim] (see cos_sin_cache)."""
    _rope(q, k, positions, cache, None, impl)


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                      kv_cache: torch.Tensor, slot_mapping: torch.Tensor, impl: str = "auto") -> None:
    """apply_rope, then the rotated k and v [tokens, kv_heads, head_dim] stored into kv_cache
    [2, blocks, block_size, kv_heads, head_dim] at slot_mapping (-1 skips the token, as
    kv_write.write_kv): on the Triton path one launch instead of two (a decode layer's two
    smallest kernels). Dims past rotary_dim are stored unrotated."""
    _rope(q, k, positions, cache, (v, kv_cache, slot_mapping), impl)


def _rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
          kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, impl: str) -> None:
    rotary_dim = cache.shape[-1]
    if rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError(f"apply_rope: rotary_dim {rotary_dim} must be even and <= head_dim {q.shape[-1]}")
    if not use_triton(q, impl):
        rope_reference(q, k, positions, cache)
        if kv_write is not None:
            write_kv_reference(k, kv_write[0], kv_write[1], kv_write[2])
        return
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cache.stride(-1) != 1:
        raise ValueError("apply_rope: q, k and the cache need a contiguous last dimension (rotation is in place)")
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    if kv_write is not None:
        v, kv_cache, slots = kv_write
        if v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
            raise ValueError("rope_and_write_kv: v and the KV cache need a contiguous last dimension")
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        cache_strides = (v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        block_size = kv_cache.shape[2]
    else:  # unused pointers and strides: WRITE_KV=False compiles the write away
        v, slots, k_cache, v_cache = k, positions, k, k
        cache_strides, block_size = (0, 0, 0, 0, 0), 1
    _rope_kernel[(num_tokens,)](
        q,
        k,
        cache,
        positions,
        v,
        slots,
        k_cache,
        v_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cache.stride(0),
        *cache_strides,
        NUM_Q_HEADS=q.shape[1],
        NUM_K_HEADS=k.shape[1],
        HALF=half,
        HALF_PAD=next_pow2(half),
        Q_HEADS_PAD=next_pow2(q.shape[1]),
        K_HEADS_PAD=next_pow2(k.shape[1]),
        WRITE_KV=kv_write is not None,
        HEAD_D=q.shape[-1],
        HEAD_D_PAD=next_pow2(q.shape[-1]),
        BLOCK_SIZE=block_size,
    )
