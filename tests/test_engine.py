"""The engine (scheduler + block manager + runner + sampler) produces exactly transformers' greedy
tokens under every scheduling regime, and accounts for every block."""

from __future__ import annotations

import asyncio

import pytest
import torch

from shardline.worker.config import EngineConfig
from shardline.worker.engine.async_engine import AsyncEngine
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.generation import GenerationRequest
from shardline.worker.engine.params import RequestError, SamplingParams
from engine_checks import assert_all_blocks_free, wait_until_idle
from tiny_models import hf_greedy, prompts, write_tiny_checkpoint

N_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    hf = write_tiny_checkpoint("llama", d, seed=7)
    return d, hf


def make_engine(directory, **kw) -> LLMEngine:
    cfg = dict(model=str(directory), num_kv_blocks=256, block_size=8, max_num_batched_tokens=512, max_num_seqs=32)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False)


def greedy(n=N_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def reference(hf, batch, n=N_NEW):
    return [hf_greedy(hf, p, n) for p in batch]



def test_sixteen_concurrent_requests_match_transformers(tiny):
    d, hf = tiny
    engine = make_engine(d)
    batch = prompts(16, seed=11, max_len=50)
    results = engine.generate(batch, greedy())
    assert [r.token_ids for r in results] == reference(hf, batch)
    assert all(r.finish_reason == "length" and r.completion_tokens == N_NEW for r in results)
    assert_all_blocks_free(engine)


def test_preemption_under_a_tiny_pool_gives_the_same_tokens(tiny):
    d, hf = tiny
    engine = make_engine(d, num_kv_blocks=14)  # 112 token slots for 16 requests of up to 40+12 tokens
    batch = prompts(16, seed=12, max_len=40)
    results = engine.generate(batch, greedy())
    assert engine.scheduler.num_preemptions_total > 0
    assert [r.token_ids for r in results] == reference(hf, batch)
    assert_all_blocks_free(engine)


def test_chunked_prefill_with_a_small_token_budget(tiny):
    d, hf = tiny
    engine = make_engine(d, max_num_batched_tokens=16)
    batch = prompts(16, seed=13, min_len=20, max_len=60)
    results = engine.generate(batch, greedy())
    assert [r.token_ids for r in results] == reference(hf, batch)
    assert_all_blocks_free(engine)


def test_prefix_cache_hits_give_the_same_tokens(tiny):
    d, hf = tiny
    engine = make_engine(d)
    base = prompts(1, seed=14, min_len=37, max_len=37)[0]  # 4 full blocks of 8 and 5 tokens
    shared_mid_block = base[:21]  # ends inside the third block
    batch = [base, list(base)]  # a repeated prompt
    batch += [shared_mid_block + p for p in prompts(6, seed=15, max_len=20)]  # shared prefix ending mid-block
    batch += [base[:16], base[:24], base[:30]]  # prompts that are prefixes of a cached one
    first = engine.generate([base], greedy())
    results = engine.generate(batch, greedy())
    assert [r.token_ids for r in first + results] == reference(hf, [base] + batch)
    assert results[0].cached_tokens == 32  # all full blocks of the repeated prompt but never the last token
    assert results[-1].cached_tokens == 24
    assert all(r.cached_tokens >= 16 for r in results[2:8])
    assert engine.block_manager.prefix_cache_hits > 0
    assert_all_blocks_free(engine)


def test_generated_tokens_become_cacheable(tiny):
    d, hf = tiny
    engine = make_engine(d)
    p = prompts(1, seed=16, min_len=13, max_len=13)[0]
    [first] = engine.generate([p], greedy(20))
    follow_up = p + first.token_ids + [5, 6, 7]
    [second] = engine.generate([follow_up], greedy())
    assert second.cached_tokens == 32  # 33 cached tokens cover 4 full blocks
    assert second.token_ids == hf_greedy(hf, follow_up, N_NEW)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
def test_aborts_mid_stream_leave_survivors_exact(tiny, overlap):
    """Overlapped: the aborted requests are in the step already launched when they are aborted."""
    d, hf = tiny
    engine = make_engine(d, num_kv_blocks=40, async_scheduling=overlap)
    batch = prompts(16, seed=17, max_len=40)
    ids = [engine.add_request(p, greedy()) for p in batch]
    doomed = set(ids[::3])
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    finished: dict[str, str] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
        steps += 1
        if steps == 4:
            assert (engine._inflight is not None) == overlap
            for rid in doomed:
                out = engine.abort_request(rid)
                if out is not None:
                    finished[rid] = out.finish_reason
    ref = reference(hf, batch)
    for rid, p, r in zip(ids, batch, ref):
        if rid in doomed:
            assert finished[rid] == "abort"
        else:
            assert tokens[rid] == r and finished[rid] == "length"
    assert_all_blocks_free(engine)


def test_prefix_hit_counters_match_a_crafted_workload(tiny):
    d, _ = tiny
    engine = make_engine(d)
    p = list(range(10, 50))  # 40 tokens = 5 blocks of 8
    engine.generate([p], greedy(1))
    q0, h0 = engine.block_manager.prefix_cache_queries, engine.block_manager.prefix_cache_hits
    engine.generate([p + [3, 4]], greedy(1))  # 42 tokens: 5 full cached blocks hit
    assert engine.block_manager.prefix_cache_queries - q0 == 42
    assert engine.block_manager.prefix_cache_hits - h0 == 40


def test_cache_salt_isolates_tenants(tiny):
    d, _ = tiny
    engine = make_engine(d)
    p = list(range(10, 50))
    engine.add_request(p, greedy(1), cache_salt="tenant-a")
    while engine.has_unfinished_requests():
        engine.step()
    rid = engine.add_request(p, greedy(1), cache_salt="tenant-b")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == rid and outs[-1].cached_tokens == 0


def test_seeded_sampling_is_independent_of_the_batch(tiny):
    d, _ = tiny
    engine = make_engine(d)
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    p = prompts(1, seed=18)[0]
    [alone] = engine.generate([p], sp)
    others = prompts(7, seed=19)
    mixed = engine.generate(others[:3] + [p] + others[3:], [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)] * 3 + [sp] + [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)] * 4)
    assert mixed[3].token_ids == alone.token_ids


