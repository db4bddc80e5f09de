"""The model configuration (Hugging Face field names) from a deepseek2 GGUF's metadata: one
reading for the planner, the native engine and the llama.cpp engine. Metadata values come as
llama.cpp prints them (numbers as text, booleans `true`/`false`). Torch-free.
"""

from __future__ import annotations

from localv3.config import ModelConfig
from localv3.errors import LocalV3Error

ARCH = "deepseek2"
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}
# metadata without which the model's shape is unknown (`{ARCH}.` before each)
REQUIRED_KEYS = (
    "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
    "attention.kv_lora_rank", "rope.dimension_count", "attention.key_length", "attention.value_length",
)  # fmt: skip


class GgufError(LocalV3Error):
    """A GGUF file that localv3 cannot read or run."""


def config_from_gguf(metadata: dict[str, str], source: str) -> ModelConfig:
    """The model configuration (Hugging Face field names) from a deepseek2 GGUF's metadata."""
    arch = metadata.get("general.architecture")
    if arch != ARCH:
        raise GgufError(f"{source}: architecture {arch!r}; localv3 reads {ARCH} (DeepSeek-V2/V3) models")

    def get(key: str, cast=int, default=None):
        value = metadata.get(f"{ARCH}.{key}")
        if value is None:
            return default
        return value == "true" if cast is bool else cast(value)

    rope_dim = get("rope.dimension_count")
    missing = [f"{ARCH}.{key}" for key in REQUIRED_KEYS if get(key) is None]
    if missing:
        raise GgufError(f"{source}: GGUF metadata lacks {', '.join(missing)}")
    raw = {
        "model_type": "deepseek_v3",
        "vocab_size": get("vocab_size"),
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": get("attention.head_count"),
        "q_lora_rank": get("attention.q_lora_rank"),
        "kv_lora_rank": get("attention.kv_lora_rank"),
        "qk_rope_head_dim": rope_dim,
        # GGUFs from before llama.cpp split MLA's kv_b carry only key_length / value_length
        "qk_nope_head_dim": get("attention.key_length_mla", default=get("attention.key_length")) - rope_dim,
        "v_head_dim": get("attention.value_length_mla", default=get("attention.value_length")),
        "moe_intermediate_size": get("expert_feed_forward_length", default=0),
        "n_routed_experts": get("expert_count"),
        "n_shared_experts": get("expert_shared_count"),
        "num_experts_per_tok": get("expert_used_count"),
        "n_group": get("expert_group_count"),
        "topk_group": get("expert_group_used_count"),
        "routed_scaling_factor": get("expert_weights_scale", float, 1.0),
        "norm_topk_prob": get("expert_weights_norm", bool, False),
        "scoring_func": GATING_FUNCS.get(get("expert_gating_func", default=1), "softmax"),
        "first_k_dense_replace": get("leading_dense_block_count", default=0),
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float),
        "rope_theta": get("rope.freq_base", float, 10000.0),
        "bos_token_id": token_or_none(int(metadata.get("tokenizer.ggml.bos_token_id", -1))),
        "eos_token_id": token_or_none(int(metadata.get("tokenizer.ggml.eos_token_id", -1))),
    }
    if raw["scoring_func"] == "softmax":
        raw["topk_method"] = "group_limited_greedy" if (raw["n_group"] or 1) > 1 else "greedy"
    if get("rope.scaling.type", str) == "yarn":
        log_multiplier = get("rope.scaling.yarn_log_multiplier", float, 0.0)
        raw["rope_scaling"] = {
            "type": "yarn",
            "factor": get("rope.scaling.factor", float),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
            "beta_fast": get("rope.scaling.yarn_beta_fast", float, 32.0),
            "beta_slow": get("rope.scaling.yarn_beta_slow", float, 1.0),
            "mscale": 1.0,
            "mscale_all_dim": log_multiplier / 0.1,
        }
    if raw["vocab_size"] is None:
        raise GgufError(f"{source}: GGUF metadata lacks {ARCH}.vocab_size")
    return ModelConfig.from_dict({k: v for k, v in raw.items() if v is not None}, source=source)


def token_or_none(token: int) -> int | None:
    """llama.cpp says "no such token" with -1."""
    return token if token >= 0 else None
