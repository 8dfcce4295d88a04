"""`shardline bench`: benchmarks of one engine in this process (no Ray, no gRPC), in the shapes the
field uses (vLLM's `bench throughput` / `bench serve`, SGLang's bench_serving). Every mode prints a
table, and one JSON object with --json. Weights do not change speed: use --load-format dummy with a
config directory to benchmark real shapes without the files.

Modes: offline (fixed or uniform lengths, optional shared prefix, --compare-hf), latency (batch 1),
sweep (decode throughput by batch size), prefill (TTFT and TFLOP/s), prefix (cache on vs off at
shared-prefix fractions), serve (Poisson arrivals: TTFT, TPOT, ITL)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
from typing import Any, Callable

import torch


# ---------------------------------------------------------------------------------------------------
# workloads


def random_prompts(n: int, input_len: int, vocab: int, seed: int, prefix_len: int = 0,
                   input_len_range: tuple[int, int] | None = None) -> list[list[int]]:
    """n prompts of random token ids (ids 10.. to avoid special tokens); the first prefix_len tokens
    are shared by all prompts."""
    rng = random.Random(seed)
    lo = 10 if vocab > 20 else 0
    prefix = [rng.randrange(lo, vocab) for _ in range(prefix_len)]
    out = []
    for _ in range(n):
        length = rng.randint(*input_len_range) if input_len_range else input_len
        out.append(prefix + [rng.randrange(lo, vocab) for _ in range(max(1, length - prefix_len))])
    return out


def _params(output_len: int):
    from shardline.worker.engine.params import SamplingParams

    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_engine(args: argparse.Namespace, **overrides: Any):
    from shardline.cli import engine_config_from_args
    from shardline.worker.engine.engine import LLMEngine

    config = engine_config_from_args(args).replace(**overrides)
    return LLMEngine(config, show_progress=not args.json)


def _warmup(engine) -> None:
    engine.generate([[11] * 16, [12] * 8], _params(4))
    _sync(engine.device)


# ---------------------------------------------------------------------------------------------------
# modes


def run_offline_once(engine, prompts: list[list[int]], output_lens: list[int]) -> dict[str, float]:
    from shardline.worker.engine.params import SamplingParams

    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in output_lens]
    hits0, queries0 = engine.block_manager.prefix_cache_hits, engine.block_manager.prefix_cache_queries
    _sync(engine.device)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    _sync(engine.device)
    dt = time.perf_counter() - t0
    out_tokens = sum(r.completion_tokens for r in results)
    in_tokens = sum(len(p) for p in prompts)
    hits = engine.block_manager.prefix_cache_hits - hits0
    queries = engine.block_manager.prefix_cache_queries - queries0
    return {
        "elapsed_s": dt,
        "requests_per_s": len(prompts) / dt,
        "output_tokens_per_s": out_tokens / dt,
        "total_tokens_per_s": (out_tokens + in_tokens) / dt,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "cached_prompt_tokens": float(sum(r.cached_tokens for r in results)),
    }


def release_device_memory(device: torch.device) -> None:
    """Collect dropped engines (reference cycles included) and return their cached CUDA blocks, so
    that what runs next (transformers, the roofline) finds the memory the KV pool held."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_generate_throughput(device: torch.device, dtype: torch.dtype, prompts: list[list[int]], output_len: int,
                           model_spec: str, load_format: str, max_batch: int | None = None) -> dict[str, float]:
    """transformers' generate on the same workload, in the largest padded batch that fits. Run it
    after the engine is shut down: the engine's KV pool takes most of the GPU."""
    from transformers import AutoModelForCausalLM

    from shardline.worker.loader.source import resolve_model

    source = resolve_model(model_spec, weights_required=load_format != "dummy")
    if load_format == "dummy":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(source.path))
        with device:  # random init on the device itself, not 8B parameters on the host then a copy
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    elif source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    model = model.to(device).eval()
    batch = min(max_batch or len(prompts), len(prompts))
    while True:
        try:
            _sync(device)
            t0 = time.perf_counter()
            out_tokens = 0
            for i in range(0, len(prompts), batch):
                chunk = prompts[i : i + batch]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)  # left padding
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                with torch.inference_mode():
                    gen = model.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)
                out_tokens += (gen.shape[1] - width) * len(chunk)
            _sync(device)
            dt = time.perf_counter() - t0
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del model
    return {"hf_batch_size": batch, "hf_elapsed_s": dt, "hf_output_tokens_per_s": out_tokens / dt}


