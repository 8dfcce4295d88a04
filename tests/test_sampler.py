"""The sampler as a specification: greedy, seeded reproducibility across batch compositions,
top-k / top-p / min-p distributions, penalties, min_tokens and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from shardline.worker.engine.params import SamplingParams
from shardline.worker.engine.sampler import Sampler, SamplingBatch, make_generator

CPU = torch.device("cpu")
VOCAB = 8


def build(params, prompts=None, outputs=None, generators=None, vocab=VOCAB, block=None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        generators if generators is not None else [make_generator(p.seed, CPU) for p in params],
        prompts if prompts is not None else [[1, 2]] * n,
        outputs if outputs is not None else [[]] * n,
        vocab,
        CPU,
        min_tokens_block=block,
    )


def frequencies(logits_row: torch.Tensor, params: SamplingParams, draws: int = 20_000) -> torch.Tensor:
    """Empirical distribution of `draws` samples of one row, drawn as one batch of identical rows."""
    sampler = Sampler(torch.Generator().manual_seed(1234))
    logits = logits_row.unsqueeze(0).repeat(draws, 1)
    tokens = sampler(logits, build([params] * draws, vocab=logits_row.numel())).token_ids
    return torch.bincount(tokens, minlength=logits_row.numel()).double() / draws


def assert_close_to(observed: torch.Tensor, expected: torch.Tensor, draws: int = 20_000) -> None:
    """Every token's frequency within 5 standard errors of its expected probability; impossible
    tokens never drawn."""
    for p_obs, p_exp in zip(observed.tolist(), expected.tolist()):
        if p_exp == 0.0:
            assert p_obs == 0.0
        else:
            assert abs(p_obs - p_exp) < 5 * math.sqrt(p_exp * (1 - p_exp) / draws) + 1e-9, (observed, expected)


KNOWN = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, build([SamplingParams(temperature=0.0)] * 4))
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None


def test_greedy_and_random_rows_mix_in_one_batch():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    out = Sampler()(logits, build(params))
    assert out.token_ids[0::2].tolist() == logits[0::2].argmax(dim=-1).tolist()


def test_seeded_request_draws_the_same_tokens_alone_and_in_any_batch():
    vocab = 50
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=20, seed=42)
    others = [SamplingParams(temperature=1.3), SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=7)]
    steps = [torch.randn(vocab, generator=torch.Generator().manual_seed(s)) for s in range(12)]

    def run(position: int, companions: list[SamplingParams]) -> list[int]:
        rows = list(companions)
        rows.insert(position, seeded)
        generators = [make_generator(p.seed, CPU) for p in rows]
        sampler = Sampler()
        tokens = []
        for step_logits in steps:
            noise = torch.randn(len(rows), vocab)
            noise[position] = step_logits
            batch = SamplingBatch.build(rows, generators, [[1]] * len(rows), [[]] * len(rows), vocab, CPU)
            tokens.append(sampler(noise, batch).token_ids[position].item())
        return tokens

    alone = run(0, [])
    assert run(0, others) == alone
    assert run(2, others) == alone
    assert run(1, list(reversed(others))) == alone
    assert run(3, others + others[:1]) == alone
    assert len(set(alone)) > 1  # really sampled, not collapsed to greedy


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(1, 1000)
    a = Sampler()(logits, build([SamplingParams(seed=1)], vocab=1000)).token_ids.item()
    b = Sampler()(logits, build([SamplingParams(seed=2)], vocab=1000)).token_ids.item()
    assert a != b


def test_temperature_one_samples_the_softmax_distribution():
    assert_close_to(frequencies(KNOWN, SamplingParams()), KNOWN.softmax(-1).double())


def test_temperature_sharpens_the_distribution():
    expected = (KNOWN / 0.5).softmax(-1).double()
    assert_close_to(frequencies(KNOWN, SamplingParams(temperature=0.5)), expected)


def test_top_k_samples_only_the_k_best_in_renormalized_proportion():
    observed = frequencies(KNOWN, SamplingParams(top_k=2))
    assert_close_to(observed, torch.tensor([0.4, 0.3, 0, 0, 0], dtype=torch.float64) / 0.7)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # 0.4 + 0.3 = 0.7 < 0.8, so the 0.15 token is needed too: {0.4, 0.3, 0.15}.
    observed = frequencies(KNOWN, SamplingParams(top_p=0.8))
    assert_close_to(observed, torch.tensor([0.4, 0.3, 0.15, 0, 0], dtype=torch.float64) / 0.85)


def test_top_p_smaller_than_the_top_token_keeps_only_it():
    observed = frequencies(KNOWN, SamplingParams(top_p=0.1), draws=2000)
    assert observed.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    # threshold 0.3 * 0.4 = 0.12: the 0.1 and 0.05 tokens go.
    observed = frequencies(KNOWN, SamplingParams(min_p=0.3))
    assert_close_to(observed, torch.tensor([0.4, 0.3, 0.15, 0, 0], dtype=torch.float64) / 0.85)


def test_top_k_then_top_p_compose():
    # top_k=3 leaves {0.4, 0.3, 0.15} renormalized to {.47, .35, .18}; top_p=0.8 then keeps {.47, .35}.
    observed = frequencies(KNOWN, SamplingParams(top_k=3, top_p=0.8))
    assert_close_to(observed, torch.tensor([0.4, 0.3, 0, 0, 0], dtype=torch.float64) / 0.7)


def test_filters_apply_per_row():
    logits = KNOWN.unsqueeze(0).repeat(2000, 1)
    params = [SamplingParams(top_k=1) if i % 2 else SamplingParams() for i in range(2000)]
    tokens = Sampler(torch.Generator().manual_seed(3))(logits, build(params, vocab=5)).token_ids
    assert set(tokens[1::2].tolist()) == {0}
    assert len(set(tokens[0::2].tolist())) == 5


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 1.0, 0.5]])
    batch = build([SamplingParams(repetition_penalty=2.0, temperature=0.0, logprobs=0)],
                  prompts=[[0, 1]], outputs=[[3]], vocab=6)
    expected = torch.tensor([[1.0, -2.0, 3.0, -4.0, 1.0, 0.5]])  # tokens 0, 1 (prompt), 3 (output)
    out = Sampler()(logits, batch)
    assert out.token_ids.item() == 2
    assert out.logprobs[0].logprob == pytest.approx(torch.log_softmax(expected, -1)[0, 2].item(), abs=1e-6)


def test_frequency_and_presence_penalties_follow_openai_semantics():
    from shardline.worker.engine.sampler import apply_penalties

    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    batch = build([SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)],
                  prompts=[[0, 0, 0]], outputs=[[1, 1, 1, 2]], vocab=4)
    # token 0 only in the prompt: untouched; token 1 three times: 1 - 3*0.5 - 0.25; token 2 once.
    expected = torch.tensor([[1.0, 1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0]])
    assert torch.allclose(apply_penalties(logits, batch), expected)


def test_penalties_apply_only_to_rows_that_ask():
    from shardline.worker.engine.sampler import apply_penalties

    logits = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    batch = build([SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), SamplingParams()],
                  prompts=[[0], [0]], outputs=[[1], [1]], vocab=2)
    assert apply_penalties(logits, batch).tolist() == [[0.5, -0.5], [1.0, 1.0]]


def test_min_tokens_masks_eos_until_enough_tokens():
    eos = 3
    logits = torch.full((2, VOCAB), -5.0)
    logits[:, eos] = 10.0
    params = [SamplingParams(temperature=0.0, min_tokens=2)] * 2
    batch = build(params, outputs=[[5], [5, 6]], block=[[eos], [eos]])
    tokens = Sampler()(logits, batch).token_ids.tolist()
    assert tokens[0] != eos  # one output so far: EOS still forbidden
    assert tokens[1] == eos  # two outputs: min_tokens reached


def test_min_tokens_masks_stop_token_ids_in_random_rows_too():
    logits = torch.zeros(500, 4)
    batch = build([SamplingParams(min_tokens=1)] * 500, vocab=4, block=[[0, 2]] * 500)
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, batch).token_ids
    assert set(tokens.tolist()) == {1, 3}


def test_logprobs_top_n_are_the_largest_and_sampled_logprob_matches_log_softmax():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(logprobs=4, temperature=0.8, seed=1), SamplingParams(), SamplingParams(logprobs=0)]
    out = Sampler()(logits, build(params, vocab=20))
    reference = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    assert out.logprobs[2].top == {}
    for row in (0, 2):
        entry = out.logprobs[row]
        token = out.token_ids[row].item()
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(reference[row, token].item(), abs=1e-5)
    values, indices = reference[0].topk(4)
    assert list(out.logprobs[0].top) == indices.tolist()
    assert list(out.logprobs[0].top.values()) == pytest.approx(values.tolist(), abs=1e-5)


def test_logits_past_the_vocab_are_ignored():
    logits = torch.zeros(1, VOCAB + 4)
    logits[0, VOCAB + 1] = 100.0  # padding column of a padded LM head
    out = Sampler()(logits, build([SamplingParams(temperature=0.0)]))
    assert out.token_ids.item() < VOCAB


def test_make_generator_accepts_the_whole_seed_range():
    assert make_generator(None, CPU) is None
    for seed in (-(2**63), -1, 0, 2**64 - 1):
        a, b = make_generator(seed, CPU), make_generator(seed, CPU)
        assert torch.rand(3, generator=a).tolist() == torch.rand(3, generator=b).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_sampling_works_on_cuda():
    device = torch.device("cuda")
    params = [SamplingParams(seed=3, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2, logprobs=2),
              SamplingParams(temperature=0.0)]
    logits = torch.randn(2, 64, device=device)

    def once(rows):
        gens = [make_generator(p.seed, device) for p in rows]
        batch = SamplingBatch.build(rows, gens, [[1, 2]] * len(rows), [[3]] * len(rows), 64, device)
        return Sampler()(logits[: len(rows)], batch)

    assert once(params).token_ids[0].item() == once(params[:1]).token_ids[0].item()
    assert once(params).token_ids[1].item() == logits[1].argmax().item()


def test_a_pending_token_counts_in_the_penalties_like_a_read_one():
    """Overlapped scheduling passes the in-flight token on the device; the penalties must see it
    exactly as if it were already in the row's output list."""
    from shardline.worker.engine.sampler import apply_penalties

    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.2),
              SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.2)]
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 1.5], [0.3, 1.0, -2.0, 0.0, 2.5, 1.0]])
    read = SamplingBatch.build(params, [None, None], [[0], [1]], [[2, 3], [4]], 6, CPU)
    pending = SamplingBatch.build(params, [None, None], [[0], [1]], [[2], [4]], 6, CPU,
                                  pending_token_ids=torch.tensor([3, -1]))
    assert torch.equal(apply_penalties(logits, pending), apply_penalties(logits, read))