@pytest.mark.parametrize(
    "params, prompt, field",
    [
        (SamplingParams(max_tokens=5), [], "prompt"),
        (SamplingParams(max_tokens=5), [10] * 600, "prompt"),
        (SamplingParams(max_tokens=500), [10] * 20, "max_tokens"),
        (SamplingParams(temperature=-1.0), [10], "temperature"),
        (SamplingParams(top_p=0.0), [10], "top_p"),
        (SamplingParams(max_tokens=5), [10, 99999], "prompt"),
    ],
)
def test_bad_requests_are_rejected_without_harming_others(tiny, params, prompt, field):
    d, hf = tiny
    engine = make_engine(d)
    good = prompts(3, seed=20)
    ids = [engine.add_request(p, greedy()) for p in good]
    with pytest.raises(RequestError) as err:
        engine.add_request(prompt, params)
    assert err.value.field == field
    outs: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id].extend(o.new_token_ids)
    assert [outs[i] for i in ids] == reference(hf, good)


def test_async_engine_streams_and_cancels(tiny):
    d, hf = tiny
    aeng = AsyncEngine(make_engine(d))
    batch = prompts(4, seed=21)

    async def run():
        async def collect(p):
            toks = []
            async for out in aeng.generate(p, greedy()):
                toks.extend(out.new_token_ids)
            return toks

        async def cancel_early(p):
            async for _ in aeng.generate(p, greedy(200)):
                break  # leaving the stream aborts the request

        results = await asyncio.gather(*(collect(p) for p in batch), cancel_early(batch[0]))
        with pytest.raises(RequestError):
            async for _ in aeng.generate([], greedy()):
                pass
        return results[:-1]

    try:
        assert asyncio.run(run()) == reference(hf, batch)
        wait_until_idle(aeng)
        assert_all_blocks_free(aeng.engine)
    finally:
        aeng.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_attention_backend_matches_transformers(arch, tmp_path):
    """The Triton kernels (through the interpreter on CPU) inside the whole engine, mixed steps."""
    from shardline.worker.kernels.runtime import interpreter_ready

    if not torch.cuda.is_available() and not interpreter_ready():
        pytest.skip("triton imported in compile mode without a GPU; run the kernel tests alone")
    hf = write_tiny_checkpoint(arch, tmp_path, seed=3)
    engine = make_engine(tmp_path, max_num_batched_tokens=32, attention_backend="triton")
    assert engine.executor.model.layers[0].self_attn.backend.name == "triton"
    batch = prompts(4, seed=1, max_len=30)
    results = engine.generate(batch, greedy(6))
    assert [r.token_ids for r in results] == reference(hf, batch, 6)


