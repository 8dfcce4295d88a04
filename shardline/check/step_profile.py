"""What one decode step launches on the GPU: the kernels of one run of the step (a CUDA-graph
replay when the runner has graphs), counted and timed by the torch profiler.

Used by the check's graph_vs_eager step (issue 18: the kernel count per layer and where a
step's time goes). Off CUDA there is nothing to profile and the figures are None.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class StepProfile:
    """kernels: device kernels one step ran; kernels_per_layer: that over the model's layers;
    step_us: their summed device time; by_kernel: name -> [launches, total us], longest first
    (at most 20 names)."""

    kernels: int
    kernels_per_layer: float
    step_us: float
    by_kernel: dict[str, list[float]]

    def to_metrics(self) -> dict[str, Any]:
        return {f"decode_step_{k}": v for k, v in asdict(self).items()}


def profile_step(step: Callable[[], object], num_layers: int, device: torch.device) -> StepProfile | None:
    """Run `step` once (after one unprofiled run) under the torch profiler and sum its CUDA
    kernels; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name if len(event.name) <= 80 else event.name[:77] + "..."
            totals[name][0] += 1
            totals[name][1] += event.device_time_total
    kernels = int(sum(n for n, _ in totals.values()))
    top = dict(sorted(totals.items(), key=lambda kv: -kv[1][1])[:20])
    return StepProfile(kernels, kernels / max(1, num_layers), sum(us for _, us in totals.values()), top)
