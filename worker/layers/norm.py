"""RMSNorm, computed in float32 and cast back as the reference implementation does; with a residual
it adds it first (one fused kernel on the Triton path) and hands the sum on as the next residual."""

from __future__ import annotations

import torch
from torch import nn

from shardline.worker.kernels.rmsnorm import rms_norm


class RMSNorm(nn.Module):
    """norm(x) * weight; `norm(x, residual)` returns (norm(x + residual) * weight, x + residual).

    `impl` ('auto' | 'triton' | 'torch') picks the kernel: 'auto' is Triton on CUDA, torch elsewhere.
    """

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.impl = "auto"
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out, summed = rms_norm(x, self.weight, self.eps, residual, impl=self.impl)
        return out if residual is None else (out, summed)
