"""Shared by the kernel tests: the interpreter fixture and builders of random paged-KV batches.

Why a fixture and not TRITON_INTERPRET=1 at import: the kernels (worker/kernels/runtime.py `Kernel`)
build their compiled or interpreted variant at launch, so import order does not matter; setting the
variable only for the duration of each CPU test keeps it from leaking into other modules of the same
session (on the GPU machine, CUDA tests must compile, not interpret).
"""

from __future__ import annotations

import pytest
import torch

from shardline.worker.attention.metadata import AttentionMetadata
from shardline.worker.kernels.runtime import HAS_TRITON


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run this test's Triton kernels on CPU through the Triton interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton (with its interpreter) is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


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
