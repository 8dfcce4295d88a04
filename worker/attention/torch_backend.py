"""The reference attention over the paged cache, in plain torch: runs on CPU and CUDA, and is what
the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.worker.attention.metadata import AttentionMetadata


def gather_context(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of each sequence's first `max_len` context tokens: two [num_seqs, max_len, kv_heads, dim]."""
    num_blocks_needed = (max_len + kv_cache.shape[2] - 1) // kv_cache.shape[2]
    tables = block_tables[:, :num_blocks_needed].long()
    k = kv_cache[0][tables]  # [S, nb, bs, kvh, d]
    v = kv_cache[1][tables]
    s = tables.shape[0]
    k = k.reshape(s, -1, k.shape[-2], k.shape[-1])[:, :max_len]
    v = v.reshape(s, -1, v.shape[-2], v.shape[-1])[:, :max_len]
    return k, v


class TorchAttentionBackend:
    """Decodes are attended to as one padded batch; each prefill chunk on its own."""

    name = "torch"

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        slots = meta.slot_mapping
        valid = slots >= 0
        if not bool(valid.all()):
            slots, key, value = slots[valid], key[valid], value[valid]
        flat_k = kv_cache[0].view(-1, key.shape[-2], key.shape[-1])
        flat_v = kv_cache[1].view(-1, value.shape[-2], value.shape[-1])
        flat_k.index_copy_(0, slots, key.to(kv_cache.dtype))
        flat_v.index_copy_(0, slots, value.to(kv_cache.dtype))

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(query)
        qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
        decode_idx = [i for i, q in enumerate(qlens) if q == 1]
        starts = [0]
        for q in qlens:
            starts.append(starts[-1] + q)
        if decode_idx:
            self._decode(query, kv_cache, meta, scale, decode_idx, starts, out)
        for i, q in enumerate(qlens):
            if q != 1:
                self._prefill(query, kv_cache, meta, scale, i, starts[i], q, slens[i], out)
        return out

    @staticmethod
    def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        # q: [B, H, Lq, d]; k, v: [B, kvh, Lk, d]; mask: [B, 1, Lq, Lk] bool (True = attend)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)

    def _decode(self, query, kv_cache, meta, scale, idx, starts, out) -> None:
        rows = torch.tensor([starts[i] for i in idx], device=query.device)
        lens = torch.tensor([meta.seq_lens_cpu[i] for i in idx], device=query.device)
        max_len = max(meta.seq_lens_cpu[i] for i in idx)
        tables = meta.block_tables[torch.tensor(idx, device=query.device)]
        k, v = gather_context(kv_cache, tables, max_len)  # [B, L, kvh, d]
        q = query[rows].unsqueeze(2)  # [B, H, 1, d]
        mask = (torch.arange(max_len, device=query.device)[None, :] < lens[:, None])[:, None, None, :]
        o = self._sdpa(q, k.transpose(1, 2), v.transpose(1, 2), mask, scale)  # [B, H, 1, d]
        out[rows] = o.squeeze(2)

    def _prefill(self, query, kv_cache, meta, scale, i, start, qlen, slen, out) -> None:
        k, v = gather_context(kv_cache, meta.block_tables[i : i + 1], slen)
        q = query[start : start + qlen].transpose(0, 1).unsqueeze(0)  # [1, H, q, d]
        pos_q = torch.arange(slen - qlen, slen, device=query.device)
        pos_k = torch.arange(slen, device=query.device)
        mask = (pos_k[None, :] <= pos_q[:, None])[None, None]
        o = self._sdpa(q, k.transpose(1, 2), v.transpose(1, 2), mask, scale)  # [1, H, q, d]
        out[start : start + qlen] = o[0].transpose(0, 1)
