"""The KV-aware routing decision, free of Ray: which replica group should take a prompt, given the
prompt's chained block hashes and each replica's reported load and cached-block summary.

Replicas report (through Ray Serve's `record_routing_stats`) a `ReplicaLoad`; its `summary` is a
compact set of the block hashes the replica's prefix cache holds: the `summary_size` most
recently used hashes, each truncated to its first 8 bytes (`pack_summary` / `unpack_summary`,
8 bytes per block on the wire; a false match needs a 64-bit collision, negligible).

Score of a replica (higher wins), in prompt tokens:

    score = matched_tokens - tokens_per_load * (running + waiting_weight * waiting)

`matched_tokens` is block_size times the longest leading run of prompt blocks found in the
summary (a chained hash is only reusable when every block before it is). `tokens_per_load` says
how many cached prompt tokens are worth one more request in the replica's batch: a holder of the
prefix loses to a less loaded replica once the extra load outweighs the prefill it saves.
Overloaded replicas (waiting > max_waiting, or free blocks below min_free_fraction of the pool)
are skipped unless every replica is. When no replica matches at least min_match_tokens, the
choice falls back to power of two choices: the less loaded of two random eligible replicas.

The router adds what it knows and the reports do not yet show (router/request_router.py): the
blocks of prompts it sent to a replica in the last moments count as held there.
"""

from __future__ import annotations

import random
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

SUMMARY_HASH_BYTES = 8


def truncate_hash(block_hash: bytes) -> int:
    """The 8-byte prefix of a block hash as an int: the unit summaries are made of."""
    return int.from_bytes(block_hash[:SUMMARY_HASH_BYTES], "big")


def pack_summary(block_hashes: Iterable[bytes], limit: int) -> bytes:
    """Replica side: pack up to `limit` block hashes (most recently used first) as 8 bytes each."""
    out = bytearray()
    for count, block_hash in enumerate(block_hashes):
        if count >= limit:
            break
        out += block_hash[:SUMMARY_HASH_BYTES].rjust(SUMMARY_HASH_BYTES, b"\0")
    return bytes(out)


def unpack_summary(packed: bytes) -> frozenset[int]:
    """Router side: the set of truncated hashes in a packed summary."""
    if len(packed) % SUMMARY_HASH_BYTES:
        raise ValueError(f"packed summary length {len(packed)} is not a multiple of {SUMMARY_HASH_BYTES}")
    return frozenset(
        int.from_bytes(packed[i : i + SUMMARY_HASH_BYTES], "big") for i in range(0, len(packed), SUMMARY_HASH_BYTES)
    )


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, extra_key: str | None = None) -> list[bytes]:
    """The chained hashes of the prompt's full blocks, exactly as the engine keys its cache (the
    engine's own function, imported lazily so that importing this module loads no torch)."""
    from shardline.worker.engine.block_manager import hash_prompt_blocks

    return hash_prompt_blocks(token_ids, block_size, extra_key)


def matched_blocks(prompt_hashes: Sequence[bytes], summary: Container[int]) -> int:
    """Length of the longest leading run of prompt blocks present in a replica's summary."""
    for count, block_hash in enumerate(prompt_hashes):
        if truncate_hash(block_hash) not in summary:
            return count
    return len(prompt_hashes)


@dataclass(frozen=True)
class ReplicaLoad:
    """What one replica group reports for routing: KV pool, queue and cached-block summary."""

    free_blocks: int
    num_blocks: int
    running: int
    waiting: int
    summary: Container[int] = field(default_factory=frozenset)  # membership is all the scorer asks


@dataclass(frozen=True)
class ScoringConfig:
    """Knobs of the score (see the module docstring); defaults suit prompts of a few hundred tokens."""

    block_size: int = 16
    # cached prompt tokens worth one more request in the batch. Measured (docs/routing.md): at 256 a
    # busy holder of a 128-token prefix lost to an idle replica and both ended up caching it.
    tokens_per_load: float = 16.0
    waiting_weight: float = 2.0  # a waiting request costs more than a running one (no KV yet)
    min_match_tokens: int = 1  # below this best match, use power of two choices
    max_waiting: int = 64  # more waiting requests than this: overloaded
    min_free_fraction: float = 0.02  # fewer free blocks than this share of the pool: overloaded

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.tokens_per_load < 0 or self.waiting_weight < 0:
            raise ValueError("tokens_per_load and waiting_weight must be >= 0")
        if not 0.0 <= self.min_free_fraction < 1.0:
            raise ValueError("min_free_fraction must be in [0, 1)")


@dataclass(frozen=True)
class RoutingDecision:
    """The chosen replica, the prompt tokens it already caches, and why it was chosen."""

    replica_id: str
    matched_tokens: int
    reason: str  # "prefix" or "power_of_two"


def load_of(stats: ReplicaLoad, config: ScoringConfig) -> float:
    """A replica's load in requests, waiting ones weighted up."""
    return stats.running + config.waiting_weight * stats.waiting


def is_overloaded(stats: ReplicaLoad, config: ScoringConfig) -> bool:
    """Too many waiting requests or too few free KV blocks to take more work now."""
    low_on_blocks = stats.num_blocks > 0 and stats.free_blocks < config.min_free_fraction * stats.num_blocks
    return stats.waiting > config.max_waiting or low_on_blocks


def choose_replica(
    prompt_hashes: Sequence[bytes],
    replicas: Mapping[str, ReplicaLoad],
    config: ScoringConfig,
    rng: random.Random,
) -> RoutingDecision:
    """Pick the replica for a prompt: best score among non-overloaded replicas holding a useful
    prefix, else the less loaded of two random ones. Ties go to the lower load, then the id."""
    if not replicas:
        raise ValueError("no replicas to choose from")
    eligible = sorted(rid for rid, stats in replicas.items() if not is_overloaded(stats, config))
    if not eligible:  # everyone is overloaded: still route, Serve's queue bounds do the rest
        eligible = sorted(replicas)

    matched = {rid: config.block_size * matched_blocks(prompt_hashes, replicas[rid].summary) for rid in eligible}
    if max(matched.values()) >= config.min_match_tokens:
        # max() keeps the first of equal keys and `eligible` is sorted: full ties go to the smallest id
        best = max(
            eligible,
            key=lambda rid: (
                matched[rid] - config.tokens_per_load * load_of(replicas[rid], config),
                -load_of(replicas[rid], config),
            ),
        )
        return RoutingDecision(best, matched[best], "prefix")

    candidates = rng.sample(eligible, k=min(2, len(eligible)))
    # equal loads (common: reports lag behind a burst) are broken at random, never by id, or every
    # new prefix of a burst would land on the same replica
    chosen = min(candidates, key=lambda rid: (load_of(replicas[rid], config), rng.random()))
    return RoutingDecision(chosen, matched[chosen], "power_of_two")
