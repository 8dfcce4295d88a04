"""The routing comparison (benchmarks/routing.py) in small: every router runs the same workload on
a real local Ray, and where a router that only remembers prompt *text* is wrong about the engine's
cache (the same system prompt under several cache salts), the KV-aware router serves more of the
prompt tokens from cache. Plus the config side of `ClusterConfig.router`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from shardline.cluster.config import ROUTERS, ClusterConfig
from shardline.worker.config import ConfigError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "routing.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("routing_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_router_defaults_to_kv_aware_and_rejects_unknown_names() -> None:
    assert ClusterConfig().router == "kv_aware"
    assert not ClusterConfig().router_needs_text
    assert ClusterConfig(router="prefix_affinity").router_needs_text
    with pytest.raises(ConfigError, match="router"):
        ClusterConfig.from_dict({"router": "round_robin"})


def test_every_router_choice_builds_a_replica_group_deployment_with_that_router_class() -> None:
    from shardline.cluster.replica_group import replica_group_deployment

    for name, path in ROUTERS.items():
        config = ClusterConfig(router=name, engine={"device": "cpu", "load_format": "dummy"})
        deployment = replica_group_deployment(config)
        assert deployment._deployment_config.request_router_config.request_router_class == path


def test_routing_hint_pickles_and_exposes_the_prompt_as_rays_text_router_reads_it() -> None:
    import pickle

    from shardline.router.routing_hint import RoutingHint

    hint = pickle.loads(pickle.dumps(RoutingHint("system hello")))
    assert hint.prompt == "system hello" and not hasattr(hint, "messages")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kv_aware_router_matches_text_affinity_on_shared_prefixes_and_beats_it_on_salted_tenants(capsys) -> None:
    bench = load_benchmark()
    out = bench.main(["--routers", "kv_aware", "prefix_affinity", "pow2", "--groups", "4", "--per-group", "3",
                      "--prefix-words", "64", "--question-words", "8", "--flood", "2", "--tenants", "6",
                      "--kv-blocks", "48"])
    routers = out["routers"]
    assert set(routers) == {"kv_aware", "prefix_affinity", "pow2"}
    for phases in routers.values():
        for phase in ("shared_prefix", "flood", "revisit", "tenants"):
            assert phases[phase]["errors"] == 0 and phases[phase]["requests"] > 0
    # Ray's router sends the one system prompt text to one replica whatever the salt: 6 salted
    # prefixes thrash its 48-block pool; ours sees 6 different prefixes and spreads them.
    kv, text = routers["kv_aware"]["tenants"], routers["prefix_affinity"]["tenants"]
    assert kv["cached_fraction"] >= text["cached_fraction"] + 0.2
    assert len(text["per_replica_prompt_tokens"]) == 1  # all of it on one replica group
    # on plain shared prefixes it is at least as good as Ray's (it also remembers what it routed)
    shared = {name: routers[name]["shared_prefix"]["cached_fraction"] for name in routers}
    assert shared["kv_aware"] >= shared["prefix_affinity"] - 0.02
    assert shared["kv_aware"] > shared["pow2"]
    assert "prefix_affinity" in capsys.readouterr().out  # the table was printed
