"""Which scheme a model's linears use, and building each layer's QuantMethod from its loaded pieces.

The scheme comes from, in order: the checkpoint's `quantization_config` (config.json), the user's
`--quantization NAME`, and for GGUF files the tensors' own types. Names (vLLM's spellings where they
exist):
  none  float weights in the model dtype (GGUF tensors dequantized, the pre-quantization behaviour)
  gguf  GGUF Q4_0 / Q4_1 / Q8_0 tensors kept quantized (CPU: shardline's block kernels in
        block_cpu.py, or torch's int4 / int8 kernels where those cannot be built); other GGUF types
        dequantized. The default for GGUF files on CPU.
  int4  weight-only 4-bit, per-group (32) asymmetric scales, quantized at load (CPU)
  int8  weight-only 8-bit, per-row symmetric scales, quantized at load (CPU)
  fp8   e4m3 weights with per-row scales; dynamic per-token e4m3 activations through
        torch._scaled_mm on CUDA (sm89+); a dequantizing reference on CPU. Also what FP8
        checkpoints (HF `fp8`, compressed-tensors float8) load as.
  awq, gptq  int4 checkpoints in those formats (int4_checkpoints.py): the Triton int4 dequant
        matmul on CUDA, torch's int4 CPU kernel on CPU (the codes repacked), or dequantized at
        load where the group layout fits neither (logged). Read from quantization_config only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from shardline.worker.config import ConfigError

from .base import DequantizedLinear, LoadedPiece, QuantMethod, as_float
from .block_cpu import Q4BlockCPU, Q8BlockCPU, block_kernels_fit
from .group_quantized import GroupQuantized, concat_rows, quantize_int4_groups
from .int4_cpu import INT4_GROUP_SIZES, Int4WeightOnlyCPU, int4_kernel_fits
from .int8_cpu import Int8WeightOnlyCPU, int8_rows

log = logging.getLogger(__name__)

QUANTIZATION_NAMES = ("none", "gguf", "int4", "int8", "fp8", "awq", "gptq")
INT4_CHECKPOINT_FORMATS = ("awq", "gptq")  # read from a checkpoint's codes, never quantized at load
INT4_GROUP_SIZE = 32  # GGUF's block: on-the-fly int4 matches Q4's accuracy, and shards on 32-feature boundaries
# Checkpoint formats recognised in config.json's quantization_config.quant_method but not loaded.
_UNSUPPORTED_CHECKPOINT_FORMATS = {
    "bitsandbytes": "bitsandbytes",
    "marlin": "Marlin int4",
    "gptq_marlin": "GPTQ (Marlin) int4",
    "awq_marlin": "AWQ (Marlin) int4",
}


class QuantizationError(ConfigError):
    """A quantization choice that cannot apply to this checkpoint or device; the message names the
    field, the value and what to do instead."""


@dataclass(frozen=True)
class QuantizationConfig:
    """The resolved scheme of a model's linear layers (`name` one of QUANTIZATION_NAMES)."""

    name: str = "none"
    group_size: int = INT4_GROUP_SIZE
    checkpoint_format: str | None = None  # "fp8" / "compressed-tensors" / "awq" / "gptq": the checkpoint's own codes

    @property
    def active(self) -> bool:
        """Whether layers stage their pieces and build a QuantMethod (False: plain float parameters)."""
        return self.name != "none"

    def build(self, pieces: list[LoadedPiece], dtype: torch.dtype, device: torch.device | str | None) -> QuantMethod:
        """The layer's packed weight from its rank's pieces (in row order)."""
        device = torch.device(device or "cpu")
        if self.name == "fp8":
            from .fp8 import Fp8Linear

            return Fp8Linear.from_pieces(pieces, device)
        if self.name in INT4_CHECKPOINT_FORMATS:
            return self._build_int4_checkpoint(pieces, dtype, device)
        if device.type == "cpu":
            if self.name == "int8":
                return _int8_cpu(pieces, device)
            quantized = [p for p in pieces if isinstance(p, GroupQuantized)]
            if self.name == "int4":
                if any(q.bits == 8 for q in quantized):  # never lose bits a checkpoint has
                    return _int8_cpu(pieces, device)
                return _int4_cpu(concat_rows([_as_int4(p, self.group_size) for p in pieces]), device)
            if len(quantized) == len(pieces):  # gguf: keep the file's codes when every part has a kernel
                if all(q.bits == 4 for q in quantized) and len({q.group_size for q in quantized}) == 1 \
                        and len({q.offsets is None for q in quantized}) == 1:
                    fused = concat_rows(quantized)
                    if block_kernels_fit(fused) is not None or int4_kernel_fits(fused):
                        return _int4_cpu(fused, device)
                if all(q.bits == 8 for q in quantized):
                    return _int8_cpu(quantized, device)
        return DequantizedLinear(torch.cat([as_float(p) for p in pieces]), dtype, device)

    def _build_int4_checkpoint(self, pieces: list[LoadedPiece], dtype: torch.dtype, device: torch.device) -> QuantMethod:
        """AWQ / GPTQ codes: the Triton int4 matmul on CUDA; torch's int4 kernel on CPU when the group
        size is one it takes; otherwise (or for layers the checkpoint left in float) the float weights."""
        quantized = [p for p in pieces if isinstance(p, GroupQuantized)]
        if quantized and len(quantized) == len(pieces) and len({q.group_size for q in quantized}) == 1:
            fused = concat_rows(quantized)
            if device.type == "cuda":
                from .int4_triton import Int4TritonLinear

                return Int4TritonLinear(fused, device)
            if device.type == "cpu" and (block_kernels_fit(fused) is not None or int4_kernel_fits(fused)):
                return _int4_cpu(fused, device)
            log.info("%s: group size %d of a [%d, %d] weight fits no int4 kernel on %s (CPU takes %s); dequantized "
                     "to %s at load", self.name, fused.group_size, *fused.shape, device.type,
                     "/".join(str(g) for g in INT4_GROUP_SIZES), dtype)
        return DequantizedLinear(torch.cat([as_float(p) for p in pieces]), dtype, device)

    def build_embedding(self, pieces: list[LoadedPiece], dtype: torch.dtype,
                        device: torch.device | str | None) -> QuantMethod:
        """The token embedding / LM head: 8-bit codes on CPU when the scheme quantizes (a lookup gathers
        rows, so the same codes serve both), float elsewhere."""
        device = torch.device(device or "cpu")
        quantized = any(isinstance(p, GroupQuantized) for p in pieces)
        if device.type == "cpu" and (self.name in ("int4", "int8") or (self.name == "gguf" and quantized)):
            return _int8_cpu(pieces, device)
        return DequantizedLinear(torch.cat([as_float(p) for p in pieces]), dtype, device)


