"""`localv3 quantize --format gguf`: a Hugging Face DeepSeek checkpoint -> a llama.cpp GGUF.

Architecture `deepseek2`, with the tensor names and metadata llama.cpp reads: MLA's kv_b_proj split into attn_k_b (per head [kv_lora, nope],
i.e. transposed) and attn_v_b, one KV head of kv_lora + rope, experts stacked per layer, the
router and 1-D tensors in F32, a gpt2-style BPE vocabulary from tokenizer.json. The rope
dimensions need no permutation: the checkpoints store them as interleaved pairs, which is
what llama.cpp's deepseek2 rotates. MTP layers are not exported (llama.cpp does not run them).

The GGUF is written in F32 or F16, streaming tensor by tensor (chunks of rows, one expert at
a time), then `llama_model_quantize` turns it into q8_0 / q4_k_m. Numpy order is written;
the gguf package reverses dims into ggml's order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from localv3.checkpoint import SCALE_SUFFIX, CheckpointReader
from localv3.config import ModelConfig
from localv3.errors import CheckpointError
from localv3.quantize import ConversionSummary, Progress, QuantizeError, atomic_output, iter_rows, open_source
from localv3.tokenizer import read_tokenizer_settings

ARCH = "deepseek2"
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m")
# rough output bytes per weight of the llama.cpp types, for the free-space check
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_k_m": 0.6}


@dataclass
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    dtype: np.dtype
    chunks: Callable[[], Iterator[np.ndarray]]  # the data, in order, in `dtype`
    sources: tuple[str, ...]  # the checkpoint tensors it is made from

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class _Streamed:
    """What GGUFWriter.write_tensor_data needs of an array (nbytes, tofile), produced lazily."""

    def __init__(self, tensor: GgufTensor, advance: Callable[[int, int], None]):
        self.tensor = tensor
        self.nbytes = tensor.nbytes
        self.advance = advance

    def tofile(self, fout) -> None:
        written = 0
        for chunk in self.tensor.chunks():
            chunk.tofile(fout)
            written += chunk.nbytes
            self.advance(0, chunk.nbytes)
        if written != self.nbytes:
            raise QuantizeError(f"GGUF tensor {self.tensor.name}: wrote {written} bytes, expected {self.nbytes}")
        self.advance(1, 0)


class _Source:
    """Reads checkpoint tensors in row chunks, opening each file only while a tensor is read
    (mapped pages count as memory: a stacked expert tensor spans many shards)."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def bytes(self, name: str) -> int:
        scale = self.reader.tensors.get(name + SCALE_SUFFIX)
        return self.reader.info(name).nbytes + (scale.nbytes if scale else 0)

    def rows(self, name: str, dtype: np.dtype) -> Iterator[np.ndarray]:
        info = self.reader.info(name)
        try:
            with safe_open(str(info.file), framework="pt") as handle:
                for _, chunk in iter_rows(handle, info, self.reader):
                    yield chunk.float().numpy().astype(dtype, copy=False)
        finally:
            self.reader.close()

    def whole(self, name: str) -> torch.Tensor:
        try:
            return self.reader.get(name, torch.float32)
        finally:
            self.reader.close()


