"""Tiny random Hugging Face checkpoints of each supported architecture, written as safetensors,
for tests that compare shardline with transformers on the same files."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "llama31", "mistral", "qwen2", "qwen3", "tied")

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
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

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