def _int4_cpu(fused: GroupQuantized, device: torch.device) -> QuantMethod:
    """4-bit codes on CPU: shardline's block kernel where it runs, else torch's int4 kernel."""
    if block_kernels_fit(fused) is not None:
        return Q4BlockCPU(fused, device)
    return Int4WeightOnlyCPU(fused, device)


def _int8_cpu(pieces: Sequence[LoadedPiece], device: torch.device) -> QuantMethod:
    """8-bit codes on CPU: 32-blocks as they are (GGUF Q8_0) or per-row int8 on the block kernel where
    it runs; else torch's int8 kernel with the codes re-gridded to one scale per row."""
    if all(isinstance(p, GroupQuantized) and p.bits == 8 and p.offsets is None for p in pieces) \
            and len({p.group_size for p in pieces if isinstance(p, GroupQuantized)}) == 1:
        fused = concat_rows([p for p in pieces if isinstance(p, GroupQuantized)])
    else:
        fused = concat_rows([int8_rows(p) for p in pieces])
    if block_kernels_fit(fused) is not None:
        return Q8BlockCPU(fused, device)
    return Int8WeightOnlyCPU(concat_rows([int8_rows(p) for p in pieces]), device)


def _as_int4(piece: LoadedPiece, group_size: int) -> GroupQuantized:
    if isinstance(piece, GroupQuantized) and int4_kernel_fits(piece):
        return piece
    return quantize_int4_groups(as_float(piece), group_size)


def resolve_quantization(requested: str | None, source_kind: str | None, hf_config: dict[str, Any],
                         device: torch.device) -> QuantizationConfig:
    """The scheme for this checkpoint, device and `--quantization` value (None: automatic).
    Raises QuantizationError naming the field for combinations that cannot run."""
    if requested is not None and requested not in QUANTIZATION_NAMES:
        raise QuantizationError(f"quantization: {requested!r} is not one of {', '.join(QUANTIZATION_NAMES)}")
    qcfg = hf_config.get("quantization_config")
    if isinstance(qcfg, dict):
        return _checkpoint_scheme(qcfg, requested)
    if requested in INT4_CHECKPOINT_FORMATS:
        raise QuantizationError(f"quantization: {requested!r} reads {requested.upper()} checkpoints, and this model's "
                                "config.json has no quantization_config; use 'int4' (CPU) or 'fp8' to quantize "
                                "float weights at load")
    if requested in ("int4", "int8") and device.type != "cpu":
        raise QuantizationError(
            f"quantization: {requested!r} runs on CPU kernels only; on {device.type} use 'fp8' (or 'none')")
    if requested == "gguf" and source_kind != "gguf":
        raise QuantizationError("quantization: 'gguf' keeps a GGUF file's quantized tensors, but this model is "
                                f"a {source_kind} checkpoint; use 'int4', 'int8' or 'fp8' to quantize it at load")
    if requested is not None:
        return QuantizationConfig(requested)
    if source_kind == "gguf" and device.type == "cpu":
        return QuantizationConfig("gguf")
    return QuantizationConfig("none")


