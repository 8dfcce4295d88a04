"""Sliding-window attention and attention-logit soft-capping: both backends agree with a dense
formula written here (transformers' eager order: scores * scale, soft-cap, mask, softmax in fp32)
on paged mixed batches, and never read the blocks a window has left behind."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import interpreter, make_batch  # noqa: F401  (fixture)
from shardline.worker.attention.torch_backend import TorchAttentionBackend
from shardline.worker.attention.triton_backend import TritonAttentionBackend

# (query_len, seq_len) per sequence: decodes past the window, a fresh prefill longer than the
# window, a chunk after a cached prefix, short sequences still inside the window.
MIXED = [(1, 50), (24, 24), (1, 9), (13, 45), (1, 33)]
DECODES = [(1, 50), (1, 9), (1, 41)]  # split-K runs on decode-only steps
WINDOW = 12


def dense_reference(query, cache, meta, scale, window, cap):
    """Attention of every query row from the whole paged context, by the formula."""
    block_size = cache.shape[2]
    out = torch.empty_like(query)
    row = 0
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        slots = [int(meta.block_tables[i, t // block_size]) * block_size + t % block_size for t in range(slen)]
        k = cache[0].reshape(-1, *cache.shape[3:])[slots]  # [slen, kvh, d]
        v = cache[1].reshape(-1, *cache.shape[3:])[slots]
        q = query[row : row + qlen]  # [q, H, d]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        if cap is not None:
            s = torch.tanh(s / cap) * cap
        pos_q = torch.arange(slen - qlen, slen)[:, None]
        pos_k = torch.arange(slen)[None, :]
        allowed = pos_k <= pos_q
        if window is not None:
            allowed &= pos_k > pos_q - window
        s = s.masked_fill(~allowed, float("-inf"))
        out[row : row + qlen] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
        row += qlen
    return out


def _backends():
    return {"torch": TorchAttentionBackend(), "triton": TritonAttentionBackend(block_n=16),
            "triton-split": TritonAttentionBackend(num_splits=3, block_n=16, tokens_per_split=4)}


# (backend, batch, window, cap): every option on the reference; the interpreted kernels (slow) on
# the combinations that reach each of their code paths.
CASES = [
    ("torch", MIXED, WINDOW, None), ("torch", MIXED, None, 2.0), ("torch", MIXED, WINDOW, 2.0),
    ("torch", MIXED, 5, 1.5), ("triton", MIXED, WINDOW, 2.0), ("triton", MIXED, 5, None),
    ("triton-split", DECODES, WINDOW, 2.0),
]


@pytest.mark.parametrize("backend,seqs,window,cap", CASES,
                         ids=[f"{b}-w{w}-cap{c}-{'mixed' if s is MIXED else 'decodes'}" for b, s, w, c in CASES])
def test_windowed_softcapped_attention_matches_the_formula(interpreter, backend, seqs, window, cap):
    q, k, v, cache, meta = make_batch(seqs, 4, 2, 16, 8)
    impl = _backends()[backend]
    impl.write_kv(k, v, cache, meta)
    scale = 16 ** -0.5
    ref = dense_reference(q, cache, meta, scale, window, cap)
    out = impl.forward(q, cache, meta, scale, sliding_window=window, logit_softcap=cap)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    # the options change the result (else the comparison would prove nothing)
    assert (dense_reference(q, cache, meta, scale, None, None) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("backend,seqs", [("torch", MIXED), ("triton", MIXED), ("triton-split", DECODES)],
                         ids=["torch", "triton", "triton-split"])
def test_blocks_wholly_before_every_window_are_never_read(interpreter, backend, seqs):
    """The block manager releases such blocks and another request may overwrite them: poisoned
    with NaN, the output stays the same."""
    block = 8
    q, k, v, cache, meta = make_batch(seqs, 4, 2, 16, block)
    impl = _backends()[backend]
    impl.write_kv(k, v, cache, meta)
    scale = 16 ** -0.5
    clean = impl.forward(q, cache, meta, scale, sliding_window=WINDOW)
    poisoned = cache.clone()
    released = 0
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        first_needed = max(0, slen - qlen - WINDOW + 1)  # the oldest key the first query sees
        for b in range(first_needed // block):
            poisoned[:, int(meta.block_tables[i, b])] = float("nan")
            released += 1
    assert released >= 3
    out = impl.forward(q, poisoned, meta, scale, sliding_window=WINDOW)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, atol=0, rtol=0)


def test_split_decode_partitions_cover_only_the_window(interpreter):
    """Issue 17: a windowed decode row splits [ctx - window, ctx), not [0, ctx): 40 attended keys in
    2 splits of 32, whatever the context; the blocks before the window are never read."""
    window, block = 40, 8
    q, k, v, cache, meta = make_batch([(1, 90), (1, 30), (1, 57)], 4, 2, 16, block)
    impl = TritonAttentionBackend(num_splits=4, block_n=16, tokens_per_split=16)
    impl.write_kv(k, v, cache, meta)
    scale = 16 ** -0.5
    ref = dense_reference(q, cache, meta, scale, window, None)
    poisoned = cache.clone()
    for i, slen in enumerate(meta.seq_lens_cpu):
        for b in range(max(0, slen - window) // block):
            poisoned[:, int(meta.block_tables[i, b])] = float("nan")
    out = impl.forward(q, poisoned, meta, scale, sliding_window=window)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_gelu_tanh_and_mul_kernel_matches_transformers_activation(interpreter):
    """Gemma's MLP activation on the Triton path equals transformers' gelu_pytorch_tanh(gate) * up."""
    from transformers.activations import ACT2FN

    from shardline.worker.kernels.activation import act_and_mul

    x = torch.randn(5, 2 * 48, generator=torch.Generator().manual_seed(0)) * 3
    ref = ACT2FN["gelu_pytorch_tanh"](x[:, :48]) * x[:, 48:]
    torch.testing.assert_close(act_and_mul(x, "gelu_pytorch_tanh", impl="triton"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(act_and_mul(x, "gelu_pytorch_tanh", impl="torch"), ref, atol=1e-6, rtol=1e-6)
