"""Shared fixtures: the default model (fetched once into the cache through the project's own
resolver, then used offline) and its tokenizer, loaded once per test session."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton builds its language functions once, at its first import, in either compile or interpreter
# mode. Without a GPU the interpreter is the only mode that runs, so choose it before any test
# module imports triton.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# dtype "auto" on a CPU with native bf16 math is bfloat16 (worker/config.py default_cpu_dtype); the
# tests compare greedy tokens exactly with transformers in float32, so they pin float32. Set here,
# in the environment, so that subprocesses, TP ranks and Ray workers see it too.
os.environ.setdefault("SHARDLINE_CPU_DTYPE", "float32")


@pytest.fixture(scope="session")
def smollm2_source():
    from shardline.worker.loader.source import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source):
    from shardline.worker.tokenizer import Tokenizer

    return Tokenizer.from_source(smollm2_source)
