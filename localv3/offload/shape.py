"""The model's shape, from config.json alone: every tensor group with its tensors' shapes.

Groups are named by their checkpoint prefix and have a kind (embedding, attention, dense_ffn,
shared_expert, routed_expert, router, norm, lm_head, mtp) and a layer (None for the model-wide
ones). Layers >= num_hidden_layers are the MTP module's decoder blocks; its `embed_tokens` and
`shared_head.head` equal the main model's and are shared, so they are not counted twice.
A routed-expert group holds the tensors of one expert and `count` experts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from localv3.config import ModelConfig
from localv3.model.mla_cost import MLAWidths
from localv3.formats.roles import weight_role
from localv3.offload.quant import KV_CACHE_BYTES_PER_VALUE, TENSOR_ROLES, Quantization


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int  # per token

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "active": self.active}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    role: str  # experts | dense | embeddings | router | vector (see Quantization.scheme_for)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorGroup:
    name: str
    kind: str
    layer: int | None
    tensors: tuple[PlannedTensor, ...]
    count: int = 1  # routed_expert: experts in the layer, each holding `tensors`

    @property
    def unit_elements(self) -> int:
        return sum(t.elements for t in self.tensors)

    @property
    def elements(self) -> int:
        return self.count * self.unit_elements

    def key(self, tensor: PlannedTensor) -> str:
        """The tensor's full name for one expert (`model.layers.3.mlp.experts.gate_proj.weight`)."""
        return f"{self.name}.{tensor.name}"

    def unit_bytes(self, quant: Quantization) -> int:
        return sum(quant.format_of(self, t).tensor_bytes(t.shape) for t in self.tensors)

    def bytes(self, quant: Quantization) -> int:
        return self.count * self.unit_bytes(quant)


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_layers: int  # main decoder layers
    mtp_layers: int  # num_nextn_predict_layers; their indices follow the main layers
    n_routed_experts: int
    experts_per_token: int
    num_attention_heads: int
    qk_head_dim: int
    v_head_dim: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    max_position_embeddings: int
    groups: tuple[TensorGroup, ...]

    @classmethod
    def from_config(cls, config: ModelConfig, name: str = "model") -> "ModelShape":
        groups = [_embedding(config)]
        for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
            groups += _decoder_layer(config, layer)
        groups += _head(config)
        return cls(
            name=name,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            num_layers=config.num_hidden_layers,
            mtp_layers=config.num_nextn_predict_layers,
            n_routed_experts=config.n_routed_experts or 0,
            experts_per_token=config.num_experts_per_tok or 0,
            num_attention_heads=config.num_attention_heads,
            qk_head_dim=config.qk_head_dim,
            v_head_dim=config.v_head_dim,
            kv_lora_rank=config.kv_lora_rank,
            qk_rope_head_dim=config.qk_rope_head_dim,
            max_position_embeddings=config.max_position_embeddings,
            groups=tuple(groups),
        )

    @property
    def mla_widths(self) -> MLAWidths:
        rope = self.qk_rope_head_dim
        return MLAWidths(self.num_attention_heads, self.kv_lora_rank, self.qk_head_dim - rope, rope, self.v_head_dim)

    # ----- looking things up ----------------------------------------------------------
    @property
    def layers(self) -> range:
        """All decoder blocks: the main layers, then the MTP layers."""
        return range(self.num_layers + self.mtp_layers)

    def is_mtp_layer(self, layer: int | None) -> bool:
        return layer is not None and layer >= self.num_layers

    def layer_groups(self, layer: int | None) -> list[TensorGroup]:
        return self._by_layer.get(layer, [])

    def group(self, kind: str, layer: int | None = None) -> TensorGroup | None:
        return self._by_kind_and_layer.get((kind, layer))

    @functools.cached_property
    def _by_layer(self) -> dict[int | None, list[TensorGroup]]:
        index: dict[int | None, list[TensorGroup]] = {}
        for g in self.groups:
            index.setdefault(g.layer, []).append(g)
        return index

    @functools.cached_property
    def _by_kind_and_layer(self) -> dict[tuple[str, int | None], TensorGroup]:
        return {(g.kind, g.layer): g for g in self.groups}

    @property
    def moe_layers(self) -> list[int]:
        return [g.layer for g in self.groups if g.kind == "routed_expert"]

    # ----- derived facts ----------------------------------------------------------------
    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Absorbed-MLA latent cache: kv_lora_rank + qk_rope_head_dim values per token and layer."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * KV_CACHE_BYTES_PER_VALUE

    @property
    def total_elements(self) -> int:
        return sum(g.elements for g in self.groups)

    def parameter_count(self, include_mtp: bool = True) -> ParameterCount:
        """Parameters in total and active per token (everything but the routed experts, plus
        experts_per_token of every layer's n_routed_experts), as `localv3 show` counts them."""
        groups = [g for g in self.groups if include_mtp or not self.is_mtp_layer(g.layer)]
        routed = sum(g.elements for g in groups if g.kind == "routed_expert")
        total = sum(g.elements for g in groups)
        share = self.experts_per_token / self.n_routed_experts if self.n_routed_experts else 0.0
        return ParameterCount(total=total, active=int(total - routed + routed * share))

    def bits_per_weight(self, quant: Quantization, role: str) -> float:
        """Average storage bits per weight of the matrices of `role` (experts, dense, embeddings)."""
        roles = TENSOR_ROLES[role]
        nbytes = elements = 0
        for g in self.groups:
            for t in g.tensors:
                if t.role in roles:
                    nbytes += g.count * quant.format_of(g, t).tensor_bytes(t.shape)
                    elements += g.count * t.elements
        return 8 * nbytes / elements if elements else 0.0

    def activation_bytes(self, tokens: int, key_block: int = 1024) -> int:
        """fp32 working memory of a forward over `tokens` tokens (one prefill chunk), attention
        scores computed `key_block` keys at a time, plus one row of logits."""
        per_token = (
            4 * self.hidden_size  # residual, normed input, attention output, MLP output
            + 3 * self.intermediate_size  # gate, up, activated product of the widest MLP
            + self.num_attention_heads * (self.qk_head_dim + self.kv_lora_rank + self.v_head_dim)
        )
        scores = self.num_attention_heads * tokens * key_block
        return 4 * (tokens * per_token + scores + self.vocab_size)


