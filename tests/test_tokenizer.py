"""Specification of the Tokenizer: from a tokenizer directory or GGUF metadata, with chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardline.worker.loader.source import DEFAULT_MODEL, ModelLoadError, ModelSource, resolve_model
from shardline.worker.config import ConfigError
from shardline.worker.tokenizer import Tokenizer, load_tokenizer, read_chat_template

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant{% endif %}"
)
WORDS = "the capital of france is paris what hello world user assistant system".split()


def _tiny_tokenizer_dir(directory: Path, chat_template: str | None = CHAT_TEMPLATE) -> ModelSource:
    """A word-level tokenizer saved as transformers saves one, next to a config.json."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", "<eot>", *WORDS])}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        hf.chat_template = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(directory)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "eos_token_id": [3], "bos_token_id": 1}
    (directory / "config.json").write_text(json.dumps(config))
    return ModelSource(str(directory), "safetensors", directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_source(_tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_tokenizer_from_a_directory_round_trips_text(tiny):
    ids = tiny.encode("hello world", add_special_tokens=False)
    assert ids == [tiny.hf.convert_tokens_to_ids("hello"), tiny.hf.convert_tokens_to_ids("world")]
    assert tiny.decode(ids) == "hello world"
    assert tiny.vocab_size == 4 + len(WORDS)
    assert tiny.bos_token_id == 1


def test_eos_ids_join_the_configs_and_the_tokenizers(tiny):
    assert tiny.eos_token_ids == [3, 2]


def test_generation_config_eos_ids_are_included(tmp_path):
    source = _tiny_tokenizer_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 0]}))
    assert Tokenizer.from_source(source).eos_token_ids == [3, 0, 2]


def test_chat_template_renders_and_encodes_without_extra_special_tokens(tiny):
    messages = [{"role": "user", "content": "what is the capital of france"}]
    text = tiny.chat_prompt_text(messages)
    assert text == "<s>user what is the capital of france</s><s>assistant"
    assert tiny.apply_chat_template(messages) == tiny.encode(text, add_special_tokens=False)
    assert tiny.chat_prompt_text(messages, add_generation_prompt=False).endswith("</s>")


@pytest.mark.parametrize(
    "messages, complaint",
    [
        ([], "non-empty"),
        ("hello", "non-empty"),
        (["hello"], r"messages\[0\]"),
        ([{"role": "wizard", "content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": 5}], r"messages\[1\]\.content"),
        ([{"role": "user"}], r"messages\[0\]\.content"),
    ],
)
def test_malformed_chat_messages_are_rejected(tiny, messages, complaint):
    with pytest.raises(ValueError, match=complaint):
        tiny.apply_chat_template(messages)


def test_model_without_chat_template_raises_model_load_error(tmp_path):
    tok = Tokenizer.from_source(_tiny_tokenizer_dir(tmp_path, chat_template=None))
    assert not tok.has_chat_template
    with pytest.raises(ModelLoadError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_template_errors_surface_as_value_errors(tmp_path):
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}x"
    tok = Tokenizer.from_source(_tiny_tokenizer_dir(tmp_path, chat_template=template))
    with pytest.raises(ValueError, match="system first"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_directory_without_tokenizer_files_raises_naming_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        Tokenizer.from_source(ModelSource(str(tmp_path), "safetensors", tmp_path))


def test_chat_template_override_replaces_the_models_template(tmp_path):
    source = _tiny_tokenizer_dir(tmp_path)
    override = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok = load_tokenizer(source, chat_template=override)
    assert tok is not None
    assert tok.chat_prompt_text([{"role": "user", "content": "hello world"}]) == "hello world "
    assert Tokenizer.from_source(source).chat_prompt_text([{"role": "user", "content": "hello"}]) == (
        "<s>user hello</s><s>assistant")


def test_read_chat_template_takes_a_file_or_template_text_and_names_a_bad_path(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(CHAT_TEMPLATE)
    assert read_chat_template(str(path)) == CHAT_TEMPLATE
    assert read_chat_template(CHAT_TEMPLATE) == CHAT_TEMPLATE
    with pytest.raises(ConfigError, match=r"chat_template: .*missing\.jinja"):
        read_chat_template(str(tmp_path / "missing.jinja"))


# --- the default model's tokenizer, from GGUF metadata -------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_source, smollm2_tokenizer) -> tuple[ModelSource, Tokenizer]:
    return smollm2_source, smollm2_tokenizer


@pytest.mark.slow
def test_smollm2_chat_prompt_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    source, tok = smollm2
    reference = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.apply_chat_template(messages) == list(expected)
    assert tok.chat_prompt_text(messages).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_special_tokens(smollm2):
    _, tok = smollm2
    assert tok.vocab_size == 49152
    assert 2 in tok.eos_token_ids and tok.hf.convert_ids_to_tokens(2) == "<|im_end|>"
    assert tok.bos_token_id == 1
    ids = tok.encode("Hello world")
    assert ids == tok.encode("Hello world", add_special_tokens=False)  # SmolLM2 adds no BOS
    assert tok.decode(ids) == "Hello world"
