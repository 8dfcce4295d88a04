"""The gated MLP's activation-and-mul (SiLU for the Llama family, tanh-approximated GELU for Gemma):
gate and up halves read once, one output written."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.worker.kernels.runtime import cdiv, kernel, tl, use_triton


_GELU_TANH_C = 0.7978845608028654  # sqrt(2 / pi)


@kernel
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr,
                         GELU_TANH: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:
        # 0.5 * g * (1 + tanh(u)) == g * sigmoid(2u), u = sqrt(2/pi) * (g + 0.044715 g^3)
        y = gate * tl.sigmoid(2.0 * _GELU_TANH_C * (gate + 0.044715 * gate * gate * gate)) * up
    else:
        y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] in plain torch."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def gelu_tanh_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x[..., :I]) * x[..., I:] in plain torch (transformers' gelu_pytorch_tanh)."""
    half = x.shape[-1] // 2
    return F.gelu(x[..., :half], approximate="tanh") * x[..., half:]


def act_and_mul(x: torch.Tensor, act: str = "silu", impl: str = "auto") -> torch.Tensor:
    """x [..., 2I] (gate first, then up) -> act(gate) * up [..., I]; `act` is silu or
    gelu_pytorch_tanh (a ValueError otherwise)."""
    if act == "silu":
        return silu_and_mul(x, impl)
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"act_and_mul: activation {act!r} is not one of silu, gelu_pytorch_tanh")
    return silu_and_mul(x, impl, gelu_tanh=True)


def silu_and_mul(x: torch.Tensor, impl: str = "auto", gelu_tanh: bool = False) -> torch.Tensor:
    """x [..., 2I] (gate first, then up) -> silu(gate) * up [..., I], computed in fp32 on the
    Triton path (`gelu_tanh`: the tanh-approximated GELU instead of SiLU)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim must be even, got {x.shape[-1]}")
    if not use_triton(x, impl):
        return gelu_tanh_and_mul_reference(x) if gelu_tanh else silu_and_mul_reference(x)
    half = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], half, dtype=x.dtype, device=x.device)
    block = 1024
    if x2.shape[0] and half:
        _silu_and_mul_kernel[(x2.shape[0], cdiv(half, block))](x2, out, half, x2.stride(0), out.stride(0), BLOCK=block,
                                                                    GELU_TANH=gelu_tanh)
    return out.view(*x.shape[:-1], half)

