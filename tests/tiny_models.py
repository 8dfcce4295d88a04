"""Tiny random Hugging Face checkpoints of each supported architecture, written as safetensors,
for tests that compare shardline with transformers on the same files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("llama", "llama31", "mistral", "qwen2", "qwen3", "tied")
# Mixture-of-experts families (tests/test_moe*.py): 8 experts, top 2. The Qwen3-MoE one has a dense
# layer among its sparse ones (mlp_only_layers) and renormalises its top-k (norm_topk_prob, as
# Qwen3-30B-A3B does); Mixtral always renormalises.
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral")
# Sliding-window families, with a 16-token window so that short sequences already leave it:
# Gemma 2 (alternating local/global layers, both soft-caps, query_pre_attn_scalar != head_dim),
# Gemma 3 text (local, local, global; q/k norms; its own rope base on local layers) and Mistral with
# a window on every layer (the case whose out-of-window KV blocks are released).
SLIDING_ARCHITECTURES = ("gemma2", "gemma3", "mistral_sw")
SLIDING_WINDOW = 16

_COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_config(arch: str, **overrides):
    """A transformers config object of the named tiny architecture."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config,
                              Qwen3Config, Qwen3MoeConfig)

    kw = dict(_COMMON)
    kw.update(overrides)
    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "llama31":
        kw["rope_parameters"] = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**kw)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **kw)
    if arch == "qwen2":
        return Qwen2Config(**kw)
    if arch == "qwen3":
        kw["head_dim"] = 32  # deliberately != hidden / heads
        return Qwen3Config(**kw)
    if arch == "tied":
        return LlamaConfig(tie_word_embeddings=True, **kw)
    if arch == "qwen3_moe":
        moe = dict(num_hidden_layers=3, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])
        return Qwen3MoeConfig(**{**kw, **moe, **overrides})
    if arch == "mixtral":
        moe = dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
        return MixtralConfig(sliding_window=None, **{**kw, **moe, **overrides})
    if arch == "mistral_sw":
        return MistralConfig(**{"sliding_window": SLIDING_WINDOW, **kw})
    if arch in ("gemma2", "gemma3"):
        kw = {**_COMMON, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": SLIDING_WINDOW,
              "pad_token_id": 0}
        if arch == "gemma2":  # small caps, so that tanh bends the values these weights produce
            kw.update(attn_logit_softcapping=4.0, final_logit_softcapping=8.0)
        else:
            kw.update(num_hidden_layers=3, sliding_window_pattern=3, rope_theta=1_000_000.0,
                      rope_local_base_freq=10_000.0)
        kw.update(overrides)
        return (Gemma2Config if arch == "gemma2" else Gemma3TextConfig)(**kw)
    raise ValueError(arch)


