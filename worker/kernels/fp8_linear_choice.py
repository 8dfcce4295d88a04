"""Per-shape choice, for FP8 (e4m3) weights at small batch (M 1..16), between the W8A8 path
(activations quantized per token, `torch._scaled_mm`) and the weight-only FP8 matvec (activations
stay in their dtype, `matvec(..., w_scale=...)`).

It is the float table's tuner (worker/kernels/linear_choice.py: `LinearAutotuner`, its `measure`,
the CUDA-graph timer over rotating weight copies, the candidate configs, the reference check, the
M buckets) with another trial: W8A8 is the baseline and the candidates are the weight-only matvec
configs. As there, every bucket of every FP8 linear is decided at start-up
(`ModelRunner.tune_linears` calls `tune_fp8_linear_shapes`) and `pick` never measures while
serving: a shape not tuned is served by W8A8. A choice's kind is 'triton' for the weight-only matvec
and 'torch' for W8A8 (the baseline), with both times attached. At M <= 16 a step streams the
weight either way; the weight-only path skips quantizing the activations and keeps their precision.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch

from shardline.worker.kernels.linear_choice import (
    TORCH,
    Candidate,
    LinearAutotuner,
    LinearImpl,
    Trial,
    Timer,
    num_sms_of,
    weight_copies,
)
from shardline.worker.kernels.matvec import MatvecConfig, matvec
from shardline.worker.kernels.runtime import HAS_TRITON

FP8 = torch.float8_e4m3fn

# x [M, K], e4m3 weight [N, K], float32 row scales [N] -> y [M, N]
Fp8Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Fp8LinearAutotuner(LinearAutotuner):
    """(bucket, N, K, activation dtype, device) -> LinearImpl ('triton': weight-only matvec with its
    config; 'torch': W8A8), filled only while tuning. w8a8: the W8A8 matmul the baseline times
    (worker/layers/quantization/fp8.py's, handed in to keep this module below that one)."""

    def __init__(self, w8a8: Fp8Matmul | None = None, margin: float = 0.97, timer: Timer | None = None,
                 allow_cpu: bool = False) -> None:
        super().__init__(margin, timer, allow_cpu)
        self.w8a8 = w8a8

    def trial(self, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> Trial:
        """W8A8 against the weight-only matvec configs on random e4m3 weights of this shape."""
        if self.w8a8 is None:
            raise RuntimeError("Fp8LinearAutotuner: no W8A8 matmul to measure against (tune with one)")
        w8a8 = self.w8a8
        copies = weight_copies(N, K, FP8, device)
        g = torch.Generator(device=device).manual_seed(M * 7919 + N + K)
        x = torch.randn(M, K, generator=g, device=device).to(dtype)
        ws = [(torch.randn(N, K, generator=g, device=device) * 16).to(FP8) for _ in range(copies)]
        scale = torch.full((N,), 1.0 / (16 * K**0.5), device=device)
        ref = x.float() @ (ws[0].float() * scale[:, None]).T
        cands = [Candidate(impl, functools.partial(_on_copy, x, ws, scale, impl.config))
                 for impl in self.candidate_impls(M, N, K, num_sms_of(device))]
        return Trial(Candidate(TORCH, lambda i: w8a8(x, ws[i], scale)), cands, ref, copies)


def _on_copy(x: torch.Tensor, ws: list[torch.Tensor], scale: torch.Tensor, cfg: MatvecConfig | None,
             i: int) -> torch.Tensor:
    """The weight-only matvec with config `cfg` on weight copy i (what the timer replays)."""
    return matvec(x, ws[i], cfg, impl="triton", w_scale=scale)


_DEFAULT_TUNER = Fp8LinearAutotuner()


def tune_fp8_linear_shapes(shapes: Iterable[tuple[int, int]], dtype: torch.dtype, device: torch.device | str,
                           w8a8: Fp8Matmul) -> int:
    """Decide every M bucket of every (N, K) FP8 weight shape for activations of `dtype`, at
    start-up (CUDA only; elsewhere nothing is measured). Returns how many entries were measured."""
    if torch.device(device).type != "cuda" or not HAS_TRITON:
        return 0
    _DEFAULT_TUNER.w8a8 = w8a8
    return _DEFAULT_TUNER.tune(shapes, dtype, device)


def pick_fp8_linear_impl(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str) -> LinearImpl:
    """The weight-only FP8 matvec ('triton', with its config) or W8A8 ('torch') for x[M, K] (dtype)
    times an e4m3 weight [N, K], from the process-wide table decided at start-up (W8A8 off CUDA,
    for M > 16 and for shapes not tuned)."""
    return _DEFAULT_TUNER.pick(M, N, K, dtype, device)


def fp8_linear_choices() -> dict[tuple[int, int, int, torch.dtype, str], LinearImpl]:
    """The process-wide table as it stands (a copy)."""
    return dict(_DEFAULT_TUNER.table)
