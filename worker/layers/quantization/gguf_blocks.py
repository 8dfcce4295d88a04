"""GGUF's legacy block formats decoded into GroupQuantized codes without dequantizing them
(ggml's block layouts: ggml-common.h, mirrored by the gguf package's quants.py):

  Q4_0: 18 bytes per 32 weights: f16 d, then 16 bytes of nibbles; w = d * (q - 8)
  Q4_1: 20 bytes per 32 weights: f16 d, f16 m, then 16 bytes of nibbles; w = d * q + m
  Q8_0: 34 bytes per 32 weights: f16 d, then 32 int8; w = d * q

In a nibble byte j of a block, the low nibble is weight j and the high nibble weight j + 16."""

from __future__ import annotations

import numpy as np
import torch

from .group_quantized import GroupQuantized

GGUF_BLOCK = 32
# GGML type name -> bytes per block; the types kept quantized (others are dequantized at load).
KEPT_GGUF_TYPES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def decode_gguf_blocks(raw: np.ndarray, type_name: str) -> GroupQuantized:
    """raw: uint8 [rows, blocks * block_bytes] as the gguf reader exposes a quantized matrix's rows."""
    if type_name not in KEPT_GGUF_TYPES:
        raise ValueError(f"GGUF type {type_name} is not kept quantized (kept: {', '.join(KEPT_GGUF_TYPES)})")
    block_bytes = KEPT_GGUF_TYPES[type_name]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, block_bytes)
    n_blocks = blocks.shape[1]
    d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if type_name == "Q8_0":
        codes = torch.from_numpy(blocks[:, :, 2:].copy().view(np.int8)).reshape(rows, n_blocks * GGUF_BLOCK)
        return GroupQuantized(codes, d, None, GGUF_BLOCK, 8, type_name)
    start = 4 if type_name == "Q4_1" else 2
    packed = blocks[:, :, start:]
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # weights 0..15, then 16..31
    codes = torch.from_numpy(np.ascontiguousarray(nibbles)).reshape(rows, n_blocks * GGUF_BLOCK)
    if type_name == "Q4_1":
        offsets = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    else:
        offsets = -8.0 * d
    return GroupQuantized(codes, d, offsets, GGUF_BLOCK, 4, type_name)
