"""Executes what the scheduler decided: turns a step's scheduled requests into flat tensors (token
ids, positions, slot mapping, block tables, context lengths), runs the model over the paged cache
and returns the logits of the rows that sample. The scheduler decides; this only executes."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shardline.worker.attention.metadata import AttentionMetadata, StepMemo
from shardline.worker.config import ModelConfig
from shardline.worker.engine.kv_cache_groups import KVCacheGroups
from shardline.worker.engine.transfer import to_device
from shardline.worker.layers.quantization.block_cpu import prompt_step

if TYPE_CHECKING:
    from shardline.worker.engine.cuda_graphs import DecodeGraphRunner
    from shardline.worker.model import LlamaForCausalLM

log = logging.getLogger(__name__)

_TENSOR_FIELDS = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables", "sample_rows",
                  "group_slot_mapping", "group_block_tables")


@dataclass
class SeqSlice:
    """One sequence's share of a step: compute `token_ids` at positions start .. start+len-1."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    samples: bool  # True when this slice ends at the sequence's last token, so a token is sampled
    # Speculative decoding: the slice ends with this many proposed tokens, and each of the last
    # num_spec_tokens + 1 rows is sampled (the target's distribution after every prefix of the proposal).
    num_spec_tokens: int = 0
    # [first, end) rows of this slice (0 = its first token) whose logits are also returned, after
    # every slice's sampled rows: prompt positions whose logprobs the request asked for.
    extra_logit_rows: tuple[int, int] = (0, 0)
    # Hybrid models: the block tables of KV-cache groups 1.. (block_ids is group 0's).
    group_block_ids: tuple[list[int], ...] = ()
    # The slice computes prompt tokens (a prefill chunk, or the rest of a prompt after a prefix hit;
    # set by the engine). A step with any such slice keeps the CPU q4 kernels off their int8
    # activation path (worker/layers/quantization/block_cpu.py, prompt_step).
    prompt: bool = False


