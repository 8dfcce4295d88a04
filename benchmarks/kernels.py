"""Kernel micro-benchmarks on one CUDA GPU: our Triton kernels against the torch/cuBLAS baseline.

Prints one table per kernel (shape, ours, baseline, ratio, achieved GB/s and its share of the
measured device-to-device copy bandwidth). Needs CUDA, torch and Triton; no Ray.

    python benchmarks/kernels.py [--json] [--dtype bfloat16] [--only matvec,attention,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn, via triton.testing.do_bench (cache flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth (bytes read + written per second) on a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_ms(lambda: dst.copy_(src)) / 1e6


def row(name: str, shape: str, ours_ms: float, base_ms: float, nbytes: int, copy_gbs: float) -> dict:
    gbs = nbytes / ours_ms / 1e6
    return {
        "kernel": name,
        "shape": shape,
        "ours_us": ours_ms * 1e3,
        "baseline_us": base_ms * 1e3,
        "speedup": base_ms / ours_ms,
        "gb_s": gbs,
        "pct_of_copy_bw": 100 * gbs / copy_gbs,
    }


def bench_matvec(dtype: torch.dtype, copy_gbs: float) -> list[dict]:
    from shardline.worker.kernels.linear_choice import LinearAutotuner
    from shardline.worker.kernels.matvec import matvec

    shapes = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096), "lm_head": (4096, 128256)}
    tuner = LinearAutotuner()
    rows = []
    for name, (K, N) in shapes.items():
        w = torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5
        for M in (1, 2, 4, 8, 16):
            x = torch.randn(M, K, dtype=dtype, device="cuda")
            choice = tuner.pick(M, N, K, dtype, "cuda")
            cfg = choice.config  # the tuned Triton config when it won, else the default guess
            ours = time_ms(lambda: matvec(x, w, cfg, impl="triton"))
            base = time_ms(lambda: torch.nn.functional.linear(x, w))
            nbytes = (N * K + M * K + M * N) * w.element_size()
            r = row("matvec", f"{name} M={M} K={K} N={N}", ours, base, nbytes, copy_gbs)
            r["picked"] = choice.kind
            rows.append(r)
    return rows


def bench_normed_matvec(dtype: torch.dtype, copy_gbs: float) -> list[dict]:
    """QKV and gate/up with their pre-norm folded into the matvec (one launch) against the RMSNorm
    kernel followed by the same matvec config (two launches): whether the fold pays on this GPU."""
    from shardline.worker.kernels.matvec import PreNorm, default_config, matvec, normed_matvec
    from shardline.worker.kernels.rmsnorm import rms_norm

    rows = []
    for name, (K, N) in {"qkv": (4096, 6144), "gate_up": (4096, 28672)}.items():
        w = torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5
        gamma = torch.rand(K, dtype=dtype, device="cuda")
        for M in (1, 4, 16):
            x, res = torch.randn(M, K, dtype=dtype, device="cuda"), torch.randn(M, K, dtype=dtype, device="cuda")
            cfg = default_config(M, N, K, torch.cuda.get_device_properties(0).multi_processor_count)
            norm = PreNorm(gamma, 1e-5, res)
            ours = time_ms(lambda: normed_matvec(x, w, norm, cfg, impl="triton"))
            base = time_ms(lambda: matvec(rms_norm(x, gamma, 1e-5, residual=res)[0], w, cfg, impl="triton"))
            nbytes = (N * K + 3 * M * K + M * N) * w.element_size()
            rows.append(row("normed_matvec", f"{name} M={M} K={K} N={N}", ours, base, nbytes, copy_gbs))
    return rows


def bench_attention(dtype: torch.dtype, copy_gbs: float) -> list[dict]:
    from shardline.worker.attention.metadata import AttentionMetadata
    from shardline.worker.attention.torch_backend import TorchAttentionBackend
    from shardline.worker.attention.triton_backend import TritonAttentionBackend

    heads, kv_heads, dim, block = 32, 8, 128, 16
    ours_backend, ref_backend = TritonAttentionBackend(), TorchAttentionBackend()
    rows = []
    for context in (1024, 4096):
        for batch in (1, 8, 32, 128):
            blocks_per_seq = context // block
            num_blocks = batch * blocks_per_seq
            cache = torch.randn(2, num_blocks, block, kv_heads, dim, dtype=dtype, device="cuda")
            tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
            meta = AttentionMetadata(
                slot_mapping=torch.zeros(batch, dtype=torch.int64, device="cuda"),
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                seq_lens=torch.full((batch,), context, dtype=torch.int32, device="cuda"),
                block_tables=tables,
                max_query_len=1,
                max_seq_len=context,
                query_lens_cpu=[1] * batch,
                seq_lens_cpu=[context] * batch,
            )
            q = torch.randn(batch, heads, dim, dtype=dtype, device="cuda")
            scale = dim**-0.5
            ours = time_ms(lambda: ours_backend.forward(q, cache, meta, scale))
            base = time_ms(lambda: ref_backend.forward(q, cache, meta, scale))
            nbytes = cache.numel() * cache.element_size() + 2 * q.numel() * q.element_size()
            splits = ours_backend.choose_splits(q, cache, meta).max_splits
            rows.append(row("decode_attention", f"batch={batch} ctx={context} splits={splits}", ours, base, nbytes, copy_gbs))
    return rows


def bench_elementwise(dtype: torch.dtype, copy_gbs: float) -> list[dict]:
    from shardline.worker.kernels.activation import silu_and_mul
    from shardline.worker.kernels.rmsnorm import rms_norm
    from shardline.worker.kernels.rope import apply_rope, cos_sin_cache, rope_inv_freq

    rows = []
    es = torch.empty(0, dtype=dtype).element_size()
    cache = cos_sin_cache(rope_inv_freq(128, 500000.0), 8192, device="cuda")
    for tokens in (1, 16, 128, 2048):
        x = torch.randn(tokens, 4096, dtype=dtype, device="cuda")
        res = torch.randn_like(x)
        w = torch.rand(4096, dtype=dtype, device="cuda")
        ours = time_ms(lambda: rms_norm(x, w, 1e-5, residual=res))
        base = time_ms(lambda: rms_norm(x, w, 1e-5, residual=res, impl="torch"))
        rows.append(row("rms_norm+residual", f"tokens={tokens} hidden=4096", ours, base, 4 * x.numel() * es, copy_gbs))
        gu = torch.randn(tokens, 2 * 14336, dtype=dtype, device="cuda")
        ours = time_ms(lambda: silu_and_mul(gu))
        base = time_ms(lambda: silu_and_mul(gu, impl="torch"))
        rows.append(row("silu_and_mul", f"tokens={tokens} inter=14336", ours, base, 3 * gu.numel() // 2 * es, copy_gbs))
        q = torch.randn(tokens, 32, 128, dtype=dtype, device="cuda")
        k = torch.randn(tokens, 8, 128, dtype=dtype, device="cuda")
        pos = torch.randint(0, 8192, (tokens,), device="cuda")
        ours = time_ms(lambda: apply_rope(q, k, pos, cache))
        base = time_ms(lambda: apply_rope(q, k, pos, cache, impl="torch"))
        rows.append(row("rope", f"tokens={tokens} 32q/8kv x128", ours, base, 2 * (q.numel() + k.numel()) * es, copy_gbs))
    return rows


BENCHES = {"matvec": bench_matvec, "normed_matvec": bench_normed_matvec, "attention": bench_attention,
           "elementwise": bench_elementwise}


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    print(f"{'shape':44} {'ours us':>9} {'base us':>9} {'speedup':>8} {'GB/s':>8} {'% copy':>7}")
    for r in rows:
        extra = f"  [{r['picked']}]" if "picked" in r else ""
        print(
            f"{r['shape']:44} {r['ours_us']:9.1f} {r['baseline_us']:9.1f} {r['speedup']:7.2f}x "
            f"{r['gb_s']:8.0f} {r['pct_of_copy_bw']:6.1f}%{extra}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of: " + ", ".join(BENCHES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure here.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py needs triton installed (pip install triton).", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth_gbs()
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": args.dtype,
        "copy_gb_s": copy_gbs,
    }
    for name in args.only.split(","):
        if name not in BENCHES:
            parser.error(f"--only: unknown benchmark {name!r}")
        results[name] = BENCHES[name](dtype, copy_gbs)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{results['device']}  torch {results['torch']}  triton {results['triton']}  {args.dtype}  copy {copy_gbs:.0f} GB/s")
        for name in args.only.split(","):
            print_table(name, results[name])  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
