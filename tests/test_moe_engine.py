"""The engine serves the mixture-of-experts families with transformers' greedy tokens under every
scheduling regime: plain batches, chat prompts, chunked prefill, preemption and prefix-cache hits.
One prompt set per family, its 32-token reference computed once."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardline.metrics import EngineMetrics
from shardline.worker.config import EngineConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import SamplingParams
from engine_checks import assert_all_blocks_free
from tiny_models import MOE_ARCHITECTURES, hf_greedy, prompts, write_chat_tokenizer, write_tiny_checkpoint

N_NEW = 32
BASE = prompts(1, seed=30, min_len=37, max_len=37)[0]  # 4 full blocks of 8 and 5 tokens
# Shared prefixes (a prefix ending mid-block, prompts that are prefixes of a cached one) and strangers.
BATCH = [BASE, BASE[:21] + prompts(1, seed=31, max_len=12)[0], BASE[:30]] + prompts(3, seed=32, min_len=10, max_len=30)
MESSAGES = [[{"role": "user", "content": "what is the capital of france"}],
            [{"role": "system", "content": "tell me a story"}, {"role": "user", "content": "hello world"}]]


@pytest.fixture(scope="module", params=MOE_ARCHITECTURES)
def family(request, tmp_path_factory):
    """(checkpoint directory, transformers model, its tokenizer, the batch's reference tokens)."""
    d = tmp_path_factory.mktemp(request.param)
    hf = write_tiny_checkpoint(request.param, d, seed=5)
    tokenizer = write_chat_tokenizer(d)
    return d, hf, tokenizer, [hf_greedy(hf, p, N_NEW) for p in BATCH]


def make_engine(directory, **kw) -> LLMEngine:
    cfg = dict(model=str(directory), num_kv_blocks=128, block_size=8, max_num_batched_tokens=512, max_num_seqs=16)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)


def test_plain_batch_then_prefix_hits_give_transformers_tokens(family):
    d, _, _, reference = family
    engine = make_engine(d)
    first = engine.generate(BATCH, greedy())
    again = engine.generate(BATCH, greedy())  # every prompt's full blocks are cached now
    assert [r.token_ids for r in first] == reference
    assert [r.token_ids for r in again] == reference
    assert again[0].cached_tokens == 32 and all(r.cached_tokens > 0 for r in again[:3])
    assert_all_blocks_free(engine)


def test_chunked_prefill_gives_transformers_tokens(family):
    d, _, _, reference = family
    engine = make_engine(d, max_num_batched_tokens=16)
    assert [r.token_ids for r in engine.generate(BATCH, greedy())] == reference
    assert_all_blocks_free(engine)


def test_preemption_gives_transformers_tokens(family):
    d, _, _, reference = family
    engine = make_engine(d, num_kv_blocks=16)  # 128 slots for 6 requests of up to 69 tokens
    assert [r.token_ids for r in engine.generate(BATCH, greedy())] == reference
    assert engine.scheduler.num_preemptions_total > 0
    assert_all_blocks_free(engine)


def test_chat_prompts_give_transformers_tokens(family):
    d, hf, tokenizer, _ = family
    engine = make_engine(d)
    results = engine.generate([{"messages": m} for m in MESSAGES], greedy())
    for messages, result in zip(MESSAGES, results):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert result.prompt_token_ids == ids and len(ids) > 8
        assert result.token_ids == hf_greedy(hf, ids, N_NEW)


def test_expert_load_histogram_counts_every_routed_token_once_per_step(family):
    """shardline:moe_expert_tokens: one sample per (sparse layer, expert) per step that ran, summing
    to tokens computed x top_k x sparse layers."""
    d, hf, _, _ = family
    metrics = EngineMetrics("tiny-moe", "0")
    engine = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=64, block_size=8, max_num_batched_tokens=16,
                                    enable_prefix_caching=False), show_progress=False, metrics=metrics)
    batch = BATCH[3:]
    engine.generate(batch, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    moe = engine.model_config.moe
    assert moe is not None
    sparse = sum(moe.is_sparse_layer(i) for i in range(engine.model_config.num_hidden_layers))
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.exposition().decode())
               for s in f.samples if s.name.startswith("shardline:moe_expert_tokens") and "le" not in s.labels}
    computed = sum(len(p) + 4 - 1 for p in batch)  # every prompt token, then each generated token but the last
    assert samples["shardline:moe_expert_tokens_count"] == engine.num_steps * sparse * moe.num_experts
    assert samples["shardline:moe_expert_tokens_sum"] == computed * moe.num_experts_per_tok * sparse
