"""The serving path against the engine alone: delivered tokens per second, TTFT, TPOT, ITL and CPU
per delivered token for each process kind, at several concurrencies (docs/performance.md).

For each concurrency C it runs C streams at once (each `--requests-per-stream` requests back to
back, random prompts of `--input-len` token ids, `--output-len` tokens, greedy, ignore_eos):

  engine   an AsyncEngine in this process, consumed by asyncio (no Ray, no coalescing: nothing to
           spare) - the baseline
  grpc     through a local cluster (`shardline serve`'s application: Serve gRPC proxy -> Ingress ->
           ReplicaGroup) with a grpc.aio client in this process
  http     the same cluster through the OpenAI /v1/completions SSE route with an httpx client
  grpc-direct, http-direct  (--direct-ingress) the same, straight to the Ingress replica's own ports
           (Serve's direct ingress, cluster/direct_ingress.py), no proxy hop; measured in the same run

CPU per delivered token is each process kind's CPU time (user + system, psutil) over the run
divided by the tokens the clients received (the "CPU bound" column is the machine's cores over
their sum: the delivered tok/s an otherwise idle machine allows at that cost): `client` is this process (for `engine`, the engine
itself), `proxy` Serve's proxy actor, `ingress` and `replica` the two deployments' replica
actors, `ray` every other Ray process (raylet, GCS, controller, ...).

Usage (see docs/performance.md for the figures):
  .venv/bin/python benchmarks/serving.py --model benchmarks/configs/tiny-llama --load-format dummy
  .venv/bin/python benchmarks/serving.py --model benchmarks/configs/tiny-llama --load-format stand-in
  options: --concurrency 1 16 64 --fronts engine grpc http --repeats 3 --stream-interval-ms 50
           --engine '{"max_num_seqs": 256}' --serve-env RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 --json F
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable

import psutil

FRONTS = ("engine", "grpc", "http")
KINDS = ("client", "proxy", "ingress", "replica", "ray")


@dataclass
class StreamTimes:
    """One request as its client saw it: when it was sent, when each item with tokens arrived
    (perf_counter seconds) and how many tokens each carried."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


@dataclass
class RunResult:
    """One (front, concurrency) run's figures."""

    front: str
    concurrency: int
    tokens: int
    elapsed_s: float
    tok_per_s: float
    ttft_ms: float  # median over requests
    tpot_ms: float  # median over requests of (last - first arrival) / (tokens - 1)
    itl_ms: float  # median gap between consecutive items (vLLM's ITL counts items the same way)
    tokens_per_item: float
    cpu_ms_per_token: dict[str, float]


def summarize(front: str, concurrency: int, streams: list[StreamTimes], elapsed: float,
              cpu_s: dict[str, float]) -> RunResult:
    tokens = sum(sum(s.tokens) for s in streams)
    ttft = [s.arrivals[0] - s.sent for s in streams if s.arrivals]
    tpot = [(s.arrivals[-1] - s.arrivals[0]) / (sum(s.tokens) - 1) for s in streams if sum(s.tokens) > 1]
    gaps = [b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:])]
    items = sum(len(s.arrivals) for s in streams)
    return RunResult(front, concurrency, tokens, elapsed, tokens / elapsed, 1e3 * statistics.median(ttft),
                     1e3 * statistics.median(tpot) if tpot else 0.0, 1e3 * statistics.median(gaps) if gaps else 0.0,
                     tokens / max(1, items), {k: 1e3 * v / max(1, tokens) for k, v in cpu_s.items()})


# ---------------------------------------------------------------------------------------------------
# CPU accounting per process kind


def classify(proc: psutil.Process) -> str | None:
    """Which kind a process is, from Ray's process titles (this process is the client; any other
    descendant is Ray's); None for one that is gone."""
    if proc.pid == os.getpid():
        return "client"
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if "ProxyActor" in cmd:
        return "proxy"
    if "ServeReplica" in cmd and "Ingress" in cmd:
        return "ingress"
    if "ServeReplica" in cmd and "ReplicaGroup" in cmd:
        return "replica"
    return "ray"


