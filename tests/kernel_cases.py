"""Shared by the kernel tests: interpreter set-up, its fixture, and builders of random paged-KV batches.

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
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shardline.worker.attention.metadata import AttentionMetadata
from shardline.worker.kernels.runtime import HAS_TRITON, interpreter_ready


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