def _checkpoint_scheme(qcfg: dict[str, Any], requested: str | None) -> QuantizationConfig:
    method = str(qcfg.get("quant_method", "")).lower()
    if method in _UNSUPPORTED_CHECKPOINT_FORMATS:
        raise QuantizationError(
            f"quantization_config.quant_method {method!r}: {_UNSUPPORTED_CHECKPOINT_FORMATS[method]} checkpoints are "
            "not supported yet; load the model's bf16/fp16 checkpoint with --quantization int4 (CPU) or fp8 (GPU), "
            "or its GGUF file"
        )
    if method in INT4_CHECKPOINT_FORMATS:
        group = _check_int4_checkpoint(method, qcfg)
        if requested not in (None, method):
            raise QuantizationError(f"quantization: {requested!r} conflicts with the checkpoint's quantization_config "
                                    f"({method}); leave --quantization unset or pass {method}")
        return QuantizationConfig(method, group_size=group, checkpoint_format=method)
    if method == "fp8":
        if qcfg.get("weight_block_size"):
            raise QuantizationError(f"quantization_config.weight_block_size {qcfg['weight_block_size']}: block-wise "
                                    "FP8 checkpoints are not supported yet (per-tensor or per-channel scales are)")
        fmt = "fp8"
    elif method == "compressed-tensors":
        _check_compressed_tensors_fp8(qcfg)
        fmt = "compressed-tensors"
    else:
        raise QuantizationError(f"quantization_config.quant_method {method!r} is not a checkpoint format shardline "
                                "reads (it reads fp8, compressed-tensors float8, awq and gptq)")
    if requested not in (None, "fp8"):
        raise QuantizationError(f"quantization: {requested!r} conflicts with the checkpoint's quantization_config "
                                f"({method}); leave --quantization unset or pass fp8")
    return QuantizationConfig("fp8", checkpoint_format=fmt)


def _check_compressed_tensors_fp8(qcfg: dict[str, Any]) -> None:
    """compressed-tensors: only float8 weights (num_bits 8, type float) with tensor/channel strategy."""
    groups = qcfg.get("config_groups") or {}
    for gname, group in groups.items():
        weights = (group or {}).get("weights") or {}
        kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
        if kind != "float" or bits != 8 or strategy not in ("tensor", "channel"):
            raise QuantizationError(
                f"quantization_config.config_groups.{gname}.weights (type {kind!r}, num_bits {bits!r}, strategy "
                f"{strategy!r}): only float8 weights with tensor or channel scales are supported in "
                "compressed-tensors checkpoints (int4/int8 packed formats are not yet)")


def _check_int4_checkpoint(method: str, qcfg: dict[str, Any]) -> int:
    """Validate an AWQ / GPTQ quantization_config; returns its group size (-1: one group per row).
    Raises QuantizationError naming the field for what these layouts do not cover."""
    label = {"awq": "AWQ", "gptq": "GPTQ"}[method]
    bits = qcfg.get("bits", qcfg.get("w_bit", 4))
    if bits != 4:
        raise QuantizationError(f"quantization_config.bits {bits!r}: {label} checkpoints load with 4-bit weights only")
    group = qcfg.get("group_size", qcfg.get("q_group_size", 128))
    if not isinstance(group, int) or not (group == -1 or group > 0):
        raise QuantizationError(f"quantization_config.group_size {group!r}: {label} needs a positive group size or -1")
    if method == "gptq":
        if qcfg.get("desc_act"):
            raise QuantizationError("quantization_config.desc_act true: GPTQ act-order checkpoints (g_idx permutes the "
                              "input features) are not supported; use a desc_act false checkpoint")
        fmt = qcfg.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise QuantizationError(f"quantization_config.checkpoint_format {fmt!r}: only GPTQ's 'gptq' layout (zeros "
                              "stored minus one) is read")
    else:
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(f"quantization_config.version {version!r}: only AWQ's 'gemm' layout is read")
        if qcfg.get("zero_point", True) is not True:
            raise QuantizationError("quantization_config.zero_point false: AWQ without zero points is not supported")
    return group
