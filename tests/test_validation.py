"""The shared request validator: every bad field is rejected as invalid_argument, naming the field
and the numbers, and never as a TypeError."""

from __future__ import annotations

import math

import pytest

from shardline.worker.engine.params import RequestError, SamplingParams
from shardline.worker.engine.validation import Limits, validate_request

LIMITS = Limits(max_model_len=100, vocab_size=1000)
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def rejected(prompt=PROMPT, limits=LIMITS, **params) -> RequestError:
    with pytest.raises(RequestError) as info:
        validate_request(prompt, SamplingParams(**params), limits)
    assert info.value.code == "invalid_argument"
    return info.value


def assert_mentions(error: RequestError, field: str, *numbers) -> None:
    assert error.field == field
    for number in numbers:
        assert str(number) in str(error), (number, str(error))


def test_a_valid_request_returns_its_max_tokens():
    assert validate_request(PROMPT, SamplingParams(max_tokens=20), LIMITS) == 20


def test_max_tokens_none_resolves_to_the_rest_of_the_context():
    assert validate_request(PROMPT, SamplingParams(max_tokens=None), LIMITS) == 90


def test_max_tokens_none_is_also_bounded_by_the_kv_cache():
    limits = Limits(max_model_len=100, vocab_size=1000, max_kv_tokens=50)
    assert validate_request(PROMPT, SamplingParams(max_tokens=None), limits) == 40


def test_boundary_values_are_accepted():
    params = SamplingParams(max_tokens=90, temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2.0,
                            frequency_penalty=2.0, min_tokens=90, seed=2**64 - 1, logprobs=20,
                            stop=["x" * 256] * 16, stop_token_ids=[0, 999])
    assert validate_request(PROMPT, params, LIMITS) == 90
    assert validate_request(PROMPT, SamplingParams(seed=-(2**63), top_k=1, logprobs=0), LIMITS) == 16


def test_empty_prompt_is_rejected():
    error = rejected(prompt=[])
    assert error.field == "prompt" and "must not be empty" in str(error)


@pytest.mark.parametrize("token", [-1, 1000, 5000])
def test_prompt_token_outside_the_vocab_is_rejected(token):
    assert_mentions(rejected(prompt=[1, token]), "prompt", token, 1000)


def test_prompt_token_of_the_wrong_type_is_rejected():
    assert_mentions(rejected(prompt=[1, "2"]), "prompt", 1)


def test_prompt_longer_than_the_context_names_both_lengths():
    assert_mentions(rejected(prompt=[1] * 150, max_tokens=None), "prompt", 150, 100)


def test_prompt_filling_the_whole_context_is_rejected():
    assert_mentions(rejected(prompt=[1] * 100, max_tokens=None), "prompt", 100)


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_max_tokens_below_one_is_rejected(max_tokens):
    assert_mentions(rejected(max_tokens=max_tokens), "max_tokens", max_tokens)


def test_max_tokens_overflowing_the_context_names_the_numbers():
    assert_mentions(rejected(max_tokens=95), "max_tokens", 10, 95, 100)


def test_request_larger_than_the_kv_cache_is_rejected():
    limits = Limits(max_model_len=100, vocab_size=1000, max_kv_tokens=50)
    assert_mentions(rejected(limits=limits, max_tokens=60), "max_tokens", 10, 60, 50)


def test_prompt_larger_than_the_kv_cache_is_rejected():
    limits = Limits(max_model_len=100, vocab_size=1000, max_kv_tokens=8)
    assert_mentions(rejected(limits=limits, max_tokens=None), "prompt", 10, 8)


@pytest.mark.parametrize("value", [-0.5, math.inf, math.nan])
def test_temperature_must_be_finite_and_non_negative(value):
    assert_mentions(rejected(temperature=value), "temperature", value)


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_top_p_must_be_in_zero_one(value):
    assert_mentions(rejected(top_p=value), "top_p", value)


def test_top_k_below_minus_one_is_rejected():
    assert_mentions(rejected(top_k=-2), "top_k", -2)


def test_top_k_must_be_an_integer():
    assert_mentions(rejected(top_k=2.5), "top_k", 2.5)


