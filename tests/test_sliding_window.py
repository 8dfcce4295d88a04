"""Sliding-window families (Gemma 2, Gemma 3 text, Mistral with a window) compute what transformers
computes on the same safetensors files, through the model alone and through the engine under
chunked prefill, preemption, prefix hits and chat prompts, with sequences several windows long;
and when every layer is windowed, the blocks that fall out of the window are released and reused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_checks import assert_all_blocks_free
from shardline.worker.attention.torch_backend import TorchAttentionBackend
from shardline.worker.config import EngineConfig, ModelConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import SamplingParams
from shardline.worker.model import LlamaForCausalLM
from shardline.worker.parallel.context import SINGLE
from test_model_parity import _Greedy, _load, _stream
from tiny_models import SLIDING_ARCHITECTURES, SLIDING_WINDOW, hf_greedy, prompts, write_tiny_checkpoint

N_NEW = 32


@pytest.fixture(scope="module", params=SLIDING_ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    """(directory, transformers model) of one tiny sliding-window architecture, written once."""
    directory = tmp_path_factory.mktemp(request.param)
    return directory, write_tiny_checkpoint(request.param, directory, seed=5)


def test_config_reads_each_layers_window_and_gemma_settings(checkpoint):
    directory, hf = checkpoint
    cfg = _load(directory).config
    expected = tuple(SLIDING_WINDOW if t == "sliding_attention" else None
                     for t in getattr(hf.config, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers)
    assert cfg.layer_sliding_windows == expected
    if cfg.architecture == "Gemma3ForCausalLM":
        assert cfg.layer_rope(0) == (10_000.0, None) and cfg.layer_rope(2) == (1_000_000.0, None)
        assert cfg.kv_release_window is None  # a global layer needs every block
    if cfg.architecture == "MistralForCausalLM":
        assert cfg.kv_release_window == SLIDING_WINDOW


def test_logits_match_transformers_past_the_window(checkpoint):
    """Every position of prompts up to 3x the window, and the window matters: the same weights
    with every layer global give other logits."""
    directory, hf = checkpoint
    model = _load(directory)
    batch = prompts(3, seed=1, min_len=2 * SLIDING_WINDOW, max_len=3 * SLIDING_WINDOW)
    logits = _Greedy(model, batch).logits_all_positions(batch)
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in batch])
    assert (logits - ref).abs().max().item() <= 1e-4
    global_cfg = dataclasses.replace(model.config, layer_sliding_windows=())
    unwindowed = LlamaForCausalLM(global_cfg, SINGLE, TorchAttentionBackend(), torch.float32, "cpu")
    unwindowed.load_weights(_stream(directory))
    assert (_Greedy(unwindowed.eval(), batch).logits_all_positions(batch) - ref).abs().max().item() > 1e-3


def test_32_greedy_tokens_match_transformers(checkpoint):
    directory, hf = checkpoint
    batch = prompts(3, seed=2, max_len=2 * SLIDING_WINDOW)
    ours = _Greedy(_load(directory), batch).generate(batch, N_NEW)
    assert ours == [hf_greedy(hf, p, N_NEW) for p in batch]
