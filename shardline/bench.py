"""`shardline bench`: benchmarks of one engine in this process (no Ray, no gRPC), in the shapes the
field uses (vLLM's `bench throughput` / `bench serve`, SGLang's bench_serving). Every mode prints a
table, and one JSON object with --json. Weights do not change speed: use --load-format dummy with a
config directory to benchmark real shapes without the files.

Modes: offline (fixed or uniform lengths, optional shared prefix, --compare-hf), latency (batch 1),
sweep (decode throughput by batch size), prefill (TTFT and TFLOP/s), prefix (cache on vs off at
shared-prefix fractions), serve (Poisson arrivals: TTFT, TPOT, ITL), verify (speculative
decoding's verification step: k + 1 query tokens per sequence against 1); and check, the GPU
check of issue 11 in one process and one budget (shardline/check/plan.py,
benchmarks/gpu_check.sh). latency with --speculative-config runs with and without speculation
and prints the speedup.

Same-run ratios are spelled one way in every row: `speed_vs_<baseline>` is wall-clock speed over
the baseline's (higher is faster), `cpu_speed_vs_<baseline>` the baseline's process CPU time per
output token over this row's (the figure that survives a shared machine)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from shardline.engine_args import add_engine_args, add_vllm_compatibility_flags, engine_config_from_args


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
    from shardline.worker.engine.engine import LLMEngine

    config = engine_config_from_args(args).replace(**overrides)
    engine = LLMEngine(config, show_progress=not args.json)
    # the printed config names what each engine of the run held (scheme, KV dtype, bytes)
    footprints = vars(args).setdefault("footprints", [])
    if engine.footprint not in footprints:
        footprints.append(engine.footprint)
    return engine


def warm_up(engine) -> None:
    """One small generate (two prompts, four tokens): compiles what the first step of a run would."""
    engine.generate([[11] * 16, [12] * 8], _params(4))
    _sync(engine.device)


# ---------------------------------------------------------------------------------------------------
# modes


def run_to_completion(engine, prompts: list[list[int]], params: list, check: Callable[[], None] | None = None) -> list:
    """Submit every prompt at once and step the engine until all finish; returns each request's
    final RequestOutput (usage counts), in input order. `check` runs between engine steps: when it
    raises (a time cap passed), the unfinished requests are aborted and the engine drained, so it
    is idle and reusable, and the exception propagates."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    final: dict[str, Any] = {}
    try:
        while len(final) < len(ids):
            if check is not None:
                check()
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
    except BaseException:
        abort_and_drain(engine, [i for i in ids if i not in final])
        raise
    return [final[i] for i in ids]


def abort_and_drain(engine, request_ids: list[str]) -> None:
    """Abort these requests and finish the step still in flight: the engine is left idle."""
    for rid in request_ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()


