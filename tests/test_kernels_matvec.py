"""The skinny-GEMM kernel computes x @ w.T for M in 1..16 (FMA and tl.dot paths, split-K reduced in
the same launch), compiles for sm_90 to a pipelined loop (checked in its PTX, no GPU needed), and
pick_linear_impl answers from a per-shape measured table, which a later process can load back."""

from __future__ import annotations

import json

import pytest
import torch

from kernel_cases import interpreter, nvidia_compiler_available, run_compile_check  # noqa: F401  (interpreter first)
from shardline.worker.kernels.linear_choice import (
    M_BUCKETS,
    LinearAutotuner,
    LinearImpl,
    bucket_of,
    candidates,
    fma_registers,
    machine_fingerprint,
    pick_linear_impl,
)
from shardline.worker.kernels import matvec as matvec_module
from shardline.worker.kernels.activation import silu_and_mul
from shardline.worker.kernels.matvec import MatvecConfig, PreNorm, default_config, matvec, normed_matvec
from shardline.worker.kernels.rmsnorm import rms_norm

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,config", [(1, None), (3, MatvecConfig(16, 32, split_k=3)), (9, None)])
def test_gated_matvec_applies_silu_and_mul_as_it_loads_its_input(interpreter, dtype, M, config):
    # The down projection with SiLU-and-mul folded in: the same numbers as the activation kernel's
    # output (rounded to the dtype) fed to the plain matvec.
    g = torch.Generator().manual_seed(M)
    gate_up = torch.randn(M, 2 * 96, generator=g).to(dtype)
    w = (torch.randn(40, 96, generator=g) / 96**0.5).to(dtype)
    fused = matvec(gate_up, w, config, impl="triton", gated=True)
    separate = matvec(silu_and_mul(gate_up, impl="triton"), w, config, impl="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), separate.float(), atol=tol, rtol=tol)
    assert torch.equal(matvec(gate_up, w, gated=True, impl="torch"), matvec(silu_and_mul(gate_up, impl="torch"), w, impl="torch"))
    with pytest.raises(ValueError, match=r"\[M, 2K\]"):
        matvec(gate_up[:, :96], w, impl="triton", gated=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,config,residual", [(1, 256, None, True), (3, 200, MatvecConfig(16, 64, split_k=3), True),
                                                 (9, 192, None, True), (2, 96, None, False)],
                         ids=["fma", "fma-ragged-split3", "dot", "no-residual"])
def test_normed_matvec_equals_rms_norm_then_matvec(interpreter, dtype, M, K, config, residual):
    # QKV and gate/up with their pre-norm (and its residual add) folded into the loads: the same
    # numbers as the RMSNorm kernel's output fed to the plain matvec, and the same next residual,
    # written once however many programs (and K slices) the launch has.
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype)
    res = torch.randn(M, K, generator=g).to(dtype) if residual else None
    gamma = (1 + 0.3 * torch.randn(K, generator=g)).to(dtype)
    w = (torch.randn(48, K, generator=g) / K**0.5).to(dtype)
    fused, summed = normed_matvec(x, w, PreNorm(gamma, 1e-5, res), config, impl="triton")
    h, expected_sum = rms_norm(x, gamma, 1e-5, res, impl="triton")
    separate = matvec(h, w, config, impl="triton")
    assert torch.equal(summed, expected_sum)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(fused.float(), separate.float(), atol=atol, rtol=rtol)
    assert (fused.float() - matvec(x, w, config, impl="triton").float()).abs().max() > 1e-2  # the norm mattered


def test_split_k_reduces_in_the_same_launch_and_leaves_its_tickets_at_zero(interpreter):
    # The last program of each column block sums every partial in split order; the ticket
    # counters it drew are reset, so the next launch (or graph replay) starts from zero.
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 320, generator=g), torch.randn(40, 320, generator=g)
    cfg = MatvecConfig(16, 32, split_k=5)
    first = matvec(x, w, cfg, impl="triton")
    torch.testing.assert_close(first, x @ w.T, atol=1e-4, rtol=1e-4)
    assert int(matvec_module.split_tickets(x.device).abs().sum()) == 0
    assert torch.equal(matvec(x, w, cfg, impl="triton"), first)  # same order of sums: bit-identical


