"""Sliding-window families (Gemma 2, Gemma 3 text, Mistral with a window) compute what transformers
computes on the same safetensors files, through the model alone and through the engine under
chunked prefill, preemption, prefix hits and chat prompts, with sequences several windows long;
windowed layers' blocks that fall out of the window are released and reused (when every layer is
windowed here; for Gemma's KV-cache groups also tests/test_hybrid_kv_groups.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_checks import assert_all_blocks_free
from shardline.worker.attention.torch_backend import TorchAttentionBackend
from shardline.worker.config import EngineConfig, ModelConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import SamplingParams
from shardline.worker.model import LlamaForCausalLM
from shardline.worker.parallel.context import SINGLE
from test_model_parity import _Greedy, _load, _stream
from tiny_models import SLIDING_ARCHITECTURES, SLIDING_WINDOW, hf_greedy, prompts, write_tiny_checkpoint

N_NEW = 32


@pytest.fixture(scope="module", params=SLIDING_ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    """(directory, transformers model) of one tiny sliding-window architecture, written once."""
    directory = tmp_path_factory.mktemp(request.param)
    return directory, write_tiny_checkpoint(request.param, directory, seed=5)


def test_config_reads_each_layers_window_and_gemma_settings(checkpoint):
    directory, hf = checkpoint
    cfg = _load(directory).config
    expected = tuple(SLIDING_WINDOW if t == "sliding_attention" else None
                     for t in getattr(hf.config, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers)
    assert cfg.layer_sliding_windows == expected
    if cfg.architecture == "Gemma3ForCausalLM":
        assert cfg.layer_rope(0) == (10_000.0, None) and cfg.layer_rope(2) == (1_000_000.0, None)
        assert cfg.kv_release_window is None  # a global layer needs every block
    if cfg.architecture == "MistralForCausalLM":
        assert cfg.kv_release_window == SLIDING_WINDOW


def test_logits_match_transformers_past_the_window(checkpoint):
    """Every position of prompts up to 3x the window, and the window matters: the same weights
    with every layer global give other logits."""
    directory, hf = checkpoint
    model = _load(directory)
    batch = prompts(3, seed=1, min_len=2 * SLIDING_WINDOW, max_len=3 * SLIDING_WINDOW)
    logits = _Greedy(model, batch).logits_all_positions(batch)
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in batch])
    assert (logits - ref).abs().max().item() <= 1e-4
    global_cfg = dataclasses.replace(model.config, layer_sliding_windows=())
    unwindowed = LlamaForCausalLM(global_cfg, SINGLE, TorchAttentionBackend(), torch.float32, "cpu")
    unwindowed.load_weights(_stream(directory))
    assert (_Greedy(unwindowed.eval(), batch).logits_all_positions(batch) - ref).abs().max().item() > 1e-3


def test_qwen2_use_sliding_window_windows_the_layers_from_max_window_layers(tmp_path):
    hf = write_tiny_checkpoint("qwen2", tmp_path, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                               max_window_layers=1)
    model = _load(tmp_path)
    assert model.config.layer_sliding_windows == (None, SLIDING_WINDOW)
    batch = prompts(2, seed=1, min_len=3 * SLIDING_WINDOW, max_len=3 * SLIDING_WINDOW)
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([p])).logits[0] for p in batch])
    assert (_Greedy(model, batch).logits_all_positions(batch) - ref).abs().max().item() <= 1e-4


# ---- the paged cache: blocks out of every layer's window ---------------------------------------

def _request(rid: str, tokens: list[int]):
    from shardline.worker.engine.request import Request

    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_blocks_out_of_the_window_are_released_reused_and_stay_cached():
    from shardline.worker.engine.block_manager import BlockManager

    bm = BlockManager(8, 4, release_window=6)
    long = _request("long", list(range(3, 23)))  # 20 tokens: 5 blocks
    assert bm.allocate_slots(long, 20)
    long.num_computed_tokens = 20
    bm.cache_full_blocks(long, 20)
    owned = list(long.block_ids)
    # the next query (position 20) sees keys 15..20: blocks 0-2 (positions 0-11) are out of the window
    assert bm.release_out_of_window(long) == 3
    assert long.block_ids == [0, 0, 0] + owned[3:] and bm.num_free_blocks == 6
    assert bm.release_out_of_window(long) == 0  # idempotent
    # a request with the same prefix still hits the whole chain (released blocks keep their keys)
    again = _request("again", list(range(3, 23)))
    hits, num_hit = bm.get_computed_blocks(again)
    assert hits == owned[:4] and num_hit == 16
    # taking them, it skips those before its first new token's window (position 16 sees 11..16)
    assert bm.allocate_slots(again, 4, hits)
    assert again.block_ids[:4] == [0, 0, owned[2], owned[3]] and again.num_released_blocks == 2
    assert bm.ref_counts[owned[0]] == 0 and bm.ref_counts[owned[2]] == 1 and bm.ref_counts[owned[3]] == 2
    bm.free(again)
    assert bm.num_free_blocks == 6
    # fresh allocations take the uncached free blocks first, then evict released cached ones
    other = _request("other", list(range(100, 124)))  # 24 tokens: 6 blocks
    assert bm.allocate_slots(other, 24)
    assert set(owned[:3]) <= set(other.block_ids)  # the released blocks are reused
    assert bm.get_computed_blocks(again)[1] == 0  # and so no longer cached
    bm.free(long)
    bm.free(other)
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.ref_counts)


def test_models_with_a_global_layer_keep_a_block_table_per_kind_of_layer():
    """Gemma 2's global layer needs every block, its local one a window: two KV-cache groups (the
    global one first); Mistral, windowed everywhere, keeps one table that releases."""
    gemma2 = ModelConfig.from_hf_config(write_config("gemma2"))
    mistral = ModelConfig.from_hf_config(write_config("mistral_sw"))
    assert gemma2.layer_sliding_windows == (SLIDING_WINDOW, None) and gemma2.kv_release_window is None
    assert gemma2.kv_cache_groups.group_windows == (None, SLIDING_WINDOW)
    assert gemma2.kv_cache_groups.layer_group == (1, 0)
    assert mistral.kv_release_window == SLIDING_WINDOW
    assert mistral.kv_cache_groups.group_windows == (SLIDING_WINDOW,)


def write_config(arch: str) -> dict:
    from tiny_models import hf_config

    cfg = hf_config(arch).to_dict()
    cfg["architectures"] = [{"gemma2": "Gemma2ForCausalLM", "mistral_sw": "MistralForCausalLM",
                             "gemma3": "Gemma3ForCausalLM"}[arch]]
    return cfg


# ---- the engine --------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }} {{ m['content'] }}<end_of_turn>"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model{% endif %}"
)
WORDS = "the capital of france is paris what hello world user model system".split()


def write_tokenizer(directory) -> list[int]:
    """A word-level tokenizer with a Gemma-style chat template; returns a chat prompt's ids as
    transformers renders and encodes it."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {tok: i for i, tok in enumerate([*specials, "<unk>", *WORDS])}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", additional_special_tokens=specials[3:])
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(directory)
    return hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)


