"""Compile every Triton kernel for an H100 (sm_90) without a GPU, through the real launchers.

The interpreter accepts programs that compiled Triton rejects (tl.dot shapes and dtypes, constexpr
misuse, loop-carried type changes); this script catches those on a CPU-only machine. It runs the
public launchers on CPU tensors with each `Kernel[grid](...)` launch replaced by Triton's own
binder (the argument specialization a CUDA launch would compute: ints equal to 1 become constants,
multiples of 16 get divisibility hints) followed by a full compile to PTX and cubin with the
ptxas shipped in the triton wheel. Nothing executes, so results are not checked here.

Run it in a process where Triton is in compile mode:
    TRITON_INTERPRET=0 .venv/bin/python tests/kernel_compile_check.py [--quick]
It prints one line per compiled variant and exits non-zero if any failed.

    TRITON_INTERPRET=0 .venv/bin/python tests/kernel_compile_check.py --matvec-ptx
instead prints, as one JSON line per matvec call at the Llama-3-8B shapes (M = 1..16; QKV and
gate/up also with the pre-norm folded in, M = 1, 4, 8, 16), the launches it makes and what the PTX of each has in its K loop (asynchronous copies, barriers, shuffles):
tests/test_kernels_matvec.py reads it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from typing import Any, Callable

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("kernel_compile_check: unset TRITON_INTERPRET (compile mode is what is checked)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from shardline.worker.kernels import activation, fused_moe, kv_write, matvec, paged_attention, rmsnorm, rope, runtime

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory one H100 block may use (227 KiB)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
BACKEND = make_backend(TARGET)
_JIT: dict[int, JITFunction] = {}
_SEEN: set[str] = set()
_COMPILED: dict[str, Any] = {}
FAILURES: list[str] = []
LAUNCHES: list[tuple[str, tuple[int, ...], Any]] = []  # (kernel, grid, compiled) of every launch, in order


def _compile_launch(k: runtime.Kernel, args: tuple[Any, ...], kwargs: dict[str, Any], grid: tuple[int, ...] = ()) -> None:
    if id(k) not in _JIT:  # the launcher's own JITFunction, with its do_not_specialize list
        _JIT[id(k)] = k.jit_function() if hasattr(k, "jit_function") else JITFunction(k.fn)
    jit = _JIT[id(k)]
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(jit.signature, jit.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(BACKEND, kwargs, bound, specialization, options)
    key = f"{k.fn.__name__} {sorted(signature.items())} {sorted(constexprs.items())} {sorted(attrs)}"
    if key in _SEEN:
        if key in _COMPILED:
            LAUNCHES.append((k.fn.__name__, grid, _COMPILED[key]))
        return
    _SEEN.add(key)
    ptrs = sorted({v for v in signature.values() if v.startswith("*")})
    label = f"{k.fn.__name__} {','.join(ptrs)} " + " ".join(
        f"{jit.arg_names[i]}={v}" for (i,), v in constexprs.items()
    )
    try:
        compiled = triton_compile(ASTSource(jit, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    except Exception:
        FAILURES.append(label)
        print(f"FAIL {label}\n{traceback.format_exc()}")
        return
    _COMPILED[key] = compiled
    LAUNCHES.append((k.fn.__name__, grid, compiled))
    usage = _resource_usage(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    problems = []
    if shared > MAX_SHARED:
        problems.append(f"needs {shared} B of shared memory, more than an H100 block has")
    spill = usage.get("STACK", 0) + usage.get("LOCAL", 0)
    if spill > 0:  # cuobjdump reports register spills as stack frame bytes
        problems.append(f"spills registers ({spill} B of stack per thread): correct but slow")
    status = "WARN" if problems else "ok  "
    print(f"{status} {label}  (regs {usage.get('REG', '?')}, smem {shared}) {'; '.join(problems)}")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / LOCAL / SHARED of the kernel in a cubin, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", text)}


def _patch() -> None:
    def getitem(self: runtime.Kernel, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: _compile_launch(self, args, kwargs, tuple(grid))

    runtime.Kernel.__getitem__ = getitem  # type: ignore[method-assign]
    always = lambda *a, **k: True  # noqa: E731
    for mod in (activation, fused_moe, kv_write, matvec, rmsnorm, rope):
        mod.use_triton = always  # the launchers' CUDA-only dispatch, forced on for CPU tensors


def _batch(seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, block: int, dtype: torch.dtype):
    q_lens = [q for q, _ in seqs]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    n = starts[-1]
    max_blocks = max(-(-s // block) for _, s in seqs)
    query = torch.zeros(n, heads, head_dim, dtype=dtype)
    cache = torch.zeros(2, max_blocks * len(seqs) + 1, block, kv_heads, head_dim, dtype=dtype)
    qsl = torch.tensor(starts, dtype=torch.int32)
    seq_lens = torch.tensor([s for _, s in seqs], dtype=torch.int32)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    return query, cache, qsl, seq_lens, tables, max(q_lens), max(s for _, s in seqs)


def check_attention(quick: bool) -> None:
    shapes = [(32, 8, 128, 16)] if quick else [(4, 2, 8, 8), (4, 2, 16, 8), (32, 8, 128, 16), (32, 32, 128, 16), (28, 4, 128, 16), (16, 2, 80, 16),
                                               (12, 12, 96, 32), (64, 8, 64, 16), (8, 1, 256, 16)]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    batches = [[(1, 300)], [(1, 1000)] * 3, [(20, 40), (1, 70)], [(100, 100)]]
    for heads, kv, hd, block in shapes:
        for dtype in dtypes:
            for seqs in batches:
                q, cache, qsl, sl, bt, mq, ms = _batch(seqs, heads, kv, hd, block, dtype)
                for splits in (1, 4):
                    paged_attention.paged_attention(q, cache, qsl, sl, bt, mq, ms, 0.1, num_splits=splits,
                                                    tokens_per_split=64)
                key = q[:, :kv].contiguous()
                slots = torch.zeros(q.shape[0], dtype=torch.int64)
                kv_write.write_kv(key, key, cache, slots, impl="triton")


def check_elementwise(quick: bool) -> None:
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    hiddens = [(4096, 14336)] if quick else [(64, 128), (4096, 14336), (8192, 28672)]
    heads = [(32, 8, 128, 128)] if quick else [(4, 2, 16, 16), (32, 8, 128, 128), (16, 2, 80, 80), (32, 8, 128, 64)]
    for dtype in dtypes:
        for rows in (1, 7):
            for hidden, inter in hiddens:
                x = torch.zeros(rows, hidden, dtype=dtype)
                w = torch.ones(hidden, dtype=dtype)
                rmsnorm.rms_norm(x, w, 1e-5, impl="triton")
                rmsnorm.rms_norm(x, w, 1e-5, residual=x.clone(), impl="triton")
                activation.silu_and_mul(torch.zeros(rows, 2 * inter, dtype=dtype), impl="triton")
            for nq, nk, hd, rot in heads:
                qq = torch.zeros(rows, nq, hd, dtype=dtype)
                kk = torch.zeros(rows, nk, hd, dtype=dtype)
                cache = torch.zeros(64, rot, dtype=torch.float32)
                rope.apply_rope(qq, kk, torch.zeros(rows, dtype=torch.int64), cache, impl="triton")
                kv_cache = torch.zeros(2, 4, 16, nk, hd, dtype=dtype)
                rope.rope_and_write_kv(qq, kk, kk.clone(), torch.zeros(rows, dtype=torch.int64), cache, kv_cache,
                                                torch.zeros(rows, dtype=torch.int64), impl="triton")


def check_matvec(quick: bool) -> None:
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    shapes = [(4096, 6144), (14336, 4096)] if quick else [(64, 384), (128, 64), (4096, 6144), (4096, 28672), (14336, 4096), (4096, 128256), (4000, 96)]
    for dtype in dtypes:
        for M in (1, 3, 5, 16):
            for K, N in shapes:
                x = torch.zeros(M, K, dtype=dtype)
                w = torch.zeros(N, K, dtype=dtype)
                matvec.matvec(x, w, impl="triton")
                matvec.matvec(torch.zeros(M, 2 * K, dtype=dtype), w, impl="triton", gated=True)  # down with SiLU-and-mul
                norm = matvec.PreNorm(torch.ones(K, dtype=dtype), 1e-5, torch.zeros(M, K, dtype=dtype))
                matvec.normed_matvec(x, w, norm, impl="triton")  # QKV / gate-up with RMSNorm + residual
                if not quick:  # a split config and a wide one (the FMA path's 3-D accumulator bounds its tiles)
                    wide = matvec.MatvecConfig(128, 128, 1) if M > matvec.FMA_MAX_M else matvec.MatvecConfig(32, 128, 1)
                    for cfg in (matvec.MatvecConfig(16, 512 // matvec.next_pow2(M), 4), wide):
                        matvec.matvec(x, w, cfg, impl="triton")


def check_fused_moe(quick: bool) -> None:
    """Both grouped-matmul kernels at Qwen3-30B-A3B's shape (hidden 2048, 128 experts of 768, top 8;
    the GPU check's MoE steps) and at a tiny one, for a decode batch (16-row blocks) and a prefill
    (64-row blocks). The weights are never touched: torch.empty keeps the 1.6 GB unallocated."""
    shapes = [(2048, 768, 128, 8)] if quick else [(2048, 768, 128, 8), (64, 32, 8, 2)]
    tokens = [64] if quick else [1, 64, 2048]
    for hidden, inter, experts, top_k in shapes:
        w13 = torch.empty(experts, 2 * inter, hidden, dtype=torch.bfloat16)
        w2 = torch.empty(experts, hidden, inter, dtype=torch.bfloat16)
        for n in tokens:
            ids = (torch.arange(n * top_k) % experts).reshape(n, top_k)
            fused_moe.fused_moe(torch.zeros(n, hidden, dtype=torch.bfloat16), w13, w2, torch.ones(n, top_k), ids,
                                impl="triton")


def check_steps_reuse_one_variant(quick: bool) -> None:
    """Decode steps of different batch sizes and block-table widths, and matvec batches of 5..16
    rows, must reuse one compiled variant each: a new variant is a compile stall mid-serving."""
    before = len(_SEEN)
    for batch, context in ((1, 40), (2, 17), (3, 9), (16, 300), (17, 33), (33, 1000)):
        q, cache, qsl, sl, bt, mq, ms = _batch([(1, context)] * batch, 32, 8, 128, 16, torch.bfloat16)
        paged_attention.paged_attention(q, cache, qsl, sl, bt, mq, ms, 0.1, num_splits=1)
    for M in range(5, 17):
        matvec.matvec(torch.zeros(M, 4096, dtype=torch.bfloat16), torch.zeros(4096, 4096, dtype=torch.bfloat16),
                      matvec.MatvecConfig(64, 128, 1), impl="triton")
    new = len(_SEEN) - before
    if new > 2:
        FAILURES.append(f"steps of different sizes compiled {new} variants (expected at most 2)")
        print(f"FAIL {FAILURES[-1]}")
    else:
        print(f"ok   decode steps of 1..33 sequences and matvec M 5..16: {new} new variant(s)")


def ptx_loops(ptx: str) -> list[str]:
    """The bodies of the PTX's loops: from a label to the last branch back to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", line.strip()))}
    ends: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            ends[m.group(1)] = i
    return ["\n".join(lines[labels[name] : end + 1]) for name, end in ends.items()]


