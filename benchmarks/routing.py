"""Compare the ReplicaGroup's request routers on one shared-prefix workload (docs/routing.md).

For each router (kv_aware: ours, prefix_affinity: Ray's PrefixCacheAffinityRouter, pow2: Ray's
default) it starts the application (2 replica groups of a tiny model with a word-level tokenizer,
small KV pools) in one local Ray session, sends the phases below over gRPC and reads usage's
cached_prompt_tokens, then `serve.shutdown()` before the next router.

Phases (the same prompts, in the same order, for every router):
  shared_prefix  G groups x P prompts; each group shares a long system prompt, the questions
                 differ; groups interleaved, sent C at a time.
  flood          unique long prompts (no shared prefix) that fill the pools and evict part of
                 the groups' cached prefixes: a router's memory of where it *sent* text is now
                 partly wrong, the replicas' block-hash reports are not.
  revisit        the same groups again with new questions.
  tenants        one system prompt shared by T tenants, each with its own cache_salt (the
                 engine keeps a separate cache per salt): the same text is T different prefixes
                 to the engine but one to a router that only remembers text.

Usage:  .venv/bin/python benchmarks/routing.py [--groups 8 --per-group 6 --concurrency 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model + tokenizer fixture the cluster tests use

ROUTERS = ("kv_aware", "prefix_affinity", "pow2")
# A run is a router name, optionally with knobs for its request_router_kwargs:
# A run may carry scoring knobs, e.g. "kv_aware:tokens_per_load=256" (the first, load-heavy default).
DEFAULT_RUNS = ("kv_aware", "prefix_affinity", "pow2")


def parse_run(spec: str) -> tuple[str, dict[str, float]]:
    """'name[:k=v,...]' -> (router, knobs)."""
    name, _, rest = spec.partition(":")
    if name not in ROUTERS:
        raise argparse.ArgumentTypeError(f"{spec}: the router must be one of {', '.join(ROUTERS)}")
    knobs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        knobs[key] = float(value)
    return name, knobs
BLOCK = 8


@dataclass
class PhaseResult:
    """One router's numbers for one phase."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    wall_s: float = 0.0
    per_replica_prompt_tokens: list[int] = field(default_factory=list)  # sorted, largest first
    errors: int = 0

    @property
    def cached_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


Prompt = tuple[str, "str | None"]  # text, cache_salt


def make_workload(groups: int, per_group: int, prefix_words: int, question_words: int, flood: int,
                  tenants: int, seed: int) -> dict[str, list[Prompt]]:
    """The prompts of every phase, as text over the tiny tokenizer's words (one token per word)."""
    from cluster_fixtures import WORDS

    rng = random.Random(seed)
    words = [w for w in WORDS if w not in ("user", "assistant", "system")]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    systems = [f"system {text(prefix_words)}" for _ in range(groups)]

    def round_of_questions() -> list[Prompt]:
        # interleaved: question i of every group before question i+1 of any
        return [(f"{systems[g]} user {text(question_words)}", None) for _ in range(per_group) for g in range(groups)]

    shared = f"system {text(prefix_words)}"
    return {
        "shared_prefix": round_of_questions(),
        "flood": [(text(prefix_words + question_words), None) for _ in range(flood)],
        "revisit": round_of_questions(),
        "tenants": [(f"{shared} user {text(question_words)}", f"tenant-{t}")
                    for _ in range(per_group) for t in range(tenants)],
    }


def replica_query_tokens(stub) -> dict[str, int]:
    """Prompt tokens each replica group has looked up in its prefix cache so far."""
    from shardline.proto import generation_pb2 as pb

    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    return {r.replica_id: r.prefix_cache_query_tokens for r in info.replicas}


def run_phase(stub, prompts: list[Prompt], concurrency: int, max_tokens: int, settle_s: float) -> PhaseResult:
    """Send the prompts C at a time (in order) and add up usage."""
    import grpc

    from shardline.proto import generation_pb2 as pb

    def one(prompt: Prompt) -> tuple[int, int]:
        text, salt = prompt
        request = pb.GenerateRequest(text=text, cache_salt=salt or "", sampling=pb.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        last = None
        for last in stub.Generate(request, timeout=120):
            pass
        return last.usage.prompt_tokens, last.usage.cached_prompt_tokens

    before = replica_query_tokens(stub)
    result = PhaseResult()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(one, p) for p in prompts]:
            try:
                prompt_tokens, cached = future.result()
            except grpc.RpcError:
                result.errors += 1
                continue
            result.requests += 1
            result.prompt_tokens += prompt_tokens
            result.cached_tokens += cached
    result.wall_s = time.perf_counter() - start
    time.sleep(settle_s)  # replicas push their stats every metrics_period_s
    after = replica_query_tokens(stub)
    # a replica of an earlier run (its snapshot not yet expired) adds nothing: left out
    result.per_replica_prompt_tokens = sorted((d for r in after if (d := after[r] - before.get(r, 0)) > 0), reverse=True)
    return result


