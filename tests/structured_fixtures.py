"""A tiny random Llama with a real byte-level BPE tokenizer (trained here on a few JSON-like
lines, as GPT-2 / SmolLM2 / Qwen tokenizers are built), so grammars over JSON, regexes and EBNF
can be compiled against its vocabulary exactly as against a production one."""

from __future__ import annotations

from pathlib import Path

from tiny_models import write_tiny_checkpoint

VOCAB_SIZE = 384  # the tiny model's logits width; the tokenizer fills it up to its merges
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny config's bos 1 and eos 2
CORPUS = [
    '{"name": "Alice", "age": 31, "tags": ["a", "b"], "ok": true, "score": 0.5}',
    '{"id": 12, "items": [1, 2, 3], "nested": {"x": null, "y": false}}',
    "The capital of France is Paris. Hello world! yes no maybe 2024-01-31",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 -+.,:;{}[]\"'",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def write_tiny_model_with_bpe_tokenizer(directory: Path, seed: int = 7):
    """Write the checkpoint and the tokenizer into `directory`; returns the transformers model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = write_tiny_checkpoint("llama", directory, seed=seed)
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(CORPUS * 4, trainer=trainer)
    assert raw.get_vocab_size() <= VOCAB_SIZE
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(directory)
    return model