def run_offline_once(engine, prompts: list[list[int]], output_lens: list[int],
                     check: Callable[[], None] | None = None) -> dict[str, float]:
    """All prompts at once, greedy, ignore_eos: throughput and prefix-cache figures of the run."""
    from shardline.worker.engine.params import SamplingParams

    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in output_lens]
    hits0, queries0 = engine.block_manager.prefix_cache_hits, engine.block_manager.prefix_cache_queries
    _sync(engine.device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    results = run_to_completion(engine, prompts, params, check)
    _sync(engine.device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
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
        # This process's CPU seconds (every thread) per output token: on a shared CPU host a steadier
        # figure than the wall clock.
        "cpu_ms_per_output_token": 1e3 * cpu / max(out_tokens, 1),
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
            t0, cpu0 = time.perf_counter(), time.process_time()
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
            dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del model
    return {"hf_batch_size": batch, "hf_elapsed_s": dt, "hf_output_tokens_per_s": out_tokens / dt,
            "hf_cpu_ms_per_output_token": 1e3 * cpu / max(out_tokens, 1)}


def mode_offline(args: argparse.Namespace) -> list[dict[str, Any]]:
    if getattr(args, "compare_quantization", None):
        return _offline_by_quantization(args)
    grid = _parse_grid(args.grid) if args.grid else [(args.input_len, args.output_len)]
    longest = 2 * args.random_range[1] if args.random_range else max(i + o for i, o in grid)
    llama = _llama_cpp(args, longest + 64)
    engine = _make_engine(args)
    device, dtype = engine.device, engine.dtype
    vocab = engine.model_config.vocab_size
    rows = []
    hf_pending: list[tuple[dict[str, Any], list[list[int]], int]] = []
    warm_up(engine)
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
        if llama is not None:
            row.update(llama_cpp_offline(llama, prompts, outs, row["output_tokens_per_s"]))
        if args.compare_hf:
            hf_pending.append((row, prompts, output_len))
        rows.append(row)
    engine.shutdown()
    if llama is not None:
        llama.close()
    del engine
    release_device_memory(device)
    for row, prompts, output_len in hf_pending:
        row.update(hf_generate_throughput(device, dtype, prompts, output_len, args.model, args.load_format, args.hf_max_batch))
        row["speed_vs_hf"] = row["output_tokens_per_s"] / row["hf_output_tokens_per_s"]
        row["cpu_speed_vs_hf"] = row["hf_cpu_ms_per_output_token"] / row["cpu_ms_per_output_token"]
    return rows


def llama_cpp_offline(llama, prompts: list[list[int]], output_lens: list[int],
                      engine_output_tokens_per_s: float) -> dict[str, float]:
    """--compare-llama-cpp in offline mode: llama.cpp has no batch of independent sequences in its
    Python API, so it runs the prompts one after another (what a llama.cpp server with one slot
    does); output tok/s over the whole run, and the engine's over it."""
    t0 = time.perf_counter()
    out_tokens = sum(len(llama.run(p, o).token_ids) for p, o in zip(prompts, output_lens))
    dt = time.perf_counter() - t0
    return {"llama_cpp_output_tokens_per_s": out_tokens / dt,
            "speed_vs_llama_cpp": engine_output_tokens_per_s / (out_tokens / dt)}


def _offline_by_quantization(args: argparse.Namespace) -> list[dict[str, Any]]:
    """--compare-quantization in offline mode: the same prompts through one engine per scheme (the
    first with the flags as given), one engine at a time; each row carries its output tok/s and its
    process CPU time per output token over the first engine's (speed_vs_first, cpu_speed_vs_first)."""
    rows: list[dict[str, Any]] = []
    for scheme in [None, *args.compare_quantization]:
        engine = _make_engine(args) if scheme is None else _make_engine(args, quantization=scheme)
        warm_up(engine)
        prompts = random_prompts(args.num_prompts, args.input_len, engine.model_config.vocab_size, args.seed,
                                 args.prefix_len)
        row: dict[str, Any] = {"workload": f"{args.input_len}/{args.output_len}", "num_prompts": len(prompts),
                               "quantization": engine.quantization.name,
                               "weight_mb": (engine.weight_bytes or 0) / 1e6}
        row.update(run_offline_once(engine, prompts, [args.output_len] * len(prompts)))
        device = engine.device
        engine.shutdown()
        del engine  # the next engine sizes its KV pool from free memory
        release_device_memory(device)
        first = rows[0] if rows else row
        row["speed_vs_first"] = row["output_tokens_per_s"] / first["output_tokens_per_s"]
        row["cpu_speed_vs_first"] = first["cpu_ms_per_output_token"] / row["cpu_ms_per_output_token"]
        rows.append(row)
    return rows


@dataclass
class StreamTiming:
    """One request run alone: time to its first delta, and the decode phase after it."""

    ttft_s: float
    elapsed_s: float
    decode_tokens: int  # tokens after the first delta (a speculative step delivers several per delta)
    # Process CPU seconds (time.process_time: every thread of this process) to the first delta and
    # in all: on a shared machine CPU time per token is what other processes' load inflates least.
    cpu_ttft_s: float = 0.0
    cpu_elapsed_s: float = 0.0

    def seconds_per_decode_token(self, output_len: int) -> float:
        """Seconds per output token after the first delta (the prefill's); the whole run's average
        when no later token came."""
        if self.decode_tokens:
            return (self.elapsed_s - self.ttft_s) / self.decode_tokens
        return self.elapsed_s / max(1, output_len)

    def cpu_seconds_per_decode_token(self, output_len: int) -> float:
        """Process CPU seconds per output token after the first delta (as seconds_per_decode_token)."""
        if self.decode_tokens:
            return (self.cpu_elapsed_s - self.cpu_ttft_s) / self.decode_tokens
        return self.cpu_elapsed_s / max(1, output_len)


def stream_one(engine, prompt: list[int], output_len: int,
               check: Callable[[], None] | None = None) -> StreamTiming:
    """Run one request alone and time it. `check` runs between engine steps, as in
    run_to_completion (it may raise to stop the run: the request is then aborted and drained)."""
    rid = engine.add_request(prompt, _params(output_len))
    t0, c0 = time.perf_counter(), time.process_time()
    ttft, cpu_ttft, first_tokens, total = None, 0.0, 0, 0
    done = False
    try:
        while not done:
            if check is not None:
                check()
            for out in engine.step():
                if out.request_id != rid:
                    continue
                total += len(out.new_token_ids)
                if ttft is None:
                    ttft, first_tokens = time.perf_counter() - t0, len(out.new_token_ids)
                    cpu_ttft = time.process_time() - c0
                done = out.finished
    except BaseException:
        abort_and_drain(engine, [] if done else [rid])
        raise
    return StreamTiming(ttft or 0.0, time.perf_counter() - t0, total - first_tokens, cpu_ttft,
                        time.process_time() - c0)


# An input-grounded workload for speculative decoding (written for this benchmark): the answer
# copies the passage, as summaries, edits and quoting answers partly do.
GROUNDED_PASSAGE = (
    "The harbour town wakes before the sun. Fishing boats leave the quay in a slow line, their lamps "
    "swinging above the dark water, while the bakery on the corner lights its ovens and the smell of "
    "bread drifts down to the nets drying on the stones. By seven the market is open: crates of "
    "mackerel, baskets of mussels, a stall of lemons and another of knives. The ferry to the island "
    "runs every two hours, and the ticket office closes for lunch between noon and one. Visitors are "
    "asked to keep to the marked paths on the cliffs, where the gulls nest in spring and the wind can "
    "turn without warning. In the evening the boats come back, the harbour master counts them in, and "
    "the lamps along the sea wall are lit one by one."
)
FREE_FORM_REQUEST = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def latency_prompt(engine, workload: str, input_len: int, seed: int) -> list[int]:
    """The prompt of `bench latency`: random ids (`random`), a chat turn asking to copy
    GROUNDED_PASSAGE verbatim (`grounded`), or an open-ended chat turn (`free`)."""
    if workload == "random":
        return random_prompts(1, input_len, engine.model_config.vocab_size, seed)[0]
    text = (f"Repeat the following passage exactly, word for word.\n\n{GROUNDED_PASSAGE}"
            if workload == "grounded" else FREE_FORM_REQUEST)
    return engine.encode_prompt({"messages": [{"role": "user", "content": text}]})


def _latency_row(t: StreamTiming, prompt_len: int, args: argparse.Namespace, label: str, i: int) -> dict[str, Any]:
    """One `bench latency` row from one timed request."""
    per_tok = t.seconds_per_decode_token(args.output_len)
    return {"engine": label, "iter": i, "input_len": prompt_len, "output_len": args.output_len,
            "ttft_ms": t.ttft_s * 1e3, "ms_per_output_token": per_tok * 1e3,
            "cpu_ms_per_output_token": t.cpu_seconds_per_decode_token(args.output_len) * 1e3,
            "output_tokens_per_s": 1.0 / per_tok, "requests_per_s": 1.0 / t.elapsed_s,
            "total_tokens_per_s": (prompt_len + args.output_len) / t.elapsed_s}


def _latency_rows(engine, prompt: list[int], args: argparse.Namespace, label: str,
                  llama: Any = None) -> list[dict[str, Any]]:
    """args.iters timed runs of `prompt`; with a LlamaCppRunner, each iteration also runs llama.cpp
    on the same ids right after the engine (so load from elsewhere falls on both alike)."""
    rows = []
    for i in range(args.iters):
        rows.append(_latency_row(stream_one(engine, prompt, args.output_len), len(prompt), args, label, i))
        if llama is not None:
            rows.append(_llama_cpp_latency_row(llama, prompt, args, i, rows[-1]))
    return rows


def _llama_cpp(args: argparse.Namespace, n_ctx: int):
    """The LlamaCppRunner of --compare-llama-cpp (None without the flag), made before any engine so a
    missing package or a non-GGUF model fails at once (LlamaCppUnavailable, printed by the CLI)."""
    if not getattr(args, "compare_llama_cpp", False):
        return None
    from shardline.llama_cpp_baseline import llama_cpp_runner

    return llama_cpp_runner(args.model, n_ctx, torch.get_num_threads())


def _llama_cpp_latency_row(llama, prompt: list[int], args: argparse.Namespace, i: int,
                           engine_row: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's row for one iteration; the engine's row of that iteration gets its ratios
    (llama.cpp's decode time over the engine's: > 1 means shardline is faster)."""
    c0 = time.process_time()
    t = llama.run(prompt, args.output_len)
    cpu = time.process_time() - c0
    per_tok = t.seconds_per_decode_token()
    decode = max(1, len(t.token_ids) - 1)
    row = {"engine": f"llama.cpp {llama.version} ({llama.n_threads} threads)", "iter": i, "input_len": len(prompt),
           "output_len": args.output_len, "ttft_ms": t.ttft_s * 1e3, "ms_per_output_token": per_tok * 1e3,
           # CPU time of the whole run spread over the decode tokens minus the prompt's share, as the engine's
           "cpu_ms_per_output_token": cpu * (1 - t.ttft_s / t.elapsed_s) / decode * 1e3 if t.elapsed_s else 0.0,
           "output_tokens_per_s": 1.0 / per_tok, "requests_per_s": 1.0 / t.elapsed_s,
           "total_tokens_per_s": (len(prompt) + args.output_len) / t.elapsed_s}
    engine_row["speed_vs_llama_cpp"] = row["ms_per_output_token"] / engine_row["ms_per_output_token"]
    if engine_row.get("cpu_ms_per_output_token"):
        engine_row["cpu_speed_vs_llama_cpp"] = row["cpu_ms_per_output_token"] / engine_row["cpu_ms_per_output_token"]
    return row



def mode_latency(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Batch 1. With --speculative-config the same prompt also runs without speculation first (same
    process, same flags otherwise), and the speculative rows carry speed_vs_baseline
    (ratio of median decode tok/s), the acceptance rate and the mean accepted length. With
    --compare-quantization, one engine per scheme instead (_latency_by_quantization)."""
    if getattr(args, "compare_quantization", None):
        return _latency_by_quantization(args)
    speculative = bool(getattr(args, "speculative_config", None))
    off = dict(speculative_method=None, num_speculative_tokens=None, speculative_model=None,
               speculative_draft_layers=None)
    llama = _llama_cpp(args, args.input_len + args.output_len + 64)
    engine = _make_engine(args, **off) if speculative else _make_engine(args)
    warm_up(engine)
    prompt = latency_prompt(engine, args.workload, args.input_len, args.seed)
    rows = _latency_rows(engine, prompt, args, "baseline" if speculative else "engine", llama)
    engine.shutdown()
    if llama is not None:
        llama.close()
    if not speculative:
        return rows
    release_device_memory(engine.device)
    engine = _make_engine(args)
    warm_up(engine)
    before = engine.spec_stats.totals()
    spec_rows = _latency_rows(engine, prompt, args, engine.config.speculative_method or "speculative")
    after = engine.spec_stats.totals()
    engine.shutdown()
    base = statistics.median(r["output_tokens_per_s"] for r in rows)
    drafts = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
    proposed = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    for r in spec_rows:
        r["speed_vs_baseline"] = r["output_tokens_per_s"] / base
        r["num_drafts"] = drafts  # verifications of a non-empty proposal, over all iterations
        r["acceptance_rate"] = accepted / proposed if proposed else 0.0
        r["mean_accepted_length"] = 1.0 + accepted / drafts if drafts else 1.0
    return rows + spec_rows


def _latency_by_quantization(args: argparse.Namespace) -> list[dict[str, Any]]:
    """--compare-quantization: one engine per scheme in the same process (the first with the
    flags as given), iterations interleaved so that load from elsewhere falls on every scheme
    alike; each row carries its decode speed over the first engine's in the same iteration."""
    llama = _llama_cpp(args, args.input_len + args.output_len + 64)
    engines = [_make_engine(args)] + [_make_engine(args, quantization=q) for q in args.compare_quantization]
    for engine in engines:
        warm_up(engine)
    prompt = latency_prompt(engines[0], args.workload, args.input_len, args.seed)
    rows = []
    for i in range(args.iters):
        first = None
        engine_rows = []
        for engine in engines:
            row = _latency_row(stream_one(engine, prompt, args.output_len), len(prompt), args, "engine", i)
            row["quantization"] = engine.quantization.name
            row["weight_mb"] = (engine.weight_bytes or 0) / 1e6
            first = first or row
            row["speed_vs_first"] = first["ms_per_output_token"] / row["ms_per_output_token"]
            rows.append(row)
            engine_rows.append(row)
        if llama is not None:
            llama_row = _llama_cpp_latency_row(llama, prompt, args, i, engine_rows[0])
            for row in engine_rows[1:]:
                row["speed_vs_llama_cpp"] = llama_row["ms_per_output_token"] / row["ms_per_output_token"]
                row["cpu_speed_vs_llama_cpp"] = llama_row["cpu_ms_per_output_token"] / row["cpu_ms_per_output_token"]
            rows.append(llama_row)
    for engine in engines:
        engine.shutdown()
    if llama is not None:
        llama.close()
    return rows


def mode_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    engine = _make_engine(args, max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=max(args.max_num_batched_tokens, max(args.batch_sizes)))
    warm_up(engine)
    vocab = engine.model_config.vocab_size
    rows = []
    for b in args.batch_sizes:
        prompts = random_prompts(b, args.input_len, vocab, args.seed + b)
        r = timed_decode(engine, prompts, args.decode_steps)
        rows.append({"batch": b, "context": args.input_len, "ms_per_step": r["ms_per_step"],
                     "output_tokens_per_s": r["output_tokens_per_s"], "requests_per_s": b / r["elapsed_s"],
                     "total_tokens_per_s": (b * (args.input_len + 1) + r["decode_tokens"]) / r["elapsed_s"]})
    engine.shutdown()
    return rows


def timed_decode(engine, prompts: list[list[int]], decode_steps: int,
                 check: Callable[[], None] | None = None) -> dict[str, float]:
    """Submit the prompts at once, step until every request has its first token, then time the
    `decode_steps` steps that follow at batch len(prompts): ms_per_step, output_tokens_per_s (decode
    only), decode_tokens, elapsed_s (prefill included). `check` as in run_to_completion."""
    _sync(engine.device)
    t_start = time.perf_counter()
    ids = [engine.add_request(p, _params(decode_steps + 1)) for p in prompts]
    tokens, seen = 0, set[str]()
    try:
        while len(seen) < len(ids):  # prefill until every request has its first token
            if check is not None:
                check()
            for out in engine.step():
                seen.add(out.request_id)
        _sync(engine.device)
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            if check is not None:
                check()
            tokens += sum(len(o.new_token_ids) for o in engine.step())
    except BaseException:
        abort_and_drain(engine, ids)
        raise
    _sync(engine.device)
    t_end = time.perf_counter()
    dt = t_end - t0
    return {"ms_per_step": dt / decode_steps * 1e3, "output_tokens_per_s": tokens / dt, "decode_tokens": float(tokens),
            "elapsed_s": t_end - t_start}


def mode_verify(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cost of speculative verification: one step of q = k + 1 query tokens per sequence over a
    context of --input-len, for each --batch-sizes and --query-lens, against q = 1 (a plain decode
    step). It bounds what any proposer can gain: k accepted tokens are worth at most
    (1 + k) / step_cost_vs_1. Runs the executor directly on built inputs (the KV values do not
    change the time)."""
    from shardline.worker.engine.model_runner import SeqSlice, build_step_inputs

    most = max(args.batch_sizes) * max(args.query_lens)
    engine = _make_engine(args, max_num_seqs=max(args.batch_sizes),
                          max_num_batched_tokens=max(args.max_num_batched_tokens, most))
    warm_up(engine)
    bs, num_blocks = engine.config.block_size, engine.executor.num_blocks
    rows = []
    for b in args.batch_sizes:
        base_ms = None
        for q in sorted(args.query_lens):
            per_seq = -(-(args.input_len + q) // bs)
            slices = [SeqSlice([11] * q, args.input_len, [(i * per_seq + j) % num_blocks for j in range(per_seq)],
                               True, q - 1) for i in range(b)]
            inputs = build_step_inputs(slices, bs, engine.device)
            for _ in range(2):
                engine.executor.execute(inputs)
            _sync(engine.device)
            t0 = time.perf_counter()
            for _ in range(args.decode_steps):
                engine.executor.execute(inputs)
            _sync(engine.device)
            ms = (time.perf_counter() - t0) / args.decode_steps * 1e3
            base_ms = base_ms if base_ms is not None else ms
            rows.append({"batch": b, "query_len": q, "context": args.input_len, "ms_per_step": ms,
                         "step_cost_vs_1": ms / base_ms, "output_tokens_per_s": b * q / ms * 1e3,
                         "requests_per_s": b / ms * 1e3, "total_tokens_per_s": b * q / ms * 1e3})
    engine.shutdown()
    return rows


def mode_prefill(args: argparse.Namespace) -> list[dict[str, Any]]:
    longest = max(args.prompt_lens)
    engine = _make_engine(args, max_num_batched_tokens=max(args.max_num_batched_tokens, longest),
                          max_model_len=args.max_model_len or None, enable_prefix_caching=False)
    warm_up(engine)
    cfg = engine.model_config
    rows = []
    for n in args.prompt_lens:
        prompt = random_prompts(1, n, cfg.vocab_size, args.seed + n)[0]
        times = []
        for _ in range(args.iters):
            times.append(stream_one(engine, prompt, 1).ttft_s)
        ttft = statistics.median(times)
        flops = prefill_flops(cfg, n)
        rows.append({"prompt_len": n, "ttft_ms": ttft * 1e3, "prefill_tokens_per_s": n / ttft, "tflops": flops / ttft / 1e12,
                     "requests_per_s": 1.0 / ttft, "output_tokens_per_s": 1.0 / ttft, "total_tokens_per_s": (n + 1) / ttft})
    engine.shutdown()
    return rows


def mode_prefix(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for cache_on in (True, False):
        engine = _make_engine(args, enable_prefix_caching=cache_on)
        warm_up(engine)
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
        row["speed_vs_cache_off"] = row["total_tokens_per_s"] / off[row["shared_prefix"]]
    return rows


def mode_serve(args: argparse.Namespace) -> list[dict[str, Any]]:
    from shardline.worker.engine.async_engine import AsyncEngine
    from shardline.worker.engine.stream_coalescer import StreamPolicy

    rows = []
    engine = _make_engine(args)
    warm_up(engine)
    aeng = AsyncEngine(engine, stream_policy=StreamPolicy(interval_s=0.0))  # in-process: no hop to spare
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


def prefill_flops(cfg, n: int) -> float:
    """FLOPs of one n-token prefill: the projections (2 per parameter per token) plus QK^T and PV
    over the causal half of the n x n scores."""
    return 2 * cfg.num_active_params * n + 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * n * n / 2


def decode_floor_tokens_per_s(cfg, batch: int, context: int, bandwidth: float, dtype_bytes: int) -> float:
    """Memory-bound ceiling: each decode step streams the weights and every sequence's KV once (a
    mixture of experts: the weights of the experts a token runs, the batch-1 floor)."""
    return decode_floor_from_bytes(cfg.num_active_params * dtype_bytes, kv_bytes_per_token(cfg, dtype_bytes), batch, context, bandwidth)


def decode_step_weight_bytes(cfg, batch: int, dtype_bytes: int) -> float:
    """Bytes of weights one decode step at `batch` must read: every dense weight once and, per
    sparse layer of a mixture of experts, the experts the batch's tokens chose, expected
    E * (1 - (1 - k/E) ** batch) distinct ones when each token picks k of E independently and
    uniformly (what near-equal router logits of dummy weights give; a trained router's skew reads
    fewer). Batch 1 is num_active_params; a dense model reads num_params at any batch."""
    moe = cfg.moe
    if moe is None:
        return float(cfg.num_params * dtype_bytes)
    e, k = moe.num_experts, moe.num_experts_per_tok
    expected_experts = e * (1.0 - (1.0 - k / e) ** batch)
    inactive = 0.0
    for layer in range(cfg.num_hidden_layers):
        if moe.is_sparse_layer(layer):
            one_expert = 3 * cfg.hidden_size * moe.intermediate_size
            inactive += (e - expected_experts) * one_expert
    return (cfg.num_params - inactive) * dtype_bytes


def kv_bytes_per_token(cfg, dtype_bytes: int) -> int:
    """Keys and values of one token across all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def decode_floor_from_bytes(weight_bytes: float, kv_bytes_per_token: float, batch: int, context: float,
                            bandwidth: float) -> float:
    """Decode tokens/s when a step at this batch and context streams weights + KV at `bandwidth` (B/s)."""
    return batch * bandwidth / (weight_bytes + batch * context * kv_bytes_per_token)


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
    "prefill": mode_prefill, "prefix": mode_prefix, "serve": mode_serve, "verify": mode_verify,
}


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.mode == "check":
        from shardline.check.plan import run_check

        return run_check(args)
    if getattr(args, "compare_llama_cpp", False) and args.mode not in ("latency", "offline"):
        raise SystemExit(f"--compare-llama-cpp applies to bench latency and offline, not {args.mode}")
    from shardline.llama_cpp_baseline import LlamaCppUnavailable

    try:
        rows = MODES[args.mode](args)
    except LlamaCppUnavailable as exc:
        raise SystemExit(f"shardline bench {args.mode}: {exc}") from exc
    result: dict[str, Any] = {"mode": args.mode, "model": args.model, "load_format": args.load_format, "rows": rows}
    if args.roofline:
        from shardline.worker.config import ModelConfig
        from shardline.worker.loader.source import resolve_model

        device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
        release_device_memory(device)
        roof = measure_roofline(device)
        result["roofline"] = roof
        cfg = ModelConfig.from_hf_config(resolve_model(args.model, weights_required=args.load_format not in ("dummy", "stand-in")).hf_config())
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
    footprints = vars(args).get("footprints", [])
    result["engines"] = [asdict(f) for f in footprints]
    if args.json:
        flat = dict(rows[0]) if len(rows) == 1 else {}
        print(json.dumps({**flat, **result}))
    else:
        print(f"shardline bench {args.mode}  model={args.model}  load_format={args.load_format}  torch={torch.__version__}")
        for footprint in footprints:
            print(f"engine: {footprint.describe()}")
        if "roofline" in result:
            print("roofline: " + ", ".join(f"{k}={v:,.1f}" for k, v in result["roofline"].items()))
        _print_table(rows)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the engine in this process (no Ray)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted([*MODES, "check"]),
                   help="a benchmark, or 'check': the GPU check of docs/performance.md (shardline/check/)")
    add_engine_args(p)  # --seed among them: the engine's, and the workload's random prompts
    add_vllm_compatibility_flags(p)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=0, help="offline: tokens shared by every prompt")
    p.add_argument("--grid", default=None, help='offline: comma list of in/out, e.g. "128/128,128/2048,2048/128,2048/2048"')
    p.add_argument("--random-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="offline: input and output lengths uniform in [LO, HI]")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128, 256], help="sweep")
    p.add_argument("--decode-steps", type=int, default=32, help="sweep / verify: steps timed per batch size")
    p.add_argument("--query-lens", type=int, nargs="+", default=[1, 2, 3, 5, 9],
                   help="verify: query tokens per sequence (k + 1); the smallest is the baseline")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 2048, 8192], help="prefill")
    p.add_argument("--shared-fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75], help="prefix")
    p.add_argument("--request-rates", type=float, nargs="+", default=[float("inf")], help="serve: Poisson rates (req/s)")
    p.add_argument("--iters", "--num-iters", dest="iters", type=int, default=3, help="latency / prefill repetitions (--num-iters: vLLM's spelling)")
    p.add_argument("--workload", choices=["random", "grounded", "free"], default="random",
                   help="latency: random ids of --input-len, or a chat prompt that copies a passage (grounded) "
                        "or asks for a story (free); with --speculative-config both run with and without it")
    p.add_argument("--compare-quantization", nargs="+", default=None, metavar="NAME",
                   help="latency / offline: also run these --quantization schemes (none, gguf, int4, int8, fp8) in the same run")
    p.add_argument("--compare-llama-cpp", action="store_true",
                   help="latency / offline: llama.cpp (llama-cpp-python, when installed) on the same GGUF file and "
                        "token ids in the same run, with the ratio")
    p.add_argument("--compare-hf", action="store_true", help="offline: transformers' generate on the same workload")
    p.add_argument("--hf-max-batch", type=int, default=None, help="largest padded batch to try for --compare-hf")
    p.add_argument("--roofline", action="store_true", help="measure the device's bandwidth and matmul rate; add %% of floor")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    from shardline.check.plan import add_arguments

    add_arguments(p)
    p.set_defaults(handler=_cmd_bench)

