"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from localv3.errors import LocalV3Error

# DeepSeek-V3/R1's generation_config.json: the defaults for a model that ships none
FALLBACK_TEMPERATURE = 0.6
FALLBACK_TOP_P = 0.95


@dataclass
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float
    top_p: float
    top_k: int


def model_sampling_defaults(model_path: Path) -> SamplingDefaults:
    """A model's own sampling settings from the generation_config.json beside its weights:
    `do_sample: false` means greedy; otherwise its temperature / top_p / top_k, each falling
    back to DeepSeek-V3's 0.6 / 0.95 / off (also for a model that ships no such file)."""
    model_path = Path(model_path)
    path = (model_path if model_path.is_dir() else model_path.parent) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        config = {}
    except (OSError, ValueError) as exc:
        raise LocalV3Error(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LocalV3Error(f"{path}: expected a JSON object, got {type(config).__name__}")
    temperature = config.get("temperature", FALLBACK_TEMPERATURE) if config.get("do_sample", True) else 0.0
    return SamplingDefaults(
        _number(path, "temperature", temperature, float),
        _number(path, "top_p", config.get("top_p", FALLBACK_TOP_P), float),
        _number(path, "top_k", config.get("top_k", 0), int),
    )


def _number(path: Path, field: str, value, kind: type):
    """A generation_config.json number, or a LocalV3Error naming the file and the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise LocalV3Error(f"{path}: {field} must be a non-negative number, not {json.dumps(value)}")
    if kind is int and value != int(value):
        raise LocalV3Error(f"{path}: {field} must be a whole number, not {json.dumps(value)}")
    return kind(value)


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
        outside = before >= settings.top_p
        outside[..., 0] = False  # the most likely token always stays: top-p 0 is greedy
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """logits [V] -> one token id."""
    if settings.greedy:
        return int(logits.argmax())
    probs = token_probabilities(logits.cpu(), settings)
    return int(torch.multinomial(probs, 1, generator=generator))
