"""The engine feeds its EngineMetrics: token and request counters move exactly with the work done,
prefix-cache and preemption counters follow the block manager and scheduler, rejections are
counted by code, and every first token / next token / finish lands in its histogram."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardline.metrics import EngineMetrics
from shardline.worker.config import EngineConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import RequestError, SamplingParams
from tiny_models import prompts, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-metrics")
    write_tiny_checkpoint("llama", d, seed=3)
    return d


def value(metrics: EngineMetrics, name: str, **labels: str) -> float:
    found = [s.value for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples
             if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def make(tiny_dir, **kw) -> tuple[LLMEngine, EngineMetrics]:
    metrics = EngineMetrics("tiny", "7")
    cfg = dict(model=str(tiny_dir), num_kv_blocks=64, block_size=8, max_num_batched_tokens=256, max_num_seqs=8)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False, metrics=metrics), metrics


def test_finished_requests_move_token_and_request_counters_exactly(tiny_dir) -> None:
    engine, m = make(tiny_dir)
    batch = prompts(3, seed=5, min_len=9, max_len=20)
    engine.generate(batch, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert value(m, "shardline:prompt_tokens_total") == sum(map(len, batch))
    assert value(m, "shardline:generation_tokens_total") == 15
    assert value(m, "shardline:request_success_total", finished_reason="length") == 3
    assert value(m, "shardline:time_to_first_token_seconds_count") == 3
    assert value(m, "shardline:request_queue_time_seconds_count") == 3
    assert value(m, "shardline:inter_token_latency_seconds_count") == 3 * 4
    assert value(m, "shardline:e2e_request_latency_seconds_count") == 3
    assert value(m, "shardline:num_requests_running") == 0
    assert value(m, "shardline:kv_cache_usage_perc") == 0.0


def test_prefix_counters_follow_the_block_manager(tiny_dir) -> None:
    engine, m = make(tiny_dir)
    prompt = prompts(1, seed=9, min_len=33, max_len=33)[0]
    for _ in range(2):
        engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    bm = engine.block_manager
    assert bm.prefix_cache_hits > 0
    assert value(m, "shardline:prefix_cache_queries_total") == bm.prefix_cache_queries
    assert value(m, "shardline:prefix_cache_hits_total") == bm.prefix_cache_hits


def test_preemptions_are_counted(tiny_dir) -> None:
    engine, m = make(tiny_dir, num_kv_blocks=8)  # 64 token slots for 6 requests of ~30 tokens
    engine.generate(prompts(6, seed=2, min_len=10, max_len=20), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert engine.scheduler.num_preemptions_total > 0
    assert value(m, "shardline:num_preemptions_total") == engine.scheduler.num_preemptions_total


def test_rejections_and_aborts_are_counted(tiny_dir) -> None:
    engine, m = make(tiny_dir)
    with pytest.raises(RequestError):
        engine.add_request([5, 6, 7], SamplingParams(top_p=0.0))
    assert value(m, "shardline:request_rejected_total", reason="invalid_argument") == 1
    rid = engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request(rid)
    assert value(m, "shardline:request_success_total", finished_reason="abort") == 1
    assert value(m, "shardline:num_requests_running") == 0
