"""Per-shape choice between cuBLAS and the matvec kernel, measured at start-up the way it is served.

What is measured (issue 18): each candidate, cuBLAS included, runs inside one captured CUDA graph
over rotating copies of the weight (enough copies to overflow the L2 cache three times), so a
kernel is timed at memory speed and without Python launch overhead, as it runs in a decode graph.
Timing 20 eager calls on one weight, as before, hid the 8-30 us kernels behind launch time and let
a 33.5 MB weight stay in the 50 MB L2, so cuBLAS's single launch won at cache speed. Before it may
be timed, each candidate's output is compared with an fp32 reference on the same data: a config
that computes a wrong result (a compiler bug, a bad tile) can never win.

When it is measured: only while tuning is open (`linear_tuning()`, or `tune_linear_shapes`, which
the executors call at start-up for every float linear of the model). Batches are grouped in the
buckets M_BUCKETS (1, 2, 3-4, 5-8, 9-16); each bucket is measured once at its largest M, the worst
case of its members, and its choice answers every M in it. Outside tuning, `pick` never measures:
a shape that was not tuned is served by cuBLAS (no host sync, no weight copies mid-serving).
FP8 weights use the same tuner with another `trial` (worker/kernels/fp8_linear_choice.py): one
`measure(trial, timer)` times and checks both.

The table is process-wide. Across processes it can be saved and loaded (save_linear_choices /
load_linear_choices, a JSON file): a loaded table is used only when its fingerprint matches this
machine's (GPU name, torch and Triton versions, the source of this module and of the matvec
kernel), so a saved table never answers for other hardware or other code. The GPU check
(shardline/check/) writes it and reads it back on the next run.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from shardline.worker.kernels import matvec as matvec_module
from shardline.worker.kernels.matvec import FMA_MAX_M, MAX_M, MatvecConfig, default_config, matvec
from shardline.worker.kernels.runtime import HAS_TRITON, cdiv, next_pow2, triton

M_BUCKETS = (1, 2, 4, 8, 16)  # a batch of M rows is served by the choice measured at the smallest bucket >= M
FMA_ACC_PER_THREAD = 64  # fp32 accumulator registers a FMA-path config may hold per thread (more spills)
MAX_CANDIDATES = 8  # Triton configs timed per bucket and shape (each distinct one is a compile at start-up)
DEFAULT_L2_BYTES = 50 * 2**20  # an H100/H200's L2, when the device does not report its own
L2_OVERFLOW = 3  # rotating weight copies add up to at least this many L2 sizes
MAX_COPIES = 64


@dataclass(frozen=True)
class LinearImpl:
    """What computes x @ w.T for one shape: 'torch' (cuBLAS) or 'triton' with its config.

    torch_ms / triton_ms: per-call times the choice came from (cuBLAS, best correct Triton config;
    None when not measured); rejected: candidate configs whose output failed the reference check."""

    kind: str
    config: MatvecConfig | None = None
    torch_ms: float | None = None
    triton_ms: float | None = None
    rejected: int = 0

    def weight_gb_per_s(self, N: int, K: int, dtype: torch.dtype) -> float | None:
        """The weight stream the chosen implementation achieved when measured: N * K elements of
        `dtype` over its per-call time, in GB/s (None when not measured)."""
        ms = self.triton_ms if self.kind == "triton" else self.torch_ms
        if not ms:
            return None
        return N * K * torch.empty((), dtype=dtype).element_size() / (ms * 1e-3) / 1e9

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "triton":
            return matvec(x, w, self.config, impl="triton")
        return F.linear(x, w)


TORCH = LinearImpl("torch")

# timer(candidate, run, copies) -> milliseconds per call, where run(i) computes with weight copy i.
Timer = Callable[[LinearImpl, Callable[[int], object], int], float]


def bucket_of(M: int) -> int:
    """The bucket whose measured choice serves a batch of M rows (1 <= M <= 16)."""
    for top in M_BUCKETS:
        if M <= top:
            return top
    raise ValueError(f"M: {M} is above the largest matvec bucket {M_BUCKETS[-1]}")


def fma_registers(M: int, cfg: MatvecConfig) -> int:
    """fp32 accumulator registers per thread of a FMA-path (M <= 4) launch of `cfg`."""
    return next_pow2(M) * cfg.block_n * cfg.block_k // (32 * cfg.num_warps)


def candidates(M: int, N: int, K: int, num_sms: int) -> list[MatvecConfig]:
    """The configs timed for this shape: the default first, then tiles that keep the FMA path's
    accumulator in registers and the grid within 16 programs per SM, split-K only while N alone
    gives fewer programs than SMs; at most MAX_CANDIDATES."""
    base = default_config(M, N, K, num_sms)
    out = {base}
    for block_n, block_k in ((16, 512), (16, 256), (32, 256), (16, 128), (32, 128), (64, 128), (128, 128)):
        if block_k > max(16, next_pow2(K)):
            continue
        programs = cdiv(N, block_n)
        for split in (1, 2, 4, 8):
            cfg = MatvecConfig(block_n, block_k, split)
            if K // split < block_k or programs * split > 16 * num_sms:
                continue
            if split > 1 and programs >= num_sms:
                continue
            if M <= FMA_MAX_M and fma_registers(M, cfg) > FMA_ACC_PER_THREAD:
                continue
            out.add(cfg)
    return sorted(out, key=lambda c: (c != base, c.split_k, c.block_n, c.block_k))[:MAX_CANDIDATES]


def weight_copies(N: int, K: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many copies of an [N, K] weight rotate through a timing so none is still in L2 when
    its turn comes again (1 for a weight that alone overflows L2 three times, at most MAX_COPIES)."""
    l2 = DEFAULT_L2_BYTES
    if device.type == "cuda":
        l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or l2)
    per_copy = N * K * torch.empty((), dtype=dtype).element_size()
    return max(1, min(MAX_COPIES, cdiv(L2_OVERFLOW * l2, per_copy)))


