"""Bytes of weights a decode step reads, from the files of a localv3 checkpoint or a GGUF.

A token at decode reads every weight of the main model's attention, dense FFN, shared
experts, router, norms and lm_head, top_k of the n_routed experts of each MoE layer, and one
row of the embedding table. The MTP layer (index >= num_hidden_layers in a localv3 checkpoint;
absent from a GGUF) is not read by plain decoding. Sizes are the stored bytes (quantised
weights with their scales), read from the safetensors headers or the GGUF tensor table
without loading any data.
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

CATEGORIES = ("attention", "dense_ffn", "shared_experts", "routed_experts", "router", "norms", "lm_head", "embedding")

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.*)$")


@dataclass
class ActiveWeights:
    """Bytes per category: all stored, and read per decoded token."""

    stored: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    per_token: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    mtp_bytes: int = 0  # stored, never read by plain decoding

    @property
    def per_token_bytes(self) -> float:
        return sum(self.per_token.values())

    def add(self, category: str, nbytes: int, read_fraction: float) -> None:
        self.stored[category] += nbytes
        self.per_token[category] += nbytes * read_fraction

    def to_dict(self) -> dict:
        return {
            "per_token_bytes": round(self.per_token_bytes),
            "per_token": {k: round(self.per_token[k]) for k in CATEGORIES if k in self.per_token},
            "stored": {k: self.stored[k] for k in CATEGORIES if k in self.stored},
            "mtp_stored_bytes": self.mtp_bytes,
        }


def safetensors_sizes(model_dir: Path) -> dict[str, int]:
    """Tensor name -> stored bytes, from the headers of every *.safetensors file in `model_dir`."""
    sizes = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                sizes[name] = end - start
    return sizes


def gguf_sizes(path: Path) -> dict[str, int]:
    """Tensor name -> stored bytes, from a GGUF file's tensor table."""
    from gguf import GGUFReader

    return {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}


def hf_category(rest: str) -> str:
    """Category of a per-layer Hugging Face / localv3 tensor name (the part after `model.layers.N.`)."""
    if rest.startswith("self_attn."):
        return "attention"
    if rest.startswith("mlp.experts."):
        return "routed_experts"
    if rest.startswith("mlp.shared_experts."):
        return "shared_experts"
    if rest.startswith("mlp.gate."):
        return "router"
    if rest.startswith("mlp."):
        return "dense_ffn"
    return "norms"


def gguf_category(rest: str) -> str:
    """Category of a per-block GGUF tensor name (the part after `blk.N.`)."""
    if rest.startswith(("attn_norm", "ffn_norm")):
        return "norms"
    if rest.startswith("attn_"):
        return "attention"
    if "_exps" in rest:
        return "routed_experts"
    if "_shexp" in rest:
        return "shared_experts"
    if rest.startswith(("ffn_gate_inp", "exp_probs_b")):
        return "router"
    return "dense_ffn"


def active_weights(path: Path, num_hidden_layers: int, top_k: int, n_routed: int, vocab_size: int) -> ActiveWeights:
    """Bytes read per decoded token by the model in `path` (a localv3 directory or a .gguf file)."""
    is_gguf = path.is_file()
    sizes = gguf_sizes(path) if is_gguf else safetensors_sizes(path)
    result = ActiveWeights()
    routed_fraction = top_k / n_routed
    for name, nbytes in sizes.items():
        layer = (_GGUF_LAYER if is_gguf else _HF_LAYER).match(name)
        if layer:
            if int(layer.group(1)) >= num_hidden_layers:
                result.mtp_bytes += nbytes
                continue
            category = (gguf_category if is_gguf else hf_category)(layer.group(2))
        elif name.startswith(("token_embd", "model.embed_tokens")):
            category = "embedding"
        elif name.startswith(("output.", "lm_head")):
            category = "lm_head"
        else:
            category = "norms"  # output_norm / model.norm
        fraction = {"routed_experts": routed_fraction, "embedding": 1 / vocab_size}.get(category, 1.0)
        result.add(category, nbytes, fraction)
    return result