def _plan(source: _Source, config: ModelConfig, base: np.dtype) -> list[GgufTensor]:
    c = config
    f32 = np.dtype(np.float32)
    tensors: list[GgufTensor] = []

    def add(name: str, hf_name: str, dtype: np.dtype = base) -> None:
        info = source.reader.info(hf_name)
        dtype = f32 if len(info.shape) == 1 else dtype
        tensors.append(GgufTensor(name, info.shape, dtype, lambda: source.rows(hf_name, dtype), (hf_name,)))

    def add_experts(name: str, hf_names: list[str]) -> None:
        shape = source.reader.info(hf_names[0]).shape

        def chunks() -> Iterator[np.ndarray]:
            for hf_name in hf_names:
                yield from source.rows(hf_name, base)

        tensors.append(GgufTensor(name, (len(hf_names), *shape), base, chunks, tuple(hf_names)))

    def add_kv_b(prefix: str, hf_name: str) -> None:
        """kv_b_proj [H * (nope + v), C] -> attn_k_b [H, C, nope] and attn_v_b [H, v, C]."""
        heads, nope, v, rank = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank

        def part(which: str) -> Iterator[np.ndarray]:
            kv_b = source.whole(hf_name).view(heads, nope + v, rank)
            k_b, v_b = kv_b.split([nope, v], dim=1)
            yield (k_b.transpose(1, 2) if which == "k" else v_b).contiguous().numpy().astype(base)

        tensors.append(GgufTensor(f"{prefix}.attn_k_b.weight", (heads, rank, nope), base, lambda: part("k"), (hf_name,)))
        tensors.append(GgufTensor(f"{prefix}.attn_v_b.weight", (heads, v, rank), base, lambda: part("v"), (hf_name,)))

    add("token_embd.weight", "model.embed_tokens.weight")
    for i in range(c.num_hidden_layers):
        hf, blk = f"model.layers.{i}", f"blk.{i}"
        add(f"{blk}.attn_norm.weight", f"{hf}.input_layernorm.weight")
        if c.q_lora_rank is None:
            add(f"{blk}.attn_q.weight", f"{hf}.self_attn.q_proj.weight")
        else:
            add(f"{blk}.attn_q_a.weight", f"{hf}.self_attn.q_a_proj.weight")
            add(f"{blk}.attn_q_a_norm.weight", f"{hf}.self_attn.q_a_layernorm.weight")
            add(f"{blk}.attn_q_b.weight", f"{hf}.self_attn.q_b_proj.weight")
        add(f"{blk}.attn_kv_a_mqa.weight", f"{hf}.self_attn.kv_a_proj_with_mqa.weight")
        add(f"{blk}.attn_kv_a_norm.weight", f"{hf}.self_attn.kv_a_layernorm.weight")
        add_kv_b(blk, f"{hf}.self_attn.kv_b_proj.weight")
        add(f"{blk}.attn_output.weight", f"{hf}.self_attn.o_proj.weight")
        add(f"{blk}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")
        if not c.is_moe_layer(i):
            for proj in ("gate", "up", "down"):
                add(f"{blk}.ffn_{proj}.weight", f"{hf}.mlp.{proj}_proj.weight")
            continue
        add(f"{blk}.ffn_gate_inp.weight", f"{hf}.mlp.gate.weight", f32)
        if c.topk_method == "noaux_tc":
            add(f"{blk}.exp_probs_b.bias", f"{hf}.mlp.gate.e_score_correction_bias")
        for proj in ("gate", "up", "down"):
            names = [f"{hf}.mlp.experts.{e}.{proj}_proj.weight" for e in range(c.n_routed_experts)]
            add_experts(f"{blk}.ffn_{proj}_exps.weight", names)
        if c.n_shared_experts:
            for proj in ("gate", "up", "down"):
                add(f"{blk}.ffn_{proj}_shexp.weight", f"{hf}.mlp.shared_experts.{proj}_proj.weight")
    add("output_norm.weight", "model.norm.weight")
    add("output.weight", "lm_head.weight")
    return tensors


def _check_all_mapped(reader: CheckpointReader, config: ModelConfig, used: set[str]) -> None:
    """Every main-model tensor must have a GGUF place: one that does not (an attention bias,
    an unknown variant) would otherwise be dropped silently."""
    for name in reader.tensors:
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith(SCALE_SUFFIX) or (layer is not None and int(layer) >= config.num_hidden_layers):
            continue
        if name not in used:
            raise QuantizeError(f"{reader.dir}: tensor {name} has no place in a {ARCH} GGUF")


def tokenizer_metadata(model_dir: Path, vocab_size: int) -> dict:
    """tokens, token types and pre-tokenizer from the checkpoint's tokenizer.json (a byte-level
    BPE); merges, special token ids, add-BOS and the chat template(s) through gguf's
    SpecialVocab, after our own check of tokenizer_config.json (one line naming the field)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise QuantizeError(f"{path}: tokenizer.json not found; a GGUF needs the vocabulary")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise QuantizeError(f"{path}: a {model.get('type')} tokenizer; GGUF export supports byte-level BPE")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    entries = [(token, i, gguf.TokenType.NORMAL) for token, i in model["vocab"].items()]
    for added in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        entries.append((added["content"], added["id"], kind))
    for token, i, kind in entries:
        if i >= vocab_size:
            raise QuantizeError(f"{path}: token id {i} ({token!r}) is beyond the model's vocab_size {vocab_size}")
        tokens[i], types[i] = token, kind
    read_tokenizer_settings(model_dir)
    return {
        "tokens": tokens,
        "types": [int(t) for t in types],
        "pre": pre_tokenizer_name(data),
        "special": gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size),
    }


def pre_tokenizer_name(data: dict) -> str:
    """llama.cpp's name for the pre-tokenizer (text splitting before BPE) of tokenizer.json."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    patterns = [(p.get("pattern") or {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    if any("\\p{N}{1,3}" in p for p in patterns) and any("一-龥" in p for p in patterns):
        return "deepseek-v3"  # DeepSeek-V3 / R1
    if patterns and patterns[0] == "[\r\n]":
        return "deepseek-llm"  # DeepSeek-V2
    return "gpt-2"


