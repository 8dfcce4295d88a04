"""The reference attention over the paged cache, in plain torch: runs on CPU and CUDA, and is what
the Triton kernels are tested against.

Sliding-window layers gather only the blocks their window reaches (from the block holding the
oldest visible key), so they never read blocks the block manager may have released; soft-capped
layers (Gemma 2) compute the scores by hand, since SDPA has no soft-cap.
An FP8 cache is dequantized (code * scale) as it is gathered."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.worker.attention.kv_cache_dtype import KVScales, dequantize_kv, is_fp8_kv, scales_or_unit
from shardline.worker.attention.metadata import AttentionMetadata, DecodeGather
from shardline.worker.kernels.kv_write import store_rows


def gather_context(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of each sequence's first `max_len` context tokens: two [num_seqs, max_len, kv_heads, dim]."""
    block_size = kv_cache.shape[2]
    tables = block_tables[:, : (max_len + block_size - 1) // block_size].long()
    s, nb = tables.shape
    # index_select over the flattened table is several times faster than advanced indexing on CPU
    kv = kv_cache.index_select(1, tables.reshape(-1))  # [2, s * nb, bs, kvh, d]
    kv = kv.view(2, s, nb * block_size, kv.shape[-2], kv.shape[-1])[:, :, :max_len]
    return kv[0], kv[1]


def gather_window(kv_cache: torch.Tensor, block_tables: torch.Tensor, first_pos: list[int],
                  end_pos: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of each row's positions from the start of the block holding first_pos[i] up
    to end_pos[i] (exclusive), padded to a common length: two [num_seqs, L, kv_heads, dim] and the
    [num_seqs, L] int64 positions they hold (positions past end_pos[i] are padding, read from block 0)."""
    block_size = kv_cache.shape[2]
    first_blocks = [p // block_size for p in first_pos]
    width = max(-(-e // block_size) - f for f, e in zip(first_blocks, end_pos))
    device = block_tables.device
    cols = torch.tensor(first_blocks, device=device)[:, None] + torch.arange(width, device=device)[None, :]
    inside = cols < block_tables.shape[1]
    tables = torch.where(inside, block_tables.gather(1, cols.clamp(max=block_tables.shape[1] - 1).long()),
                         torch.zeros((), dtype=block_tables.dtype, device=device))
    k, v = gather_context(kv_cache, tables, width * block_size)
    positions = cols[:, :, None] * block_size + torch.arange(block_size, device=device)[None, None, :]
    return k, v, positions.reshape(len(first_pos), width * block_size)


def decode_gather(meta: AttentionMetadata, block_size: int) -> DecodeGather:
    """The blocks every sequence of a pure-decode step reads (its table up to the longest context)
    and the mask of positions beyond each one's own length (None when all lengths are equal)."""
    max_len = max(meta.seq_lens_cpu)
    tables = meta.block_tables[:, : (max_len + block_size - 1) // block_size].long()
    mask = None
    if any(n != max_len for n in meta.seq_lens_cpu):
        lens = torch.tensor(meta.seq_lens_cpu, device=tables.device)
        mask = (torch.arange(max_len, device=tables.device)[None, :] < lens[:, None])[:, None, None, :]
    return DecodeGather(tables.reshape(-1), int(tables.shape[0]), max_len, mask)


class TorchAttentionBackend:
    """Decodes are attended to as one padded batch; each prefill chunk on its own."""

    name = "torch"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: KVScales | None = None) -> None:
        slots = meta.slot_mapping
        if meta.memo.all_slots_valid is None:
            meta.memo.all_slots_valid = bool((slots >= 0).all())
        if not meta.memo.all_slots_valid:
            valid = slots >= 0
            slots, key, value = slots[valid], key[valid], value[valid]
        store_rows(kv_cache, slots, key, value, kv_scales)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                *, sliding_window: int | None = None, logit_softcap: float | None = None,
                kv_scales: KVScales | None = None) -> torch.Tensor:
        """query [T, H, d] -> [T, H, d]: causal GQA attention; a query at position p sees keys
        p - sliding_window < k <= p when a window is set; scores become cap * tanh(s / cap) with
        logit_softcap; an FP8 cache's codes read as code * kv_scales."""
        if is_fp8_kv(kv_cache):
            kv_scales = scales_or_unit(kv_scales, kv_cache.device)
        if sliding_window is not None or logit_softcap is not None:
            return self._windowed(query, kv_cache, meta, scale, sliding_window, logit_softcap, kv_scales)
        qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
        if meta.is_pure_decode and meta.num_seqs == query.shape[0]:
            return self._decode_all(query, kv_cache, meta, scale, kv_scales)
        out = torch.empty_like(query)
        decode_idx = [i for i, q in enumerate(qlens) if q == 1]
        starts = [0]
        for q in qlens:
            starts.append(starts[-1] + q)
        if decode_idx:
            self._decode(query, kv_cache, meta, scale, kv_scales, decode_idx, starts, out)
        for i, q in enumerate(qlens):
            if q != 1:
                self._prefill(query, kv_cache, meta, scale, kv_scales, i, starts[i], q, slens[i], out)
        return out

    @staticmethod
    def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q: [B, H, Lq, d]; k, v: [B, kvh, Lk, d]; mask: [B, 1, Lq, Lk] bool (True = attend) or None
        for plain causal. Key/value heads are never copied per query head."""
        b, h, lq, d = q.shape
        kvh = k.shape[1]
        k, v = k.to(q.dtype), v.to(q.dtype)
        if h != kvh and lq == 1:
            # Decode: fold each KV head's query heads into its query axis, so one pass over that
            # head's keys serves the whole group (a copy per query head costs ~15x on CPU).
            out = F.scaled_dot_product_attention(q.reshape(b, kvh, h // kvh, d), k, v, attn_mask=mask, scale=scale)
            return out.reshape(b, h, 1, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=h != kvh)

    @staticmethod
    def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                    cap: float | None) -> torch.Tensor:
        """Attention by hand, in transformers' eager order: q [B, H, Lq, d]; k, v [B, kvh, Lk, d];
        mask [B, 1, Lq, Lk] bool; scores * scale, soft-capped, masked, softmax in fp32."""
        b, h, lq, d = q.shape
        kvh = k.shape[1]
        qg = q.reshape(b, kvh, h // kvh, lq, d)
        scores = torch.matmul(qg, k.to(q.dtype).unsqueeze(2).transpose(-1, -2)) * scale  # [B, kvh, g, Lq, Lk]
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v.to(q.dtype).unsqueeze(2)).reshape(b, h, lq, d)

    def _windowed(self, query, kv_cache, meta, scale, window: int | None, cap: float | None,
                  kv_scales: KVScales | None) -> torch.Tensor:
        """Every sequence of the step (decodes batched, prefill chunks alone) over only the keys its
        window reaches; the masked scores go through SDPA, or by hand when soft-capped."""
        out = torch.empty_like(query)
        qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
        starts = [0]
        for q in qlens:
            starts.append(starts[-1] + q)
        decode_idx = [i for i, q in enumerate(qlens) if q == 1]
        groups = [decode_idx] if decode_idx else []
        groups += [[i] for i, q in enumerate(qlens) if q != 1]
        dev = query.device
        for idx in groups:
            qlen = qlens[idx[0]]  # 1 for the decode group
            first_q = [slens[i] - qlen for i in idx]
            first_k = [max(0, p - window + 1) if window is not None else 0 for p in first_q]
            rows = torch.tensor(idx, device=dev)
            k, v, pos_k = gather_window(kv_cache, meta.block_tables.index_select(0, rows), first_k,
                                        [slens[i] for i in idx])
            if kv_scales is not None:
                k, v = dequantize_kv(k, kv_scales.k, query.dtype), dequantize_kv(v, kv_scales.v, query.dtype)
            tok = torch.tensor([starts[i] for i in idx], device=dev)[:, None] + torch.arange(qlen, device=dev)
            q = query[tok.reshape(-1)].reshape(len(idx), qlen, *query.shape[1:]).transpose(1, 2)  # [B, H, q, d]
            pos_q = torch.tensor(first_q, device=dev)[:, None] + torch.arange(qlen, device=dev)  # [B, q]
            mask = pos_k[:, None, :] <= pos_q[:, :, None]  # [B, q, L]
            if window is not None:
                mask &= pos_k[:, None, :] > pos_q[:, :, None] - window
            mask = mask[:, None]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            o = self._softcapped(q, k, v, mask, scale, cap) if cap is not None else self._sdpa(q, k, v, mask, scale)
            out[tok.reshape(-1)] = o.transpose(1, 2).reshape(-1, *query.shape[1:])
        return out

    def _decode(self, query, kv_cache, meta, scale, kv_scales, idx, starts, out) -> None:
        rows = torch.tensor([starts[i] for i in idx], device=query.device)
        lens = torch.tensor([meta.seq_lens_cpu[i] for i in idx], device=query.device)
        max_len = max(meta.seq_lens_cpu[i] for i in idx)
        tables = meta.block_tables[torch.tensor(idx, device=query.device)]
        k, v = gather_context(kv_cache, tables, max_len)  # [B, L, kvh, d]
        if kv_scales is not None:
            k, v = dequantize_kv(k, kv_scales.k, query.dtype), dequantize_kv(v, kv_scales.v, query.dtype)
        q = query[rows].unsqueeze(2)  # [B, H, 1, d]
        mask = (torch.arange(max_len, device=query.device)[None, :] < lens[:, None])[:, None, None, :]
        o = self._sdpa(q, k.transpose(1, 2), v.transpose(1, 2), mask, scale)  # [B, H, 1, d]
        out[rows] = o.squeeze(2)

    def _decode_all(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, kv_scales: KVScales | None) -> torch.Tensor:
        """A pure-decode step (one query row per sequence): the gather index and the length mask
        come from the step's memo (built by the first layer), so each layer runs a gather and SDPA."""
        g = meta.memo.decode_gather
        if g is None:
            g = meta.memo.decode_gather = decode_gather(meta, kv_cache.shape[2])
        kv = kv_cache.index_select(1, g.block_index)
        kv = kv.view(2, g.num_seqs, -1, kv.shape[-2], kv.shape[-1])[:, :, : g.max_len]
        k, v = kv[0], kv[1]
        if kv_scales is not None:
            k, v = dequantize_kv(k, kv_scales.k, query.dtype), dequantize_kv(v, kv_scales.v, query.dtype)
        q, k, v = query.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, 1, d], [B, kvh, L, d]
        if g.mask is None and q.shape[1] == k.shape[1]:  # _sdpa would read mask=None as causal
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale).squeeze(2)
        return self._sdpa(q, k, v, g.mask, scale).squeeze(2)

    def _prefill(self, query, kv_cache, meta, scale, kv_scales, i, start, qlen, slen, out) -> None:
        k, v = gather_context(kv_cache, meta.block_tables[i : i + 1], slen)
        if kv_scales is not None:
            k, v = dequantize_kv(k, kv_scales.k, query.dtype), dequantize_kv(v, kv_scales.v, query.dtype)
        q = query[start : start + qlen].transpose(0, 1).unsqueeze(0)  # [1, H, q, d]
        mask = None  # the whole context is new: plain causal
        if slen != qlen:  # a chunk after a cached prefix: row r sees positions <= slen - qlen + r
            pos_q = torch.arange(slen - qlen, slen, device=query.device)
            pos_k = torch.arange(slen, device=query.device)
            mask = (pos_k[None, :] <= pos_q[:, None])[None, None]
        o = self._sdpa(q, k.transpose(1, 2), v.transpose(1, 2), mask, scale)  # [1, H, q, d]
        out[start : start + qlen] = o[0].transpose(0, 1)
