"""Runs the check's steps one after another inside one process, each under its own time cap and all
under one budget, and writes each result the moment it exists (a run cut off still leaves them).

Two ways a step is stopped at its cap:
- cooperatively (engine steps): the step calls `Deadline.check()` between engine steps; past the
  cap it raises StepStopped, the workload aborts its requests and drains the engine (see
  shardline.bench.run_to_completion), and the same engine runs the next step;
- by an alarm (every step, and as a backstop for engine steps `hard_grace_s` after their cap):
  SIGALRM raises StepStopped in the main thread at the next Python bytecode. Code interrupted that
  way may be left half-done, so an engine step stopped by the alarm marks the engine unusable.
  A step blocked inside one long C call (a hung kernel) is stopped only when that call returns;
  benchmarks/gpu_check.sh kills the process shortly after the budget as the last resort.

Output files in the results folder: results.jsonl (one StepResult per line) and progress.log
(timestamped lines, also printed)."""

from __future__ import annotations

import json
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

OK, FAILED, STOPPED, SKIPPED = "ok", "failed", "stopped", "skipped"


class StepStopped(Exception):
    """A step ran past its time cap. `hard`: raised by the alarm, at an arbitrary point."""

    def __init__(self, message: str, hard: bool = False) -> None:
        super().__init__(message)
        self.hard = hard


@dataclass(frozen=True)
class StepSpec:
    """One step of the plan. cap_s: the most it may run; estimate_s: what it should take on an
    H200 (docs/performance.md adds these up); reserve_s: time earlier steps must leave for it."""

    name: str
    phase: str  # "environment" | "correctness" | "engine" | "baseline"
    cap_s: float
    estimate_s: float
    what: str
    reserve_s: float = 0.0


@dataclass
class StepResult:
    """What one step wrote: its status, how long it ran, and its figures (units in the key names)."""

    step: str
    phase: str
    status: str  # ok | failed | stopped | skipped
    cap_s: float
    elapsed_s: float
    since_start_s: float  # seconds from the run's start to the end of this step
    finished_at: str  # UTC, ISO 8601
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    hard_stop: bool = False  # stopped by the alarm at an arbitrary point: its engine is not reused

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, line: str) -> "StepResult":
        return cls(**json.loads(line))


