"""The contract between weight sources and the model: a source yields (Hugging Face tensor name,
LazyWeight) pairs; the model's parameters pull only the slice their rank owns, so no rank ever
holds a full copy of a sharded tensor it does not need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

if TYPE_CHECKING:
    from shardline.worker.layers.quantization.group_quantized import GroupQuantized


@dataclass
class LazyWeight:
    """A tensor not yet read. `read(dim, start, length)` returns the slice [start, start+length)
    along `dim` (the whole tensor when dim is None), as a CPU tensor in the source's dtype.
    Quantized tensors (GGUF Q4_0/Q4_1/Q8_0 blocks, FP8 checkpoints) also answer `read_quantized`
    with their codes and scales, sliced the same way, so a quantized layer never dequantizes them."""

    shape: tuple[int, ...]
    reader: Callable[[int | None, int, int | None], torch.Tensor]
    quantized_reader: Callable[[int | None, int, int | None], "GroupQuantized"] | None = None

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        return self.reader(dim, start, length)

    def read_quantized(self, dim: int | None = None, start: int = 0,
                       length: int | None = None) -> "GroupQuantized | None":
        """The slice as quantized codes, or None when the tensor is stored in a float format."""
        return None if self.quantized_reader is None else self.quantized_reader(dim, start, length)

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
