"""Gemma 2 and Gemma 3 text GGUF files (llama.cpp's `gemma2` / `gemma3` architectures): the tensor
names and norm convention llama.cpp's converter uses, and the config fields such a file does not
carry, derived the way llama.cpp derives them when it loads the file.

What the converter (llama.cpp convert_hf_to_gguf.py, Gemma2Model / Gemma3Model) writes:
  * the usual shape keys, `{arch}.attention.key_length` (= head_dim), `{arch}.attention.sliding_window`,
    Gemma 2's `{arch}.attn_logit_softcapping` and both families' `{arch}.final_logit_softcapping`,
    Gemma 3's `{arch}.rope.freq_base` (the global layers' base) and its linear rope scaling;
  * every `*norm.weight` as 1 + w (Gemma's RMSNorm scales by 1 + w): read back here as w, so the
    weight stream keeps Hugging Face's convention and the model adds the 1 as it does for safetensors;
  * no lm_head (the embeddings are tied), and the embedding rows cut to the tokenizer's vocabulary.

What it does not write, and how it is derived here (as llama.cpp's llama-model.cpp does):
  * query_pre_attn_scalar: head_dim, except for the 27B models (Gemma 2: 46 layers, Gemma 3: 62),
    whose scalar is hidden_size / num_attention_heads (gemma_pytorch's config.py, which llama.cpp
    cites; the released config.json files agree: Gemma 2 2B/9B and Gemma 3 1B/4B/12B 256 = head_dim,
    Gemma 2 27B 144 = 4608 / 32, Gemma 3 27B 168 = 5376 / 32). A file with `{arch}.attention.scale`
    (a direct softmax scale) gives scale ** -2 instead.
  * which layers are windowed: Gemma 2 every other layer from the first (llama.cpp's swa pattern 2),
    Gemma 3 all but every 6th (pattern 6, `sliding_window_pattern` in Gemma 3's config); a file with
    `{arch}.attention.sliding_window_pattern` (a period or one flag per layer) gives its own. A Gemma 3
    file without a window has only global layers (as llama.cpp reads it).
  * Gemma 3's local rope base: 10,000 (`rope_local_base_freq` in every released Gemma 3 config), or
    `{arch}.rope.freq_base_swa` when the file has it; local layers get no rope scaling.
  * the activation, GELU with the tanh approximation (`hidden_activation` of every Gemma config).
  * the end of a chat turn: llama.cpp stops on `<end_of_turn>` as well as on eos (it finds the token
    by its text); Gemma's generation_config.json lists both ids, so the config lists both here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

GEMMA_GGUF_ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
_MODEL_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3_text"}

# Gemma's block tensors whose llama.cpp names mean something else in the Llama family: `ffn_norm` is
# the norm before the MLP (pre_feedforward_layernorm), and the sandwich norms have names of their own.
GEMMA_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Layer count of the 27B models, whose query scalar is hidden / heads (llama.cpp's LLM_TYPE_27B).
_LAYERS_OF_27B = {"gemma2": 46, "gemma3": 62}
_WINDOW_PERIOD = {"gemma2": 2, "gemma3": 6}
_LOCAL_ROPE_BASE = 10_000.0
END_OF_TURN = "<end_of_turn>"


def stored_norm_offset(arch: str, gguf_name: str) -> float:
    """What llama.cpp's converter added to this tensor: 1.0 for a Gemma norm weight, else 0.0."""
    return 1.0 if arch in GEMMA_GGUF_ARCHITECTURES and gguf_name.endswith("norm.weight") else 0.0


def gemma_config_fields(arch: str, key: Callable[[str, Any], Any], cfg: dict[str, Any],
                        tokens: list[str] | None) -> dict[str, Any]:
    """The Hugging Face config fields of a Gemma 2/3 GGUF beyond the Llama family's shape keys.
    `key(suffix, default)` reads `{arch}.{suffix}`; `cfg` is the config built so far (its
    num_hidden_layers, hidden_size, num_attention_heads, head_dim, eos_token_id are used);
    `tokens` is the file's vocabulary, if any (to find `<end_of_turn>`)."""
    layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    fields: dict[str, Any] = {
        "architectures": [GEMMA_GGUF_ARCHITECTURES[arch]],
        "model_type": _MODEL_TYPES[arch],
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _query_pre_attn_scalar(arch, key("attention.scale", None), layers, hidden, heads,
                                                        cfg["head_dim"]),
        # Absent keys: Gemma 2's caps default to 50 and 30 (llama.cpp's llama_hparams and transformers'
        # Gemma2Config agree), Gemma 3 has none unless the file says so.
        "attn_logit_softcapping": key("attn_logit_softcapping", 50.0 if arch == "gemma2" else None),
        "final_logit_softcapping": key("final_logit_softcapping", 30.0 if arch == "gemma2" else None),
    }
    window = key("attention.sliding_window", None)
    if window:
        fields["sliding_window"] = int(window)
        fields["layer_types"] = _layer_types(arch, key("attention.sliding_window_pattern", None), layers)
    if arch == "gemma3":
        fields["rope_theta"] = float(key("rope.freq_base", 1_000_000.0))
        fields["rope_local_base_freq"] = float(key("rope.freq_base_swa", _LOCAL_ROPE_BASE))
    eos = cfg.get("eos_token_id")
    if tokens is not None and END_OF_TURN in tokens:
        turn_end = tokens.index(END_OF_TURN)
        fields["eos_token_id"] = [eos, turn_end] if eos is not None and eos != turn_end else [turn_end]
    return fields


def _query_pre_attn_scalar(arch: str, scale: float | None, layers: int, hidden: int, heads: int,
                           head_dim: int) -> int | float:
    """An int where it is one (transformers' Gemma configs type the field as int and refuse a float
    when the derived config.json is read back, e.g. by AutoTokenizer)."""
    if scale:
        scalar = float(scale) ** -2
        return round(scalar) if abs(scalar - round(scalar)) < 1e-3 else scalar
    return hidden // heads if layers == _LAYERS_OF_27B[arch] else head_dim  # llama.cpp divides integers too


def _layer_types(arch: str, pattern: int | list[Any] | None, layers: int) -> list[str]:
    """Per layer, sliding_attention or full_attention: llama.cpp's swa pattern n windows every layer
    but each n-th (0-based layer i is global when i % n == n - 1); a list gives one flag per layer."""
    if isinstance(pattern, list):
        flags = [bool(p) for p in pattern]
    else:
        period = int(pattern) if pattern else _WINDOW_PERIOD[arch]
        flags = [i % period < period - 1 for i in range(layers)]
    return ["sliding_attention" if f else "full_attention" for f in flags]
