"""A GGUF file as the planner sees it: the model configuration from its metadata and the ggml
type of every tensor, so that a plan sizes and times each tensor in the type the file holds
(IQ1_S, IQ2_XXS, Q2_K, Q6_K, ...) instead of a nominal scheme. Bytes per weight come from
ggml's type table (the gguf package's GGML_QUANT_SIZES); headers are read, weights are not.
A model split into `NAME-00001-of-0000N.gguf` parts is read from all of its parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from localv3.config import ModelConfig
from localv3.formats.table import FORMATS, BlockType, WeightFormat
from localv3.gguf_config import GgufError, config_from_gguf
from localv3.offload.shape import ModelShape

SPLIT_PART = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# ggml types that are one of the planner's own schemes (their kernel rates are measured)
KNOWN_TYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "Q8_0": "q8", "Q4_K": "q4"}

# localv3.offload.shape tensor names -> the llama.cpp tensor names that hold them (per decoder layer,
# under `blk.N.`; the model-wide ones without a prefix). MLA's kv_b is one tensor in older
# files and two (attn_k_b, attn_v_b) in newer ones.
_PROJECTIONS = ("gate", "up", "down")
LAYER_TENSORS = {
    "attention": {
        "q_proj.weight": ("attn_q.weight",),
        "q_a_proj.weight": ("attn_q_a.weight",),
        "q_a_layernorm.weight": ("attn_q_a_norm.weight",),
        "q_b_proj.weight": ("attn_q_b.weight",),
        "kv_a_proj_with_mqa.weight": ("attn_kv_a_mqa.weight",),
        "kv_a_layernorm.weight": ("attn_kv_a_norm.weight",),
        "kv_b_proj.weight": ("attn_kv_b.weight", "attn_k_b.weight", "attn_v_b.weight"),
        "o_proj.weight": ("attn_output.weight",),
    },
    "norm": {"input_layernorm.weight": ("attn_norm.weight",), "post_attention_layernorm.weight": ("ffn_norm.weight",)},
    "dense_ffn": {f"{p}_proj.weight": (f"ffn_{p}.weight",) for p in _PROJECTIONS},
    "router": {"gate.weight": ("ffn_gate_inp.weight",), "gate.e_score_correction_bias": ("exp_probs_b.bias",)},
    "shared_expert": {f"{p}_proj.weight": (f"ffn_{p}_shexp.weight",) for p in _PROJECTIONS},
    "routed_expert": {f"{p}_proj.weight": (f"ffn_{p}_exps.weight",) for p in _PROJECTIONS},
}
MODEL_TENSORS = {
    "embedding": {"embed_tokens.weight": ("token_embd.weight",)},
    "norm": {"norm.weight": ("output_norm.weight",)},
    "lm_head": {"lm_head.weight": ("output.weight",)},
}
# where those tensors sit in a Hugging Face checkpoint: under `model.layers.N.` plus these
# prefixes (layer kinds; `{expert}` is the routed expert's number), or these (model-wide kinds)
LAYER_PREFIXES = {
    "attention": "self_attn.",
    "norm": "",
    "dense_ffn": "mlp.",
    "router": "mlp.",
    "shared_expert": "mlp.shared_experts.",
    "routed_expert": "mlp.experts.{expert}.",
}
MODEL_PREFIXES = {"embedding": "model.", "norm": "model.", "lm_head": ""}


def checkpoint_tensor_names(num_layers: int) -> dict[str, tuple[str, ...]]:
    """Hugging Face checkpoint name -> the llama.cpp tensor names that may hold it, for every
    tensor but the routed experts (a GGUF holds a layer's experts of one projection as one
    tensor: `expert_tensor_name`)."""
    names = {MODEL_PREFIXES[kind] + name: held for kind, table in MODEL_TENSORS.items() for name, held in table.items()}
    for layer in range(num_layers):
        for kind, table in LAYER_TENSORS.items():
            if kind == "routed_expert":
                continue
            for name, held in table.items():
                names[f"model.layers.{layer}.{LAYER_PREFIXES[kind]}{name}"] = tuple(f"blk.{layer}.{h}" for h in held)
    return names


def expert_tensor_name(layer: int, projection: str) -> str:
    """The GGUF tensor holding every routed expert's `projection` (gate_proj, up_proj, down_proj) of `layer`."""
    (held,) = LAYER_TENSORS["routed_expert"][f"{projection}.weight"]
    return f"blk.{layer}.{held}"


