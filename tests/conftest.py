"""Shared fixtures: the default model (fetched once into the cache through the project's own
resolver, then used offline) and its tokenizer, loaded once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_source():
    from shardline.worker.loader.source import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source):
    from shardline.worker.tokenizer import Tokenizer

    return Tokenizer.from_source(smollm2_source)
