"""Megatron-style linear layers. Column-parallel layers split the output features across ranks;
row-parallel layers split the input features and all-reduce their partial sums. With world size 1
they are plain linear layers. Each layer pulls only its rank's slice from a LazyWeight.

With an active QuantizationConfig a layer holds no float weight: it stages its rank's pieces (GGUF
codes as they are, float slices to be quantized) and, once loaded, `finish_loading` packs them into
the scheme's QuantMethod, which then does the matmul (worker/layers/quantization)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardline.worker.kernels.linear_choice import pick_linear_impl
from shardline.worker.kernels.matvec import MAX_M, PreNorm, matvec, normed_matvec
from shardline.worker.kernels.runtime import use_triton
from shardline.worker.layers.quantization import QuantizationConfig, QuantizedWeightStager, QuantMethod
from shardline.worker.loader.weights import LazyWeight
from shardline.worker.parallel.context import ParallelContext


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """x @ weight.T (+ bias). Small batches (1..16 rows, i.e. decode) on CUDA go to whichever of
    cuBLAS and the Triton matvec measured faster for this shape; 'triton' forces the matvec kernel
    (CPU tensors through the interpreter), 'torch' forces F.linear."""
    if impl != "torch" and x.dim() == 2 and 1 <= x.shape[0] <= MAX_M:
        if impl == "triton":
            y = matvec(x, weight, impl="triton")
            return y if bias is None else y + bias
        if use_triton(x, impl):
            y = pick_linear_impl(x.shape[0], weight.shape[0], weight.shape[1], x.dtype, x.device)(x, weight)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def gated_linear(gate_up: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor | None:
    """silu(gate) * up @ weight.T in one matvec launch (gate_up [M, 2K], gate first; weight [N, K]),
    when this batch's linear runs the Triton matvec: 1..16 rows and 'triton' forced, or 'auto' on
    CUDA with the start-up table's choice 'triton' for this shape. None otherwise: the caller
    runs SiLU-and-mul, then its linear."""
    if impl == "torch" or gate_up.dim() != 2 or not 1 <= gate_up.shape[0] <= MAX_M:
        return None
    if impl == "triton":
        return matvec(gate_up, weight, impl="triton", gated=True)
    if use_triton(gate_up, impl):
        choice = pick_linear_impl(gate_up.shape[0], weight.shape[0], weight.shape[1], gate_up.dtype, gate_up.device)
        if choice.kind == "triton":
            return matvec(gate_up, weight, choice.config, impl="triton", gated=True)
    return None


def normed_linear(x: torch.Tensor, weight: torch.Tensor, norm: PreNorm,
                  impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rms_norm(x + residual) @ weight.T, x + residual) in one matvec launch (x [M, K], weight
    [N, K]), when this batch's linear runs the Triton matvec (the same rule as gated_linear). None
    otherwise: the caller runs the norm, then its linear."""
    if impl == "torch" or x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M:
        return None
    if impl == "triton":
        return normed_matvec(x, weight, norm, impl="triton")
    if use_triton(x, impl):
        choice = pick_linear_impl(x.shape[0], weight.shape[0], weight.shape[1], x.dtype, x.device)
        if choice.kind == "triton":
            return normed_matvec(x, weight, norm, choice.config, impl="triton")
    return None


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {name}: expected shape {tuple(dst.shape)}, checkpoint has {tuple(src.shape)}")
    dst.copy_(src.to(dst.dtype))


def _bias_target(bias: nn.Parameter | None, name: str) -> nn.Parameter:
    """The bias a checkpoint's bias tensor fills (a ValueError naming the tensor when the layer
    was built without one, i.e. checkpoint and config disagree)."""
    if bias is None:
        raise ValueError(f"weight {name}: the layer has no bias (the model's config says none)")
    return bias


class _QuantizableLinear(nn.Module):
    """What the parallel linears share: a float weight parameter, or (quantized) a stager and then
    the packed QuantMethod."""

    def _init_weight(self, rows: int, cols: int, dtype: torch.dtype, device,
                     quant: QuantizationConfig | None) -> None:
        self.impl = "auto"
        self.quant = quant if quant is not None and quant.active else None
        self.dtype, self.device = dtype, device
        self.weight = _param((rows, cols), dtype, device) if self.quant is None else None
        self.stager = QuantizedWeightStager(rows, cols) if self.quant is not None else None
        self.quant_method: QuantMethod | None = None

    def float_weight(self) -> nn.Parameter:
        """The float weight; a RuntimeError on a quantized layer (its weight is quant_method)."""
        if self.weight is None:
            raise RuntimeError("a quantized layer has no float weight: use its quant_method")
        return self.weight

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant_method is None:
            return linear(x, self.float_weight(), bias, self.impl)
        y = self.quant_method(x)
        return y if bias is None else y + bias

    def forward_normed(self, x: torch.Tensor, norm: PreNorm) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(forward(rms_norm(x + residual)), x + residual) with the pre-norm folded into the matvec's
        loads (see normed_linear); None when this batch does not take that path (quantized
        weights, more than 16 rows, cuBLAS chosen): the caller then runs the norm and forward.
        Column-parallel layers only (their input is the whole hidden state on every rank)."""
        if self.quant_method is not None:
            return None
        fused = normed_linear(x, self.float_weight(), norm, self.impl)
        if fused is None:
            return None
        y, summed = fused
        bias = getattr(self, "bias", None)
        return (y if bias is None else y + bias), summed

    def _load_rows(self, row_offset: int, name: str, w: LazyWeight, dim: int, start: int, size: int | None) -> None:
        """Copy (or stage) the slice [start, start+size) along `dim` of checkpoint tensor `w` at
        row `row_offset` of this rank's weight."""
        if self.stager is None:
            weight = self.float_weight()
            rows = size if size is not None else weight.shape[0] - row_offset
            target = weight.narrow(0, row_offset, rows) if dim == 0 else weight
            _copy_checked(target, w.read(dim, start, size), name)
            return
        piece = w.read_quantized(dim, start, size)
        self.stager.add(row_offset, piece if piece is not None else w.read(dim, start, size), name)

    def finish_loading(self) -> None:
        """Pack the staged pieces into the scheme's QuantMethod (no-op for float layers)."""
        if self.stager is None or self.quant is None:
            return
        if not self.stager.pieces:
            raise ValueError("quantized linear finished loading without any weight")
        self.quant_method = self.quant.build(self.stager.ordered(), self.dtype, self.device)
        self.stager = None


