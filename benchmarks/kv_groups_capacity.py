"""KV memory a request holds at its peak, with one block table for every layer (before) against
KV-cache groups (worker/engine/kv_cache_groups.py), for the Gemma 2/3 layer patterns, from the
block manager's own `max_blocks_held`. Memory is in pages (one layer's keys and values for one
block), so the ratio is how many more such requests fit the same KV memory. No timing: the
figures follow from the layer pattern, window, block size and step size alone.

Usage:  .venv/bin/python benchmarks/kv_groups_capacity.py [--block-size 16] [--step-tokens 2048]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from shardline.worker.engine.block_manager import BlockManager
from shardline.worker.engine.kv_cache_groups import kv_cache_groups

# name -> (layers, window of layer i or None for a global layer), from the published configs
MODELS: dict[str, tuple[int, Callable[[int], int | None]]] = {
    "Gemma 2 9B (42 layers, 1:1, window 4096)": (42, lambda i: 4096 if i % 2 == 0 else None),
    "Gemma 3 12B (48 layers, 5:1, window 1024)": (48, lambda i: None if (i + 1) % 6 == 0 else 1024),
    "Gemma 3 27B (62 layers, 5:1, window 1024)": (62, lambda i: None if (i + 1) % 6 == 0 else 1024),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--step-tokens", type=int, default=2048, help="most tokens one step adds (the chunk size)")
    args = parser.parse_args()
    print("| model | context | pages before | pages with groups | requests that fit, ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, (num_layers, window) in MODELS.items():
        groups = kv_cache_groups(tuple(window(i) for i in range(num_layers)), num_layers)
        blocks = BlockManager(1, args.block_size, group_windows=groups.group_windows)
        for context in (8192, 32768, 131072):
            before = num_layers * -(-context // args.block_size)
            after = groups.num_tensors * blocks.max_blocks_held(context, args.step_tokens)
            print(f"| {name} | {context} | {before} | {after} | {before / after:.2f}x |")


if __name__ == "__main__":
    main()
