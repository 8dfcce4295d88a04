"""Attention over the paged KV cache for a mixed batch (prefill chunks and decodes in one launch).

One program owns a tile of BLOCK_Q consecutive query tokens of one sequence times the GROUP query
heads that share one KV head, so each K/V tile is loaded once for the whole GQA group. Tiles are
numbered per sequence: sequence i's tiles start at query_start_loc[i] // BLOCK_Q + i, which bounds
the grid by num_tokens // BLOCK_Q + num_seqs without reading query lengths on the host; a program
finds its sequence by binary search over query_start_loc.

Split-K (flash-decoding), chosen on the device: the host sets only a number of split slots (the
grid's third axis, fixed by the batch shape so a captured CUDA graph fits every later step) and a
minimum partition length. Each decode row (query length 1) reads its own context length and uses
n = clamp(attended // tokens_per_split, 1, slots) splits over its attended range only: [0, ctx), or
[max(0, ctx - window), ctx) with a sliding window. Programs of slots >= n return at once; with n == 1
the row's one program writes the output directly, otherwise each split writes its normalized partial
output with its running max and sum (indexed by sequence) and takes a ticket from a counter of its
(sequence, KV head); the program that draws the last ticket rescales and combines the partials in
split order (deterministic, whichever program is last), writes the output and resets the counter,
as the matvec's split-K does (worker/kernels/matvec.py): attention is one kernel, split or not.
Prefill tiles (query length > 1) never split, so a long decode inside a mixed prefill+decode step
splits while the prefill tiles beside it run in one pass, and the partial buffers stay
[num_seqs, heads, slots, head_dim] whatever the chunk sizes.

Sliding windows (Mistral, Gemma 2/3's local layers): with window w a query at position p sees keys
p - w < k <= p; a tile starts its key loop at its first query's oldest visible key, so blocks
older than that (which the block manager may have released) are never read. Soft-capping (Gemma 2)
turns each score s into cap * tanh(s / cap) before the softmax.

FP8 (e4m3) caches: K and V tiles are converted to the query's dtype as they load; the per-tensor
key scale is folded into the softmax scale and the value scale into the output (both linear), so
the inner loop does no extra multiply (worker/attention/kv_cache_dtype.py).
"""

from __future__ import annotations

import torch

from shardline.worker.attention.kv_cache_dtype import KVScales, is_fp8_kv, scales_or_unit
from shardline.worker.kernels.matvec import TICKET_COUNTERS, split_tickets
from shardline.worker.kernels.runtime import interpreted_bf16_dot, kernel, next_pow2, tl

_LOG2E = 1.4426950408889634