def test_cancel_during_admission_still_frees_the_request(tiny):
    import threading

    d, _ = tiny
    aeng = AsyncEngine(make_engine(d))
    gate = threading.Event()
    real_add = aeng.engine.add_request

    def add_after_the_caller_gave_up(*args, **kwargs):  # the engine thread admits late
        gate.wait(10)
        return real_add(*args, **kwargs)

    aeng.engine.add_request = add_after_the_caller_gave_up

    async def run():
        task = asyncio.create_task(aeng.generate(prompts(1, seed=31)[0], greedy(450)).__anext__())
        await asyncio.sleep(0.1)  # queued; the engine thread is inside add_request, waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        steps = aeng.engine.num_steps
        gate.set()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if aeng.engine.num_steps > steps and not aeng.engine.has_unfinished_requests():
                break
        return aeng.engine.num_steps - steps

    try:
        assert asyncio.run(run()) < 50  # aborted right after admission, not run to 450 tokens
        assert_all_blocks_free(aeng.engine)
    finally:
        aeng.shutdown()


def test_shutdown_ends_open_streams_and_refuses_new_ones(tiny):
    from shardline.worker.engine.async_engine import EngineDeadError

    d, _ = tiny
    aeng = AsyncEngine(make_engine(d))

    async def run():
        outs = []

        async def consume():
            async for out in aeng.generate(prompts(1, seed=32)[0], greedy(400)):
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, aeng.shutdown)
        await asyncio.wait_for(task, 10)
        with pytest.raises(EngineDeadError):
            async for _ in aeng.generate([5, 6], greedy(2)):
                pass
        return outs[-1]

    last = asyncio.run(run())
    assert last.finished and last.finish_reason == "error" and "shut down" in last.error


async def _drain(agen):
    async for _ in agen:
        pass


def test_every_sampling_option_runs_through_the_engine(tiny):
    """The sampler's paths on the runner's real (inference-mode) logits, mixed in one batch."""
    d, _ = tiny
    engine = make_engine(d)
    options = [
        SamplingParams(max_tokens=6, temperature=0.7, top_k=5, seed=1),
        SamplingParams(max_tokens=6, temperature=1.0, top_p=0.8, min_p=0.05, seed=2),
        SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.5),
        SamplingParams(max_tokens=6, temperature=0.0, min_tokens=6, stop_token_ids=[3, 4, 5]),
        SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True),
    ]
    results = engine.generate(prompts(5, seed=40), options)
    assert all(r.completion_tokens == 6 for r in results[3:])
    assert not set(results[3].token_ids[:5]) & {3, 4, 5}  # stop ids are masked until min_tokens
    lps = results[4].logprobs
    assert lps is not None and len(lps) == 6 and all(len(lp.top) == 3 for lp in lps)
    assert all(lp.token_id == t for lp, t in zip(lps, results[4].token_ids))
    assert_all_blocks_free(engine)


def test_a_request_larger_than_the_block_pool_is_refused_once_by_the_validator(tiny):
    """One validation per request: the engine's Limits carry the pool's capacity, so the edge's
    validator refuses a request that could never fit, with the same error at the engine as at the
    edge; the scheduler (which no longer checks) never sees it."""
    d, _ = tiny
    engine = make_engine(d, num_kv_blocks=4)  # 4 blocks of 8 = 32 KV tokens
    params = SamplingParams(max_tokens=30)
    prompt_ids = [10] * 10
    with pytest.raises(RequestError) as at_edge:
        GenerationRequest.validated(prompt_ids, params, engine.limits, "edge")
    with pytest.raises(RequestError) as at_engine:
        engine.add_request(prompt_ids, params)
    assert (at_engine.value.field, str(at_engine.value)) == (at_edge.value.field, str(at_edge.value))
    assert at_edge.value.field == "max_tokens" and "32" in str(at_edge.value)
    assert not engine.scheduler.has_unfinished and engine.block_manager.num_free_blocks == 4
