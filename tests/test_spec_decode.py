"""Speculative decoding keeps the target's output exactly: greedy tokens equal decoding without
speculation and transformers' with every proposer (and under preemption, chunked prefill, prefix
hits, stops and max_tokens inside an accepted run, logprobs, penalties); sampled tokens follow the
target's distribution (the rejection sampler against its formula, the engine against transformers'
exact probabilities); every KV block is free at the end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shardline.metrics import EngineMetrics
from shardline.worker.config import ConfigError, EngineConfig, speculative_fields_from_json
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import SamplingParams
from shardline.worker.engine.sampler import SamplingBatch
from shardline.worker.spec_decode.ngram import ngram_lookup
from shardline.worker.spec_decode.rejection_sampler import DraftTokens, RejectionSampler
from engine_checks import assert_all_blocks_free, wait_until_idle
from tiny_models import hf_greedy, make_hf_model, prompts, write_tiny_checkpoint

N_NEW = 16


# ---- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The target (tiny Llama, seed 7), a different-weights draft of the same shape, and transformers."""
    d = tmp_path_factory.mktemp("spec-target")
    hf = write_tiny_checkpoint("llama", d, seed=7)
    draft = tmp_path_factory.mktemp("spec-draft")
    write_tiny_checkpoint("llama", draft, seed=8, num_hidden_layers=1)
    return d, draft, hf


def make_engine(directory, **kw) -> LLMEngine:
    cfg = dict(model=str(directory), num_kv_blocks=256, block_size=8, max_num_batched_tokens=512, max_num_seqs=32)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False)


def spec_kwargs(tiny, method: str, k: int = 4) -> dict:
    d, draft, _ = tiny
    kw: dict = dict(speculative_method=method, num_speculative_tokens=k)
    if method == "draft_model":
        kw["speculative_model"] = str(draft)
    elif method == "draft_model_self":  # the target as its own draft: every greedy proposal is accepted
        kw.update(speculative_method="draft_model", speculative_model=str(d))
    elif method == "layer_skip":
        kw["speculative_draft_layers"] = 1
    return kw


