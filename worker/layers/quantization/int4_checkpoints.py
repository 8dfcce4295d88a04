"""AWQ and GPTQ int4 checkpoints (Hugging Face layouts) read into GroupQuantized codes.

Both store a linear's weight W [N out, K in] as 4-bit codes q with one fp16 scale s and one 4-bit
zero z per `group_size` input features of each output feature, w = (q - z) * s, i.e. GroupQuantized
with scales s and offsets -z * s. Tensors per linear (K in, N out, G = K / group_size groups):

GPTQ (AutoGPTQ / GPTQModel, checkpoint_format "gptq"):
  qweight int32 [K / 8, N]  eight consecutive input features per int32, feature 8i + j in bits 4j..4j+3
  qzeros  int32 [G, N / 8]  eight consecutive output features per int32, the same nibble order,
                            each holding z - 1 (the format's historical offset: the zero is stored + 1)
  scales  fp16  [G, N]
  g_idx   int32 [K]         the group of each input feature: k // group_size without act-order;
                            a permutation (desc_act) is refused here, naming the field
AWQ (AutoAWQ "gemm" version):
  qweight int32 [K, N / 8]  eight output features per int32 in AWQ's interleaved order: nibble p
                            (bits 4p..4p+3) holds feature 8c + AWQ_PACK_ORDER[p]
  qzeros  int32 [G, N / 8]  the same packing, zeros as they are
  scales  fp16  [G, N]

The tensor kind is told by shapes alone (GPTQ's qweight has N columns, AWQ's N / 8), and the group
size by K / G, so a loader needs no configuration to unpack; config.py refuses the configurations
these layouts do not cover (other bit widths, act-order, AWQ's GEMV layout, gptq_v2 zeros) with the
field's name."""

from __future__ import annotations

import torch

from .group_quantized import GroupQuantized

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of an AWQ int32 holds output feature 8c + AWQ_PACK_ORDER[p]
_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
# COMPANION_SUFFIXES: the tensors read together with a linear's qweight (never yielded alone).
COMPANION_SUFFIXES = (".qzeros", ".scales", ".g_idx")


def _nibbles_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> uint8 [8R, C]: nibble j of row r becomes row 8r + j."""
    r, c = packed.shape
    return ((packed.to(torch.int32).unsqueeze(1) >> _NIBBLE_SHIFTS.view(1, 8, 1)) & 0xF).to(torch.uint8).reshape(8 * r, c)


def _nibbles_along_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> uint8 [R, 8C]: nibble j of column c becomes column 8c + j."""
    r, c = packed.shape
    return ((packed.to(torch.int32).unsqueeze(-1) >> _NIBBLE_SHIFTS) & 0xF).to(torch.uint8).reshape(r, 8 * c)


def _awq_cols(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [R, C] -> uint8 [R, 8C] in output-feature order (undoing AWQ_PACK_ORDER)."""
    r, c = packed.shape
    nibbles = _nibbles_along_cols(packed).reshape(r, c, 8)
    out = torch.empty_like(nibbles)
    out[..., list(AWQ_PACK_ORDER)] = nibbles  # feature AWQ_PACK_ORDER[p] takes nibble p
    return out.reshape(r, 8 * c)


def _group_codes(q_kn: torch.Tensor, z_gn: torch.Tensor, s_gn: torch.Tensor, source: str) -> GroupQuantized:
    """GroupQuantized [N, K] from codes [K, N], zeros and scales [G, N] (w = (q - z) * s)."""
    k, g = q_kn.shape[0], s_gn.shape[0]
    scales = s_gn.float().t().contiguous()
    offsets = -(z_gn.float().t() * scales)
    return GroupQuantized(q_kn.t().contiguous(), scales, offsets.contiguous(), k // g, 4, source)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, name: str = "weight") -> GroupQuantized:
    """A GPTQ linear's tensors as GroupQuantized [N, K]; ValueError naming `name` and the field when
    shapes disagree or g_idx is not k // group_size (act-order)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    groups = scales.shape[0]
    if tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n // 8) or k % groups:
        raise ValueError(f"{name}: GPTQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros "
                         f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} (expected [K/8, N], [G, N/8], [G, N])")
    group_size = k // groups
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // group_size):
        raise ValueError(f"{name}.g_idx: GPTQ act-order (desc_act) checkpoints permute input features across "
                         f"groups; only g_idx = k // group_size ({group_size}) is supported")
    zeros = _nibbles_along_cols(qzeros).to(torch.int16) + 1  # stored as z - 1
    return _group_codes(_nibbles_along_rows(qweight), zeros, scales, "GPTQ")


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> GroupQuantized:
    """An AWQ (GEMM layout) linear's tensors as GroupQuantized [N, K]; ValueError naming `name` when
    shapes disagree."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    if tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n // 8) or k % groups:
        raise ValueError(f"{name}: AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros "
                         f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} (expected [K, N/8], [G, N/8], [G, N])")
    return _group_codes(_awq_cols(qweight), _awq_cols(qzeros), scales, "AWQ")


def unpack_int4_checkpoint(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                           g_idx: torch.Tensor | None, name: str = "weight") -> GroupQuantized:
    """GPTQ or AWQ, told apart by shape: GPTQ's qweight has as many columns as scales, AWQ's an eighth."""
    if qweight.shape[1] == scales.shape[1]:
        return unpack_gptq(qweight, qzeros, scales, g_idx, name)
    return unpack_awq(qweight, qzeros, scales, name)
