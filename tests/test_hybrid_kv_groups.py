"""Hybrid models (Gemma 2/3: global layers beside sliding-window ones) keep one block table per
KV-cache group in one shared pool: the windowed groups release their out-of-window blocks during
decode, the freed ids serve other requests and groups, prefix hits are the longest every group can
use, and greedy tokens still equal transformers' (plain, chunked, preempted, prefix hits, the
padded CUDA-graph path, the Triton kernels)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine_checks import assert_all_blocks_free
from shardline.worker.engine.block_manager import BlockManager
from shardline.worker.engine.kv_cache_groups import kv_cache_groups
from shardline.worker.engine.params import SamplingParams
from shardline.worker.engine.request import Request
from test_block_manager import PREFIXES, SALTS
from test_sliding_window import greedy, make_engine
from tiny_models import SLIDING_WINDOW, hf_greedy, prompts, write_tiny_checkpoint


def test_layers_are_grouped_by_attention_kind_in_groups_of_the_rarest_kinds_size():
    gemma2 = kv_cache_groups((16, None, 16, None), 4)
    assert gemma2.group_windows == (None, 16) and gemma2.layer_group == (1, 0, 1, 0)
    assert gemma2.layer_tensor == (0, 0, 1, 1) and gemma2.num_tensors == 2
    # Gemma 3 27B: every 6th of 62 layers global -> 10 global, 52 local in 6 groups of 10 (the last of 2)
    windows = tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(62))
    gemma3 = kv_cache_groups(windows, 62)
    assert gemma3.group_windows == (None,) + (1024,) * 6 and gemma3.num_tensors == 10
    assert [gemma3.layer_group.count(g) for g in range(7)] == [10] * 6 + [2]
    for g in range(7):  # a group's layers never share a tensor
        slots = [gemma3.layer_tensor[i] for i in range(62) if gemma3.layer_group[i] == g]
        assert len(set(slots)) == len(slots)
    for one_kind in ((), (8, 8, 8), (None, None)):
        groups = kv_cache_groups(one_kind, len(one_kind) or 2)
        assert not groups.is_hybrid and groups.layer_tensor == tuple(range(groups.num_tensors))


def _decode(bm: BlockManager, request: Request, num_tokens: int) -> None:
    """Schedule `num_tokens` one-token steps for the request as the scheduler would."""
    for _ in range(num_tokens):
        bm.release_out_of_window(request)
        assert bm.allocate_slots(request, 1)
        request.append_output_token(7)
        request.num_computed_tokens += 1
        bm.cache_full_blocks(request, request.num_computed_tokens)


def test_windowed_group_releases_during_decode_and_its_blocks_serve_the_global_group():
    bm = BlockManager(16, 4, group_windows=(None, 6))
    long = Request("long", list(range(10, 18)), SamplingParams())
    assert bm.allocate_slots(long, 8)
    long.num_computed_tokens = 8
    bm.cache_full_blocks(long, 8)
    _decode(bm, long, 24)  # 32 tokens: 8 blocks in the global group, at most 3 in the windowed one
    assert len(long.block_tables[0]) == 8 and long.num_released[0] == 0
    assert long.num_released[1] == 6 and long.block_tables[1][:6] == [0] * 6
    assert bm.group_blocks_held() == [8, 2] and bm.peak_group_blocks[1] <= 3
    assert bm.max_blocks_held(32, 1) == 8 + 3 and bm.max_tokens_held(1) == 4 * (16 - 3)
    # the 6 free blocks are exactly the released ones (the whole context would need all 16)
    released = set(bm.free_block_ids())
    assert len(released) == 6 and not released & set(long.block_tables[0] + long.block_tables[1][6:])
    other = Request("other", list(range(100, 112)), SamplingParams())
    assert bm.allocate_slots(other, 12)  # 3 global + 3 windowed blocks: the released ids
    assert set(other.block_tables[0] + other.block_tables[1]) == released
    assert bm.num_free_blocks == 0 and not bm.allocate_slots(Request("x", [5] * 4, SamplingParams()), 4)
    bm.free(long)
    bm.free(other)
    assert bm.num_free_blocks == 16 and bm.group_blocks_held() == [0, 0]


def _evict(bm: BlockManager, group: int, block: int) -> None:
    """Drop a free block's key from its group's map, as a fresh allocation evicting it would."""
    del bm._cached[group][bm.block_hash(block)]
    bm._block_hash[block] = None


def test_a_prefix_hit_is_the_longest_every_group_can_use():
    bm = BlockManager(40, 4, group_windows=(None, 6))
    tokens = list(range(10, 34))  # 24 tokens: 6 full blocks
    first = Request("first", tokens, SamplingParams())
    assert bm.allocate_slots(first, 24)
    first.num_computed_tokens = 24
    bm.cache_full_blocks(first, 24)
    global_ids, windowed = list(first.block_tables[0]), list(first.block_tables[1])
    bm.free(first)
    # the lookup stops at (25 - 1) // 4 = 6 blocks; both groups hold all 6
    again = Request("again", tokens + [99], SamplingParams())
    hits, num_hit = bm.get_computed_blocks(again)
    assert num_hit == 24 and hits == global_ids + windowed
    # evict the windowed group's first three blocks: a 6-block hit's next query (position 24) sees
    # keys 19..24, i.e. windowed blocks 4 and 5 only, so the hit keeps its length
    for block in windowed[:3]:
        _evict(bm, 1, block)
    hits, num_hit = bm.get_computed_blocks(again)
    assert num_hit == 24 and hits == global_ids + [0, 0, 0] + windowed[3:]
    assert bm.allocate_slots(again, 1, hits)
    assert again.block_tables[1][:4] == [0, 0, 0, 0] and again.num_released[1] == 4  # 3 evicted + 1 not needed
    assert again.block_tables[1][4:6] == windowed[4:6] and again.block_tables[0][:6] == global_ids
    bm.free(again)
    # evict windowed block 4 too: 6 hit blocks need windowed 4..5, 5 need 3..4, 4 need 2..3, and
    # 3, 2 and 1 need blocks 0..2: no hit at all, though the global group holds the whole chain
    _evict(bm, 1, windowed[4])
    assert bm.get_computed_blocks(again)[1] == 0
    # the global group's run of hits bounds the hit from above
    bm2 = BlockManager(40, 4, group_windows=(None, 6))
    a = Request("a", tokens, SamplingParams())
    assert bm2.allocate_slots(a, 24)
    a.num_computed_tokens = 24
    bm2.cache_full_blocks(a, 24)
    bm2.free(a)
    _evict(bm2, 0, bm2._cached[0][a.block_hashes[3]])
    assert bm2.get_computed_blocks(Request("b", tokens + [1], SamplingParams()))[1] == 12


def test_a_fresh_block_for_one_group_never_evicts_another_groups_hit():
    """The windowed group's released blocks sit ahead of the global group's in the free list; a
    request hitting both must take every hit before any fresh block is popped."""
    bm = BlockManager(10, 4, group_windows=(None, 6))
    a = Request("a", list(range(10, 18)), SamplingParams())
    assert bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a, 8)
    _decode(bm, a, 8)  # 16 tokens: windowed blocks 0 and 1 (ids 2, 3) released at positions 12, 13
    assert a.block_tables == [[0, 1, 4, 6], [0, 0, 5, 7]]
    bm.free(a)
    filler = Request("filler", [1, 2, 3, 4], SamplingParams())
    assert bm.allocate_slots(filler, 4) and filler.block_tables == [[8], [9]]
    assert bm.free_block_ids()[:2] == [2, 3]  # the windowed hits lead the free list
    b = Request("b", list(range(10, 18)) + [99], SamplingParams())
    hits, num_hit = bm.get_computed_blocks(b)
    assert hits == [0, 1, 2, 3] and num_hit == 8
    assert bm.allocate_slots(b, 1, hits)
    assert b.block_tables == [[0, 1, 6], [2, 3, 4]] and bm.ref_counts[2] == bm.ref_counts[3] == 1


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma2_hybrid")
    return directory, write_tiny_checkpoint("gemma2", directory, seed=6)


def test_released_windowed_blocks_let_more_long_gemma2_decodes_fit(gemma2):
    """Four 40-token prompts decode 40 tokens each side by side in 64 blocks without preemption: their
    whole contexts would need 4 x (10 global + 10 windowed) = 80 blocks, but the windowed group holds
    at most ceil((16 - 1 + 16) / 8) + 1 = 5 blocks per request, so 4 x 15 = 60 fit; tokens equal
    transformers'. The windowed group's peak stays bounded while the global group's grows."""
    directory, hf = gemma2
    engine = make_engine(directory, num_kv_blocks=64, max_num_batched_tokens=16)
    bm = engine.block_manager
    assert bm.group_windows == (None, SLIDING_WINDOW)
    batch = prompts(4, seed=10, min_len=40, max_len=40)
    results = engine.generate(batch, greedy(40))
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, 40) for p in batch]
    assert engine.scheduler.num_preemptions_total == 0
    assert bm.max_blocks_held(80, 16) == 15 and 4 * bm.max_blocks_held(80, 16) <= 64 < 4 * 20
    assert bm.peak_group_blocks[1] <= 4 * 5 and bm.peak_group_blocks[0] >= 4 * 9
    assert bm.num_released_blocks_total >= 4 * 5
    assert_all_blocks_free(engine)


