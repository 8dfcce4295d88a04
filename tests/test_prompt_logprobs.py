"""Prompt logprobs (vLLM's `prompt_logprobs`, completions' `echo` with `logprobs`) are computed by
the engine in the prefill and equal transformers' log_softmax of its logits on the same weights,
whatever splits the prefill: chunked prefill, overlapped scheduling, a prefix-cache entry that
would have skipped the positions (such a request takes no hit), or a preemption in the middle."""

from __future__ import annotations

import pytest
import torch

from shardline.worker.config import EngineConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import RequestError, SamplingParams
from engine_checks import assert_all_blocks_free
from tiny_models import prompts, write_tiny_checkpoint

TOP = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-plp")
    hf = write_tiny_checkpoint("llama", d, seed=11)
    return d, hf


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """[P - 1, V]: row p is the log-distribution of prompt token p + 1 (transformers, float32)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def assert_matches_transformers(hf, prompt: list[int], entries) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    reference = hf_prompt_logprobs(hf, prompt)
    for p, entry in enumerate(entries[1:]):
        assert entry.token_id == prompt[p + 1]
        assert entry.logprob == pytest.approx(reference[p, prompt[p + 1]].item(), abs=2e-4)
        top_values, top_ids = reference[p].topk(TOP)
        assert set(entry.top) == set(top_ids.tolist()), f"position {p + 1}"
        for token, value in zip(top_ids.tolist(), top_values.tolist()):
            assert entry.top[token] == pytest.approx(value, abs=2e-4)


def make_engine(directory, **kw) -> LLMEngine:
    cfg = dict(model=str(directory), num_kv_blocks=64, block_size=4, max_num_batched_tokens=256, max_num_seqs=8,
               dtype="float32")
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False)


@pytest.mark.parametrize("knobs", [
    {},
    {"max_num_batched_tokens": 7},  # chunked prefill: each prompt is computed over several steps
    {"max_num_batched_tokens": 7, "async_scheduling": True},  # overlapped: chunks finish a step late
], ids=["whole", "chunked", "chunked-overlapped"])
def test_prompt_logprobs_equal_transformers_and_skip_the_prefix_cache(tiny, knobs):
    d, hf = tiny
    engine = make_engine(d, **knobs)
    batch = prompts(3, seed=5, min_len=12, max_len=30)
    greedy = SamplingParams(max_tokens=4, temperature=0)
    engine.generate(batch, greedy)  # the prompts' full blocks are now in the prefix cache
    results = engine.generate(batch + [batch[0][:1]], SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=TOP))
    for prompt, result in zip(batch, results):
        assert result.cached_tokens == 0  # a hit would have skipped the positions' logits
        assert_matches_transformers(hf, prompt, result.prompt_logprobs)
    assert results[-1].prompt_logprobs == [None]  # a one-token prompt has nothing to score
    # The generated tokens are what they are without prompt logprobs, and the cache still serves others.
    assert [r.token_ids for r in results[:3]] == [r.token_ids for r in engine.generate(batch, greedy)]
    assert engine.block_manager.prefix_cache_hits > 0
    assert_all_blocks_free(engine)


def test_prompt_logprobs_survive_a_preemption_without_duplicates(tiny):
    d, hf = tiny
    # 10 blocks of 4: two 18-token prompts growing to 30 tokens cannot both stay, so one is preempted.
    engine = make_engine(d, num_kv_blocks=10, max_num_batched_tokens=8)
    batch = prompts(2, seed=9, min_len=18, max_len=18)
    results = engine.generate(batch, SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=TOP, ignore_eos=True))
    assert engine.scheduler.num_preemptions_total > 0
    for prompt, result in zip(batch, results):
        assert_matches_transformers(hf, prompt, result.prompt_logprobs)


def test_prompt_logprobs_are_bounded_like_logprobs(tiny):
    d, _ = tiny
    engine = make_engine(d)
    with pytest.raises(RequestError) as err:
        engine.add_request([1, 2, 3], SamplingParams(prompt_logprobs=21))
    assert err.value.field == "prompt_logprobs" and "21" in str(err.value)