class Deadline:
    """A step's cap, for cooperative checks between engine steps."""

    def __init__(self, step: str, cap_s: float) -> None:
        self.step = step
        self.cap_s = cap_s
        self.end = time.monotonic() + cap_s

    @property
    def remaining_s(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        """Raise StepStopped once the cap has passed."""
        if time.monotonic() > self.end:
            raise StepStopped(f"{self.step}: stopped at its cap of {self.cap_s:.1f} s")


class StepFailed(Exception):
    """A step ran to its end and its check did not pass; `metrics` says by how much."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


def stopped_cause(error: BaseException) -> StepStopped | None:
    """The StepStopped this error is or wraps (Triton's interpreter, for one, re-raises what a
    kernel raised as its own InterpreterError, with the original as the cause)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, StepStopped):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def alarm(step: str, seconds: float) -> Iterator[None]:
    """Raise StepStopped(hard=True) in the main thread after `seconds` (SIGALRM)."""

    def fire(signum: int, frame: Any) -> None:
        raise StepStopped(f"{step}: stopped by the alarm after {seconds:.1f} s", hard=True)

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class CheckRun:
    """The run: its budget, its results folder, the log, and every step's result in order.

    budget_s counts from `started_at` (a Unix time; benchmarks/gpu_check.sh passes its own start,
    so the install and the imports count too). `cap_overrides` replaces steps' caps by name;
    `cap_factor` multiplies the others (the caps are sized for an H200; a CPU run interprets the
    kernels and needs longer)."""

    def __init__(self, out_dir: Path, budget_s: float, started_at: float | None = None,
                 cap_overrides: dict[str, float] | None = None, cap_factor: float = 1.0,
                 hard_grace_s: float = 20.0, summary_reserve_s: float = 5.0) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.budget_s = budget_s
        started_at = time.time() if started_at is None else started_at
        self.t0 = time.monotonic() - (time.time() - started_at)
        self.cap_overrides = dict(cap_overrides or {})
        self.cap_factor = cap_factor
        self.hard_grace_s = hard_grace_s
        self.summary_reserve_s = summary_reserve_s
        self.results: list[StepResult] = []
        self.results_path = self.out_dir / "results.jsonl"
        self.log_path = self.out_dir / "progress.log"

    # ---- time ---------------------------------------------------------------------------------

    def elapsed_s(self) -> float:
        return time.monotonic() - self.t0

    def budget_left_s(self) -> float:
        return self.budget_s - self.summary_reserve_s - self.elapsed_s()

    def log(self, message: str) -> None:
        """A timestamped progress line, printed and appended to progress.log."""
        now = datetime.now(timezone.utc).strftime("%H:%M:%S")
        line = f"[{now} +{self.elapsed_s():6.1f}s] {message}"
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    # ---- steps --------------------------------------------------------------------------------

    def cap_s(self, spec: StepSpec) -> float:
        return self.cap_overrides.get(spec.name, spec.cap_s * self.cap_factor)

    def room_s(self, later: Sequence[StepSpec]) -> float:
        """The budget left for this step after what later steps reserve."""
        return self.budget_left_s() - sum(s.reserve_s for s in later)

    def skip(self, spec: StepSpec, reason: str) -> StepResult:
        return self._record(spec, SKIPPED, self.cap_s(spec), 0.0, {}, reason)

    def run(self, spec: StepSpec, fn: Callable[[Deadline], dict[str, Any]], later: Sequence[StepSpec] = (),
            cooperative: bool = False, phase_left_s: float | None = None) -> StepResult:
        """Run fn(deadline) under the step's cap (and what is left of its phase's limit, when the
        phase has one); record and return its result. fn returns the step's figures, or raises
        StepFailed (a check that did not pass), StepStopped, or any error (recorded as failed
        with its message; the run goes on)."""
        room = self.room_s(later)
        if phase_left_s is not None and phase_left_s < room:
            room, why = phase_left_s, "phase limit"
        else:
            why = "budget"
        if room < 1.0:
            return self.skip(spec, f"{why}: {max(room, 0.0):.1f} s left for this step")
        cap = min(self.cap_s(spec), room)
        self.log(f"{spec.name}: start (cap {cap:.0f} s, estimate {spec.estimate_s:.0f} s): {spec.what}")
        deadline = Deadline(spec.name, cap)
        hard_after = cap + self.hard_grace_s if cooperative else cap
        hard_after = min(hard_after, max(cap, self.budget_left_s()))
        t = time.monotonic()
        status, metrics, error, hard = OK, {}, None, False
        try:
            with alarm(spec.name, hard_after):
                metrics = fn(deadline) or {}
        except StepFailed as e:
            status, metrics, error = FAILED, e.metrics, str(e)
        except Exception as e:  # any other error fails this step only; the run goes on
            stop = stopped_cause(e)
            if stop is not None:
                status, error, hard = STOPPED, str(stop), stop.hard
            else:
                status, error = FAILED, f"{type(e).__name__}: {e}"
                with (self.out_dir / "errors.log").open("a") as f:
                    f.write(f"== {spec.name}\n{traceback.format_exc()}\n")
        return self._record(spec, status, cap, time.monotonic() - t, metrics, error, hard)

    def _record(self, spec: StepSpec, status: str, cap: float, elapsed: float, metrics: dict[str, Any],
                error: str | None, hard_stop: bool = False) -> StepResult:
        result = StepResult(step=spec.name, phase=spec.phase, status=status, cap_s=round(cap, 3),
                            elapsed_s=round(elapsed, 3), since_start_s=round(self.elapsed_s(), 3),
                            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            metrics=metrics, error=error, hard_stop=hard_stop)
        self.results.append(result)
        with self.results_path.open("a") as f:
            f.write(result.to_json() + "\n")
        figures = ", ".join(f"{k}={_short(v)}" for k, v in list(metrics.items())[:6])
        self.log(f"{spec.name}: {status.upper()} in {elapsed:.1f} s" + (f"; {figures}" if figures else "")
                 + (f"; {error}" if error else ""))
        return result


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def read_results(out_dir: Path) -> list[StepResult]:
    """The results a run wrote so far (the summary reads them when the run itself was cut off)."""
    path = Path(out_dir) / "results.jsonl"
    if not path.exists():
        return []
    return [StepResult.from_json(line) for line in path.read_text().splitlines() if line.strip()]
