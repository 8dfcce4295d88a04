"""Tensor parallelism on CPU with gloo and real rank processes: the sharded model computes what one
rank computes, each rank holds only its shard, and a failed or killed rank fails fast and cleanly."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from shardline.worker.config import ConfigError, EngineConfig, ModelConfig
from shardline.worker.engine.executor import LocalExecutor, ModelSpec
from shardline.worker.engine.model_runner import SeqSlice, StepInputs, build_step_inputs
from shardline.worker.parallel.channel import pack, payload_bytes, unpack
from shardline.worker.parallel.executor import TensorParallelError, TensorParallelExecutor
from tiny_models import ARCHITECTURES, prompts, write_tiny_checkpoint

BLOCK = 8
CPU = torch.device("cpu")


def _spec(directory: Path) -> ModelSpec:
    cfg = ModelConfig.from_hf_config(json.loads((directory / "config.json").read_text()))
    return ModelSpec(cfg, str(directory), "safetensors", "safetensors", torch.float32, CPU, attention_backend="torch")


def _config(tp: int, **extra) -> EngineConfig:
    return EngineConfig(tensor_parallel_size=tp, device="cpu", dtype="float32", block_size=BLOCK,
                        num_kv_blocks=64, extra=dict(extra))


class _Steps:
    """A prefill of a few prompts, then decode steps fed with the reference's greedy tokens; every
    sequence owns a fixed run of blocks."""

    def __init__(self, vocab: int, n_seqs: int = 3, seed: int = 0, num_kv_groups: int = 1) -> None:
        self.seqs = prompts(n_seqs, vocab=vocab, seed=seed, min_len=5, max_len=20)
        self.done = [0] * n_seqs
        # per sequence, one table per KV-cache group (hybrid models), 6 blocks each
        self.tables = [[list(range(1 + 6 * (g * n_seqs + i), 1 + 6 * (g * n_seqs + i + 1))) for g in range(num_kv_groups)]
                       for i in range(n_seqs)]

    def inputs(self) -> StepInputs:
        slices = [SeqSlice(s[d:], d, t[0], True, group_block_ids=tuple(t[1:]))
                  for s, d, t in zip(self.seqs, self.done, self.tables)]
        return build_step_inputs(slices, BLOCK, CPU)

    def advance(self, logits: torch.Tensor) -> None:
        for i, tok in enumerate(logits.argmax(-1).tolist()):
            self.done[i] = len(self.seqs[i])
            self.seqs[i].append(tok)


def _compare_with_local(directory: Path, tp: int, num_steps: int = 4) -> TensorParallelExecutor:
    """Run the same steps on one rank and on tp ranks; logits must agree to 1e-4 (fp32)."""
    spec = _spec(directory)
    local = LocalExecutor(spec, _config(1), show_progress=False)
    tp_exec = TensorParallelExecutor(spec, _config(tp), show_progress=False)
    try:
        assert tp_exec.num_blocks == local.num_blocks == 64
        steps = _Steps(spec.model_config.vocab_size, num_kv_groups=spec.model_config.kv_cache_groups.num_groups)
        for _ in range(num_steps):
            inputs = steps.inputs()
            ref = local.execute(inputs)
            got = tp_exec.execute(inputs)
            assert got.shape == ref.shape == (3, spec.model_config.vocab_size)
            assert (got - ref).abs().max().item() <= 1e-4
            steps.advance(ref)
    except BaseException:
        tp_exec.shutdown()
        raise
    return tp_exec


def _gone(pid: int) -> bool:
    """True when no process with this pid exists any more (or only its unreaped zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _assert_all_gone(pids: list[int | None]) -> None:
    assert pids and all(p is not None for p in pids)
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if not _gone(p)] == []
    assert multiprocessing.active_children() == []


# ---- the channel ------------------------------------------------------------------------------


