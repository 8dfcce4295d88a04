"""Rotary position embeddings (rotate-half layout), with Llama 3 and linear frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shardline.worker.attention.metadata import StepMemo
from shardline.worker.kernels.rope import apply_rope, cos_sin_cache
from shardline.worker.kernels.runtime import use_triton


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies per rotated pair, after the configured scaling (float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "freq_factors":  # explicit per-pair divisors (a GGUF's rope_freqs tensor)
        return inv_freq / torch.tensor(scaling["freq_factors"], dtype=torch.float32)
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to query and key heads at given absolute positions.

    The torch path computes cos/sin per step (HF's arithmetic, for parity); the Triton path rotates
    q and k in place from a [max_position, head_dim] cos/sin cache, which the model builds once and
    shares between layers (`cos_sin_cache`, None until then). `impl` is 'auto' | 'triton' | 'torch'.
    """

    inv_freq: torch.Tensor  # [head_dim // 2] float32, a non-persistent buffer

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.impl = "auto"
        self.cos_sin_cache: torch.Tensor | None = None
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling).to(device), persistent=False)
        # Layers with equal settings share one step's cos/sin (StepMemo.rope).
        self.memo_key: tuple[object, ...] = (head_dim, theta, repr(scaling))

    def build_cache(self, max_position: int) -> torch.Tensor:
        """The fp32 cos/sin table for positions 0 .. max_position-1 on inv_freq's device."""
        return cos_sin_cache(self.inv_freq, max_position, self.inv_freq.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def signed_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                       memo: StepMemo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [T, 1, d] and sin [T, 1, d] with sin's first half negated, so that
        x * cos + roll(x, d/2) * sin equals HF's x * cos + rotate_half(x) * sin bit for bit
        (negation is exact). Computed once per step and positions tensor when `memo` is given."""
        entry = memo.rope.get(self.memo_key) if memo is not None else None
        if entry is not None and entry[0] is positions and entry[1].dtype == dtype:
            return entry[1], entry[2]
        cos, sin = self.cos_sin(positions, dtype)
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        if memo is not None:
            memo.rope[self.memo_key] = (positions, cos, sin)
        return cos, sin

    def rotate(self, positions: torch.Tensor, x: torch.Tensor, memo: StepMemo | None = None) -> torch.Tensor:
        """RoPE of x [T, heads, d] (any heads: q and k may come as one tensor) with the torch path."""
        cos, sin = self.signed_cos_sin(positions, x.dtype, memo)
        return x * cos + torch.roll(x, self.head_dim // 2, dims=-1) * sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                memo: StepMemo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, d], k: [T, KVH, d] -> rotated q and k (in place on the Triton path)."""
        cache = self.cos_sin_cache
        if cache is not None and use_triton(q, self.impl):
            apply_rope(q, k, positions, cache, impl="triton")
            return q, k
        return self.rotate(positions, q, memo), self.rotate(positions, k, memo)

    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether forward() takes the in-place Triton path for tensors like x."""
        return self.cos_sin_cache is not None and use_triton(x, self.impl)
