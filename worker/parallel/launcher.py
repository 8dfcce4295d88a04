"""How ranks 1..tp-1 come to exist. The executor only needs `start`, `alive`, `errors` and
`stop`; ProcessLauncher spawns local processes (offline API, CLI, benchmarks) and the cluster
layer can place the same rank_main in Ray actors behind this interface."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Protocol

from shardline.worker.config import EngineConfig
from shardline.worker.engine.executor import ModelSpec


@dataclass(frozen=True)
class RankArgs:
    """What every launched rank receives once, at start (no per-step pickling)."""

    master_addr: str
    master_port: int
    spec: ModelSpec
    config: EngineConfig


@dataclass(frozen=True)
class RankError:
    """A failure a rank reported before exiting."""

    rank: int
    time: float  # unix time, to order reports from several ranks
    type: str
    message: str
    traceback: str


@dataclass
class RankHandle:
    """One launched rank: its number, its pid when local (None for remote ranks), and a way to say
    how it ended."""

    rank: int
    pid: int | None
    process: object | None = None  # the launcher's own handle

    def exit_description(self) -> str:
        code = getattr(self.process, "exitcode", None)
        if code is None:
            return "exited"
        if code < 0:
            try:
                return f"killed by signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"


class RankLauncher(Protocol):
    """Starts ranks 1..world_size-1 running rank_main, and watches and stops them."""

    def start(self, world_size: int, args: RankArgs) -> list[RankHandle]: ...

    def alive(self) -> list[bool]:
        """One flag per handle returned by start(), in the same order."""
        ...

    def errors(self) -> list[RankError]:
        """Failures reported since the last call (non-blocking)."""
        ...

    def stop(self, timeout: float = 5.0) -> None:
        """Wait up to `timeout` for the ranks to exit, then kill what is left; idempotent."""
        ...


def _watch_parent(parent_pid: int) -> None:
    # NOTE: a spawned rank must not outlive the engine process (e.g. after kill -9 of rank 0 on
    # NCCL, where no socket error would wake it).
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


class PipeSink:
    """The write end of a one-way pipe as an error sink: one writer, no lock, no feeder thread, so
    a report is in the pipe when put() returns."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def put(self, item: tuple) -> None:
        self.conn.send(item)


def _process_entry(rank: int, world_size: int, args: RankArgs, error_sink: PipeSink, parent_pid: int) -> None:
    """Body of a spawned rank: what is specific to being a local child process, then rank_main."""
    from shardline.worker.parallel.rank import rank_main

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which shuts the group down
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    if args.spec.device.type == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # the ranks share this host
    code = rank_main(rank, world_size, args.master_addr, args.master_port, args.spec, args.config, error_sink)
    if code != 0:
        os._exit(code)  # NOTE: skip interpreter teardown; a failed rank's group may not destroy cleanly


class ProcessLauncher:
    """Ranks as daemon processes of the multiprocessing spawn context (safe with CUDA), each with
    its own error pipe so that a rank killed mid-write cannot block another's report."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._handles: list[RankHandle] = []
        self._processes: list[BaseProcess] = []  # the same ranks' processes, typed
        self._pipes: list[Connection] = []
        self._stopped = False
        self._lock = threading.Lock()

    def start(self, world_size: int, args: RankArgs) -> list[RankHandle]:
        for rank in range(1, world_size):
            reader, writer = self._ctx.Pipe(duplex=False)
            p = self._ctx.Process(target=_process_entry, args=(rank, world_size, args, PipeSink(writer), os.getpid()),
                                  name=f"shardline-tp-rank{rank}", daemon=True)
            p.start()
            writer.close()  # the child holds the only write end: EOF once it is gone
            self._pipes.append(reader)
            self._handles.append(RankHandle(rank, p.pid, p))
            self._processes.append(p)
        return list(self._handles)

    def alive(self) -> list[bool]:
        return [p.is_alive() for p in self._processes]

    def errors(self) -> list[RankError]:
        out: list[RankError] = []
        for conn in self._pipes:
            try:
                while not conn.closed and conn.poll():
                    out.append(RankError(*conn.recv()))
            except (EOFError, OSError, TypeError):
                continue  # the rank is gone; alive() says so
        return out

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            deadline = time.monotonic() + timeout
            procs = self._processes
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(2.0)
                if p.is_alive():
                    p.kill()
                    p.join(2.0)
            for conn in self._pipes:
                conn.close()
