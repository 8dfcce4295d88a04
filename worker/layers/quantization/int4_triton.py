"""4-bit weights with per-group scales and offsets on CUDA: the Triton int4 dequant matmul
(worker/kernels/int4_matmul.py). What AWQ and GPTQ checkpoints run on a GPU; the codes are the
checkpoint's, repacked once to the kernel's K-major int32 layout, and scales and offsets are held in
float32 (an fp16 checkpoint scale converts exactly), so dequantized() is exactly the file's
(q - z) * s."""

from __future__ import annotations

import torch

from shardline.worker.kernels.int4_matmul import int4_matmul, pack_int4_k_major

from .base import QuantMethod
from .group_quantized import GroupQuantized


class Int4TritonLinear(QuantMethod):
    """qweight int32 [K / 8, N], scales and offsets float32 [K / G, N]; y = x W^T in x's dtype."""

    name = "int4_triton"

    qweight: torch.Tensor  # a registered buffer (moves with .to())
    scales: torch.Tensor  # a registered buffer
    offsets: torch.Tensor  # a registered buffer

    def __init__(self, weight: GroupQuantized, device: torch.device | str | None = None) -> None:
        super().__init__()
        if weight.bits != 4:
            raise ValueError(f"int4 matmul: {weight.source} weight has {weight.bits}-bit codes")
        n, k = weight.shape
        self.out_features, self.in_features, self.group_size = n, k, weight.group_size
        offsets = weight.offsets if weight.offsets is not None else torch.zeros_like(weight.scales)
        self.register_buffer("qweight", pack_int4_k_major(weight.codes).to(device))
        self.register_buffer("scales", weight.scales.float().t().contiguous().to(device))
        self.register_buffer("offsets", offsets.float().t().contiguous().to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = int4_matmul(x.reshape(-1, self.in_features), self.qweight, self.scales, self.offsets, self.group_size)
        return y.reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        k, n, g = self.in_features, self.out_features, self.group_size
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=self.qweight.device).view(1, 8, 1)
        codes = ((self.qweight.unsqueeze(1) >> shifts) & 0xF).reshape(k, n).float()
        w = codes * self.scales.repeat_interleave(g, 0) + self.offsets.repeat_interleave(g, 0)
        return w.t().contiguous()