def cpu_by_kind() -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) of this process and its descendants (the Ray cluster this
    process started; other Ray clusters on a shared machine are not counted)."""
    out = {}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        kind = classify(proc)
        if kind is None:
            continue
        try:
            t = proc.cpu_times()
            out[proc.pid] = (kind, t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    totals = {k: 0.0 for k in KINDS}
    for pid, (kind, t) in after.items():
        totals[kind] += t - before.get(pid, (kind, 0.0))[1]
    return totals


# ---------------------------------------------------------------------------------------------------
# clients


async def run_streams(concurrency: int, requests_per_stream: int, prompts: list[list[int]],
                      one: Callable[[list[int], StreamTimes], Awaitable[None]]) -> tuple[list[StreamTimes], float]:
    """C streams at once, each sending its requests back to back; returns every request's times
    and the wall time of the whole run."""
    streams: list[StreamTimes] = []

    async def client(c: int) -> None:
        for r in range(requests_per_stream):
            s = StreamTimes(time.perf_counter())
            streams.append(s)
            await one(prompts[(c * requests_per_stream + r) % len(prompts)], s)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return streams, time.perf_counter() - t0


def engine_client(aeng, output_len: int):
    from shardline.worker.engine.params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def one(prompt: list[int], s: StreamTimes) -> None:
        async for out in aeng.generate(prompt, params):
            if out.new_token_ids:
                s.arrivals.append(time.perf_counter())
                s.tokens.append(len(out.new_token_ids))
    return one


def grpc_client(stub, output_len: int):
    from shardline.proto import generation_pb2 as pb

    sampling = pb.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def one(prompt: list[int], s: StreamTimes) -> None:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
        async for msg in stub.Generate(request, timeout=600):
            if msg.token_ids:
                s.arrivals.append(time.perf_counter())
                s.tokens.append(len(msg.token_ids))
    return one


def http_client(client, url: str, output_len: int):
    body_base = {"max_tokens": output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
                 "stream_options": {"include_usage": True}}

    async def one(prompt: list[int], s: StreamTimes) -> None:
        total = None
        async with client.stream("POST", url, json={**body_base, "prompt": prompt}, timeout=600) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    total = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices"):
                    s.arrivals.append(time.perf_counter())
                    s.tokens.append(1)  # SSE chunks carry text, not token ids: fixed up from usage below
        if total is not None and s.tokens:
            s.tokens = [1] * len(s.tokens)
            s.tokens[-1] += total - len(s.tokens)  # the run's token count is exact; per-item split is not needed
    return one


# ---------------------------------------------------------------------------------------------------
# runs


def random_prompts(n: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(input_len)] for _ in range(n)]


def measure(front: str, concurrency: int, requests_per_stream: int, prompts, one) -> RunResult:
    before = cpu_by_kind()
    streams, elapsed = asyncio.run(run_streams(concurrency, requests_per_stream, prompts, one))
    cpu = cpu_delta(before, cpu_by_kind())
    return summarize(front, concurrency, streams, elapsed, cpu)


def median_result(runs: list[RunResult]) -> RunResult:
    """Each figure's median over repeats."""
    def med(get):
        return statistics.median(get(r) for r in runs)
    first = runs[0]
    return RunResult(first.front, first.concurrency, int(med(lambda r: r.tokens)), med(lambda r: r.elapsed_s),
                     med(lambda r: r.tok_per_s), med(lambda r: r.ttft_ms), med(lambda r: r.tpot_ms),
                     med(lambda r: r.itl_ms), med(lambda r: r.tokens_per_item),
                     {k: med(lambda r, k=k: r.cpu_ms_per_token[k]) for k in KINDS})


def engine_config(args: argparse.Namespace):
    from shardline.worker.config import EngineConfig

    return EngineConfig(model=args.model, load_format=args.load_format, device="cpu" if args.device == "cpu" else args.device,
                        stream_interval_ms=args.stream_interval_ms, **json.loads(args.engine))