CHAT = [{"role": "user", "content": "what is the capital of france " * 4}]


def make_engine(directory, **kw) -> LLMEngine:
    cfg = dict(model=str(directory), num_kv_blocks=64, block_size=8, max_num_batched_tokens=256, max_num_seqs=16)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), show_progress=False)


def greedy(n: int = N_NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.slow
def test_engine_matches_transformers_under_chunking_preemption_prefix_hits_and_chat(checkpoint):
    """Plain and chat prompts up to 3 windows long, 32 tokens each, in one engine whose pool is too
    small for them all (preemption) and whose step budget chunks every prompt; the repeated
    prompt is served from the prefix cache."""
    directory, hf = checkpoint
    chat_ids = write_tokenizer(directory)
    # 14 blocks' worth of every layer: a hybrid model's block id is a page in 1/G of its layers
    groups = _load(directory).config.kv_cache_groups.num_groups
    engine = make_engine(directory, num_kv_blocks=14 * groups, max_num_batched_tokens=16)
    base = prompts(1, seed=8, min_len=3 * SLIDING_WINDOW, max_len=3 * SLIDING_WINDOW)[0]
    batch = [base] + prompts(4, seed=9, min_len=SLIDING_WINDOW, max_len=3 * SLIDING_WINDOW)
    [first] = engine.generate([base], greedy())
    results = engine.generate(batch + [{"messages": CHAT}], greedy())
    assert engine.encode_prompt({"messages": CHAT}) == chat_ids
    expected = [hf_greedy(hf, p, N_NEW) for p in [base] + batch + [chat_ids]]
    assert [r.token_ids for r in [first] + results] == expected
    assert engine.scheduler.num_preemptions_total > 0
    assert results[0].cached_tokens > 0 and engine.block_manager.prefix_cache_hits > 0
    assert engine.block_manager.num_released_blocks_total > 0  # every family here has windowed layers
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
def test_released_blocks_let_long_decodes_share_a_pool_too_small_for_their_contexts(tmp_path, overlap):
    """Mistral with a window on every layer: four requests whose whole contexts (10 blocks each)
    would need 40 blocks decode side by side in 20, without preemption, and match transformers
    (overlapped: blocks are released while the previous step, which read them, is still in flight)."""
    hf = write_tiny_checkpoint("mistral_sw", tmp_path, seed=6)
    engine = make_engine(tmp_path, num_kv_blocks=20, async_scheduling=overlap)
    batch = prompts(4, seed=10, min_len=40, max_len=40)
    results = engine.generate(batch, greedy(40))
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, 40) for p in batch]
    assert engine.scheduler.num_preemptions_total == 0
    assert engine.block_manager.num_released_blocks_total >= 4 * 6
    assert_all_blocks_free(engine)


