"""Coalesced streaming at the AsyncEngine: merged items carry exactly the tokens, text, logprobs,
finish reason and usage of the uncoalesced stream; stop strings that land inside a merged item,
aborts and deadlines in the middle of an interval behave as without merging; the first token is
never held back by the interval. The engines are real (a tiny random Llama, and the stand-in
engine, which replaces only the model); the assertions are on the items' structure, with time
bounds far from the intervals involved."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster_fixtures import WORDS, write_tiny_model_with_tokenizer
from shardline.worker.config import ConfigError, EngineConfig
from shardline.worker.engine.async_engine import AsyncEngine
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.outputs import FINISH_LENGTH, FINISH_STOP_STRING, RequestOutput, TokenLogprob
from shardline.worker.engine.params import SamplingParams
from shardline.worker.engine.outputs import merge_into
from shardline.worker.engine.stream_coalescer import StreamPolicy
from tiny_models import prompts

ENGINE = dict(num_kv_blocks=256, block_size=8, max_num_batched_tokens=512, max_num_seqs=32, device="cpu")
UNCOALESCED = StreamPolicy(interval_s=0.0)
# Every stream holds its later deltas 0.2 s whatever the load: merging is certain within a
# stream of a few dozen tokens at a few ms per step.
ALWAYS_MERGE = StreamPolicy(interval_s=0.2, items_per_s=1.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-coalesce")
    write_tiny_model_with_tokenizer(d)
    return d


def engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), **{**ENGINE, **kw}), show_progress=False)


async def items_of(aeng: AsyncEngine, prompt, params: SamplingParams) -> list[RequestOutput]:
    return [out async for out in aeng.generate(prompt, params)]


def joined(items: list[RequestOutput]) -> dict:
    """What a client reassembles from a stream, and the stream's end state."""
    last = items[-1]
    return {
        "ids": [t for o in items for t in o.new_token_ids],
        "text": "".join(o.text_delta for o in items),
        "logprobs": [(lp.token_id, lp.logprob, lp.top) for o in items for lp in (o.logprobs or [])],
        "finish": last.finish_reason, "usage": (last.prompt_tokens, last.completion_tokens, last.cached_tokens),
        "error": last.error, "finished": [o.finished for o in items],
    }


def run_both(model_dir, jobs: list[tuple[object, SamplingParams]], **engine_kw) -> tuple[list[list[RequestOutput]], list[list[RequestOutput]]]:
    """The jobs' items, all submitted at once, on an uncoalesced then a coalesced engine built
    from the same weights."""
    results = []
    for policy in (UNCOALESCED, ALWAYS_MERGE):
        aeng = AsyncEngine(engine(model_dir, **engine_kw), stream_policy=policy)

        async def run():
            return await asyncio.gather(*(items_of(aeng, p, sp) for p, sp in jobs))

        try:
            results.append(asyncio.run(run()))
        finally:
            aeng.shutdown()
    return results[0], results[1]


def test_merge_concatenates_in_order_and_keeps_the_last_end_state() -> None:
    a = RequestOutput("r", [1], "a", prompt_tokens=3, completion_tokens=1, logprobs=[TokenLogprob(1, -0.1)])
    b = RequestOutput("r", [2, 3], "bc", prompt_tokens=3, completion_tokens=3,
                      logprobs=[TokenLogprob(2, -0.2), TokenLogprob(3, -0.3, {3: -0.3})])
    c = RequestOutput("r", [4], "d", finished=True, finish_reason=FINISH_LENGTH, prompt_tokens=3,
                      completion_tokens=4, cached_tokens=2, logprobs=[TokenLogprob(4, -0.4)])
    out = merge_into(merge_into(a, b), c)
    assert out.new_token_ids == [1, 2, 3, 4] and out.text_delta == "abcd"
    assert [lp.token_id for lp in out.logprobs] == [1, 2, 3, 4] and out.logprobs[2].top == {3: -0.3}
    assert out.finished and out.finish_reason == FINISH_LENGTH
    assert (out.prompt_tokens, out.completion_tokens, out.cached_tokens) == (3, 4, 2)


def test_gap_grows_with_open_streams_up_to_the_interval() -> None:
    policy = StreamPolicy(interval_s=0.05, items_per_s=1000.0)
    assert policy.gap_s(1) == pytest.approx(0.001)
    assert policy.gap_s(16) == pytest.approx(0.016)
    assert policy.gap_s(64) == pytest.approx(0.05)
    assert UNCOALESCED.gap_s(64) == 0.0
    with pytest.raises(ConfigError, match="stream_interval_ms"):
        EngineConfig(stream_interval_ms=-1)
    with pytest.raises(ConfigError, match="stream_items_per_s"):
        EngineConfig(stream_items_per_s=0)