def run_engine(args: argparse.Namespace, prompts) -> list[RunResult]:
    from shardline.worker.engine.async_engine import AsyncEngine
    from shardline.worker.engine.engine import LLMEngine
    from shardline.worker.engine.stream_coalescer import StreamPolicy

    aeng = AsyncEngine(LLMEngine(engine_config(args), show_progress=False), stream_policy=StreamPolicy(interval_s=0.0))
    results = []
    try:
        measure("engine", 4, 1, prompts, engine_client(aeng, 8))  # warm-up
        for c in args.concurrency:
            runs = [measure("engine", c, args.requests_per_stream, prompts, engine_client(aeng, args.output_len))
                    for _ in range(args.repeats)]
            results.append(median_result(runs))
    finally:
        aeng.shutdown()
    return results


def run_cluster(args: argparse.Namespace, prompts) -> list[RunResult]:
    import grpc
    import httpx
    import ray
    from ray import serve
    from shardline.cluster.app import build_app
    from shardline.cluster.config import ClusterConfig
    from shardline.proto import generation_pb2_grpc as pb_grpc
    from shardline.serve_cli import _wait_ready

    import threading

    cfg = engine_config(args)
    engine = {k: getattr(cfg, k) for k in ("load_format", "device", "stream_interval_ms")} | json.loads(args.engine)
    config = ClusterConfig(model=args.model, engine=engine, grpc_port=args.grpc_port, http_port=args.http_port,
                           **({"direct_ingress": True} if args.direct_ingress else {}) | json.loads(args.cluster))
    # Ray starts its workers (proxy, replicas) at nice 15; the engine-alone baseline runs in this
    # process at nice 0. On a machine shared with other work that alone would starve the cluster
    # and make the ratio meaningless, so the workers run at 0 unless --serve-env says otherwise.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a loaded machine starts Ray slowly
    from shardline.cluster.config import REPLICA_ENV
    from shardline.cluster.direct_ingress import direct_ingress_ports
    from shardline.cluster.proxies import proxy_environment, serve_start_options

    for key, value in proxy_environment(config).items():  # the proxies' environment, as `shardline serve` sets it
        os.environ.setdefault(key, value)

    for kv in args.serve_env:
        key, _, value = kv.partition("=")
        os.environ[key] = value  # before ray.init: every Ray process inherits it
        if key in REPLICA_ENV:
            REPLICA_ENV[key] = value  # the replicas' own runtime_env would override it
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never join a leftover cluster
    results = []
    try:
        serve.start(**serve_start_options(config))  # as `shardline serve`: the proxy fixes, host and ports
        serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
        _wait_ready(config, threading.Event())
        # (row label, protocol, port): through the proxy, and with direct ingress also straight to
        # the Ingress's own ports, in the same run (the proxy keeps serving beside them)
        routes = [(front, front, config.grpc_port if front == "grpc" else config.http_port)
                  for front in args.fronts if front != "engine"]
        if config.direct_ingress:
            grpc_port, http_port = direct_ingress_ports(config.app_name)
            routes += [(f"{front}-direct", front, grpc_port if front == "grpc" else http_port)
                       for front in args.fronts if front != "engine"]
        for label, front, port in routes:
            for c in args.concurrency:
                runs = []
                for i in range(args.repeats + 1):  # the first is a warm-up for this front and width
                    if front == "grpc":
                        async def make_grpc_run(c=c):
                            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                                one = grpc_client(pb_grpc.GenerationStub(channel), args.output_len if i else 8)
                                return await run_streams(c, args.requests_per_stream if i else 1, prompts, one)
                        runner = make_grpc_run
                    else:
                        async def make_http_run(c=c):
                            limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
                            async with httpx.AsyncClient(limits=limits) as client:
                                one = http_client(client, f"http://127.0.0.1:{port}/v1/completions",
                                                  args.output_len if i else 8)
                                return await run_streams(c, args.requests_per_stream if i else 1, prompts, one)
                        runner = make_http_run
                    before = cpu_by_kind()
                    streams, elapsed = asyncio.run(runner())
                    cpu = cpu_delta(before, cpu_by_kind())
                    if i:
                        runs.append(summarize(label, c, streams, elapsed, cpu))
                results.append(median_result(runs))
                print(f"  {label} c={c}: {results[-1].tok_per_s:,.0f} tok/s", file=sys.stderr, flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
    return results


def cpu_bound_tok_per_s(r: RunResult, cores: int) -> float:
    """The delivered tok/s this run's CPU cost allows on an otherwise idle machine: all its
    cores divided by the CPU seconds every process kind spent per delivered token. On a shared
    machine the measured figure sits below it; the bound does not depend on the other load
    as long as CPU per token does not."""
    total_ms = sum(r.cpu_ms_per_token.values())
    return cores * 1e3 / total_ms if total_ms > 0 else float("inf")


def print_table(results: list[RunResult], title: str) -> None:
    base = {r.concurrency: r.tok_per_s for r in results if r.front == "engine"}
    cores = os.cpu_count() or 1
    ttft_base = {r.concurrency: r.ttft_ms for r in results if r.front == "engine"}
    print(title)
    print("| front | conc | delivered tok/s | CPU bound tok/s | ratio vs engine | TTFT p50 ms | TTFT over engine ms | "
          "TPOT p50 ms | ITL p50 ms | tok/item | " + " | ".join(f"CPU ms/tok {k}" for k in KINDS) + " | CPU ms/tok all |")
    print("| --- " * (11 + len(KINDS)) + "|")
    for r in results:
        ratio = f"{r.tok_per_s / base[r.concurrency]:.2f}" if r.concurrency in base else "-"
        over = f"{r.ttft_ms - ttft_base[r.concurrency]:+.1f}" if r.concurrency in ttft_base and r.front != "engine" else "-"
        cpu = " | ".join(f"{r.cpu_ms_per_token[k]:.3f}" for k in KINDS)
        print(f"| {r.front} | {r.concurrency} | {r.tok_per_s:,.0f} | {cpu_bound_tok_per_s(r, cores):,.0f} | {ratio} | "
              f"{r.ttft_ms:.1f} | {over} | {r.tpot_ms:.2f} | {r.itl_ms:.2f} | {r.tokens_per_item:.1f} | {cpu} | "
              f"{sum(r.cpu_ms_per_token.values()):.3f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="benchmarks/configs/tiny-llama")
    p.add_argument("--load-format", default="dummy", choices=["auto", "safetensors", "gguf", "dummy", "stand-in"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", default="{}", help="more EngineConfig fields, as JSON")
    p.add_argument("--cluster", default="{}", help="more ClusterConfig fields, as JSON (e.g. ingress_replicas)")
    p.add_argument("--stream-interval-ms", type=float, default=50.0, help="the cluster's stream_interval_ms (0: off)")
    p.add_argument("--serve-env", nargs="*", default=[], help="KEY=VALUE environment for every Ray process")
    p.add_argument("--fronts", nargs="+", default=list(FRONTS), choices=FRONTS)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; each figure is the median")
    p.add_argument("--grpc-port", type=int, default=9310)
    p.add_argument("--http-port", type=int, default=8310)
    p.add_argument("--direct-ingress", action="store_true",
                   help="ClusterConfig.direct_ingress (cluster/direct_ingress.py): each front is measured through "
                        "the proxy and again straight to the Ingress replica's own port (rows grpc-direct, "
                        "http-direct), in the same run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)

    from shardline.worker.config import ModelConfig
    from shardline.worker.loader.source import resolve_model

    vocab = ModelConfig.from_hf_config(resolve_model(args.model, weights_required=False).hf_config()).vocab_size
    prompts = random_prompts(max(args.concurrency) * args.requests_per_stream, args.input_len, vocab, args.seed)
    load = os.getloadavg()
    results: list[RunResult] = []
    if "engine" in args.fronts:
        results += run_engine(args, prompts)
    if set(args.fronts) - {"engine"}:
        results += run_cluster(args, prompts)
    title = (f"model={args.model} load_format={args.load_format} in/out={args.input_len}/{args.output_len} "
             f"stream_interval_ms={args.stream_interval_ms} repeats={args.repeats} (medians) "
             f"{'direct_ingress ' if args.direct_ingress else ''}"
             f"load avg before={load[0]:.2f} after={os.getloadavg()[0]:.2f} cores={os.cpu_count()}")
    print_table(results, title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "args": vars(args), "rows": [asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
