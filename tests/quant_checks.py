"""What the quantization tests share: a model spec and engine config for a tiny checkpoint on CPU,
a greedy (or teacher-forced) paged run of a few prompts, and the logit/token agreement of two
executors over the same inputs, and TP=2 against TP=1."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shardline.worker.config import EngineConfig, ModelConfig
from shardline.worker.engine.executor import ModelSpec
from shardline.worker.engine.model_runner import SeqSlice, build_step_inputs
from shardline.worker.layers.quantization import resolve_quantization
from tiny_models import prompts

CPU = torch.device("cpu")
BLOCK = 8


def spec_for(path: Path, kind: str, quant: str | None, kv_cache_dtype: torch.dtype | None = None) -> ModelSpec:
    """A float32 CPU spec of a tiny checkpoint (kind 'gguf' or 'safetensors') under scheme `quant`
    (None: the checkpoint's own), with the torch attention reference."""
    if kind == "gguf":
        from shardline.worker.loader.gguf_source import gguf_hf_config

        hf = gguf_hf_config(path)
    else:
        hf = json.loads((path / "config.json").read_text())
    q = resolve_quantization(quant, kind, hf, CPU)
    return ModelSpec(ModelConfig.from_hf_config(hf), str(path), kind, kind, torch.float32, CPU,
                     attention_backend="torch", quantization=q, kv_cache_dtype=kv_cache_dtype)


def engine_config(tp: int = 1) -> EngineConfig:
    return EngineConfig(tensor_parallel_size=tp, device="cpu", dtype="float32", block_size=BLOCK, num_kv_blocks=64)


def greedy_run(executor, vocab: int, steps: int = 6, n: int = 3,
               feed: list[list[int]] | None = None) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill n prompts, then decode `steps` tokens; returns each step's logits and the greedy
    tokens. With `feed`, those tokens are appended instead of the greedy ones (teacher forcing, so
    two models' logits are compared on the same inputs at every step)."""
    seqs = prompts(n, vocab=vocab, seed=3, min_len=5, max_len=20)
    done, tables = [0] * n, [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(n)]
    out, toks = [], [[] for _ in range(n)]
    for step in range(steps):
        slices = [SeqSlice(s[d:], d, t, True) for s, d, t in zip(seqs, done, tables)]
        logits = executor.execute(build_step_inputs(slices, BLOCK, CPU))
        out.append(logits)
        for i, tok in enumerate(logits.argmax(-1).tolist()):
            done[i] = len(seqs[i])
            seqs[i].append(feed[i][step] if feed is not None else tok)
            toks[i].append(tok)
    return out, toks


def agreement(quant, dense, vocab: int, steps: int) -> tuple[float, float, float]:
    """(max |logit difference| / max |logit|, fraction of equal greedy tokens, largest dense top-1
    margin among positions where the greedy tokens differ) over a teacher-forced run."""
    d_logits, d_toks = greedy_run(dense, vocab, steps)
    q_logits, q_toks = greedy_run(quant, vocab, steps, feed=d_toks)
    d, q = torch.stack(d_logits), torch.stack(q_logits)
    rel = ((q - d).abs().max() / d.abs().max()).item()
    q_pick = q.argmax(-1)
    differ = q_pick != d.argmax(-1)
    margins = (d.max(-1).values - d.gather(-1, q_pick.unsqueeze(-1)).squeeze(-1))[differ]
    worst = margins.max().item() / d.abs().max().item() if differ.any() else 0.0
    return rel, 1.0 - differ.float().mean().item(), worst


def assert_tp2_equals_tp1(spec: ModelSpec, steps: int) -> None:
    """Two gloo ranks give one rank's greedy tokens, and first-step logits within 2^-6 of the
    largest: each rank rounds its partial sums to bf16 (2^-8 relative) before the all-reduce."""
    from shardline.worker.engine.executor import LocalExecutor
    from shardline.worker.parallel.executor import TensorParallelExecutor

    one = LocalExecutor(spec, engine_config(), show_progress=False)
    two = TensorParallelExecutor(spec, engine_config(2), show_progress=False)
    try:
        ref, ref_toks = greedy_run(one, 384, steps=steps)
        got, got_toks = greedy_run(two, 384, steps=steps)
        assert (got[0] - ref[0]).abs().max() <= 2.0 ** -6 * ref[0].abs().max()
        assert got_toks == ref_toks
    finally:
        two.shutdown()
