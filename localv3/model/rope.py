"""Rotary position embedding with YaRN, as DeepSeek-V3 and Hugging Face transformers define it.

The checkpoints store the rope dimensions as interleaved pairs (x0, x1), (x2, x3), ...
(rope_interleave, the default) or as halves (x_i, x_{i+R/2}). `apply_rope` rotates each pair
where it lies: x * cos + swap(x) * sin, with the cos/sin tables laid out to match (sin negated
on each pair's first element) and swap exchanging the two elements of every pair. Hugging Face
lays interleaved results out de-interleaved ([evens, odds]); queries and keys here share one
layout, so scores are the same, and a cache of roped keys must not be mixed between the two.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from localv3.config import ModelConfig, yarn_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max: int) -> float:
    return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim / 2] and the cos/sin scale (attention_factor)."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    rs = config.rope_scaling
    factor = rs["factor"]
    original_max = rs.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original_max)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original_max)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * ramp + inv_freq * extrapolation_weight
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def rope_interleaved(config: ModelConfig) -> bool:
    """Whether the rope dimensions pair up as (x0, x1), (x2, x3), ... (else as halves)."""
    return config.rope_interleave or config.model_type == "deepseek_v2"


class RotaryEmbedding(nn.Module):
    """Gives the cos/sin tables [S, 1, R] of a run of positions, in `apply_rope`'s layout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.interleaved = rope_interleaved(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S] -> cos, sin [S, 1, R] in dtype: built once per forward in the shape every
        layer broadcasts against, so layers index nothing."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]  # [S, R/2]
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        if self.interleaved:  # [c0, c0, c1, c1, ...], [-s0, s0, -s1, s1, ...]
            cos, sin = torch.stack([cos, cos], dim=-1), torch.stack([-sin, sin], dim=-1)  # [S, R/2, 2]
        else:  # [c, c], [-s, s]
            cos, sin = torch.stack([cos, cos], dim=-2), torch.stack([-sin, sin], dim=-2)  # [S, 2, R/2]
        return cos.to(dtype).flatten(1)[:, None], sin.to(dtype).flatten(1)[:, None]  # [S, 1, R]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x: [B, S, H, R]; cos/sin: [S, 1, R] from RotaryEmbedding. Returns the rotated x [B, S, H, R].

    Each pair (a, b) becomes (a cos - b sin, b cos + a sin), bit for bit as the two-product form.
    """
    return x * cos + _swap_pairs(x, interleaved) * sin


def _swap_pairs(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(x1, x0, x3, x2, ...) if interleaved, else the two halves exchanged."""
    if interleaved:
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # [..., R]
    return x.roll(x.shape[-1] // 2, dims=-1)  # [..., R]
