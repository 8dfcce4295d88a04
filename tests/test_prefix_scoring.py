"""The KV-aware routing score: prefix holders win, load outweighs a small cached prefix, no match
falls back to power of two choices, overloaded replicas are avoided, all deterministic."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from shardline.router.prefix_scoring import (
    ReplicaLoad,
    ScoringConfig,
    choose_replica,
    matched_blocks,
    pack_summary,
    prompt_block_hashes,
    unpack_summary,
)

BLOCK = 4
CONFIG = ScoringConfig(block_size=BLOCK, tokens_per_load=8.0, waiting_weight=2.0, max_waiting=10)


def hashes_of(tokens: Sequence[int], salt: str | None = None) -> list[bytes]:
    return prompt_block_hashes(tokens, BLOCK, salt)


def summary_of(hashes: list[bytes]) -> frozenset[int]:
    return unpack_summary(pack_summary(hashes, limit=1024))


def idle(summary: frozenset[int] = frozenset()) -> ReplicaLoad:
    return ReplicaLoad(free_blocks=100, num_blocks=100, running=0, waiting=0, summary=summary)


PROMPT = list(range(40))  # 10 full blocks


def test_prompt_block_hashes_cover_full_blocks_only_and_chain() -> None:
    hashes = hashes_of(list(range(11)))
    assert len(hashes) == 2  # 11 tokens: two full blocks, the tail is not cacheable
    assert hashes_of(list(range(8)))[1] == hashes[1]
    assert hashes_of([9, 1, 2, 3, 4, 5, 6, 7])[1] != hashes[1]  # the parent changes the child
    assert hashes_of(list(range(8)), salt="tenant-a") != hashes_of(list(range(8)))


def test_summary_round_trips_and_is_bounded() -> None:
    hashes = hashes_of(PROMPT)
    packed = pack_summary(hashes, limit=3)
    assert len(packed) == 3 * 8
    assert unpack_summary(packed) == summary_of(hashes[:3])
    with pytest.raises(ValueError):
        unpack_summary(b"\x00" * 7)


def test_match_is_the_leading_run_only() -> None:
    hashes = hashes_of(PROMPT)
    assert matched_blocks(hashes, summary_of(hashes[:6])) == 6
    # holding later blocks without the first one is useless for a chained cache
    assert matched_blocks(hashes, summary_of(hashes[1:])) == 0
    assert matched_blocks(hashes, summary_of(hashes[:2] + hashes[3:])) == 2


def test_replica_holding_the_prefix_wins() -> None:
    hashes = hashes_of(PROMPT)
    replicas = {"a": idle(), "b": idle(summary_of(hashes[:8])), "c": idle(summary_of(hashes[:2]))}
    decision = choose_replica(hashes, replicas, CONFIG, random.Random(0))
    assert decision.replica_id == "b" and decision.matched_tokens == 8 * BLOCK
    assert decision.reason == "prefix"


def test_heavily_loaded_holder_loses_to_an_idle_replica_past_the_threshold() -> None:
    hashes = hashes_of(PROMPT)  # holder saves 40 tokens; each unit of load costs 8
    def holder(running: int) -> ReplicaLoad:
        return ReplicaLoad(free_blocks=50, num_blocks=100, running=running, waiting=0, summary=summary_of(hashes))
    light = choose_replica(hashes, {"holder": holder(4), "idle": idle()}, CONFIG, random.Random(0))
    assert light.replica_id == "holder"  # 40 - 32 > 0
    heavy = choose_replica(hashes, {"holder": holder(6), "idle": idle()}, CONFIG, random.Random(0))
    assert heavy.replica_id == "idle"  # 40 - 48 < 0
    assert heavy.matched_tokens == 0


def test_waiting_requests_weigh_more_than_running_ones() -> None:
    hashes = hashes_of(PROMPT)
    running = ReplicaLoad(free_blocks=50, num_blocks=100, running=4, waiting=0, summary=summary_of(hashes))
    waiting = ReplicaLoad(free_blocks=50, num_blocks=100, running=0, waiting=4, summary=summary_of(hashes))
    assert choose_replica(hashes, {"r": running, "w": waiting}, CONFIG, random.Random(0)).replica_id == "r"


def test_no_match_picks_the_less_loaded_of_two_random_replicas() -> None:
    hashes = hashes_of(PROMPT)
    replicas = {
        f"r{i}": ReplicaLoad(free_blocks=100, num_blocks=100, running=i, waiting=0) for i in range(6)
    }
    for seed in range(20):
        sampled = random.Random(seed).sample(sorted(replicas), k=2)
        decision = choose_replica(hashes, replicas, CONFIG, random.Random(seed))
        assert decision.reason == "power_of_two"
        assert decision.replica_id == min(sampled, key=lambda rid: replicas[rid].running)
    # over many seeds the fallback spreads load instead of always taking the global minimum
    chosen = {choose_replica(hashes, replicas, CONFIG, random.Random(s)).replica_id for s in range(50)}
    assert len(chosen) > 1 and "r5" not in chosen


def test_same_seed_same_choice() -> None:
    hashes = hashes_of(PROMPT)
    replicas = {f"r{i}": idle() for i in range(8)}
    first = [choose_replica(hashes, replicas, CONFIG, random.Random(7)).replica_id for _ in range(5)]
    assert len(set(first)) == 1


def test_short_prompt_without_full_blocks_falls_back() -> None:
    replicas = {"a": idle(), "b": idle()}
    decision = choose_replica(hashes_of([1, 2]), replicas, CONFIG, random.Random(0))
    assert decision.reason == "power_of_two" and decision.matched_tokens == 0


def test_overloaded_holder_is_avoided_unless_all_are_overloaded() -> None:
    hashes = hashes_of(PROMPT)
    full = ReplicaLoad(free_blocks=1, num_blocks=100, running=1, waiting=0, summary=summary_of(hashes))
    queued = ReplicaLoad(free_blocks=90, num_blocks=100, running=1, waiting=11, summary=summary_of(hashes))
    busy_idle = ReplicaLoad(free_blocks=90, num_blocks=100, running=3, waiting=0)
    decision = choose_replica(hashes, {"full": full, "queued": queued, "other": busy_idle}, CONFIG, random.Random(0))
    assert decision.replica_id == "other"
    everyone_over = choose_replica(hashes, {"full": full, "queued": queued}, CONFIG, random.Random(0))
    assert everyone_over.replica_id == "full"  # all overloaded: the prefix and lower load win again


def test_min_match_tokens_treats_a_tiny_match_as_no_match() -> None:
    hashes = hashes_of(PROMPT)
    config = ScoringConfig(block_size=BLOCK, tokens_per_load=8.0, min_match_tokens=3 * BLOCK)
    replicas = {"tiny": idle(summary_of(hashes[:1])), "x": idle(), "y": idle()}
    assert choose_replica(hashes, replicas, config, random.Random(1)).reason == "power_of_two"


def test_full_tie_goes_to_the_smallest_id() -> None:
    hashes = hashes_of(PROMPT)
    s = summary_of(hashes)
    assert choose_replica(hashes, {"b": idle(s), "a": idle(s), "ab": idle(s)}, CONFIG, random.Random(0)).replica_id == "a"


def test_invalid_config_and_empty_replica_set_are_rejected() -> None:
    with pytest.raises(ValueError):
        ScoringConfig(block_size=0)
    with pytest.raises(ValueError):
        choose_replica([], {}, CONFIG, random.Random(0))
