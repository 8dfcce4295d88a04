"""FP8 (e4m3) linear: weights e4m3 with one float32 scale per output row, activations quantized per
token at run time (dynamic scales, max|row| / 448), both multiplied by `torch._scaled_mm` with
row-wise scales, accumulating in float32 (Hopper / Ada tensor cores on CUDA; torch 2.13 also runs
it on CPU, which is how the tests exercise this exact path). Weights come from an FP8 checkpoint
(weight + weight_scale) or are quantized from float at load. At batch 1-16 on CUDA a weight-only
FP8 matvec (activations unquantized, worker/kernels/matvec.py with row scales) runs instead where it
measured faster for the shape at start-up (worker/kernels/fp8_linear_choice.py), or where _scaled_mm
cannot take the shape.

Error: e4m3 keeps 3 mantissa bits, so each weight and each activation is within 2^-4 relative of
its value (round to nearest), and y within about 2 * 2^-4 * sum_k |x_k| |w_k| (2^-4 on the
weight-only path, whose activations keep their dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.worker.kernels.fp8_linear_choice import pick_fp8_linear_impl
from shardline.worker.kernels.matvec import MAX_M, matvec
from shardline.worker.kernels.runtime import HAS_TRITON

from .base import LoadedPiece, QuantMethod, as_float
from .group_quantized import GroupQuantized

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_TINY = 1e-12


def quantize_fp8_rows(w: torch.Tensor) -> GroupQuantized:
    """Per-row e4m3 codes of float weights [rows, cols]."""
    w = w.float()
    scale = (w.abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(_TINY)
    codes = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return GroupQuantized(codes, scale, None, int(w.shape[1]), 8, "fp8")


def fp8_checkpoint_rows(weight: torch.Tensor, weight_scale: torch.Tensor) -> GroupQuantized:
    """An FP8 checkpoint's weight [rows, cols] (e4m3) and its weight_scale (one per tensor, or [rows]
    / [rows, 1] per channel) as per-row codes."""
    rows = weight.shape[0]
    scale = weight_scale.float().reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(rows)
    elif scale.numel() != rows:
        raise ValueError(f"weight_scale has {scale.numel()} values for a weight of {rows} rows "
                         "(expected one per tensor or one per output row)")
    return GroupQuantized(weight.to(FP8), scale.reshape(rows, 1).contiguous(), None, int(weight.shape[1]), 8, "fp8")


def w8a8_matmul(a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """a [M, K] quantized per token to e4m3 (max|row| / 448) times the e4m3 weight [N, K] with its
    row scales ([N] or [1, N]) through torch._scaled_mm, float32 accumulation; [M, N] in a's dtype."""
    a_scale = (a.abs().amax(1, keepdim=True).float() / FP8_MAX).clamp_min(_TINY)
    qa = (a.float() / a_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    out_dtype = a.dtype if a.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    y = torch._scaled_mm(qa, weight.t(), scale_a=a_scale, scale_b=weight_scale.reshape(1, -1), out_dtype=out_dtype)
    return y.to(a.dtype)


def _is_fp8(piece: LoadedPiece) -> bool:
    return isinstance(piece, GroupQuantized) and piece.codes.dtype == FP8


class Fp8Linear(QuantMethod):
    """e4m3 weight [N, K] (row-major, so weight.t() is the column-major operand _scaled_mm wants)
    and float32 row scales [1, N]."""

    name = "fp8"

    weight: torch.Tensor  # a registered buffer (moves with .to())
    weight_scale: torch.Tensor  # a registered buffer (moves with .to())

    def __init__(self, rows: GroupQuantized, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = rows.shape
        self.register_buffer("weight", rows.codes.contiguous().to(device))
        self.register_buffer("weight_scale", rows.scales.float().reshape(1, -1).contiguous().to(device))
        # cuBLASLt's FP8 GEMM needs both dimensions in multiples of 16; other shapes dequantize.
        self.scaled_mm_fits = self.in_features % 16 == 0 and self.out_features % 16 == 0
        self.impl = "auto"  # 'triton': the weight-only matvec at M <= 16 whatever was measured; 'torch': W8A8

    @classmethod
    def from_pieces(cls, pieces: list[LoadedPiece], device: torch.device | str | None) -> "Fp8Linear":
        """Fuse a layer's pieces: FP8 checkpoint pieces keep their codes, others are quantized."""
        parts = [p if _is_fp8(p) else quantize_fp8_rows(as_float(p)) for p in pieces]
        codes = torch.cat([p.codes for p in parts])  # type: ignore[union-attr]
        scales = torch.cat([p.scales.reshape(-1, 1) for p in parts])  # type: ignore[union-attr]
        return cls(GroupQuantized(codes, scales, None, int(codes.shape[1]), 8, "fp8"), device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a = x.reshape(-1, self.in_features)
        m = a.shape[0]
        if 1 <= m <= MAX_M and (self.impl == "triton" or (self.impl == "auto" and a.is_cuda and HAS_TRITON)):
            # Small batch: the weight-only matvec where it measured faster than W8A8 for this shape, or
            # where _scaled_mm cannot take the shape; impl 'triton' always takes it (CPU tensors
            # through the interpreter: tests).
            choice = None
            if self.impl == "auto" and self.scaled_mm_fits:
                choice = pick_fp8_linear_impl(m, self.out_features, self.in_features, a.dtype, a.device)
            if choice is None or choice.kind == "triton":  # the weight-only matvec
                y = matvec(a, self.weight, choice.config if choice else None, impl="triton",
                           w_scale=self.weight_scale.reshape(-1))
                return y.reshape(*lead, self.out_features)
        if not self.scaled_mm_fits:
            return F.linear(x, self.dequantized().to(x.dtype))
        return w8a8_matmul(a, self.weight, self.weight_scale).reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.reshape(-1, 1)