# where a tensor lives in a Hugging Face checkpoint (any layer: roles do not depend on it); its
# role comes from that name through formats.roles, the rule quantize and the runtime follow too
ATTENTION, MLP, SHARED, EXPERT, MTP = (
    "model.layers.L.self_attn", "model.layers.L.mlp", "model.layers.L.mlp.shared_experts",
    "model.layers.L.mlp.experts.0", "model.layers.L",
)  # fmt: skip


def _matrix(name: str, out_features: int, in_features: int, within: str) -> PlannedTensor:
    checkpoint_name = f"{within}.{name}.weight" if within else f"{name}.weight"
    return PlannedTensor(f"{name}.weight", (out_features, in_features), weight_role(checkpoint_name, 2))


def _vector(name: str, size: int, within: str = "model") -> PlannedTensor:
    return PlannedTensor(name, (size,), weight_role(f"{within}.{name}", 1))


def _embedding(c: ModelConfig) -> TensorGroup:
    return TensorGroup(
        "model.embed_tokens", "embedding", None, (_matrix("embed_tokens", c.vocab_size, c.hidden_size, "model"),)
    )


def _head(c: ModelConfig) -> list[TensorGroup]:
    norm = TensorGroup("model.norm", "norm", None, (_vector("norm.weight", c.hidden_size),))
    lm_head = TensorGroup("lm_head", "lm_head", None, (_matrix("lm_head", c.vocab_size, c.hidden_size, ""),))
    return [norm, lm_head]


def _attention(c: ModelConfig) -> list[PlannedTensor]:
    h, heads = c.hidden_size, c.num_attention_heads
    tensors = []
    if c.q_lora_rank:
        tensors += [_matrix("q_a_proj", c.q_lora_rank, h, ATTENTION), _vector("q_a_layernorm.weight", c.q_lora_rank)]
        tensors += [_matrix("q_b_proj", heads * c.qk_head_dim, c.q_lora_rank, ATTENTION)]
    else:
        tensors += [_matrix("q_proj", heads * c.qk_head_dim, h, ATTENTION)]
    tensors += [
        _matrix("kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, h, ATTENTION),
        _vector("kv_a_layernorm.weight", c.kv_lora_rank),
        _matrix("kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, ATTENTION),
        _matrix("o_proj", h, heads * c.v_head_dim, ATTENTION),
    ]
    return tensors


def _mlp(hidden: int, intermediate: int, within: str) -> tuple[PlannedTensor, ...]:
    return (
        _matrix("gate_proj", intermediate, hidden, within),
        _matrix("up_proj", intermediate, hidden, within),
        _matrix("down_proj", hidden, intermediate, within),
    )


def _decoder_layer(c: ModelConfig, layer: int) -> list[TensorGroup]:
    prefix = f"model.layers.{layer}"
    h = c.hidden_size
    groups = []
    if layer >= c.num_hidden_layers:
        mtp = (
            _vector("enorm.weight", h),
            _vector("hnorm.weight", h),
            _matrix("eh_proj", h, 2 * h, MTP),
            _vector("shared_head.norm.weight", h),
        )
        groups.append(TensorGroup(f"{prefix}.mtp", "mtp", layer, mtp))
    groups.append(TensorGroup(f"{prefix}.self_attn", "attention", layer, tuple(_attention(c))))
    norms = (_vector("input_layernorm.weight", h), _vector("post_attention_layernorm.weight", h))
    groups.append(TensorGroup(f"{prefix}.norms", "norm", layer, norms))
    if not c.is_moe_layer(layer):
        groups.append(TensorGroup(f"{prefix}.mlp", "dense_ffn", layer, _mlp(h, c.intermediate_size, MLP)))
        return groups
    router = [_matrix("gate", c.n_routed_experts, h, MLP)]
    if c.topk_method == "noaux_tc":
        router.append(_vector("gate.e_score_correction_bias", c.n_routed_experts, MLP))
    groups.append(TensorGroup(f"{prefix}.mlp.gate", "router", layer, tuple(router)))
    if c.n_shared_experts:
        shared = _mlp(h, c.shared_intermediate_size, SHARED)
        groups.append(TensorGroup(f"{prefix}.mlp.shared_experts", "shared_expert", layer, shared))
    expert = _mlp(h, c.moe_intermediate_size, EXPERT)
    groups.append(TensorGroup(f"{prefix}.mlp.experts", "routed_expert", layer, expert, count=c.n_routed_experts))
    return groups
