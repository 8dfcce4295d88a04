"""Checks the engine tests share: every KV block (the draft model's too) is free once nothing runs,
and an AsyncEngine is waited on until its last abort has been processed."""

from __future__ import annotations

import asyncio

from shardline.worker.engine.async_engine import AsyncEngine
from shardline.worker.engine.engine import LLMEngine


def assert_all_blocks_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(c == 0 for c in bm.ref_counts)
    assert not engine.has_unfinished_requests()
    draft_blocks = getattr(engine.proposer, "block_manager", None)
    if draft_blocks is not None:
        assert draft_blocks.num_free_blocks == draft_blocks.num_blocks


def wait_until_idle(aeng: AsyncEngine, attempts: int = 100, pause_s: float = 0.02) -> None:
    """Give the engine thread time to process aborts queued by cancelled streams (bounded)."""
    for _ in range(attempts):
        if not aeng.engine.has_unfinished_requests():
            return
        asyncio.run(asyncio.sleep(pause_s))
