"""The `shardline` command line.

  shardline generate   run prompts through the engine in this process (no Ray)
  shardline bench      benchmarks of the engine (no Ray): offline, latency, sweep, prefill, prefix, serve
  shardline serve      start a local Ray cluster with the gRPC + HTTP application
  shardline ask        stream an answer from a running cluster over gRPC
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by generate, bench and serve (the same fields as EngineConfig)."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m",
                   help="a directory (safetensors), a .gguf file, a Hugging Face id, or smollm2-135m (default)")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    g.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA and on CPUs with native bf16 math, else float32; "
                   "$SHARDLINE_CPU_DTYPE overrides the CPU choice), float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--quantization", default=None, choices=["none", "gguf", "int4", "int8", "fp8"],
                   help="weight quantization (default: the checkpoint's; GGUF files on CPU stay quantized: gguf)")
    g.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=1)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (overrides the memory budget)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, help="CPU: KV pool budget in GiB")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--no-prefix-cache", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    g.add_argument("--enforce-eager", action="store_true", help="never capture CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the device runs this one (default: on CUDA)")


def engine_config_from_args(args: argparse.Namespace):
    from shardline.worker.config import EngineConfig

    return EngineConfig(
        model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
        quantization=args.quantization,
        tensor_parallel_size=args.tensor_parallel_size, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend, async_scheduling=args.async_scheduling,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from shardline.worker.engine.engine import LLMEngine
    from shardline.worker.engine.params import RequestError, SamplingParams

    base = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    engine = LLMEngine(engine_config_from_args(args))
    try:
        if args.prompt is not None:
            prompt: Any = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else args.prompt
            try:
                [res] = engine.generate([prompt], SamplingParams(**base))
            except RequestError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(res.text)
            return 0
        prompts, params = _read_prompts_file(args.prompts_file, base, args.chat)
        results = engine.generate(prompts, params)
        for r in results:
            print(json.dumps({"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                              "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                              "cached_tokens": r.cached_tokens}))
        return 0
    finally:
        engine.shutdown()


def _read_prompts_file(path: str, base: dict, chat: bool):
    from shardline.worker.engine.params import RequestError, SamplingParams

    prompts, params = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{lineno}: not JSON ({e.msg})")
            if not isinstance(obj, dict) or ("prompt" not in obj and "messages" not in obj):
                raise SystemExit(f"error: {path}:{lineno}: each line needs a 'prompt' or 'messages' field")
            fields = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
            try:
                params.append(SamplingParams.from_dict({**base, **fields}))
            except (RequestError, TypeError) as e:
                raise SystemExit(f"error: {path}:{lineno}: {e}")
            if "messages" in obj:
                prompts.append({"messages": obj["messages"]})
            elif chat:
                prompts.append({"messages": [{"role": "user", "content": obj["prompt"]}]})
            else:
                prompts.append(obj["prompt"])
    return prompts, params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run prompts through the engine in this process")
    add_engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help='JSONL: {"prompt": ...} or {"messages": [...]} per line, optional sampling fields')
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--min-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(handler=_cmd_generate)

    from shardline import bench

    bench.add_parser(sub, add_engine_args)
    try:
        from shardline import serve_cli
    except ImportError:  # the cluster extra (Ray) is not installed
        serve_cli = None
    if serve_cli is not None:
        serve_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from shardline.worker.config import ConfigError
    from shardline.worker.engine.params import RequestError
    from shardline.worker.loader.source import ModelLoadError

    try:
        return int(args.handler(args) or 0)
    except (ConfigError, ModelLoadError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
