"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary
rows (the vocabulary is padded to a multiple of the world size). Quantized (an active
QuantizationConfig), the rows are kept as a QuantMethod (int8 rows on CPU) that serves both the
lookup and, for a tied or quantized LM head, the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardline.worker.layers.linear import linear
from shardline.worker.layers.quantization import QuantizationConfig, QuantizedWeightStager, QuantMethod
from shardline.worker.loader.weights import LazyWeight
from shardline.worker.parallel.context import ParallelContext


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows are split across ranks; rows a rank lacks contribute zeros and an
    all-reduce completes every lookup."""

    def __init__(self, vocab_size: int, hidden: int, ctx: ParallelContext, dtype: torch.dtype,
                 device: torch.device | str | None = None, quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        padded = -(-vocab_size // ctx.world_size) * ctx.world_size
        self.rows = padded // ctx.world_size
        self.start = ctx.rank * self.rows
        self.dtype, self.device = dtype, device
        self.quant = quant if quant is not None and quant.active else None
        self.weight = None if self.quant is not None else \
            nn.Parameter(torch.zeros(self.rows, hidden, dtype=dtype, device=device), requires_grad=False)
        self.stager = QuantizedWeightStager(self.rows, hidden) if self.quant is not None else None
        self.quant_method: QuantMethod | None = None

    def float_weight(self) -> nn.Parameter:
        """The float weight; a RuntimeError on a quantized table (its weight is quant_method)."""
        if self.weight is None:
            raise RuntimeError("a quantized embedding has no float weight: use its quant_method")
        return self.weight

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant_method is None:
            return F.embedding(ids, self.float_weight())
        return self.quant_method.embed(ids, self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return self._lookup(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = self._lookup(local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.ctx.all_reduce(out)

    def finish_loading(self) -> None:
        """Pack the staged rows (padding rows zero) into the scheme's embedding storage."""
        if self.stager is None or self.quant is None:
            return
        if not self.stager.pieces:  # a rank whose rows are all vocabulary padding
            self.stager.add(0, torch.zeros(self.rows, self.stager.cols), "vocabulary padding")
        self.quant_method = self.quant.build_embedding(self.stager.ordered(pad_rows_to=self.rows), self.dtype,
                                                       self.device)
        self.stager = None

    def load(self, name: str, w: LazyWeight) -> None:
        n = max(0, min(self.rows, self.vocab_size - self.start))
        if n and self.stager is not None:
            piece = w.read_quantized(0, self.start, n)
            self.stager.add(0, piece if piece is not None else w.read(0, self.start, n), name)
        elif n:
            src, weight = w.read(0, self.start, n), self.float_weight()
            if tuple(src.shape[1:]) != tuple(weight.shape[1:]):
                raise ValueError(f"weight {name}: expected rows of {weight.shape[1]}, checkpoint has {tuple(src.shape)}")
            weight[:n].copy_(src.to(weight.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits; each rank computes its slice and the slices are
    gathered so that the caller (rank 0's sampler) sees the full vocabulary. `impl` picks the
    matmul as in layers.linear.linear (at batch 1 the LM head is one of the largest weight reads)."""

    impl = "auto"

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            local = self.quant_method(hidden)
        else:
            local = linear(hidden, self.float_weight(), None, self.impl)
        full = self.ctx.all_gather_last_dim(local)
        return full[..., : self.vocab_size]
