"""The interface of a quantization scheme: a QuantMethod is the packed weight of one linear layer
(a module with buffers) and the matmul over it. Linear layers stage their rank's pieces while
loading (QuantizedWeightStager) and hand the fused weight to the method once, so each scheme packs
its kernel's layout a single time."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .group_quantized import GroupQuantized

LoadedPiece = GroupQuantized | torch.Tensor  # quantized codes, or float weights from the checkpoint


class QuantMethod(nn.Module, ABC):
    """One linear layer's weight [out_features, in_features] in a scheme's storage, multiplied by
    forward(x[..., in]) -> [..., out] in x's dtype."""

    name: ClassVar[str]

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def dequantized(self) -> torch.Tensor:
        """float32 [out, in]: exactly the weights the kernel multiplies by (the tests' reference)."""

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight in `dtype` (the token embedding's lookup): the dequantized rows
        by default; schemes that can look rows up in their own storage override this."""
        return self.dequantized()[ids].to(dtype)

    def weight_bytes(self) -> int:
        """Bytes the packed weight holds in memory (buffers and parameters)."""
        return sum(t.numel() * t.element_size() for t in list(self.buffers()) + list(self.parameters()))


class DequantizedLinear(QuantMethod):
    """The float fallback: the pieces dequantized to the model's dtype, F.linear (or the matvec choice)."""

    name = "none"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from shardline.worker.layers.linear import linear

        return linear(x, self.weight, None, self.impl)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (the token embedding's lookup)."""
        return F.embedding(ids, self.weight).to(dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()


def as_float(piece: LoadedPiece) -> torch.Tensor:
    """A piece as float32 weights."""
    return piece.dequantize() if isinstance(piece, GroupQuantized) else piece.float()
