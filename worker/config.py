"""Configuration objects of the worker layer: the model's shape (from a Hugging Face config) and
the engine's knobs. Both are validated once, here, at the edge."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from shardline.worker.engine.kv_cache_groups import KVCacheGroups, kv_cache_groups
from shardline.worker.engine.stream_coalescer import StreamPolicy

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)

# The gated MLP's activation, by its Hugging Face name (config `hidden_act` / `hidden_activation`).
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class ConfigError(ValueError):
    """A configuration value is missing, unsupported or out of range; the message names it."""


SPECULATIVE_METHODS = ("ngram", "draft_model", "layer_skip")
MAX_SPECULATIVE_TOKENS = 16  # a verification step runs k + 1 query tokens per request

# vLLM's --speculative-config JSON keys -> EngineConfig fields.
_SPECULATIVE_JSON_KEYS = {
    "method": "speculative_method",
    "num_speculative_tokens": "num_speculative_tokens",
    "model": "speculative_model",
    "prompt_lookup_min": "prompt_lookup_min",
    "prompt_lookup_max": "prompt_lookup_max",
    "draft_layers": "speculative_draft_layers",
    "adaptive": "speculative_adaptive",
    "disable_by_batch_size": "speculative_disable_by_batch_size",
}


def speculative_fields_from_json(spec: str | dict[str, Any] | None) -> dict[str, Any]:
    """EngineConfig fields from vLLM's `--speculative-config` (a JSON object or a dict), e.g.
    '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 5}'. Keys: method,
    num_speculative_tokens, model, prompt_lookup_min, prompt_lookup_max, draft_layers (layer_skip),
    adaptive. Raises ConfigError naming an unknown key or bad JSON; values are checked by EngineConfig."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, str):
        import json

        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(f"speculative_config: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"speculative_config: must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_SPECULATIVE_JSON_KEYS))
    if unknown:
        raise ConfigError(f"speculative_config: unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(_SPECULATIVE_JSON_KEYS)}")
    if "method" in spec and spec["method"] == "draft":
        spec = {**spec, "method": "draft_model"}
    return {_SPECULATIVE_JSON_KEYS[k]: v for k, v in spec.items()}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn 'bf16' / 'float32' / torch.float16 into a torch dtype, with an error naming the choices."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"dtype: unsupported value {name!r}; choose one of {', '.join(_DTYPES)}") from None


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). There bf16 halves the
    bytes a decode step reads and runs matrix products several times faster than float32; on other
    CPUs torch emulates bf16 and float32 is the faster choice."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def default_cpu_dtype() -> torch.dtype:
    """What dtype 'auto' means on CPU: $SHARDLINE_CPU_DTYPE when set (the tests set float32, so that
    greedy tokens can be compared exactly with transformers in float32), else bfloat16 where the CPU
    has native bf16 math (as vLLM's CPU backend defaults to), float32 elsewhere."""
    forced = os.environ.get("SHARDLINE_CPU_DTYPE")
    if forced:
        return parse_dtype(forced)
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass(frozen=True)
class MoEConfig:
    """The sparse MLP of a mixture-of-experts decoder (Qwen3-MoE, Mixtral): `num_experts` gated
    MLPs of `intermediate_size` each, of which a softmax router picks `num_experts_per_tok` per
    token. `renormalize`: the chosen experts' probabilities are divided by their sum (Mixtral always,
    Qwen3-MoE when its config says norm_topk_prob). Layer i is sparse unless it is listed in
    `dense_layers` or (i + 1) is not a multiple of `sparse_step` (Qwen3-MoE's decoder_sparse_step and
    mlp_only_layers); its dense layers use ModelConfig.intermediate_size."""

    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int
    renormalize: bool
    sparse_step: int = 1
    dense_layers: tuple[int, ...] = ()

    def is_sparse_layer(self, index: int) -> bool:
        """Whether decoder layer `index` (0-based) holds the experts rather than a dense MLP."""
        return index not in self.dense_layers and (index + 1) % self.sparse_step == 0

    @classmethod
    def from_hf_config(cls, arch: str, cfg: dict[str, Any]) -> "MoEConfig | None":
        """The MoE shape of a Qwen3MoeForCausalLM / MixtralForCausalLM config.json (None for dense
        architectures); raises ConfigError naming a missing or out-of-range field."""
        if arch not in MOE_ARCHITECTURES:
            return None
        # Qwen3-MoE's files say num_experts, Mixtral's num_local_experts (transformers 5 writes both spellings).
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        top_k = cfg.get("num_experts_per_tok")
        if experts is None or top_k is None:
            raise ConfigError("config.json: a mixture-of-experts model needs num_experts (or num_local_experts) "
                              "and num_experts_per_tok")
        experts, top_k = int(experts), int(top_k)
        if experts < 1 or not 1 <= top_k <= experts:
            raise ConfigError(f"config.json: num_experts_per_tok must be in [1, num_experts={experts}], got {top_k}")
        if arch == "MixtralForCausalLM":
            return cls(experts, top_k, int(cfg["intermediate_size"]), renormalize=True)
        if "moe_intermediate_size" not in cfg:
            raise ConfigError("config.json: required field 'moe_intermediate_size' is missing")
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        if step < 1:
            raise ConfigError(f"config.json: decoder_sparse_step must be >= 1, got {step}")
        return cls(experts, top_k, int(cfg["moe_intermediate_size"]), renormalize=bool(cfg.get("norm_topk_prob", False)),
                   sparse_step=step, dense_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()))


MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from a Hugging Face config.json (or GGUF metadata)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"
    moe: MoEConfig | None = None  # the experts of a mixture-of-experts model (None: dense)
    # Sliding-window attention: per layer, the window in tokens (a query at position p sees keys
    # p - window < k <= p, as transformers' sliding masks) or None for a global layer; () = all global.
    layer_sliding_windows: tuple[int | None, ...] = ()
    # Gemma 2 / Gemma 3 text (defaults: the Llama family's choices).
    hidden_act: str = "silu"  # the gated MLP's activation (gelu_pytorch_tanh: Gemma)
    norm_unit_offset: bool = False  # RMSNorms scale by (1 + weight); the loader stores 1 + weight
    embed_scale: float | None = None  # token embeddings times this (Gemma: sqrt(hidden_size), in the weights' dtype)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma's pre/post feed-forward norms)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (default: head_dim ** -0.5)
    attn_logit_softcapping: float | None = None  # attention scores become cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # so do the LM head's logits
    rope_local_theta: float | None = None  # Gemma 3: the rope base of sliding-window layers (global: rope_theta)
    rope_local_scaling: dict[str, Any] | None = None  # and their rope scaling

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face config.json; raises ConfigError naming what is wrong."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "")
        arch = archs[0] if archs else {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM",
            "mixtral": "MixtralForCausalLM",
            "gemma2": "Gemma2ForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM",
        }.get(model_type, model_type or "<missing>")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {arch!r} (model_type {model_type!r}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise ConfigError(f"config.json: required field {key!r} is missing")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        # transformers >= 5 nests rope settings in `rope_parameters` (Gemma 3: one dict per layer
        # type); older files use rope_theta / rope_scaling (Gemma 3: rope_local_base_freq).
        rope_params = dict(cfg.get("rope_parameters") or {})
        is_gemma = arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
        is_gemma3 = arch == "Gemma3ForCausalLM"
        rope_local_theta, rope_local_scaling = None, None
        if "full_attention" in rope_params or "sliding_attention" in rope_params:
            local = dict(rope_params.get("sliding_attention") or {})
            rope_params = dict(rope_params.get("full_attention") or {})
            if is_gemma3:
                rope_local_theta, rope_local_scaling = _rope_settings(local, float(
                    cfg.get("rope_local_base_freq", 10000.0)), None, int(head_dim))
        elif is_gemma3:
            rope_local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
        default_theta = 1_000_000.0 if is_gemma3 else 10000.0
        rope_theta, rope_scaling = _rope_settings(rope_params, float(cfg.get("rope_theta", default_theta)),
                                                  cfg.get("rope_scaling") or None, int(head_dim))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((int(eos),) if eos is not None else ())
        is_qwen2 = arch == "Qwen2ForCausalLM"
        is_qwen3 = arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
        num_layers = int(cfg["num_hidden_layers"])
        hidden_act = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu")
        if is_gemma and cfg.get("hidden_activation") is None and hidden_act == "gelu":
            hidden_act = "gelu_pytorch_tanh"  # transformers' Gemma ignores an old file's exact "gelu"
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act: {hidden_act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if cfg.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention: true makes an encoder, not a causal LM; not supported")
        softcaps = {}
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = cfg.get(key) if is_gemma else None
            if value is not None and not float(value) > 0:
                raise ConfigError(f"{key}: must be > 0 or null, got {value!r}")
            softcaps[key] = float(value) if value is not None else None
        if is_gemma3:  # transformers' Gemma 3 reads the key but never passes it to attention
            softcaps["attn_logit_softcapping"] = None
        scalar = cfg.get("query_pre_attn_scalar") if is_gemma else None
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else bool(cfg.get("attention_bias", False)),
            qk_norm=is_qwen3 or is_gemma3,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            moe=MoEConfig.from_hf_config(arch, cfg),
            layer_sliding_windows=_layer_sliding_windows(cfg, arch, num_layers),
            hidden_act=hidden_act,
            norm_unit_offset=is_gemma,
            embed_scale=hidden ** 0.5 if is_gemma else None,
            sandwich_norms=is_gemma,
            query_pre_attn_scalar=float(scalar) if scalar is not None else None,
            attn_logit_softcapping=softcaps["attn_logit_softcapping"],
            final_logit_softcapping=softcaps["final_logit_softcapping"],
            rope_local_theta=rope_local_theta,
            rope_local_scaling=rope_local_scaling,
        )

    def sliding_window(self, layer: int) -> int | None:
        """Layer `layer`'s attention window in tokens, or None for a global layer."""
        return self.layer_sliding_windows[layer] if self.layer_sliding_windows else None

    def layer_rope(self, layer: int) -> tuple[float, dict[str, Any] | None]:
        """(rope base, rope scaling) of layer `layer`: Gemma 3's sliding layers have their own."""
        if self.rope_local_theta is not None and self.sliding_window(layer) is not None:
            return self.rope_local_theta, self.rope_local_scaling
        return self.rope_theta, self.rope_scaling

    @functools.cached_property
    def kv_cache_groups(self) -> KVCacheGroups:
        """How the layers share the paged pool: one group, or per-kind groups for hybrid models
        such as Gemma 2/3 (worker/engine/kv_cache_groups.py)."""
        return kv_cache_groups(self.layer_sliding_windows, self.num_hidden_layers)

    @property
    def kv_release_window(self) -> int | None:
        """The window past which a sequence's KV blocks are never read again, when every layer is
        windowed (the largest window); None when some layer attends globally and needs them all."""
        windows = self.layer_sliding_windows
        if not windows or any(w is None for w in windows):
            return None
        return max(w for w in windows if w is not None)

    @property
    def num_params(self) -> int:
        """Parameter count of the whole (unsharded) model."""
        h, v, d = self.hidden_size, self.vocab_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (2 * d if self.qk_norm else 0)
        per_layer = attn + (4 if self.sandwich_norms else 2) * h
        mlps = sum(self.mlp_params(n) for n in range(self.num_hidden_layers))
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + mlps + emb + h

    @property
    def num_active_params(self) -> int:
        """Parameters one token's forward reads: num_params less the experts a mixture of experts
        does not run for it (equal to num_params for dense models). FLOPs per token and the decode
        floor's bytes per step at batch 1 follow this, not the parameter count."""
        inactive = sum(self.mlp_params(n) - self.mlp_params(n, active=True) for n in range(self.num_hidden_layers))
        return self.num_params - inactive

    def mlp_params(self, layer: int, active: bool = False) -> int:
        """Parameters of layer `layer`'s MLP: the dense one, or every expert plus the router
        (active=True: only the experts one token runs, num_experts_per_tok of them)."""
        h = self.hidden_size
        if self.moe is None or not self.moe.is_sparse_layer(layer):
            return 3 * h * self.intermediate_size
        experts = self.moe.num_experts_per_tok if active else self.moe.num_experts
        return experts * 3 * h * self.moe.intermediate_size + self.moe.num_experts * h


def _rope_settings(params: dict[str, Any], theta: float, scaling: dict[str, Any] | None,
                   head_dim: int) -> tuple[float, dict[str, Any] | None]:
    """(rope base, rope scaling or None) from a rope_parameters dict (transformers >= 5), falling
    back on the older rope_theta / rope_scaling fields; raises ConfigError for an unsupported kind."""
    theta = float(params.get("rope_theta", theta))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is None:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "freq_factors":  # shardline's own: a GGUF's rope_freqs divisors, one per rotated pair
        factors = scaling.get("freq_factors")
        if not isinstance(factors, list) or len(factors) != head_dim // 2 or not all(
                isinstance(f, (int, float)) and f > 0 for f in factors):
            raise ConfigError(f"rope_scaling: freq_factors must be {head_dim // 2} positive numbers "
                              f"(head_dim / 2), got {factors!r:.80}")
    elif rope_type not in ("llama3", "linear"):
        raise ConfigError(f"rope_scaling: rope_type {rope_type!r} is not supported; supported: llama3, linear")
    return theta, scaling


