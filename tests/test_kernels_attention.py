"""The Triton attention backend agrees with the torch reference on paged, mixed batches.

CPU tests run the kernels in the Triton interpreter on small shapes; CUDA tests use real shapes."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import interpreter, make_batch, run_both  # noqa: F401  (fixture)
from shardline.worker.attention.metadata import get_attention_backend
from shardline.worker.attention.torch_backend import TorchAttentionBackend
from shardline.worker.attention.triton_backend import SplitPlan, TritonAttentionBackend, decode_split_slots
from shardline.worker.kernels.matvec import split_tickets
from shardline.worker.kernels.paged_attention import split_slots

# (query_len, seq_len) per sequence
PURE_DECODE = [(1, 1), (1, 17), (1, 70), (1, 33)]
PURE_PREFILL = [(20, 20), (5, 5), (37, 37)]
MIXED = [(1, 50), (24, 24), (1, 9), (13, 13)]
PREFIX_CACHED = [(10, 45), (3, 19), (1, 64), (16, 70)]
CASES = {"decode": PURE_DECODE, "prefill": PURE_PREFILL, "mixed": MIXED, "prefix_cached": PREFIX_CACHED}
TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (2e-2, 2e-2), torch.bfloat16: (3e-2, 3e-2)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 4, 64, 16), (4, 2, 128, 8), (8, 2, 64, 8)])
def test_attention_matches_reference_for_batch_kind_and_gqa_ratio(interpreter, case, heads, kv_heads, head_dim, block_size):
    out, ref, _, _ = run_both(CASES[case], heads, kv_heads, head_dim, block_size)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 2)])
def test_split_k_attention_matches_reference(interpreter, case, heads, kv_heads):
    backend = TritonAttentionBackend(num_splits=3, block_n=16, tokens_per_split=16)
    out, ref, _, _ = run_both(CASES[case], heads, kv_heads, 64, 16, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_gqa_group_that_is_not_a_power_of_two_is_padded_correctly(interpreter):
    backend = TritonAttentionBackend(num_splits=2, block_n=16, tokens_per_split=16)
    out, ref, _, _ = run_both(MIXED, 6, 2, 64, 16, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_head_dim_that_is_not_a_power_of_two_is_masked(interpreter):
    out, ref, _, _ = run_both(PREFIX_CACHED, 4, 2, 80, 16)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_head_dim_below_16_is_padded_to_a_tensor_core_dot_width(interpreter):
    # Compiled tl.dot rejects dimensions under 16; the launcher pads head_dim 8 to 16 and masks.
    out, ref, _, _ = run_both(MIXED, 4, 2, 8, 8)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_gqa_group_of_eight_decode_with_partitions_past_short_sequences(interpreter):
    # Group 8 fills half a 16-row decode tile; 90 tokens in 4 splits of whole 16-token tiles leave
    # the last split empty (it must contribute nothing, no NaN); the 2- and 17-token rows take one.
    backend = TritonAttentionBackend(num_splits=4, block_n=16, tokens_per_split=16)
    out, ref, _, _ = run_both([(1, 2), (1, 90), (1, 17)], 16, 2, 32, 16, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_nan_in_cache_slots_past_each_sequence_never_reaches_the_output(interpreter, num_splits):
    # A fresh cache is torch.empty: slots past a sequence's length (the tail of its last block,
    # other blocks) may hold NaN. Masked loads must replace them (0 * NaN is NaN in P @ V).
    seqs = PREFIX_CACHED
    backend = TritonAttentionBackend(num_splits=num_splits, block_n=16, tokens_per_split=16)
    q, k, v, cache, meta = make_batch(seqs, 4, 2, 16, 8)
    backend.write_kv(k, v, cache, meta)
    scale = 16**-0.5
    clean = backend.forward(q, cache, meta, scale)
    used = torch.zeros(cache.shape[1] * cache.shape[2], dtype=torch.bool)
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        for t in range(seq_len):
            used[int(meta.block_tables[i, t // 8]) * 8 + t % 8] = True
    poisoned = cache.clone()
    poisoned.view(2, -1, 2, 16)[:, ~used] = float("nan")
    out = backend.forward(q, poisoned, meta, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_attention_accumulates_in_fp32(interpreter, dtype):
    out, ref, _, _ = run_both(MIXED + [(1, 66)], 8, 2, 64, 16, dtype=dtype)
    assert out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def test_write_kv_stores_rows_at_slots_and_skips_padding(interpreter):
    out, ref, cache_ours, cache_ref = run_both(PREFIX_CACHED, 4, 2, 64, 8, pad_tokens=3)
    assert torch.equal(cache_ours, cache_ref)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_write_kv_casts_to_the_cache_dtype(interpreter):
    q, k, v, cache, meta = make_batch(MIXED, 4, 2, 64, 16, torch.float32)
    cache16 = cache.half()
    expected = cache16.clone()
    TorchAttentionBackend().write_kv(k, v, expected, meta)
    TritonAttentionBackend().write_kv(k, v, cache16, meta)
    assert torch.equal(cache16, expected)


def test_padding_rows_past_the_last_sequence_do_not_disturb_real_rows(interpreter):
    backend = TritonAttentionBackend(num_splits=2, block_n=16, tokens_per_split=16)
    out, ref, _, _ = run_both(PURE_DECODE, 4, 2, 64, 16, backend=backend, pad_tokens=5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_split_slots_never_exceed_what_the_longest_context_fills():
    assert split_slots(70, 3, 16) == 3
    assert split_slots(20, 8, 16) == 1
    assert split_slots(4096, 1, 64) == 1
    assert split_slots(131072, 32, 256) == 32


def test_decode_split_slots_fill_the_sms_and_leave_long_rows_room_within_a_budget():
    # Llama-3-8B on an H200 (8 KV heads, GQA 4: 10 programs a sequence at batch b, 132 SMs)
    assert decode_split_slots(8, 132) == 32  # batch 1: the cap
    assert decode_split_slots(320, 132) == 3  # batch 32: 4 x 264 // 320, above ceil(264 / 320)
    assert decode_split_slots(1060, 132) == 1  # past the budget: no slots


def test_decode_rows_short_and_long_take_their_own_split_counts_in_one_launch(interpreter):
    # Launched as a captured graph is (slots sized from a max_seq_len far past every context): each
    # row splits by its own length on the device, 1 split for 3 and 17 tokens, 2 for 40, 4 for 90,
    # and one launch does it all (no reduce kernel).
    backend = TritonAttentionBackend(num_splits=4, block_n=16, tokens_per_split=16)
    q, k, v, cache, meta = make_batch([(1, 3), (1, 40), (1, 90), (1, 17)], 8, 2, 32, 16)
    meta.max_seq_len = 4096
    backend.write_kv(k, v, cache, meta)
    ref = TorchAttentionBackend().forward(q, cache, meta, 32**-0.5)
    out = backend.forward(q, cache, meta, 32**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    # the last split of each split row combined them in the same launch and reset its counter
    assert int(split_tickets(q.device).abs().sum()) == 0
    assert torch.equal(backend.forward(q, cache, meta, 32**-0.5), out)  # split order: bit-identical


def test_mixed_step_splits_a_long_decode_beside_prefill_chunks(interpreter):
    # The host plan from the scheduler's lengths: the 600-token decode is cut into pieces no shorter
    # than the longest prefill context (and 256 tokens); the prefill tiles run in one pass.
    seqs = [(1, 600), (20, 20), (1, 9), (7, 30)]
    backend = TritonAttentionBackend()
    q, _, _, cache, meta = make_batch(seqs, 4, 2, 16, 16)
    assert backend.choose_splits(q, cache, meta) == SplitPlan(max_splits=2, tokens_per_split=256)
    out, ref, _, _ = run_both(seqs, 4, 2, 16, 16, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_backend_registry_builds_the_triton_backend():
    assert get_attention_backend("triton", torch.device("cpu")).name == "triton"


def test_interpreted_kernels_run_on_cpu_tensors_without_cuda(interpreter):
    q, k, v, cache, meta = make_batch(PURE_DECODE, 4, 2, 64, 16)
    out = TritonAttentionBackend().forward(q, cache, meta, 0.125)
    assert out.device.type == "cpu" and torch.isfinite(out).all()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("batch,context", [(1, 4096), (8, 1024), (32, 1000)])
def test_llama3_8b_decode_shapes_match_reference_on_gpu(batch, context):
    seqs = [(1, context - 7 * i) for i in range(batch)]
    out, ref, _, _ = run_both(seqs, 32, 8, 128, 16, torch.bfloat16, backend=TritonAttentionBackend(), device="cuda")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@cuda
def test_llama3_8b_mixed_prefix_cached_batch_matches_reference_on_gpu():
    seqs = [(512, 512), (1, 3000), (200, 1700), (1, 17), (64, 64)]
    out, ref, _, _ = run_both(seqs, 32, 8, 128, 16, torch.bfloat16, backend=TritonAttentionBackend(), device="cuda")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@cuda
def test_forced_split_k_matches_reference_on_gpu():
    seqs = [(1, 4000), (1, 1500), (40, 900)]
    backend = TritonAttentionBackend(num_splits=7)
    out, ref, _, _ = run_both(seqs, 32, 8, 128, 16, torch.float16, backend=backend, device="cuda")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
