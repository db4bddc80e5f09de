"""Bytes per weight under each quantisation scheme, so the planner can size every tensor group.

Schemes (weights are [out, in]; group-wise scales run along the input dimension):
- `fp32`, `bf16`, `fp16`: plain elements.
- `fp8`: e4m3 elements plus one fp32 scale per 128x128 block (edge blocks partial), as the
  DeepSeek-V3 checkpoints ship.
- `q8`: int8, symmetric, one bf16 scale per output row (localv3.quant's kernel format):
  8.002 bits per weight for a 7168-wide row.
- `q4`: int4 packed two per byte, symmetric, groups of 32 with one bf16 scale: 4.5 bits per
  weight (the figure DESIGN.md section 1 uses for the roofline).
One-dimensional tensors (norm weights, biases) are never quantised: they keep `vector_dtype`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from localv3.errors import LocalV3Error


class QuantError(LocalV3Error):
    """An unknown quantisation scheme name."""


@dataclass(frozen=True)
class QuantScheme:
    name: str
    bits: int  # storage bits per weight element
    group_size: int | None = None  # weights per scale along the input dimension
    row_scales: bool = False  # one scale per output row
    block: tuple[int, int] | None = None  # 2-D scale blocks (rows, cols)
    scale_bytes: int = 0  # bytes per scale

    def matrix_bytes(self, rows: int, cols: int) -> int:
        """Bytes to store a [rows, cols] weight (packing rounds each row up to whole bytes)."""
        data = rows * math.ceil(cols * self.bits / 8)
        if self.group_size:
            return data + rows * math.ceil(cols / self.group_size) * self.scale_bytes
        if self.row_scales:
            return data + rows * self.scale_bytes
        if self.block:
            return data + math.ceil(rows / self.block[0]) * math.ceil(cols / self.block[1]) * self.scale_bytes
        return data

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        """A vector is a one-row matrix."""
        return self.matrix_bytes(math.prod(shape[:-1]), shape[-1])

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per weight of a large matrix (scales included; a row scale's
        share is left out: 0.002 bits on a 7168-wide row)."""
        extra = 0.0
        if self.group_size:
            extra = 8 * self.scale_bytes / self.group_size
        elif self.block:
            extra = 8 * self.scale_bytes / (self.block[0] * self.block[1])
        return self.bits + extra


SCHEMES: dict[str, QuantScheme] = {
    scheme.name: scheme
    for scheme in (
        QuantScheme("fp32", 32),
        QuantScheme("bf16", 16),
        QuantScheme("fp16", 16),
        QuantScheme("fp8", 8, block=(128, 128), scale_bytes=4),
        QuantScheme("q8", 8, row_scales=True, scale_bytes=2),
        QuantScheme("q4", 4, group_size=32, scale_bytes=2),
    )
}

ROUTER_SCHEME = SCHEMES["fp32"]  # the router runs in fp32 (DESIGN.md section 3)
VECTOR_SCHEME = SCHEMES["bf16"]  # norm weights and biases, as the checkpoints store them
KV_CACHE_BYTES_PER_VALUE = 2  # the latent cache is bf16 (localv3.model.cache.LatentCache)


def scheme(name: str) -> QuantScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise QuantError(f"unknown quantisation {name!r}; choose one of {', '.join(SCHEMES)}") from None


@dataclass(frozen=True)
class Quantization:
    """The scheme of each weight role: routed experts, the dense parts, embeddings + lm_head."""

    experts: str = "q4"
    dense: str = "q8"  # MLA projections, dense FFN layers, shared experts, MTP projection
    embeddings: str = "bf16"  # embed_tokens and lm_head

    def __post_init__(self) -> None:
        for name in (self.experts, self.dense, self.embeddings):
            scheme(name)

    def scheme_for(self, role: str) -> QuantScheme:
        """role: experts | dense | embeddings | router | vector."""
        if role == "router":
            return ROUTER_SCHEME
        if role == "vector":
            return VECTOR_SCHEME
        return scheme(getattr(self, role))

    def to_dict(self) -> dict[str, str]:
        return {"experts": self.experts, "dense": self.dense, "embeddings": self.embeddings}