def _write_metadata(writer: gguf.GGUFWriter, config: ModelConfig, vocab: dict, name: str, file_type: int) -> None:
    c = config
    w = writer
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_leading_dense_block_count(min(c.first_k_dense_replace, c.num_hidden_layers) if c.has_moe else c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)  # MLA's latent cache is one KV head
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    if c.q_lora_rank is not None:
        w.add_q_lora_rank(c.q_lora_rank)
    w.add_kv_lora_rank(c.kv_lora_rank)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts or 0)
    if c.has_moe:
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_weights_scale(c.routed_scaling_factor)
        w.add_expert_weights_norm(c.norm_topk_prob)
        sigmoid = c.scoring_func == "sigmoid"
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
        if c.n_group:
            w.add_expert_group_count(c.n_group)
            w.add_expert_group_used_count(c.topk_group or c.n_group)
    if c.rope_type == "yarn":
        rs = c.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs.get("original_max_position_embeddings", c.max_position_embeddings))
        w.add_rope_scaling_yarn_beta_fast(rs.get("beta_fast") or 32.0)
        w.add_rope_scaling_yarn_beta_slow(rs.get("beta_slow") or 1.0)
        w.add_rope_scaling_yarn_log_mul(0.1 * (rs.get("mscale_all_dim") or 0.0))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    vocab["special"].add_to_gguf(w)
    if "bos" not in vocab["special"].add_special_token:  # as our tokenizer: only the template writes BOS
        w.add_add_bos_token(False)


def export_gguf(
    source_dir: Path, target: Path, gguf_type: str, name: str, progress: Progress = Progress(), threads: int | None = None
) -> ConversionSummary:
    """Write `target` (a .gguf file) from the HF checkpoint in `source_dir`."""
    started = time.perf_counter()
    if gguf_type not in GGUF_TYPES:
        raise QuantizeError(f"--type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    config, reader = open_source(source_dir)
    vocab = tokenizer_metadata(Path(source_dir), config.vocab_size)
    base = np.dtype(np.float32 if gguf_type == "f32" else np.float16)
    source = _Source(reader)
    try:
        tensors = _plan(source, config, base)
    except CheckpointError as exc:
        raise QuantizeError(f"cannot export to GGUF: {exc}") from None
    used = {name for t in tensors for name in t.sources}
    _check_all_mapped(reader, config, used)
    weights = sum(int(np.prod(t.shape)) for t in tensors)
    intermediate = sum(t.nbytes for t in tensors)
    final = intermediate if gguf_type in ("f32", "f16") else int(weights * BYTES_PER_WEIGHT[gguf_type])
    file_type = gguf.LlamaFileType.ALL_F32 if base == np.float32 else gguf.LlamaFileType.MOSTLY_F16
    source_bytes = sum(map(source.bytes, used))

    def build(work: Path) -> Path:
        plain = work / f"{target.stem}.{'f32' if base == np.float32 else 'f16'}.gguf"
        writer = gguf.GGUFWriter(plain, ARCH)
        _write_metadata(writer, config, vocab, name, int(file_type))
        for tensor in tensors:
            writer.add_tensor_info(tensor.name, tensor.shape, tensor.dtype, tensor.nbytes)
        progress.start(len(tensors), intermediate)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tensors:
            writer.write_tensor_data(_Streamed(tensor, progress.advance))
        writer.close()
        if gguf_type in ("f32", "f16"):
            return plain
        from localv3.engines.llama_backend import quantize_file

        quantized = work / target.name
        quantize_file(plain, quantized, gguf_type, threads)
        return quantized

    atomic_output(target, intermediate + final, build)
    return ConversionSummary(target, source_bytes, target.stat().st_size, time.perf_counter() - started)
