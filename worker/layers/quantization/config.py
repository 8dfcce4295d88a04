"""Which scheme a model's linears use, and building each layer's QuantMethod from its loaded pieces.

The scheme comes from, in order: the checkpoint's `quantization_config` (config.json), the user's
`--quantization NAME`, and for GGUF files the tensors' own types. Names (vLLM's spellings where they
exist):
  none  float weights in the model dtype (GGUF tensors dequantized, the pre-quantization behaviour)
  gguf  GGUF Q4_0 / Q4_1 / Q8_0 tensors kept quantized (CPU int4 / int8 kernels); other GGUF types
        dequantized. The default for GGUF files on CPU.
  int4  weight-only 4-bit, per-group (32) asymmetric scales, quantized at load (CPU)
  int8  weight-only 8-bit, per-row symmetric scales, quantized at load (CPU)
  fp8   e4m3 weights with per-row scales; dynamic per-token e4m3 activations through
        torch._scaled_mm on CUDA (sm89+); a dequantizing reference on CPU. Also what FP8
        checkpoints (HF `fp8`, compressed-tensors float8) load as.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shardline.worker.config import ConfigError

from .base import DequantizedLinear, LoadedPiece, QuantMethod, as_float
from .group_quantized import GroupQuantized, concat_rows, quantize_int4_groups
from .int4_cpu import Int4WeightOnlyCPU, int4_kernel_fits
from .int8_cpu import Int8WeightOnlyCPU, int8_rows

QUANTIZATION_NAMES = ("none", "gguf", "int4", "int8", "fp8")
INT4_GROUP_SIZE = 32  # GGUF's block: on-the-fly int4 matches Q4's accuracy, and shards on 32-feature boundaries
# Checkpoint formats recognised in config.json's quantization_config.quant_method but not loaded.
_UNSUPPORTED_CHECKPOINT_FORMATS = {
    "awq": "AWQ int4",
    "gptq": "GPTQ int4",
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
    checkpoint_format: str | None = None  # "fp8" / "compressed-tensors" when the checkpoint carries scales

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
        if device.type == "cpu":
            if self.name == "int8":
                return Int8WeightOnlyCPU(concat_rows([int8_rows(p) for p in pieces]), device)
            quantized = [p for p in pieces if isinstance(p, GroupQuantized)]
            if self.name == "int4":
                if any(q.bits == 8 for q in quantized):  # never lose bits a checkpoint has
                    return Int8WeightOnlyCPU(concat_rows([int8_rows(p) for p in pieces]), device)
                return Int4WeightOnlyCPU(concat_rows([_as_int4(p, self.group_size) for p in pieces]), device)
            if len(quantized) == len(pieces):  # gguf: keep the file's codes when every part has a kernel
                if all(int4_kernel_fits(q) for q in quantized) and len({q.group_size for q in quantized}) == 1 \
                        and len({q.offsets is None for q in quantized}) == 1:
                    return Int4WeightOnlyCPU(concat_rows(quantized), device)
                if all(q.bits == 8 for q in quantized):
                    return Int8WeightOnlyCPU(concat_rows([int8_rows(q) for q in quantized]), device)
        return DequantizedLinear(torch.cat([as_float(p) for p in pieces]), dtype, device)

    def build_embedding(self, pieces: list[LoadedPiece], dtype: torch.dtype,
                        device: torch.device | str | None) -> QuantMethod:
        """The token embedding / LM head: int8 rows on CPU when the scheme quantizes (a lookup gathers
        rows, so per-row codes serve both), float elsewhere."""
        device = torch.device(device or "cpu")
        quantized = any(isinstance(p, GroupQuantized) for p in pieces)
        if device.type == "cpu" and (self.name in ("int4", "int8") or (self.name == "gguf" and quantized)):
            return Int8WeightOnlyCPU(concat_rows([int8_rows(p) for p in pieces]), device)
        return DequantizedLinear(torch.cat([as_float(p) for p in pieces]), dtype, device)


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
                                "reads (it reads fp8 and compressed-tensors float8)")
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