def _layer_sliding_windows(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    """Per layer, its attention window (None: global), as transformers reads the config: an explicit
    `layer_types` list wins; else Mistral windows every layer when `sliding_window` is set, Qwen2/3
    the layers from max_window_layers on when use_sliding_window is set, Gemma 2 every other layer
    from the first, Gemma 3 all but every `sliding_window_pattern`-th (default 6). () when none is."""
    window = cfg.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM") and not cfg.get("use_sliding_window", False):
        window = None
    if window is None or arch == "LlamaForCausalLM":
        return ()
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"sliding_window: must be a positive integer or null, got {window!r}")
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
            raise ConfigError(f"layer_types: need {num_layers} entries of sliding_attention / full_attention, "
                              f"got {layer_types!r:.120}")
        sliding = [t == "sliding_attention" for t in layer_types]
    elif arch == "MistralForCausalLM":
        sliding = [True] * num_layers
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        first = int(cfg.get("max_window_layers", num_layers))
        sliding = [i >= first for i in range(num_layers)]
    elif arch == "Gemma2ForCausalLM":
        sliding = [(i + 1) % 2 == 1 for i in range(num_layers)]
    else:  # Gemma 3
        pattern = int(cfg.get("sliding_window_pattern", 6))
        sliding = [(i + 1) % pattern != 0 for i in range(num_layers)]
    if not any(sliding):
        return ()
    return tuple(window if s else None for s in sliding)


