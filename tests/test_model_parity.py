"""The model computes what transformers computes on the same safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from shardline.worker.attention.torch_backend import TorchAttentionBackend
from shardline.worker.config import ModelConfig
from shardline.worker.engine.model_runner import ModelRunner, SeqSlice, allocate_kv_caches, build_step_inputs
from shardline.worker.loader.weights import LazyWeight
from shardline.worker.model import LlamaForCausalLM
from shardline.worker.parallel.context import SINGLE
from tiny_models import ARCHITECTURES, MOE_ARCHITECTURES, hf_greedy, prompts, write_tiny_checkpoint

BLOCK = 8


def _stream(directory):
    with safe_open(directory / "model.safetensors", "pt") as f:
        for name in f.keys():
            yield name, LazyWeight.from_tensor(f.get_tensor(name))


def _load(directory) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf_config(json.loads((directory / "config.json").read_text()))
    model = LlamaForCausalLM(cfg, SINGLE, TorchAttentionBackend(), torch.float32, "cpu")
    model.load_weights(_stream(directory))
    return model.eval()


class _Greedy:
    """A minimal paged decode loop: every sequence gets its own contiguous run of blocks."""

    def __init__(self, model, batch):
        cfg = model.config
        self.max_blocks = 16
        caches = allocate_kv_caches(cfg, model.num_kv_heads_per_rank, self.max_blocks * len(batch) + 1, BLOCK, torch.float32, torch.device("cpu"))
        self.runner = ModelRunner(model, caches, BLOCK, torch.device("cpu"))
        self.tables = [list(range(1 + i * self.max_blocks, 1 + (i + 1) * self.max_blocks)) for i in range(len(batch))]

    def logits_all_positions(self, batch):
        slices = [SeqSlice(p, 0, self.tables[i], True) for i, p in enumerate(batch)]
        inputs = build_step_inputs(slices, BLOCK, torch.device("cpu"))
        inputs.sample_rows = torch.arange(inputs.input_ids.shape[0])  # every position, not just the last
        return self.runner.execute(inputs)

    def generate(self, batch, n):
        seqs = [list(p) for p in batch]
        done = [0] * len(batch)
        outs = [[] for _ in batch]
        for _ in range(n):
            slices = [SeqSlice(s[done[i]:], done[i], self.tables[i], True) for i, s in enumerate(seqs)]
            logits = self.runner.execute(build_step_inputs(slices, BLOCK, torch.device("cpu")))
            for i, tok in enumerate(logits.argmax(-1).tolist()):
                done[i] = len(seqs[i])
                seqs[i].append(tok)
                outs[i].append(tok)
        return outs


@pytest.mark.parametrize("arch", ARCHITECTURES + MOE_ARCHITECTURES)
def test_logits_match_transformers_fp32(arch, tmp_path):
    hf = write_tiny_checkpoint(arch, tmp_path)
    model = _load(tmp_path)
    batch = prompts(5, seed=1)
    logits = _Greedy(model, batch).logits_all_positions(batch)
    row = 0
    for p in batch:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        ours = logits[row : row + len(p)]
        row += len(p)
        assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES + MOE_ARCHITECTURES)
def test_32_greedy_tokens_match_transformers(arch, tmp_path):
    hf = write_tiny_checkpoint(arch, tmp_path)
    model = _load(tmp_path)
    batch = prompts(4, seed=2)
    ours = _Greedy(model, batch).generate(batch, 32)
    for p, o in zip(batch, ours):
        assert o == hf_greedy(hf, p, 32)


def test_llama31_gguf_rope_freqs_give_transformers_logits(tmp_path, monkeypatch):
    """llama.cpp stores Llama 3.1 rope scaling as a rope_freqs tensor, not as metadata: loaded from
    such a GGUF the model computes what transformers computes with the llama3 rope parameters
    (and without the tensor it would not: the factors matter at these positions)."""
    from shardline.worker.loader.source import resolve_model
    from tiny_models import llama3_rope_freqs, make_hf_model, write_tiny_gguf

    monkeypatch.setenv("SHARDLINE_CACHE_DIR", str(tmp_path / "cache"))  # derived configs of these files
    hf = make_hf_model("llama31", num_hidden_layers=1)
    rope = hf.config.rope_parameters
    factors = llama3_rope_freqs(hf.config.head_dim, rope["rope_theta"], rope["factor"], rope["low_freq_factor"],
                                rope["high_freq_factor"], rope["original_max_position_embeddings"])
    assert 1.0 < factors.max() and (factors == 1.0).any()  # the tiny shape spans all three bands

    def logits_from(path):
        source = resolve_model(str(path))
        model = LlamaForCausalLM(ModelConfig.from_hf_config(source.hf_config()), SINGLE, TorchAttentionBackend(),
                                 torch.float32, "cpu")
        model.load_weights(source.iter_weights(show_progress=False))
        return _Greedy(model.eval(), batch).logits_all_positions(batch)

    batch = prompts(3, seed=4, min_len=60, max_len=100)
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in batch])
    with_freqs = logits_from(write_tiny_gguf(hf, tmp_path / "llama31.gguf", rope_freqs=factors))
    assert (with_freqs - ref).abs().max().item() <= 1e-4
    without = logits_from(write_tiny_gguf(hf, tmp_path / "llama31-no-freqs.gguf"))
    assert (without - ref).abs().max().item() > 1e-3
