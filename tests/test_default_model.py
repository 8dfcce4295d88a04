"""The default model end to end: loaded from its GGUF, chat prompts give transformers' greedy tokens,
and the CLI answers the README's question."""

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


def test_three_chat_prompts_match_transformers_on_the_same_gguf(engine, smollm2_source, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_source.path.parent), gguf_file=smollm2_source.path.name,
                                              dtype=torch.float32).eval()
    results = engine.generate([{"messages": m} for m in CHATS], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
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
