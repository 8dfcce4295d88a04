"""The Triton attention backend: a kernel scatters new K/V rows into the paged cache, one launch
attends a whole mixed batch, and decode rows with long contexts split them (split-K).

The split decision has two halves. The host sets the launch (split slots and a minimum partition
length) from what it knows without reading the device: the batch shape and SM count for decode-only
steps (a captured CUDA graph's shape, bounded by max_model_len), and the scheduler's host lengths for
mixed prefill+decode steps (never captured). Each decode row then takes its own split count on the
device from its real attended length (worker/kernels/paged_attention.py), so one captured graph
serves short and long contexts alike, and a windowed layer splits only the window it attends to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shardline.worker.attention.kv_cache_dtype import KVScales
from shardline.worker.attention.metadata import AttentionMetadata
from shardline.worker.kernels.kv_write import write_kv
from shardline.worker.kernels.paged_attention import paged_attention, tile_shape

_MIN_PARTITION = 256  # tokens per split below which splitting costs more than it saves
_MAX_SPLITS = 32
_SLOT_BUDGET = 4  # split-slot programs a decode-only launch may have, in multiples of 2 x SMs


@dataclass(frozen=True)
class SplitPlan:
    """How one attention launch may split decode rows: at most `max_splits` partitions a row, one per
    `tokens_per_split` attended keys (the row's own count is decided on the device)."""

    max_splits: int
    tokens_per_split: int


class TritonAttentionBackend:
    """AttentionBackend on Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    num_splits forces the split slots (tests use it, with a small tokens_per_split, to exercise the
    split and reduce path on short contexts); None picks them per step (see the module note).
    """

    name = "triton"

    def __init__(self, num_splits: int | None = None, block_n: int = 64,
                 tokens_per_split: int = _MIN_PARTITION) -> None:
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
        if tokens_per_split < 1:
            raise ValueError(f"tokens_per_split must be >= 1, got {tokens_per_split}")
        self.num_splits = num_splits
        self.block_n = block_n
        self.tokens_per_split = tokens_per_split
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
        plan = self.choose_splits(query, kv_cache, meta)
        return paged_attention(
            query,
            kv_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.max_query_len,
            meta.max_seq_len,
            scale,
            num_splits=plan.max_splits,
            block_n=self.block_n,
            tokens_per_split=plan.tokens_per_split,
            sliding_window=sliding_window,
            logit_softcap=logit_softcap,
            kv_scales=kv_scales,
        )

    def choose_splits(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> SplitPlan:
        """Mixed steps (any device; never captured): a long decode is cut into pieces about as long
        as the longest prefill's context, so it ends with the prefill tiles beside it instead of
        after them. Decode-only steps (CUDA): slots from the batch shape and SM count (so a graph's
        choice holds for every replay): enough to fill 2 x SMs with programs, and up to
        _SLOT_BUDGET times that so a long row among short ones still splits."""
        if self.num_splits is not None:
            return SplitPlan(self.num_splits, self.tokens_per_split)
        if not meta.is_pure_decode:
            longest_decode, longest_prefill = longest_contexts(meta)
            per_split = max(self.tokens_per_split, longest_prefill)
            return SplitPlan(max(1, min(_MAX_SPLITS, longest_decode // per_split)), per_split)
        if not query.is_cuda:  # the occupancy rule needs the SM count
            return SplitPlan(1, self.tokens_per_split)
        num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
        _, block_q, _ = tile_shape(num_heads, num_kv_heads, meta.max_query_len)
        programs = (query.shape[0] // block_q + meta.seq_lens.shape[0]) * num_kv_heads
        return SplitPlan(decode_split_slots(programs, self._num_sms(query.device)), self.tokens_per_split)

    def _num_sms(self, device: torch.device) -> int:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._sm_count:
            self._sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._sm_count[index]


def decode_split_slots(programs: int, num_sms: int) -> int:
    """Split slots of a decode-only launch of `programs` (tile, KV head) programs: enough to fill
    2 x SMs with short contexts, and up to _SLOT_BUDGET times that for long ones (a row uses only
    the slots its own length fills, and an unused slot's program exits after a few scalar loads,
    so the budget bounds that waste to a few waves); 1 to _MAX_SPLITS."""
    target = 2 * num_sms
    slots = max(math.ceil(target / max(1, programs)), _SLOT_BUDGET * target // max(1, programs))
    return max(1, min(slots, _MAX_SPLITS))


def longest_contexts(meta: AttentionMetadata) -> tuple[int, int]:
    """(longest decode context, longest prefill context) of a step in tokens, from the host lengths;
    computed once a step (every layer asks)."""
    if meta.memo.longest_contexts is None:
        decode = prefill = 0
        for q_len, seq_len in zip(meta.query_lens_cpu, meta.seq_lens_cpu):
            if q_len == 1:
                decode = max(decode, seq_len)
            else:
                prefill = max(prefill, seq_len)
        meta.memo.longest_contexts = (decode, prefill)
    return meta.memo.longest_contexts
