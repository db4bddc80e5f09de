"""Random DeepSeek-V3-architecture checkpoints with the real tensor names.

Used by the tests (tiny configs) and the benchmarks (~100M-parameter V3-shaped models);
scripts/train_tiny.py grows TINY_V3's architecture into the bundled tiny model's. Weights are
scaled like a trained model's (std ~ 1/sqrt(fan_in)) so that logits are far from uniform and
greedy decoding is meaningful. write_checkpoint_streaming writes the same tensors shard by shard
for models larger than memory (benchmarks/slice_vs_llamacpp.py's DeepSeek-V3-width slice), and
train_random_tokenizer gives such models a BPE vocabulary of any size.

It ships in the package (no command imports it) so that the benchmarks, the training script and
the tests, three separate entry points, import one copy without path tricks, from a checkout or
an installed wheel alike.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from localv3.checkpoint import INDEX_FILE, quantize_fp8_blocks
from localv3.formats.roles import FP32_TENSOR_SUFFIXES
from localv3.config import ModelConfig

V3_BOS = "<｜begin▁of▁sentence｜>"
V3_EOS = "<｜end▁of▁sentence｜>"

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
    return dict(iter_checkpoint_tensors(config, seed))


def iter_checkpoint_tensors(config: ModelConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """checkpoint_tensors one tensor at a time (same names, order and values): a model larger
    than memory can be written while only one fp32 tensor (plus the embeddings) is alive."""
    g = torch.Generator().manual_seed(seed)
    c = config

    def linear(name: str, out_dim: int, in_dim: int) -> tuple[str, torch.Tensor]:
        return name + ".weight", torch.randn(out_dim, in_dim, generator=g) / in_dim**0.5

    def norm(name: str, dim: int) -> tuple[str, torch.Tensor]:
        return name + ".weight", 1.0 + 0.1 * torch.randn(dim, generator=g)

    def mlp(prefix: str, hidden: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield linear(f"{prefix}.gate_proj", hidden, c.hidden_size)
        yield linear(f"{prefix}.up_proj", hidden, c.hidden_size)
        yield linear(f"{prefix}.down_proj", c.hidden_size, hidden)

    def block(prefix: str, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield norm(f"{prefix}.input_layernorm", c.hidden_size)
        yield norm(f"{prefix}.post_attention_layernorm", c.hidden_size)
        a = f"{prefix}.self_attn"
        heads = c.num_attention_heads
        if c.q_lora_rank is None:
            yield linear(f"{a}.q_proj", heads * c.qk_head_dim, c.hidden_size)
        else:
            yield linear(f"{a}.q_a_proj", c.q_lora_rank, c.hidden_size)
            yield norm(f"{a}.q_a_layernorm", c.q_lora_rank)
            yield linear(f"{a}.q_b_proj", heads * c.qk_head_dim, c.q_lora_rank)
        yield linear(f"{a}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size)
        yield norm(f"{a}.kv_a_layernorm", c.kv_lora_rank)
        yield linear(f"{a}.kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        yield linear(f"{a}.o_proj", c.hidden_size, heads * c.v_head_dim)
        m = f"{prefix}.mlp"
        if c.is_moe_layer(layer):
            yield f"{m}.gate.weight", torch.randn(c.n_routed_experts, c.hidden_size, generator=g) / c.hidden_size**0.5
            if c.topk_method == "noaux_tc":
                yield f"{m}.gate.e_score_correction_bias", 0.1 * torch.randn(c.n_routed_experts, generator=g)
            for e in range(c.n_routed_experts):
                yield from mlp(f"{m}.experts.{e}", c.moe_intermediate_size)
            if c.n_shared_experts:
                yield from mlp(f"{m}.shared_experts", c.shared_intermediate_size)
        else:
            yield from mlp(m, c.intermediate_size)

    embed = torch.randn(c.vocab_size, c.hidden_size, generator=g)  # [V, D]
    yield "model.embed_tokens.weight", embed
    for i in range(c.num_hidden_layers):
        yield from block(f"model.layers.{i}", i)
    yield norm("model.norm", c.hidden_size)
    head_name, head = linear("lm_head", c.vocab_size, c.hidden_size)  # [V, D]
    yield head_name, head
    for j in range(c.num_nextn_predict_layers):
        layer = c.num_hidden_layers + j
        p = f"model.layers.{layer}"
        yield norm(f"{p}.enorm", c.hidden_size)
        yield norm(f"{p}.hnorm", c.hidden_size)
        yield linear(f"{p}.eh_proj", c.hidden_size, 2 * c.hidden_size)
        yield from block(p, layer)
        yield norm(f"{p}.shared_head.norm", c.hidden_size)
        yield f"{p}.shared_head.head.weight", head.clone()
        yield f"{p}.embed_tokens.weight", embed.clone()


def is_fp8_candidate(name: str, tensor: torch.Tensor) -> bool:
    """DeepSeek's FP8 checkpoints quantise 2-D projection weights; not norms, router, embeddings, heads."""
    return tensor.dim() == 2 and name.endswith("_proj.weight")


FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def _with_quantization_config(raw_config: dict[str, Any], fp8: bool) -> dict[str, Any]:
    raw_config = dict(raw_config)
    if fp8:
        raw_config["quantization_config"] = {**FP8_QUANTIZATION_CONFIG, "weight_block_size": [128, 128]}
    return raw_config


def stored_tensors(name: str, tensor: torch.Tensor, dtype: torch.dtype, fp8: bool) -> dict[str, torch.Tensor]:
    """How a checkpoint stores one fp32 tensor: router in fp32, projections as FP8 blocks +
    `_scale_inv` (with fp8), everything else in `dtype`."""
    if name.endswith(FP32_TENSOR_SUFFIXES):
        return {name: tensor.float()}
    if fp8 and is_fp8_candidate(name, tensor):
        weight, scale_inv = quantize_fp8_blocks(tensor)  # [out, in] e4m3, [ceil(out/128), ceil(in/128)] fp32
        return {name: weight, name + "_scale_inv": scale_inv}
    return {name: tensor.to(dtype).contiguous()}


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
    raw_config = _with_quantization_config(raw_config, fp8)
    config = ModelConfig.from_dict(raw_config)
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in checkpoint_tensors(config, seed).items():
        stored.update(stored_tensors(name, tensor, dtype, fp8))
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


def write_checkpoint_streaming(
    out_dir: str | Path,
    raw_config: dict[str, Any],
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    shard_bytes: int = 1 << 30,
    progress: Callable[[str, int], None] = lambda shard, nbytes: None,
) -> Path:
    """write_checkpoint for models larger than memory: the same tensors (same values for the
    same seed), generated one at a time and written in shards of about `shard_bytes` (a tensor
    is never split), then the index. Peak memory is about one shard plus one fp32 tensor and
    its FP8 conversion. `progress(shard_file, shard_bytes)` is called after each shard."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_config = _with_quantization_config(raw_config, fp8)
    config = ModelConfig.from_dict(raw_config)
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    files: list[list[str]] = []  # names per shard, in order
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        if not pending:
            return
        part = out / f"model-{len(files) + 1:05d}.partial.safetensors"
        save_file(pending, str(part), metadata={"format": "pt"})
        files.append(sorted(pending))
        progress(part.name, pending_bytes)
        pending.clear()

    for name, tensor in iter_checkpoint_tensors(config, seed):
        converted = stored_tensors(name, tensor, dtype, fp8)
        del tensor
        size = sum(t.nbytes for t in converted.values())
        if pending and pending_bytes + size > shard_bytes:
            flush()
            pending_bytes = 0
        pending.update(converted)
        pending_bytes += size
    flush()
    weight_map = {}
    for k, names in enumerate(files):
        file = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        (out / f"model-{k + 1:05d}.partial.safetensors").rename(out / file)
        weight_map.update({n: file for n in names})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out


def train_random_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) of up to `vocab_size` tokens, with
    DeepSeek's BOS (id 0) and EOS (id 1), trained on seeded pseudo-words: a vocabulary for
    random models of any vocab size, so that they can be exported to GGUF and tokenised."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ng", "st"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(4 * vocab_size)]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf: a clear merge order
    corpus = [" ".join(rng.choices(words, weights, k=32)) for _ in range(8 * vocab_size)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[V3_BOS, V3_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def write_tokenizer_files(out_dir: str | Path, tokenizer) -> None:
    """tokenizer.json and a tokenizer_config.json naming BOS/EOS, as the hub checkpoints have."""
    out = Path(out_dir)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"bos_token": V3_BOS, "eos_token": V3_EOS, "add_bos_token": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
