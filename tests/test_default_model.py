"""The default model end to end: loaded from its GGUF, kept quantized (Q4_1 / Q8_0 codes, the
default on CPU) it answers the README's question and follows its dequantized float32 self;
dequantized (`quantization="none"`) its chat prompts give transformers' greedy tokens."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shardline.worker.config import EngineConfig
from shardline.worker.engine.engine import LLMEngine
from shardline.worker.engine.params import SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about tensors."}],
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    eng = LLMEngine(EngineConfig(model="smollm2-135m", num_kv_blocks=256), show_progress=False)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def dense_engine():
    eng = LLMEngine(EngineConfig(model="smollm2-135m", num_kv_blocks=256, quantization="none"), show_progress=False)
    yield eng
    eng.shutdown()


HELD_OUT = [
    [{"role": "user", "content": "Name three colours of the rainbow."}],
    [{"role": "user", "content": "What does a compiler do?"}],
    [{"role": "user", "content": "Give me a tip for sleeping well."}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
]


def test_default_model_stays_quantized_and_follows_its_dequantized_self(engine, dense_engine):
    """Greedy tokens equal the dequantized float32 path's until a position where the dense model's
    two best tokens are within the quantization's error (measured: see docs/quantization.md)."""
    assert engine.quantization.name == "gguf" and dense_engine.quantization.name == "none"
    assert engine.weight_bytes < dense_engine.weight_bytes / 4  # ~95 MB packed against ~540 MB float32
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    quant = engine.generate([{"messages": m} for m in CHATS + HELD_OUT], params)
    dense = dense_engine.generate([{"messages": m} for m in CHATS + HELD_OUT], params)
    equal = 0
    for q, d in zip(quant, dense):
        n = next((i for i, (a, b) in enumerate(zip(q.token_ids, d.token_ids)) if a != b), len(d.token_ids))
        equal += n
        if n < len(d.token_ids):  # the first divergence must be a near tie in the dense model
            top = sorted(d.logprobs[n].top.values(), reverse=True)
            assert top[0] - top[1] < 0.5, f"diverged at {n} with a dense margin of {top[0] - top[1]:.3f} nats"
    total = sum(len(d.token_ids) for d in dense)
    print(f"quantized default model: {equal}/{total} greedy tokens before the first divergence")
    assert equal >= 0.5 * total


def test_three_chat_prompts_match_transformers_on_the_same_gguf(dense_engine, smollm2_source, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_source.path.parent), gguf_file=smollm2_source.path.name,
                                              dtype=torch.float32).eval()
    results = dense_engine.generate([{"messages": m} for m in CHATS],
                                    SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for messages, res in zip(CHATS, results):
        ids = smollm2_tokenizer.apply_chat_template(messages)
        assert res.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert res.token_ids == ref


def test_generation_stops_at_the_chat_end_token(engine):
    [res] = engine.generate([{"messages": CHATS[0]}], SamplingParams(max_tokens=64, temperature=0.0))
    assert res.finish_reason == "stop"
    assert "Paris" in res.text
    assert "<|im_end|>" not in res.text


def test_stop_string_cuts_the_text(engine):
    [res] = engine.generate([{"messages": CHATS[0]}], SamplingParams(max_tokens=64, temperature=0.0, stop=["Paris"]))
    assert res.finish_reason == "stop_string"
    assert "Paris" not in res.text and res.text.startswith("The capital")


def test_bfloat16_on_cpu_still_answers(monkeypatch):
    """bfloat16 is what dtype auto gives on CPUs with native bf16 math (the tests pin float32 to
    compare with transformers exactly): the default model must still answer in it."""
    eng = LLMEngine(EngineConfig(model="smollm2-135m", dtype="bfloat16", num_kv_blocks=64), show_progress=False)
    try:
        assert eng.dtype == torch.bfloat16
        [res] = eng.generate([{"messages": CHATS[0]}], SamplingParams(max_tokens=32, temperature=0.0))
    finally:
        eng.shutdown()
    assert res.finish_reason == "stop" and "Paris" in res.text


def test_cli_generate_answers_paris():
    out = subprocess.run(
        [sys.executable, "-m", "shardline", "generate", "--model", "smollm2-135m", "--chat", "--prompt",
         "What is the capital of France?", "--max-tokens", "20", "--temperature", "0", "--num-kv-blocks", "64"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_cli_prompts_file_writes_one_json_line_per_input(tmp_path):
    import json

    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
        {"messages": CHATS[0], "max_tokens": 8},
        {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
    ]))
    out = subprocess.run([sys.executable, "-m", "shardline", "generate", "--prompts-file", str(f), "--temperature", "0",
                          "--num-kv-blocks", "64"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.strip().splitlines()]
    assert len(lines) == 3
    assert lines[0]["token_ids"] == lines[2]["token_ids"] and len(lines[0]["token_ids"]) == 4
    assert lines[2]["cached_tokens"] >= 0 and lines[1]["prompt_tokens"] > 10
    assert {"text", "token_ids", "finish_reason", "prompt_tokens", "cached_tokens"} <= set(lines[1])


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--model", "smollm2-135m", "--max-model-len", "100000"], "max_model_len"),
])
def test_cli_reports_bad_input_clearly(argv, needle):
    out = subprocess.run([sys.executable, "-m", "shardline", "generate", "--prompt", "hi", *argv],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_stop_strings_wait_for_min_tokens(engine):
    prompt = {"messages": CHATS[0]}
    [free] = engine.generate([prompt], SamplingParams(max_tokens=64, temperature=0.0, stop=["capital"]))
    [held] = engine.generate([prompt], SamplingParams(max_tokens=64, temperature=0.0, stop=["capital"], min_tokens=8))
    assert free.finish_reason == "stop_string" and free.completion_tokens < 8
    assert held.completion_tokens >= 8 and "capital" in held.text
