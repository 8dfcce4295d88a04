"""The Triton attention backend: a kernel scatters new K/V rows into the paged cache, one launch
attends a whole mixed batch, and decode-only steps with few programs split the context (split-K)."""

from __future__ import annotations

import math

import torch

from shardline.worker.attention.kv_cache_dtype import KVScales
from shardline.worker.attention.metadata import AttentionMetadata
from shardline.worker.kernels.kv_write import write_kv
from shardline.worker.kernels.paged_attention import paged_attention, tile_shape

_MIN_PARTITION = 256  # tokens per split below which splitting costs more than it saves
_MAX_SPLITS = 32


class TritonAttentionBackend:
    """AttentionBackend on Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    num_splits forces the split-K partition count (tests use it to exercise the reduce path);
    None picks it per step from the batch shape and the number of SMs.
    """

    name = "triton"

    def __init__(self, num_splits: int | None = None, block_n: int = 64) -> None:
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
        self.num_splits = num_splits
        self.block_n = block_n
        self._sm_count: dict[int, int] = {}

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: KVScales | None = None) -> None:
        """key, value: [num_tokens, num_kv_heads, head_dim]; stored at meta.slot_mapping (-1 skipped)."""
        write_kv(key, value, kv_cache, meta.slot_mapping, impl="triton", scales=kv_scales)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                *, sliding_window: int | None = None, logit_softcap: float | None = None,
                kv_scales: KVScales | None = None) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_dim] -> causal GQA attention output of the same shape
        (within the last `sliding_window` positions when set; scores soft-capped with logit_softcap;
        an FP8 cache's codes read as code * kv_scales)."""
        splits = self.choose_num_splits(query, kv_cache, meta)
        return paged_attention(
            query,
            kv_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.max_query_len,
            meta.max_seq_len,
            scale,
            num_splits=splits,
            block_n=self.block_n,
            sliding_window=sliding_window,
            logit_softcap=logit_softcap,
            kv_scales=kv_scales,
        )

    def choose_num_splits(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> int:
        """Split-K only for decode-only steps whose (tile, KV head) programs would leave SMs idle and
        whose contexts are long enough to share out; otherwise one pass."""
        if self.num_splits is not None:
            return self.num_splits
        if meta.max_query_len > 1 or not query.is_cuda:
            return 1
        num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
        _, block_q, _ = tile_shape(num_heads, num_kv_heads, meta.max_query_len)
        programs = (query.shape[0] // block_q + meta.seq_lens.shape[0]) * num_kv_heads
        target = 2 * self._num_sms(query.device)
        if programs >= target or meta.max_seq_len < 2 * _MIN_PARTITION:
            return 1
        return max(1, min(math.ceil(target / programs), meta.max_seq_len // _MIN_PARTITION, _MAX_SPLITS))

    def _num_sms(self, device: torch.device) -> int:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._sm_count:
            self._sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._sm_count[index]