def test_logit_bias_bans_and_boosts_per_row_before_the_penalties():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0, 0, 0, 0]] * 3)
    params = [SamplingParams(temperature=0.0, logit_bias={0: -100.0}),  # ban the greedy token
              SamplingParams(temperature=0.0, logit_bias={5: 10.0}),  # boost another
              SamplingParams(temperature=0.0)]  # untouched
    batch = build(params)
    assert batch.logit_bias is not None and batch.logit_bias[0].tolist() == [0, 1]
    out = Sampler()(logits.clone(), batch)
    assert out.token_ids.tolist() == [1, 5, 0]


def test_logit_bias_shapes_the_logprobs_and_leaves_the_input_logits_alone():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    original = logits.clone()
    params = SamplingParams(temperature=0.0, logprobs=0, logit_bias={2: 1.5, 4: -0.5})
    out = Sampler()(logits, build([params]))
    biased = original.clone()
    biased[0, 2] += 1.5
    biased[0, 4] -= 0.5
    assert torch.equal(logits, original)
    assert out.token_ids.tolist() == biased.argmax(dim=-1).tolist()
    [lp] = out.logprobs
    assert lp.logprob == pytest.approx(torch.log_softmax(biased, -1)[0, lp.token_id].item(), abs=1e-6)


def test_a_batch_without_logit_bias_builds_no_bias_tensors():
    assert build([SamplingParams(), SamplingParams(temperature=0.0)]).logit_bias is None
