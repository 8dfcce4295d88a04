"""CUDA graphs of pure-decode steps: the whole forward (every layer's kernels and the LM head) is
captured once per batch size and replayed, so a decode step costs a few input copies and one graph
launch instead of hundreds of kernel launches from Python.

How a step runs through a graph:
- inputs live in static buffers sized for the largest captured batch; a step of n sequences is
  copied into their first n rows and padded up to the next captured size b. Padding rows write
  nothing (slot -1), attend to one token (seq_len 1) through a valid block table row, and their
  logits are never read;
- nothing in a captured step reads the device from the host: attention's launch grid depends only
  on b, and its split-K slots on b and max_seq_len, which is fixed to max_model_len at capture; each
  row then takes its own split count from its real length on the device (none for a short
  context, more for a long one; worker/kernels/paged_attention.py), so one graph fits every step;
- graphs are captured from the largest size to the smallest, sharing one memory pool, after the
  weights and the KV cache exist and after a warm-up forward per size (which compiles the Triton
  kernels; the cuBLAS-or-matvec choices were decided before, by ModelRunner.tune_linears).

`use_graphs=False` runs the same padded static-buffer path eagerly: the padding logic then runs,
and is tested, on CPU.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from shardline.worker.attention.metadata import AttentionMetadata
from shardline.worker.engine.model_runner import StepInputs

if TYPE_CHECKING:
    from shardline.worker.model import LlamaForCausalLM

log = logging.getLogger(__name__)


def capture_batch_sizes(max_batch: int, step: int = 16) -> list[int]:
    """1, 2, 4, 8, then every `step` up to max_batch, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {b for b in (1, 2, 4, 8) if b <= max_batch}
    sizes.update(range(step, max_batch + 1, step))
    sizes.add(max_batch)
    return sorted(sizes)


class DecodeGraphRunner:
    """Replays a captured forward for pure-decode steps of up to max(batch_sizes) sequences.

    `run(inputs)` returns the logits of inputs.sample_rows (fp32), like ModelRunner.execute.
    """

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 max_model_len: int, batch_sizes: list[int], device: torch.device, use_graphs: bool = True) -> None:
        if not batch_sizes:
            raise ValueError("batch_sizes: need at least one size to capture")
        if use_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.max_model_len = max_model_len
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.use_graphs = use_graphs
        with torch.inference_mode():
            b = self.max_batch
            self.input_ids = torch.zeros(b, dtype=torch.int64, device=device)
            self.positions = torch.zeros(b, dtype=torch.int64, device=device)
            self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=device)
            self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
            self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
            # Row padding stays 0: block 0 exists in every pool, so padding rows read a valid block.
            self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.int32, device=device)
            # Hybrid models: the same two buffers for KV-cache groups 1.. (worker/engine/kv_cache_groups.py)
            extra = model.config.kv_cache_groups.num_groups - 1
            self.group_slot_mapping = torch.full((extra, b), -1, dtype=torch.int64, device=device)
            self.group_block_tables = torch.zeros(extra, b, self.max_blocks, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._pool: Any = None  # graph.pool() of the first capture, shared by the later ones
        self.capture_seconds = 0.0

    def padded_size(self, n: int) -> int:
        """The smallest captured batch size >= n."""
        for b in self.batch_sizes:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the largest captured size {self.max_batch}")

    def can_run(self, inputs: StepInputs) -> bool:
        """Pure decode, small enough, on this device, block tables no wider than max_model_len needs."""
        return (
            inputs.is_pure_decode
            and inputs.num_seqs <= self.max_batch
            and inputs.block_tables.dim() == 2
            and inputs.block_tables.shape[1] <= self.max_blocks
            and inputs.num_kv_groups == 1 + self.group_block_tables.shape[0]
            and (inputs.group_block_tables is None or inputs.group_block_tables.shape[2] <= self.max_blocks)
            and inputs.input_ids.device == self.input_ids.device
        )

    def _metadata(self, b: int, seq_lens_cpu: list[int] | None = None) -> AttentionMetadata:
        meta = self._group_metadata(b, self.slot_mapping, self.block_tables, seq_lens_cpu)
        meta.groups = [self._group_metadata(b, slots, tables, seq_lens_cpu)
                       for slots, tables in zip(self.group_slot_mapping, self.group_block_tables)]
        return meta

    def _group_metadata(self, b: int, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens_cpu: list[int] | None) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=slot_mapping[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=block_tables[:b],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # fixed, so a captured grid fits every later step
            query_lens_cpu=[1] * b,
            # Only the torch reference backend reads these; it never runs inside a graph.
            seq_lens_cpu=seq_lens_cpu if seq_lens_cpu is not None else [self.max_model_len] * b,
        )

    def _forward(self, b: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture one graph per batch size, largest first (a no-op without graphs)."""
        if not self.use_graphs:
            return
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        for b in reversed(self.batch_sizes):
            meta = self._metadata(b)
            # Warm-up on a side stream (as torch.cuda.graph asks): compiles kernels, fills the
            # per-shape linear choice table and lets libraries allocate their workspaces.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(b, meta)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(b, meta)
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[b] = graph
            self._logits[b] = logits
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self._graphs),
                 ",".join(map(str, self.batch_sizes)), self.capture_seconds)

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Copy the step into the static buffers (padded), replay, return the sampled rows' logits."""
        n = inputs.num_seqs
        b = self.padded_size(n)
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(inputs.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(inputs.seq_lens, non_blocking=True)
        self.block_tables[:n, : inputs.block_tables.shape[1]].copy_(inputs.block_tables, non_blocking=True)
        if inputs.group_slot_mapping is not None and inputs.group_block_tables is not None:
            self.group_slot_mapping[:, :n].copy_(inputs.group_slot_mapping, non_blocking=True)
            width = inputs.group_block_tables.shape[2]
            self.group_block_tables[:, :n, :width].copy_(inputs.group_block_tables, non_blocking=True)
        if b > n:
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slot_mapping[n:b].fill_(-1)
            if inputs.group_slot_mapping is not None:
                self.group_slot_mapping[:, n:b].fill_(-1)
            self.seq_lens[n:b].fill_(1)
        if self.use_graphs:
            self._graphs[b].replay()
            logits = self._logits[b]
        else:
            host = inputs.seq_lens_cpu if inputs.seq_lens_cpu is not None else inputs.seq_lens.tolist()
            logits = self._forward(b, self._metadata(b, host + [1] * (b - n)))
        return logits[inputs.sample_rows].float()
