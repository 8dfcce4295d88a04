"""Gemma 2 and Gemma 3 text GGUF files, written as llama.cpp's converter writes them (norms stored as
1 + w, no query_pre_attn_scalar, no window pattern, no local rope base, a sentencepiece vocabulary
with a chat template): shardline derives what the file lacks as llama.cpp does and generates what
transformers generates from the safetensors of the same weights, past the window, plain and chat."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardline.worker.config import EngineConfig, ModelConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import SamplingParams
from shardline.worker.loader.source import resolve_model
from shardline.worker.tokenizer import Tokenizer
from tiny_models import SLIDING_WINDOW, hf_greedy, make_hf_model, prompts, write_tiny_gguf

N_NEW = 32
# The released models' choices, which a converted file relies on: query_pre_attn_scalar = head_dim
# (all but the 27B models), Gemma 3's every-6th-layer-global pattern, its 10,000 local rope base and
# (4B-27B) linear rope scaling by 8 on the global layers only.
GEMMA_OVERRIDES = {
    "gemma2": dict(query_pre_attn_scalar=16),
    "gemma3": dict(query_pre_attn_scalar=16, num_hidden_layers=6, sliding_window_pattern=6,
                   rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0}),
}
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # bos 1, eos 2 as the tiny configs
WORDS = ["user", "model", "what", "\u2581is", "\u2581the", "\u2581capital", "\u2581of", "\u2581france", "\u2581paris"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHAT = [{"role": "user", "content": "what is the capital of france is the capital of france"}]


def gemma_vocab(size: int) -> list[str]:
    """A sentencepiece vocabulary as a Gemma GGUF stores one: control tokens first, every word of
    WORDS with each of its prefixes and characters (so that merges rebuilt from the vocabulary reach
    every word), then unused control tokens up to `size`."""
    pieces: list[str] = ["\n"]
    for word in WORDS:
        for piece in [*word, *(word[:n] for n in range(2, len(word) + 1))]:
            if piece not in pieces:
                pieces.append(piece)
    tokens = SPECIALS + pieces
    return tokens + [f"<unused{i}>" for i in range(size - len(tokens))]


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma_gguf(request, tmp_path_factory, monkeypatch_module) -> tuple[Path, object]:
    """(GGUF path, transformers model with the same weights) of one tiny family."""
    directory = tmp_path_factory.mktemp(f"{request.param}-gguf")
    monkeypatch_module.setenv("SHARDLINE_CACHE_DIR", str(directory / "cache"))
    hf = make_hf_model(request.param, seed=5, **GEMMA_OVERRIDES[request.param])
    path = write_tiny_gguf(hf, directory / f"{request.param}.gguf", tokens=gemma_vocab(hf.config.vocab_size),
                           chat_template=CHAT_TEMPLATE)
    return path, hf


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_config_derives_what_the_file_lacks_as_llama_cpp_does(gemma_gguf):
    path, hf = gemma_gguf
    cfg = ModelConfig.from_hf_config(resolve_model(str(path)).hf_config())
    assert cfg.architecture == type(hf).__name__
    assert cfg.query_pre_attn_scalar == hf.config.query_pre_attn_scalar
    assert cfg.layer_sliding_windows == tuple(SLIDING_WINDOW if t == "sliding_attention" else None
                                              for t in hf.config.layer_types)
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (
        (4.0, 8.0) if cfg.architecture == "Gemma2ForCausalLM" else (None, None))
    if cfg.architecture == "Gemma3ForCausalLM":
        assert cfg.layer_rope(0) == (10_000.0, None)
        assert cfg.layer_rope(5) == (1_000_000.0, {"rope_type": "linear", "factor": 8.0})
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.tie_word_embeddings


@pytest.mark.slow
def test_greedy_tokens_match_transformers_past_the_window_plain_and_chat(gemma_gguf):
    """32 greedy tokens after prompts two to three windows long, and after a chat prompt rendered
    with the file's own template and control tokens; <end_of_turn> stops generation."""
    path, hf = gemma_gguf
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=64, block_size=8, max_num_batched_tokens=32,
                                    max_num_seqs=8), show_progress=False)
    tokens = gemma_vocab(hf.config.vocab_size)
    chat_ids = engine.encode_prompt({"messages": CHAT})
    assert chat_ids[0] == tokens.index("<bos>")
    assert chat_ids.count(tokens.index("<start_of_turn>")) == 2 and chat_ids.count(tokens.index("<end_of_turn>")) == 1
    assert tokens.index("\u2581capital") in chat_ids  # whole words: merges rebuilt from the vocabulary
    assert engine.tokenizer is not None
    assert engine.tokenizer.decode(chat_ids, skip_special_tokens=False) == engine.tokenizer.chat_prompt_text(CHAT)
    assert tokens.index("<end_of_turn>") in engine.eos_token_ids
    again = Tokenizer.from_source(resolve_model(str(path)))  # now from the files derived from the GGUF
    assert again.apply_chat_template(CHAT) == chat_ids
    batch = prompts(2, seed=8, min_len=2 * SLIDING_WINDOW, max_len=3 * SLIDING_WINDOW)
    results = engine.generate(batch + [{"messages": CHAT}], SamplingParams(max_tokens=N_NEW, temperature=0.0,
                                                                          ignore_eos=True))
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, N_NEW) for p in batch + [chat_ids]]


def test_27b_models_take_hidden_over_heads_as_query_scalar(tmp_path, monkeypatch):
    """llama.cpp's rule (from gemma_pytorch's configs): the 27B models (Gemma 2: 46 layers, Gemma 3:
    62) scale queries by (hidden / heads) ** -0.5, the others by head_dim ** -0.5; and a file with
    a sliding_window_pattern key windows the layers it lists."""
    import gguf

    monkeypatch.setenv("SHARDLINE_CACHE_DIR", str(tmp_path / "cache"))
    for arch, layers, hidden, heads, head_dim, expected in (("gemma2", 46, 4608, 32, 128, 144.0),
                                                            ("gemma2", 42, 3584, 16, 256, 256.0),
                                                            ("gemma3", 62, 5376, 32, 128, 168.0)):
        path = tmp_path / f"{arch}-{layers}.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        for add, value in ((writer.add_block_count, layers), (writer.add_embedding_length, hidden),
                           (writer.add_feed_forward_length, 4 * hidden), (writer.add_head_count, heads),
                           (writer.add_head_count_kv, heads // 2), (writer.add_key_length, head_dim),
                           (writer.add_sliding_window, 4096), (writer.add_vocab_size, 256)):
            add(value)
        writer.add_sliding_window_pattern([i % 3 == 0 for i in range(layers)])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        cfg = ModelConfig.from_hf_config(resolve_model(str(path)).hf_config())
        assert cfg.query_pre_attn_scalar == expected
        assert cfg.layer_sliding_windows[:4] == (4096, None, None, 4096)
