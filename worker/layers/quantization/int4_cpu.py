"""4-bit weight-only linear on CPU through torch's packed int4 kernel
(`aten._weight_int4pack_mm_for_cpu`, the kernel behind torchao's int4 CPU path).

The kernel's contract, read from torch 2.13 and checked by tests/test_quantization.py:
  * weights packed by `aten._convert_weight_to_int4pack_for_cpu(codes int32 [N, K] in 0..15, 1)`
    into uint8 [N, K / 2]; N must be a multiple of 16 (we pad rows with zeros and drop them after);
  * scales_and_zeros bfloat16 [K / G, N, 2], G in {32, 64, 128, 256} dividing K, and each weight
    is (code - 8) * scale + zero;
  * activations bfloat16, contiguous [M, K]; accumulation in float32, output bfloat16.
GGUF Q4_1 (w = d q + m) maps to scale d, zero m + 8 d; Q4_0 (w = d (q - 8)) to scale d, zero 0;
on-the-fly int4 (w = s q + lo) to scale s, zero lo + 8 s. Rounding d and the zero to bfloat16
moves a weight by at most 2^-8 of (8 |d| + |zero|) (bf16's unit roundoff): the stated error of
this path on top of the codes' own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import QuantMethod
from .group_quantized import GroupQuantized

INT4_GROUP_SIZES = (32, 64, 128, 256)
_ROW_MULTIPLE = 16


def int4_kernel_fits(weight: GroupQuantized) -> bool:
    """Whether the CPU int4 kernel can take these codes as they are (4-bit, a supported group size)."""
    return weight.bits == 4 and weight.group_size in INT4_GROUP_SIZES and weight.shape[1] % weight.group_size == 0


class Int4WeightOnlyCPU(QuantMethod):
    """Packed 4-bit codes [N_pad, K / 2] and bf16 (scale, zero) per group; y = x W^T with bf16 activations."""

    name = "int4"

    packed: torch.Tensor  # a registered buffer (moves with .to())
    scales_and_zeros: torch.Tensor  # a registered buffer (moves with .to())

    def __init__(self, weight: GroupQuantized, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not int4_kernel_fits(weight):
            raise ValueError(f"int4 CPU kernel: {weight.source} weight with {weight.bits}-bit codes and group size "
                             f"{weight.group_size} does not fit (needs 4-bit codes, group size in {INT4_GROUP_SIZES})")
        n, k = weight.shape
        self.out_features, self.in_features, self.group_size = n, k, weight.group_size
        pad = -n % _ROW_MULTIPLE
        codes = F.pad(weight.codes.to(torch.int32), (0, 0, 0, pad))
        scales = F.pad(weight.scales, (0, 0, 0, pad))
        offsets = weight.offsets if weight.offsets is not None else torch.zeros_like(weight.scales)
        zeros = F.pad(offsets + 8 * weight.scales, (0, 0, 0, pad))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).to(device))
        # [K / G, N_pad, 2]: the kernel reads a group's scale and zero for every output row together.
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(device=device, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        a = a.to(torch.bfloat16)
        if not a.is_contiguous():
            a = a.contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.packed, self.group_size, self.scales_and_zeros)
        if y.shape[1] != self.out_features:  # rows padded to the kernel's multiple of 16
            y = y[:, : self.out_features]
        y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        # Unpack by multiplying the identity: the kernel itself is the only authority on its layout.
        eye = torch.eye(k, dtype=torch.bfloat16)
        ones = torch.zeros_like(self.scales_and_zeros)
        ones[..., 0] = 1.0
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, g, ones).float().T[:n] + 8
        sz = self.scales_and_zeros.float()[:, :n]  # [K/G, N, 2]
        scale = sz[..., 0].T.repeat_interleave(g, dim=1)
        zero = sz[..., 1].T.repeat_interleave(g, dim=1)
        return (codes - 8) * scale + zero
