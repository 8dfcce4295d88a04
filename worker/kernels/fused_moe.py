"""The experts of a mixture-of-experts layer over a batch: each (token, chosen expert) pair runs its
expert's gated MLP, scaled by its routing weight, and a token's pairs are summed.

Both paths work on the same layout. `w13` [E, 2I, H] holds each expert's gate rows then its up
rows, `w2` [E, H, I] its down projection; `topk_ids` [T, k] names experts in the whole model's
numbering, and only experts first_expert .. first_expert + E - 1 live here (expert parallelism:
pairs routed to other ranks' experts contribute zero, the caller's all-reduce adds them).

- torch (CPU, reference): pairs sorted by expert, then torch's grouped matmul over all experts.
- Triton (GPU): no loop over experts and no host sync. `align_pairs_to_experts` sorts the pairs
  by expert on the device and pads each expert's run to a multiple of BLOCK_M rows, into a buffer
  of a size known from T, k and E alone (T*k + E*(BLOCK_M-1), rounded up), so one launch grid
  covers any routing; each row block belongs to one expert (or to none and returns at once).
  Two grouped-matmul kernels follow: gate/up with SiLU-and-mul in the epilogue, then down scaled
  by the routing weight. Each writes rows by pair index, so the padding is never stored, and the
  combine is a sum over k (deterministic: no atomics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardline.worker.kernels.runtime import cdiv, interpreted_bf16_dot, kernel, next_pow2, tl, use_triton


def _local_pair_experts(topk_ids: torch.Tensor, first_expert: int, num_local: int) -> torch.Tensor:
    """[T*k] int64: each pair's expert in local numbering, num_local for experts held elsewhere."""
    local = topk_ids.reshape(-1).to(torch.int64) - first_expert
    return torch.where((local >= 0) & (local < num_local), local, torch.full_like(local, num_local))


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
    """The torch path: x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k] (float32),
    topk_ids [T, k] -> [T, H] in x's dtype. The held pairs, sorted by expert, go through torch's
    grouped matmul (one call per projection for all experts, torch >= 2.10) or, without it, one
    matmul per expert that received tokens. Reads the number of held pairs on the host (fine on CPU)."""
    num_tokens, top_k = topk_ids.shape
    num_local, inter = w13.shape[0], w2.shape[2]
    pair_expert = _local_pair_experts(topk_ids, first_expert, num_local)
    order = torch.argsort(pair_expert, stable=True)
    counts = torch.bincount(pair_expert, minlength=num_local + 1)[:num_local]
    pairs = order[: int(counts.sum())]  # the pairs whose expert is held here, grouped by expert
    rows = x[pairs // top_k]
    if hasattr(F, "grouped_mm"):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        h = F.grouped_mm(rows, w13.transpose(1, 2), offs=offsets)
        y = F.grouped_mm(F.silu(h[:, :inter]) * h[:, inter:], w2.transpose(1, 2), offs=offsets)
    else:
        y = torch.empty(rows.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for expert, n in enumerate(counts.tolist()):
            if n:
                h = F.linear(rows[start : start + n], w13[expert])
                y[start : start + n] = F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[expert])
            start += n
    out = torch.zeros(num_tokens * top_k, x.shape[1], dtype=torch.float32, device=x.device)
    out[pairs] = y.float() * topk_weights.reshape(-1)[pairs, None].float()
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


@dataclass(frozen=True)
class AlignedPairs:
    """The (token, expert) pairs sorted by expert, each expert's run padded to whole row blocks.

    sorted_pairs [num_blocks * block_m] int32: a pair index (token * k + slot) per row, or
    num_pairs on padding rows. block_expert [num_blocks] int32: the local expert of each row block,
    -1 for blocks past the last expert's run (and for pairs whose expert lives on another rank)."""

    sorted_pairs: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    num_pairs: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def align_pairs_to_experts(topk_ids: torch.Tensor, num_local: int, block_m: int, first_expert: int = 0) -> AlignedPairs:
    """Sort the pairs by local expert and pad each expert's run to a multiple of block_m, with
    device ops only (no host sync, shapes fixed by T, k and E: CUDA-graph safe)."""
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    pair_expert = _local_pair_experts(topk_ids, first_expert, num_local)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, pair_expert, torch.ones_like(pair_expert))
    padded = (counts[:num_local] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    unpadded_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(pair_expert, stable=True)
    sorted_expert = pair_expert[order]
    capacity = cdiv(num_pairs + num_local * (block_m - 1), block_m) * block_m
    held = sorted_expert < num_local
    clamped = sorted_expert.clamp(max=num_local - 1)
    rank_in_expert = torch.arange(num_pairs, device=device) - unpadded_start[sorted_expert]
    slot = torch.where(held, padded_start[clamped] + rank_in_expert, torch.full_like(order, capacity))
    sorted_pairs = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, slot, order.to(torch.int32))
    block_rows = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_rows, right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, torch.full_like(block_expert, -1))
    return AlignedPairs(sorted_pairs[:capacity], block_expert.to(torch.int32), block_m, num_pairs)