def test_matvec_hands_batches_above_16_to_torch():
    x, w = torch.randn(17, 32), torch.randn(8, 32)
    assert torch.equal(matvec(x, w, impl="triton"), torch.nn.functional.linear(x, w))


def test_default_config_splits_k_only_when_n_leaves_sms_idle():
    assert default_config(1, 1024, 4096).split_k > 1  # a tensor-parallel shard's o_proj
    assert default_config(1, 6144, 4096).split_k == 1
    assert default_config(1, 128256, 4096).split_k == 1


@pytest.mark.slow
@pytest.mark.skipif(not nvidia_compiler_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_matvec_compiles_for_sm90_to_one_launch_with_a_pipelined_k_loop():
    # Compiled for sm_90 without a GPU (tests/kernel_compile_check.py --matvec-ptx). Before this
    # kernel's rewrite the M <= 4 loop reduced with tl.sum every K step: per step 6 barriers and 40
    # shuffles at M = 1 (24 and 160 at M = 4), no cp.async; split-K took a second kernel.
    proc = run_compile_check("--matvec-ptx")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    normed = [r for r in rows if r["linear"].endswith("+norm")]
    rows = [r for r in rows if not r["linear"].endswith("+norm")]
    assert {(r["M"], r["linear"]) for r in rows} == {(m, n) for m in range(1, 17) for n in ("qkv", "o", "gate_up", "down")}
    assert {(r["M"], r["linear"]) for r in normed} == {(m, n) for m in (1, 4, 8, 16) for n in ("qkv+norm", "gate_up+norm")}
    for r in normed:  # the RMSNorm folded in: the weight loop stays pipelined, the norm weight is its one plain load
        loop = r["launches"][0]["k_loop"]
        assert len(r["launches"]) == 1 and loop["cp_async"] > 0 and loop["shfl"] == 0, r
        assert loop["ld_global"] <= 1 and loop["bar_sync"] <= 4, r
    for r in rows:
        assert len(r["launches"]) == 1, r  # split or not: one kernel, no separate sum of splits
        loop = r["launches"][0]["k_loop"]
        assert loop["cp_async"] > 0, r  # the weight stream goes through asynchronous copies
        assert loop["ld_global"] == 0, r
        assert loop["bar_sync"] <= 2 and loop["shfl"] == 0, r  # the reduction is after the loop
        if r["M"] == 1:
            assert r["launches"][0]["grid"][1] == 1, r  # enough programs without splitting K


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
    assert tuner.pick(2, 4096, 4096, torch.bfloat16, "cuda").torch_ms is None  # not tuning: cuBLAS, unmeasured
    assert tuner.tune([(4096, 4096)], torch.bfloat16, "cuda") == len(M_BUCKETS)  # graph-timed, every bucket
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


class _ScriptedTimer:
    """Stands in for the CUDA-graph timer (timing needs a GPU; selection, coverage and the
    correctness gate do not): answers a scripted time per candidate after running it on the last
    weight copy, and records what it timed."""

    def __init__(self, fastest: MatvecConfig | None, torch_ms: float = 1.0) -> None:
        self.fastest, self.torch_ms, self.timed = fastest, torch_ms, []

    def __call__(self, impl, run, copies):
        run(copies - 1)
        self.timed.append(impl)
        if impl.kind == "torch":
            return self.torch_ms
        return 0.5 if impl.config == self.fastest else 2.0


def test_the_tuner_decides_every_batch_bucket_at_start_up_and_never_measures_while_serving(interpreter):
    shapes = [(48, 128), (16, 64)]
    fastest = candidates(1, 48, 128, 132)[1]
    timer = _ScriptedTimer(fastest)
    tuner = LinearAutotuner(timer=timer, allow_cpu=True)
    assert tuner.pick(1, 48, 64, torch.float32, "cpu").kind == "torch" and tuner.table == {}  # not tuning: no measure
    assert tuner.tune(shapes, torch.float32, "cpu") == len(shapes) * len(M_BUCKETS)
    assert {k[:3] for k in tuner.table} == {(b, n, k) for b in M_BUCKETS for n, k in shapes}
    assert tuner.table[(1, 48, 128, torch.float32, "cpu")].config == fastest
    timed = len(timer.timed)
    for M in range(1, 17):  # every batch size is answered by its bucket's entry, measured at the bucket's top
        for n, k in shapes:
            assert tuner.pick(M, n, k, torch.float32, "cpu") is tuner.table[(bucket_of(M), n, k, torch.float32, "cpu")]
    assert tuner.pick(2, 96, 64, torch.float32, "cpu").kind == "torch"  # an untuned shape mid-serving: cuBLAS
    assert len(timer.timed) == timed and tuner.untuned_picks == 2
    assert [bucket_of(m) for m in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]


def test_the_tuner_keeps_cublas_unless_a_config_beats_it_by_the_margin(interpreter):
    tuner = LinearAutotuner(timer=_ScriptedTimer(None, torch_ms=1.0), allow_cpu=True)
    choice = tuner.pick  # no candidate at 0.5 ms: every config times 2.0 against cuBLAS's 1.0
    with tuner.tuning():
        impl = choice(3, 40, 96, torch.float32, "cpu")
    assert impl.kind == "torch" and impl.torch_ms == 1.0 and impl.triton_ms == 2.0


def test_a_candidate_whose_output_is_wrong_is_never_timed_nor_chosen(interpreter):
    class Miscomputes(LinearImpl):  # what a miscompiled config would do
        def __call__(self, x, w):
            return super().__call__(x, w) * 1.01

    broken_cfg = MatvecConfig(16, 32)
    good_cfg = MatvecConfig(32, 32)

    class Tuner(LinearAutotuner):
        def candidate_impls(self, M, N, K, num_sms):
            return [Miscomputes("triton", broken_cfg), LinearImpl("triton", good_cfg)]

    timer = _ScriptedTimer(broken_cfg)  # the broken one would be the fastest
    tuner = Tuner(timer=timer, allow_cpu=True)
    with tuner.tuning():
        impl = tuner.pick(2, 48, 64, torch.float32, "cpu")
    assert impl.rejected == 1 and all(not isinstance(t, Miscomputes) for t in timer.timed)
    assert impl.kind == "torch" and impl.triton_ms == 2.0  # the correct config was timed, and lost to cuBLAS


def test_fp8_choices_are_decided_at_start_up_by_the_same_measure_and_never_while_serving(interpreter):
    # The FP8 tuner is the float one with another trial: W8A8 (torch._scaled_mm, which CPU torch
    # runs) as the baseline, the weight-only matvec configs as candidates, each checked first.
    from shardline.worker.kernels.fp8_linear_choice import Fp8LinearAutotuner
    from shardline.worker.layers.quantization.fp8 import w8a8_matmul

    fastest = candidates(1, 32, 64, 132)[0]
    timer = _ScriptedTimer(fastest)
    tuner = Fp8LinearAutotuner(w8a8_matmul, timer=timer, allow_cpu=True)
    assert tuner.pick(1, 32, 64, torch.float32, "cpu").kind == "torch" and tuner.table == {}  # serving: W8A8
    assert tuner.tune([(32, 64)], torch.float32, "cpu") == len(M_BUCKETS)
    first = tuner.table[(1, 32, 64, torch.float32, "cpu")]
    assert first.kind == "triton" and first.config == fastest and first.torch_ms == 1.0 and first.rejected == 0
    assert timer.timed[0].kind == "torch"  # the W8A8 baseline is timed with the candidates
    timed = len(timer.timed)
    assert tuner.pick(3, 32, 64, torch.float32, "cpu") is tuner.table[(4, 32, 64, torch.float32, "cpu")]
    assert tuner.pick(1, 64, 64, torch.float32, "cpu").kind == "torch" and len(timer.timed) == timed


def test_tuner_candidates_keep_the_fma_accumulator_in_registers_and_split_only_narrow_shapes():
    for M in (1, 2, 4, 8, 16):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (1024, 4096)):
            cands = candidates(M, n, k, 132)
            assert 1 <= len(cands) <= 8 and cands[0] == default_config(M, n, k, 132)
            for c in cands:
                if M <= 4:
                    assert fma_registers(M, c) <= 64, (M, n, k, c)
                if c.split_k > 1:
                    assert -(-n // c.block_n) < 132, (M, n, k, c)
