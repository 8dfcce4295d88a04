"""Specification of the block manager and its prefix cache: crafted workloads with exact hit counts,
eviction order, and a hypothesis state machine that checks the pool's invariants (and that every
cache hit really holds the request's tokens) under random allocate / compute / free sequences."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardline.worker.engine.block_manager import BlockManager, hash_block, hash_prompt_blocks
from shardline.worker.engine.params import SamplingParams
from shardline.worker.engine.request import Request

BS = 16


def make_request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=64), cache_salt=salt)


def admit(bm: BlockManager, req: Request) -> int:
    """Admit and fully compute the request's tokens, as the scheduler plus one step would."""
    hits, num_hit = bm.get_computed_blocks(req)
    assert bm.allocate_slots(req, req.num_tokens - num_hit, hits)
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req, req.num_computed_tokens)
    return num_hit


# ---- hashing ------------------------------------------------------------------------------------


def test_hash_block_is_deterministic_and_separates_parent_salt_and_tokens():
    base = hash_block(None, [1, 2, 3], None)
    assert base == hash_block(None, [1, 2, 3], None)
    assert len(base) == 32
    assert base != hash_block(None, [1, 2, 4], None)
    assert base != hash_block(None, [1, 2, 3], "tenant-a")
    assert hash_block(None, [1, 2, 3], "tenant-a") != hash_block(None, [1, 2, 3], "tenant-b")
    assert base != hash_block(base, [1, 2, 3], None)
    # Canonical encoding: token boundaries and large ids cannot alias.
    assert hash_block(None, [1, 23], None) != hash_block(None, [12, 3], None)
    assert hash_block(None, [2**40], None) != hash_block(None, [0], None)


def test_hash_prompt_blocks_matches_the_engine_chain_for_full_blocks_only():
    tokens = list(range(40))
    hashes = hash_prompt_blocks(tokens, BS, "s")
    assert len(hashes) == 2
    assert hashes[0] == hash_block(None, tokens[:16], "s")
    assert hashes[1] == hash_block(hashes[0], tokens[16:32], "s")
    bm = BlockManager(8, BS)
    req = make_request("r", tokens, salt="s")
    admit(bm, req)
    assert req.block_hashes == hashes
    assert bm.cached_block_hashes() == set(hashes)


# ---- allocation ---------------------------------------------------------------------------------


def test_allocate_slots_covers_requested_tokens_and_counts_free_blocks():
    bm = BlockManager(10, BS)
    req = make_request("a", list(range(33)))
    assert bm.allocate_slots(req, 33)
    assert len(req.block_ids) == 3
    assert bm.num_free_blocks == 7
    assert bm.usage == pytest.approx(0.3)
    req.num_computed_tokens = 33
    assert bm.allocate_slots(req, 1)  # token 34 still fits block 3
    assert len(req.block_ids) == 3
    req.num_computed_tokens = 48
    assert bm.allocate_slots(req, 1)  # token 49 opens block 4
    assert len(req.block_ids) == 4
    bm.free(req)
    assert req.block_ids == []
    assert bm.num_free_blocks == 10 and bm.usage == 0.0


def test_failed_allocation_changes_nothing():
    bm = BlockManager(4, BS)
    a = make_request("a", list(range(48)))
    admit(bm, a)
    bm.free(a)  # 3 cached blocks sit in the free list
    b = make_request("b", list(range(48)) + [999] * 40)
    hits, num_hit = bm.get_computed_blocks(b)
    assert num_hit == 48
    before = (bm.free_block_ids(), list(bm.ref_counts), bm.cached_block_hashes())
    # 88 tokens need 6 blocks: 3 hits + 3 fresh, but only 1 block is free besides the hits.
    assert not bm.allocate_slots(b, b.num_tokens - num_hit, hits)
    assert b.block_ids == []
    assert (bm.free_block_ids(), list(bm.ref_counts), bm.cached_block_hashes()) == before