def greedy(n: int = N_NEW, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def grounded_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat their own text, so prompt lookup finds matches."""
    return [p + p[:12] + p for p in prompts(n, seed=seed, min_len=6, max_len=20)]



def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 1 - 0.001 (z = 3.09), by Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count >= 5 (the rest pooled), and its df."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


# ---- the rejection sampler alone ---------------------------------------------------------------------


def _batch(rows: int, vocab: int, temperature: float, seeds=None) -> SamplingBatch:
    params = [SamplingParams(temperature=temperature, max_tokens=8) for _ in range(rows)]
    return SamplingBatch.build(params, [None] * rows, [[3]] * rows, [[]] * rows, vocab, torch.device("cpu"))


def test_greedy_verification_keeps_the_argmax_run_and_emits_the_first_mismatch():
    vocab = 8
    # Request 0: proposals [5, 6, 7], argmaxes [5, 6, 1, 4] -> accepts 2, emits 1.
    # Request 1: proposals [2], argmaxes [2, 3] -> accepts all, bonus 3. Request 2: no proposal, argmax 0.
    argmax = [5, 6, 1, 4, 2, 3, 0]
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), vocab).float() * 5
    drafts = DraftTokens([3, 1, 0], [5, 6, 7, 2])
    out = RejectionSampler()(logits, _batch(7, vocab, 0.0), drafts, [None] * 3)
    counts = out.num_tokens.tolist()
    assert counts == [3, 2, 1]
    assert [row[:n] for row, n in zip(out.token_ids.tolist(), counts)] == [[5, 6, 1], [2, 3], [0]]


@pytest.mark.parametrize("draft_kind", ["one_hot", "distribution"])
def test_first_token_follows_the_target_distribution_and_acceptance_follows_the_formula(draft_kind):
    """For d ~ q: P(accept) = sum_x min(p(x), q(x)) and the first emitted token is distributed as p."""
    vocab, k, n = 6, 2, 30000
    g = torch.Generator().manual_seed(0)
    target_logits = torch.randn(k + 1, vocab, generator=g) * 1.5
    p = torch.softmax(target_logits, dim=-1)
    if draft_kind == "one_hot":  # a deterministic proposer: always propose token 1, then 4
        q = torch.zeros(k, vocab)
        q[0, 1] = q[1, 4] = 1.0
    else:
        q = torch.softmax(torch.randn(k, vocab, generator=g), dim=-1)
    drawn = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(k)], dim=1)
    logits = target_logits.repeat(n, 1)  # request after request, k + 1 rows each
    drafts = DraftTokens([k] * n, drawn.reshape(-1).tolist(), q.repeat(n, 1) if draft_kind != "one_hot" else None)
    sampler = RejectionSampler(torch.Generator().manual_seed(1))
    out = sampler(logits, _batch(n * (k + 1), vocab, 1.0), drafts, [None] * n)
    first = out.token_ids[:, 0].numpy()
    stat, df = chi2(np.bincount(first, minlength=vocab), p[0].double().numpy())
    assert stat < chi2_critical(df), (stat, df)
    accepted0 = (out.num_tokens > 1).double().mean().item()
    want = torch.minimum(p[0], q[0]).sum().item()
    assert abs(accepted0 - want) < 4 * math.sqrt(want * (1 - want) / n) + 1e-9
    # Given an accepted first proposal, the second emitted token is distributed as p_1.
    second = out.token_ids[out.num_tokens > 1, 1].numpy()
    stat, df = chi2(np.bincount(second, minlength=vocab), p[1].double().numpy())
    assert stat < chi2_critical(df), (stat, df)


def test_seeded_requests_verify_the_same_way_whatever_the_batch():
    vocab = 10
    logits = torch.randn(3, vocab)
    drafts = DraftTokens([2], [3, 4])

    def run(extra_rows: int) -> list[int]:
        full = torch.cat([torch.randn(extra_rows, vocab), logits]) if extra_rows else logits
        d = DraftTokens([0] * extra_rows + [2], [3, 4])
        gens = [None] * extra_rows + [torch.Generator().manual_seed(42)]
        out = RejectionSampler()(full, _batch(extra_rows + 3, vocab, 0.8), d, gens)
        return out.token_ids[-1, : int(out.num_tokens[-1])].tolist()

    assert run(0) == run(2) == run(5)
    assert drafts.row_offsets == [0]


# ---- scheduling and rollback, without a model ----------------------------------------------------------


def test_a_proposal_is_cut_to_max_tokens_and_rolled_back_to_the_accepted_tokens():
    from shardline.worker.engine.block_manager import BlockManager
    from shardline.worker.engine.request import Request
    from shardline.worker.engine.scheduler import Scheduler

    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(EngineConfig(max_num_batched_tokens=64, speculative_method="ngram", num_speculative_tokens=8),
                      bm, max_model_len=64)
    req = Request("r", [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=6))
    sched.add_request(req)
    sched.update_after_step(sched.schedule(), {"r": 11})  # prefill: 6 computed, 7 tokens known
    req.spec_token_ids = [12, 13, 14, 15, 16, 17, 18]
    out = sched.schedule()
    [entry] = out.scheduled
    assert entry.spec_token_ids == [12, 13, 14, 15]  # 1 output so far + 4 accepted + 1 bonus = max_tokens 6
    assert entry.num_new_tokens == 5 and entry.samples and len(req.block_ids) == 3  # 6 + 5 = 11 slots
    sched.advance(out)
    assert req.num_computed_tokens == 11
    req.resolve_pending_token(12)  # the target accepts d_0 and draws its own token next
    req.append_output_token(99)
    sched.rollback_speculation(req)
    assert req.num_computed_tokens == 8 and req.num_known_tokens == 9  # KV of 5..12; 99's is next
    assert len(req.block_ids) == 3 and bm.num_free_blocks == 5
    assert bm.num_cached_blocks == 2  # the two verified full blocks [5..8], [9, 10, 11, 12]
    req.spec_token_ids = [1, 2, 3]
    sched.rollback_speculation(req)
    assert req.spec_token_ids == [] and req.num_computed_tokens == 8
    req.output_token_ids = req.output_token_ids[:1]
    sched.rollback_speculation(req)  # fewer known tokens: blocks past them are freed
    assert req.num_computed_tokens == 6 and len(req.block_ids) == 2 and bm.num_free_blocks == 6
    sched.finish_request(req, "stop")
    assert bm.num_free_blocks == 8


# ---- proposers and config ---------------------------------------------------------------------------


def test_ngram_lookup_takes_the_longest_then_most_recent_match():
    t = np.array([1, 2, 3, 9, 2, 3, 8, 7, 1, 2, 3], dtype=np.int64)
    assert ngram_lookup(t, 1, 3, 3) == [9, 2, 3]  # "1 2 3" recurs at 0: the 3-gram wins over "2 3" at 4
    assert ngram_lookup(t, 1, 2, 2) == [8, 7]  # "2 3" most recently at 4
    assert ngram_lookup(np.array([5, 6, 7], dtype=np.int64), 1, 3, 4) == []


def test_speculative_settings_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        EngineConfig(speculative_method="ngram")
    with pytest.raises(ConfigError, match="speculative_method"):
        EngineConfig(speculative_method="eagle", num_speculative_tokens=2)
    with pytest.raises(ConfigError, match="speculative_model"):
        EngineConfig(speculative_method="draft_model", num_speculative_tokens=2)
    with pytest.raises(ConfigError, match="prompt_lookup_min"):
        EngineConfig(speculative_method="ngram", num_speculative_tokens=2, prompt_lookup_min=4, prompt_lookup_max=2)
    with pytest.raises(ConfigError, match="speculative_draft_layers"):
        EngineConfig(speculative_method="layer_skip", num_speculative_tokens=2)
    with pytest.raises(ConfigError, match="unknown key"):
        speculative_fields_from_json('{"method": "ngram", "num_tokens": 3}')
    cfg = EngineConfig(**speculative_fields_from_json('{"method": "ngram", "num_speculative_tokens": 3, '
                                                      '"prompt_lookup_max": 4}'), async_scheduling=True)
    assert (cfg.speculative_method, cfg.num_speculative_tokens, cfg.prompt_lookup_max) == ("ngram", 3, 4)
    assert cfg.resolved_async_scheduling() is False  # speculation runs without overlap


def test_a_draft_with_another_vocabulary_is_refused(tiny, tmp_path):
    d, _, _ = tiny
    write_tiny_checkpoint("llama", tmp_path, seed=3, vocab_size=200)
    with pytest.raises(ConfigError, match="vocab_size"):
        make_engine(d, speculative_method="draft_model", num_speculative_tokens=2, speculative_model=str(tmp_path))


# ---- greedy: exactly the tokens without speculation --------------------------------------------------


@pytest.mark.parametrize("method", ["ngram", "draft_model", "draft_model_self", "layer_skip"])
def test_greedy_tokens_with_each_proposer_equal_no_speculation_and_transformers(tiny, method):
    d, _, hf = tiny
    batch = grounded_prompts(6, seed=21)
    want = [r.token_ids for r in make_engine(d).generate(batch, greedy())]
    assert want == [hf_greedy(hf, p, N_NEW) for p in batch]
    engine = make_engine(d, **spec_kwargs(tiny, method))
    results = engine.generate(batch, greedy())
    assert [r.token_ids for r in results] == want
    assert all(r.finish_reason == "length" and r.completion_tokens == N_NEW for r in results)
    stats = engine.stats()
    assert stats["spec_decode_num_draft_tokens"] > 0
    if method == "draft_model_self":
        assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"]
        assert engine.num_steps < 6 + N_NEW  # several tokens per step
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("regime", ["preemption", "chunked_prefill", "prefix_hits"])
@pytest.mark.parametrize("method", ["ngram", "draft_model_self"])
def test_greedy_tokens_under_scheduling_regimes_equal_transformers(tiny, method, regime):
    d, _, hf = tiny
    batch = grounded_prompts(8, seed=22)
    overrides = {"preemption": dict(num_kv_blocks=20), "chunked_prefill": dict(max_num_batched_tokens=16),
                 "prefix_hits": {}}[regime]
    engine = make_engine(d, **spec_kwargs(tiny, method), **overrides)
    if regime == "prefix_hits":
        engine.generate(batch[:2], greedy())  # their prompt and output blocks are cached now
        batch = batch[:2] + [p[:20] + batch[2][:5] for p in batch[:2]] + batch[2:]
    results = engine.generate(batch, greedy())
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, N_NEW) for p in batch]
    if regime == "preemption":
        assert engine.scheduler.num_preemptions_total > 0
    if regime == "prefix_hits":
        assert engine.block_manager.prefix_cache_hits > 0
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert_all_blocks_free(engine)


def test_max_tokens_inside_an_accepted_run_ends_there(tiny):
    d, _, hf = tiny
    prompt = grounded_prompts(1, seed=23)[0]
    want = hf_greedy(hf, prompt, 12)
    engine = make_engine(d, **spec_kwargs(tiny, "draft_model_self", k=5))
    results = engine.generate([prompt] * 8, [greedy(n) for n in range(1, 9)])
    for n, r in zip(range(1, 9), results):
        assert r.token_ids == want[:n] and r.completion_tokens == n and r.finish_reason == "length"
    assert_all_blocks_free(engine)


def test_stop_ids_and_min_tokens_inside_an_accepted_run_end_where_decoding_would(tiny):
    d, _, hf = tiny
    prompt = grounded_prompts(1, seed=24)[0]
    ref = hf_greedy(hf, prompt, N_NEW)
    stop = ref[5]
    cut = ref.index(stop) + 1
    cases = [SamplingParams(max_tokens=N_NEW, temperature=0.0, stop_token_ids=[stop]),
             SamplingParams(max_tokens=N_NEW, temperature=0.0, stop_token_ids=[stop], min_tokens=cut + 1)]
    want = make_engine(d).generate([prompt] * 2, cases)
    engine = make_engine(d, **spec_kwargs(tiny, "draft_model_self", k=6))
    got = engine.generate([prompt] * 2, cases)
    assert got[0].token_ids == ref[:cut] and got[0].finish_reason == "stop"
    assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in want]
    assert_all_blocks_free(engine)


def test_logprobs_and_penalties_of_accepted_tokens_equal_decoding_without_speculation(tiny):
    d, _, _ = tiny
    batch = grounded_prompts(3, seed=25)
    params = [greedy(logprobs=3), greedy(repetition_penalty=1.3, logprobs=0),
              greedy(frequency_penalty=0.6, presence_penalty=0.4, logprobs=2)]
    want = make_engine(d).generate(batch, params)
    engine = make_engine(d, **spec_kwargs(tiny, "draft_model_self"))
    got = engine.generate(batch, params)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert len(g.logprobs) == len(w.logprobs) == N_NEW
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.token_id == b.token_id and a.top.keys() == b.top.keys()
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert_all_blocks_free(engine)


def test_no_proposals_while_the_batch_is_at_the_disable_size(tiny):
    d, _, hf = tiny
    batch = grounded_prompts(3, seed=30)
    engine = make_engine(d, speculative_disable_by_batch_size=3, **spec_kwargs(tiny, "draft_model_self"))
    results = engine.generate(batch, [greedy(8), greedy(8), greedy(14)])
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, n) for p, n in zip(batch, (8, 8, 14))]
    stats = engine.stats()
    # Proposals start only once the two short requests are done (3 running -> 1).
    assert 0 < stats["spec_decode_num_drafts"] <= 5
    assert_all_blocks_free(engine)


def test_async_engine_streams_several_tokens_per_delta_and_cancels(tiny):
    import asyncio

    from shardline.worker.engine.async_engine import AsyncEngine

    d, _, hf = tiny
    aeng = AsyncEngine(make_engine(d, **spec_kwargs(tiny, "draft_model_self")))
    batch = grounded_prompts(3, seed=31)

    async def run():
        async def collect(p):
            deltas = [out.new_token_ids async for out in aeng.generate(p, greedy())]
            return [t for delta in deltas for t in delta], max(len(delta) for delta in deltas)

        async def cancel_early(p):
            async for _ in aeng.generate(p, greedy(200)):
                break  # leaving the stream aborts the request

        results = await asyncio.gather(*(collect(p) for p in batch), cancel_early(batch[0]))
        return results[:-1]

    try:
        results = asyncio.run(run())
        assert [tokens for tokens, _ in results] == [hf_greedy(hf, p, N_NEW) for p in batch]
        assert max(widest for _, widest in results) > 1
        wait_until_idle(aeng)
        assert_all_blocks_free(aeng.engine)
    finally:
        aeng.shutdown()


def test_abort_mid_speculation_frees_target_and_draft_blocks(tiny):
    d, _, hf = tiny
    engine = make_engine(d, **spec_kwargs(tiny, "draft_model"))
    batch = grounded_prompts(3, seed=26)
    ids = [engine.add_request(p, greedy(40)) for p in batch]
    for _ in range(3):
        engine.step()
    engine.abort_request(ids[1])
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert ids[1] not in done or len(done[ids[1]]) < 40
    assert_all_blocks_free(engine)


# ---- sampled: the target's distribution -------------------------------------------------------------


def test_sampled_tokens_follow_the_targets_distribution_and_seeds_repeat(tmp_path):
    """A 12-token vocabulary, 3000 seeded requests of one prompt, a draft with other weights: the
    second and third generated tokens (the first verified ones) match transformers' exact marginals."""
    target_dir, draft_dir = tmp_path / "t", tmp_path / "d"
    hf = write_tiny_checkpoint("llama", target_dir, seed=5, vocab_size=12)
    write_tiny_checkpoint("llama", draft_dir, seed=6, vocab_size=12, num_hidden_layers=1)
    prompt = [3, 4, 5, 6, 7]
    n = 3000
    engine = make_engine(target_dir, max_num_seqs=n, max_num_batched_tokens=8 * n, num_kv_blocks=4 * n, max_queue_len=n,
                         speculative_method="draft_model", num_speculative_tokens=2, speculative_model=str(draft_dir))
    params = [SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True, seed=i) for i in range(n)]
    tokens = np.array([r.token_ids for r in engine.generate([prompt] * n, params)])
    assert engine.stats()["spec_decode_num_drafts"] > 0
    assert 0 < engine.stats()["spec_decode_acceptance_rate"] < 1

    with torch.no_grad():
        first = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1], -1).double()
        seqs = torch.tensor([prompt + [a] for a in range(12)])
        second_given = torch.softmax(hf(seqs).logits[:, -1], -1).double()  # [a, b]
        seqs3 = torch.tensor([prompt + [a, b] for a in range(12) for b in range(12)])
        third_given = torch.softmax(hf(seqs3).logits[:, -1], -1).double().reshape(12, 12, 12)
    marginal2 = (first[:, None] * second_given).sum(0)
    joint = first[:, None, None] * second_given[:, :, None] * third_given
    marginal3 = joint.sum((0, 1))
    for column, probs in ((1, marginal2), (2, marginal3)):
        stat, df = chi2(np.bincount(tokens[:, column], minlength=12), probs.numpy())
        assert stat < chi2_critical(df), (column, stat, df)
    again = engine.generate([prompt] * 4, params[:4])
    assert [r.token_ids for r in again] == tokens[:4].tolist()
    assert_all_blocks_free(engine)


