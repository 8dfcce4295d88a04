"""The contract between weight sources and the model: a source yields (Hugging Face tensor name,
LazyWeight) pairs; the model's parameters pull only the slice their rank owns, so no rank ever
holds a full copy of a sharded tensor it does not need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass
class LazyWeight:
    """A tensor not yet read. `read(dim, start, length)` returns the slice [start, start+length)
    along `dim` (the whole tensor when dim is None), as a CPU tensor in the source's dtype."""

    shape: tuple[int, ...]
    reader: Callable[[int | None, int, int | None], torch.Tensor]

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        return self.reader(dim, start, length)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> "LazyWeight":
        """Wrap an already materialised tensor (dequantized GGUF, tests)."""

        def reader(dim: int | None, start: int, length: int | None) -> torch.Tensor:
            if dim is None:
                return tensor
            n = tensor.shape[dim] - start if length is None else length
            return tensor.narrow(dim, start, n)

        return cls(tuple(tensor.shape), reader)


WeightStream = Iterator[tuple[str, LazyWeight]]