def mode_offline(args: argparse.Namespace) -> list[dict[str, Any]]:
    engine = _make_engine(args)
    device, dtype = engine.device, engine.dtype
    vocab = engine.model_config.vocab_size
    rows = []
    hf_pending: list[tuple[dict[str, Any], list[list[int]], int]] = []
    grid = _parse_grid(args.grid) if args.grid else [(args.input_len, args.output_len)]
    _warmup(engine)
    for input_len, output_len in grid:
        if args.random_range:
            lo, hi = args.random_range
            rng = random.Random(args.seed)
            prompts = random_prompts(args.num_prompts, 0, vocab, args.seed, input_len_range=(lo, hi))
            outs = [rng.randint(lo, hi) for _ in prompts]
            label = f"uniform {lo}-{hi}"
        else:
            prompts = random_prompts(args.num_prompts, input_len, vocab, args.seed, args.prefix_len)
            outs = [output_len] * len(prompts)
            label = f"{input_len}/{output_len}" + (f" prefix {args.prefix_len}" if args.prefix_len else "")
        row: dict[str, Any] = {"workload": label, "num_prompts": len(prompts)}
        row.update(run_offline_once(engine, prompts, outs))
        if args.compare_hf:
            hf_pending.append((row, prompts, output_len))
        rows.append(row)
    engine.shutdown()
    del engine
    release_device_memory(device)
    for row, prompts, output_len in hf_pending:
        row.update(hf_generate_throughput(device, dtype, prompts, output_len, args.model, args.load_format, args.hf_max_batch))
        row["speedup_vs_hf"] = row["output_tokens_per_s"] / row["hf_output_tokens_per_s"]
    return rows


def _stream_one(engine, prompt: list[int], output_len: int) -> tuple[float, list[float], float]:
    """Run one request alone; returns (TTFT, times of each later token, elapsed seconds)."""
    rid = engine.add_request(prompt, _params(output_len))
    t0 = time.perf_counter()
    ttft, stamps = None, []
    done = False
    while not done:
        for out in engine.step():
            if out.request_id != rid:
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
            else:
                stamps.append(now)
            done = out.finished
    return ttft or 0.0, stamps, time.perf_counter() - t0


def mode_latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    # --compare-quantization: one engine per scheme in the same process, iterations interleaved so
    # that load from elsewhere falls on every scheme alike; ratios against the first engine.
    engines = [_make_engine(args)] + [_make_engine(args, quantization=q) for q in args.compare_quantization or []]
    for engine in engines:
        _warmup(engine)
    prompt = random_prompts(1, args.input_len, engines[0].model_config.vocab_size, args.seed)[0]
    rows = []
    for i in range(args.iters):
        for engine in engines:
            ttft, stamps, elapsed = _stream_one(engine, prompt, args.output_len)
            # Decode rate between the second and the last token (the first is the prefill's).
            per_tok = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else elapsed / max(1, args.output_len)
            row = {"iter": i, "input_len": args.input_len, "output_len": args.output_len, "ttft_ms": ttft * 1e3,
                   "ms_per_output_token": per_tok * 1e3, "output_tokens_per_s": 1.0 / per_tok,
                   "requests_per_s": 1.0 / elapsed, "total_tokens_per_s": (len(prompt) + args.output_len) / elapsed}
            if len(engines) > 1:
                row["quantization"] = engine.quantization.name
                row["weight_mb"] = (engine.weight_bytes or 0) / 1e6
            rows.append(row)
    for engine in engines:
        engine.shutdown()
    if len(engines) > 1:  # decode speed of each scheme over the first's, iteration by iteration
        for i in range(0, len(rows), len(engines)):
            for r in rows[i : i + len(engines)]:
                r["speed_vs_first"] = rows[i]["ms_per_output_token"] / r["ms_per_output_token"]
    return rows


def mode_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    engine = _make_engine(args, max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=max(args.max_num_batched_tokens, max(args.batch_sizes)))
    _warmup(engine)
    vocab = engine.model_config.vocab_size
    rows = []
    for b in args.batch_sizes:
        prompts = random_prompts(b, args.input_len, vocab, args.seed + b)
        _sync(engine.device)
        t_start = time.perf_counter()
        ids = [engine.add_request(p, _params(args.decode_steps + 1)) for p in prompts]
        # prefill until every request has its first token
        seen: set[str] = set()
        while len(seen) < len(ids):
            for out in engine.step():
                seen.add(out.request_id)
        _sync(engine.device)
        t0 = time.perf_counter()
        tokens = 0
        while engine.has_unfinished_requests():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        _sync(engine.device)
        t_end = time.perf_counter()
        dt = t_end - t0
        total = t_end - t_start  # prefill included
        rows.append({"batch": b, "context": args.input_len, "ms_per_step": dt / args.decode_steps * 1e3,
                     "output_tokens_per_s": tokens / dt, "requests_per_s": b / total,
                     "total_tokens_per_s": (b * (args.input_len + 1) + tokens) / total})
    engine.shutdown()
    return rows