def run_router(spec: str, model_dir: Path, workload: dict[str, list[Prompt]], args: argparse.Namespace,
               grpc_port: int, http_port: int) -> dict[str, PhaseResult]:
    """Deploy the application with the run's router, run every phase, tear the application down."""
    import grpc
    from ray import serve

    from cluster_fixtures import wait_serving
    from shardline.cluster.app import build_app
    from shardline.proto import generation_pb2_grpc as pb_grpc

    router, knobs = parse_run(spec)
    if router == "kv_aware":
        knobs.setdefault("seed", args.seed)
    app_args = dict(model=str(model_dir), router=router, replicas=2, cpus_per_rank=0.5,
                    engine=dict(num_kv_blocks=args.kv_blocks, block_size=BLOCK, max_num_seqs=8,
                                max_num_batched_tokens=512, device="cpu"),
                    routing_stats_period_s=0.2, metrics_period_s=0.2, served_model_names=["tiny"],
                    routing=knobs)
    serve.run(build_app(app_args), name="shardline", route_prefix="/", blocking=False)
    wait_serving(grpc_port)
    results: dict[str, PhaseResult] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            time.sleep(1.0)  # first routing stats reach the router
            for phase, prompts in workload.items():
                results[phase] = run_phase(stub, prompts, args.concurrency, args.max_tokens, settle_s=1.0)
    finally:
        serve.delete("shardline")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; print a table (and JSON with --json); return the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", nargs="+", default=list(DEFAULT_RUNS),
                        help="runs: a router name, optionally with knobs (kv_aware:tokens_per_load=16)")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=6)
    parser.add_argument("--prefix-words", type=int, default=128, help="system prompt length (tokens)")
    parser.add_argument("--question-words", type=int, default=16)
    parser.add_argument("--flood", type=int, default=6, help="unique prompts in the flood phase")
    parser.add_argument("--tenants", type=int, default=8, help="cache salts sharing one system prompt")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, default=128, help="KV pool per replica group (blocks of 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    for spec in args.routers:
        try:
            parse_run(spec)
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(str(e))

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster_fixtures import free_port, write_tiny_model_with_tokenizer
    from shardline.cluster.app import GRPC_SERVICER_FUNCTIONS

    workload = make_workload(args.groups, args.per_group, args.prefix_words, args.question_words,
                             args.flood, args.tenants, args.seed)
    out: dict[str, Any] = {"args": vars(args), "routers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        write_tiny_model_with_tokenizer(model_dir)
        grpc_port, http_port = free_port(), free_port()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never join a leftover cluster
        try:
            for router in args.routers:
                serve.start(grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
                            http_options=HTTPOptions(host="127.0.0.1", port=http_port))
                start = time.perf_counter()
                phases = run_router(router, model_dir, workload, args, grpc_port, http_port)
                serve.shutdown()  # a fresh controller, proxies and router state for the next router
                out["routers"][router] = {p: dict(asdict(r), cached_fraction=r.cached_fraction)
                                          for p, r in phases.items()}
                out["routers"][router]["total_s"] = time.perf_counter() - start
                print(f"# {router}: done in {out['routers'][router]['total_s']:.1f} s", file=sys.stderr, flush=True)
        finally:
            ray.shutdown()
    print_table(out)
    if args.json:
        print(json.dumps(out, indent=2))
    return out


def print_table(out: dict[str, Any]) -> None:
    """One row per router and phase: cached fraction, per-replica prompt-token split, wall time."""
    print(f"{'router':<30} {'phase':<14} {'reqs':>5} {'prompt tok':>10} {'cached tok':>10} {'cached %':>8} "
          f"{'split (prompt tok per replica)':>30} {'wall s':>7} {'err':>4}")
    for router, phases in out["routers"].items():
        for phase, r in phases.items():
            if not isinstance(r, dict):
                continue
            split = "/".join(str(x) for x in r["per_replica_prompt_tokens"])
            print(f"{router:<30} {phase:<14} {r['requests']:>5} {r['prompt_tokens']:>10} {r['cached_tokens']:>10} "
                  f"{100 * r['cached_fraction']:>7.1f}% {split:>30} {r['wall_s']:>7.2f} {r['errors']:>4}")


if __name__ == "__main__":
    main()
