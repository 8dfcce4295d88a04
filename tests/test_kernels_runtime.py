"""How kernels are built for compiled Triton: what a CUDA launch specializes on, and that every
kernel compiles for an H100 (sm_90) through its real launcher, checked here without a GPU."""

from __future__ import annotations

import pytest

from kernel_cases import interpreter, nvidia_compiler_available, run_compile_check  # noqa: F401  (interpreter first)
from shardline.worker.kernels import matvec, paged_attention
from shardline.worker.kernels.runtime import HAS_TRITON, Kernel, kernel

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize(
    "k,names",
    [
        (paged_attention._paged_attention_kernel,
         {"num_seqs", "stride_bt", "stride_mt", "stride_mh", "max_splits", "tokens_per_split"}),
        (matvec._matvec_kernel, {"M"}),
    ],
)
def test_step_varying_int_arguments_are_not_specialized_by_compiled_triton(k, names):
    # Compiled Triton specializes ints on ==1 and %16==0: a batch-size argument left specialized
    # compiles new variants mid-serving. Building the JITFunction compiles nothing (no GPU needed).
    jit = k.jit_function()
    flagged = {p.name for p in jit.params if p.do_not_specialize}
    assert flagged == names


def test_kernel_rejects_do_not_specialize_names_it_does_not_have():
    def fn(x_ptr, n):
        pass

    with pytest.raises(ValueError, match="no argument"):
        kernel(do_not_specialize=("num_tokens",))(fn)
    assert isinstance(kernel(fn), Kernel) and kernel(fn).do_not_specialize == ()


@pytest.mark.slow
@pytest.mark.skipif(not nvidia_compiler_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_every_kernel_compiles_for_sm90_through_its_launcher():
    # The interpreter accepts what compiled Triton rejects (dot shapes and dtypes, constexpr misuse,
    # loop-carried type changes); tests/kernel_compile_check.py compiles the real launch variants.
    proc = run_compile_check("--quick")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " 0 failed" in proc.stdout
