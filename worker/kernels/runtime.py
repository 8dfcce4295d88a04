"""How every kernel module picks Triton or torch, and how one Triton kernel runs compiled on CUDA or
interpreted on CPU.

NOTE: the interpreter works only if TRITON_INTERPRET=1 was set before `triton` was first imported:
Triton's own library functions (tl.zeros, tl.sum, tl.sigmoid, ...) are `@triton.jit` functions
built at that import, compiled-mode or interpreted-mode for the life of the process.
`interpreter_ready()` tells which mode this process got. `Kernel` keeps the plain Python function
and builds the matching variant at the first launch, so this package's own modules may be
imported in any order.
"""

from __future__ import annotations

import os
from typing import Any, Callable, overload

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # CPU-only installs: every kernel module falls back to torch
    triton = None
    tl = None
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1 asks for the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_ready() -> bool:
    """True when this process's Triton was imported in interpreter mode (see the module note)."""
    return HAS_TRITON and isinstance(tl.zeros, InterpretedFunction)


def interpreted_bf16_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands of this dtype must be upcast to fp32 first.

    NOTE: the interpreter multiplies bf16 dot operands as their raw 16-bit patterns (numpy has no
    bf16), so under it kernels do bf16 dots in fp32; compiled kernels keep bf16 tensor-core dots.
    """
    return dtype == torch.bfloat16 and interpreter_ready()


def use_triton(x: torch.Tensor, impl: str = "auto") -> bool:
    """Whether a kernel call on `x` takes the Triton path.

    'auto': Triton for CUDA tensors when Triton is installed, torch otherwise. 'triton': always
    Triton (for CPU tensors only through the interpreter). 'torch': never.
    """
    if impl == "torch":
        return False
    if impl == "auto":
        return HAS_TRITON and x.is_cuda and not interpreter_ready()
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' asked for, but triton is not installed")
        if not x.is_cuda and not interpreter_ready():
            raise RuntimeError(
                "impl='triton' on a CPU tensor runs only in the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported"
            )
        return True
    raise ValueError(f"impl: {impl!r} is not one of {', '.join(IMPLS)}")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (tl.arange sizes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceil division, for grid sizes."""
    return -(-a // b)


class Kernel:
    """A Triton kernel launched as `kernel[grid](*args)`: compiled for CUDA tensors, interpreted when
    the process runs Triton in interpreter mode.

    do_not_specialize names runtime int arguments that change from step to step (batch sizes,
    sequence counts, table widths). Compiled Triton otherwise specializes every int argument on
    `== 1` and `% 16 == 0`, so such an argument would compile up to three variants of the kernel,
    each a multi-second stall the first time a step hits it (and a compile inside CUDA-graph
    capture if warm-up did not see that value).
    """

    def __init__(self, fn: Callable[..., Any], do_not_specialize: tuple[str, ...] = ()) -> None:
        names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        unknown = [n for n in do_not_specialize if n not in names]
        if unknown:
            raise ValueError(f"do_not_specialize: {fn.__name__} has no argument(s) {', '.join(unknown)}")
        self.fn = fn
        self.do_not_specialize = tuple(do_not_specialize)
        self._compiled: Any = None
        self._interpreted: Any = None

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
            return self._variant(on_cuda)[grid](*args, **kwargs)

        return launch

    def jit_function(self) -> Any:
        """The compiled-mode JITFunction (built once; building it compiles nothing)."""
        if self._compiled is None:
            self._compiled = JITFunction(self.fn, do_not_specialize=list(self.do_not_specialize))
        return self._compiled

    def _variant(self, on_cuda: bool) -> Any:
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed")
        if on_cuda and not interpreter_ready():
            return self.jit_function()
        if not interpreter_ready():
            raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
        if self._interpreted is None:
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted


@overload
def kernel(fn: Callable[..., Any], *, do_not_specialize: tuple[str, ...] = ()) -> Kernel: ...
@overload
def kernel(fn: None = None, *, do_not_specialize: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Kernel]: ...
def kernel(
    fn: Callable[..., Any] | None = None, *, do_not_specialize: tuple[str, ...] = ()
) -> Kernel | Callable[[Callable[..., Any]], Kernel]:
    """Decorator standing in for `triton.jit` on this package's kernels (see the module note):
    `@kernel`, or `@kernel(do_not_specialize=("num_seqs",))` for step-varying int arguments."""
    if fn is None:
        return lambda f: Kernel(f, do_not_specialize)
    return Kernel(fn, do_not_specialize)