def test_hit_blocks_at_ref_zero_are_not_evicted_by_the_same_allocation():
    bm = BlockManager(3, BS)
    a = make_request("a", list(range(32)))
    admit(bm, a)
    bm.free(a)
    b = make_request("b", list(range(32)) + [7])
    hits, num_hit = bm.get_computed_blocks(b)
    assert num_hit == 32
    assert bm.allocate_slots(b, 1, hits)
    assert b.block_ids[:2] == hits and len(set(b.block_ids)) == 3
    assert not bm.allocate_slots(make_request("c", [1] * 17), 17)


# ---- prefix cache hits --------------------------------------------------------------------------


def test_two_requests_sharing_two_full_blocks_hit_32_tokens():
    bm = BlockManager(16, BS)
    prefix = list(range(100, 132))
    a = make_request("a", prefix + [1, 2, 3, 4, 5])
    b = make_request("b", prefix + [9, 8, 7])
    assert admit(bm, a) == 0
    assert admit(bm, b) == 32
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert [bm.ref_counts[x] for x in a.block_ids[:2]] == [2, 2]
    assert bm.prefix_cache_queries == 37 + 35
    assert bm.prefix_cache_hits == 32


def test_prompt_of_exact_block_multiple_hits_all_but_its_last_block():
    bm = BlockManager(16, BS)
    tokens = list(range(64))
    admit(bm, make_request("a", tokens))
    hits, num_hit = bm.get_computed_blocks(make_request("b", tokens))
    assert num_hit == 48 and len(hits) == 3


def test_salted_requests_never_share_blocks():
    bm = BlockManager(16, BS)
    tokens = list(range(40))
    admit(bm, make_request("a", tokens, salt="tenant-a"))
    assert admit(bm, make_request("b", tokens, salt="tenant-b")) == 0
    assert admit(bm, make_request("c", tokens)) == 0
    assert admit(bm, make_request("d", tokens, salt="tenant-a")) == 32


def test_generated_tokens_become_cacheable():
    bm = BlockManager(16, BS)
    prompt = list(range(20))
    a = make_request("a", prompt)
    admit(bm, a)
    for t in range(30):  # decode 30 tokens: the KV of each is computed in the following step
        a.append_output_token(500 + t)
        assert bm.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        bm.cache_full_blocks(a, a.num_computed_tokens)
    assert a.num_computed_tokens == 50
    bm.free(a)
    follow_up = make_request("b", prompt + a.output_token_ids + [1, 2])
    assert admit(bm, follow_up) == 48  # 3 full blocks, the last two partly generated tokens


def test_cache_full_blocks_is_idempotent_and_ignores_partial_blocks():
    bm = BlockManager(8, BS)
    a = make_request("a", list(range(40)))
    assert bm.allocate_slots(a, 40)
    bm.cache_full_blocks(a, 20)
    assert bm.num_cached_blocks == 1
    bm.cache_full_blocks(a, 20)
    bm.cache_full_blocks(a, 40)
    bm.cache_full_blocks(a, 40)
    assert bm.num_cached_blocks == 2
    assert [bm.block_hash(b) is not None for b in a.block_ids] == [True, True, False]


def test_duplicate_block_computed_twice_keeps_first_holder():
    bm = BlockManager(8, BS)
    tokens = list(range(20))
    a, b = make_request("a", tokens), make_request("b", tokens)
    # Both admitted before either computed anything: no hits, each computes its own copy.
    for r in (a, b):
        hits, n = bm.get_computed_blocks(r)
        assert n == 0 and bm.allocate_slots(r, 20, hits)
    for r in (a, b):
        r.num_computed_tokens = 20
        bm.cache_full_blocks(r, 20)
    assert bm.num_cached_blocks == 1
    first_holder = a.block_ids[0]
    assert bm.block_hash(first_holder) is not None and bm.block_hash(b.block_ids[0]) is None
    bm.free(a)
    bm.free(b)
    assert bm.get_computed_blocks(make_request("c", tokens)) == ([first_holder], 16)


def test_prefix_caching_disabled_never_hits_or_counts():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    tokens = list(range(40))
    admit(bm, make_request("a", tokens))
    assert admit(bm, make_request("b", tokens)) == 0
    assert bm.num_cached_blocks == 0 and bm.prefix_cache_queries == 0


# ---- eviction -----------------------------------------------------------------------------------