# ---- metrics and tensor parallelism -----------------------------------------------------------------


def test_metrics_count_drafts_and_accepted_tokens(tiny):
    d, _, _ = tiny
    metrics = EngineMetrics("tiny")
    engine = LLMEngine(EngineConfig(model=str(d), num_kv_blocks=128, block_size=8, **spec_kwargs(tiny, "ngram")),
                       show_progress=False, metrics=metrics)
    engine.generate(grounded_prompts(2, seed=27), greedy())
    text = metrics.exposition().decode()
    stats = engine.stats()

    def value(name: str) -> float:
        line = next(l for l in text.splitlines() if l.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value("shardline:spec_decode_num_draft_tokens_total") == stats["spec_decode_num_draft_tokens"] > 0
    assert value("shardline:spec_decode_num_accepted_tokens_total") == stats["spec_decode_num_accepted_tokens"]
    assert value("shardline:spec_decode_num_drafts_total") == stats["spec_decode_num_drafts"]
    assert 'shardline:spec_decode_num_accepted_tokens_per_pos_total{' in text


@pytest.mark.slow
def test_tensor_parallel_speculation_equals_one_rank(tiny):
    d, _, hf = tiny
    batch = grounded_prompts(4, seed=28)
    engine = make_engine(d, tensor_parallel_size=2, **spec_kwargs(tiny, "draft_model_self"))
    try:
        results = engine.generate(batch, greedy())
        assert [r.token_ids for r in results] == [hf_greedy(hf, p, N_NEW) for p in batch]
        assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
        assert_all_blocks_free(engine)
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_triton_attention_verifies_multi_token_queries_like_transformers(tiny):
    """The Triton paged-attention kernel (through the interpreter here) takes the k + 1 query rows
    of a verification step over the paged cache like the torch reference."""
    d, _, hf = tiny
    batch = grounded_prompts(2, seed=29)
    engine = make_engine(d, attention_backend="triton", **spec_kwargs(tiny, "draft_model_self", k=3))
    results = engine.generate(batch, greedy(8))
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, 8) for p in batch]
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert_all_blocks_free(engine)


