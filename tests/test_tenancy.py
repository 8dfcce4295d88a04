"""Tenant isolation of the prefix cache (issue 13, finding 8), on the real engine: with
`tenant_isolation` the cache salt comes from the caller's identity, so one tenant can neither hit
nor probe another's cached prompt, even by sending the other's salt; without it, behaviour is the
request field's, as before."""

from __future__ import annotations

import pytest

from shardline.router.tenancy import cache_salt_for
from shardline.worker.config import EngineConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import SamplingParams
from tiny_models import write_tiny_checkpoint

PROMPT = list(range(10, 50))  # 40 tokens = 5 blocks of 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    directory = tmp_path_factory.mktemp("tenancy")
    write_tiny_checkpoint("llama", directory, seed=3)
    config = EngineConfig(model=str(directory), device="cpu", dtype="float32", block_size=8, num_kv_blocks=64)
    return LLMEngine(config, show_progress=False)


def cached_tokens(engine: LLMEngine, salt: str | None) -> int:
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=1, temperature=0.0), cache_salt=salt)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    [final] = [o for o in outs if o.request_id == rid and o.finished]
    return final.cached_tokens


def test_a_tenant_hits_only_its_own_cache_even_with_anothers_salt(engine) -> None:
    alice = cache_salt_for(True, "alice", None)
    assert cached_tokens(engine, alice) == 0
    assert cached_tokens(engine, alice) == 32  # her own prompt again: 4 full blocks cached
    # mallory sends alice's salt (or alice's name) as her own cache_salt: a partition of her own
    for forged in (alice, "alice", None):
        assert cached_tokens(engine, cache_salt_for(True, "mallory", forged)) == 0


def test_anonymous_callers_never_share_a_partition(engine) -> None:
    assert cached_tokens(engine, cache_salt_for(True, None, "x")) == 0
    assert cached_tokens(engine, cache_salt_for(True, None, "x")) == 0


def test_without_isolation_the_request_salt_is_the_partition_as_before() -> None:
    assert cache_salt_for(False, "alice", "s") == "s"
    assert cache_salt_for(False, None, None) is None
    assert cache_salt_for(True, "alice", "s") != cache_salt_for(True, "bob", "s")
    assert cache_salt_for(True, "alice", "s") != cache_salt_for(True, "alice", None)
