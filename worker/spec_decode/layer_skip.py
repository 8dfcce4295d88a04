"""`layer_skip` self-draft: the target's own first N layers, then its final norm and LM head, draft
for it (early exit as in LayerSkip / Draft & Verify), so every model can speculate without a second
checkpoint. The draft shares the target's weights (no copy) and keeps its own paged KV cache for
those N layers, run by draft_model.py's DraftModelProposer like any draft model."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from shardline.worker.attention.metadata import AttentionMetadata
from shardline.worker.config import ConfigError, EngineConfig
from shardline.worker.engine.model_runner import allocate_kv_caches
from shardline.worker.spec_decode.draft_model import DraftModelProposer

if TYPE_CHECKING:
    from shardline.worker.engine.engine import LLMEngine
    from shardline.worker.model import LlamaForCausalLM


class FirstLayers(nn.Module):
    """A view of a LlamaForCausalLM that runs only its first `num_layers` decoder layers."""

    def __init__(self, target: "LlamaForCausalLM", num_layers: int) -> None:
        super().__init__()
        self.target = target
        self.num_layers = num_layers
        self.layers = target.layers[:num_layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.target(input_ids, positions, kv_caches, meta, num_layers=self.num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)


def layer_skip_proposer(config: EngineConfig, engine: "LLMEngine") -> DraftModelProposer:
    """A DraftModelProposer over FirstLayers(target, speculative_draft_layers). Needs the target in
    this process (tensor_parallel_size 1); raises ConfigError when the layer count is not below
    the target's."""
    target = getattr(engine.executor, "model", None)
    if target is None:
        raise ConfigError("speculative_method: 'layer_skip' needs the target model in the engine's process "
                          "(tensor_parallel_size 1)")
    n = config.speculative_draft_layers
    total = engine.model_config.num_hidden_layers
    if n is None or not 1 <= n < total:
        raise ConfigError(f"speculative_draft_layers: must be in [1, {total - 1}] (the target has {total} layers), got {n!r}")
    shape = engine.model_config
    caches = allocate_kv_caches(dataclasses.replace(shape, num_hidden_layers=n), target.num_kv_heads_per_rank,
                                engine.executor.num_blocks, config.block_size, engine.kv_cache_dtype, engine.device)
    return DraftModelProposer(FirstLayers(target, n), caches, engine.executor.num_blocks, config.block_size,
                              engine.device, shape.vocab_size, engine.max_model_len)
