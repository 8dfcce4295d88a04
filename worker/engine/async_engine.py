"""The engine behind an asyncio API: a dedicated thread runs the step loop (the model's compute
releases the GIL), callers submit requests, iterate their deltas and abort them. The cluster's
replica group and any asyncio front end use this.

Deltas cross from the engine thread to each caller's event loop once per step and loop (one
`call_soon_threadsafe` for all of a step's outputs, not one per request), and each request's
stream coalesces them under a StreamPolicy (stream_coalescer.py): the first token at once, later
ones merged over a gap that grows with the number of open streams, up to stream_interval_ms."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, AsyncGenerator, Sequence

from shardline.worker.config import EngineConfig
from shardline.worker.engine.engine import LLMEngine, Prompt
from shardline.worker.engine.generation import GenerationRequest
from shardline.worker.engine.outputs import FINISH_ERROR, RequestOutput
from shardline.worker.engine.params import RequestError, SamplingParams
from shardline.worker.engine.stream_coalescer import CoalescingStream, StreamPolicy

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine's loop has stopped (a failed step or a lost rank); every request in flight ended."""


class AsyncEngine:
    """Owns an LLMEngine and the thread that steps it."""

    def __init__(self, engine: LLMEngine, stall_timeout_s: float = 60.0, stream_policy: StreamPolicy | None = None) -> None:
        """`stream_policy` defaults to the engine config's stream_interval_ms / stream_items_per_s;
        StreamPolicy(interval_s=0) streams every delta as soon as the consumer takes it."""
        self.engine = engine
        self.stall_timeout_s = stall_timeout_s
        self.stream_policy = stream_policy or engine.config.stream_policy()
        self.open_streams = 0  # streams being iterated now (read by the policy's adaptive gap)
        self._commands: "queue.SimpleQueue[tuple[str, Any]]" = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, CoalescingStream]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="shardline-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs: Any) -> "AsyncEngine":
        return cls(LLMEngine(config, show_progress=False, metrics=kwargs.pop("metrics", None)), **kwargs)

    # ---- caller side (any event loop) ----------------------------------------------------------

    async def generate(self, prompt: Prompt | GenerationRequest, params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       cache_salt: str | None = None) -> AsyncGenerator[RequestOutput, None]:
        """Submit a request and yield its deltas; the last one has finished=True. Leaving the
        iteration early (cancel, disconnect) aborts the request and frees its blocks. A
        GenerationRequest (validated at the edge) is submitted as it is; the other arguments are
        then ignored."""
        loop = asyncio.get_running_loop()
        policy = self.stream_policy
        stream = CoalescingStream(loop, lambda: policy.gap_s(self.open_streams))
        admitted: asyncio.Future = loop.create_future()
        with self._lock:  # against _fail_all: a command is either queued before the drain or refused
            self._raise_if_dead()
            self._commands.put(("add", (prompt, params, request_id, priority, cache_salt, loop, stream, admitted)))
        self._wake.set()
        try:
            # shield: a cancel here must not cancel `admitted`, or the admitted request would be lost
            rid = await asyncio.shield(admitted)  # raises the RequestError of a rejected request
        except asyncio.CancelledError:
            # Cancelled while the engine thread admits it: abort it as soon as it has an id.
            admitted.add_done_callback(lambda f: None if f.exception() else self.abort(f.result()))
            raise
        finished = False
        self.open_streams += 1
        try:
            while True:
                out = await stream.next()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            self.open_streams -= 1
            stream.close()
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def check_health(self) -> None:
        """Raise when the loop died, or has made no progress for stall_timeout_s while work is pending."""
        self._raise_if_dead()
        if self.engine.has_unfinished_requests() and time.monotonic() - self.last_progress > self.stall_timeout_s:
            raise EngineDeadError(f"engine made no progress for {time.monotonic() - self.last_progress:.0f}s with requests pending")
        self.engine.executor.check_health()

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop the loop; every stream still open ends with an error and new calls are refused."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        if self.error is None:
            self._fail_all(EngineDeadError("engine shut down"))
        self.engine.shutdown()

    def _raise_if_dead(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine is dead: {self.error}")

    # ---- engine thread ------------------------------------------------------------------------

    def _deliver(self, outputs: Sequence[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[CoalescingStream, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            if out.finished:
                self._streams.pop(out.request_id, None)
            by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_push_all, batch)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                prompt, params, rid, priority, salt, loop, stream, admitted = arg
                try:
                    if self.error is not None:
                        raise EngineDeadError(f"engine is dead: {self.error}")
                    if isinstance(prompt, GenerationRequest):
                        rid = self.engine.submit(prompt)
                    else:
                        rid = self.engine.add_request(prompt, params, rid, priority, salt)
                    self._streams[rid] = (loop, stream)
                    _resolve(admitted, result=rid)
                except (RequestError, EngineDeadError) as e:
                    _resolve(admitted, error=e)
                except Exception as e:  # tokenizer or template failures are the caller's input
                    _resolve(admitted, error=RequestError("prompt", str(e)))
            elif kind == "abort":
                out = self.engine.abort_request(arg)
                if out is not None:
                    self._deliver([out])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished_requests():
                self.last_progress = time.monotonic()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - any failure ends every stream with an error
                log.exception("engine step failed")
                self._fail_all(e)
                return
            self.last_progress = time.monotonic()
            if outputs:
                self._deliver(outputs)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self.error = error
        self._deliver([RequestOutput(rid, [], "", finished=True, finish_reason=FINISH_ERROR, error=str(error))
                       for rid in list(self._streams)])
        # answer anyone still waiting for admission
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                _resolve(arg[7], error=EngineDeadError(f"engine is dead: {error}"))


def _push_all(batch: list[tuple[CoalescingStream, RequestOutput]]) -> None:
    """On a caller's loop: give each stream its delta of this step."""
    for stream, out in batch:
        stream.push(out)


def _resolve(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Complete an asyncio future from the engine thread."""

    def apply() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    fut.get_loop().call_soon_threadsafe(apply)
