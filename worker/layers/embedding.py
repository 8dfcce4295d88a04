"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary
rows (the vocabulary is padded to a multiple of the world size)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardline.worker.layers.linear import linear
from shardline.worker.loader.weights import LazyWeight
from shardline.worker.parallel.context import ParallelContext


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows are split across ranks; rows a rank lacks contribute zeros and an
    all-reduce completes every lookup."""

    def __init__(self, vocab_size: int, hidden: int, ctx: ParallelContext, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        padded = -(-vocab_size // ctx.world_size) * ctx.world_size
        self.rows = padded // ctx.world_size
        self.start = ctx.rank * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.ctx.all_reduce(out)

    def load(self, name: str, w: LazyWeight) -> None:
        n = max(0, min(self.rows, self.vocab_size - self.start))
        if n:
            src = w.read(0, self.start, n)
            if tuple(src.shape[1:]) != tuple(self.weight.shape[1:]):
                raise ValueError(f"weight {name}: expected rows of {self.weight.shape[1]}, checkpoint has {tuple(src.shape)}")
            self.weight[:n].copy_(src.to(self.weight.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits; each rank computes its slice and the slices are
    gathered so that the caller (rank 0's sampler) sees the full vocabulary. `impl` picks the
    matmul as in layers.linear.linear (at batch 1 the LM head is one of the largest weight reads)."""

    impl = "auto"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = linear(hidden, self.weight, None, self.impl)
        full = self.ctx.all_gather_last_dim(local)
        return full[..., : self.vocab_size]
