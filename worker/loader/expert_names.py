"""Checkpoint names of mixture-of-experts weights, and the model's own names for them.

Hugging Face checkpoints store every expert as its own three matrices: Qwen3-MoE as
`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight` with the router at `mlp.gate.weight`,
Mixtral as `model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight` (w1 gate, w3 up, w2 down)
with the router at `block_sparse_moe.gate.weight`. transformers 5 fuses them in memory but writes
this layout back, so it is what both the Hub's files and the tests' tiny checkpoints hold. The
model keeps one module path for both families: `layers.L.mlp` (router `mlp.gate`, experts
`mlp.experts`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?:(\d+)\.)?(gate_proj|up_proj|down_proj|w1|w3|w2)"
    r"(\.weight)?$"
)
_PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


@dataclass(frozen=True)
class ExpertWeightName:
    """One expert matrix of a checkpoint: its layer, its expert and which of the three it is."""

    layer: int
    expert: int | None  # None: every expert's matrix stacked in one [E, ...] tensor (GGUF)
    part: str  # "gate" | "up" | "down"

    @property
    def module(self) -> str:
        """The model's module that loads it (FusedExperts)."""
        return f"layers.{self.layer}.mlp.experts"


def parse_expert_weight(name: str) -> ExpertWeightName | None:
    """The expert a checkpoint tensor belongs to, or None when it is not an expert matrix."""
    m = _EXPERT.match(name)
    if m is None or (m.group(2) is None) == (m.group(4) is not None):  # per-expert names end in .weight
        return None
    return ExpertWeightName(int(m.group(1)), int(m.group(2)) if m.group(2) is not None else None, _PARTS[m.group(3)])


def model_module_name(module: str) -> str:
    """A checkpoint module path in the model's spelling: Mixtral's `block_sparse_moe` is `mlp`."""
    return re.sub(r"(^|\.)block_sparse_moe(\.|$)", r"\1mlp\2", module)


def expert_part_names(architecture: str, layer: int, num_experts: int, part: str) -> set[str]:
    """The per-expert checkpoint names of one part ('gate', 'up', 'down') of a sparse layer."""
    if architecture == "MixtralForCausalLM":
        return {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[part]}.weight"
                for e in range(num_experts)}
    return {f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight" for e in range(num_experts)}


def expected_moe_weight_names(architecture: str, layer: int, num_experts: int) -> set[str]:
    """Every checkpoint name a sparse layer needs: its router and each expert's three matrices."""
    block = "block_sparse_moe" if architecture == "MixtralForCausalLM" else "mlp"
    names = {f"model.layers.{layer}.{block}.gate.weight"}
    for part in ("gate", "up", "down"):
        names |= expert_part_names(architecture, layer, num_experts, part)
    return names
