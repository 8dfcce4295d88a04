"""Mixture-of-experts families (Qwen3-MoE, Mixtral): their configs parse, experts are placed per
rank, the fused experts' Triton kernel equals the torch path, and checkpoints load (their logits
and 32 greedy tokens against transformers are in test_model_parity.py with the dense families)."""

from __future__ import annotations

import pytest
import torch

from shardline.worker.config import ConfigError, ModelConfig
from shardline.worker.kernels.fused_moe import align_pairs_to_experts, fused_moe, fused_moe_reference
from shardline.worker.layers.moe import ExpertPlacement, SparseMoeBlock
from shardline.worker.parallel.context import ParallelContext
from kernel_cases import interpreter  # noqa: F401  (fixture)
from test_model_parity import _Greedy, _load
from tiny_models import hf_config, prompts, write_tiny_checkpoint


def _config_dict(arch: str, **overrides) -> dict:
    """config.json's dict of a tiny config (no `architectures`: the model_type names the family)."""
    return hf_config(arch, **overrides).to_dict()


def test_configs_give_each_familys_routing_and_sparse_layers():
    qwen = ModelConfig.from_hf_config(_config_dict("qwen3_moe", decoder_sparse_step=2, mlp_only_layers=[]))
    assert qwen.moe is not None and qwen.qk_norm
    assert (qwen.moe.num_experts, qwen.moe.num_experts_per_tok, qwen.moe.intermediate_size) == (8, 2, 32)
    assert qwen.moe.renormalize
    assert [qwen.moe.is_sparse_layer(i) for i in range(3)] == [False, True, False]  # (i + 1) % 2 == 0
    default = ModelConfig.from_hf_config(_config_dict("qwen3_moe"))
    assert default.moe is not None and [default.moe.is_sparse_layer(i) for i in range(3)] == [True, False, True]
    mixtral = ModelConfig.from_hf_config(_config_dict("mixtral"))
    assert mixtral.moe is not None and mixtral.moe.renormalize and not mixtral.qk_norm
    assert mixtral.moe.intermediate_size == 32 and all(mixtral.moe.is_sparse_layer(i) for i in range(2))
    # Parameters: 8 experts of 3 * 64 * 32 plus a 8 x 64 router per sparse layer; a token runs 2 experts.
    assert mixtral.mlp_params(0) == 8 * 3 * 64 * 32 + 8 * 64
    assert mixtral.mlp_params(0, active=True) == 2 * 3 * 64 * 32 + 8 * 64


def test_a_top_k_larger_than_the_expert_count_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.from_hf_config(_config_dict("mixtral", num_experts_per_tok=9))


@pytest.mark.parametrize("experts, tp, mode, first, local, inter", [
    (8, 1, "expert", 0, 8, 32), (8, 4, "expert", 6, 2, 32), (6, 4, "sliced", 0, 6, 8)])
def test_experts_are_dealt_whole_when_they_divide_the_group_else_sliced(experts, tp, mode, first, local, inter):
    moe = ModelConfig.from_hf_config(_config_dict("mixtral", num_local_experts=experts)).moe
    assert moe is not None
    p = ExpertPlacement.plan(moe, ParallelContext(rank=tp - 1, world_size=tp))  # the last rank
    assert (p.mode, p.first_expert, p.num_local_experts, p.intermediate_size) == (mode, first, local, inter)


def test_alignment_pads_each_experts_run_to_whole_blocks_and_drops_remote_experts():
    ids = torch.tensor([[3, 0], [3, 5], [0, 3]])  # pairs 0..5; local experts 0..3 (5 lives elsewhere)
    a = align_pairs_to_experts(ids, num_local=4, block_m=4)
    assert a.block_expert.tolist()[:2] == [0, 3] and set(a.block_expert.tolist()[2:]) == {-1}
    assert a.sorted_pairs.tolist()[:8] == [1, 4, 6, 6, 0, 2, 5, 6]  # 6 = num_pairs marks padding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens, first_expert", [(1, 0), (37, 0), (37, 2)])