@pytest.mark.parametrize("hybrid", [False, True], ids=["one_group", "two_groups"])
def test_step_inputs_round_trip_through_one_flat_payload(hybrid):
    """A hybrid model's step (one extra KV-cache group's slots and tables) too."""
    extra: list[tuple[list[int], ...]] = [([7],), ([5, 6, 8],)] if hybrid else [(), ()]
    slices = [SeqSlice([5, 6, 7], 0, [3, 4], True, group_block_ids=extra[0]),
              SeqSlice([9], 12, [1, 2], False, group_block_ids=extra[1])]
    inputs = build_step_inputs(slices, BLOCK, CPU)
    sizes, flat = pack(inputs)
    assert sizes == ([4, 2, 2, 1, 1, 3] if hybrid else [4, 2, 2, 1, 0, 0])
    assert flat.numel() * 8 == payload_bytes(*sizes)
    back = unpack(sizes, flat.clone())
    assert back.num_kv_groups == inputs.num_kv_groups == (2 if hybrid else 1)
    for a, b in zip(inputs.tensors(), back.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if hybrid:
        assert back.group_slot_mapping is not None and back.group_slot_mapping.tolist() == [[56, 57, 58, 52]]


# ---- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tp2_logits_match_one_rank_for_every_architecture(arch, tmp_path):
    write_tiny_checkpoint(arch, tmp_path)
    ex = _compare_with_local(tmp_path, 2)
    pids = ex.rank_pids
    ex.shutdown()
    _assert_all_gone(pids)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tp4_with_more_ranks_than_kv_heads_replicates_them_and_matches_one_rank(arch, tmp_path):
    write_tiny_checkpoint(arch, tmp_path)  # 4 query heads, 2 KV heads: each KV head lives on 2 ranks
    ex = _compare_with_local(tmp_path, 4)
    try:
        counts = ex.parameter_counts()
    finally:
        ex.shutdown()
    qkv = [c["layers.0.self_attn.qkv_proj.weight"] for c in counts]
    head_dim = 32 if arch == "qwen3" else 16
    assert qkv == [(1 + 2 * 1) * head_dim * 64] * 4  # one query head and one (replicated) KV head each


def test_each_rank_holds_one_tp_th_of_every_sharded_weight_with_padded_tied_vocab_at_tp3(tmp_path):
    # 6 heads, 3 KV heads, a vocabulary of 385 (not a multiple of 3) and tied embeddings.
    write_tiny_checkpoint("tied", tmp_path, num_attention_heads=6, num_key_value_heads=3, hidden_size=96,
                          intermediate_size=192, vocab_size=385)
    local = LocalExecutor(_spec(tmp_path), _config(1), show_progress=False)
    full = {n: p.numel() for n, p in local.model.named_parameters()}
    ex = _compare_with_local(tmp_path, 3, num_steps=3)
    try:
        counts = ex.parameter_counts()
    finally:
        ex.shutdown()
    assert len(counts) == 3 and all(c.keys() == full.keys() for c in counts)
    replicated = {n for n in full if "norm" in n}
    for name, total in full.items():
        per_rank = [c[name] for c in counts]
        if name in replicated:
            assert per_rank == [total] * 3, name
        elif name == "embed_tokens.weight":  # padded to 387 rows, 129 per rank
            assert per_rank == [129 * 96] * 3
        else:
            assert per_rank == [total // 3] * 3, name
    assert "lm_head.weight" not in full  # tied: one tensor, shared by embedding and head


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, tp, message", [
    ({}, 3, "num_attention_heads 4"),
    ({"num_attention_heads": 8, "num_key_value_heads": 6, "hidden_size": 64}, 4, "num_key_value_heads 6"),
    ({"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 100}, 8, "intermediate_size 100"),
])
def test_head_counts_that_do_not_split_fail_before_any_process_starts(tmp_path, overrides, tp, message):
    write_tiny_checkpoint("llama", tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        TensorParallelExecutor(_spec(tmp_path), _config(tp), show_progress=False)
    assert multiprocessing.active_children() == []


# ---- failures ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    write_tiny_checkpoint("llama", tmp_path)
    return tmp_path


def test_rank_killed_mid_generation_fails_the_step_within_seconds(tiny_llama):
    spec = _spec(tiny_llama)
    ex = TensorParallelExecutor(spec, _config(4), show_progress=False)
    pids = ex.rank_pids
    steps = _Steps(spec.model_config.vocab_size)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pids[0], signal.SIGKILL)

    try:
        steps.advance(ex.execute(steps.inputs()))
        threading.Timer(0.3, kill).start()
        with pytest.raises(TensorParallelError, match=rf"rank 1 \(pid {pids[0]}\) died: killed by signal 9"):
            for _ in range(10_000):  # decode until the kill lands inside or between steps
                steps.advance(ex.execute(steps.inputs()))
        assert time.monotonic() - killed_at[0] < 20
        with pytest.raises(TensorParallelError, match="rank 1"):
            ex.check_health()
        with pytest.raises(TensorParallelError, match="rank 1"):
            ex.execute(steps.inputs())
    finally:
        ex.shutdown()
    _assert_all_gone(pids)


def test_exception_inside_a_ranks_forward_fails_the_step_naming_rank_and_cause(tiny_llama):
    spec = _spec(tiny_llama)
    ex = TensorParallelExecutor(spec, _config(2, fault_injection={"rank": 1, "step": 2}), show_progress=False)
    pids = ex.rank_pids
    steps = _Steps(spec.model_config.vocab_size)
    try:
        for _ in range(2):
            steps.advance(ex.execute(steps.inputs()))
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match="rank 1 failed: InjectedFault: fault injected into rank 1 at step 2"):
            ex.execute(steps.inputs())
        assert time.monotonic() - t0 < 20
        with pytest.raises(TensorParallelError, match="InjectedFault"):
            ex.check_health()
    finally:
        ex.shutdown()
    _assert_all_gone(pids)


def test_rank_killed_while_idle_makes_the_executor_unhealthy(tiny_llama):
    ex = TensorParallelExecutor(_spec(tiny_llama), _config(2), show_progress=False)
    pids = ex.rank_pids
    try:
        ex.check_health()
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        with pytest.raises(TensorParallelError, match="rank 1 .* died"):
            while time.monotonic() < deadline:
                ex.check_health()
                time.sleep(0.05)
    finally:
        ex.shutdown()
    _assert_all_gone(pids)


def test_ranks_wait_for_the_next_step_longer_than_the_collective_timeout(tiny_llama):
    spec = _spec(tiny_llama)
    ex = TensorParallelExecutor(spec, _config(2, tp_timeout_s=1.5), show_progress=False)
    pids = ex.rank_pids
    steps = _Steps(spec.model_config.vocab_size)
    try:
        steps.advance(ex.execute(steps.inputs()))
        time.sleep(2.5)  # idle past the deadline of a collective
        steps.advance(ex.execute(steps.inputs()))
        ex.check_health()
    finally:
        ex.shutdown()
    _assert_all_gone(pids)
    with pytest.raises(TensorParallelError, match="shut down"):
        ex.check_health()


def test_a_shut_down_group_leaves_the_process_free_to_start_another(tiny_llama):
    spec = _spec(tiny_llama)
    first = TensorParallelExecutor(spec, _config(2), show_progress=False)
    first.shutdown()
    second = TensorParallelExecutor(spec, _config(2), show_progress=False)
    try:
        second.execute(_Steps(spec.model_config.vocab_size).inputs())
    finally:
        second.shutdown()


# ---- through the engine -----------------------------------------------------------------------


def _engine(directory: Path, tp: int, **kw):
    from shardline.worker.engine.engine import LLMEngine

    cfg = dict(model=str(directory), device="cpu", dtype="float32", tensor_parallel_size=tp, num_kv_blocks=256,
               block_size=BLOCK, max_num_batched_tokens=256, max_num_seqs=16)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False)


