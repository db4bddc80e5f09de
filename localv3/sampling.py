"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def new_generator(settings: SamplingSettings) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    return g


def token_probabilities(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """logits [..., V] -> the sampling distribution [..., V] after temperature, top-k and top-p."""
    logits = logits.float() / max(settings.temperature, 1e-6)
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = logits.topk(settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= settings.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """logits [V] -> one token id."""
    if settings.greedy:
        return int(logits.argmax())
    probs = token_probabilities(logits.cpu(), settings)
    return int(torch.multinomial(probs, 1, generator=generator))