class ColumnParallelLinear(_QuantizableLinear):
    """y = x W^T (+ b), with W's rows (output features) split evenly across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.out_start, self.out_size = ctx.shard(out_features, "output features")
        self._init_weight(self.out_size, in_features, dtype, device, quant)
        self.bias = _param((self.out_size,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def load(self, name: str, w: LazyWeight) -> None:
        if name.endswith("weight"):
            self._load_rows(0, name, w, 0, self.out_start, self.out_size)
        else:
            _copy_checked(_bias_target(self.bias, name), w.read(0, self.out_start, self.out_size), name)


class MergedColumnParallelLinear(_QuantizableLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate and up):
    each rank holds its slice of every part, concatenated."""

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.shards = [ctx.shard(p, "output features") for p in part_sizes]
        local = [size for _, size in self.shards]
        self.offsets = [sum(local[:i]) for i in range(len(local))]
        self._init_weight(sum(local), in_features, dtype, device, quant)
        self.bias = _param((sum(local),), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def load_part(self, part: int, name: str, w: LazyWeight) -> None:
        start, size = self.shards[part]
        if name.endswith("weight"):
            self._load_rows(self.offsets[part], name, w, 0, start, size)
        else:
            _copy_checked(_bias_target(self.bias, name).narrow(0, self.offsets[part], size), w.read(0, start, size), name)


class QKVParallelLinear(_QuantizableLinear):
    """The fused query/key/value projection. Query heads split across ranks; key/value heads split
    too, or replicated when there are fewer KV heads than ranks (each rank keeps the KV head its
    query heads attend to)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 ctx: ParallelContext, dtype: torch.dtype, device: torch.device | str | None = None,
                 quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        tp = ctx.world_size
        if num_heads % tp:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tensor_parallel_size {tp}")
        if num_kv_heads >= tp and num_kv_heads % tp:
            raise ValueError(f"num_key_value_heads {num_kv_heads} is not divisible by tensor_parallel_size {tp}")
        if num_kv_heads < tp and tp % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {tp} is not a multiple of num_key_value_heads {num_kv_heads}, "
                "so key/value heads cannot be replicated evenly"
            )
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.q_head_start = ctx.rank * self.num_heads
        if num_kv_heads >= tp:
            self.kv_head_start = ctx.rank * self.num_kv_heads
        else:  # replicated: ranks r*tp/kv .. share KV head r
            self.kv_head_start = ctx.rank // (tp // num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        total = self.q_size + 2 * self.kv_size
        self._init_weight(total, hidden, dtype, device, quant)
        self.bias = _param((total,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def load_part(self, part: str, name: str, w: LazyWeight) -> None:
        d = self.head_dim
        if part == "q":
            offset, start, size = 0, self.q_head_start * d, self.q_size
        else:
            offset = self.q_size if part == "k" else self.q_size + self.kv_size
            start, size = self.kv_head_start * d, self.kv_size
        if name.endswith("weight"):
            self._load_rows(offset, name, w, 0, start, size)
        else:
            _copy_checked(_bias_target(self.bias, name).narrow(0, offset, size), w.read(0, start, size), name)


class RowParallelLinear(_QuantizableLinear):
    """y = all_reduce(x_local W_local^T) (+ b): W's columns (input features) split across ranks, so
    each rank consumes the column-parallel output it already has without any gather."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 quant: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.in_start, self.in_size = ctx.shard(in_features, "input features")
        self._init_weight(out_features, self.in_size, dtype, device, quant)
        self.bias = _param((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ctx.all_reduce(self._matmul(x, None))
        return y if self.bias is None else y + self.bias

    def forward_gated(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """forward(silu(gate) * up) with the activation folded into the matvec's loads (see
        gated_linear); None when this batch does not take that path (quantized weights, more than
        16 rows, cuBLAS chosen): the caller then runs SiLU-and-mul and forward."""
        if self.quant_method is not None:
            return None
        y = gated_linear(gate_up, self.float_weight(), self.impl)
        if y is None:
            return None
        y = self.ctx.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def load(self, name: str, w: LazyWeight) -> None:
        if name.endswith("weight"):
            self._load_rows(0, name, w, 1, self.in_start, self.in_size)
        else:
            _copy_checked(_bias_target(self.bias, name), w.read(), name)
