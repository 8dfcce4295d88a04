"""Tokenization and chat templating off the ingress's event loop.

A tokenizer call is CPU work proportional to the prompt (a long prompt takes seconds in pure
Python templating plus the Rust tokenizer); on the event loop it stalls every other request's
bytes. Here it runs on a small, bounded thread pool: Hugging Face's fast tokenizers release the
GIL while they encode, so other requests' streaming goes on, and at most `threads` prompts are
tokenized at once (the rest wait their turn in the pool's queue, bounded by the ingress's
admission bound)."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class TokenizerPool:
    """A bounded thread pool for tokenizer calls; `run` awaits one without blocking the loop."""

    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shardline-tokenize")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a pool thread; its exceptions (RequestError ...) propagate."""
        return await tokenize_off_loop(self._executor, fn, *args, **kwargs)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


async def tokenize_off_loop(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a tokenizer / chat-template call on `executor` and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))