@dataclass
class StepInputs:
    """Everything one forward pass needs, as tensors: rank 0 builds it and, under tensor
    parallelism, broadcasts exactly these tensors to the other ranks."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, B] int32
    # [N + E] int64: rows of the flat batch whose logits are returned: the N sampled rows in batch
    # order, then the E extra rows (SeqSlice.extra_logit_rows) in batch order.
    sample_rows: torch.Tensor
    # Hybrid models (KV-cache groups 1..G-1; None with one group): [G-1, T] int64 slots and
    # [G-1, S, B'] int32 block tables of those groups (B' the widest of their tables).
    group_slot_mapping: torch.Tensor | None = None
    group_block_tables: torch.Tensor | None = None
    # Host copies of the query and context lengths, when the builder had them (not broadcast under
    # tensor parallelism): metadata() then needs no device-to-host copy, i.e. no sync.
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # Some slice computes prompt tokens (SeqSlice.prompt; sent to every tensor-parallel rank in the
    # step channel's header).
    has_prompt_rows: bool = False

    def tensors(self) -> list[torch.Tensor]:
        """The tensor fields in declaration order (what tensor parallelism broadcasts); the group
        fields only when present."""
        return [getattr(self, name) for name in _TENSOR_FIELDS if getattr(self, name) is not None]

    @property
    def num_kv_groups(self) -> int:
        """KV-cache groups the step carries tables for."""
        return 1 if self.group_block_tables is None else 1 + self.group_block_tables.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_pure_decode(self) -> bool:
        """One new token per sequence (known from the shapes alone, without reading the device)."""
        return 0 < self.num_tokens == self.num_seqs

    def metadata(self) -> AttentionMetadata:
        q_lens = self.query_lens_cpu
        if q_lens is None:
            q_lens = (self.query_start_loc[1:] - self.query_start_loc[:-1]).tolist()
        s_lens = self.seq_lens_cpu if self.seq_lens_cpu is not None else self.seq_lens.tolist()
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping,
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            max_query_len=max(q_lens, default=0),
            max_seq_len=max(s_lens, default=0),
            query_lens_cpu=q_lens,
            seq_lens_cpu=s_lens,
        )
        if self.group_slot_mapping is not None and self.group_block_tables is not None:
            meta.groups = [dataclasses.replace(meta, slot_mapping=slots, block_tables=tables,
                                               memo=StepMemo(rope=meta.memo.rope), groups=[])
                           for slots, tables in zip(self.group_slot_mapping, self.group_block_tables)]
        return meta


def build_step_inputs(slices: list[SeqSlice], block_size: int, device: torch.device) -> StepInputs:
    """Flatten a step's slices (host-side lists, one copy to the device per tensor)."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    sample_rows: list[int] = []
    width = max((len(s.block_ids) for s in slices), default=1) or 1
    tables: list[list[int]] = []
    num_extra = len(slices[0].group_block_ids) if slices else 0
    group_width = max((len(t) for s in slices for t in s.group_block_ids), default=1) or 1
    group_slots: list[list[int]] = [[] for _ in range(num_extra)]
    group_tables: list[list[list[int]]] = [[] for _ in range(num_extra)]
    for s in slices:
        n = len(s.token_ids)
        ids.extend(s.token_ids)
        for p in range(s.start, s.start + n):
            pos.append(p)
            slots.append(s.block_ids[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + n)
        seq_lens.append(s.start + n)
        if s.samples:
            sample_rows.extend(range(qsl[-1] - 1 - s.num_spec_tokens, qsl[-1]))
        tables.append(s.block_ids + [0] * (width - len(s.block_ids)))
        if len(s.group_block_ids) != num_extra:
            raise ValueError(f"slices carry {len(s.group_block_ids)} and {num_extra} extra group tables")
        for g, table in enumerate(s.group_block_ids):
            group_slots[g].extend(table[p // block_size] * block_size + p % block_size
                                  for p in range(s.start, s.start + n))
            group_tables[g].append(table + [0] * (group_width - len(table)))
    for s, start in zip(slices, qsl):
        first, end = s.extra_logit_rows
        sample_rows.extend(range(start + first, start + end))

    def t(data, dtype):
        return to_device(data, dtype, device)

    return StepInputs(
        input_ids=t(ids, torch.int64),
        positions=t(pos, torch.int64),
        slot_mapping=t(slots, torch.int64),
        query_start_loc=t(qsl, torch.int32),
        seq_lens=t(seq_lens, torch.int32),
        block_tables=t(tables, torch.int32),
        sample_rows=t(sample_rows, torch.int64),
        group_slot_mapping=t(group_slots, torch.int64).view(num_extra, len(ids)) if num_extra else None,
        group_block_tables=t(group_tables, torch.int32).view(num_extra, len(slices), group_width) if num_extra else None,
        query_lens_cpu=[qsl[i + 1] - qsl[i] for i in range(len(slices))],
        seq_lens_cpu=seq_lens,
        has_prompt_rows=any(s.prompt for s in slices),
    )


def allocate_kv_caches(cfg: ModelConfig, num_kv_heads: int, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device, groups: KVCacheGroups | None = None) -> list[torch.Tensor]:
    """The cache of each layer, [2, num_blocks, block_size, kv_heads, head_dim]: one tensor per
    layer, or with hybrid `groups` (cfg.kv_cache_groups) groups.num_tensors tensors, layer l using
    tensor groups.layer_tensor[l] (steps must then carry one block table per group)."""
    shape = (2, num_blocks, block_size, num_kv_heads, cfg.head_dim)
    if groups is None or not groups.is_hybrid:
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
    tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(groups.num_tensors)]
    return [tensors[groups.layer_tensor[layer]] for layer in range(cfg.num_hidden_layers)]


def kv_bytes_per_block(cfg: ModelConfig, num_kv_heads: int, block_size: int, dtype: torch.dtype,
                       groups: KVCacheGroups | None = None) -> int:
    """Bytes one block takes (keys and values): across all layers, or with hybrid `groups` across
    the group-size tensors a block id names."""
    elem = torch.tensor([], dtype=dtype).element_size()
    num_tensors = groups.num_tensors if groups is not None and groups.is_hybrid else cfg.num_hidden_layers
    return 2 * num_tensors * block_size * num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    """Runs the model on a step's inputs and returns the logits of `sample_rows` (fp32).
    Pure-decode steps go through captured CUDA graphs once `enable_cuda_graphs` has run."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], block_size: int, device: torch.device,
                 num_kv_groups: int = 1) -> None:
        self.model = model
        self.kv_caches = kv_caches
        # Tables every step must carry: > 1 when the caches are shared by groups (allocate_kv_caches)
        self.num_kv_groups = num_kv_groups
        self.block_size = block_size
        self.device = device
        self.graphs: DecodeGraphRunner | None = None  # set by enable_cuda_graphs

    def tune_linears(self) -> int:
        """Decide cuBLAS or the Triton matvec for every float linear of the model (weights [N, K]),
        and W8A8 or the weight-only matvec for every FP8 one, at every decode batch bucket, now, at
        start-up (CUDA only): serving then never measures.
        Returns how many (bucket, shape) entries were measured (0 for shapes a loaded table had)."""
        from shardline.worker.kernels.fp8_linear_choice import tune_fp8_linear_shapes
        from shardline.worker.kernels.linear_choice import tune_linear_shapes
        from shardline.worker.layers.quantization.fp8 import Fp8Linear, w8a8_matmul

        if self.device.type != "cuda":
            return 0
        by_dtype: dict[torch.dtype, list[tuple[int, int]]] = {}
        fp8_by_dtype: dict[torch.dtype, list[tuple[int, int]]] = {}  # by activation dtype
        for module in self.model.modules():
            weight = getattr(module, "weight", None)
            method = getattr(module, "quant_method", None)
            if (isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "float_weight")
                    and method is None):
                by_dtype.setdefault(weight.dtype, []).append((int(weight.shape[0]), int(weight.shape[1])))
            elif isinstance(method, Fp8Linear) and method.scaled_mm_fits and method.impl == "auto":
                act_dtype = getattr(module, "dtype", None)  # _QuantizableLinear's activation dtype
                if isinstance(act_dtype, torch.dtype):
                    fp8_by_dtype.setdefault(act_dtype, []).append((method.out_features, method.in_features))
        return (sum(tune_linear_shapes(shapes, dtype, self.device) for dtype, shapes in by_dtype.items())
                + sum(tune_fp8_linear_shapes(shapes, dtype, self.device, w8a8_matmul)
                      for dtype, shapes in fp8_by_dtype.items()))

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int, use_graphs: bool = True) -> bool:
        """Capture decode graphs for batch sizes up to max_batch; returns False (and stays eager)
        when the attention backend cannot run inside a graph (only the Triton one can: the torch
        reference reads lengths on the host). use_graphs=False: the padded path, eagerly (tests)."""
        from shardline.worker.engine.cuda_graphs import DecodeGraphRunner, capture_batch_sizes

        layers = self.model.decoder_layers
        backend = layers[0].self_attn.backend if layers else None
        if use_graphs and getattr(backend, "name", None) != "triton":
            log.info("CUDA graphs off: attention backend %r cannot be captured", getattr(backend, "name", None))
            return False
        runner = DecodeGraphRunner(self.model, self.kv_caches, self.block_size, max_model_len,
                                   capture_batch_sizes(max_batch), self.device, use_graphs=use_graphs)
        runner.capture()
        self.graphs = runner
        return True

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.num_kv_groups != self.num_kv_groups:
            raise ValueError(f"step carries block tables for {inputs.num_kv_groups} KV-cache groups, "
                             f"the cache has {self.num_kv_groups}")
        if self.graphs is not None and self.graphs.can_run(inputs):
            return self.graphs.run(inputs)
        with prompt_step(inputs.has_prompt_rows):
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata())
            return self.model.compute_logits(hidden[inputs.sample_rows]).float()