def mode_prefill(args: argparse.Namespace) -> list[dict[str, Any]]:
    longest = max(args.prompt_lens)
    engine = _make_engine(args, max_num_batched_tokens=max(args.max_num_batched_tokens, longest),
                          max_model_len=args.max_model_len or None, enable_prefix_caching=False)
    _warmup(engine)
    cfg = engine.model_config
    rows = []
    for n in args.prompt_lens:
        prompt = random_prompts(1, n, cfg.vocab_size, args.seed + n)[0]
        times = []
        for _ in range(args.iters):
            ttft, _, _ = _stream_one(engine, prompt, 1)
            times.append(ttft)
        ttft = statistics.median(times)
        flops = 2 * cfg.num_params * n + 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * n * n / 2
        rows.append({"prompt_len": n, "ttft_ms": ttft * 1e3, "prefill_tokens_per_s": n / ttft, "tflops": flops / ttft / 1e12,
                     "requests_per_s": 1.0 / ttft, "output_tokens_per_s": 1.0 / ttft, "total_tokens_per_s": (n + 1) / ttft})
    engine.shutdown()
    return rows


def mode_prefix(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for cache_on in (True, False):
        engine = _make_engine(args, enable_prefix_caching=cache_on)
        _warmup(engine)
        vocab = engine.model_config.vocab_size
        for frac in args.shared_fractions:
            prefix_len = int(args.input_len * frac)
            prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed + int(frac * 100), prefix_len)
            r = run_offline_once(engine, prompts, [args.output_len] * len(prompts))
            rows.append({"shared_prefix": f"{int(frac * 100)}%", "prefix_cache": "on" if cache_on else "off", **r})
        device = engine.device
        engine.shutdown()
        del engine  # the next engine sizes its KV pool from free memory: this one's weights must be gone
        release_device_memory(device)
    off = {row["shared_prefix"]: row["total_tokens_per_s"] for row in rows if row["prefix_cache"] == "off"}
    for row in rows:
        row["speedup_vs_cache_off"] = row["total_tokens_per_s"] / off[row["shared_prefix"]]
    return rows


def mode_serve(args: argparse.Namespace) -> list[dict[str, Any]]:
    from shardline.worker.engine.async_engine import AsyncEngine

    rows = []
    engine = _make_engine(args)
    _warmup(engine)
    aeng = AsyncEngine(engine)
    vocab = engine.model_config.vocab_size
    for rate in args.request_rates:
        prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
        rows.append(asyncio.run(_serve_run(aeng, prompts, args.output_len, rate, args.seed)))
    aeng.shutdown()
    return rows