def test_padded_decode_graph_path_and_overlap_take_the_group_tables(gemma2):
    """The CUDA-graph runner's static buffers (run eagerly on CPU) carry every group's table and
    slots; with overlapped scheduling, blocks are released while the previous step is in flight."""
    directory, hf = gemma2
    engine = make_engine(directory, num_kv_blocks=48, max_num_batched_tokens=16, async_scheduling=True)
    runner = engine.executor.runner
    assert runner.enable_cuda_graphs(max_batch=4, max_model_len=engine.max_model_len, use_graphs=False)
    graphs = runner.graphs
    replays = []
    run = graphs.run
    graphs.run = lambda inputs: replays.append(inputs.num_seqs) or run(inputs)  # count, then run for real
    batch = prompts(3, seed=11, min_len=SLIDING_WINDOW + 8, max_len=2 * SLIDING_WINDOW)
    results = engine.generate(batch, greedy(24))
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, 24) for p in batch]
    assert replays and engine.block_manager.num_released_blocks_total > 0
    assert_all_blocks_free(engine)


class HybridBlockManagerMachine(RuleBasedStateMachine):
    """Random admissions (with prefix hits), chunks, decodes, window releases, preemptions and
    frees over a tiny pool shared by a global and a windowed group. A shadow pool records the
    (group, token) each slot holds, so every hit block a group takes is checked to hold that
    group's KV of exactly the request's tokens, and no block is ever shared across groups."""

    def __init__(self) -> None:
        super().__init__()
        self.bs, self.window = 4, 6
        self.bm = BlockManager(20, self.bs, group_windows=(None, self.window))
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.shadow: dict[int, list[tuple[int, int, str | None] | None]] = {
            b: [None] * self.bs for b in range(self.bm.num_blocks)}
        self.next_id = 0

    def _owned(self, req: Request, group: int) -> list[int]:
        return req.block_tables[group][req.num_released[group]:] if len(req.block_tables) > group else []

    def _compute(self, req: Request, num_new: int) -> None:
        tokens = req.all_token_ids
        for g in range(2):
            for pos in range(req.num_computed_tokens, req.num_computed_tokens + num_new):
                block = req.block_tables[g][pos // self.bs]
                assert pos // self.bs >= req.num_released[g] and self.bm.ref_counts[block] == 1
                self.shadow[block][pos % self.bs] = (g, tokens[pos], req.cache_salt)
        req.num_computed_tokens += num_new
        self.bm.cache_full_blocks(req, req.num_computed_tokens)

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 3), min_size=1, max_size=9),
          salt=st.sampled_from(SALTS))
    def add(self, prefix, tail, salt):
        self.next_id += 1
        self.waiting.append(Request(f"r{self.next_id}", prefix + tail, SamplingParams(), cache_salt=salt))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit(self, data):
        req = data.draw(st.sampled_from(self.waiting))
        hits, num_hit = self.bm.get_computed_blocks(req, record_stats=False)
        k = num_hit // self.bs
        assert num_hit < req.num_tokens and len(hits) == 2 * k
        num_new = data.draw(st.integers(1, req.num_tokens - num_hit))
        if not self.bm.allocate_slots(req, num_new, hits):
            return
        tokens = req.all_token_ids
        for g in range(2):
            table = req.block_tables[g]
            assert len(table) * self.bs >= num_hit + num_new
            for j in range(req.num_released[g], k):  # every hit block taken holds this group's KV
                expected = [(g, t, req.cache_salt) for t in tokens[j * self.bs : (j + 1) * self.bs]]
                assert self.shadow[table[j]] == expected
        assert req.num_released[0] == 0
        assert req.num_released[1] == max(0, num_hit - self.window + 1) // self.bs
        req.num_computed_tokens = num_hit
        self.waiting.remove(req)
        self.running.append(req)
        self._compute(req, num_new)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), chunk=st.integers(1, 6), token=st.integers(0, 3))
    def step(self, data, chunk, token):
        req = data.draw(st.sampled_from(self.running))
        if req.num_computed_tokens == req.num_tokens:
            req.append_output_token(token)
        num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
        self.bm.release_out_of_window(req)
        assert req.num_released[1] == max(0, req.num_computed_tokens - self.window + 1) // self.bs
        if self.bm.allocate_slots(req, num_new):
            self._compute(req, num_new)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), finish=st.booleans())
    def free(self, data, finish):
        req = data.draw(st.sampled_from(self.running))
        self.bm.free(req)
        req.num_computed_tokens = 0
        self.running.remove(req)
        if not finish:
            self.waiting.append(req)  # preempted: recomputed later

    @invariant()
    def pool_accounting_holds(self):
        bm = self.bm
        holders: dict[int, set[int]] = {}
        counts: dict[int, int] = {}
        for req in self.running:
            assert len({len(t) for t in req.block_tables}) == 1, "every group's table has the same length"
            for g in range(2):
                for b in self._owned(req, g):
                    holders.setdefault(b, set()).add(g)
                    counts[b] = counts.get(b, 0) + 1
        assert all(len(groups) == 1 for groups in holders.values()), "a block serves one group at a time"
        assert bm.ref_counts == [counts.get(b, 0) for b in range(bm.num_blocks)]
        assert set(bm.free_block_ids()) == {b for b, rc in enumerate(bm.ref_counts) if rc == 0}
        assert bm.group_blocks_held() == [sum(1 for gs in holders.values() if g in gs) for g in range(2)]
        for g in range(2):
            for h, b in bm._cached[g].items():
                assert bm.block_hash(b) == h and bm._block_group[b] == g

    def teardown(self):
        for req in self.running:
            self.bm.free(req)
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.group_blocks_held() == [0, 0]


HybridBlockManagerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestHybridBlockManagerRandomOperations = HybridBlockManagerMachine.TestCase
