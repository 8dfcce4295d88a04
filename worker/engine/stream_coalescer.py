"""Coalesced streaming: fewer, larger stream items per request when the serving path is loaded.

Every item a request's stream yields costs the serving path a fixed amount of CPU whatever it
carries (a Ray streaming-generator object on each Serve hop, about 1.4 ms per item over the
ReplicaGroup -> Ingress -> proxy hops on a 2-core machine; docs/performance.md). An engine step
makes one delta per running request, so without merging the path tops out at about 1.3k items
(= tokens) per second whatever the engine does. Merging only the deltas that are already waiting
does not help: Serve pulls each item the moment it is yielded, so the backlog forms inside
Serve, never here. What helps is a timed flush, as Ray Serve LLM's `stream_batching_interval_ms`
and vLLM's `--stream-interval`: hold a request's later deltas for a short gap and send them as
one item.

Policy (one `CoalescingStream` per request, all on the consumer's event loop):
- The first item is released at once: time to first token never waits for the interval.
- After it, an item is released when the stream's gap has passed since the previous item was
  taken; deltas arriving within the gap merge into the held item (tokens, text and logprobs in
  order; finish reason, usage and error from the last delta).
- The gap adapts to load: `StreamPolicy.gap_s(open_streams)` = open_streams / items_per_s,
  capped at `interval_s`. One idle stream on an idle engine gets a gap of ~1 ms (no wait when its
  tokens come slower than that); 64 streams share the items budget and each waits up to the cap.
- A finished delta (stop, length, abort, error) is released at once, merged with what was held,
  so finish reason, usage and stop strings are exactly those of the uncoalesced stream.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Callable

from shardline.worker.engine.outputs import RequestOutput, merge_into


@dataclass(frozen=True)
class StreamPolicy:
    """How long a stream may hold deltas: `interval_s` (the cap; 0 turns coalescing off) and the
    budget of items per second all open streams of one engine share (`items_per_s`)."""

    interval_s: float = 0.05
    items_per_s: float = 1000.0

    def __post_init__(self) -> None:
        if not (self.interval_s >= 0 and math.isfinite(self.interval_s)):
            raise ValueError(f"stream_interval_ms: must be >= 0 and finite, got {self.interval_s * 1e3!r}")
        if not self.items_per_s > 0:
            raise ValueError(f"stream_items_per_s: must be > 0, got {self.items_per_s!r}")

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def gap_s(self, open_streams: int) -> float:
        """Seconds between two items of one stream when `open_streams` streams are open: the
        items budget split evenly, never more than the interval."""
        if not self.enabled:
            return 0.0
        return min(self.interval_s, max(1, open_streams) / self.items_per_s)


class CoalescingStream:
    """One request's deltas on its consumer's event loop: `push` (called on that loop) merges a
    delta into the held item and decides when it is released; `next` waits for a released item.

    A released item is frozen: deltas that arrive before the consumer takes it start the next
    held item, so the first item is exactly the first delta however late the consumer comes.
    `gap_s` is asked each time an item is scheduled, so the gap follows the number of open
    streams as they come and go."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gap_s: Callable[[], float]) -> None:
        self._loop = loop
        self._gap_s = gap_s
        self._held: RequestOutput | None = None  # merging, not yet released
        self._ready: RequestOutput | None = None  # released, waiting for the consumer
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future | None = None
        self._first_taken = False
        self._last_taken = 0.0  # time.monotonic() when the previous item was taken
        self.items_taken = 0

    def push(self, out: RequestOutput) -> None:
        """Merge a delta into the held item; release it now (first item, finish, gap passed) or
        at the end of the gap."""
        if self._held is None:
            self._held = out
        else:
            merge_into(self._held, out)
        if self._ready is None:
            self._schedule()

    def _schedule(self) -> None:
        """Decide when the held item is released (only while no released item is waiting)."""
        assert self._held is not None and self._ready is None
        if self._held.finished or not self._first_taken:
            self._release()
            return
        if self._timer is not None:
            return
        delay = self._last_taken + self._gap_s() - time.monotonic()
        if delay <= 0:
            self._release()
        else:
            self._timer = self._loop.call_later(delay, self._release)

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ready, self._held = self._held, None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> RequestOutput:
        """The next (possibly merged) item; waits until one is released."""
        while self._ready is None:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out, self._ready = self._ready, None
        self._first_taken = True
        self._last_taken = time.monotonic()
        self.items_taken += 1
        if self._held is not None:
            self._schedule()
        return out

    def close(self) -> None:
        """Drop any pending flush (the consumer left)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
