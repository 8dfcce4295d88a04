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

from shardline.engine_args import add_engine_args, add_vllm_compatibility_flags, engine_config_from_args

# Sampling flags of `generate`: the base SamplingParams of every prompt. Unseeded requests sample
# from the engine's generator, seeded by the engine flag --seed (vLLM's meaning).
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p")


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
    add_vllm_compatibility_flags(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help='JSONL: {"prompt": ...} or {"messages": [...]} per line, optional sampling fields')
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--min-p", type=float, default=None)
    gen.set_defaults(handler=_cmd_generate)

    from shardline import bench

    bench.add_parser(sub)
    try:
        from shardline import serve_cli
    except ImportError:  # the cluster extra (Ray) is not installed
        pass
    else:
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
