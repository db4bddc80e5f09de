"""The model configuration: Hugging Face `config.json` field names, verbatim.

One dataclass covers DeepSeek-V3/R1, Kimi-K2, Moonlight (DeepseekV3 architecture) and
DeepSeek-V2 / V2-Lite; the variants differ only in field values. Unknown keys are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localv3.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")

REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
)


MAX_SIZE = 1 << 24  # no dimension of a real model comes near it; a typo like 1e9 does
# (field, lowest, highest) of every integer field the engine reads
INTEGER_FIELDS = (
    *((name, 1, MAX_SIZE) for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")),
    *((name, 1, MAX_SIZE) for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")),
    ("q_lora_rank", 1, MAX_SIZE),
    ("moe_intermediate_size", 0, MAX_SIZE),
    ("max_position_embeddings", 1, MAX_SIZE),
    ("num_hidden_layers", 1, 1024),
    ("num_nextn_predict_layers", 0, 16),
    ("first_k_dense_replace", 0, 1024),
    ("moe_layer_freq", 1, 1024),
    ("n_routed_experts", 0, 65536),
    ("n_shared_experts", 0, 64),
    ("num_experts_per_tok", 1, 65536),
    ("n_group", 1, 65536),
    ("topk_group", 1, 65536),
)
OPTIONAL_FIELDS = {"q_lora_rank", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group"}
REAL_FIELDS = (("rms_norm_eps", 0.0, 1.0), ("rope_theta", 0.0, 1e12), ("routed_scaling_factor", 0.0, 1e6))
BOOLEAN_FIELDS = ("norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings")
TEXT_FIELDS = ("model_type", "topk_method", "scoring_func", "hidden_act")
OBJECT_FIELDS = ("rope_scaling", "rope_parameters", "quantization_config")  # a JSON object or null


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    model_type: str = "deepseek_v3"
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    torch_dtype: str | None = None
    quantization_config: dict[str, Any] | None = None
    architectures: list[str] = field(default_factory=list)

    # ----- construction -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        _check_raw_types(raw, source)
        model_type = raw.get("model_type", "deepseek_v3")
        architectures = raw.get("architectures") or []
        known_arch = any(a in SUPPORTED_ARCHITECTURES for a in architectures)
        if model_type not in SUPPORTED_MODEL_TYPES and not known_arch:
            raise ConfigError(
                f"{source}: unknown architecture model_type={model_type!r} "
                f"architectures={architectures}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [name for name in REQUIRED_FIELDS if raw.get(name) is None]
        if missing:
            raise ConfigError(f"{source}: missing required field(s): {', '.join(missing)}")
        values = dict(_variant_defaults(model_type, architectures))
        names = {f.name for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in raw.items() if k in names and v is not None})
        # transformers v5 writes rope settings under `rope_parameters`
        rope_parameters = raw.get("rope_parameters")
        if rope_parameters and not raw.get("rope_scaling"):
            values["rope_theta"] = rope_parameters.get("rope_theta", values.get("rope_theta", 10000.0))
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if rope_type != "default":
                values["rope_scaling"] = {**rope_parameters, "type": rope_type}
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config.json") -> None:
        """Every field the engine reads, with the file, the field and the allowed range in the
        message, before anything is allocated."""
        for name, low, high in INTEGER_FIELDS:
            value = getattr(self, name)
            if value is None and name in OPTIONAL_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{source}: {name} must be a whole number from {low} to {high:,}, not {json.dumps(value)}")
        for name, low, high in REAL_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
                raise ConfigError(f"{source}: {name} must be a number above {low:g} and below {high:g}, not {json.dumps(value)}")
        for name in ("bos_token_id", "eos_token_id"):
            ids = getattr(self, name)
            as_list = ids if isinstance(ids, list) else [] if ids is None else [ids]
            if not all(_is_whole(i) and 0 <= i < self.vocab_size for i in as_list) or (name == "bos_token_id" and isinstance(ids, list)):
                kind = "a token id" if name == "bos_token_id" else "a token id or a list of them"
                raise ConfigError(f"{source}: {name} must be {kind} below vocab_size {self.vocab_size}, or null, not {json.dumps(ids)}")
        if self.n_routed_experts:
            if self.num_experts_per_tok and self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})")
            if self.topk_group and self.n_group and self.topk_group > self.n_group:
                raise ConfigError(f"{source}: topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"{source}: unsupported scoring_func {self.scoring_func!r}")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ConfigError(f"{source}: unsupported topk_method {self.topk_method!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act {self.hidden_act!r}")
        for name in ("tie_word_embeddings", "attention_bias"):  # no DeepSeek-V3-class model has either
            if getattr(self, name):
                raise ConfigError(f"{source}: {name} true is not supported (DeepSeek-V3-class models have it false)")
        if self.has_moe:
            if not self.num_experts_per_tok or not self.moe_intermediate_size:
                raise ConfigError(f"{source}: MoE model needs num_experts_per_tok and moe_intermediate_size")
            if self.n_group and self.n_routed_experts % self.n_group:
                raise ConfigError(f"{source}: n_routed_experts must be divisible by n_group")

    # ----- derived facts ----------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        return bool(self.n_routed_experts) and self.first_k_dense_replace < self.num_hidden_layers

    def is_moe_layer(self, layer: int) -> bool:
        """Layer index `layer` (the MTP layers count as layers >= num_hidden_layers) uses MoE."""
        return (
            bool(self.n_routed_experts)
            and layer >= self.first_k_dense_replace
            and layer % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * (self.n_shared_experts or 0)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale *= m * m
        return scale

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        qc = self.quantization_config or {}
        if qc.get("quant_method") != "fp8":
            return None
        block = qc.get("weight_block_size") or [128, 128]
        return int(block[0]), int(block[1])

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Latent cache: (kv_lora_rank + qk_rope_head_dim) values per token per main layer."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_hidden_layers * bytes_per_value


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_raw_types(raw: dict[str, Any], source: str) -> None:
    """The JSON type of every non-numeric field the engine reads (numbers are checked with
    their ranges in `validate`)."""
    for name in BOOLEAN_FIELDS:
        if name in raw and not isinstance(raw[name], bool):
            raise ConfigError(f"{source}: {name} must be true or false, not {json.dumps(raw[name])}")
    for name in TEXT_FIELDS:
        if name in raw and not isinstance(raw[name], str):
            raise ConfigError(f"{source}: {name} must be a string, not {json.dumps(raw[name])}")
    for name in OBJECT_FIELDS:
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ConfigError(f"{source}: {name} must be an object or null, not {json.dumps(raw[name])}")
    architectures = raw.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"{source}: architectures must be a list of names, not {json.dumps(architectures)}")
    if raw.get("torch_dtype") is not None and not isinstance(raw["torch_dtype"], str):
        raise ConfigError(f"{source}: torch_dtype must be a dtype name or null, not {json.dumps(raw['torch_dtype'])}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _variant_defaults(model_type: str, architectures: list[str]) -> dict[str, Any]:
    """Defaults the Hugging Face config classes use when a key is absent."""
    if model_type == "deepseek_v2" or "DeepseekV2ForCausalLM" in architectures:
        return {
            "scoring_func": "softmax",
            "topk_method": "greedy",
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.0,
            "bos_token_id": 100000,
            "eos_token_id": 100001,
        }
    return {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True}
