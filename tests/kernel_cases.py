"""Shared by the kernel tests and the GPU check (shardline/check/correctness.py): interpreter set-up,
its fixture, builders of random paged-KV batches, the attention comparison against the torch
reference, and paged prefill/decode steps on a model runner.

Interpreter set-up: Triton builds its own library functions (tl.zeros, tl.sum, ...) for the
interpreter only if TRITON_INTERPRET=1 is set before `triton` is first imported, and the choice
holds for the whole process. Importing this module (every tests/test_kernels_*.py does so first)
sets it when the machine has no CUDA device and triton is not imported yet; there the interpreter is
the only way Triton can run, so the setting cannot hurt other modules. On a GPU machine it is left
unset, the CUDA tests compile the kernels, and the interpreter tests skip. If something imported
triton earlier in compile mode, the `interpreter` fixture skips with that reason; running
`pytest tests/test_kernels_*.py` alone avoids it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shardline.worker.attention.metadata import AttentionMetadata
from shardline.worker.attention.torch_backend import TorchAttentionBackend
from shardline.worker.attention.triton_backend import TritonAttentionBackend
from shardline.worker.engine.model_runner import ModelRunner, SeqSlice, StepInputs, build_step_inputs
from shardline.worker.kernels.runtime import HAS_TRITON, interpreter_ready

# Paged steps on a model runner: block size, and blocks reserved per sequence (see `table`).
BLOCK = 8
BLOCKS_PER_SEQ = 8


@pytest.fixture
def interpreter() -> None:
    """Run this test's Triton kernels on CPU tensors through the Triton interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton (with its interpreter) is not installed")
    if not interpreter_ready():
        pytest.skip(
            "triton was imported in compile mode before TRITON_INTERPRET=1 could be set "
            "(a CUDA machine, or another module imported it first); run tests/test_kernels_*.py alone"
        )


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    pad_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(query, new_keys, new_values, kv_cache with every sequence's cached prefix filled, metadata)
    for sequences given as (query_len, seq_len); blocks are shuffled so tables are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(s + block_size - 1) // block_size for _, s in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    max_blocks = max(blocks_per_seq)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    slots: list[int] = []
    used = 0
    for i, ((q, s), nb) in enumerate(zip(seqs, blocks_per_seq)):
        row = perm[used : used + nb]
        used += nb
        tables[i, :nb] = torch.tensor(row, dtype=torch.int32)
        slots += [row[t // block_size] * block_size + t % block_size for t in range(s - q, s)]
    num_tokens = sum(q for q, _ in seqs)
    slots += [-1] * pad_tokens
    query = torch.randn(num_tokens + pad_tokens, num_heads, head_dim, generator=g).to(dtype)
    key = torch.randn(num_tokens + pad_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    value = torch.randn(num_tokens + pad_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    qlens = [q for q, _ in seqs]
    slens = [s for _, s in seqs]
    starts = [0]
    for q in qlens:
        starts.append(starts[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(slens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        max_query_len=max(qlens),
        max_seq_len=max(slens),
        query_lens_cpu=qlens,
        seq_lens_cpu=slens,
    )
    return query.to(device), key.to(device), value.to(device), cache.to(device), meta


def run_both(seqs, heads, kv_heads, head_dim, block_size, dtype=torch.float32, backend=None, pad_tokens=0, device="cpu"):
    """Write the new K/V and attend with the Triton backend and with the torch reference; return
    both outputs (real rows only) and both caches: (ours, reference, cache_ours, cache_reference)."""
    q, k, v, cache, meta = make_batch(seqs, heads, kv_heads, head_dim, block_size, dtype, device, pad_tokens=pad_tokens)
    ours, ref = backend or TritonAttentionBackend(block_n=16), TorchAttentionBackend()
    cache_ours, cache_ref = cache.clone(), cache.clone()
    ours.write_kv(k, v, cache_ours, meta)
    ref.write_kv(k, v, cache_ref, meta)
    n = sum(meta.query_lens_cpu)
    scale = head_dim**-0.5
    return ours.forward(q, cache_ours, meta, scale)[:n], ref.forward(q, cache_ref, meta, scale)[:n], cache_ours, cache_ref


def table(i: int) -> list[int]:
    """Sequence i's blocks: its own run of BLOCKS_PER_SEQ, after block 0 (which padding rows may read)."""
    return list(range(1 + i * BLOCKS_PER_SEQ, 1 + (i + 1) * BLOCKS_PER_SEQ))


def prefill(runner: ModelRunner, batch: list[list[int]], device: str = "cpu") -> list[list[int]]:
    """Prefill every prompt (block size BLOCK) and append its greedy token; returns the grown sequences."""
    slices = [SeqSlice(p, 0, table(i), True) for i, p in enumerate(batch)]
    logits = runner.execute(build_step_inputs(slices, BLOCK, torch.device(device)))
    return [p + [t] for p, t in zip(batch, logits.argmax(-1).tolist())]


def decode_inputs(seqs: list[list[int]], device: str = "cpu") -> StepInputs:
    """A pure-decode step: each sequence's last token at its last position."""
    slices = [SeqSlice(s[-1:], len(s) - 1, table(i), True) for i, s in enumerate(seqs)]
    return build_step_inputs(slices, BLOCK, torch.device(device))


def nvidia_compiler_available() -> bool:
    """Whether triton's NVIDIA backend (its ptxas) is installed: compiling for sm_90 needs no GPU."""
    if not HAS_TRITON:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def run_compile_check(*args: str) -> subprocess.CompletedProcess[str]:
    """tests/kernel_compile_check.py in a fresh process in Triton's compile mode (TRITON_INTERPRET
    unset), with `args`; its output captured as text."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, str(root / "tests" / "kernel_compile_check.py"), *args],
                          capture_output=True, text=True, env=env, cwd=root, timeout=900)