def graph_timer(candidate: LinearImpl, run: Callable[[int], object], copies: int, replays: int = 5) -> float:
    """Milliseconds per call of `run` over copies 0..copies-1, captured in one CUDA graph and
    replayed `replays` times (after one untimed replay). The eager pass before capture compiles
    the kernel and allocates what it keeps (split-K tickets)."""
    for i in range(copies):
        run(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            run(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / (replays * copies)
    del graph
    return ms


def matches_reference(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether a candidate's output equals the fp32 reference within its dtype's rounding (outputs
    of magnitude ~1: inputs N(0, 1), weights N(0, 1/K))."""
    tol = 1e-3 if out.dtype == torch.float32 else 3e-2
    return bool(out.shape == ref.shape and torch.allclose(out.float(), ref, atol=tol, rtol=tol))


@dataclass(frozen=True)
class Candidate:
    """One implementation to time: `impl` (what the timer and the table are told) and run(i), its
    call on weight copy i (run(0)'s output is what the reference check reads)."""

    impl: LinearImpl
    run: Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class Trial:
    """What `measure` times for one (M, N, K): the baseline (cuBLAS, or W8A8 for FP8 weights), the
    Triton candidates, the fp32 reference on weight copy 0, and how many weight copies rotate."""

    baseline: Candidate
    candidates: list[Candidate]
    reference: torch.Tensor
    copies: int


@dataclass(frozen=True)
class Measurement:
    """baseline_ms; the fastest candidate whose output matched the reference and its time (None
    when none did, or every one failed to compile); how many failed the check (never timed)."""

    baseline_ms: float
    best: LinearImpl | None
    best_ms: float | None
    rejected: int

    def choice(self, margin: float) -> LinearImpl:
        """The best candidate if it beats the baseline by `margin` (a ratio < 1), else the
        baseline ('torch'); with both times attached."""
        if self.best is not None and self.best_ms is not None and self.best_ms < margin * self.baseline_ms:
            return LinearImpl("triton", self.best.config, self.baseline_ms, self.best_ms, self.rejected)
        return LinearImpl("torch", None, self.baseline_ms, self.best_ms, self.rejected)


def measure(trial: Trial, timer: Timer) -> Measurement:
    """Time the baseline, then every candidate whose output matches the reference (a candidate that
    raises, e.g. a config the compiler rejects, is skipped); the one timing both tuners use."""
    baseline_ms = timer(trial.baseline.impl, trial.baseline.run, trial.copies)
    best: tuple[float, LinearImpl] | None = None
    rejected = 0
    for cand in trial.candidates:
        try:
            if not matches_reference(cand.run(0), trial.reference):
                rejected += 1
                continue
            ms = timer(cand.impl, cand.run, trial.copies)
        except Exception:  # a config the compiler rejects (e.g. out of shared memory) is skipped
            continue
        if best is None or ms < best[0]:
            best = (ms, cand.impl)
    return Measurement(baseline_ms, best[1] if best else None, best[0] if best else None, rejected)


def num_sms_of(device: torch.device) -> int:
    """The device's SM count (132, an H100's, off CUDA: the candidate list's shape-only guess)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


class LinearAutotuner:
    """The measured table: (bucket, N, K, dtype, device) -> LinearImpl, filled only while tuning.

    timer: how a candidate is timed (graph_timer on CUDA; tests inject their own); allow_cpu: let
    `pick` answer for CPU devices from the table (tests run the kernels through the interpreter);
    margin: Triton must beat cuBLAS by 3% to be picked, so noise does not flip choices."""

    def __init__(self, margin: float = 0.97, timer: Timer | None = None, allow_cpu: bool = False) -> None:
        self.margin = margin
        self.timer: Timer = timer or graph_timer
        self.allow_cpu = allow_cpu
        self.table: dict[tuple[int, int, int, torch.dtype, str], LinearImpl] = {}
        self.tuning_open = False
        self.untuned_picks = 0  # picks of a shape the table lacks outside tuning (served by cuBLAS)

    @contextmanager
    def tuning(self) -> Iterator[None]:
        """Inside: `pick` measures the shapes the table lacks (start-up only)."""
        previous, self.tuning_open = self.tuning_open, True
        try:
            yield
        finally:
            self.tuning_open = previous

    def pick(self, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str) -> LinearImpl:
        """The choice for a batch of M rows: its bucket's table entry; measured first only while
        tuning is open and no graph is being captured; cuBLAS otherwise."""
        device = torch.device(device)
        if not HAS_TRITON or not 1 <= M <= MAX_M or (device.type != "cuda" and not self.allow_cpu):
            return TORCH
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (bucket_of(M), N, K, dtype, str(device))
        found = self.table.get(key)
        if found is not None:
            return found
        if not self.tuning_open or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self.untuned_picks += 1
            return TORCH
        self.table[key] = self.measure(key[0], N, K, dtype, device)
        return self.table[key]

    def tune(self, shapes: Iterable[tuple[int, int]], dtype: torch.dtype, device: torch.device | str) -> int:
        """Decide every bucket of every (N, K) weight shape; returns how many were measured now."""
        before = len(self.table)
        with self.tuning():
            for N, K in dict.fromkeys(shapes):
                for top in M_BUCKETS:
                    self.pick(top, N, K, dtype, device)
        return len(self.table) - before

    def measure(self, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> LinearImpl:
        """Time the baseline and each candidate config that matches the reference; keep the fastest
        (`measure` over this tuner's `trial`)."""
        with torch.cuda.device(device) if device.type == "cuda" else _no_context():
            trial = self.trial(M, N, K, dtype, device)
            result = measure(trial, self.timer)
        del trial  # the weight copies
        return result.choice(self.margin)

    def trial(self, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> Trial:
        """cuBLAS against the matvec configs on random float data of this shape."""
        copies = weight_copies(N, K, dtype, device)
        g = torch.Generator(device=device).manual_seed(M * 7919 + N + K)
        x = torch.randn(M, K, generator=g, device=device).to(dtype)
        ws = [(torch.randn(N, K, generator=g, device=device) / K**0.5).to(dtype) for _ in range(copies)]
        ref = x.float() @ ws[0].float().T
        cands = [Candidate(impl, _on_copy(impl, x, ws)) for impl in self.candidate_impls(M, N, K, num_sms_of(device))]
        return Trial(Candidate(TORCH, lambda i: F.linear(x, ws[i])), cands, ref, copies)

    def candidate_impls(self, M: int, N: int, K: int, num_sms: int) -> list[LinearImpl]:
        """The Triton implementations `measure` checks and times (overridable by tests)."""
        return [LinearImpl("triton", cfg) for cfg in candidates(M, N, K, num_sms)]

    def to_json(self, fingerprint: str) -> dict:
        """The measured table as JSON-ready data, tagged with the machine's fingerprint."""
        entries = [{"M": M, "N": N, "K": K, "dtype": str(dtype).removeprefix("torch."), "kind": impl.kind,
                    "config": asdict(impl.config) if impl.config else None,
                    "torch_ms": impl.torch_ms, "triton_ms": impl.triton_ms, "rejected": impl.rejected}
                   for (M, N, K, dtype, _), impl in self.table.items()]
        return {"fingerprint": fingerprint, "entries": entries}

    def load_json(self, data: dict, fingerprint: str, device: torch.device | str) -> int:
        """Add a saved table's entries for `device` (shapes already measured here are kept); returns
        how many were added, 0 when the fingerprint differs."""
        if data.get("fingerprint") != fingerprint:
            return 0
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        added = 0
        for e in data.get("entries", []):
            key = (int(e["M"]), int(e["N"]), int(e["K"]), getattr(torch, e["dtype"]), str(device))
            if key not in self.table:
                config = MatvecConfig(**e["config"]) if e.get("config") else None
                self.table[key] = LinearImpl(e["kind"], config, e.get("torch_ms"), e.get("triton_ms"), int(e.get("rejected", 0)))
                added += 1
        return added


@contextmanager
def _no_context() -> Iterator[None]:
    yield


def _on_copy(impl: LinearImpl, x: torch.Tensor, ws: list[torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """run(i): `impl` on x and weight copy i."""
    return lambda i: impl(x, ws[i])


def machine_fingerprint(device: torch.device | str) -> str:
    """What a measured table depends on: the GPU, torch, Triton and the source of the kernels."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    h = hashlib.sha256(f"{name}|{torch.__version__}|{getattr(triton, '__version__', None)}".encode())
    for source in (Path(matvec_module.__file__), Path(__file__)):
        h.update(source.read_bytes())
    return f"{name}|{h.hexdigest()[:16]}"


_DEFAULT_TUNER = LinearAutotuner()


def save_linear_choices(path: str | Path, device: torch.device | str) -> int:
    """Write the process-wide table to `path` (JSON); returns the number of entries."""
    data = _DEFAULT_TUNER.to_json(machine_fingerprint(device))
    Path(path).write_text(json.dumps(data, indent=1))
    return len(data["entries"])


def load_linear_choices(path: str | Path, device: torch.device | str) -> int:
    """Add the entries of a table saved on this machine (same fingerprint) to the process-wide
    table, so those shapes are not measured again; returns how many (0 for a missing file)."""
    path = Path(path)
    if not path.is_file():
        return 0
    return _DEFAULT_TUNER.load_json(json.loads(path.read_text()), machine_fingerprint(device), device)


def linear_choices() -> dict[tuple[int, int, int, torch.dtype, str], LinearImpl]:
    """The process-wide table as it stands (a copy): (bucket, N, K, dtype, device) -> choice."""
    return dict(_DEFAULT_TUNER.table)


def linear_tuning() -> AbstractContextManager[None]:
    """Context manager: inside it the process-wide table measures shapes it lacks (start-up)."""
    return _DEFAULT_TUNER.tuning()


def tune_linear_shapes(shapes: Iterable[tuple[int, int]], dtype: torch.dtype, device: torch.device | str) -> int:
    """Decide every M bucket of every (N, K) weight shape in the process-wide table, at start-up
    (CUDA only; elsewhere nothing is measured). Returns how many entries were measured now."""
    if torch.device(device).type != "cuda" or not HAS_TRITON:
        return 0
    return _DEFAULT_TUNER.tune(shapes, dtype, device)


def pick_linear_impl(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str) -> LinearImpl:
    """cuBLAS or the matvec kernel for x[M, K] @ w[N, K]^T, from the process-wide table (always
    cuBLAS/torch off CUDA, for M > 16, and for shapes not tuned at start-up)."""
    return _DEFAULT_TUNER.pick(M, N, K, dtype, device)
