"""RMSNorm with the Hugging Face semantics: normalise in fp32, cast back, then scale."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One fused op in fp32; in other dtypes upcast, normalise, cast back, scale (four ops).
        Both equal transformers' unfused weight * (x * rsqrt(mean(x^2) + eps)) bit for bit on
        the CPU (tests/test_engine_parts.py)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
