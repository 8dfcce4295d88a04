"""4-bit and 8-bit block-quantized linears on CPU through shardline's own C++ kernels
(block_matmul.cpp, built by cpu_extension.py): the layout GGUF's Q4_0 / Q4_1 / Q8_0 files already
have, kept as it is, and multiplied with int8 activations.

Storage (per output row, per 32 input features: one block):
  * Q4BlockCPU: codes uint8 [N, K / 2] (byte j of a block: weight j low nibble, weight j + 16 high
    nibble), fp16 scale d and fp16 offset m [N, K / 32]; w = d q + m, q in 0..15. GGUF Q4_1 (d, m)
    and Q4_0 (d, -8 d) are exact in fp16; on-the-fly int4 and AWQ / GPTQ scales and offsets are
    rounded to fp16 (2^-11 relative each).
  * Q8BlockCPU: codes int8 [N, K], fp16 scale d [N, K / 32]; w = d q. GGUF Q8_0 is exact; per-row
    int8 (the `int8` scheme) repeats its row scale in every block, rounded to fp16.
Groups larger than 32 (64, 128, ...) repeat their scale and offset in each of their blocks.

The matmul (block_matmul.cpp has the details): up to 16 rows, q4 quantizes the activations to int8
per 32-block (dx = max|x| / 127, as llama.cpp does) and multiplies with integer dot products: the
error of an output is at most sum over blocks of |d| * sum(q) * dx / 2, the activations' rounding;
up to 4 rows, q8 (the LM head) multiplies the float activations by the widened codes (float32 rounding only: with
int8 activations the default model's first answer token moved). More rows dequantize a tile of
weights to float32 and use the float GEMM (float32 rounding only). tests/test_quantization.py
checks these bounds against a float64 reference of `dequantized()`.

Steps that hold prompt rows (`prompt_step`, set by the model runner from StepInputs.has_prompt_rows)
take the float GEMM at every size: int8 activations in the prefill derailed the default model's
answers, and a prompt's logits must not depend on how many of its rows a prefix-cache hit left to
compute (docs/quantization.md, "Greedy output and the rows of a call")."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import torch

from .base import QuantMethod
from .cpu_extension import block_kernels
from .group_quantized import GroupQuantized

BLOCK = 32

# Whether the step being computed holds prompt rows (the q4 integer path is then off for its calls).
_PROMPT_STEP: contextvars.ContextVar[bool] = contextvars.ContextVar("shardline_prompt_step", default=False)


@contextlib.contextmanager
def prompt_step(has_prompt_rows: bool) -> Iterator[None]:
    """Within it, q4 calls (Q4BlockCPU, the fused CPU decode layer) take the float GEMM path when
    `has_prompt_rows`, whatever their row count."""
    token = _PROMPT_STEP.set(has_prompt_rows)
    try:
        yield
    finally:
        _PROMPT_STEP.reset(token)


def in_prompt_step() -> bool:
    """Whether the step being computed holds prompt rows (see prompt_step)."""
    return _PROMPT_STEP.get()


def block_kernels_fit(weight: GroupQuantized) -> Any | None:
    """The kernels' op namespace when they run here and can take these codes as they are (4- or
    8-bit integer codes, groups of a multiple of 32 features); else None."""
    if weight.bits not in (4, 8) or weight.codes.dtype not in (torch.uint8, torch.int8):
        return None
    cols = weight.shape[1]
    if cols % BLOCK or weight.group_size % BLOCK or cols % weight.group_size:
        return None
    return block_kernels()


def _per_block(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K / group] per-group values -> fp16 [N, K / 32] per-block values."""
    return t.repeat_interleave(group_size // BLOCK, dim=1).to(torch.float16).contiguous()


def _x2d(x: torch.Tensor, k: int) -> torch.Tensor:
    a = x if x.dim() == 2 else x.reshape(-1, k)
    return a if a.dtype == torch.float32 else a.float()


class Q4BlockCPU(QuantMethod):
    """Packed 4-bit codes [N, K / 2], fp16 scales and offsets [N, K / 32]; y = x W^T (float32 compute)."""

    name = "q4_block"

    codes: torch.Tensor  # registered buffers (move with .to())
    scales: torch.Tensor
    offsets: torch.Tensor

    def __init__(self, weight: GroupQuantized, device: torch.device | str | None = None) -> None:
        super().__init__()
        ops = block_kernels_fit(weight)
        if ops is None or weight.bits != 4:
            raise ValueError(f"q4 block kernel: {weight.source} weight with {weight.bits}-bit codes, group size "
                             f"{weight.group_size}, {weight.shape[1]} input features does not fit (needs 4-bit codes, "
                             "multiples of 32, and the kernels built on an AVX2 CPU)")
        self._ops = ops
        self._int_dot_max_rows = int(ops.q4_int_dot_max_rows())
        n, k = weight.shape
        self.out_features, self.in_features = n, k
        blocks = weight.codes.to(torch.uint8).reshape(n, k // BLOCK, BLOCK)
        packed = (blocks[:, :, : BLOCK // 2] | (blocks[:, :, BLOCK // 2 :] << 4)).reshape(n, k // 2)
        offsets = weight.offsets if weight.offsets is not None else torch.zeros_like(weight.scales)
        self.register_buffer("codes", packed.contiguous().to(device))
        self.register_buffer("scales", _per_block(weight.scales, weight.group_size).to(device))
        self.register_buffer("offsets", _per_block(offsets, weight.group_size).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        int_rows = 0 if in_prompt_step() else self._int_dot_max_rows
        y = self._ops.q4_matmul(_x2d(x, self.in_features), self.codes, self.scales, self.offsets, int_rows)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        blocks = self.codes.reshape(n, k // BLOCK, BLOCK // 2)
        q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).float()
        return (q * self.scales.float().unsqueeze(-1) + self.offsets.float().unsqueeze(-1)).reshape(n, k)


class Q8BlockCPU(QuantMethod):
    """int8 codes [N, K] and fp16 scales [N, K / 32]; y = x W^T (float32 compute). Also the token
    embedding of a quantized model: a lookup gathers rows of the same codes."""

    name = "q8_block"

    codes: torch.Tensor  # registered buffers (move with .to())
    scales: torch.Tensor

    def __init__(self, weight: GroupQuantized, device: torch.device | str | None = None) -> None:
        super().__init__()
        ops = block_kernels_fit(weight)
        if ops is None or weight.bits != 8 or weight.offsets is not None:
            raise ValueError(f"q8 block kernel: {weight.source} weight with {weight.bits}-bit codes, group size "
                             f"{weight.group_size}, {weight.shape[1]} input features does not fit (needs symmetric "
                             "8-bit codes, multiples of 32, and the kernels built on an AVX2 CPU)")
        self._ops = ops
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", weight.codes.to(torch.int8).contiguous().to(device))
        self.register_buffer("scales", _per_block(weight.scales, weight.group_size).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._ops.q8_matmul(_x2d(x, self.in_features), self.codes, self.scales)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized to `dtype` (the token embedding's lookup)."""
        rows = self.codes[ids].float().unflatten(-1, (-1, BLOCK)) * self.scales[ids].float().unsqueeze(-1)
        return rows.flatten(-2).to(dtype)

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        return (self.codes.float().reshape(n, k // BLOCK, BLOCK) * self.scales.float().unsqueeze(-1)).reshape(n, k)
