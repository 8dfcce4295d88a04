"""The step's token mask: filled on the host for the constrained rows only, applied on the device.

Layout (xgrammar's): int32 words, bit j of word w of a row allows token 32 * w + j; a row is
ceil(vocab_size / 32) words, 1/32 of a float32 logits row. The host fills one row per
constrained sampler row (a few hundred microseconds for a 49k vocabulary, while the device runs the
step's forward); the rows are copied to the device without blocking, scattered into a
[num_rows, words] buffer and applied in place with xgrammar's kernel (Triton on CUDA, C++ on CPU)
over the constrained rows' indices only. Unconstrained rows are never read or written, and a
batch without constrained rows builds no mask at all."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from shardline.worker.engine.transfer import to_device
from shardline.worker.structured.matcher import GrammarState


@dataclass
class TokenBitmask:
    """The allowed next tokens of a step's constrained rows."""

    words: torch.Tensor  # [C, ceil(vocab_size / 32)] int32 on the host (pinned for a CUDA step)
    rows: list[int]  # the C rows of the step's logits they belong to, ascending
    vocab_size: int

    @classmethod
    def fill(cls, states: list[tuple[int, GrammarState]], vocab_size: int, device: torch.device) -> "TokenBitmask | None":
        """Fill a mask for each (row, state) whose grammar still expects a token; None if none does."""
        live = [(row, state) for row, state in states if state.can_fill]
        if not live:
            return None
        words = torch.empty((len(live), math.ceil(vocab_size / 32)), dtype=torch.int32,
                            pin_memory=torch.device(device).type == "cuda")
        for i, (_, state) in enumerate(live):
            state.fill(words, i)
        return cls(words, [row for row, _ in live], vocab_size)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens' logits of the constrained rows to -inf, in place, on the
        logits' device ([N, >= vocab_size] float32). Reads nothing back from the device."""
        from xgrammar import apply_token_bitmask_inplace

        device = logits.device
        words = to_device(self.words, torch.int32, device)
        indices: Any = None  # xgrammar annotates a list; its Triton path also takes a device tensor
        if len(self.rows) != logits.shape[0]:
            # xgrammar indexes the mask by the logits' row: scatter the rows into a full-height buffer
            # (the other rows stay uninitialized; the kernel reads only the listed rows).
            index = to_device(self.rows, torch.int64, device)
            full = torch.empty((logits.shape[0], words.shape[1]), dtype=torch.int32, device=device)
            words = full.index_copy_(0, index, words)
            # On CUDA the indices stay a device tensor: a list would be copied from pageable host
            # memory, which may synchronize the stream (transfer.py).
            indices = index if device.type == "cuda" else self.rows
        if device.type in ("cpu", "cuda"):  # xgrammar's C++ (CPU) or Triton (CUDA) kernel
            apply_token_bitmask_inplace(logits, words, vocab_size=self.vocab_size, indices=indices)
        else:  # other devices (and the meta device the tests stand in with): plain torch ops
            apply_token_bitmask_inplace(logits, words, vocab_size=self.vocab_size, indices=indices,
                                        backend="torch_native")