def test_lru_eviction_takes_oldest_request_first_and_its_tail_blocks_first():
    bm = BlockManager(6, BS)
    a = make_request("a", list(range(48)))  # 3 full blocks
    b = make_request("b", list(range(1000, 1048)))
    admit(bm, a)
    admit(bm, b)
    bm.free(a)
    bm.free(b)
    a_blocks = [bm._cached[0][h] for h in a.block_hashes]
    b_blocks = [bm._cached[0][h] for h in b.block_hashes]
    assert bm.free_block_ids() == a_blocks[::-1] + b_blocks[::-1]
    c = make_request("c", [5] * 17)  # 2 fresh blocks: evicts a's last two blocks
    assert bm.allocate_slots(c, 17)
    assert c.block_ids == [a_blocks[2], a_blocks[1]]
    assert bm.get_computed_blocks(make_request("a2", list(range(48)) + [1]))[1] == 16  # a's first block
    assert bm.get_computed_blocks(make_request("b2", list(range(1000, 1048)) + [1]))[1] == 48


def test_hit_refreshes_recency_so_reused_prefix_outlives_older_blocks():
    bm = BlockManager(4, BS)
    a = make_request("a", list(range(16)) + [1])
    b = make_request("b", list(range(100, 116)) + [1])
    admit(bm, a)
    admit(bm, b)
    bm.free(a)
    bm.free(b)
    again = make_request("a-again", list(range(16)) + [2])
    assert admit(bm, again) == 16
    bm.free(again)
    # Fresh allocation of 3 blocks: both unhashed partial blocks first, then b's older block.
    filler = make_request("f", [3] * 48)
    assert bm.allocate_slots(filler, 48)
    assert bm.get_computed_blocks(make_request("a3", list(range(16)) + [9]))[1] == 16
    assert bm.get_computed_blocks(make_request("b3", list(range(100, 116)) + [9]))[1] == 0


def test_freed_unhashed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(4, BS)
    a = make_request("a", list(range(20)))  # block 0 cached, block 1 partial
    admit(bm, a)
    cached, partial = a.block_ids
    bm.free(a)
    assert bm.free_block_ids()[0] == partial
    assert bm.free_block_ids()[-1] == cached


def test_reset_prefix_cache_refused_while_blocks_are_referenced():
    bm = BlockManager(8, BS)
    a = make_request("a", list(range(40)))
    admit(bm, a)
    assert not bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 2
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    assert admit(bm, make_request("b", list(range(40)))) == 0


def test_hash_summary_lists_most_recently_used_first():
    bm = BlockManager(16, BS)
    old = make_request("old", list(range(17)))
    new = make_request("new", list(range(200, 217)))
    admit(bm, old)
    admit(bm, new)
    assert bm.hash_summary(10) == [new.block_hashes[0], old.block_hashes[0]]
    assert bm.hash_summary(1) == [new.block_hashes[0]]
    admit(bm, make_request("old-again", list(range(17))))  # a hit makes it the most recent
    assert bm.hash_summary(10)[0] == old.block_hashes[0]
    assert bm.hash_summary(0) == []


def test_freeing_all_requests_returns_every_block():
    bm = BlockManager(12, BS)
    reqs = [make_request(str(i), list(range(i, i + 30))) for i in range(4)]
    for r in reqs:
        admit(bm, r)
    for r in reqs:
        bm.free(r)
    assert bm.num_free_blocks == 12 and all(rc == 0 for rc in bm.ref_counts)


# ---- random operation sequences -----------------------------------------------------------------