def test_triton_fused_moe_equals_the_torch_path(interpreter, dtype, num_tokens, first_expert):
    g = torch.Generator().manual_seed(num_tokens)
    hidden, inter, experts, top_k = 64, 48, 8, 2  # inter not a power of two: masked tiles
    local = experts if first_expert == 0 else 4  # experts 2..5 here, the others on other ranks
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (0.1 * torch.randn(local, 2 * inter, hidden, generator=g)).to(dtype)
    w2 = (0.1 * torch.randn(local, hidden, inter, generator=g)).to(dtype)
    weights, ids = torch.randn(num_tokens, experts, generator=g).softmax(-1).topk(top_k)
    ref = fused_moe_reference(x, w13, w2, weights, ids, first_expert)
    got = fused_moe(x, w13, w2, weights, ids, first_expert, impl="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol)
    assert ref.abs().max() > 0.1  # not trivially zero


def test_torch_path_is_the_sum_over_chosen_experts_of_weighted_gated_mlps():
    g = torch.Generator().manual_seed(0)
    x, w13, w2 = torch.randn(5, 16, generator=g), torch.randn(4, 24, 16, generator=g), torch.randn(4, 16, 12, generator=g)
    weights, ids = torch.rand(5, 2, generator=g), torch.tensor([[0, 3], [1, 2], [3, 1], [2, 0], [0, 1]])
    expected = torch.zeros(5, 16)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            expected[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(h[:12]) * h[12:]))
    assert torch.allclose(fused_moe_reference(x, w13, w2, weights, ids), expected, atol=1e-5)


def test_qwen3_moe_without_norm_topk_prob_and_with_a_dense_layer_gives_transformers_logits(tmp_path):
    """The families' logits and greedy tokens are checked in test_model_parity.py; here the other
    Qwen3-MoE routing (top-k probabilities not renormalised) and the sparse/dense layer layout."""
    hf = write_tiny_checkpoint("qwen3_moe", tmp_path, norm_topk_prob=False)
    model = _load(tmp_path)
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in model.decoder_layers] == [True, False, True]
    batch = prompts(3, seed=1)
    logits = _Greedy(model, batch).logits_all_positions(batch)
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in batch])
    assert (logits - ref).abs().max().item() <= 1e-4


def test_the_models_logits_with_triton_experts_equal_the_torch_paths(tmp_path, interpreter):
    """The GPU path's expert kernels (through the interpreter) inside the model: one mixed prefill."""
    write_tiny_checkpoint("qwen3_moe", tmp_path)
    model = _load(tmp_path)
    batch = prompts(3, seed=3)
    ref = _Greedy(model, batch).logits_all_positions(batch)
    for layer in model.decoder_layers:
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp.impl = "triton"  # only the experts: the other kernels have their own tests
    got = _Greedy(model, batch).logits_all_positions(batch)
    assert (got - ref).abs().max().item() <= 1e-4


def test_a_checkpoint_missing_an_expert_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    write_tiny_checkpoint("mixtral", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="experts.5.w3"):
        _load(tmp_path)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_gguf_of_the_family_gives_transformers_logits(arch, tmp_path, monkeypatch):
    """llama.cpp's layout: Mixtral as a `llama` file with experts, Qwen3-MoE as `qwen3moe`, each
    part of all experts stacked in one tensor; loaded, the model computes what transformers computes
    from the safetensors of the same weights."""
    from shardline.worker.attention.torch_backend import TorchAttentionBackend
    from shardline.worker.loader.source import resolve_model
    from shardline.worker.model import LlamaForCausalLM
    from shardline.worker.parallel.context import SINGLE
    from tiny_models import make_hf_model, write_tiny_gguf

    monkeypatch.setenv("SHARDLINE_CACHE_DIR", str(tmp_path / "cache"))
    hf = make_hf_model(arch)
    source = resolve_model(str(write_tiny_gguf(hf, tmp_path / f"{arch}.gguf")))
    cfg = ModelConfig.from_hf_config(source.hf_config())
    assert cfg.architecture == {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[arch]
    assert cfg.moe is not None and (cfg.moe.num_experts, cfg.moe.num_experts_per_tok) == (8, 2)
    model = LlamaForCausalLM(cfg, SINGLE, TorchAttentionBackend(), torch.float32, "cpu")
    model.load_weights(source.iter_weights(show_progress=False))
    batch = prompts(3, seed=4)
    logits = _Greedy(model.eval(), batch).logits_all_positions(batch)
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in batch])
    assert (logits - ref).abs().max().item() <= 1e-4
