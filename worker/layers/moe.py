"""The sparse MLP of a mixture-of-experts decoder layer: a softmax top-k router and the fused
experts (worker/kernels/fused_moe.py), split across the tensor-parallel group.

Under tensor parallelism every rank holds the same hidden states after attention's all-reduce, so
no token needs to travel: each rank runs the pairs routed to the experts it holds and the
layer's one all-reduce (the same `[T, hidden]` all-reduce a dense MLP's down projection does)
adds the ranks' partial sums. How the experts are split is ExpertPlacement's choice:

- expert parallelism (num_experts divisible by tp): rank r holds experts r*E/tp .. (r+1)*E/tp - 1
  whole, so each expert's matmuls stay as large as on one rank;
- sliced experts (otherwise): every rank holds every expert's 1/tp slice of the intermediate
  dimension (Megatron's split of a dense MLP, applied per expert), which keeps the ranks' work
  equal where whole experts cannot be dealt out evenly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shardline.worker.config import MoEConfig
from shardline.worker.kernels.fused_moe import fused_moe
from shardline.worker.loader.weights import LazyWeight
from shardline.worker.parallel.context import ParallelContext


@dataclass(frozen=True)
class ExpertPlacement:
    """Which experts, and which slice of each, one rank holds."""

    mode: str  # "expert" (whole experts split across ranks) | "sliced" (every expert's intermediate split)
    first_expert: int
    num_local_experts: int
    intermediate_start: int
    intermediate_size: int  # this rank's share of each held expert's intermediate dimension

    @classmethod
    def plan(cls, moe: MoEConfig, ctx: ParallelContext) -> "ExpertPlacement":
        """Expert parallelism when the experts divide evenly over the group, sliced experts
        otherwise; raises ValueError naming both numbers when neither split is exact."""
        tp, e, i = ctx.world_size, moe.num_experts, moe.intermediate_size
        if e % tp == 0:
            per_rank = e // tp
            return cls("expert", ctx.rank * per_rank, per_rank, 0, i)
        if i % tp:
            raise ValueError(f"num_experts {e} is not divisible by tensor_parallel_size {tp} (expert parallelism) "
                             f"and moe_intermediate_size {i} is not either (sliced experts)")
        return cls("sliced", 0, e, ctx.rank * (i // tp), i // tp)


@dataclass(frozen=True)
class Routing:
    """Each token's chosen experts: weights [T, k] float32 and expert ids [T, k] int64 (global numbering)."""

    weights: torch.Tensor
    expert_ids: torch.Tensor


