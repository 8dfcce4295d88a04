"""The reference attention over the paged cache, in plain torch: runs on CPU and CUDA, and is what
the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.worker.attention.metadata import AttentionMetadata, DecodeGather


def gather_context(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of each sequence's first `max_len` context tokens: two [num_seqs, max_len, kv_heads, dim]."""
    block_size = kv_cache.shape[2]
    tables = block_tables[:, : (max_len + block_size - 1) // block_size].long()
    s, nb = tables.shape
    # index_select over the flattened table is several times faster than advanced indexing on CPU
    kv = kv_cache.index_select(1, tables.reshape(-1))  # [2, s * nb, bs, kvh, d]
    kv = kv.view(2, s, nb * block_size, kv.shape[-2], kv.shape[-1])[:, :, :max_len]
    return kv[0], kv[1]


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

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        slots = meta.slot_mapping
        if meta.memo.all_slots_valid is None:
            meta.memo.all_slots_valid = bool((slots >= 0).all())
        if not meta.memo.all_slots_valid:
            valid = slots >= 0
            slots, key, value = slots[valid], key[valid], value[valid]
        flat_k = kv_cache[0].view(-1, key.shape[-2], key.shape[-1])
        flat_v = kv_cache[1].view(-1, value.shape[-2], value.shape[-1])
        flat_k.index_copy_(0, slots, key.to(kv_cache.dtype))
        flat_v.index_copy_(0, slots, value.to(kv_cache.dtype))

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
        if meta.is_pure_decode and meta.num_seqs == query.shape[0]:
            return self._decode_all(query, kv_cache, meta, scale)
        out = torch.empty_like(query)
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

    def _decode_all(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
        """A pure-decode step (one query row per sequence): the gather index and the length mask
        come from the step's memo (built by the first layer), so each layer runs a gather and SDPA."""
        g = meta.memo.decode_gather
        if g is None:
            g = meta.memo.decode_gather = decode_gather(meta, kv_cache.shape[2])
        kv = kv_cache.index_select(1, g.block_index)
        kv = kv.view(2, g.num_seqs, -1, kv.shape[-2], kv.shape[-1])[:, :, : g.max_len]
        q, k, v = query.unsqueeze(2), kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [B, H, 1, d], [B, kvh, L, d]
        if g.mask is None and q.shape[1] == k.shape[1]:  # _sdpa would read mask=None as causal
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale).squeeze(2)
        return self._sdpa(q, k, v, g.mask, scale).squeeze(2)

    def _prefill(self, query, kv_cache, meta, scale, i, start, qlen, slen, out) -> None:
        k, v = gather_context(kv_cache, meta.block_tables[i : i + 1], slen)
        q = query[start : start + qlen].transpose(0, 1).unsqueeze(0)  # [1, H, q, d]
        mask = None  # the whole context is new: plain causal
        if slen != qlen:  # a chunk after a cached prefix: row r sees positions <= slen - qlen + r
            pos_q = torch.arange(slen - qlen, slen, device=query.device)
            pos_k = torch.arange(slen, device=query.device)
            mask = (pos_k[None, :] <= pos_q[:, None])[None, None]
        o = self._sdpa(q, k.transpose(1, 2), v.transpose(1, 2), mask, scale)  # [1, H, q, d]
        out[start : start + qlen] = o[0].transpose(0, 1)
