"""Dummy weights give real model shapes without real files, and cost nothing on the meta device."""

from __future__ import annotations

import torch

from shardline.worker.attention.torch_backend import TorchAttentionBackend
from shardline.worker.config import ModelConfig
from shardline.worker.model import LlamaForCausalLM, initialize_dummy_weights
from shardline.worker.parallel.context import SINGLE

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
}


def test_llama3_8b_dummy_shapes_and_parameter_count_on_meta_device():
    cfg = ModelConfig.from_hf_config(LLAMA3_8B)
    model = LlamaForCausalLM(cfg, SINGLE, TorchAttentionBackend(), torch.bfloat16, "meta")
    initialize_dummy_weights(model)  # skips meta tensors: no 16 GB allocation
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e9, 2) == 8.03
    assert n == cfg.num_params
    attn = model.layers[0].self_attn
    assert tuple(attn.qkv_proj.weight.shape) == (4096 + 2 * 1024, 4096)
    assert tuple(model.layers[0].mlp.gate_up_proj.weight.shape) == (2 * 14336, 4096)
    assert tuple(model.lm_head.weight.shape) == (128256, 4096)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_dummy_weights_are_finite_and_seeded():
    cfg = ModelConfig.from_hf_config({**LLAMA3_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    a = LlamaForCausalLM(cfg, SINGLE, TorchAttentionBackend(), torch.float32, "cpu")
    b = LlamaForCausalLM(cfg, SINGLE, TorchAttentionBackend(), torch.float32, "cpu")
    initialize_dummy_weights(a, seed=3)
    initialize_dummy_weights(b, seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.isfinite(pa).all(), name
        assert torch.equal(pa, pb), name
    assert a.layers[0].mlp.down_proj.weight.abs().max() <= 1e-3
