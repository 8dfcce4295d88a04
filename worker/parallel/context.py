"""Which rank of which tensor-parallel group this process is, and the collectives the layers call.

Passed explicitly to every layer (no global state): world size 1 means no communication at all."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when world_size > 1

    def shard(self, total: int, name: str = "dimension") -> tuple[int, int]:
        """(start, size) of this rank's equal share of `total`; the split must be exact."""
        if total % self.world_size:
            raise ValueError(f"{name} {total} is not divisible by tensor_parallel_size {self.world_size}")
        size = total // self.world_size
        return self.rank * size, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's x along the last dimension (every rank gets the result)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()