@pytest.mark.parametrize("value", [-0.1, 1.1])
def test_min_p_must_be_in_zero_one(value):
    assert_mentions(rejected(min_p=value), "min_p", value)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf])
def test_repetition_penalty_must_be_positive_and_finite(value):
    assert_mentions(rejected(repetition_penalty=value), "repetition_penalty", value)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [-2.5, 2.5])
def test_presence_and_frequency_penalties_are_bounded(field, value):
    assert_mentions(rejected(**{field: value}), field, value, -2, 2)


def test_min_tokens_must_not_be_negative():
    assert_mentions(rejected(min_tokens=-1), "min_tokens", -1)


def test_min_tokens_must_not_exceed_max_tokens():
    assert_mentions(rejected(min_tokens=30, max_tokens=20), "min_tokens", 30, 20)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_out_of_range_is_rejected(seed):
    assert_mentions(rejected(seed=seed), "seed", seed)


def test_seed_must_be_an_integer():
    assert_mentions(rejected(seed="42"), "seed", "42")


def test_stop_must_be_a_list():
    assert rejected(stop="###").field == "stop"


def test_too_many_stop_strings_are_rejected():
    assert_mentions(rejected(stop=["a"] * 17), "stop", 16, 17)


def test_empty_stop_string_is_rejected():
    assert_mentions(rejected(stop=["ok", ""]), "stop", 1)


def test_overlong_stop_string_is_rejected():
    assert_mentions(rejected(stop=["x" * 300]), "stop", 300, 256)


def test_stop_string_of_the_wrong_type_is_rejected():
    assert_mentions(rejected(stop=[3]), "stop", 0)


@pytest.mark.parametrize("token", [-1, 1000])
def test_stop_token_ids_outside_the_vocab_are_rejected(token):
    assert_mentions(rejected(stop_token_ids=[2, token]), "stop_token_ids", token, 1000)


@pytest.mark.parametrize("value", [-1, 21])
def test_logprobs_out_of_range_is_rejected(value):
    assert_mentions(rejected(logprobs=value), "logprobs", value, 20)


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", "16"), ("max_tokens", 16.0), ("max_tokens", True), ("temperature", "0.7"), ("top_p", None),
     ("min_p", "0"), ("repetition_penalty", [1.1]), ("presence_penalty", "1"), ("min_tokens", "1"),
     ("logprobs", "5"), ("top_k", "5"), ("ignore_eos", "yes"), ("stop_token_ids", "7")],
)
def test_wrong_types_are_request_errors_not_type_errors(field, value):
    assert rejected(**{field: value}).field == field


@pytest.mark.parametrize("bias, numbers", [({1000: 1.0}, [1000]), ({5: 101.0}, [5, 101]),
                                           ({5: float("nan")}, []), ({"5": 1.0}, [5])])
def test_logit_bias_ids_must_be_in_the_vocab_and_biases_in_range(bias, numbers):
    assert_mentions(rejected(logit_bias=bias), "logit_bias", *numbers)


def test_logit_bias_count_is_bounded():
    limits = Limits(max_model_len=LIMITS.max_model_len, vocab_size=LIMITS.vocab_size, max_logit_bias=2)
    assert_mentions(rejected(limits=limits, logit_bias={1: 1.0, 2: 1.0, 3: 1.0}), "logit_bias", 2, 3)


@pytest.mark.parametrize("n", [0, 17])
def test_n_is_bounded(n):
    assert_mentions(rejected(n=n), "n", n, 16)


@pytest.mark.parametrize("token", [1.9, True])
def test_float_or_bool_token_ids_name_the_prompt(token):
    assert_mentions(rejected(prompt=[1, token]), "prompt", 1)


def test_for_choice_gives_each_choice_its_own_seed_stream():
    params = SamplingParams(n=3, seed=10, temperature=0.7)
    assert [p.seed for p in (params.for_choice(i) for i in range(3))] == [10, 11, 12]
    assert params.for_choice(2) == SamplingParams(n=1, seed=12, temperature=0.7)
    assert SamplingParams(n=2).for_choice(1).seed is None