def ptx_counts(text: str) -> dict[str, int]:
    """Asynchronous copies, barriers, warp shuffles and plain global loads in a piece of PTX."""
    return {
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\b", text)),
        "bar_sync": len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", text)),
        "shfl": len(re.findall(r"\bshfl\.sync\b", text)),
        "ld_global": len(re.findall(r"\bld\.global\b", text)),
    }


MATVEC_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def matvec_ptx_report() -> list[dict[str, Any]]:
    """For each M in 1..16 and Llama-3-8B linear (bf16, the default config): the launches one
    matvec call makes and, per launch, the counts over the whole PTX and inside its main K loop
    (the loop with the most global traffic: asynchronous copies or global loads)."""
    rows = []
    for M in range(1, 17):
        for name, (K, N) in MATVEC_SHAPES.items():
            LAUNCHES.clear()
            matvec.matvec(torch.zeros(M, K, dtype=torch.bfloat16), torch.zeros(N, K, dtype=torch.bfloat16), impl="triton")
            launches = []
            for kernel_name, grid, compiled in LAUNCHES:
                ptx = compiled.asm["ptx"]
                loops = [ptx_counts(body) for body in ptx_loops(ptx)]
                main = max(loops, key=lambda c: (c["cp_async"] + c["ld_global"]), default=None)
                launches.append({"kernel": kernel_name, "grid": list(grid), "ptx": ptx_counts(ptx), "k_loop": main})
            rows.append({"M": M, "linear": name, "K": K, "N": N, "launches": launches})
    for M in (1, 4, 8, 16):  # QKV and gate/up with the pre-norm folded in: the weight loop after the rms pre-pass
        for name in ("qkv", "gate_up"):
            K, N = MATVEC_SHAPES[name]
            LAUNCHES.clear()
            x = torch.zeros(M, K, dtype=torch.bfloat16)
            norm = matvec.PreNorm(torch.ones(K, dtype=torch.bfloat16), 1e-5, torch.zeros(M, K, dtype=torch.bfloat16))
            matvec.normed_matvec(x, torch.zeros(N, K, dtype=torch.bfloat16), norm, impl="triton")
            launches = []
            for kernel_name, grid, compiled in LAUNCHES:
                ptx = compiled.asm["ptx"]
                loops = [ptx_counts(body) for body in ptx_loops(ptx)]
                weight_loop = max(loops, key=lambda c: c["cp_async"], default=None)
                launches.append({"kernel": kernel_name, "grid": list(grid), "ptx": ptx_counts(ptx), "k_loop": weight_loop})
            rows.append({"M": M, "linear": f"{name}+norm", "K": K, "N": N, "launches": launches})
    return rows


def main() -> int:
    quick = "--quick" in sys.argv
    _patch()
    if "--matvec-ptx" in sys.argv:
        for row in matvec_ptx_report():
            print(json.dumps(row))
        return 1 if FAILURES else 0
    for check in (check_steps_reuse_one_variant, check_elementwise, check_attention, check_matvec, check_fused_moe):
        check(quick)
    print(f"{len(_SEEN)} variants compiled for sm_90 with triton {triton.__version__}; {len(FAILURES)} failed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