@pytest.mark.slow
def test_default_model_copies_a_passage_with_ngram_exactly_and_stops_inside_accepted_runs():
    """SmolLM2-135M copying a passage: n-gram speculation accepts long runs, the text equals the
    engine's without speculation, and a stop string that falls inside an accepted run cuts there."""
    from shardline.bench import GROUNDED_PASSAGE

    prompt = {"messages": [{"role": "user", "content": "Repeat the following passage exactly, word for word.\n\n"
                            + GROUNDED_PASSAGE}]}
    plain = LLMEngine(EngineConfig(model="smollm2-135m", num_kv_blocks=128), show_progress=False)
    [want] = plain.generate([prompt], greedy(32))
    stop = " ".join(want.text.split()[12:14])
    [want_stop] = plain.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, stop=[stop]))
    plain.shutdown()
    engine = LLMEngine(EngineConfig(model="smollm2-135m", num_kv_blocks=128, speculative_method="ngram",
                                    num_speculative_tokens=4), show_progress=False)
    [got] = engine.generate([prompt], greedy(32))
    [got_stop] = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, stop=[stop]))
    assert (got.token_ids, got.text) == (want.token_ids, want.text)
    assert (got_stop.text, got_stop.finish_reason) == (want_stop.text, "stop_string")
    assert stop not in got_stop.text and len(got_stop.text) < len(got.text)
    assert engine.stats()["spec_decode_acceptance_rate"] > 0.5
    assert_all_blocks_free(engine)
    engine.shutdown()
