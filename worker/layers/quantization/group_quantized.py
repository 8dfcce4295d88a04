"""The one in-memory form every integer scheme loads into before it is packed for a kernel:
per-group affine codes, `w = codes * scale + offset` with one (scale, offset) per `group_size`
consecutive input features of a row. GGUF's Q4_0 / Q4_1 / Q8_0 blocks, and weights quantized on the
fly from a float checkpoint, all map onto it exactly, so slicing for tensor parallelism and checking
group boundaries happen in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class GroupQuantized:
    """Quantized rows of a linear weight [rows, cols].

    codes:   [rows, cols] uint8 (4-bit schemes: values 0..15), int8 (8-bit schemes) or float8_e4m3fn
    scales:  [rows, cols // group_size] float32
    offsets: [rows, cols // group_size] float32, or None for symmetric schemes (offset 0)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group_size: int
    bits: int
    source: str  # the format it came from, for messages ("Q4_1", "int4", ...)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """The float32 weights these codes stand for, [rows, cols]."""
        rows, cols = self.shape
        groups = self.codes.reshape(rows, cols // self.group_size, self.group_size).float()
        w = groups * self.scales.unsqueeze(-1)
        if self.offsets is not None:
            w = w + self.offsets.unsqueeze(-1)
        return w.reshape(rows, cols)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "GroupQuantized":
        """Apply a row-wise rearrangement (a permutation, a slice) to codes, scales and offsets alike."""
        return GroupQuantized(fn(self.codes), fn(self.scales), None if self.offsets is None else fn(self.offsets),
                              self.group_size, self.bits, self.source)

    def narrow(self, dim: int, start: int, length: int) -> "GroupQuantized":
        """Rows [start, start+length) (dim 0), or input features (dim 1), which must fall on group
        boundaries: a group's scale belongs to all of its features. Raises ValueError naming them."""
        if dim == 0:
            return self.map_rows(lambda t: t.narrow(0, start, length))
        if self.scales.shape[1] == 1:  # one scale (and offset) per row: any column range
            return GroupQuantized(self.codes.narrow(1, start, length), self.scales, self.offsets, length, self.bits,
                                  self.source)
        g = self.group_size
        if start % g or length % g:
            raise ValueError(
                f"input features [{start}, {start + length}) of a {self.source} weight do not fall on its "
                f"{g}-feature group boundaries; choose a tensor_parallel_size that splits them into whole groups"
            )
        return GroupQuantized(self.codes.narrow(1, start, length), self.scales.narrow(1, start // g, length // g),
                              None if self.offsets is None else self.offsets.narrow(1, start // g, length // g),
                              g, self.bits, self.source)


def concat_rows(parts: list[GroupQuantized]) -> GroupQuantized:
    """Stack pieces of the same scheme along rows (the parts of a fused QKV or gate/up weight)."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.offsets is None) != (first.bits, first.group_size, first.offsets is None):
            raise ValueError(f"cannot fuse a {p.source} piece with a {first.source} piece")
    offsets = None if first.offsets is None else torch.cat([p.offsets for p in parts])  # type: ignore[misc]
    return GroupQuantized(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), offsets,
                          first.group_size, first.bits, first.source)


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> GroupQuantized:
    """Asymmetric 4-bit per-group quantization of float weights [rows, cols] (min/max per group, 16
    levels): the error per weight is at most half a step, (max - min) / 30 of its group."""
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"int4: {cols} input features are not a multiple of the group size {group_size}")
    g = w.float().reshape(rows, cols // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    return GroupQuantized(codes.reshape(rows, cols), scale, lo, group_size, 4, "int4")


def quantize_int8_rows(w: torch.Tensor, source: str = "int8") -> GroupQuantized:
    """Symmetric 8-bit per-row quantization (one scale per output feature, max|w| / 127): what the
    int8 weight-only kernel takes. Error per weight at most half a step, max|row| / 254."""
    w = w.float()
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return GroupQuantized(codes, scale, None, int(w.shape[1]), 8, source)