def test_coalesced_streams_deliver_exactly_what_uncoalesced_ones_do(model_dir) -> None:
    batch = prompts(4, seed=5, min_len=4, max_len=20)
    jobs = [(p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)) for p in batch]
    jobs.append(({"messages": [{"role": "user", "content": "what is the capital of france"}]},
                 SamplingParams(max_tokens=16, temperature=0.8, seed=3, logprobs=1)))
    plain, merged = run_both(model_dir, jobs)
    for a, b in zip(plain, merged):
        # Exact but for the logprobs' float rounding: the two runs batch the requests differently
        # (timing), and a batched GEMM rounds a row by the batch it shares.
        exact = {"finished": None, "logprobs": None}
        assert joined(b)["ids"] and joined(b) | exact == joined(a) | exact
        for (ia, la, ta), (ib, lb, tb) in zip(joined(a)["logprobs"], joined(b)["logprobs"], strict=True):
            assert ia == ib and la == pytest.approx(lb, abs=1e-4) and ta.keys() == tb.keys()
            assert all(ta[k] == pytest.approx(tb[k], abs=1e-4) for k in ta)
        assert joined(b)["finished"][-1] and not any(joined(b)["finished"][:-1])
    # merging happened: fewer items than tokens in the coalesced streams
    assert sum(len(b) for b in merged) < sum(len(joined(b)["ids"]) for b in merged)
    assert all(len(b[0].new_token_ids) == 1 for b in merged)  # the first item is the first token alone


def test_a_stop_string_inside_a_merged_item_ends_the_stream_exactly(model_dir) -> None:
    # The stand-in engine makes token t+1 after t; the word tokenizer maps ids 4.. to WORDS, so a
    # prompt ending in "the" (id 4) continues "capital of france is paris what hello ...".
    stop = " ".join(WORDS[5:7])  # "is paris": the 4th and 5th tokens, never the first item's
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])
    with_incl = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], include_stop_str_in_output=True)
    plain, merged = run_both(model_dir, [("the", params), ("the", with_incl)], load_format="stand-in")
    for a, b in zip(plain, merged):
        assert joined(b) | {"finished": None} == joined(a) | {"finished": None}
        assert joined(b)["finish"] == FINISH_STOP_STRING
    assert stop not in joined(merged[0])["text"] and "france" in joined(merged[0])["text"]
    assert joined(merged[1])["text"].endswith(stop)
    assert len(merged[0][-1].new_token_ids) > 1  # the stop landed in a merged item


def test_the_first_token_is_never_held_by_the_interval(model_dir) -> None:
    aeng = AsyncEngine(engine(model_dir, load_format="stand-in"), stream_policy=StreamPolicy(interval_s=30.0, items_per_s=1e-3))

    async def run():
        t0 = time.monotonic()
        items = []
        async for out in aeng.generate([5, 6, 7], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)):
            items.append((time.monotonic() - t0, out))
        return items

    try:
        items = asyncio.run(run())
    finally:
        aeng.shutdown()
    # the first token alone and at once; the other 39 held, then released together by the finish
    assert [len(o.new_token_ids) for _, o in items] == [1, 39]
    assert items[0][0] < 10.0 and items[-1][0] < 10.0  # far below the 30 s interval
    assert items[-1][1].finish_reason == FINISH_LENGTH


def test_an_idle_stream_is_not_delayed(model_dir) -> None:
    # One stream, tokens every 50 ms, a 30 s interval cap: the gap (1 / items_per_s = 1 ms) is
    # shorter than the time between tokens, so tokens go out one by one as they are made.
    aeng = AsyncEngine(engine(model_dir, load_format="stand-in", extra={"stand_in_step_ms": 50.0}),
                       stream_policy=StreamPolicy(interval_s=30.0, items_per_s=1000.0))

    async def run():
        return [out async for out in aeng.generate([5], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))]

    try:
        items = asyncio.run(run())
    finally:
        aeng.shutdown()
    sizes = [len(o.new_token_ids) for o in items]
    assert sum(sizes) == 8 and len(items) >= 6 and max(sizes) <= 2  # one by one (a lagging loop may pair two)


@pytest.mark.parametrize("how", ["abort", "deadline"])
def test_leaving_in_the_middle_of_an_interval_aborts_and_frees_blocks(model_dir, how) -> None:
    eng = engine(model_dir, load_format="stand-in", extra={"stand_in_step_ms": 5.0})
    aeng = AsyncEngine(eng, stream_policy=StreamPolicy(interval_s=5.0, items_per_s=1e-3))

    async def run():
        stream = aeng.generate([5, 6, 7, 8, 9], SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
        first = await stream.__anext__()
        if how == "deadline":  # the caller's deadline passes while tokens are held
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(stream.__anext__(), 0.3)
        else:
            await asyncio.sleep(0.3)  # tokens accumulate in the held item; then the caller leaves
        await stream.aclose()
        for _ in range(500):
            if not eng.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return first

    try:
        first = asyncio.run(run())
        assert len(first.new_token_ids) == 1
        assert not eng.has_unfinished_requests()
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        assert eng.num_steps < 400  # aborted (0.3 s at >= 5 ms a step), not run to 500 tokens
    finally:
        aeng.shutdown()


def test_stand_in_refuses_tensor_parallelism(model_dir) -> None:
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(model=str(model_dir), load_format="stand-in", tensor_parallel_size=2)