def test_triton_backend_in_the_engine_matches_transformers_on_gemma2(tmp_path):
    """The interpreted kernels with a window and soft-capped scores, in chunked and decode steps,
    over the KV-cache groups' own tables (global and windowed), and after a prefix hit."""
    from shardline.worker.kernels.runtime import interpreter_ready

    if not torch.cuda.is_available() and not interpreter_ready():
        pytest.skip("triton imported in compile mode without a GPU; run this module alone")
    hf = write_tiny_checkpoint("gemma2", tmp_path, seed=3)
    engine = make_engine(tmp_path, max_num_batched_tokens=16, attention_backend="triton")
    assert engine.executor.model.layers[0].self_attn.backend.name == "triton"
    batch = prompts(2, seed=1, min_len=SLIDING_WINDOW + 4, max_len=SLIDING_WINDOW + 8)
    results = engine.generate(batch, greedy(6))
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, 6) for p in batch]
    # each KV-cache group's table reaches the kernel: the windowed group released blocks, and a
    # prefix hit served from both groups' caches gives the same tokens
    assert engine.block_manager.num_groups == 2 and engine.block_manager.num_released_blocks_total > 0
    [again] = engine.generate([batch[0]], greedy(6))
    assert again.cached_tokens > 0 and again.token_ids == results[0].token_ids


@pytest.mark.slow
def test_gemma3_tp2_logits_match_one_rank(tmp_path):
    """Sharded heads (with their q/k norms, both rope bases and the windows) on two gloo ranks."""
    from test_tensor_parallel import _assert_all_gone, _compare_with_local

    write_tiny_checkpoint("gemma3", tmp_path)
    executor = _compare_with_local(tmp_path, 2)
    pids = executor.rank_pids
    executor.shutdown()
    _assert_all_gone(pids)


def test_a_context_longer_than_the_whole_pool_runs_when_every_layer_is_windowed(tmp_path):
    """Six blocks (48 token slots) serve 60-token prompts plus 20 generated tokens: each request
    holds only its window's blocks, and the repeated prompt's prefix hits before its window are
    never taken. A pool this small refuses the same request for a model with a global layer."""
    hf = write_tiny_checkpoint("mistral_sw", tmp_path, seed=4)
    engine = make_engine(tmp_path, num_kv_blocks=6, max_num_batched_tokens=16)
    batch = prompts(2, seed=12, min_len=60, max_len=60)
    results = engine.generate(batch + [batch[0]], greedy(20))
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, 20) for p in batch + [batch[0]]]
    assert_all_blocks_free(engine)
    from shardline.worker.engine.block_manager import BlockManager

    assert BlockManager(6, 8).max_blocks_held(79, 16) == 10  # without a window: all 10 blocks at once