@kernel(do_not_specialize=("num_pairs",))
def _moe_gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs, top_k, hidden,
                        inter, stride_x, stride_we, stride_wn, stride_o,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[pair, n] = silu(x[token] . w13[e, n]) * (x[token] . w13[e, I + n]) for a block of one
    expert's pairs and a tile of n."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows).to(tl.int64)
    valid = pairs < num_pairs
    tokens = pairs // top_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    w_base = w_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden
        a = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        if UPCAST:
            a, w_gate, w_up = a.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
        acc_gate += tl.dot(a, w_gate.to(a.dtype), input_precision=DOT_PRECISION)
        acc_up += tl.dot(a, w_up.to(a.dtype), input_precision=DOT_PRECISION)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(out_ptr + pairs[:, None] * stride_o + cols[None, :], h.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & col_mask[None, :])


@kernel(do_not_specialize=("num_pairs",))
def _moe_down_kernel(h_ptr, w_ptr, out_ptr, weights_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs, hidden,
                     inter, stride_h, stride_we, stride_wn, stride_o,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[pair, n] = weight[pair] * (h[pair] . w2[e, n]) for a block of one expert's pairs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows).to(tl.int64)
    valid = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < inter
        a = tl.load(h_ptr + pairs[:, None] * stride_h + ks[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION)
    scale = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    acc = acc * scale[:, None]
    tl.store(out_ptr + pairs[:, None] * stride_o + cols[None, :], acc, mask=valid[:, None] & col_mask[None, :])


def _tile(n: int, cap: int) -> int:
    """A power-of-two tile for a dimension of n: at least 16 (tl.dot's minimum), at most cap."""
    return max(16, min(cap, next_pow2(n)))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, first_expert: int = 0, impl: str = "auto") -> torch.Tensor:
    """Run the experts held here on their tokens and combine: x [T, H], w13 [E, 2I, H], w2 [E, H, I],
    topk_weights [T, k] float32, topk_ids [T, k] (experts first_expert.. are local) -> [T, H] in
    x's dtype. impl: 'auto' (Triton on CUDA), 'triton' (CPU tensors through the interpreter), 'torch'."""
    if (w13.shape[0] != w2.shape[0] or w13.shape[1] != 2 * w2.shape[2] or w13.shape[2] != x.shape[1]
            or w2.shape[1] != x.shape[1]):
        raise ValueError(f"fused_moe: shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if not use_triton(x, impl):
        return fused_moe_reference(x, w13, w2, topk_weights, topk_ids, first_expert)
    num_tokens, top_k = topk_ids.shape
    num_local, hidden, inter = w2.shape
    x = x.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    num_pairs = num_tokens * top_k
    out = torch.zeros(num_pairs, hidden, dtype=torch.float32, device=x.device)
    if num_pairs == 0:
        return out.view(num_tokens, hidden).to(x.dtype)
    block_m = 16 if num_pairs <= 16 * num_local else 64
    aligned = align_pairs_to_experts(topk_ids, num_local, block_m, first_expert)
    upcast = interpreted_bf16_dot(x.dtype)
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    block_n, block_k = _tile(inter, 64), _tile(hidden, 64)
    _moe_gate_up_kernel[(aligned.num_blocks, cdiv(inter, block_n))](
        x, w13, h, aligned.sorted_pairs, aligned.block_expert, num_pairs, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=upcast, DOT_PRECISION=precision)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    block_n, block_k = _tile(hidden, 64), _tile(inter, 64)
    _moe_down_kernel[(aligned.num_blocks, cdiv(hidden, block_n))](
        h, w2, out, weights, aligned.sorted_pairs, aligned.block_expert, num_pairs, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=upcast, DOT_PRECISION=precision)
    return out.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
