"""Overlapped (async) scheduling: step N+1 is scheduled and launched before step N's tokens are
read, its pending input ids copied on the device. Every result must equal the synchronous engine's
(and transformers' for greedy): tokens, finish reasons, logprobs, seeded samples, stops that land
while the next step is in flight, preemption, aborts, and every block freed afterwards."""

from __future__ import annotations

import asyncio

import pytest

from shardline.worker.config import EngineConfig
from shardline.worker.engine.async_engine import AsyncEngine
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import SamplingParams
from engine_checks import assert_all_blocks_free
from tiny_models import hf_greedy, prompts, write_tiny_checkpoint

N_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-async")
    hf = write_tiny_checkpoint("llama", d, seed=7)
    return d, hf


def make_engine(directory, overlap: bool, **kw) -> LLMEngine:
    cfg = dict(model=str(directory), num_kv_blocks=256, block_size=8, max_num_batched_tokens=512, max_num_seqs=32,
               async_scheduling=overlap)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False)


def greedy(n=N_NEW, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)



def summary(results):
    return [(r.token_ids, r.finish_reason, r.completion_tokens,
             [(lp.token_id, round(lp.logprob, 4)) for lp in r.logprobs] if r.logprobs else None) for r in results]


def run_both(d, batch, params, **kw):
    """The same workload on a synchronous and an overlapped engine: (sync results, overlapped
    results, sync engine, overlapped engine)."""
    sync = make_engine(d, False, **kw)
    expected = sync.generate(batch, params)
    assert sync.num_overlapped_steps == 0
    assert_all_blocks_free(sync)
    over = make_engine(d, True, **kw)
    got = over.generate(batch, params)
    assert over.num_overlapped_steps > 0
    assert_all_blocks_free(over)
    return expected, got, sync, over


def test_config_turns_overlap_on_for_cuda_only_by_default():
    assert EngineConfig(device="cpu").resolved_async_scheduling() is False
    assert EngineConfig(device="cuda").resolved_async_scheduling() is True
    assert EngineConfig(device="cpu", async_scheduling=True).resolved_async_scheduling() is True
    assert EngineConfig(device="cuda", async_scheduling=False).resolved_async_scheduling() is False


def test_overlapped_greedy_matches_transformers(tiny):
    d, hf = tiny
    engine = make_engine(d, True)
    batch = prompts(16, seed=11, max_len=50)
    results = engine.generate(batch, greedy())
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, N_NEW) for p in batch]
    assert all(r.finish_reason == "length" and r.completion_tokens == N_NEW for r in results)
    # Every decode step after the first overlapped the previous one.
    assert engine.num_overlapped_steps >= N_NEW - 2
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("regime", ["preemption", "chunked_prefill", "one_seq_at_a_time"])
def test_overlapped_scheduling_regimes_match_transformers(tiny, regime):
    d, hf = tiny
    kw = {"preemption": dict(num_kv_blocks=14), "chunked_prefill": dict(max_num_batched_tokens=16),
          "one_seq_at_a_time": dict(max_num_seqs=1)}[regime]
    batch = prompts(12, seed=12, min_len=5, max_len=40)
    engine = make_engine(d, True, **kw)
    results = engine.generate(batch, greedy())
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, N_NEW) for p in batch]
    if regime == "preemption":
        assert engine.scheduler.num_preemptions_total > 0
    assert engine.num_overlapped_steps > 0
    assert_all_blocks_free(engine)


def test_stops_found_while_the_next_step_runs_end_the_request_at_the_same_token(tiny):
    """EOS-like stop ids, min_tokens and max_tokens give the synchronous engine's outputs, though
    the overlapped engine has already launched the next step when it reads the stopping token."""
    d, _ = tiny
    batch = prompts(10, seed=30, max_len=30)
    probe = make_engine(d, False).generate(batch, greedy(16))
    stop_ids = sorted({r.token_ids[3] for r in probe[:5]})  # tokens that do occur early on
    params = []
    for i in range(len(batch)):
        if i % 3 == 0:
            params.append(SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=stop_ids))
        elif i % 3 == 1:
            params.append(SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=stop_ids, min_tokens=6))
        else:
            params.append(greedy(1 + i))
    expected, got, _, _ = run_both(d, batch, params)
    assert summary(got) == summary(expected)
    assert any(r.finish_reason == "stop" for r in got)


