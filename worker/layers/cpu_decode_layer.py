"""A decoder layer of a small pure-decode batch as one C++ call on CPU (quantization/decode_layer.cpp).

At batch 1 a Llama decode layer on CPU is ~60 small torch ops (norms, RoPE, the KV write, the
attention's gather, SDPA, SiLU-and-mul, residual adds) whose dispatch costs more than their
arithmetic: ~17 ms of a ~31 ms token on the default model (docs/quantization.md, "Where a CPU decode
step goes"). The fused call runs the same arithmetic in plain loops around the q4 block matmuls.

It takes a layer only where it computes exactly what the torch path does: float32 activations and
KV cache, one tensor-parallel rank, 4-bit block weights (Q4BlockCPU) in all four linears, no
biases, no q/k norms, SiLU, no sandwich norms, no sliding window or soft-cap, the torch attention
backend and torch kernels (not 'triton' fused kernels); and per step only a pure-decode batch of at
most as many sequences as the q4 kernels' integer path takes (`q4_int_dot_max_rows()`, 16). Everything else takes the module path. Numerically it differs from that
path by float32 summation order (the attention's softmax and sums, the norms' mean) only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from shardline.worker.attention.metadata import AttentionMetadata
from shardline.worker.layers.quantization.block_cpu import Q4BlockCPU, in_prompt_step
from shardline.worker.layers.quantization.cpu_extension import block_kernels

if TYPE_CHECKING:
    from shardline.worker.config import ModelConfig
    from shardline.worker.model import DecoderLayer

class CpuDecodeLayer:
    """The fused decode of one DecoderLayer: call(positions, x, residual, kv_cache, meta) returns
    (layer output before its residual add, running residual), as DecoderLayer.forward does."""

    def __init__(self, layer: "DecoderLayer", ops: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self._ops = ops
        self._layer = layer
        methods = [attn.qkv_proj.quant_method, attn.o_proj.quant_method, mlp.gate_up_proj.quant_method,  # type: ignore[union-attr]
                   mlp.down_proj.quant_method]  # type: ignore[union-attr]
        self._weights: list[torch.Tensor] = []
        for m in methods:
            assert isinstance(m, Q4BlockCPU)  # checked by fused_decode_layer
            self._weights += [m.codes, m.scales, m.offsets]
        self._eps = float(layer.input_layernorm.eps)
        self._heads, self._kv_heads = attn.num_heads, attn.num_kv_heads
        self._scale = float(attn.scale)
        self.max_rows = int(ops.q4_int_dot_max_rows())  # the integer path's rows (block_matmul.cpp)

    def applies(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step's batch takes the fused call (pure decode with no prompt row, at most
        max_rows rows, float32)."""
        return (meta.is_pure_decode and not in_prompt_step() and x.shape[0] == meta.num_seqs <= self.max_rows
                and x.dtype == torch.float32
                and kv_cache.dtype == torch.float32 and not self._layer.self_attn.calibrate_kv_scales)

    def __call__(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                 kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self._layer
        cos, sin = layer.self_attn.rotary.signed_cos_sin(positions, x.dtype, meta.memo)  # [T, 1, d] each
        out, res = self._ops.decode_layer(
            x, residual, layer.input_layernorm.weight, layer.post_attention_layernorm.weight, self._eps,
            *self._weights, cos, sin, kv_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens,
            self._heads, self._kv_heads, self._scale)
        return out, res


def fused_decode_layer(layer: "DecoderLayer", cfg: "ModelConfig", layer_index: int, world_size: int,
                       dtype: torch.dtype) -> CpuDecodeLayer | None:
    """The fused decode for this layer where it computes what the module path does (module
    docstring), else None."""
    from shardline.worker.model import MLP

    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(mlp, MLP) or world_size != 1 or dtype != torch.float32:
        return None
    if cfg.qkv_bias or cfg.qk_norm or cfg.mlp_bias or cfg.hidden_act != "silu" or cfg.sandwich_norms \
            or cfg.attn_logit_softcapping is not None or cfg.sliding_window(layer_index) is not None:
        return None
    if getattr(attn.backend, "name", None) != "torch" or layer.input_layernorm.impl == "triton" \
            or attn.rotary.impl == "triton" or mlp.impl == "triton":
        return None
    methods = [attn.qkv_proj.quant_method, attn.o_proj.quant_method, mlp.gate_up_proj.quant_method,
               mlp.down_proj.quant_method]
    if not all(isinstance(m, Q4BlockCPU) for m in methods) or attn.qkv_proj.bias is not None:
        return None
    if attn.qkv_proj.weight is not None or attn.q_norm is not None:
        return None
    ops = block_kernels()
    return CpuDecodeLayer(layer, ops) if ops is not None else None
