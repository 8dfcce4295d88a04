"""Per-shape choice, for FP8 (e4m3) weights at small batch (M 1..16), between the W8A8 path
(activations quantized per token, `torch._scaled_mm`) and the weight-only FP8 matvec (activations
stay in their dtype, `matvec(..., w_scale=...)`), measured once per shape on the GPU as
`pick_linear_impl` does for float weights (worker/kernels/linear_choice.py: the same CUDA-graph
timer over rotating weight copies, the same candidate configs and reference check). Unlike the
float table it still measures a shape on its first use outside graph capture (warm-up runs it),
not in a start-up tuning pass; inside capture the answer is the table's entry or W8A8. At M <= 16 a step streams the weight either way; the
weight-only path skips quantizing the activations and keeps their precision."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from shardline.worker.kernels.linear_choice import TORCH, LinearImpl, candidates, graph_timer, matches_reference, weight_copies
from shardline.worker.kernels.matvec import MAX_M, MatvecConfig, matvec
from shardline.worker.kernels.runtime import HAS_TRITON

W8A8 = "w8a8"
WEIGHT_ONLY = "weight_only"
FP8 = torch.float8_e4m3fn

# x [M, K], e4m3 weight [N, K], float32 row scales [N] -> y [M, N]
Fp8Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Fp8LinearImpl:
    """What computes an FP8 linear for one shape: W8A8 `_scaled_mm`, or the weight-only matvec with
    its config; with the measurements the choice came from (None when not measured)."""

    kind: str
    config: MatvecConfig | None = None
    w8a8_ms: float | None = None
    weight_only_ms: float | None = None


W8A8_IMPL = Fp8LinearImpl(W8A8)


class Fp8LinearAutotuner:
    """(M, N, K, activation dtype, device) -> Fp8LinearImpl, measured on first use per shape."""

    def __init__(self, margin: float = 0.97) -> None:
        self.margin = margin  # the matvec must beat W8A8 by 3%: noise should not flip choices
        self.table: dict[tuple[int, int, int, torch.dtype, str], Fp8LinearImpl] = {}

    def pick(self, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str,
             w8a8: Fp8Matmul) -> Fp8LinearImpl:
        """The table's choice for this shape (W8A8 off CUDA, for M > 16, or while capturing)."""
        device = torch.device(device)
        if device.type != "cuda" or not HAS_TRITON or not 1 <= M <= MAX_M:
            return W8A8_IMPL
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (M, N, K, dtype, str(device))
        if key not in self.table:
            if torch.cuda.is_current_stream_capturing():
                return W8A8_IMPL
            self.table[key] = self.measure(M, N, K, dtype, device, w8a8)
        return self.table[key]

    def measure(self, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                w8a8: Fp8Matmul) -> Fp8LinearImpl:
        """Time W8A8 and each matvec candidate that matches the reference (CUDA graphs over rotating
        weight copies, as the float table); keep the fastest."""
        copies = weight_copies(N, K, FP8, device)
        x = torch.randn(M, K, dtype=dtype, device=device)
        ws = [(torch.randn(N, K, device=device) * 16).to(FP8) for _ in range(copies)]
        scale = torch.full((N,), 1.0 / (16 * K**0.5), device=device)
        ref = x.float() @ (ws[0].float() * scale[:, None]).T
        with torch.cuda.device(device):
            w8a8_ms = graph_timer(TORCH, lambda i: w8a8(x, ws[i], scale), copies)
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            best: tuple[float, MatvecConfig] | None = None
            for cfg in candidates(M, N, K, num_sms):
                try:
                    if not matches_reference(matvec(x, ws[0], cfg, impl="triton", w_scale=scale), ref):
                        continue
                    ms = graph_timer(LinearImpl("triton", cfg), functools.partial(_on_copy, x, ws, scale, cfg), copies)
                except Exception:  # a config the compiler rejects is skipped
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
        del ws
        if best is not None and best[0] < self.margin * w8a8_ms:
            return Fp8LinearImpl(WEIGHT_ONLY, best[1], w8a8_ms, best[0])
        return Fp8LinearImpl(W8A8, None, w8a8_ms, best[0] if best else None)


def _on_copy(x: torch.Tensor, ws: list[torch.Tensor], scale: torch.Tensor, cfg: MatvecConfig, i: int) -> torch.Tensor:
    """The weight-only matvec with config `cfg` on weight copy i (what graph_timer replays)."""
    return matvec(x, ws[i], cfg, impl="triton", w_scale=scale)


_DEFAULT_TUNER = Fp8LinearAutotuner()


def pick_fp8_linear_impl(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str,
                         w8a8: Fp8Matmul) -> Fp8LinearImpl:
    """W8A8 or the weight-only FP8 matvec for x[M, K] (dtype) times an e4m3 weight [N, K], from the
    process-wide measured table (always W8A8 off CUDA or for M > 16)."""
    return _DEFAULT_TUNER.pick(M, N, K, dtype, device, w8a8)


def fp8_linear_choices() -> dict[tuple[int, int, int, torch.dtype, str], Fp8LinearImpl]:
    """The process-wide table as it stands (a copy)."""
    return dict(_DEFAULT_TUNER.table)
