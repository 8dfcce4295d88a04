"""Specification of the scheduler: token budget, chunked prefill, max_num_seqs, preemption by
recompute, aborts and priorities. Steps run against a fake runner that stores token ids in a shadow
KV pool through the real block tables and "samples" a token that depends on every token it reads
back, so a wrong block table, a bad prefix hit or a lossy preemption changes the output."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.worker.config import ConfigError, EngineConfig
from shardline.worker.engine.block_manager import BlockManager
from shardline.worker.engine.outputs import FINISH_ABORT, FINISH_LENGTH
from shardline.worker.engine.params import SamplingParams
from shardline.worker.engine.request import Request, RequestStatus
from shardline.worker.engine.scheduler import Scheduler, SchedulerOutput

BS = 4


class FakeEngine:
    """Drives a real Scheduler and BlockManager; stands in for the runner and sampler."""

    def __init__(self, num_blocks: int = 64, max_model_len: int = 256, prefix_caching: bool = True, **knobs) -> None:
        config = EngineConfig(block_size=BS, num_kv_blocks=num_blocks, **knobs)
        self.bm = BlockManager(num_blocks, BS, enable_prefix_caching=prefix_caching)
        self.scheduler = Scheduler(config, self.bm, max_model_len)
        self.kv: list[int | None] = [None] * (num_blocks * BS)
        self.outputs: list[SchedulerOutput] = []
        self.recomputed: dict[str, int] = {}  # request id -> tokens computed over its life

    def add(self, rid: str, prompt: list[int], max_tokens: int = 8, **kw) -> Request:
        req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens, **kw)
        self.scheduler.add_request(req)
        return req

    def _tokens(self, req: Request) -> list[int]:
        """The request's whole sequence as the model sees it this step."""
        return req.all_token_ids

    def _run(self, out: SchedulerOutput) -> dict[str, int]:
        sampled: dict[str, int] = {}
        for entry in out.scheduled:
            req, start = entry.request, entry.request.num_computed_tokens
            tokens = self._tokens(req)
            assert len(req.block_ids) * BS >= start + entry.num_new_tokens
            for pos in range(start, start + entry.num_new_tokens):
                self.kv[req.block_ids[pos // BS] * BS + pos % BS] = tokens[pos]
            self.recomputed[req.request_id] = self.recomputed.get(req.request_id, 0) + entry.num_new_tokens
            if entry.samples:
                context = [self.kv[req.block_ids[p // BS] * BS + p % BS] for p in range(req.num_tokens)]
                assert context == tokens, f"{req.request_id}: the KV cache does not hold its tokens"
                sampled[req.request_id] = sum((i + 1) * t for i, t in enumerate(context)) % 1009
        return sampled

    def step(self) -> list[Request]:
        """One engine step; finishes requests at their max_tokens. Returns requests that finished."""
        out = self.scheduler.schedule()
        assert out.num_batched_tokens == sum(e.num_new_tokens for e in out.scheduled)
        assert out.num_batched_tokens <= self.scheduler.max_num_batched_tokens
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        self.outputs.append(out)
        finished = []
        for req in self.scheduler.update_after_step(out, self._run(out)):
            assert req.num_tokens <= self.scheduler.max_model_len
            if req.num_output_tokens >= req.max_tokens:
                self.scheduler.finish_request(req, FINISH_LENGTH)
                finished.append(req)
        return finished

    def run_until_done(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished:
                return
            self.step()
        raise AssertionError("scheduler did not finish its work")


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 131 + i * 7) % 500 for i in range(n)]


def outputs_of(engine: FakeEngine, requests: list[Request]) -> dict[str, list[int]]:
    return {r.request_id: r.output_token_ids for r in requests}


# ---- budget and batching ------------------------------------------------------------------------


def test_token_budget_is_respected_every_step():
    engine = FakeEngine(max_num_batched_tokens=16, max_num_seqs=8)
    reqs = [engine.add(f"r{i}", prompt(5 + 3 * i, i)) for i in range(6)]
    engine.run_until_done()
    assert all(o.num_batched_tokens <= 16 for o in engine.outputs)
    assert max(o.num_batched_tokens for o in engine.outputs) == 16
    assert all(r.finish_reason == FINISH_LENGTH and r.num_output_tokens == 8 for r in reqs)
    assert engine.bm.num_free_blocks == engine.bm.num_blocks


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_the_end():
    engine = FakeEngine(max_num_batched_tokens=32)
    req = engine.add("long", prompt(100))
    chunks = []
    while req.num_output_tokens == 0:
        out = engine.scheduler.schedule()
        chunks.append((out.scheduled[0].num_new_tokens, out.scheduled[0].samples))
        engine.scheduler.update_after_step(out, engine._run(out))
    assert chunks == [(32, False), (32, False), (32, False), (4, True)]
    assert req.num_computed_tokens == 100 and req.num_tokens == 101


def test_decodes_run_beside_a_prefill_chunk_and_come_first_in_the_batch():
    engine = FakeEngine(max_num_batched_tokens=16)
    a = engine.add("a", prompt(6))
    engine.step()  # a's whole prompt
    b = engine.add("b", prompt(40, 1))
    out = engine.scheduler.schedule()
    assert [(e.request.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 15)]
    assert a.num_output_tokens == 1 and b.num_computed_tokens == 0


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_whole():
    engine = FakeEngine(max_num_batched_tokens=64, enable_chunked_prefill=False, max_model_len=64)
    engine.add("a", prompt(40))
    engine.add("b", prompt(30, 1))
    out = engine.scheduler.schedule()
    assert [(e.request.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 40)]
    engine.scheduler.update_after_step(out, engine._run(out))
    out = engine.scheduler.schedule()
    assert [(e.request.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 30)]


def test_disabling_chunked_prefill_needs_a_budget_of_a_whole_context():
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        FakeEngine(max_num_batched_tokens=32, enable_chunked_prefill=False, max_model_len=64)


def test_max_num_seqs_caps_running_requests():
    engine = FakeEngine(max_num_seqs=2)
    reqs = [engine.add(f"r{i}", prompt(5, i), max_tokens=3) for i in range(5)]
    out = engine.scheduler.schedule()
    assert [e.request.request_id for e in out.scheduled] == ["r0", "r1"]
    assert engine.scheduler.num_running == 2 and engine.scheduler.num_waiting == 3
    engine.scheduler.update_after_step(out, engine._run(out))
    engine.run_until_done()
    assert all(len(o.scheduled) <= 2 for o in engine.outputs)
    assert all(r.num_output_tokens == 3 for r in reqs)


# ---- prefix cache through the scheduler ---------------------------------------------------------


def test_second_request_with_shared_prefix_skips_its_cached_tokens():
    engine = FakeEngine()
    shared = prompt(12)
    first = engine.add("first", shared + [1, 2], max_tokens=2)
    engine.run_until_done()
    second = engine.add("second", shared + [3], max_tokens=2)
    out = engine.scheduler.schedule()
    assert second.num_cached_tokens == 12 and second.num_computed_tokens == 12
    assert out.scheduled[0].num_new_tokens == 1
    engine.scheduler.update_after_step(out, engine._run(out))
    engine.run_until_done()
    assert first.num_cached_tokens == 0
    assert (engine.bm.prefix_cache_queries, engine.bm.prefix_cache_hits) == (14 + 13, 12)


def test_prefix_hits_produce_the_same_tokens_as_no_cache():
    def run(caching: bool) -> dict[str, list[int]]:
        engine = FakeEngine(prefix_caching=caching, max_num_batched_tokens=24)
        base = prompt(20)
        reqs = [engine.add(f"r{i}", base + prompt(i + 1, i), max_tokens=6) for i in range(5)]
        engine.run_until_done()
        return outputs_of(engine, reqs)

    assert run(True) == run(False)


# ---- preemption ---------------------------------------------------------------------------------


def test_preempted_request_resumes_with_same_tokens():
    def run(num_blocks: int) -> tuple[dict[str, list[int]], FakeEngine, list[Request]]:
        engine = FakeEngine(num_blocks=num_blocks, max_num_batched_tokens=64)
        reqs = [engine.add(f"r{i}", prompt(10, i), max_tokens=20) for i in range(4)]
        engine.run_until_done()
        return outputs_of(engine, reqs), engine, reqs

    roomy, _, _ = run(64)
    tight, engine, reqs = run(12)  # 4 requests x 8 blocks at the end: they cannot all stay resident
    assert tight == roomy
    assert engine.scheduler.num_preemptions_total > 0
    preempted = [r for r in reqs if r.num_preemptions > 0]
    assert preempted
    for r in preempted:  # it recomputed tokens beyond its own prompt + output once
        assert engine.recomputed[r.request_id] > r.num_tokens - 1
    assert engine.bm.num_free_blocks == 12


def test_preemption_picks_the_latest_arrival_and_requeues_it_first():
    engine = FakeEngine(num_blocks=5, max_num_batched_tokens=64, max_num_seqs=2)
    a = engine.add("a", prompt(7), max_tokens=9, arrival_time=1.0)
    b = engine.add("b", prompt(7, 1), max_tokens=9, arrival_time=2.0)
    engine.step()  # both prefilled: 2 blocks each, one left
    c = engine.add("c", prompt(3, 2), arrival_time=3.0)  # waits: max_num_seqs
    out = engine.scheduler.schedule()  # a and b each need a third block at their 9th token
    while not out.preempted:
        engine.scheduler.update_after_step(out, engine._run(out))
        out = engine.scheduler.schedule()
    assert out.preempted == [b]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_output_tokens > 0  # keeps what it generated
    assert [e.request for e in out.scheduled] == [a]
    assert engine.scheduler.waiting == [b, c]
    engine.scheduler.update_after_step(out, engine._run(out))
    engine.run_until_done()
    assert all(r.num_output_tokens == r.max_tokens for r in (a, b, c))


def test_a_request_alone_in_a_pool_it_fits_always_finishes():
    engine = FakeEngine(num_blocks=3, max_num_batched_tokens=8)
    reqs = [engine.add(f"r{i}", prompt(5, i), max_tokens=7) for i in range(3)]  # 11 KV tokens = 3 blocks each
    engine.run_until_done(max_steps=500)
    assert all(r.num_output_tokens == 7 for r in reqs)


def test_the_scheduler_does_not_validate_a_second_time():
    """Requests are validated once, at the edge (validation.py; tests/test_engine.py checks that a
    request too large for the pool is refused there): the scheduler has no check of its own."""
    assert not hasattr(Scheduler, "check_request")


# ---- aborts, limits, priorities -----------------------------------------------------------------


def test_abort_frees_blocks_immediately_and_leaves_others_running():
    engine = FakeEngine(num_blocks=16)
    a = engine.add("a", prompt(10))
    b = engine.add("b", prompt(10, 1))
    engine.step()
    free_before = engine.bm.num_free_blocks
    assert engine.scheduler.abort_request("a") is a
    assert a.status == RequestStatus.FINISHED and a.finish_reason == FINISH_ABORT and a.block_ids == []
    assert engine.bm.num_free_blocks == free_before + 3
    assert engine.scheduler.abort_request("a") is None
    engine.run_until_done()
    assert b.num_output_tokens == 8


def test_abort_of_a_waiting_request_removes_it_from_the_queue():
    engine = FakeEngine(max_num_seqs=1)
    engine.add("a", prompt(4))
    w = engine.add("w", prompt(4, 1))
    engine.step()
    assert engine.scheduler.waiting == [w]
    engine.scheduler.abort_request("w")
    assert engine.scheduler.num_waiting == 0


def test_request_aborted_while_its_step_runs_is_not_advanced():
    engine = FakeEngine()
    a = engine.add("a", prompt(6))
    out = engine.scheduler.schedule()
    sampled = engine._run(out)
    engine.scheduler.abort_request("a")
    assert engine.scheduler.update_after_step(out, sampled) == []
    assert a.output_token_ids == [] and not engine.scheduler.has_unfinished


def test_output_limit_is_clamped_to_the_context():
    engine = FakeEngine(max_model_len=16)
    req = engine.add("a", prompt(10), max_tokens=100)
    assert req.max_tokens == 6
    engine.run_until_done()
    assert req.num_tokens == 16


def test_lower_priority_value_is_admitted_first():
    engine = FakeEngine(max_num_seqs=1)
    low = engine.add("low", prompt(4), priority=5, arrival_time=1.0)
    high = engine.add("high", prompt(4, 1), priority=0, arrival_time=2.0)
    mid = engine.add("mid", prompt(4, 2), priority=1, arrival_time=0.5)
    order = []
    while engine.scheduler.has_unfinished:
        order += [r.request_id for r in engine.step()]
    assert order == ["high", "mid", "low"]
    assert all(r.num_output_tokens == 8 for r in (low, high, mid))


def test_preemption_victim_is_the_lowest_priority_running_request():
    engine = FakeEngine(num_blocks=5, max_num_batched_tokens=64)
    bulk = engine.add("bulk", prompt(7, 1), max_tokens=9, priority=3, arrival_time=1.0)
    engine.step()
    vip = engine.add("vip", prompt(7), max_tokens=9, priority=0, arrival_time=2.0)
    while not engine.outputs[-1].preempted:
        engine.step()
    # vip ran out of blocks after bulk was already scheduled this step: bulk's share is withdrawn.
    out = engine.outputs[-1]
    assert out.preempted == [bulk] and [e.request for e in out.scheduled] == [vip]
    assert out.num_batched_tokens == 1
    assert bulk.num_preemptions == 1 and vip.num_preemptions == 0
    engine.run_until_done()
    assert vip.num_output_tokens == bulk.num_output_tokens == 9


# ---- random workloads ---------------------------------------------------------------------------

workload = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 12), st.integers(1, 10), st.integers(0, 2)),  # prefix, tail, max_tokens, priority
    min_size=1,
    max_size=7,
)


@settings(max_examples=60, deadline=None)
@given(
    jobs=workload,
    num_blocks=st.integers(10, 24),  # 10 blocks hold a whole 40-token context,
    budget=st.integers(1, 40),
    max_num_seqs=st.integers(1, 5),
    chunked=st.booleans(),
    abort_at=st.lists(st.integers(0, 30), max_size=2),
)
def test_any_workload_finishes_with_the_tokens_of_an_unconstrained_run(
    jobs, num_blocks, budget, max_num_seqs, chunked, abort_at
):
    prefixes = [[], prompt(8, 7), prompt(13, 9)]

    def run(**knobs) -> tuple[FakeEngine, list[Request]]:
        engine = FakeEngine(max_model_len=40, **knobs)
        reqs = [
            engine.add(f"r{i}", prefixes[p] + prompt(t, i), max_tokens=m, priority=prio, arrival_time=float(i))
            for i, (p, t, m, prio) in enumerate(jobs)
        ]
        return engine, reqs

    reference, ref_reqs = run(num_blocks=64, max_num_batched_tokens=64, max_num_seqs=8, prefix_caching=False)
    reference.run_until_done()
    engine, reqs = run(
        num_blocks=num_blocks,
        max_num_batched_tokens=budget if chunked else 40,
        max_num_seqs=max_num_seqs,
        enable_chunked_prefill=chunked,
    )
    aborted = set()
    for step in range(3000):
        if not engine.scheduler.has_unfinished:
            break
        for k in abort_at:
            if k == step and reqs[k % len(reqs)].status != RequestStatus.FINISHED:
                engine.scheduler.abort_request(reqs[k % len(reqs)].request_id)
                aborted.add(k % len(reqs))
        engine.step()
        bm = engine.bm
        assert bm.num_free_blocks + sum(1 for rc in bm.ref_counts if rc) == bm.num_blocks
    else:
        raise AssertionError("the scheduler stalled")
    for i, (r, ref) in enumerate(zip(reqs, ref_reqs)):
        if i in aborted:
            assert r.finish_reason == FINISH_ABORT
            assert r.output_token_ids == ref.output_token_ids[: r.num_output_tokens]
        else:
            assert r.output_token_ids == ref.output_token_ids
    assert engine.bm.num_free_blocks == engine.bm.num_blocks


# ---- overlapped scheduling (advance now, resolve one step later) -------------------------------


class OverlappedFakeEngine(FakeEngine):
    """Schedules step N+1 before step N's tokens are resolved, as the engine does with
    async_scheduling: the pending token's id reaches the fake KV cache from the launched step
    (as the real engine copies it on the device), never from the request's host lists."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.inflight: tuple[list[Request], list[int]] | None = None

    def _pending_id(self, req: Request) -> int:
        assert self.inflight is not None, f"{req.request_id} has a pending token but nothing is in flight"
        samplers, tokens = self.inflight
        return tokens[[id(r) for r in samplers].index(id(req))]

    def _tokens(self, req: Request) -> list[int]:
        assert req.num_pending_tokens <= 1
        return req.all_token_ids + ([self._pending_id(req)] if req.num_pending_tokens else [])

    def step(self) -> list[Request]:
        out = self.scheduler.schedule()
        sampled = self._run(out)
        samplers = self.scheduler.advance(out)
        launched = (samplers, [sampled[r.request_id] for r in samplers])
        finished = []
        if self.inflight is not None:
            for req in self.scheduler.resolve(*self.inflight):
                if req.num_output_tokens >= req.max_tokens:
                    self.scheduler.finish_request(req, FINISH_LENGTH)
                    finished.append(req)
        self.inflight = launched if samplers else None
        return finished

    def run_until_done(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished and self.inflight is None:
                return
            self.step()
        raise AssertionError("scheduler did not finish its work")


@pytest.mark.parametrize("num_blocks, budget", [(64, 64), (12, 64), (64, 8), (10, 8)])
def test_overlapped_scheduling_gives_the_synchronous_tokens(num_blocks, budget):
    """Same outputs with pending tokens, under preemption (a preempted request keeps the token
    that arrives after it left) and chunked prefill; every block free at the end."""
    def run(cls):
        engine = cls(num_blocks=num_blocks, max_num_batched_tokens=budget)
        reqs = [engine.add(f"r{i}", prompt(5 + 3 * i, i), max_tokens=6 + 2 * i) for i in range(5)]
        engine.run_until_done()
        return outputs_of(engine, reqs), engine

    expected, _ = run(FakeEngine)
    got, engine = run(OverlappedFakeEngine)
    assert got == expected
    assert engine.bm.num_free_blocks == num_blocks
    if num_blocks < 20:
        assert engine.scheduler.num_preemptions_total > 0


def test_a_request_whose_last_token_is_pending_is_not_scheduled_again():
    engine = OverlappedFakeEngine()
    a = engine.add("a", prompt(6), max_tokens=1)
    engine.step()  # prefill; its one token is pending
    assert a.num_pending_tokens == 1
    assert engine.scheduler.schedule().scheduled == []


def test_resolve_rejects_a_token_that_was_not_pending():
    engine = FakeEngine()
    a = engine.add("a", prompt(6))
    with pytest.raises(ValueError, match="none was pending"):
        engine.scheduler.resolve([a], [5])
