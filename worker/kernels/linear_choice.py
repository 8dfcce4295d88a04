"""Per-shape choice between cuBLAS and the matvec kernel, measured once per shape on the GPU.

NOTE: measuring launches kernels and synchronizes, so the engine should call pick_linear_impl for
its decode shapes during warm-up; called while a CUDA graph is being captured it never measures
and answers with the table's entry or cuBLAS.

The table is process-wide, so a process measures each shape once. Across processes it can be
saved and loaded (save_linear_choices / load_linear_choices, a JSON file): a loaded table is used
only when its fingerprint matches this machine's (GPU name, torch and Triton versions, the source
of this module and of the matvec kernel), so a saved table never answers for other hardware or
other code. The GPU check (shardline/check/) writes it and reads it back on the next run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from shardline.worker.kernels import matvec as matvec_module
from shardline.worker.kernels.matvec import MAX_M, MatvecConfig, default_config, matvec
from shardline.worker.kernels.runtime import HAS_TRITON, cdiv, triton


@dataclass(frozen=True)
class LinearImpl:
    """What computes x @ w.T for one shape: 'torch' (cuBLAS) or 'triton' with its config."""

    kind: str
    config: MatvecConfig | None = None
    torch_ms: float | None = None  # the measurements the choice came from (None when not measured)
    triton_ms: float | None = None

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "triton":
            return matvec(x, w, self.config, impl="triton")
        return F.linear(x, w)


TORCH = LinearImpl("torch")


def _candidates(M: int, N: int, K: int, num_sms: int) -> list[MatvecConfig]:
    base = default_config(M, N, K, num_sms)
    out = {base}
    for block_n, block_k in ((16, 512), (32, 256), (64, 128), (64, 256), (128, 128)):
        if block_k > K:
            continue
        programs = cdiv(N, block_n)
        for split in (1, 2, 4, 8, 16):
            if K // split < block_k or programs * split > 16 * num_sms:
                continue
            out.add(MatvecConfig(block_n, block_k, split))
    return sorted(out, key=lambda c: (c != base, c.block_n, c.block_k, c.split_k))[:12]


def _time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


class LinearAutotuner:
    """The measured table: (M, N, K, dtype, device) -> LinearImpl, filled on first use per shape."""

    def __init__(self, margin: float = 0.97) -> None:
        self.margin = margin  # Triton must beat cuBLAS by 3% to be picked: noise should not flip choices
        self.table: dict[tuple[int, int, int, torch.dtype, str], LinearImpl] = {}

    def pick(self, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str) -> LinearImpl:
        """The table's choice for this shape, measuring it first if it is new (CUDA only)."""
        device = torch.device(device)
        if device.type != "cuda" or not HAS_TRITON or not 1 <= M <= MAX_M:
            return TORCH
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (M, N, K, dtype, str(device))
        if key not in self.table:
            if torch.cuda.is_current_stream_capturing():
                return TORCH
            self.table[key] = self.measure(M, N, K, dtype, device)
        return self.table[key]

    def measure(self, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> LinearImpl:
        """Time cuBLAS and each candidate config on random data of this shape; keep the fastest."""
        x = torch.randn(M, K, dtype=dtype, device=device)
        w = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
        with torch.cuda.device(device):
            torch_ms = _time_ms(lambda: F.linear(x, w))
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            best: tuple[float, MatvecConfig] | None = None
            for cfg in _candidates(M, N, K, num_sms):
                try:
                    ms = _time_ms(lambda cfg=cfg: matvec(x, w, cfg, impl="triton"))
                except Exception:  # a config the compiler rejects (e.g. out of shared memory) is skipped
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
        if best is not None and best[0] < self.margin * torch_ms:
            return LinearImpl("triton", best[1], torch_ms, best[0])
        return LinearImpl("torch", None, torch_ms, best[0] if best else None)


    def to_json(self, fingerprint: str) -> dict:
        """The measured table as JSON-ready data, tagged with the machine's fingerprint."""
        entries = [{"M": M, "N": N, "K": K, "dtype": str(dtype).removeprefix("torch."), "kind": impl.kind,
                    "config": asdict(impl.config) if impl.config else None,
                    "torch_ms": impl.torch_ms, "triton_ms": impl.triton_ms}
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
                self.table[key] = LinearImpl(e["kind"], config, e.get("torch_ms"), e.get("triton_ms"))
                added += 1
        return added


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
    """The process-wide table as it stands (a copy): (M, N, K, dtype, device) -> choice."""
    return dict(_DEFAULT_TUNER.table)


def pick_linear_impl(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | str) -> LinearImpl:
    """cuBLAS or the matvec kernel for x[M, K] @ w[N, K]^T, from the process-wide measured table
    (always cuBLAS/torch off CUDA or for M > 16)."""
    return _DEFAULT_TUNER.pick(M, N, K, dtype, device)