# Step-varying ints (sequence count, block-table width, the split slots in the m/l strides) are
# not specialized: each new value would otherwise compile another variant (see runtime.Kernel).
@kernel(do_not_specialize=("num_seqs", "stride_bt", "stride_mt", "stride_mh", "max_splits",
                           "tokens_per_split"))
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_o_ptr,
    part_m_ptr,
    part_l_ptr,
    ticket_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    num_seqs,
    scale_log2,
    k_scale_ptr,
    v_scale_ptr,
    max_splits,
    tokens_per_split,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bt,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_mt,
    stride_mh,
    window,
    softcap_in,
    softcap_out,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Which sequence owns tile `pid`: the last i with query_start_loc[i] // BLOCK_Q + i <= pid.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    q_block = pid - (q_begin // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    cached_len = seq_len - q_len

    # Keys this tile can see: up to its last query position (causal), from its first query's oldest.
    kv_end = tl.minimum(seq_len, cached_len + (q_block + 1) * BLOCK_Q)
    kv_start = 0
    if HAS_WINDOW:  # the oldest key the tile's first query sees
        kv_start = tl.maximum(cached_len + q_block * BLOCK_Q - window + 1, 0)
    kv_lo = kv_start
    kv_hi = kv_end
    if SPLIT:  # this row's own split count, from its attended range
        n_split = tl.minimum(tl.maximum((kv_end - kv_start) // tokens_per_split, 1), max_splits)
        n_split = tl.where(q_len == 1, n_split, 1)  # prefill tiles never split
        if split >= n_split:  # an unused slot: out before any tensor load
            return
        # whole KV tiles per partition; with n_split == 1 the one partition is the whole range
        part = tl.cdiv(tl.cdiv(kv_end - kv_start, n_split), BLOCK_N) * BLOCK_N
        kv_lo = kv_start + split * part
        kv_hi = tl.minimum(kv_end, kv_lo + part)

    # Row m of the tile is query token q_block * BLOCK_Q + m // GROUP_PAD, head kv_head * GROUP + m % GROUP_PAD.
    offs_m = tl.arange(0, BLOCK_M)
    q_local = q_block * BLOCK_Q + offs_m // GROUP_PAD
    head = kv_head * GROUP + offs_m % GROUP_PAD
    row_ok = (q_local < q_len) & (offs_m % GROUP_PAD < GROUP)
    q_pos = cached_len + q_local
    token = (q_begin + q_local).to(tl.int64)
    offs_d = tl.arange(0, HEAD_D_PAD)
    d_ok = offs_d < HEAD_D
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST_DOT:  # K, V and P follow q's dtype into the dots
        q = q.to(tl.float32)
    if FP8:  # the key scale folds into the softmax scale (QK^T is linear in K), soft-capped or not
        k_scale = tl.load(k_scale_ptr)
        scale_log2 = scale_log2 * k_scale
        softcap_in = softcap_in * k_scale

    # A finite "minus infinity" for running maxima keeps rows that have seen no key yet NaN-free.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
    # NOTE: traced by Triton, `seq` is a tl tensor (mypy reads the Python `lo - 1` as an int).
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt  # type: ignore[attr-defined]
    head_off = kv_head.to(tl.int64) * stride_ch
    for start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_hi
        # int64 before the stride product: block * stride_cb spans one layer's K (or V) cache,
        # num_blocks * block_size * kv_heads * head_dim elements -- ~470M for Llama-3-8B on 80 GB
        # (32 layers), past 2**31 once one layer's K half exceeds 4 GiB of bf16 (fewer layers, more
        # memory). Compiled Triton would wrap an int32 product; the interpreter computes in int64.
        blk = tl.load(table_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot_off = blk * stride_cb + (offs_n % BLOCK_SIZE) * stride_co + head_off
        k = tl.load(k_cache_ptr + slot_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:  # cap * tanh(s * scale / cap), in log2 units; tanh(x) = 2 sigmoid(2x) - 1
            s = (2.0 * tl.sigmoid(2.0 * s * softcap_in) - 1.0) * softcap_out
        else:
            s = s * scale_log2
        allowed = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        if HAS_WINDOW:
            allowed = allowed & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + slot_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if FP8:  # the value scale, applied once to the output (P @ V is linear in V)
        o = o * tl.load(v_scale_ptr)
    mask_o = row_ok[:, None] & d_ok[None, :]
    dst = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if SPLIT:  # a split row leaves partials (by sequence: only query-length-1 rows split); the last combines
        # NOTE: broadcast before comparing: the interpreter stores a scalar int1 & block int1 as int32
        partial = (tl.zeros([BLOCK_M], dtype=tl.int32) + n_split) > 1
        seq64 = seq.to(tl.int64)  # type: ignore[attr-defined]
        part_off = seq64 * stride_pt + head.to(tl.int64) * stride_ph + split * stride_ps
        tl.store(part_o_ptr + part_off[:, None] + offs_d[None, :], o, mask=mask_o & partial[:, None])
        ml = seq64 * stride_mt + head.to(tl.int64) * stride_mh + split
        tl.store(part_m_ptr + ml, m_i, mask=row_ok & partial)
        tl.store(part_l_ptr + ml, l_i, mask=row_ok & partial)
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=mask_o & ~partial[:, None])
        if n_split > 1:
            # Every thread's partial is stored before the one release below (CTA barrier, then a
            # gpu-scope acq_rel ticket): the program that draws the last ticket sees all partials.
            tl.debug_barrier()
            counter = ticket_ptr + seq * tl.num_programs(1) + kv_head
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == n_split - 1:
                ml0 = seq64 * stride_mt + head.to(tl.int64) * stride_mh
                m_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
                for s in range(0, n_split):
                    m_s = tl.load(part_m_ptr + ml0 + s, mask=row_ok, other=-1.0e30, cache_modifier=".cg")
                    m_max = tl.maximum(m_max, m_s)
                # Partials are normalized by their own sums; weight each by its share of the global
                # sum (a split past the range's last tile saw no key: l = 0 weighs nothing).
                total = tl.zeros([BLOCK_M], dtype=tl.float32)
                comb = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
                for s in range(0, n_split):
                    m_s = tl.load(part_m_ptr + ml0 + s, mask=row_ok, other=-1.0e30, cache_modifier=".cg")
                    l_s = tl.load(part_l_ptr + ml0 + s, mask=row_ok, other=0.0, cache_modifier=".cg")
                    w = tl.exp2(m_s - m_max) * l_s
                    o_off = seq64 * stride_pt + head.to(tl.int64) * stride_ph + s * stride_ps
                    o_s = tl.load(part_o_ptr + o_off[:, None] + offs_d[None, :], mask=mask_o, other=0.0,
                                  cache_modifier=".cg")
                    comb += w[:, None] * o_s
                    total += w
                comb = comb / tl.where(total > 0.0, total, 1.0)[:, None]
                tl.store(dst, comb.to(out_ptr.dtype.element_ty), mask=mask_o)
                tl.store(counter, 0)  # ready for the next launch (and the next graph replay)
    else:
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=mask_o)


def tile_shape(num_heads: int, num_kv_heads: int, max_query_len: int) -> tuple[int, int, int]:
    """(GROUP_PAD, BLOCK_Q, BLOCK_M): rows per tile are BLOCK_Q tokens times the padded GQA group;
    at least 16 rows (tl.dot's minimum), 64 when prefill chunks are in the batch."""
    group_pad = next_pow2(num_heads // num_kv_heads)
    block_m = max(16 if max_query_len <= 1 else 64, group_pad)
    return group_pad, block_m // group_pad, block_m


def split_slots(max_seq_len: int, num_splits: int, tokens_per_split: int) -> int:
    """Split slots worth launching: at most num_splits, and no more than a context of max_seq_len
    tokens (an upper bound: max_model_len in a captured graph) fills at tokens_per_split keys a
    split. Each decode row then picks its own count on the device (see the module note)."""
    return max(1, min(num_splits, max(1, max_seq_len) // max(1, tokens_per_split)))


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    num_splits: int = 1,
    block_n: int = 64,
    tokens_per_split: int = 256,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    kv_scales: KVScales | None = None,
) -> torch.Tensor:
    """Causal GQA attention of query [num_tokens, heads, dim] over kv_cache [2, blocks, block_size,
    kv_heads, dim]; sequence i's queries are rows query_start_loc[i]:query_start_loc[i+1] and sit at
    the last positions of its seq_lens[i] tokens. Host ints size the grid only: `num_splits` is the
    most splits a decode row may use, and each row uses one per `tokens_per_split` keys it attends
    to (decided on the device from seq_lens, see the module note). `sliding_window`
    (tokens) limits each query to its last that many positions; `logit_softcap` soft-caps scores;
    an FP8 cache's codes read as code * kv_scales (other caches ignore the scales)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: {num_heads} query heads do not split into {num_kv_heads} KV heads")
    if kv_cache.stride(-1) != 1:
        raise ValueError("paged_attention: the KV cache's last dimension must be contiguous")
    if query.stride(-1) != 1:
        query = query.contiguous()
    if out is None:
        out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"paged_attention: block_n must be a power of two >= 16 (tl.dot), got {block_n}")
    group = num_heads // num_kv_heads
    group_pad, block_q, block_m = tile_shape(num_heads, num_kv_heads, max_query_len)
    # Compiled tl.dot needs every dimension >= 16: head_dim is the QK^T reduction and the PV width.
    head_d_pad = max(16, next_pow2(head_dim))
    if tokens_per_split < 1:
        raise ValueError(f"paged_attention: tokens_per_split must be >= 1, got {tokens_per_split}")
    num_splits = split_slots(max_seq_len, num_splits, tokens_per_split)
    split = num_splits > 1
    if split:  # by sequence: only query-length-1 rows split
        part_o = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        part_m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        if num_seqs * num_kv_heads > TICKET_COUNTERS:
            raise ValueError(f"paged_attention: split tickets for {num_seqs} sequences x {num_kv_heads} KV heads, "
                             f"more than {TICKET_COUNTERS}")
        tickets = split_tickets(query.device)
    else:  # unused by the kernel; any tensor of the right kind keeps the signature fixed
        part_o = part_m = part_l = tickets = out
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    upcast = interpreted_bf16_dot(query.dtype)
    fp8 = is_fp8_kv(kv_cache)
    s = scales_or_unit(kv_scales, kv_cache.device) if fp8 else None
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        part_o,
        part_m,
        part_l,
        tickets,
        query_start_loc,
        seq_lens,
        block_tables,
        num_seqs,
        scale * _LOG2E,
        s.k if s is not None else out,  # read only for an FP8 cache
        s.v if s is not None else out,
        num_splits,
        tokens_per_split,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        part_o.stride(0) if split else 0,
        part_o.stride(1) if split else 0,
        part_o.stride(2) if split else 0,
        part_m.stride(0) if split else 0,
        part_m.stride(1) if split else 0,
        sliding_window or 0,
        scale / logit_softcap if logit_softcap else 0.0,
        logit_softcap * _LOG2E if logit_softcap else 0.0,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_D=head_dim,
        HEAD_D_PAD=head_d_pad,
        BLOCK_SIZE=block_size,
        SPLIT=split,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or upcast else "tf32",
        UPCAST_DOT=upcast,
        HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=logit_softcap is not None,
        FP8=fp8,
    )
    return out