def test_an_engine_whose_requests_all_stopped_while_the_next_step_ran_is_idle(tiny):
    """Every request stops (a stop id) while a step holding all of them is already launched: that
    step has nothing left to deliver, so the engine must not report unfinished work afterwards."""
    d, _ = tiny
    batch = prompts(3, seed=35, max_len=30)
    probe = make_engine(d, False).generate(batch, greedy(8))
    params = [SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[r.token_ids[2]]) for r in probe]
    expected, got, _, over = run_both(d, batch, params)
    assert summary(got) == summary(expected)
    assert all(r.finish_reason == "stop" and r.completion_tokens <= 3 for r in got)
    assert over._inflight is None


def test_seeded_sampling_logprobs_and_penalties_equal_the_synchronous_engine(tiny):
    d, _ = tiny
    options = [
        SamplingParams(max_tokens=8, temperature=0.8, top_k=7, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=1.0, top_p=0.85, min_p=0.02, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.3, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.7, presence_penalty=0.8, seed=5, ignore_eos=True),
    ]
    batch = prompts(5, seed=31)
    expected, got, _, _ = run_both(d, batch, options)
    assert summary(got) == summary(expected)


def test_prefix_hits_under_overlap_give_the_same_tokens(tiny):
    d, hf = tiny
    engine = make_engine(d, True)
    base = prompts(1, seed=14, min_len=37, max_len=37)[0]
    [first] = engine.generate([base], greedy())
    follow_up = base + first.token_ids + [5, 6, 7]
    [second] = engine.generate([follow_up], greedy())
    assert second.cached_tokens >= 32
    assert second.token_ids == hf_greedy(hf, follow_up, N_NEW)
    assert_all_blocks_free(engine)


def test_requests_reaching_max_model_len_stop_without_an_extra_step(tiny):
    d, _ = tiny
    batch = prompts(4, seed=33, min_len=20, max_len=30)
    params = [SamplingParams(max_tokens=40 - len(p), temperature=0.0, ignore_eos=True) for p in batch]
    expected, got, sync, over = run_both(d, batch, params, max_model_len=40)
    assert summary(got) == summary(expected)
    assert over.num_steps == sync.num_steps  # a request whose last token is in flight is not scheduled again
    assert all(len(p) + r.completion_tokens == 40 for p, r in zip(batch, got))


def test_async_engine_streams_under_overlap(tiny):
    d, hf = tiny
    aeng = AsyncEngine(make_engine(d, True))
    batch = prompts(4, seed=21)

    async def collect(p):
        toks = []
        async for out in aeng.generate(p, greedy()):
            toks.extend(out.new_token_ids)
        return toks

    async def main():
        return await asyncio.gather(*(collect(p) for p in batch))

    try:
        got = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert got == [hf_greedy(hf, p, N_NEW) for p in batch]


def test_tensor_parallel_overlap_matches_transformers(tiny):
    """TP=2: rank 0 copies the pending ids on its device before the step's inputs are broadcast."""
    d, hf = tiny
    engine = make_engine(d, True, tensor_parallel_size=2)
    try:
        batch = prompts(6, seed=34, max_len=30)
        results = engine.generate(batch, greedy())
        assert [r.token_ids for r in results] == [hf_greedy(hf, p, N_NEW) for p in batch]
        assert engine.num_overlapped_steps > 0
        assert_all_blocks_free(engine)
    finally:
        engine.shutdown()


def test_overlap_feeds_pending_ids_through_the_graph_runners_static_buffers(tiny):
    """Decode steps take the CUDA-graph runner's padded static-buffer path (run eagerly on CPU): the
    ids copied in on the device from the launched step must reach those buffers."""
    d, hf = tiny
    engine = make_engine(d, True, max_num_seqs=8)
    runner = engine.executor.runner
    assert runner.enable_cuda_graphs(max_batch=8, max_model_len=engine.max_model_len, use_graphs=False)
    used = []
    run = runner.graphs.run
    runner.graphs.run = lambda inputs: used.append(inputs.num_seqs) or run(inputs)
    batch = prompts(5, seed=36, max_len=30)
    results = engine.generate(batch, greedy())
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, N_NEW) for p in batch]
    assert used and engine.num_overlapped_steps > 0
    assert_all_blocks_free(engine)
