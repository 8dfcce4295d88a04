"""The reference attention over the paged cache, in plain torch: runs on CPU and CUDA, and is what
the Triton kernels are tested against. An FP8 cache is dequantized (code * scale) as it is gathered."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.worker.attention.kv_cache_dtype import KVScales, dequantize_kv, is_fp8_kv, scales_or_unit
from shardline.worker.attention.metadata import AttentionMetadata
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


class TorchAttentionBackend:
    """Decodes are attended to as one padded batch; each prefill chunk on its own."""

    name = "torch"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 kv_scales: KVScales | None = None) -> None:
        slots = meta.slot_mapping
        valid = slots >= 0
        if not bool(valid.all()):
            slots, key, value = slots[valid], key[valid], value[valid]
        store_rows(kv_cache, slots, key, value, kv_scales)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                kv_scales: KVScales | None = None) -> torch.Tensor:
        out = torch.empty_like(query)
        if is_fp8_kv(kv_cache):
            kv_scales = scales_or_unit(kv_scales, kv_cache.device)
        qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
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
