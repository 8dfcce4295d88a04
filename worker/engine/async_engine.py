"""The engine behind an asyncio API: a dedicated thread runs the step loop (the model's compute
releases the GIL), callers submit requests, iterate their deltas and abort them. The cluster's
replica group and any asyncio front end use this."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, AsyncGenerator

from shardline.worker.config import EngineConfig
from shardline.worker.engine.engine import LLMEngine, Prompt
from shardline.worker.engine.generation import GenerationRequest
from shardline.worker.engine.outputs import FINISH_ERROR, RequestOutput
from shardline.worker.engine.params import RequestError, SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine's loop has stopped (a failed step or a lost rank); every request in flight ended."""


class AsyncEngine:
    """Owns an LLMEngine and the thread that steps it."""

    def __init__(self, engine: LLMEngine, stall_timeout_s: float = 60.0) -> None:
        self.engine = engine
        self.stall_timeout_s = stall_timeout_s
        self._commands: "queue.SimpleQueue[tuple[str, Any]]" = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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
        q: asyncio.Queue = asyncio.Queue()
        admitted: asyncio.Future = loop.create_future()
        with self._lock:  # against _fail_all: a command is either queued before the drain or refused
            self._raise_if_dead()
            self._commands.put(("add", (prompt, params, request_id, priority, cache_salt, loop, q, admitted)))
        self._wake.set()
        try:
            # shield: a cancel here must not cancel `admitted`, or the admitted request would be lost
            rid = await asyncio.shield(admitted)  # raises the RequestError of a rejected request
        except asyncio.CancelledError:
            # Cancelled while the engine thread admits it: abort it as soon as it has an id.
            admitted.add_done_callback(lambda f: None if f.exception() else self.abort(f.result()))
            raise
        finished = False
        try:
            while True:
                out: RequestOutput = await q.get()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
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

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is None:
            return
        loop, q = target
        if out.finished:
            self._streams.pop(out.request_id, None)
        loop.call_soon_threadsafe(q.put_nowait, out)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                prompt, params, rid, priority, salt, loop, q, admitted = arg
                try:
                    if self.error is not None:
                        raise EngineDeadError(f"engine is dead: {self.error}")
                    if isinstance(prompt, GenerationRequest):
                        rid = self.engine.submit(prompt)
                    else:
                        rid = self.engine.add_request(prompt, params, rid, priority, salt)
                    self._streams[rid] = (loop, q)
                    _resolve(admitted, result=rid)
                except (RequestError, EngineDeadError) as e:
                    _resolve(admitted, error=e)
                except Exception as e:  # tokenizer or template failures are the caller's input
                    _resolve(admitted, error=RequestError("prompt", str(e)))
            elif kind == "abort":
                out = self.engine.abort_request(arg)
                if out is not None:
                    self._deliver(out)

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
            for out in outputs:
                self._deliver(out)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self.error = error
        for rid in list(self._streams):
            self._deliver(RequestOutput(rid, [], "", finished=True, finish_reason=FINISH_ERROR, error=str(error)))
        # answer anyone still waiting for admission
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                _resolve(arg[7], error=EngineDeadError(f"engine is dead: {error}"))


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
