"""What one step's attention needs to know about the flat, mixed batch, and the backend interface.

Layout (shared by every backend and the block manager):
- a step's tokens are flat: sequence i owns rows query_start_loc[i] : query_start_loc[i+1];
- its new tokens are the last `query_len` of its `seq_len` context tokens, so token r of sequence i
  sits at position seq_len - query_len + r and attends causally to positions 0 ..= that position;
- each layer's cache is one tensor `[2, num_blocks, block_size, num_kv_heads, head_dim]`
  (index 0 keys, 1 values); token t of a sequence lives in block block_table[t // block_size] at
  offset t % block_size, i.e. flat slot block * block_size + offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from shardline.worker.attention.kv_cache_dtype import KVScales


@dataclass
class DecodeGather:
    """What the torch backend's decode attention derives from the metadata, once per step for all
    layers: the cache blocks to gather and which of their positions each sequence attends to."""

    block_index: torch.Tensor  # [num_seqs * blocks] int64: flattened block table up to max_len
    num_seqs: int
    max_len: int
    mask: torch.Tensor | None  # [num_seqs, 1, 1, max_len] bool (True = attend); None when every length is max_len


@dataclass
class StepMemo:
    """Values every layer of a step would otherwise recompute from the same inputs (CPU decode runs
    ~30 layers of small ops, where each op's dispatch costs as much as its arithmetic). Filled lazily
    by the first layer that needs a value; lives as long as the step's metadata."""

    # (positions, cos [T, 1, head_dim], sin with its first half negated) by the rotary's settings.
    rope: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    all_slots_valid: bool | None = None  # whether no row of slot_mapping is padding (-1)
    decode_gather: DecodeGather | None = None
    longest_contexts: tuple[int, int] | None = None  # (decode, prefill) tokens: the Triton split choice


@dataclass
class AttentionMetadata:
    """Per-step inputs to attention, built once by the model runner and shared by all layers."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token (-1: padding, not written)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: prefix sums of query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new tokens)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]  # host copies, so the reference backend never syncs with the device
    seq_lens_cpu: list[int]
    memo: StepMemo = field(default_factory=StepMemo)
    # Hybrid models (worker/engine/kv_cache_groups.py): the metadata of KV-cache groups 1.. (their
    # own slot_mapping and block_tables, the same lengths); the fields above are group 0's.
    groups: list[AttentionMetadata] = field(default_factory=list)

    def for_group(self, group: int) -> AttentionMetadata:
        """The metadata a layer of KV-cache group `group` attends with (self when the step carries
        one table for every layer)."""
        return self.groups[group - 1] if group and self.groups else self

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """Writes a step's new keys and values into the paged cache and attends over it."""

    name: str

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: KVScales | None = None) -> None:
        """key, value: [num_tokens, num_kv_heads, head_dim]; stored at meta.slot_mapping (an FP8
        cache stores e4m3 codes of x / kv_scales, worker/attention/kv_cache_dtype.py)."""
        ...

    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        *, sliding_window: int | None = None, logit_softcap: float | None = None,
        kv_scales: KVScales | None = None,
    ) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_dim] -> output of the same shape (causal, GQA). With
        `sliding_window` w a query at position p sees keys p - w < k <= p only (blocks older than
        its window may have been released and must not be read); `logit_softcap` c turns each
        scaled score s into c * tanh(s / c) before the softmax (Gemma 2); an FP8 cache's codes
        read as code * kv_scales."""
        ...


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """'torch' (reference, any device), 'triton' (CUDA, or the interpreter), or 'auto'."""
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            try:
                import triton  # noqa: F401

                name = "triton"
            except ImportError:
                pass
    if name == "torch":
        from shardline.worker.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from shardline.worker.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention backend: {name!r} is not one of auto, torch, triton")
