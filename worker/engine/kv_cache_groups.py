"""KV-cache groups: how a model's layers share the paged pool when their attention differs.

A model whose layers all attend alike (all global, or all with one window) has one group: one block
table per request serves every layer, and each layer has its own cache tensor, as always.

A hybrid model (Gemma 2 / 3: global layers beside sliding-window ones) splits its layers into
groups of equal size `group_size`, each of one attention kind (global, or one window), and gives a
request one block table per group. Group g's i-th layer stores its KV in cache tensor i, so the
pool is `group_size` tensors of `num_blocks` blocks, and one block id is one page in each of them:
every group allocates from the same pool of ids. A windowed group's table releases the blocks that
fell out of its window (as an all-windowed model does), and those ids go straight to whichever
group needs blocks next, usually a global one. Group size is the layer count of the rarest kind,
so Gemma 2 (alternating) gets 2 groups of half the layers, Gemma 3 (5 local : 1 global) 1 global
group and 5 local ones; a kind whose layer count is not a multiple of it leaves some tensor slots
unused in its last group (Gemma 3 27B: 52 local layers in 6 groups of 10, 8 slots idle, 13 %).

Why one shared pool rather than a pool per kind: a pool per kind must be sized at start-up, and
any static split is wrong for some workload (few long requests want mostly global blocks, many
short ones mostly windowed ones); with shared ids the freed windowed blocks are reused by any
group at once, and the pool's size needs no new knob.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheGroups:
    """The layer -> (group, cache tensor) map of a model and each group's window.

    group_windows[g]: group g's sliding window in tokens (None: global attention).
    layer_group[l], layer_tensor[l]: layer l's group and the cache tensor it stores into
    (layer_tensor[l] < num_tensors; two layers share a tensor only if their groups differ)."""

    group_windows: tuple[int | None, ...]
    layer_group: tuple[int, ...]
    layer_tensor: tuple[int, ...]
    num_tensors: int

    @property
    def num_groups(self) -> int:
        return len(self.group_windows)

    @property
    def is_hybrid(self) -> bool:
        """More than one group: each request holds one block table per group."""
        return len(self.group_windows) > 1


def kv_cache_groups(layer_windows: Sequence[int | None], num_layers: int) -> KVCacheGroups:
    """Group `num_layers` layers by window (`layer_windows`: one per layer, or empty for all
    global). Global groups come first, then windows in increasing order, each kind's groups in
    layer order."""
    windows = list(layer_windows) if layer_windows else [None] * num_layers
    if len(windows) != num_layers:
        raise ValueError(f"layer_sliding_windows: {len(windows)} entries for {num_layers} layers")
    kinds = sorted(set(windows), key=lambda w: (w is not None, w or 0))
    if len(kinds) <= 1:
        return KVCacheGroups(tuple(kinds) or (None,), (0,) * num_layers, tuple(range(num_layers)), num_layers)
    members = {kind: [layer for layer, w in enumerate(windows) if w == kind] for kind in kinds}
    group_size = min(len(layers) for layers in members.values())
    group_windows: list[int | None] = []
    layer_group = [0] * num_layers
    layer_tensor = [0] * num_layers
    for kind in kinds:
        layers = members[kind]
        for start in range(0, len(layers), group_size):
            for slot, layer in enumerate(layers[start : start + group_size]):
                layer_group[layer] = len(group_windows)
                layer_tensor[layer] = slot
            group_windows.append(kind)
    return KVCacheGroups(tuple(group_windows), tuple(layer_group), tuple(layer_tensor), group_size)