async def _serve_run(aeng, prompts, output_len: int, rate: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ttfts, tpots, itls = [], [], []
    out_tokens = 0

    async def one(prompt):
        nonlocal out_tokens
        t0 = time.perf_counter()
        last = None
        first = None
        n = 0
        async for out in aeng.generate(prompt, _params(output_len)):
            now = time.perf_counter()
            if out.new_token_ids:
                if first is None:
                    first = now
                    ttfts.append(now - t0)
                elif last is not None:
                    itls.append(now - last)
                last = now
                n += len(out.new_token_ids)
        out_tokens += n
        if n > 1 and first is not None and last is not None:
            tpots.append((last - first) / (n - 1))

    in_tokens = sum(len(p) for p in prompts)
    t_start = time.perf_counter()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(one(p)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    dt = time.perf_counter() - t_start

    def stats(xs, name):
        xs = sorted(xs) or [float("nan")]
        return {f"mean_{name}_ms": statistics.fmean(xs) * 1e3, f"median_{name}_ms": statistics.median(xs) * 1e3,
                f"p99_{name}_ms": xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e3}

    return {"request_rate": rate if rate != float("inf") else "inf", "num_prompts": len(prompts), "requests_per_s": len(prompts) / dt,
            "output_tokens_per_s": out_tokens / dt, "total_tokens_per_s": (in_tokens + out_tokens) / dt, **stats(ttfts, "ttft"), **stats(tpots, "tpot"), **stats(itls, "itl")}


# ---------------------------------------------------------------------------------------------------
# roofline


def measure_roofline(device: torch.device) -> dict[str, float]:
    """The device's copy bandwidth (bytes read + written per second) and bf16 (CUDA) / fp32 (CPU)
    matmul rate, measured now, to express results as a share of their floor."""
    if device.type == "cuda":
        n = 1 << 30
        a = torch.empty(n, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        b.copy_(a)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            b.copy_(a)
        torch.cuda.synchronize()
        bw = 2 * n * 10 / (time.perf_counter() - t0)
        m = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
        m @ m
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            m @ m
        torch.cuda.synchronize()
        flops = 2 * 8192**3 * 10 / (time.perf_counter() - t0)
    else:
        n = 1 << 28
        a = torch.ones(n, dtype=torch.uint8)
        b = torch.empty_like(a)
        b.copy_(a)
        t0 = time.perf_counter()
        for _ in range(3):
            b.copy_(a)
        bw = 2 * n * 3 / (time.perf_counter() - t0)
        m = torch.randn(1024, 1024)
        t0 = time.perf_counter()
        for _ in range(5):
            m @ m
        flops = 2 * 1024**3 * 5 / (time.perf_counter() - t0)
    return {"copy_bandwidth_gb_s": bw / 1e9, "matmul_tflops": flops / 1e12}


def decode_floor_tokens_per_s(cfg, batch: int, context: int, bandwidth: float, dtype_bytes: int) -> float:
    """Memory-bound ceiling: each decode step streams the weights and every sequence's KV once."""
    weights = cfg.num_params * dtype_bytes
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    return batch * bandwidth / (weights + batch * context * kv_per_token)


# ---------------------------------------------------------------------------------------------------
# CLI


def _parse_grid(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        i, o = part.split("/")
        out.append((int(i), int(o)))
    return out


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    widths = {k: max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.rjust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(fmt(r.get(k, "")).rjust(widths[k]) for k in keys))


MODES: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "offline": mode_offline, "latency": mode_latency, "sweep": mode_sweep,
    "prefill": mode_prefill, "prefix": mode_prefix, "serve": mode_serve,
}


def _cmd_bench(args: argparse.Namespace) -> int:
    rows = MODES[args.mode](args)
    result: dict[str, Any] = {"mode": args.mode, "model": args.model, "load_format": args.load_format, "rows": rows}
    if args.roofline:
        from shardline.worker.config import ModelConfig
        from shardline.worker.loader.source import resolve_model

        device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
        release_device_memory(device)
        roof = measure_roofline(device)
        result["roofline"] = roof
        cfg = ModelConfig.from_hf_config(resolve_model(args.model, weights_required=args.load_format != "dummy").hf_config())
        dtype_bytes = 2 if device.type == "cuda" else 4
        for r in rows:
            batch = r.get("batch", 1 if args.mode == "latency" else None)
            if batch and "output_tokens_per_s" in r:
                ctx = r.get("context", args.input_len)
                floor = decode_floor_tokens_per_s(cfg, batch, ctx, roof["copy_bandwidth_gb_s"] * 1e9, dtype_bytes)
                r["floor_tokens_per_s"] = floor
                r["pct_of_floor"] = 100 * r["output_tokens_per_s"] / floor
            if "tflops" in r:
                r["pct_of_matmul_peak"] = 100 * r["tflops"] / roof["matmul_tflops"]
    if args.json:
        flat = dict(rows[0]) if len(rows) == 1 else {}
        print(json.dumps({**flat, **result}))
    else:
        print(f"shardline bench {args.mode}  model={args.model}  load_format={args.load_format}  torch={torch.__version__}")
        if "roofline" in result:
            print("roofline: " + ", ".join(f"{k}={v:,.1f}" for k, v in result["roofline"].items()))
        _print_table(rows)
    return 0


def add_parser(sub: argparse._SubParsersAction, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("bench", help="benchmark the engine in this process (no Ray)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    add_engine_args(p)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=0, help="offline: tokens shared by every prompt")
    p.add_argument("--grid", default=None, help='offline: comma list of in/out, e.g. "128/128,128/2048,2048/128,2048/2048"')
    p.add_argument("--random-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="offline: input and output lengths uniform in [LO, HI]")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128, 256], help="sweep")
    p.add_argument("--decode-steps", type=int, default=32, help="sweep: decode steps timed per batch size")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 2048, 8192], help="prefill")
    p.add_argument("--shared-fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75], help="prefix")
    p.add_argument("--request-rates", type=float, nargs="+", default=[float("inf")], help="serve: Poisson rates (req/s)")
    p.add_argument("--iters", type=int, default=3, help="latency / prefill repetitions")
    p.add_argument("--compare-quantization", nargs="+", default=None, metavar="NAME",
                   help="latency: also run these --quantization schemes (none, gguf, int4, int8, fp8) in the same run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-hf", action="store_true", help="offline: transformers' generate on the same workload")
    p.add_argument("--hf-max-batch", type=int, default=None, help="largest padded batch to try for --compare-hf")
    p.add_argument("--roofline", action="store_true", help="measure the device's bandwidth and matmul rate; add %% of floor")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_bench)

