"""Copies between the host and the device that never make the host wait for the device's queue.

Under overlapped scheduling the host builds step N+1 while step N runs, so a copy that waits for
the stream to drain silently serializes every step. Two rules follow from CUDA's documented
synchronization behaviour: a host-to-device copy from pageable memory may synchronize with the
stream (the driver stages it through pinned memory), and a device-to-host copy into pageable memory
returns only once it is done. So both directions go through pinned memory from torch's caching
host allocator, which keeps a buffer alive until the copy queued on it has run.
"""

from __future__ import annotations

from typing import Sequence

import torch


def to_device(data: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data (a list or a CPU tensor) as a `dtype` tensor on `device`, queued without waiting for
    work already on the device's stream. On the host it is just the tensor."""
    device = torch.device(device)
    pin = device.type == "cuda"
    if isinstance(data, torch.Tensor):
        host = data.to(dtype)
        if pin:
            host = host.pin_memory()
    else:
        host = torch.tensor(data, dtype=dtype, pin_memory=pin)
    # Other accelerators (and the meta device the tests stand in with) are not pinned for.
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` on the host without waiting for the device: a pinned buffer filled by a copy queued on
    t's stream (read it only after that stream reached an event recorded behind the copy).
    Host tensors are returned as they are."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
    host.copy_(t, non_blocking=True)
    return host
