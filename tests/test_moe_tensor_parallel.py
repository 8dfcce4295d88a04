"""Mixture-of-experts models under tensor parallelism (gloo, real rank processes): whole experts
dealt across the ranks (expert parallelism) when their count divides the group, every expert
sliced otherwise; either way the logits equal one rank's."""

from __future__ import annotations

import multiprocessing

import pytest

from shardline.worker.config import ConfigError
from shardline.worker.parallel.executor import TensorParallelExecutor
from test_tensor_parallel import _assert_all_gone, _compare_with_local, _config, _spec
from tiny_models import write_tiny_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("arch, tp, overrides, expert_weights_per_rank", [
    ("qwen3_moe", 2, {}, 4 * 2 * 32 * 64),  # 4 whole experts per rank (expert parallelism)
    ("mixtral", 4, {}, 2 * 2 * 32 * 64),  # 2 whole experts per rank
    ("mixtral", 4, {"num_local_experts": 6}, 6 * 2 * 8 * 64),  # 6 experts over 4 ranks: each holds a quarter of all 6
], ids=["qwen3_moe-tp2-expert", "mixtral-tp4-expert", "mixtral-tp4-sliced"])
def test_moe_logits_under_tensor_parallelism_equal_one_rank(tmp_path, arch, tp, overrides, expert_weights_per_rank):
    write_tiny_checkpoint(arch, tmp_path, **overrides)
    ex = _compare_with_local(tmp_path, tp)
    pids = ex.rank_pids
    try:
        counts = ex.parameter_counts()
    finally:
        ex.shutdown()
    assert [c["layers.0.mlp.experts.w13"] for c in counts] == [expert_weights_per_rank] * tp
    assert len({c["layers.0.mlp.gate.weight"] for c in counts}) == 1  # the router is replicated
    _assert_all_gone(pids)


def test_experts_that_split_neither_way_fail_before_any_process_starts(tmp_path):
    write_tiny_checkpoint("mixtral", tmp_path, num_local_experts=6, intermediate_size=30)
    with pytest.raises(ConfigError, match="num_experts 6 .* moe_intermediate_size 30"):
        TensorParallelExecutor(_spec(tmp_path), _config(4), show_progress=False)
    assert multiprocessing.active_children() == []
