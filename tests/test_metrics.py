"""The metrics recorders: names, labels, counters moving exactly with calls, and the merge the
ingress uses to serve every replica's metrics on one /metrics."""

from __future__ import annotations

import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardline.metrics import (
    METRIC_NAMES,
    EngineMetrics,
    RouterMetrics,
    merge_expositions,
)


def parse(text: bytes) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def sample_value(text: bytes, name: str, **labels: str) -> float:
    """The value of the one sample called `name` whose labels include `labels`."""
    found = [
        s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def exposed_family_names(text: bytes) -> set[str]:
    return {line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE ")}


def test_engine_and_router_export_exactly_the_listed_families() -> None:
    engine, router = EngineMetrics("smollm2-135m", "g0"), RouterMetrics("smollm2-135m")
    assert exposed_family_names(engine.exposition()) | exposed_family_names(router.exposition()) == set(METRIC_NAMES)
    assert all(name.startswith("shardline:") for name in METRIC_NAMES)


def test_every_engine_sample_carries_model_name_and_replica_group() -> None:
    engine = EngineMetrics("smollm2-135m", "g7")
    engine.on_step(1, 0, 0.1, 16, 16, 0)
    engine.on_first_token(0.05, 0.01)
    engine.on_token(0.01)
    engine.on_finish("length", 3, 4, 0.2)
    engine.on_reject("overloaded")
    samples = [s for f in text_string_to_metric_families(engine.exposition().decode()) for s in f.samples]
    assert samples
    for s in samples:
        assert s.labels["model_name"] == "smollm2-135m" and s.labels["replica_group"] == "g7", s


def test_counters_move_exactly_with_calls() -> None:
    engine = EngineMetrics("m", "0")
    engine.on_step(num_running=3, num_waiting=2, kv_usage=0.25, prefix_queries_delta=64,
                   prefix_hits_delta=48, preemptions_delta=1)
    engine.on_step(num_running=1, num_waiting=0, kv_usage=0.5, prefix_queries_delta=16,
                   prefix_hits_delta=0, preemptions_delta=2)
    engine.on_finish("stop", prompt_tokens=10, generation_tokens=5, e2e_s=0.4)
    engine.on_finish("stop", prompt_tokens=7, generation_tokens=1, e2e_s=0.1)
    engine.on_finish("abort", prompt_tokens=2, generation_tokens=0, e2e_s=0.05)
    engine.on_reject("overloaded")
    text = engine.exposition()
    assert sample_value(text, "shardline:num_requests_running") == 1
    assert sample_value(text, "shardline:num_requests_waiting") == 0
    assert sample_value(text, "shardline:kv_cache_usage_perc") == 0.5
    assert sample_value(text, "shardline:prefix_cache_queries_total") == 80
    assert sample_value(text, "shardline:prefix_cache_hits_total") == 48
    assert sample_value(text, "shardline:num_preemptions_total") == 3
    assert sample_value(text, "shardline:prompt_tokens_total") == 19
    assert sample_value(text, "shardline:generation_tokens_total") == 6
    assert sample_value(text, "shardline:request_success_total", finished_reason="stop") == 2
    assert sample_value(text, "shardline:request_success_total", finished_reason="abort") == 1
    assert sample_value(text, "shardline:request_success_total", finished_reason="length") == 0
    assert sample_value(text, "shardline:request_rejected_total", reason="overloaded") == 1
    assert sample_value(text, "shardline:e2e_request_latency_seconds_count") == 3
    assert sample_value(text, "shardline:e2e_request_latency_seconds_sum") == pytest.approx(0.55)


def test_histograms_bucket_each_observation() -> None:
    engine = EngineMetrics("m", "0")
    engine.on_first_token(ttft_s=0.03, queue_time_s=0.002)
    for itl in (0.004, 0.004, 0.2):
        engine.on_token(itl)
    text = engine.exposition()
    assert sample_value(text, "shardline:time_to_first_token_seconds_bucket", le="0.02") == 0
    assert sample_value(text, "shardline:time_to_first_token_seconds_bucket", le="0.04") == 1
    assert sample_value(text, "shardline:request_queue_time_seconds_count") == 1
    assert sample_value(text, "shardline:inter_token_latency_seconds_bucket", le="0.005") == 2
    assert sample_value(text, "shardline:inter_token_latency_seconds_bucket", le="+Inf") == 3
    assert sample_value(text, "shardline:inter_token_latency_seconds_sum") == pytest.approx(0.208)


def test_two_engines_in_one_process_keep_separate_counts() -> None:
    a, b = EngineMetrics("m", "a"), EngineMetrics("m", "b")
    a.on_finish("stop", 1, 1, 0.1)
    assert sample_value(a.exposition(), "shardline:request_success_total", finished_reason="stop") == 1
    assert sample_value(b.exposition(), "shardline:request_success_total", finished_reason="stop") == 0


def test_no_created_samples_are_exposed() -> None:
    engine = EngineMetrics("m", "0")
    engine.on_finish("stop", 1, 1, 0.1)
    assert b"_created" not in engine.exposition()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_running=0, num_waiting=0, kv_usage=1.5),
        dict(num_running=0, num_waiting=0, kv_usage=0.1, preemptions_delta=-1),
        dict(num_running=0, num_waiting=0, kv_usage=0.1, prefix_queries_delta=4, prefix_hits_delta=5),
    ],
)
def test_on_step_refuses_impossible_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EngineMetrics("m").on_step(**kwargs)


