"""How every kernel module picks Triton or torch, and how one Triton kernel runs compiled on CUDA or
interpreted on CPU.

NOTE: `triton.jit` decides between the compiler and the interpreter once, when the decorated module
is imported, by reading TRITON_INTERPRET at that moment. That makes the interpreter depend on import
order (any earlier import of a kernel module fixes the choice for the whole process). `Kernel`
instead keeps the plain Python function and builds the compiled or the interpreted variant at
launch, from where the tensors live and what TRITON_INTERPRET says then.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # CPU-only installs: every kernel module falls back to torch
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1 asks for the Triton interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor, impl: str = "auto") -> bool:
    """Whether a kernel call on `x` takes the Triton path.

    'auto': Triton for CUDA tensors when Triton is installed, torch otherwise. 'triton': always
    Triton (on CPU only through the interpreter, so TRITON_INTERPRET=1 must be set). 'torch': never.
    """
    if impl == "torch":
        return False
    if impl == "auto":
        return HAS_TRITON and x.is_cuda
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' asked for, but triton is not installed")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError("impl='triton' on a CPU tensor runs only in the interpreter: set TRITON_INTERPRET=1")
        return True
    raise ValueError(f"impl: {impl!r} is not one of {', '.join(IMPLS)}")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (tl.arange sizes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceil division, for grid sizes."""
    return -(-a // b)


class Kernel:
    """A Triton kernel launched as `kernel[grid](*args)`: compiled for CUDA tensors, interpreted for
    CPU tensors or whenever TRITON_INTERPRET=1."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: Any = None

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
            return self._variant(on_cuda)[grid](*args, **kwargs)

        return launch

    def _variant(self, on_cuda: bool) -> Any:
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed")
        if on_cuda and not interpreter_enabled():
            if self._compiled is None:
                self._compiled = JITFunction(self.fn)
            return self._compiled
        if self._interpreted is None:
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted


def kernel(fn: Callable[..., Any]) -> Kernel:
    """Decorator standing in for `triton.jit` on this package's kernels (see the module note)."""
    return Kernel(fn)
