"""RMSNorm(+residual), SiLU-and-mul and RoPE kernels agree with their torch references (and the
references with HF Llama)."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import interpreter  # noqa: F401  (fixture; sets up the interpreter first)
from shardline.worker.kernels.activation import silu_and_mul
from shardline.worker.kernels.rmsnorm import rms_norm
from shardline.worker.kernels.kv_write import write_kv_reference
from shardline.worker.kernels.rope import apply_rope, cos_sin_cache, rope_and_write_kv, rope_inv_freq

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual_returns_normed_sum_and_the_sum(interpreter, dtype):
    g = torch.Generator().manual_seed(0)
    x, res, w = (torch.randn(5, 96, generator=g).to(dtype), torch.randn(5, 96, generator=g).to(dtype), torch.rand(96, generator=g).to(dtype))
    out, new_res = rms_norm(x, w, 1e-5, residual=res, impl="triton")
    ref_out, ref_res = rms_norm(x, w, 1e-5, residual=res, impl="torch")
    if dtype == torch.bfloat16:  # the interpreter's fp32->bf16 cast may round differently by 1 ulp
        torch.testing.assert_close(new_res, ref_res, atol=0, rtol=8e-3)
    else:
        assert torch.equal(new_res, ref_res)
    torch.testing.assert_close(out, ref_out, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_rms_norm_without_residual_passes_x_through_as_the_residual(interpreter):
    x, w = torch.randn(3, 2, 70), torch.rand(70)
    out, res = rms_norm(x, w, 1e-6, impl="triton")
    assert res is x and out.shape == x.shape
    torch.testing.assert_close(out, rms_norm(x, w, 1e-6, impl="torch")[0], atol=1e-5, rtol=1e-5)


def test_rms_norm_reference_matches_hf_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(64))
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, hf.weight.data, 1e-6, impl="torch")[0], hf(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_gates_the_second_half_with_the_first(interpreter, dtype):
    x = torch.randn(3, 4, 2 * 300).to(dtype)
    out = silu_and_mul(x, impl="triton")
    assert out.shape == (3, 4, 300)
    expected = torch.nn.functional.silu(x[..., :300].float()) * x[..., 300:].float()
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype][0] * 4, rtol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rope_rotates_q_and_k_in_place_like_the_reference(interpreter, dtype, rotary_dim):
    cache = cos_sin_cache(rope_inv_freq(rotary_dim, 500000.0), 128)
    qkv = torch.randn(7, 6 + 2 * 2, 64).to(dtype)  # q, k as strided views of one fused projection
    q, k = qkv[:, :6], qkv[:, 6:8]
    positions = torch.tensor([0, 1, 5, 127, 64, 3, 3])
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, 8:].clone()
    apply_rope(q, k, positions, cache, impl="triton")
    apply_rope(q_ref, k_ref, positions, cache, impl="torch")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(q, q_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(k, k_ref, atol=atol, rtol=rtol)
    assert torch.equal(qkv[:, 8:], v_before)  # the value heads beside them are untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [16, 8])  # full and partial rotary (head_dim 16)
def test_rope_and_kv_write_in_one_kernel_equal_rope_then_write(interpreter, dtype, rotary_dim):
    # What the two kernels did, in one launch: q and k rotated in place, rotated k and v stored at
    # their slots, the padding row (slot -1) stored nowhere, every other cache slot untouched.
    g = torch.Generator().manual_seed(rotary_dim)
    cache = cos_sin_cache(rope_inv_freq(rotary_dim, 500000.0), 64)
    qkv = torch.randn(3, (4 + 2 + 2) * 16, generator=g).to(dtype)  # a fused QKV output: strided views
    q, k, v = (t.reshape(3, -1, 16) for t in qkv.split([64, 32, 32], dim=-1))
    positions, slots = torch.tensor([0, 17, 63]), torch.tensor([5, -1, 12])
    kv_cache = torch.randn(2, 4, 4, 2, 16, generator=g).to(dtype)
    q_ref, k_ref, v_ref, kv_ref = q.clone(), k.clone(), v.clone(), kv_cache.clone()
    rope_and_write_kv(q, k, v, positions, cache, kv_cache, slots, impl="triton")
    apply_rope(q_ref, k_ref, positions, cache, impl="torch")
    write_kv_reference(k_ref, v_ref, kv_ref, slots)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k, k_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(kv_cache, kv_ref, atol=tol, rtol=tol)


def test_rope_reference_matches_hf_llama_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cache = cos_sin_cache(rope_inv_freq(64), 50)
    q, k = torch.randn(5, 4, 64), torch.randn(5, 2, 64)
    positions = torch.tensor([0, 7, 8, 49, 2])
    half = cache[positions]
    cos = torch.cat([half[:, :32], half[:, :32]], -1)[None]
    sin = torch.cat([half[:, 32:], half[:, 32:]], -1)[None]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    apply_rope(q, k, positions, cache, impl="torch")
    torch.testing.assert_close(q, hf_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, hf_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_auto_dispatch_uses_torch_for_cpu_tensors():
    x = torch.randn(2, 8)
    assert torch.equal(silu_and_mul(x), silu_and_mul(x, impl="torch"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_fused_kernels_match_references_at_llama3_8b_sizes_on_gpu():
    x, res = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16)
    out, new_res = rms_norm(x, w, 1e-5, residual=res)
    ref_out, ref_res = rms_norm(x, w, 1e-5, residual=res, impl="torch")
    assert torch.equal(new_res, ref_res)
    torch.testing.assert_close(out, ref_out, atol=3e-2, rtol=3e-2)
    gu = torch.randn(16, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(gu), silu_and_mul(gu, impl="torch"), atol=3e-2, rtol=3e-2)
    cache = cos_sin_cache(rope_inv_freq(128, 500000.0), 8192, device="cuda")
    q, k = torch.randn(16, 32, 128, device="cuda", dtype=torch.bfloat16), torch.randn(16, 8, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 8192, (16,), device="cuda")
    q2, k2 = q.clone(), k.clone()
    apply_rope(q, k, pos, cache)
    apply_rope(q2, k2, pos, cache, impl="torch")
    torch.testing.assert_close(q, q2, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(k, k2, atol=3e-2, rtol=3e-2)
