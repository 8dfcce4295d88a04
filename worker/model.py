"""The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Gemma 2, Gemma 3
text) over a paged KV cache, tensor-parallel by construction. The differences between the family
members are flags of ModelConfig: qkv bias (Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3), rope
scaling (Llama 3.1+), tied embeddings, per-layer sliding windows (Mistral, Gemma 2/3), and Gemma's
pieces: embeddings scaled by sqrt(hidden), RMSNorm by (1 + weight) (stored as 1 + weight at load),
GELU-tanh MLP, norms on the attention and MLP outputs ("sandwich"), query_pre_attn_scalar,
attention- and final-logit soft-capping, and Gemma 3's own rope base for its local layers.
Mixture-of-experts members (Qwen3-MoE, Mixtral: ModelConfig.moe) swap the dense MLP of their
sparse layers for worker/layers/moe.py's SparseMoeBlock."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from shardline.worker.attention.kv_cache_dtype import K_SCALE_CONSTANT, V_SCALE_CONSTANT, KVScales, is_fp8_kv
from shardline.worker.attention.metadata import AttentionBackend, AttentionMetadata
from shardline.worker.config import ModelConfig
from shardline.worker.kernels.activation import act_and_mul
from shardline.worker.kernels.matvec import PreNorm
from shardline.worker.kernels.rope import rope_and_write_kv
from shardline.worker.kernels.runtime import IMPLS, use_triton
from shardline.worker.layers.cpu_decode_layer import CpuDecodeLayer, fused_decode_layer
from shardline.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardline.worker.layers.moe import ExpertLoad, FusedExperts, SparseMoeBlock
from shardline.worker.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from shardline.worker.layers.norm import RMSNorm
from shardline.worker.layers.quantization import QuantizationConfig
from shardline.worker.layers.rotary import RotaryEmbedding
from shardline.worker.loader.expert_names import (
    expected_moe_weight_names,
    expert_part_names,
    model_module_name,
    parse_expert_weight,
)
from shardline.worker.loader.weights import LazyWeight, WeightStream
from shardline.worker.parallel.context import ParallelContext


# Checkpoint names of FP8 KV-cache scales (after "self_attn."): vLLM's and HF fp8's k_scale / v_scale,
# the older single kv_scale, compressed-tensors' output scales of k_proj / v_proj.
_KV_SCALE_NAMES = {"k_scale": "k", "v_scale": "v", "kv_scale": "kv",
                   "k_proj.output_scale": "k", "v_proj.output_scale": "v"}


class Attention(nn.Module):
    """Self-attention over the paged cache: one QKV matmul, optional q/k norms, RoPE, cache write, attend."""

    k_scale: torch.Tensor  # registered buffers (move with .to())
    v_scale: torch.Tensor

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: AttentionBackend,
                 dtype: torch.dtype, device, quant: QuantizationConfig | None = None, layer_index: int = 0) -> None:
        super().__init__()
        self.backend = backend
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.qkv_bias, ctx, dtype, device, quant)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, False, ctx, dtype,
                                        device, quant)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.rope = cfg.layer_rope(layer_index)  # (base, scaling): layers with equal ones share a cos/sin cache
        self.rotary = RotaryEmbedding(cfg.head_dim, self.rope[0], self.rope[1], device)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.sliding_window = cfg.sliding_window(layer_index)
        self.logit_softcap = cfg.attn_logit_softcapping
        # An FP8 KV cache's per-tensor scales (buffers, so kernels read them on the device): the
        # checkpoint's, else calibrated on the first real batch once armed, else 1.0.
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.kv_scales_from_checkpoint = False
        self.calibrate_kv_scales = False  # set by arm_kv_scale_calibration: the next forward sets them

    @property
    def kv_scales(self) -> KVScales:
        return KVScales(self.k_scale, self.v_scale)

    def load_kv_scale(self, which: str, name: str, w: LazyWeight) -> None:
        """Take a checkpoint's KV-cache scale: which = 'k', 'v' or 'kv' (one scale for both). One value
        per tensor; raises ValueError naming the tensor otherwise."""
        t = w.read().float().reshape(-1)
        if t.numel() != 1:
            raise ValueError(f"weight {name}: a KV-cache scale must be one value per tensor, got shape {tuple(w.shape)}")
        with torch.no_grad():
            if which in ("k", "kv"):
                self.k_scale.copy_(t)
            if which in ("v", "kv"):
                self.v_scale.copy_(t)
        self.kv_scales_from_checkpoint = True

    def _calibrate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scales from this batch (vLLM's calculate_kv_scales): max |k| / 200, max |v| / 100, on the
        device (no host read)."""
        tiny = torch.finfo(torch.float32).tiny
        self.k_scale.copy_((k.detach().abs().amax().float() / K_SCALE_CONSTANT).clamp_min(tiny).reshape(1))
        self.v_scale.copy_((v.detach().abs().amax().float() / V_SCALE_CONSTANT).clamp_min(tiny).reshape(1))
        self.calibrate_kv_scales = False

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                qkv: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, hidden], normed; or, with `qkv` [T, q + 2 kv] already projected (the pre-norm
        folded into the QKV matvec), x is only read for T."""
        if qkv is None:
            qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        t = x.shape[0]
        fp8_cache = is_fp8_kv(kv_cache)
        cos_sin = self.rotary.cos_sin_cache
        fused_write = (not fp8_cache and cos_sin is not None and getattr(self.backend, "name", None) == "triton"
                       and use_triton(qkv, self.rotary.impl))
        if self.q_norm is None and not fused_write and not self.rotary.uses_triton(qkv):
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
            if fused_write and cos_sin is not None:
                rope_and_write_kv(q, k, v, positions, cos_sin, kv_cache, meta.slot_mapping, impl="triton")  # one launch
            else:
                q, k = self.rotary(positions, q, k, meta.memo)
        if not fused_write:
            if self.calibrate_kv_scales and fp8_cache:
                self._calibrate(k, v)
            self.backend.write_kv(k, v, kv_cache, meta, self.kv_scales)
        out = self.backend.forward(q, kv_cache, meta, self.scale, sliding_window=self.sliding_window,
                                   logit_softcap=self.logit_softcap, kv_scales=self.kv_scales)
        return self.o_proj(out.reshape(t, q_size))


class MLP(nn.Module):
    """The gated MLP: one gate/up matmul, activation-and-multiply (SiLU, or GELU-tanh for Gemma; one
    kernel on the Triton path, or none when the down projection runs the matvec, which applies SiLU
    as it loads its input), down."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, device,
                 quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.impl = "auto"
        self.act = cfg.hidden_act
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [i, i], cfg.mlp_bias, ctx, dtype, device, quant)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, cfg.mlp_bias, ctx, dtype, device, quant)

    def forward(self, x: torch.Tensor, gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, hidden], normed; or, with `gate_up` already projected (the pre-norm folded into
        the gate/up matvec), x is unused."""
        if gate_up is None:
            gate_up = self.gate_up_proj(x)
        # decode on the matvec: SiLU-and-mul in the down projection's loads (SiLU models only)
        fused = self.down_proj.forward_gated(gate_up) if self.act == "silu" else None
        return fused if fused is not None else self.down_proj(act_and_mul(gate_up, self.act, impl=self.impl))


class DecoderLayer(nn.Module):
    """Attention and MLP with pre-norms; with cfg.sandwich_norms (Gemma) the attention output is
    normed before its residual add (post_attention_layernorm), pre_feedforward_layernorm is the MLP's
    pre-norm and post_feedforward_layernorm norms the MLP output."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: AttentionBackend, dtype: torch.dtype, device,
                 quant: QuantizationConfig | None = None, layer_index: int = 0,
                 expert_load: ExpertLoad | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, ctx, backend, dtype, device, quant, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp: MLP | SparseMoeBlock
        if cfg.moe is not None and cfg.moe.is_sparse_layer(layer_index):
            # The experts stay in float even when `quant` is active (no quantized expert kernels yet).
            slot = sum(cfg.moe.is_sparse_layer(i) for i in range(layer_index))
            self.mlp = SparseMoeBlock(cfg.hidden_size, cfg.moe, ctx, dtype, device, expert_load, slot)
        else:
            self.mlp = MLP(cfg, ctx, dtype, device, quant)
        self.pre_feedforward_layernorm: RMSNorm | None = None
        self.post_feedforward_layernorm: RMSNorm | None = None
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        # Small pure-decode batches on CPU as one C++ call (cpu_decode_layer.py); set once loaded.
        self.cpu_decode: CpuDecodeLayer | None = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer output before its residual add, running residual): the add happens in the next
        norm, fused with it. `residual` is None for the first layer, whose input is the residual."""
        if self.cpu_decode is not None and self.cpu_decode.applies(x, kv_cache, meta):
            return self.cpu_decode(positions, x, residual, kv_cache, meta)
        # Decode on the matvec: each pre-norm is folded into the next projection's loads (QKV,
        # gate/up), so it is no kernel of its own; otherwise the norm runs, then the projection.
        fused = self.self_attn.qkv_proj.forward_normed(x, PreNorm(self.input_layernorm.weight,
                                                                  self.input_layernorm.eps, residual))
        if fused is not None:
            qkv, residual = fused
            h = self.self_attn(positions, x, kv_cache, meta, qkv=qkv)
        elif residual is None:
            residual = x
            h = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        else:
            h, residual = self.input_layernorm(x, residual)
            h = self.self_attn(positions, h, kv_cache, meta)
        mlp_norm = self.post_attention_layernorm
        if self.pre_feedforward_layernorm is not None:  # Gemma's sandwich: the attention output is normed first
            h = self.post_attention_layernorm(h)
            mlp_norm = self.pre_feedforward_layernorm
        gate_up = None
        if isinstance(self.mlp, MLP):
            fused = self.mlp.gate_up_proj.forward_normed(h, PreNorm(mlp_norm.weight, mlp_norm.eps, residual))
            if fused is not None:
                gate_up, residual = fused
        if gate_up is None:
            h, residual = mlp_norm(h, residual)
        out = self.mlp(h, gate_up=gate_up) if isinstance(self.mlp, MLP) else self.mlp(h)
        if self.post_feedforward_layernorm is not None:
            return self.post_feedforward_layernorm(out), residual
        return out, residual


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
        # Tokens per expert per sparse layer, counted on the device until the engine takes them.
        self.expert_load = ExpertLoad(sum(cfg.moe.is_sparse_layer(i) for i in range(cfg.num_hidden_layers)),
                                      cfg.moe.num_experts, device) if cfg.moe is not None else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, ctx, backend, dtype, device, quant, i, self.expert_load)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx, dtype, device, quant)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Gemma: sqrt(hidden) rounded to the weights' dtype first, as transformers does (55.4256 is 55.5 in bf16).
        self.embed_scale = float(torch.tensor(cfg.embed_scale, dtype=dtype)) if cfg.embed_scale is not None else None
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
        self._attach_cpu_decode()

    def _attach_cpu_decode(self) -> None:
        """Give each layer its fused CPU decode where it applies (cpu_decode_layer.py; None elsewhere)."""
        dtype = self.norm.weight.dtype
        for i, layer in enumerate(self.decoder_layers):
            layer.cpu_decode = fused_decode_layer(layer, self.config, i, self.ctx.world_size, dtype)

    def _share_rope_cache(self) -> None:
        """One cos/sin table per distinct (theta, scaling) (one for the whole model, two for Gemma 3)."""
        caches: dict[str, torch.Tensor] = {}
        for layer in self.decoder_layers:
            rotary = layer.self_attn.rotary
            if rotary.cos_sin_cache is not None:
                continue
            key = repr(layer.self_attn.rope)
            if key not in caches:
                caches[key] = rotary.build_cache(self.config.max_position_embeddings)
            rotary.cos_sin_cache = caches[key]

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
        if self.embed_scale is not None:
            h = h * self.embed_scale
        residual = None
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        layer_group = self.config.kv_cache_groups.layer_group
        fused = [layer.cpu_decode for layer in cast("list[DecoderLayer]", layers)]
        if fused and all(fused) and cast(CpuDecodeLayer, fused[0]).applies(h, kv_caches[0], meta.for_group(layer_group[0])):
            # every layer one C++ call, without the modules' call overhead (a CPU decode step's
            # layers cost ~0.3-0.5 ms each, so per-layer Python is visible)
            for i, (step, cache) in enumerate(zip(cast("list[CpuDecodeLayer]", fused), kv_caches)):
                h, residual = step(positions, h, residual, cache, meta.for_group(layer_group[i]))
        else:
            for i, (layer, cache) in enumerate(zip(layers, kv_caches)):
                h, residual = layer(positions, h, residual, cache, meta.for_group(layer_group[i]))
        if residual is None:  # no layers
            return self.norm(h)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden rows [N, hidden] -> [N, vocab]; soft-capped (cap * tanh(x / cap))
        when the config says so (Gemma 2)."""
        logits = self.lm_head.logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

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
            expert = parse_expert_weight(name)
            if expert is not None:
                experts = modules.get(expert.module)
                if not isinstance(experts, FusedExperts) or self.config.moe is None:
                    raise ValueError(f"weight {name}: layer {expert.layer} of this model has no experts")
                if expert.expert is None:  # every expert's part in one tensor (GGUF)
                    experts.load_stacked(expert.part, name, w)
                    seen |= expert_part_names(self.config.architecture, expert.layer, self.config.moe.num_experts,
                                              expert.part)
                else:
                    experts.load_expert(expert.expert, expert.part, name, w)
                    seen.add(name)
                continue
            hf_prefix, _, leaf = name.rpartition(".")
            mod_name = model_module_name(hf_prefix.removeprefix("model."))
            kv_scale = _KV_SCALE_NAMES.get(name.rsplit("self_attn.", 1)[-1]) if "self_attn." in name else None
            if kv_scale is not None:
                attn = modules[mod_name.rsplit("self_attn", 1)[0] + "self_attn"]
                cast(Attention, attn).load_kv_scale(kv_scale, name, w)
                seen.add(name)
                continue
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
                    else:  # norms; Gemma's scale by (1 + weight), so the stored weight is 1 + the file's
                        target = getattr(module, leaf)
                        value = w.read().float()
                        if self.config.norm_unit_offset:
                            value = value + 1.0
                        target.copy_(value.to(target.dtype))
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
        self._attach_cpu_decode()

    def arm_kv_scale_calibration(self) -> int:
        """Let the next forward set the FP8 KV scales of every layer whose checkpoint gave none (call
        once start-up's dummy passes are done, so the first real batch calibrates); returns how many
        layers will calibrate."""
        layers = [layer.self_attn for layer in self.decoder_layers if not layer.self_attn.kv_scales_from_checkpoint]
        for attn in layers:
            attn.calibrate_kv_scales = True
        return len(layers)

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
            if cfg.moe is not None and cfg.moe.is_sparse_layer(i):
                names |= expected_moe_weight_names(cfg.architecture, i, cfg.moe.num_experts)
            else:
                names |= {p + f"mlp.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")}
            names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
            if cfg.sandwich_norms:
                names |= {p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"}
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