class TopKRouter(nn.Module):
    """Router logits x W^T [T, E], softmax in float32, the top k, optionally renormalised to sum to 1.
    Replicated on every rank (E x hidden is small), so every rank routes identically."""

    def __init__(self, hidden: int, moe: MoEConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.top_k = moe.num_experts_per_tok
        self.renormalize = moe.renormalize
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> Routing:
        probs = torch.softmax(torch.nn.functional.linear(x, self.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, ids)

    def load(self, name: str, w: LazyWeight) -> None:
        if tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(f"weight {name}: expected shape {tuple(self.weight.shape)}, checkpoint has {tuple(w.shape)}")
        self.weight.copy_(w.read().to(self.weight.dtype))


class FusedExperts(nn.Module):
    """This rank's experts as two stacked tensors: w13 [E_local, 2 * I_local, hidden] (gate rows,
    then up rows) and w2 [E_local, hidden, I_local]. Weights of experts held elsewhere are skipped
    without being read."""

    def __init__(self, hidden: int, placement: ExpertPlacement, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.placement = placement
        e, i = placement.num_local_experts, placement.intermediate_size
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, hidden, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, hidden, i, dtype=dtype, device=device), requires_grad=False)

    def load_expert(self, expert: int, part: str, name: str, w: LazyWeight) -> None:
        """Copy this rank's slice of checkpoint matrix `part` ('gate' [I, hidden], 'up' [I, hidden]
        or 'down' [hidden, I]) of global expert `expert`; a no-op for experts held elsewhere."""
        p = self.placement
        local = expert - p.first_expert
        if not 0 <= local < p.num_local_experts:
            return
        piece = w.read(1 if part == "down" else 0, p.intermediate_start, p.intermediate_size)
        self._copy(part, local, piece.unsqueeze(0), name)

    def load_stacked(self, part: str, name: str, w: LazyWeight) -> None:
        """Copy this rank's experts (and slice) from one tensor stacking every expert's `part`
        ([E, I, hidden] for gate and up, [E, hidden, I] for down: a GGUF file's layout)."""
        p = self.placement
        rows = w.read(0, p.first_expert, p.num_local_experts)
        piece = rows.narrow(2 if part == "down" else 1, p.intermediate_start, p.intermediate_size)
        self._copy(part, 0, piece, name)

    def _copy(self, part: str, first_local: int, piece: torch.Tensor, name: str) -> None:
        """piece [n, ...]: this rank's slice of `part` for local experts first_local .. + n - 1."""
        i, n = self.placement.intermediate_size, piece.shape[0]
        if part == "down":
            target = self.w2[first_local : first_local + n]
        else:
            target = self.w13[first_local : first_local + n].narrow(1, 0 if part == "gate" else i, i)
        if tuple(target.shape) != tuple(piece.shape):
            raise ValueError(f"weight {name}: expected shape {tuple(target.shape)} for this rank, got {tuple(piece.shape)}")
        target.copy_(piece.to(target.dtype))


class ExpertLoad:
    """Tokens routed to each expert of each sparse layer, counted on the device
    ([num_sparse_layers, num_experts] int64, index_add_: no host sync, CUDA-graph safe) until the
    engine takes them once per step for the `shardline:moe_expert_tokens` histogram.

    NOTE: a decode step replayed from a CUDA graph runs padding rows up to the captured batch size;
    they are routed, computed and counted like real tokens (the graph cannot tell them apart)."""

    def __init__(self, num_sparse_layers: int, num_experts: int, device) -> None:
        self.counts = torch.zeros(num_sparse_layers, num_experts, dtype=torch.int64, device=device)
        self._in_flight: tuple[torch.Tensor, Any] | None = None  # CUDA: (pinned host copy, its event)

    def add(self, slot: int, expert_ids: torch.Tensor) -> None:
        flat = expert_ids.reshape(-1)
        self.counts[slot].index_add_(0, flat, torch.ones_like(flat))

    def take_host(self) -> list[int] | None:
        """The counts since the previous take, flattened layer by layer, and reset to zero. On CPU
        at once. On CUDA without waiting for the step in flight: this take's copy to pinned memory
        is queued behind it and returned by the next take (one step late; None the first time)."""
        if self.counts.device.type != "cuda":
            out = self.counts.flatten().tolist()
            self.counts.zero_()
            return out
        previous = self._in_flight
        host = torch.empty(self.counts.shape, dtype=self.counts.dtype, pin_memory=True)
        host.copy_(self.counts, non_blocking=True)
        self.counts.zero_()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.counts.device))
        self._in_flight = (host, event)
        if previous is None:
            return None
        previous[1].synchronize()  # queued before the newest step's forward: does not wait for it
        return previous[0].flatten().tolist()


class SparseMoeBlock(nn.Module):
    """The MoE MLP: route, run this rank's experts on their pairs, all-reduce the partial sums."""

    def __init__(self, hidden: int, moe: MoEConfig, ctx: ParallelContext, dtype: torch.dtype, device,
                 expert_load: ExpertLoad | None = None, load_slot: int = 0) -> None:
        super().__init__()
        self.impl = "auto"
        self.ctx = ctx
        self.gate = TopKRouter(hidden, moe, dtype, device)
        self.experts = FusedExperts(hidden, ExpertPlacement.plan(moe, ctx), dtype, device)
        self.expert_load = expert_load
        self.load_slot = load_slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.gate(x)
        if self.expert_load is not None:
            self.expert_load.add(self.load_slot, routing.expert_ids)
        placement = self.experts.placement
        y = fused_moe(x, self.experts.w13, self.experts.w2, routing.weights, routing.expert_ids,
                      placement.first_expert, impl=self.impl)
        return self.ctx.all_reduce(y)
