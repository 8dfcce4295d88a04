"""Merging several async streams into one, in arrival order: the n choices of a request (in the
replica group) and the prompts of a batched completions request (in the ingress) each stream on
their own and are interleaved as their items come."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import AsyncIterator, TypeVar

T = TypeVar("T")

_DONE = object()


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield (stream position, item) from every stream as items arrive. An exception in one stream
    is raised here; leaving the iteration early cancels every stream still running (which closes
    it: a replica's stream then aborts its request)."""
    if len(streams) == 1:  # the common case costs no task
        only = streams[0]
        try:
            async for item in only:
                yield 0, item
        finally:
            close = getattr(only, "aclose", None)
            if close is not None:
                await close()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(position: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((position, item, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there
            await queue.put((position, _DONE, e))
            return
        await queue.put((position, _DONE, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            position, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                running -= 1
                continue
            yield position, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
