"""Which weight format each role of a model is held in, for the planner to size every tensor
group; the formats themselves (names, which tensors take them, bytes) are localv3.formats.table's.
One-dimensional tensors (norm weights, biases) are never quantised: they keep `VECTOR_SCHEME`.
"""

from __future__ import annotations

from dataclasses import dataclass

from localv3.formats.table import ABSORBED_SCHEME, FORMATS, WeightFormat
from localv3.formats.table import weight_format as scheme


ROUTER_SCHEME = FORMATS["fp32"]  # the router runs in fp32 (DESIGN.md section 3)
VECTOR_SCHEME = FORMATS["bf16"]  # norm weights and biases, as the checkpoints store them
KV_CACHE_BYTES_PER_VALUE = 2  # the latent cache is bf16 (localv3.model.cache.LatentCache)


@dataclass(frozen=True)
class Quantization:
    """The scheme of each weight role: routed experts, the dense parts, embeddings + lm_head."""

    experts: str = "q4"
    dense: str = "q8"  # MLA projections, dense FFN layers, shared experts
    # the matrices the runtime holds in the compute dtype: embed_tokens, lm_head, the MTP
    # eh_proj (the role rule of localv3.formats.roles)
    embeddings: str = "bf16"

    def __post_init__(self) -> None:
        for name in (self.experts, self.dense, self.embeddings):
            scheme(name)

    def scheme_for(self, role: str) -> WeightFormat:
        """role: experts | dense | absorbed | embeddings | router | vector (localv3.formats.roles)."""
        if role == "router":
            return ROUTER_SCHEME
        if role == "vector":
            return VECTOR_SCHEME
        if role == "absorbed":
            return scheme(ABSORBED_SCHEME) if scheme(self.dense).quantized else scheme(self.embeddings)
        return scheme(getattr(self, role))

    def to_dict(self) -> dict[str, str]:
        return {"experts": self.experts, "dense": self.dense, "embeddings": self.embeddings}
