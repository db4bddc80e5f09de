"""Which weight format each role of a model is held in, for the planner to size every tensor
group; the formats themselves (names, which tensors take them, bytes) are localv3.formats.table's.
One-dimensional tensors (norm weights, biases) are never quantised: they keep `VECTOR_SCHEME`.
A file that already fixes each tensor's type (a GGUF) adds those types as `stored` formats,
which take precedence over the role's scheme until a scheme is stated for that role.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from localv3.formats.table import ABSORBED_SCHEME, FORMATS, WeightFormat
from localv3.formats.table import weight_format as scheme

if TYPE_CHECKING:
    from localv3.offload.shape import TensorGroup, PlannedTensor

ROUTER_SCHEME = FORMATS["fp32"]  # the router runs in fp32
VECTOR_SCHEME = FORMATS["bf16"]  # norm weights and biases, as the checkpoints store them
KV_CACHE_BYTES_PER_VALUE = 2  # the latent cache is bf16 (localv3.model.cache.LatentCache)
ROLES = ("experts", "dense", "embeddings")
# The schemes each role may be planned in (what `localv3 plan --experts/--dense/--embeddings`
# accept and the only ones a refusal suggests); the runtime holds embeddings in a float dtype.
ROLE_SCHEMES = {
    "experts": ("q4", "q8", "fp8", "bf16", "fp16", "fp32"),
    "dense": ("q4", "q8", "fp8", "bf16", "fp16", "fp32"),
    "embeddings": ("bf16", "fp8", "fp16", "fp32"),
}
TENSOR_ROLES = {"experts": ("experts",), "dense": ("dense", "absorbed"), "embeddings": ("embeddings",)}


@dataclass(frozen=True)
class Quantization:
    """The scheme of each weight role: routed experts, the dense parts, embeddings + lm_head."""

    experts: str = "q4"
    dense: str = "q8"  # MLA projections, dense FFN layers, shared experts
    # the matrices the runtime holds in the compute dtype: embed_tokens, lm_head, the MTP
    # eh_proj (the role rule of localv3.formats.roles)
    embeddings: str = "bf16"
    # tensor role -> {tensor key (TensorGroup.key): its format in the file}
    stored: dict[str, dict[str, WeightFormat]] = field(default_factory=dict, hash=False)

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

    def format_of(self, group: TensorGroup, tensor: PlannedTensor) -> WeightFormat:
        """The format `tensor` of `group` is held in: as the file stores it, else its role's scheme."""
        stored = self.stored.get(tensor.role)
        found = stored.get(group.key(tensor)) if stored else None
        return found or self.scheme_for(tensor.role)

    def stores(self, role: str) -> bool:
        """Whether the file fixes the formats of `role` (experts, dense, embeddings)."""
        return any(self.stored.get(tensor_role) for tensor_role in TENSOR_ROLES[role])

    def with_scheme(self, role: str, name: str) -> Quantization:
        """`role` (experts, dense, embeddings) in scheme `name`, the file's formats for it dropped."""
        stored = {tensor_role: f for tensor_role, f in self.stored.items() if tensor_role not in TENSOR_ROLES[role]}
        return replace(self, **{role: name}, stored=stored)

    def to_dict(self) -> dict[str, str]:
        """role -> scheme; a role the file fixes: its formats, e.g. `iq1_s+iq2_xxs`."""
        return {role: self._describe(role) for role in ROLES}

    def _describe(self, role: str) -> str:
        if not self.stores(role):
            return getattr(self, role)
        names = {f.name for tensor_role in TENSOR_ROLES[role] for f in self.stored.get(tensor_role, {}).values()}
        return "+".join(sorted(names))


def kernel_scheme(fmt: WeightFormat) -> str:
    """The scheme whose CPU kernel rates `fmt` runs at: its own (q4, q8, float types); other
    ggml block types of a GGUF (IQ1_S, Q2_K, Q6_K, ...) are assumed to run at Q4_K's (q4)."""
    if fmt.name in FORMATS or not fmt.quantized:
        return fmt.name
    return "q4"
