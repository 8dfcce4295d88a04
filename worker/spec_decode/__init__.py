"""Speculative decoding: proposers (ngram.py, draft_model.py with layer_skip.py) guess tokens,
rejection_sampler.py verifies them against the target in one step. See
docs/speculative-decoding.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardline.worker.config import ConfigError, EngineConfig

if TYPE_CHECKING:
    from shardline.worker.engine.engine import LLMEngine
    from shardline.worker.spec_decode.proposer import Proposer


def build_proposer(config: EngineConfig, engine: "LLMEngine") -> "Proposer":
    """The proposer config.speculative_method names, built beside the engine's target model."""
    method = config.speculative_method
    if method == "ngram":
        from shardline.worker.spec_decode.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if method == "draft_model":
        from shardline.worker.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer.from_checkpoint(config, engine)
    if method == "layer_skip":
        from shardline.worker.spec_decode.layer_skip import layer_skip_proposer

        return layer_skip_proposer(config, engine)
    raise ConfigError(f"speculative_method: {method!r} has no proposer")
