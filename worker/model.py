"""The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2) over a paged KV
cache, tensor-parallel by construction. The differences between the family members are flags of
ModelConfig: qkv bias (Qwen2), per-head q/k RMSNorm (Qwen3), rope scaling (Llama 3.1+), tied
embeddings."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from shardline.worker.attention.metadata import AttentionBackend, AttentionMetadata
from shardline.worker.config import ModelConfig
from shardline.worker.kernels.activation import silu_and_mul
from shardline.worker.kernels.runtime import IMPLS
from shardline.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardline.worker.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from shardline.worker.layers.norm import RMSNorm
from shardline.worker.layers.quantization import QuantizationConfig
from shardline.worker.layers.rotary import RotaryEmbedding
from shardline.worker.loader.weights import WeightStream
from shardline.worker.parallel.context import ParallelContext


class Attention(nn.Module):
    """Self-attention over the paged cache: one QKV matmul, optional q/k norms, RoPE, cache write, attend."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: AttentionBackend,
                 dtype: torch.dtype, device, quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.qkv_bias, ctx, dtype, device, quant)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, False, ctx, dtype,
                                        device, quant)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        t = x.shape[0]
        if self.q_norm is None and not self.rotary.uses_triton(qkv):
            # q and k are adjacent in qkv: one RoPE over both heads' rows (the torch path's op count
            # is what a CPU decode step spends most of its time on).
            qk = self.rotary.rotate(positions, qkv[:, : q_size + kv_size].reshape(t, -1, self.head_dim), meta.memo)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            v = qkv[:, q_size + kv_size :].reshape(t, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.reshape(t, self.num_heads, self.head_dim)
            k = k.reshape(t, self.num_kv_heads, self.head_dim)
            v = v.reshape(t, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k, meta.memo)
        self.backend.write_kv(k, v, kv_cache, meta)
        out = self.backend.forward(q, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(t, q_size))


class MLP(nn.Module):
    """The gated MLP: one gate/up matmul, SiLU-and-multiply (one kernel on the Triton path), down."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, device,
                 quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.impl = "auto"
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [i, i], cfg.mlp_bias, ctx, dtype, device, quant)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, cfg.mlp_bias, ctx, dtype, device, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), impl=self.impl))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: AttentionBackend, dtype: torch.dtype, device,
                 quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, ctx, backend, dtype, device, quant)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, ctx, dtype, device, quant)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer output before its residual add, running residual): the add happens in the next
        norm, fused with it. `residual` is None for the first layer, whose input is the residual."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """forward() runs a flat mixed batch through the decoder and returns hidden states; the caller
    picks the rows it samples from and calls compute_logits() on those alone. `quant` (an active
    QuantizationConfig) makes every linear, the embedding and the LM head keep quantized weights."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: AttentionBackend,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.ctx = ctx
        self.quantization = quant if quant is not None else QuantizationConfig()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx, dtype, device, quant)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ctx, backend, dtype, device, quant)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx, dtype, device, quant)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fused_kernels = "auto"
        if torch.device(device or "cpu").type == "cuda":
            self._share_rope_cache()

    def set_fused_kernels(self, mode: str) -> None:
        """'auto' (Triton kernels on CUDA, plain torch elsewhere), 'triton' (always; CPU tensors run
        through the Triton interpreter, for tests) or 'torch' (never). Attention is chosen apart,
        by the attention backend."""
        if mode not in IMPLS:
            raise ValueError(f"fused_kernels: {mode!r} is not one of {', '.join(IMPLS)}")
        if mode != "torch":
            self._share_rope_cache()
        for module in self.modules():
            if hasattr(module, "impl"):
                setattr(module, "impl", mode)
        self.fused_kernels = mode

    def _share_rope_cache(self) -> None:
        """One cos/sin table for every layer (they share head_dim, theta and scaling)."""
        rotaries = [layer.self_attn.rotary for layer in self.decoder_layers]
        if not rotaries or rotaries[0].cos_sin_cache is not None:
            return
        cache = rotaries[0].build_cache(self.config.max_position_embeddings)
        for rotary in rotaries:
            rotary.cos_sin_cache = cache

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """The layers with their type (to a type checker nn.ModuleList's items are plain Modules)."""
        return cast("list[DecoderLayer]", list(self.layers))

    @property
    def num_kv_heads_per_rank(self) -> int:
        return self.decoder_layers[0].self_attn.num_kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, num_layers: int | None = None) -> torch.Tensor:
        """Hidden states after the final norm. `num_layers` runs only the first that many layers
        (the layer-skip self-draft of speculative decoding); kv_caches then needs only as many."""
        h = self.embed_tokens(input_ids)
        residual = None
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        for layer, cache in zip(layers, kv_caches):
            h, residual = layer(positions, h, residual, cache, meta)
        if residual is None:  # no layers
            return self.norm(h)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def load_weights(self, weights: WeightStream) -> set[str]:
        """Copy this rank's slices from a stream of Hugging Face-named tensors; returns the names used.
        Raises ValueError naming any weight the model expects but the stream lacks."""
        modules = dict(self.named_modules())
        seen: set[str] = set()
        for name, w in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            hf_prefix, _, leaf = name.rpartition(".")
            mod_name = hf_prefix.removeprefix("model.")
            for hf, part in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
                if mod_name.endswith("self_attn." + hf):
                    modules[mod_name.replace(hf, "qkv_proj")].load_part(part, name, w)
                    break
            else:
                for hf, index in (("gate_proj", 0), ("up_proj", 1)):
                    if mod_name.endswith("mlp." + hf):
                        modules[mod_name.replace(hf, "gate_up_proj")].load_part(index, name, w)
                        break
                else:
                    module = modules.get(mod_name)
                    if module is None:
                        raise ValueError(f"weight {name}: the model has no such parameter")
                    if hasattr(module, "load"):
                        module.load(name, w)
                    else:  # norms
                        getattr(module, leaf).copy_(w.read().to(getattr(module, leaf).dtype))
            seen.add(name)
        self._check_complete(seen)
        self.finish_loading()
        return seen

    def finish_loading(self) -> None:
        """Pack every quantized layer's staged weight once (a no-op for float models); a tied LM
        head shares the embedding's packed rows."""
        for module in self.modules():
            if module is not self.lm_head or not self.config.tie_word_embeddings:
                finish = getattr(module, "finish_loading", None)
                if finish is not None and module is not self:
                    finish()
        if self.config.tie_word_embeddings and self.embed_tokens.quant_method is not None:
            self.lm_head.quant_method = self.embed_tokens.quant_method
            self.lm_head.stager = None

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights as held in memory (packed quantized buffers included, a tied
        head counted once)."""
        seen: set[int] = set()
        total = 0
        for t in list(self.parameters()) + list(self.buffers()):
            if id(t) not in seen and t.device.type != "meta":
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def expected_weight_names(self) -> set[str]:
        cfg = self.config
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not cfg.tie_word_embeddings:
            names.add("lm_head.weight")
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                names.add(p + f"self_attn.{proj}.weight")
            if cfg.qkv_bias:
                names |= {p + f"self_attn.{x}.bias" for x in ("q_proj", "k_proj", "v_proj")}
            if cfg.qk_norm:
                names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
            names |= {p + f"mlp.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")}
            names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        return names

    def _check_complete(self, seen: set[str]) -> None:
        missing = sorted(self.expected_weight_names() - seen)
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:3])}{more}")


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    """Random weights for benchmarks at real shapes (as vLLM's --load-format dummy): uniform in a
    small range so activations stay finite; norms get 1."""
    generators: dict[torch.device, torch.Generator] = {}
    cpu_gen = torch.Generator().manual_seed(seed)
    tied_head = getattr(model, "lm_head", None) if getattr(model.config, "tie_word_embeddings", False) else None
    for module in model.modules():  # quantized layers: random float rows, quantized by finish_loading
        stager = getattr(module, "stager", None)
        if stager is not None and module is not tied_head:
            stager.add(0, torch.empty(stager.rows, stager.cols).uniform_(low, high, generator=cpu_gen), "dummy")
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        if "norm" in name:
            p.fill_(1.0)
            continue
        gen = generators.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        p.uniform_(low, high, generator=gen)