def knob(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
         choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = (),
         legacy: tuple[str, ...] = ()) -> Any:
    """A config field with its documentation attached: `help` (what it does, units, what the
    default means), optional `choices`, extra flag spellings (`aliases`, e.g. "-tp") and older
    spellings kept working but hidden from --help (`legacy`). The command line
    (shardline/engine_args.py) builds every engine flag from these."""
    metadata = {"help": help, "choices": choices, "aliases": aliases, "legacy": legacy}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "stand-in")


@dataclass
class EngineConfig:
    """Knobs of one replica group's engine; the same fields in the CLI, the serve YAML and Python.
    Each field's `help` is its documentation and the text of its flag (`--max-num-seqs` for
    max_num_seqs), generated for `serve`, `generate` and `bench` alike."""

    model: str = knob("smollm2-135m", help="a directory (safetensors), a .gguf file, a Hugging Face id, "
                      "or smollm2-135m (the default model, SmolLM2-135M-Instruct)")
    dtype: str = knob("auto", help="weights and activations: auto (bfloat16 on CUDA and on CPUs with native bf16 "
                      "math, else float32; $SHARDLINE_CPU_DTYPE overrides the CPU choice), float32, bfloat16, float16")
    device: str = knob("auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    load_format: str = knob("auto", choices=LOAD_FORMATS,
                            help="how weights are read; dummy: random weights from the config (benchmarks); "
                            "stand-in: no model, tokens at a set rate with no compute, to measure the serving path "
                            "apart from the model (worker/engine/stand_in.py; extra.stand_in_step_ms sets its step time)")
    quantization: str | None = knob(None, help="weight quantization (vLLM's --quantization): none, gguf (keep a GGUF "
                                     "file's Q4_0/Q4_1/Q8_0 packed), int4, int8 (weight-only, CPU), fp8 (e4m3, "
                                     "CUDA), awq, gptq (int4 checkpoints, read from their quantization_config); "
                                     "default: the checkpoint's quantization_config, else gguf for GGUF files "
                                     "on CPU, else none (docs/quantization.md)")
    kv_cache_dtype: str = knob("auto", choices=("auto", "fp8", "fp8_e4m3"),
                               help="KV cache storage (vLLM's --kv-cache-dtype): auto (the model's dtype), fp8 / "
                               "fp8_e4m3 (e4m3 with a per-tensor scale per layer, from the checkpoint's k_scale / "
                               "v_scale, else computed from the first batch, see calculate_kv_scales): half the "
                               "bytes of bf16, twice the blocks (docs/quantization.md)")
    calculate_kv_scales: bool = knob(True, help="fp8 KV cache, layers whose checkpoint has no k_scale / v_scale: "
                                     "compute them from the first real batch (max|k| / 200, max|v| / 100, vLLM's "
                                     "calculate_kv_scales); off: 1.0, vLLM's default")
    tensor_parallel_size: int = knob(1, aliases=("-tp", "--tp"), help="ranks the model is sharded over")
    block_size: int = knob(16, help="tokens per KV-cache block (a power of two)")
    num_kv_blocks: int | None = knob(None, aliases=("--num-gpu-blocks-override",),
                                     help="KV pool size in blocks; overrides the memory budget")
    kv_cache_memory_gb: float | None = knob(None, help="CPU: KV pool budget in GiB (default: cpu_kv_cache_fraction "
                                            "of free memory)")
    cpu_kv_cache_fraction: float = knob(0.1, help="CPU: fraction of free memory the KV pool takes, in (0, 1]")
    gpu_memory_utilization: float = knob(0.9, help="CUDA: fraction of the device's memory for weights, activations "
                                         "and the KV pool, in (0, 1]")
    max_model_len: int | None = knob(None, help="context limit in tokens (default: the model's max_position_embeddings)")
    max_num_seqs: int = knob(256, help="most requests in one step's batch")
    max_num_batched_tokens: int = knob(2048, help="token budget of one step (decodes plus prefill chunks)")
    enable_prefix_caching: bool = knob(True, legacy=("--prefix-cache",),
                                       help="reuse the KV blocks of prompts' shared prefixes")
    enable_chunked_prefill: bool = knob(True, help="split long prompts into chunks that share steps with decodes")
    enforce_eager: bool = knob(False, help="CUDA: never capture CUDA graphs")
    attention_backend: str = knob("auto", choices=("auto", "torch", "triton"),
                                  help="auto: Triton kernels on CUDA, torch elsewhere")
    async_scheduling: bool | None = knob(None, help="schedule step N+1 while step N runs on the device (its sampled "
                                         "tokens feed N+1 there); default: on CUDA, off on CPU, where nothing overlaps")
    seed: int = knob(0, help="seed of the generator unseeded requests sample from, and of dummy weights")
    max_queue_len: int = knob(1024, help="waiting requests beyond this are rejected as overload")
    max_stop_strings: int = knob(16, help="most stop strings one request may carry (each is checked against every "
                                 "new piece of text; docs/security.md)")
    max_stop_string_len: int = knob(256, help="longest stop string, in characters (docs/security.md)")
    # Speculative decoding (worker/spec_decode/, docs/speculative-decoding.md). vLLM spells the same
    # settings as the JSON --speculative-config; `speculative_fields_from_json` maps that JSON onto
    # these flat fields (the CLI and the serve YAML accept both forms).
    speculative_method: str | None = knob(None, help="speculative decoding: ngram (prompt lookup), draft_model (a "
                                          "small model with the same tokenizer) or layer_skip (the target's first "
                                          "speculative_draft_layers layers); default: off")
    num_speculative_tokens: int | None = knob(None, help="k: tokens proposed per request and step (required with "
                                              "a speculative_method)")
    speculative_model: str | None = knob(None, help="draft_model: the draft checkpoint (same forms as --model)")
    prompt_lookup_min: int = knob(2, help="ngram: the shortest suffix n-gram looked up")
    prompt_lookup_max: int = knob(5, help="ngram: the longest suffix n-gram looked up (tried first)")
    speculative_draft_layers: int | None = knob(None, help="layer_skip: how many of the target's layers draft")
    speculative_adaptive: bool = knob(True, help="adapt k per request to its recent acceptance (1..num_speculative_tokens)")
    speculative_disable_by_batch_size: int | None = knob(None, help="propose nothing while this many requests or "
                                                         "more are running (a large batch is compute-bound); "
                                                         "default: always propose")
    # Streaming (worker/engine/stream_coalescer.py). 50 ms is Ray Serve LLM's
    # stream_batching_interval_ms default and what 64 streams need to stay within ~1.3k items/s, the
    # Serve path's measured ceiling on a 2-core machine (docs/performance.md).
    stream_interval_ms: float = knob(50.0, help="after a request's first token (sent at once), the longest its "
                                     "deltas are merged into one streamed item when many streams are open, in ms; "
                                     "0: off (vLLM's --stream-interval, Ray Serve LLM's stream_batching_interval_ms)")
    stream_items_per_s: float = knob(1000.0, help="streamed items per second the serving path is sized for: the "
                                     "merge gap per stream is open streams / this, capped at stream_interval_ms")
    special_tokens_in_content: bool = knob(False, help="parse control tokens (e.g. <|im_end|>) inside chat message "
                                           "contents, as before the hardening; off: only the chat template's own "
                                           "markup becomes control tokens (docs/security.md)")
    extra: dict[str, Any] = knob(default_factory=dict, help="experimental knobs as a JSON object: fused_kernels "
                                 "(auto|triton|torch), tp_timeout_s, tp_startup_timeout_s, fault_injection")

    def __post_init__(self) -> None:
        checks = [
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, ">= 1"),
            ("block_size", self.block_size >= 1 and (self.block_size & (self.block_size - 1)) == 0, "a power of two"),
            ("max_num_seqs", self.max_num_seqs >= 1, ">= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, ">= 1"),
            ("gpu_memory_utilization", 0.0 < self.gpu_memory_utilization <= 1.0, "in (0, 1]"),
            ("cpu_kv_cache_fraction", 0.0 < self.cpu_kv_cache_fraction <= 1.0, "in (0, 1]"),
            ("max_queue_len", self.max_queue_len >= 1, ">= 1"),
            ("max_stop_strings", self.max_stop_strings >= 0, ">= 0"),
            ("max_stop_string_len", self.max_stop_string_len >= 1, ">= 1"),
            ("stream_interval_ms", 0.0 <= self.stream_interval_ms < float("inf"), ">= 0 and finite"),
            ("stream_items_per_s", 0.0 < self.stream_items_per_s < float("inf"), "> 0 and finite"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"{name}: must be {want}, got {getattr(self, name)!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks: must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len: must be >= 1, got {self.max_model_len}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        if self.load_format == "stand-in" and self.tensor_parallel_size != 1:
            raise ConfigError(f"tensor_parallel_size: the stand-in engine has no model to shard; got "
                              f"{self.tensor_parallel_size}, must be 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda")
        if self.dtype != "auto":
            try:
                parse_dtype(self.dtype)
            except ConfigError:
                raise ConfigError(f"dtype: unsupported value {self.dtype!r}; choose auto or one of "
                                  f"{', '.join(_DTYPES)}") from None
        from shardline.worker.layers.quantization.config import QUANTIZATION_NAMES

        if self.quantization is not None and self.quantization not in QUANTIZATION_NAMES:
            raise ConfigError(f"quantization: {self.quantization!r} is not one of {', '.join(QUANTIZATION_NAMES)}")
        self._check_speculative()

    def _check_speculative(self) -> None:
        """One clear error per bad speculative setting (each names its field, the limit and the value)."""
        method = self.speculative_method
        if method is None:
            if self.num_speculative_tokens not in (None, 0):
                raise ConfigError(f"num_speculative_tokens: needs speculative_method (one of "
                                  f"{', '.join(SPECULATIVE_METHODS)}), got {self.num_speculative_tokens}")
            return
        if method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative_method: {method!r} is not one of {', '.join(SPECULATIVE_METHODS)}")
        k = self.num_speculative_tokens
        if k is None or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"num_speculative_tokens: must be in [1, {MAX_SPECULATIVE_TOKENS}] with "
                              f"speculative_method {method!r}, got {k!r}")
        if method == "ngram" and not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ConfigError(f"prompt_lookup_min / prompt_lookup_max: need 1 <= min <= max, got "
                              f"{self.prompt_lookup_min} / {self.prompt_lookup_max}")
        limit = self.speculative_disable_by_batch_size
        if limit is not None and limit < 1:
            raise ConfigError(f"speculative_disable_by_batch_size: must be >= 1 or None, got {limit}")
        if method == "draft_model" and not self.speculative_model:
            raise ConfigError("speculative_model: required with speculative_method 'draft_model'")
        if method == "layer_skip":
            layers = self.speculative_draft_layers
            if layers is None or layers < 1:
                raise ConfigError(f"speculative_draft_layers: must be >= 1 with speculative_method 'layer_skip', "
                                  f"got {layers!r}")
            if self.tensor_parallel_size > 1:
                raise ConfigError("speculative_method: 'layer_skip' runs the target's own layers in the engine's "
                                  f"process and needs tensor_parallel_size 1, got {self.tensor_parallel_size}")

    @property
    def speculative_enabled(self) -> bool:
        return self.speculative_method is not None

    @property
    def needs_weights(self) -> bool:
        """Whether the model's weight files must exist (dummy and stand-in need only config.json)."""
        return self.load_format not in ("dummy", "stand-in")

    def stream_policy(self) -> StreamPolicy:
        """The StreamPolicy of this engine's streams (worker/engine/stream_coalescer.py)."""
        return StreamPolicy(interval_s=self.stream_interval_ms / 1e3, items_per_s=self.stream_items_per_s)

    def resolved_device(self) -> torch.device:
        """The device the engine runs on: cuda when present (or asked), else cpu."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_async_scheduling(self) -> bool:
        """Whether the engine overlaps scheduling with the device's step (default: on CUDA). Always
        off with speculative decoding: proposals need the previous step's tokens on the host."""
        if self.speculative_enabled:
            return False
        if self.async_scheduling is None:
            return self.resolved_device().type == "cuda"
        return bool(self.async_scheduling)

    def resolved_dtype(self) -> torch.dtype:
        """bfloat16 on CUDA, default_cpu_dtype() on CPU, unless set."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else default_cpu_dtype()
        return parse_dtype(self.dtype)

    def resolved_kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's storage dtype: the model's (auto) or float8_e4m3fn (fp8, fp8_e4m3)."""
        from shardline.worker.attention.kv_cache_dtype import resolve_kv_cache_dtype

        return resolve_kv_cache_dtype(self.kv_cache_dtype, self.resolved_dtype())

    def resolved_max_model_len(self, model: ModelConfig) -> int:
        """The context limit: max_model_len when set (never past the model's positions), else the model's."""
        limit = model.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ConfigError(f"max_model_len: {self.max_model_len} exceeds the model's max_position_embeddings {limit}")
        return self.max_model_len or limit

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
