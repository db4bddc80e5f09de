"""Tiny configs of each architecture variant, with the real field names."""

from localv3.synthetic import TINY_V3

V3_MTP = dict(TINY_V3)

# hidden and projection sizes that are not multiples of 128: partial FP8 edge blocks everywhere
V3_FP8 = {
    **TINY_V3,
    "hidden_size": 160,
    "intermediate_size": 200,
    "moe_intermediate_size": 72,
    "q_lora_rank": 136,
    "kv_lora_rank": 80,
    "num_attention_heads": 3,
    "num_key_value_heads": 3,
}

# DeepSeek-V2-Lite: no q LoRA, softmax routing over all experts, no normalisation, YaRN mscale 0.707
V2_LITE = {
    **{k: v for k, v in TINY_V3.items() if k not in ("num_nextn_predict_layers", "topk_method", "torch_dtype")},
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "n_shared_experts": 2,
    "num_experts_per_tok": 3,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "q_lora_rank": None,
    "rope_scaling": {**TINY_V3["rope_scaling"], "mscale": 0.707, "mscale_all_dim": 0.707},
    "moe_layer_freq": 1,
}

V2_GROUP_LIMITED = {**V2_LITE, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}

# Kimi-K2: DeepseekV3 architecture, one expert group, more experts per token, its own scaling
KIMI_K2_STYLE = {
    **TINY_V3,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.827,
    "num_nextn_predict_layers": 0,
    "rope_scaling": None,
    "rope_theta": 50000.0,
}

# DeepSeek-V3's published config (docs/ARCHITECTURE.md, DeepSeek-V3 at a glance)
DEEPSEEK_V3_FULL = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 163840,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