def test_router_counts_decisions_and_refuses_unknown_ones() -> None:
    router = RouterMetrics("m")
    router.on_decision("prefix_hit")
    router.on_decision("prefix_hit")
    router.on_decision("fallback")
    router.on_reject("invalid_argument")
    text = router.exposition()
    assert sample_value(text, "shardline:router_decisions_total", decision="prefix_hit") == 2
    assert sample_value(text, "shardline:router_decisions_total", decision="fallback") == 1
    assert sample_value(text, "shardline:request_rejected_total", replica_group="ingress") == 1
    with pytest.raises(ValueError):
        router.on_decision("random")


def test_merge_keeps_every_sample_and_each_family_once() -> None:
    replicas = [EngineMetrics("m", f"g{i}") for i in range(3)]
    for i, engine in enumerate(replicas):
        engine.on_step(i, 1, 0.1 * i, 10 * i, 5 * i, i)
        engine.on_first_token(0.01 * (i + 1), 0.001)
        engine.on_finish("stop", 4, 2 + i, 0.3)
        engine.on_reject(f"reason{i}")
    router = RouterMetrics("m")
    router.on_decision("fallback")
    router.on_reject("invalid_argument")
    texts = [router.exposition()] + [e.exposition() for e in replicas]

    merged = merge_expositions(texts)

    type_lines = [line for line in merged.decode().splitlines() if line.startswith("# TYPE ")]
    assert len(type_lines) == len(set(type_lines)) == len(METRIC_NAMES)
    expected = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for text in texts for f in text_string_to_metric_families(text.decode()) for s in f.samples
    }
    got = [
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for f in text_string_to_metric_families(merged.decode()) for s in f.samples
    ]
    assert len(got) == len(set(got)) and set(got) == expected
    assert sample_value(merged, "shardline:generation_tokens_total", replica_group="g2") == 4
    rejected = parse(merged)["shardline:request_rejected"]
    assert {s.labels["replica_group"] for s in rejected.samples} == {"ingress", "g0", "g1", "g2"}


def test_merge_lets_a_later_snapshot_of_the_same_series_win() -> None:
    engine = EngineMetrics("m", "g0")
    old = engine.exposition()
    engine.on_finish("stop", 1, 1, 0.1)
    merged = merge_expositions([old, engine.exposition()])
    assert sample_value(merged, "shardline:request_success_total", finished_reason="stop") == 1


def test_merge_drops_a_family_that_changes_type() -> None:
    gauge = b"# HELP x a\n# TYPE x gauge\nx{r=\"1\"} 1.0\n"
    counter = b"# HELP x a\n# TYPE x counter\nx_total{r=\"2\"} 5.0\n# HELP y b\n# TYPE y gauge\ny 2.0\n"
    families = parse(merge_expositions([gauge, counter]))
    assert families["x"].type == "gauge" and len(families["x"].samples) == 1
    assert families["y"].samples[0].value == 2.0


def test_merge_of_nothing_is_an_empty_exposition() -> None:
    assert merge_expositions([]) == b""


def test_metrics_module_does_not_import_ray() -> None:
    code = "import sys, shardline.metrics; sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
