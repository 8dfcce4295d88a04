"""The skinny-GEMM kernel computes x @ w.T for M in 1..16 (FMA and tl.dot paths, split-K), and
pick_linear_impl answers from a per-shape measured table, which a later process can load back."""

from __future__ import annotations

import json

import pytest
import torch

from kernel_cases import interpreter  # noqa: F401  (fixture; sets up the interpreter first)
from shardline.worker.kernels.linear_choice import LinearAutotuner, LinearImpl, machine_fingerprint, pick_linear_impl
from shardline.worker.kernels.matvec import MatvecConfig, default_config, matvec

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 3e-2)}


@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize(
    "K,N,config",
    [(256, 96, None), (200, 70, MatvecConfig(32, 64, split_k=3)), (512, 48, MatvecConfig(16, 64, split_k=4))],
    ids=["default", "ragged-k-split3", "even-k-split4"],
)
def test_matvec_matches_linear_for_small_batches(interpreter, M, K, N, config):
    g = torch.Generator().manual_seed(M)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    torch.testing.assert_close(matvec(x, w, config, impl="triton"), x @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [2, 12])
def test_matvec_half_precision_accumulates_in_fp32(interpreter, dtype, M):
    x, w = torch.randn(M, 384).to(dtype), (torch.randn(64, 384) / 384**0.5).to(dtype)
    out = matvec(x, w, MatvecConfig(32, 128, split_k=2), impl="triton")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), x.float() @ w.float().T, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_matvec_hands_batches_above_16_to_torch():
    x, w = torch.randn(17, 32), torch.randn(8, 32)
    assert torch.equal(matvec(x, w, impl="triton"), torch.nn.functional.linear(x, w))


def test_default_config_splits_k_only_when_n_leaves_sms_idle():
    assert default_config(1, 4096, 4096).split_k > 1
    assert default_config(1, 128256, 4096).split_k == 1


def test_pick_linear_impl_is_always_torch_off_cuda():
    impl = pick_linear_impl(1, 4096, 4096, torch.bfloat16, "cpu")
    assert impl.kind == "torch"
    x, w = torch.randn(1, 16), torch.randn(4, 16)
    assert torch.equal(impl(x, w), x @ w.T)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LLAMA3_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


@cuda
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("K,N", LLAMA3_8B)
def test_matvec_matches_cublas_at_llama3_8b_shapes_on_gpu(M, K, N):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    torch.testing.assert_close(matvec(x, w).float(), (x.float() @ w.float().T), atol=3e-2, rtol=3e-2)


@cuda
def test_pick_linear_impl_measures_once_per_shape_and_its_choice_is_correct():
    tuner = LinearAutotuner()
    first = tuner.pick(2, 4096, 4096, torch.bfloat16, "cuda")
    assert first.torch_ms is not None and tuner.pick(2, 4096, 4096, torch.bfloat16, "cuda") is first
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    torch.testing.assert_close(first(x, w).float(), x.float() @ w.float().T, atol=3e-2, rtol=3e-2)


def test_a_saved_choice_table_loads_only_on_a_machine_with_the_same_fingerprint(tmp_path):
    saved = LinearAutotuner()
    saved.table[(4, 6144, 4096, torch.bfloat16, "cuda:0")] = LinearImpl("triton", MatvecConfig(32, 256, split_k=2), 0.031, 0.024)
    saved.table[(16, 4096, 4096, torch.bfloat16, "cuda:0")] = LinearImpl("torch", None, 0.020, 0.026)
    data = json.loads(json.dumps(saved.to_json("H200|abc")))  # through the file format
    fresh = LinearAutotuner()
    assert fresh.load_json(data, "H100|abc", "cuda:0") == 0 and fresh.table == {}
    assert fresh.load_json(data, "H200|abc", "cuda:0") == 2
    assert fresh.table == saved.table
    assert fresh.load_json(data, "H200|abc", "cuda:0") == 0  # shapes already in the table are kept
    fingerprint = machine_fingerprint("cpu")
    assert fingerprint.startswith("cpu|") and fingerprint == machine_fingerprint("cpu")
