"""Rotary position embedding with YaRN, as DeepSeek-V3 and Hugging Face transformers define it.

The checkpoints store the rope dimensions as interleaved pairs (x0, x1), (x2, x3), ...;
`apply_rope` rotates each pair and lays the result out de-interleaved ([evens, odds]).
Queries and keys use the same layout, so scores are those of the interleaved rotation.
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


class RotaryEmbedding(nn.Module):
    """Gives cos/sin tables [S, rope_dim / 2] for a run of positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]  # [S, R/2]
        cos = (freqs.cos() * self.attention_factor).to(dtype)
        sin = (freqs.sin() * self.attention_factor).to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x: [B, S, H, R]; cos/sin: [S, R/2]. Returns the rotated x, de-interleaved if `interleaved`."""
    cos = cos[None, :, None, :]  # [1, S, 1, R/2]
    sin = sin[None, :, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