def _greedy(n: int = 10):
    from shardline.worker.engine.params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _workload() -> list[list[int]]:
    base = prompts(1, seed=14, min_len=37, max_len=37)[0]
    batch = prompts(8, seed=12, max_len=40)
    return batch + [base, list(base), base[:21] + batch[0][:9], base[:24]]  # repeated and shared prefixes


def _run(engine, batch) -> list[list[int]]:
    try:
        engine.generate(batch[-4:-3], _greedy())  # cache the base prompt first
        return [r.token_ids for r in engine.generate(batch, _greedy())]
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def tiny_engine_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp-engine")
    write_tiny_checkpoint("llama", d, seed=7)
    batch = _workload()
    return d, batch, _run(_engine(d, 1, num_kv_blocks=14), batch)


@pytest.mark.parametrize("tp", [2, 4])
def test_engine_greedy_tokens_with_prefix_hits_and_preemption_equal_one_rank(tiny_engine_model, tp):
    d, batch, want = tiny_engine_model
    engine = _engine(d, tp, num_kv_blocks=14)  # 112 token slots for 12 requests of up to 50 tokens
    pids = engine.executor.rank_pids
    try:
        got = _run(engine, batch)
        assert engine.scheduler.num_preemptions_total > 0
        assert engine.block_manager.prefix_cache_hits > 0
    finally:
        engine.shutdown()
    assert got == want
    _assert_all_gone(pids)


def test_rank_failure_ends_every_stream_in_flight_with_an_error(tiny_engine_model):
    import asyncio

    from shardline.worker.engine.async_engine import AsyncEngine, EngineDeadError

    d, batch, _ = tiny_engine_model
    aeng = AsyncEngine(_engine(d, 2, extra={"fault_injection": {"rank": 1, "step": 3}}))
    pids = aeng.engine.executor.rank_pids

    async def run():
        async def last(p):
            out = None
            async for out in aeng.generate(p, _greedy(50)):
                pass
            return out

        return await asyncio.wait_for(asyncio.gather(*(last(p) for p in batch[:4])), timeout=20)

    try:
        finals = asyncio.run(run())
        assert [o.finish_reason for o in finals] == ["error"] * 4
        assert all("rank 1 failed: InjectedFault" in o.error for o in finals)
        with pytest.raises(EngineDeadError, match="rank 1"):
            aeng.check_health()
    finally:
        aeng.shutdown()
    _assert_all_gone(pids)


@pytest.mark.slow
def test_default_model_at_tp3_answers_like_one_rank():
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    results = []
    for tp in (1, 3):
        from shardline.worker.engine.engine import LLMEngine

        engine = LLMEngine(EngineConfig(model="smollm2-135m", device="cpu", tensor_parallel_size=tp, num_kv_blocks=64),
                           show_progress=False)
        try:
            results.append(engine.generate([chat], _greedy(24))[0])
        finally:
            engine.shutdown()
    assert results[1].token_ids == results[0].token_ids
    assert "Paris" in results[0].text