PREFIXES = [[], list(range(16)), list(range(16)) + list(range(40, 56)), list(range(7, 30))]
SALTS = [None, None, "tenant"]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admissions, chunked computation, decoding, preemption and frees over a tiny pool.
    A shadow KV pool records which token each slot holds, so every prefix-cache hit can be
    checked to hold exactly the request's tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.bs = 4
        self.bm = BlockManager(12, self.bs)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.shadow: dict[int, list[tuple[int, str | None] | None]] = {
            b: [None] * self.bs for b in range(self.bm.num_blocks)
        }
        self.next_id = 0
        self.expected_queries = 0
        self.expected_hits = 0

    def _snapshot(self, req: Request):
        return (self.bm.free_block_ids(), list(self.bm.ref_counts), self.bm.cached_block_hashes(), list(req.block_ids))

    def _compute(self, req: Request, num_new: int) -> None:
        """Write the request's next num_new tokens into the shadow pool, as the runner would."""
        tokens = req.all_token_ids
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + num_new):
            block = req.block_ids[pos // self.bs]
            assert self.bm.ref_counts[block] == 1, "a shared block must never be written"
            self.shadow[block][pos % self.bs] = (tokens[pos], req.cache_salt)
        req.num_computed_tokens += num_new
        self.bm.cache_full_blocks(req, req.num_computed_tokens)

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 3), min_size=1, max_size=9),
          salt=st.sampled_from(SALTS))
    def add(self, prefix, tail, salt):
        self.next_id += 1
        self.waiting.append(make_request(f"r{self.next_id}", prefix + tail, salt))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit(self, data):
        req = data.draw(st.sampled_from(self.waiting))
        hits, num_hit = self.bm.get_computed_blocks(req, record_stats=False)
        assert num_hit < req.num_tokens and num_hit == len(hits) * self.bs
        tokens = req.all_token_ids
        for j, block in enumerate(hits):
            assert self.bm.block_hash(block) == req.block_hashes[j]
            assert self.shadow[block] == [(t, req.cache_salt) for t in tokens[j * self.bs : (j + 1) * self.bs]]
        num_new = data.draw(st.integers(1, req.num_tokens - num_hit))
        before = self._snapshot(req)
        if not self.bm.allocate_slots(req, num_new, hits):
            assert self._snapshot(req) == before
            return
        self.bm.record_prefix_lookup(req.num_tokens, num_hit)
        self.expected_queries += req.num_tokens
        self.expected_hits += num_hit
        req.num_computed_tokens = num_hit
        self.waiting.remove(req)
        self.running.append(req)
        self._compute(req, num_new)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), chunk=st.integers(1, 6), token=st.integers(0, 3))
    def step(self, data, chunk, token):
        req = data.draw(st.sampled_from(self.running))
        if req.num_computed_tokens == req.num_tokens:
            req.append_output_token(token)  # the previous step sampled it
        num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
        before = self._snapshot(req)
        if not self.bm.allocate_slots(req, num_new):
            assert self._snapshot(req) == before
            return
        assert len(req.block_ids) * self.bs >= req.num_computed_tokens + num_new
        self._compute(req, num_new)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data):
        req = data.draw(st.sampled_from(self.running))
        self.bm.free(req)
        req.num_computed_tokens = 0
        self.running.remove(req)
        self.waiting.append(req)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data):
        req = data.draw(st.sampled_from(self.running))
        self.bm.free(req)
        self.running.remove(req)

    @invariant()
    def pool_accounting_holds(self):
        bm = self.bm
        assert all(rc >= 0 for rc in bm.ref_counts)
        referenced = sum(1 for rc in bm.ref_counts if rc > 0)
        assert bm.num_free_blocks + referenced == bm.num_blocks
        assert set(bm.free_block_ids()) == {b for b, rc in enumerate(bm.ref_counts) if rc == 0}
        holders: dict[int, int] = {}
        for req in self.running:
            assert len(set(req.block_ids)) == len(req.block_ids)
            for b in req.block_ids:
                holders[b] = holders.get(b, 0) + 1
        for b, rc in enumerate(bm.ref_counts):
            assert holders.get(b, 0) == rc
            if rc > 1:
                assert bm.block_hash(b) is not None, "only cached full blocks are shared"
        for h, b in bm._cached[0].items():
            assert bm.block_hash(b) == h
        assert sum(1 for b in range(bm.num_blocks) if bm.block_hash(b) is not None) == bm.num_cached_blocks
        assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (self.expected_queries, self.expected_hits)

    def teardown(self):
        for req in self.running:
            self.bm.free(req)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(rc == 0 for rc in self.bm.ref_counts)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerRandomOperations = BlockManagerMachine.TestCase
