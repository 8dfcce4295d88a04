"""out[M, N] = x[M, K] @ W^T for a 4-bit weight with per-group scales and offsets (AWQ and GPTQ
checkpoints on CUDA), dequantizing each weight tile in registers: w = code * scale + offset.

Layout (packed once at load by `pack_int4_k_major`, worker/layers/quantization/int4_triton.py):
  qweight int32 [K / 8, N]  eight consecutive input features of one output column per int32, feature
                            8i + j in bits 4j..4j+3 (GPTQ's own qweight layout), so a [BLOCK_K, BLOCK_N]
                            tile reads BLOCK_K / 8 rows of contiguous int32s
  scales, offsets float32 [K / G, N]  one per group of G input features and output column
Each program owns a BLOCK_M x BLOCK_N output tile and walks K; activations enter tl.dot in their own
dtype (fp32 accumulation), the dequantized tile in the same dtype.
"""

from __future__ import annotations

import torch

from shardline.worker.kernels.runtime import cdiv, interpreted_bf16_dot, kernel, tl

_BLOCK_N = 64
_BLOCK_K = 64


@kernel(do_not_specialize=("M",))
def _int4_matmul_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    offsets_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        tile_ok = k_ok[:, None] & n_ok[None, :]
        packed = tl.load(qweight_ptr + (offs_k // 8)[:, None].to(tl.int64) * N + offs_n[None, :], mask=tile_ok, other=0)
        codes = (packed >> ((offs_k % 8) * 4)[:, None]) & 0xF
        group = (offs_k // GROUP)[:, None].to(tl.int64) * N + offs_n[None, :]
        scale = tl.load(scales_ptr + group, mask=tile_ok, other=0.0)
        offset = tl.load(offsets_ptr + group, mask=tile_ok, other=0.0)
        w = codes.to(tl.float32) * scale + offset  # [BLOCK_K, BLOCK_N]
        if UPCAST_DOT:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def pack_int4_k_major(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] (0..15, K a multiple of 8) -> int32 [K / 8, N], feature 8i + j in bits 4j."""
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"int4 matmul: {k} input features are not a multiple of 8")
    nib = codes.t().to(torch.int32).reshape(k // 8, 8, n)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32).view(1, 8, 1)
    # Bits 28..31 may set the sign: a sum of disjoint bit fields, so no carries (int32 wraps as two's complement).
    return (nib << shifts).sum(1, dtype=torch.int32)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, K] (fp32 / fp16 / bf16) times the packed weight [N, K]^T -> [M, N] in x's dtype; CUDA
    tensors, or CPU tensors through the Triton interpreter."""
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k or tuple(scales.shape) != (k // group_size, n):
        raise ValueError(f"int4 matmul: x [{m}, {k}] does not fit qweight {tuple(qweight.shape)} / scales "
                         f"{tuple(scales.shape)} with group size {group_size}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)  # tl.dot needs >= 16 rows
    grid = (cdiv(m, block_m), cdiv(n, _BLOCK_N))
    _int4_matmul_kernel[grid](
        x, qweight, scales, offsets, out, m, n, k, x.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
        UPCAST_DOT=x.dtype == torch.float32 or interpreted_bf16_dot(x.dtype),
    )
    return out
