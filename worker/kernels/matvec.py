"""Skinny GEMM for small-batch decode: out[M, N] = x[M, K] @ w[N, K]^T for M in 1..16.

At these M the matmul is a stream over the weight, so the kernel is built for bandwidth: each
program owns BLOCK_N weight rows and one K slice (split-K keeps every SM busy when N is small),
loads BLOCK_K contiguous elements per row (wide vector loads) and accumulates in fp32. For M <= 4
the product is plain FMAs over the loaded tile; above that it goes through tl.dot (M padded to 16).
`pick_linear_impl` measures, per shape and on first use, whether this beats cuBLAS.

With `w_scale` (one float32 scale per weight row) it is a weight-only FP8 matvec: e4m3 rows are
converted as they load, and each output column is scaled once at the end
(worker/kernels/fp8_linear_choice.py picks it or the W8A8 `_scaled_mm` path per shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardline.worker.kernels.runtime import cdiv, interpreted_bf16_dot, kernel, next_pow2, tl, use_triton

MAX_M = 16


@dataclass(frozen=True)
class MatvecConfig:
    """Tile sizes and K split of one matvec launch."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4


@kernel(do_not_specialize=("M",))  # the batch size: 1..16 from step to step
def _matvec_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    part_ptr,
    w_scale_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    stride_ps,
    stride_pm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & (offs_k < k_hi)[None, :], other=0.0)
        if USE_DOT:
            x_mask = m_ok[:, None]
            if not EVEN_K:
                x_mask = x_mask & (offs_k < k_hi)[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
            if UPCAST_DOT:
                x = x.to(tl.float32)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
        else:
            wf = w.to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                # Padding rows (m >= M) re-read the last row; the final store drops them.
                x_row = x_ptr + tl.minimum(m, M - 1) * stride_xm
                if EVEN_K:
                    xm = tl.load(x_row + offs_k)
                else:
                    xm = tl.load(x_row + offs_k, mask=offs_k < k_hi, other=0.0)
                row = tl.sum(wf * xm.to(tl.float32)[None, :], 1)
                acc = tl.where(offs_m[:, None] == m, acc + row[None, :], acc)
    if HAS_SCALE:  # per-row weight scales: linear, so split-K partials may be scaled apart
        acc = acc * tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :], acc, mask=mask)
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def _sum_splits_kernel(part_ptr, out_ptr, num_splits, numel, stride_ps, BLOCK: tl.constexpr, SPLITS_PAD: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_s = tl.arange(0, SPLITS_PAD)
    mask = (offs_s[:, None] < num_splits) & (offs[None, :] < numel)
    p = tl.load(part_ptr + offs_s[:, None] * stride_ps + offs[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + offs, tl.sum(p, 0).to(out_ptr.dtype.element_ty), mask=offs < numel)


def matvec_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T through torch (cuBLAS on CUDA)."""
    return F.linear(x, w)


def default_config(M: int, N: int, K: int, num_sms: int = 132) -> MatvecConfig:
    """A shape-only guess: narrow tiles for FMA (M <= 4), wider for tl.dot; split K until the grid
    covers about four programs per SM."""
    block_n, block_k = (32, 256) if M <= 4 else (64, 128)
    block_k = min(block_k, max(16, next_pow2(K)))
    programs = cdiv(N, block_n)
    split = 1
    while programs * split < 4 * num_sms and K // (split * 2) >= 4 * block_k:
        split *= 2
    return MatvecConfig(block_n=block_n, block_k=block_k, split_k=split)


def matvec(
    x: torch.Tensor, w: torch.Tensor, config: MatvecConfig | None = None, impl: str = "auto",
    w_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M, N] = x[M, K] @ w[N, K]^T with the skinny-GEMM kernel (M <= 16; larger M and the
    torch path use F.linear). With w_scale [N] (float32), w's rows are scaled by it: the weight is
    w * w_scale[:, None] (weight-only FP8: w in e4m3)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"matvec: need x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    M, K = x.shape
    N = w.shape[0]
    if w_scale is not None and w_scale.numel() != N:
        raise ValueError(f"matvec: w_scale has {w_scale.numel()} values for {N} weight rows")
    if M > MAX_M or M == 0 or not use_triton(x, impl):
        if w_scale is not None:
            return matvec_reference(x, (w.float() * w_scale.reshape(-1, 1).float()).to(x.dtype))
        return matvec_reference(x, w)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    cfg = config or default_config(M, N, K)
    use_dot = M > 4
    block_m = max(16, next_pow2(M)) if use_dot else next_pow2(M)
    k_per_split = cdiv(cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
    split = cdiv(K, k_per_split)
    even_k = K % cfg.block_k == 0
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    upcast = interpreted_bf16_dot(x.dtype)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    _matvec_kernel[(cdiv(N, cfg.block_n), split)](
        x,
        w,
        out,
        part,
        w_scale if w_scale is not None else out,  # unused without HAS_SCALE
        M,
        N,
        K,
        k_per_split,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        part.stride(0) if split > 1 else 0,
        part.stride(1) if split > 1 else 0,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        USE_DOT=use_dot,
        SPLIT=split > 1,
        EVEN_K=even_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32",
        UPCAST_DOT=upcast,
        HAS_SCALE=w_scale is not None,
        num_warps=cfg.num_warps,
    )
    if split > 1:
        block = 1024
        _sum_splits_kernel[(cdiv(M * N, block),)](
            part, out, split, M * N, part.stride(0), BLOCK=block, SPLITS_PAD=next_pow2(split), num_warps=4
        )
    return out
