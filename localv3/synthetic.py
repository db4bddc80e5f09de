"""Random DeepSeek-V3-architecture checkpoints with the real tensor names.

Used by the tests (tiny configs), the benchmarks (~100M-parameter V3-shaped models) and the
fallback demo model. Weights are scaled like a trained model's (std ~ 1/sqrt(fan_in)) so that
logits are far from uniform and greedy decoding is meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from localv3.checkpoint import FP32_TENSOR_SUFFIXES, INDEX_FILE, quantize_fp8_blocks
from localv3.config import ModelConfig

TINY_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 128,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def checkpoint_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint for `config` (fp32), named as the Hugging Face checkpoints."""
    g = torch.Generator().manual_seed(seed)
    c = config
    tensors: dict[str, torch.Tensor] = {}

    def linear(name: str, out_dim: int, in_dim: int) -> None:
        tensors[name + ".weight"] = torch.randn(out_dim, in_dim, generator=g) / in_dim**0.5

    def norm(name: str, dim: int) -> None:
        tensors[name + ".weight"] = 1.0 + 0.1 * torch.randn(dim, generator=g)

    def block(prefix: str, layer: int) -> None:
        norm(f"{prefix}.input_layernorm", c.hidden_size)
        norm(f"{prefix}.post_attention_layernorm", c.hidden_size)
        a = f"{prefix}.self_attn"
        heads = c.num_attention_heads
        if c.q_lora_rank is None:
            linear(f"{a}.q_proj", heads * c.qk_head_dim, c.hidden_size)
        else:
            linear(f"{a}.q_a_proj", c.q_lora_rank, c.hidden_size)
            norm(f"{a}.q_a_layernorm", c.q_lora_rank)
            linear(f"{a}.q_b_proj", heads * c.qk_head_dim, c.q_lora_rank)
        linear(f"{a}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size)
        norm(f"{a}.kv_a_layernorm", c.kv_lora_rank)
        linear(f"{a}.kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        linear(f"{a}.o_proj", c.hidden_size, heads * c.v_head_dim)
        m = f"{prefix}.mlp"
        if c.is_moe_layer(layer):
            tensors[f"{m}.gate.weight"] = torch.randn(c.n_routed_experts, c.hidden_size, generator=g) / c.hidden_size**0.5
            if c.topk_method == "noaux_tc":
                tensors[f"{m}.gate.e_score_correction_bias"] = 0.1 * torch.randn(c.n_routed_experts, generator=g)
            for e in range(c.n_routed_experts):
                _mlp(f"{m}.experts.{e}", c.moe_intermediate_size)
            if c.n_shared_experts:
                _mlp(f"{m}.shared_experts", c.shared_intermediate_size)
        else:
            _mlp(m, c.intermediate_size)

    def _mlp(prefix: str, hidden: int) -> None:
        linear(f"{prefix}.gate_proj", hidden, c.hidden_size)
        linear(f"{prefix}.up_proj", hidden, c.hidden_size)
        linear(f"{prefix}.down_proj", c.hidden_size, hidden)

    tensors["model.embed_tokens.weight"] = torch.randn(c.vocab_size, c.hidden_size, generator=g)
    for i in range(c.num_hidden_layers):
        block(f"model.layers.{i}", i)
    norm("model.norm", c.hidden_size)
    linear("lm_head", c.vocab_size, c.hidden_size)
    for j in range(c.num_nextn_predict_layers):
        layer = c.num_hidden_layers + j
        p = f"model.layers.{layer}"
        norm(f"{p}.enorm", c.hidden_size)
        norm(f"{p}.hnorm", c.hidden_size)
        linear(f"{p}.eh_proj", c.hidden_size, 2 * c.hidden_size)
        block(p, layer)
        norm(f"{p}.shared_head.norm", c.hidden_size)
        tensors[f"{p}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        tensors[f"{p}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    return tensors


def is_fp8_candidate(name: str, tensor: torch.Tensor) -> bool:
    """DeepSeek's FP8 checkpoints quantise 2-D projection weights; not norms, router, embeddings, heads."""
    return tensor.dim() == 2 and name.endswith("_proj.weight")


def write_checkpoint(
    out_dir: str | Path,
    raw_config: dict[str, Any],
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    shards: int = 1,
) -> Path:
    """Write config.json + safetensors (sharded with an index when shards > 1)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_config = dict(raw_config)
    if fp8:
        raw_config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    config = ModelConfig.from_dict(raw_config)
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in checkpoint_tensors(config, seed).items():
        if name.endswith(FP32_TENSOR_SUFFIXES):
            stored[name] = tensor.float()
        elif fp8 and is_fp8_candidate(name, tensor):
            stored[name], stored[name + "_scale_inv"] = quantize_fp8_blocks(tensor)
        else:
            stored[name] = tensor.to(dtype).contiguous()
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    names = sorted(stored)
    if shards <= 1:
        save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per_shard : (k + 1) * per_shard]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: stored[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out