def make_hf_model(arch: str, seed: int = 0, **overrides):
    """A transformers model with weights large enough that greedy choices are not near-ties."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def write_tiny_checkpoint(arch: str, directory: Path, seed: int = 0, **overrides):
    """Save a tiny model as a safetensors directory; returns the transformers model."""
    model = make_hf_model(arch, seed, **overrides)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def prompts(n: int, vocab: int = 384, seed: int = 0, min_len: int = 3, max_len: int = 40) -> list[list[int]]:
    """n random prompts of varied lengths, avoiding the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    return out


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, never stopping early."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def llama_cpp_permute(w, n_head: int):
    """What llama.cpp's HF->GGUF converter does to q_proj/k_proj rows (interleave the rope halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(head_dim: int, theta: float, factor: float, low: float, high: float, old_len: int):
    """The per-pair divisors llama.cpp's converter stores as `rope_freqs` for Llama 3.1-style rope
    scaling, from the published formula (kept pairs 1, slowed pairs `factor`, a blend between)."""
    import math

    import numpy as np

    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# llama.cpp's Gemma names for the norms whose Llama-family names mean something else.
_GEMMA_GGUF_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                     "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def write_tiny_gguf(model, path: Path, rope_freqs=None, qtype: str | None = None, embed_qtype: str | None = None,
                    tokens: list[str] | None = None, chat_template: str | None = None) -> Path:
    """Write a transformers Llama model as a GGUF the way llama.cpp's converter lays it out (its
    tensor names, q/k rows permuted), optionally with a `rope_freqs` tensor. Float32 unless `qtype`
    (a GGML type name such as "Q4_1") quantizes every matrix with the gguf package's quantizer;
    `embed_qtype` does the same for the token embedding (default: like the other matrices).
    Mixtral (as llama.cpp writes it: a `llama` file with experts) and Qwen3-MoE (`qwen3moe`) get
    their expert metadata and each part of all experts stacked into one [E, ...] tensor.
    Gemma 2 / Gemma 3 text as its converter writes them: q/k unpermuted, norms stored as 1 + w, no
    lm_head, and only the keys it writes (no query_pre_attn_scalar, no window pattern, no local rope
    base). `tokens` (with `chat_template`): a sentencepiece vocabulary as llama.cpp stores one, the
    `<...>` tokens marked as control tokens; default: placeholder tokens, no tokenizer model."""
    import gguf
    import numpy as np

    cfg = model.config
    arch = {"qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3"}.get(cfg.model_type, "llama")
    gemma = arch.startswith("gemma")
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    stacked: dict[str, Any] = {}
    rope = getattr(cfg, "rope_parameters", None) or {}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
             "block_sparse_moe.gate": "ffn_gate_inp"}
    if gemma:
        block.update(_GEMMA_GGUF_NORMS)
    writer = gguf.GGUFWriter(str(path), arch)
    if num_experts:
        writer.add_expert_count(num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if arch == "qwen3moe":
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
            writer.add_key_length(cfg.head_dim)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_context_length(cfg.max_position_embeddings)
    rope = rope.get("full_attention", rope)  # Gemma 3: the global layers' settings
    if arch != "gemma2":  # the Gemma 2 converter writes no rope base (llama.cpp's default 10,000 applies)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":  # Gemma 3 4B-27B: linear scaling of the global layers
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if gemma:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(cfg.sliding_window)
        if cfg.attn_logit_softcapping is not None and arch == "gemma2":
            writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        if cfg.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if tokens is None:
        writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    else:
        control = gguf.TokenType.CONTROL
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_token_types([control if t.startswith("<") and t.endswith(">") else gguf.TokenType.NORMAL
                                for t in tokens])
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name == "lm_head.weight" and gemma:
            continue  # tied to the embeddings; the converter drops it
        if gemma and name.endswith("norm.weight"):
            array = array + 1.0  # Gemma's RMSNorm scales by 1 + w; the converter stores 1 + w
        if name in names:
            gguf_name = names[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            part = rest.removesuffix(".weight")
            if part.endswith("experts.gate_up_proj"):  # transformers 5 holds experts stacked, gate rows first
                half = array.shape[1] // 2
                stacked[f"blk.{layer}.ffn_gate_exps.weight"] = array[:, :half]
                stacked[f"blk.{layer}.ffn_up_exps.weight"] = array[:, half:]
                continue
            if part.endswith("experts.down_proj"):
                stacked[f"blk.{layer}.ffn_down_exps.weight"] = array
                continue
            gguf_name = f"blk.{layer}.{block[part]}.weight"
            if part == "self_attn.q_proj" and arch == "llama":
                array = llama_cpp_permute(array, cfg.num_attention_heads)
            elif part == "self_attn.k_proj" and arch == "llama":
                array = llama_cpp_permute(array, cfg.num_key_value_heads)
        kind = (embed_qtype or qtype) if gguf_name in ("token_embd.weight", "output.weight") else qtype
        array = np.ascontiguousarray(array, dtype=np.float32)
        if kind is not None and array.ndim == 2:
            qt = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qt), raw_dtype=qt)
        else:
            writer.add_tensor(gguf_name, array)
    for gguf_name, experts in stacked.items():
        writer.add_tensor(gguf_name, np.ascontiguousarray(experts, dtype=np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


CHAT_WORDS = "the capital of france is paris what hello world user assistant system tell me a story".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant{% endif %}"
)


def write_chat_tokenizer(directory: Path, words: list[str] = CHAT_WORDS, chat_template: str = CHAT_TEMPLATE,
                         specials: tuple[str, ...] = ("<unk>", "<s>", "</s>")):
    """Save a word-level tokenizer with a chat template beside a tiny checkpoint: `specials` take
    the first ids (<unk>, <s>, </s> are 0-2, as the tiny configs' bos/eos say), then `words`;
    returns transformers' tokenizer."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials, *words])}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = chat_template
    tok.save_pretrained(directory)
    return tok
