"""8-bit weight-only linear on CPU through torch's `aten._weight_int8pack_mm` (int8 codes [N, K],
one scale per output row, bfloat16 activations and scales; read from torch 2.13 and checked by
tests/test_quantization.py). The kernel has no per-group scales, so GGUF Q8_0 blocks (one scale per
32 weights) are re-gridded to one scale per row: each weight moves by at most half a row step,
max|row| / 254, on top of Q8_0's own rounding. The token embedding of a quantized model keeps these
same codes (a lookup is a row gather times the row's scale), so a tied LM head costs one copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LoadedPiece, QuantMethod, as_float
from .group_quantized import GroupQuantized, quantize_int8_rows


def int8_rows(piece: LoadedPiece) -> GroupQuantized:
    """Per-row symmetric int8 codes of any piece (already per-row int8 codes pass through)."""
    if isinstance(piece, GroupQuantized) and piece.bits == 8 and piece.offsets is None \
            and piece.group_size == piece.shape[1]:
        return piece
    source = piece.source if isinstance(piece, GroupQuantized) else "int8"
    return quantize_int8_rows(as_float(piece), source)


class Int8WeightOnlyCPU(QuantMethod):
    """int8 codes [N, K] and bf16 per-row scales [N]; y = x W^T with bf16 activations."""

    name = "int8"

    codes: torch.Tensor  # a registered buffer (moves with .to())
    scales: torch.Tensor  # a registered buffer (moves with .to())

    def __init__(self, piece: LoadedPiece, device: torch.device | str | None = None) -> None:
        super().__init__()
        rows = int8_rows(piece)
        self.out_features, self.in_features = rows.shape
        self.register_buffer("codes", rows.codes.contiguous().to(device))
        self.register_buffer("scales", rows.scales.reshape(-1).to(device=device, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        a = a.to(torch.bfloat16)
        if not a.is_contiguous():
            a = a.contiguous()
        y = torch.ops.aten._weight_int8pack_mm(a, self.codes, self.scales).to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized to `dtype` (the token embedding's lookup)."""
        return F.embedding(ids, self.codes).to(dtype) * self.scales[ids].to(dtype).unsqueeze(-1)

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * self.scales.float().unsqueeze(-1)