@dataclass(frozen=True)
class GgufModel:
    name: str
    config: ModelConfig
    parts: tuple[Path, ...]
    tensor_types: dict[str, str]  # llama.cpp tensor name -> ggml type name (IQ1_S, Q6_K, ...)

    def stored_formats(self, shape: ModelShape) -> dict[str, dict[str, WeightFormat]]:
        """tensor role -> {TensorGroup.key: format} for every tensor of `shape` the file holds
        (for kv_b split in two: the wider of the two types)."""
        stored: dict[str, dict[str, WeightFormat]] = {}
        for group in shape.groups:
            table = MODEL_TENSORS if group.layer is None else LAYER_TENSORS
            prefix = "" if group.layer is None else f"blk.{group.layer}."
            for tensor in group.tensors:
                held = [self.tensor_types[prefix + name] for name in table.get(group.kind, {}).get(tensor.name, ())
                        if prefix + name in self.tensor_types]  # fmt: skip
                if held:
                    widest = max((ggml_format(t) for t in held), key=lambda f: f.bits_per_weight)
                    stored.setdefault(tensor.role, {})[group.key(tensor)] = widest
        return stored


def ggml_format(type_name: str) -> WeightFormat:
    """A ggml type as a weight format: the planner's own scheme where it is one (Q4_K is q4,
    Q8_0 q8), else blocks of GGML_QUANT_SIZES' size."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name in KNOWN_TYPES:
        return FORMATS[KNOWN_TYPES[type_name]]
    try:
        ggml_type = GGMLQuantizationType[type_name]
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    except KeyError:
        raise GgufError(f"ggml type {type_name} has no known size") from None
    block_type = BlockType(type_name.lower(), int(ggml_type), block, block_bytes)
    return WeightFormat(type_name.lower(), 8 * block_bytes // block, (block_type,))


def read_gguf(path: Path) -> GgufModel:
    """The configuration (from the metadata, as the llama.cpp engine reads it) and tensor types
    of the model in `path`, a .gguf file or the first of its split parts."""
    return gguf_model(path, open_parts(path))


def open_parts(path: Path) -> list:
    """A GGUFReader (a read-only memory map) of every part of the model in `path`."""
    return [_reader(part) for part in split_parts(path)]


def gguf_model(path: Path, readers: list) -> GgufModel:
    """The model whose parts `readers` read (open_parts(path))."""
    tensor_types = {t.name: t.tensor_type.name for reader in readers for t in reader.tensors}
    metadata = gguf_metadata(readers[0])
    if "deepseek2.vocab_size" not in metadata and "token_embd.weight" in tensor_types:
        embedding = next(t for reader in readers for t in reader.tensors if t.name == "token_embd.weight")
        metadata["deepseek2.vocab_size"] = str(int(embedding.shape[-1]))  # ggml order: [hidden, vocab]
    match = SPLIT_PART.match(path.name)
    name = match.group("stem") if match else path.stem
    return GgufModel(name, config_from_gguf(metadata, str(path)), tuple(split_parts(path)), tensor_types)


def split_parts(path: Path) -> list[Path]:
    """`path` alone, or every part of the split model whose first part it is."""
    match = SPLIT_PART.match(path.name)
    if not match:
        return [path]
    count = int(match.group("count"))
    parts = [path.with_name(f"{match.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise GgufError(f"{path}: split model lacks {', '.join(missing)}")
    return parts


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise GgufError(f"{path}: not a readable GGUF file ({exc})") from None


def gguf_metadata(reader) -> dict[str, str]:
    """Key -> value as llama.cpp prints it (booleans `true`/`false`); arrays are left out."""
    from gguf import GGUFValueType

    metadata = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.contents()
        metadata[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return metadata


def type_named(precision: str) -> str | None:
    """The ggml type a GGUF precision names (`UD-IQ1_S` -> IQ1_S, `Q4_K_M` -> Q4_K), if any."""
    from gguf import GGMLQuantizationType

    name = precision.upper().removeprefix("UD-")
    for candidate in (name, name.rsplit("_", 1)[0]):
        if candidate in GGMLQuantizationType.__members__:
            return candidate
    return None


def nominal_expert_formats(shape: ModelShape, type_name: str) -> dict[str, dict[str, WeightFormat]]:
    """Every routed expert's tensors in `type_name`, as a GGUF of that precision mostly holds them."""
    fmt = ggml_format(type_name)
    return {"experts": {g.key(t): fmt for g in shape.groups if g.kind == "routed_expert" for t in g.tensors}}
