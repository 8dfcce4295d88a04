"""Incremental detokenization on the default model's real tokenizer: deltas add up to the full
decode, never split a character, and stop strings are cut even when they span tokens."""

from __future__ import annotations

import random

import pytest

from shardline.worker.engine.detokenizer import IncrementalDetokenizer
from shardline.worker.engine.params import SamplingParams


TEXTS = [
    "Héllo wörld, naïve café — déjà vu.",
    "日本語のテキストと中文字符混在。",
    "Party 🎉🚀👩‍👩‍👧 time! ¿Qué tal? Ça va.",
    "Mixed: Ωμέγα, Привет, مرحبا, 한국어 ok",
]


class HFTokenizer:
    """The two members the detokenizer uses, over a transformers tokenizer."""

    def __init__(self, hf) -> None:
        self.hf = hf

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer) -> HFTokenizer:
    return HFTokenizer(smollm2_tokenizer.hf)


def stream(tokenizer, output_ids, params=None, prompt="Say something:"):
    """Feed output ids one at a time; return the deltas, the stop string and the flushed tail."""
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), params or SamplingParams())
    deltas, stop = [], None
    for token in output_ids:
        delta, stop = detok.step([token])
        deltas.append(delta)
        if stop is not None:
            break
    tail = detok.flush() if stop is None else ""
    return detok, deltas, stop, tail


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode_one_token_at_a_time(tokenizer, text):
    ids = tokenizer.encode(text)
    detok, deltas, stop, tail = stream(tokenizer, ids)
    assert stop is None
    assert "".join(deltas) + tail == tokenizer.decode(ids) == text
    assert detok.output_text == text


@pytest.mark.parametrize("text", TEXTS[1:])
def test_no_delta_contains_a_replacement_character(tokenizer, text):
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # the text really splits characters
    _, deltas, _, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)


def test_several_tokens_in_one_step_give_the_same_text(tokenizer):
    ids = tokenizer.encode(TEXTS[2])
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi"), SamplingParams())
    out = "".join(detok.step(ids[i : i + 3])[0] for i in range(0, len(ids), 3)) + detok.flush()
    assert out == TEXTS[2]


def test_first_delta_joins_the_prompt_like_a_full_decode(tokenizer):
    prompt = tokenizer.encode("The answer is")
    output = tokenizer.encode(" forty two")
    _, deltas, _, tail = stream(tokenizer, output, prompt="The answer is")
    full = tokenizer.decode(prompt + output)
    assert full.endswith("".join(deltas) + tail)
    assert "".join(deltas) + tail == " forty two"


def test_special_tokens_are_skipped_or_kept_as_asked(tokenizer):
    eos = tokenizer.hf.eos_token_id
    ids = tokenizer.encode("Done.") + [eos]
    _, deltas, _, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == "Done."
    _, deltas, _, tail = stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(deltas) + tail == "Done." + tokenizer.hf.eos_token


def test_trailing_incomplete_character_is_flushed_as_the_full_decode_shows_it(tokenizer):
    ids = tokenizer.encode("ok 🎉")
    partial = ids[:-1]  # the emoji's last byte never arrives
    assert tokenizer.decode(partial).endswith("\ufffd")
    _, deltas, _, tail = stream(tokenizer, partial)
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + tail == tokenizer.decode(partial)


def test_stop_string_spanning_two_tokens_is_found_and_cut(tokenizer):
    text = "The cat sat on the mat. The end."
    ids = tokenizer.encode(text)
    stop = "sat on"
    pieces = [tokenizer.decode([t]) for t in ids]
    assert stop not in pieces and not any(stop in p for p in pieces)  # it really spans tokens
    detok, deltas, matched, _ = stream(tokenizer, ids, SamplingParams(stop=[stop]))
    assert matched == stop
    assert "".join(deltas) == "The cat "
    assert detok.output_text == "The cat "


def test_stop_string_is_kept_when_include_stop_str_in_output(tokenizer):
    ids = tokenizer.encode("The cat sat on the mat.")
    detok, deltas, matched, _ = stream(tokenizer, ids, SamplingParams(stop=["sat on"], include_stop_str_in_output=True))
    assert matched == "sat on"
    assert "".join(deltas) == "The cat sat on"


def test_partial_stop_string_is_never_emitted(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer.encode(text)
    stop = "beta gamma STOP"
    detok, deltas, matched, tail = stream(tokenizer, ids, SamplingParams(stop=[stop]))
    assert matched is None
    emitted = ""
    for i, delta in enumerate(deltas):
        emitted += delta
        so_far = tokenizer.decode(ids[: i + 1])
        # The longest tail of the text so far that could still grow into the stop string.
        pending = max((k for k in range(1, len(stop)) if so_far.endswith(stop[:k])), default=0)
        assert len(emitted) <= len(so_far) - pending, (emitted, so_far)
    assert emitted + tail == text


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer.encode("one two three four")
    _, deltas, matched, _ = stream(tokenizer, ids, SamplingParams(stop=["four", "two"]))
    assert matched == "two"
    assert "".join(deltas) == "one "


def test_stop_string_inside_a_multibyte_text(tokenizer):
    ids = tokenizer.encode("价格是🎉一百元🎉谢谢")
    _, deltas, matched, _ = stream(tokenizer, ids, SamplingParams(stop=["元🎉"]))
    assert matched == "元🎉"
    assert "".join(deltas) == "价格是🎉一百"


def test_steps_after_a_stop_emit_nothing(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"), SamplingParams(stop=["b"]))
    assert detok.step(tokenizer.encode("a b")) == ("a ", "b")
    assert detok.step(tokenizer.encode(" more")) == ("", None)
    assert detok.flush() == ""
    assert detok.output_text == "a "


class CountingTokenizer(HFTokenizer):
    """Records how many ids each decode call was given."""

    def __init__(self, hf) -> None:
        super().__init__(hf)
        self.lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_each_step_decodes_a_short_window_not_the_whole_output(tokenizer):
    counting = CountingTokenizer(tokenizer.hf)
    ids = tokenizer.encode(" ".join(TEXTS) * 8)
    assert len(ids) > 300
    detok = IncrementalDetokenizer(counting, tokenizer.encode("a long prompt " * 50), SamplingParams())
    out = "".join(detok.step([t])[0] for t in ids) + detok.flush()
    assert out == tokenizer.decode(ids)
    assert max(counting.lengths) <= 12  # a few tokens of context plus one multi-token character


def test_random_token_sequences_with_broken_utf8_still_add_up(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer.hf)
    fragments = [t for text in TEXTS for t in tokenizer.encode(text) if "\ufffd" in tokenizer.decode([t])]
    for trial in range(100):
        ids = [rng.choice(fragments) if rng.random() < 0.6 else rng.randrange(vocab) for _ in range(20)]
        params = SamplingParams(skip_special_tokens=trial % 2 == 0)
        detok = IncrementalDetokenizer(tokenizer, [rng.randrange(vocab) for _ in range(4)], params)
        out = "".join(detok.step([t])[0] for t in ids) + detok.flush()
        assert out == tokenizer.decode(ids, params.skip_special_tokens), ids
