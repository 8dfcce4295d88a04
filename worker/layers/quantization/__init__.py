"""Quantized linear weights: one QuantMethod per scheme (int4_cpu, int8_cpu, fp8, the float
fallback in base), the GroupQuantized form they load from, GGUF block decoding, and the scheme
resolution in config. docs/quantization.md says which kernel runs where and what it costs in accuracy."""

from .base import DequantizedLinear, LoadedPiece, QuantMethod
from .config import QUANTIZATION_NAMES, QuantizationConfig, QuantizationError, resolve_quantization
from .group_quantized import GroupQuantized
from .stager import QuantizedWeightStager

__all__ = [
    "DequantizedLinear", "GroupQuantized", "LoadedPiece", "QUANTIZATION_NAMES", "QuantMethod", "QuantizationConfig",
    "QuantizationError", "QuantizedWeightStager", "resolve_quantization",
]
