"""Building and loading shardline's C++ CPU kernels (block_matmul.cpp: the 4-bit and 8-bit block
matmuls with int8 activations; decode_layer.cpp: a whole decoder layer for small decode batches;
block_kernels.h: their shared AVX2 pieces) through torch.utils.cpp_extension, once per machine.

The build is JIT: the first process that needs the kernels compiles block_matmul.cpp with the
system's C++ compiler and ninja (a few seconds: it includes ATen's headers only, not torch's Python
API) into ~/.cache/shardline/torch_extensions/ (SHARDLINE_EXTENSIONS_DIR overrides it), and every
later process loads the cached library (torch rebuilds it when the source changes; a file lock
keeps concurrent processes from building twice). The kernels need AVX2, FMA and F16C; on a CPU
without them, without a compiler, or when the build fails, `block_kernels()` returns None, logs
one line saying why, and the quantized layers use torch's int4 / int8 kernels instead.
SHARDLINE_CPU_KERNELS=0 turns the kernels off (the torch path, e.g. to compare the two)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("block_matmul.cpp", "decode_layer.cpp")]
_HEADER = Path(__file__).with_name("block_kernels.h")
_NAME = "shardline_cpu_block_matmul"
_CPU_FLAGS = ("avx2", "fma", "f16c")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _build_dir() -> Path:
    root = os.environ.get("SHARDLINE_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "shardline",
                                                                       "torch_extensions")
    path = Path(root) / _NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv's ninja (the pip package) is not on it unless the venv is
    activated, so add the interpreter's bin folder when no ninja is found."""
    if shutil.which("ninja") is None:
        bin_dir = os.path.dirname(sys.executable)
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@functools.lru_cache(maxsize=1)
def block_kernels() -> Any | None:
    """torch.ops.shardline_cpu (q4_matmul, q8_matmul, quantize_rows, decode_layer), built or loaded once per process;
    None (and one log line) where they cannot run here."""
    if os.environ.get("SHARDLINE_CPU_KERNELS", "1") == "0":
        log.info("CPU block kernels: off (SHARDLINE_CPU_KERNELS=0); quantized layers use torch's int4/int8 kernels")
        return None
    missing = [f for f in _CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        log.info("CPU block kernels: this CPU lacks %s; quantized layers use torch's int4/int8 kernels",
                 ", ".join(missing))
        return None
    import torch
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    # torch rebuilds when a source or a flag changes; the header's hash as a flag covers the header
    header_sha = hashlib.sha1(_HEADER.read_bytes()).hexdigest()[:12]
    start = time.monotonic()
    try:
        cpp_extension.load(name=_NAME, sources=[str(p) for p in _SOURCES], build_directory=str(_build_dir()),
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", f"-DSHARDLINE_HEADER_SHA={header_sha}"], is_python_module=False, verbose=False)
    except Exception as exc:  # a missing compiler or ninja, a failed build: fall back, say why
        log.warning("CPU block kernels: build failed (%s: %s); quantized layers use torch's int4/int8 kernels",
                    type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
        return None
    log.debug("CPU block kernels loaded in %.1f s", time.monotonic() - start)
    return torch.ops.shardline_cpu
