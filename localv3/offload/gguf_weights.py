"""A GGUF file's weights for the native engine: its tensors under our checkpoint names, the
routed experts memory-mapped.

The file (every part of a split model) is mapped read-only (the gguf package's reader, a numpy
memmap in mode "r"); opening it reads the header alone. Each layer's routed experts
(`ffn_{gate,up,down}_exps`, [E, out, row bytes] in the tensor's ggml type, float types too)
become a QuantExpertBank over views of that mapping where ggml computes them (the CPU): loading
copies none of them; ggml's mul_mat_id reads their pages when they are first used, and the page
cache holding them is shared by every process that maps the file. GGUF aligns tensor data to 32
bytes, as ggml's CPU buffers need; a tensor that is not aligned is copied. The mapping is
read-only (a write would fault): the banks over it never `store`.

Every other tensor is read as a checkpoint tensor (`GgufCheckpoint`, a CheckpointReader's
interface): float types converted, block types dequantised by ggml (by the gguf package's numpy
dequantiser without llama-cpp-python); MLA's kv_b is read from attn_kv_b (older files) or rebuilt
from attn_k_b (per head transposed) and attn_v_b. Dense-role matrices of a block type keep it
where it runs (`GgufWeights.block_type`: QuantLinear, QuantFeedForward), as a localv3
checkpoint's do; elsewhere they are dequantised once, at load.
"""

from __future__ import annotations

import re
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from localv3.checkpoint import TensorIndex, TensorInfo
from localv3.config import ModelConfig
from localv3.formats import ggml
from localv3.formats.blocks import QuantizedWeight
from localv3.formats.modules import QuantExpertBank, QuantMatrices, runs_blocks
from localv3.formats.table import FORMATS, GGUF_BLOCK_TYPES, BlockType
from localv3.gguf_config import GgufError
from localv3.loader import EXPERT_PROJECTIONS
from localv3.offload.gguf_model import (
    GgufModel,
    checkpoint_tensor_names,
    expert_tensor_name,
    gguf_metadata,
    gguf_model,
    open_parts,
)
from localv3.offload.quant import Quantization
from localv3.offload.shape import ModelShape
from localv3.tokenizer import Tokenizer

HOST = torch.device("cpu")
ALIGNMENT = 32  # what ggml_backend_cpu_buffer_from_ptr asserts of a pointer
FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_KV_B = re.compile(r"^model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight$")


class GgufCheckpoint(TensorIndex):
    """The GGUF's tensors by Hugging Face checkpoint name, read as CheckpointReader reads a
    safetensors checkpoint (`get` returns floats; `info` gives the checkpoint shape)."""

    def __init__(self, path: Path, readers: list, config: ModelConfig):
        self.dir = path  # what messages name, as a checkpoint's directory
        self.config = config
        self.raw = {t.name: t for reader in readers for t in reader.tensors}
        self.held = checkpoint_tensor_names(config.num_hidden_layers)
        self.tensors: dict[str, TensorInfo] = {}
        for name, held in self.held.items():
            present = [h for h in held if h in self.raw]
            if present:
                self.tensors[name] = TensorInfo(name, path, torch.float32, self._shape(name, present), self._nbytes(present))
        for layer in range(config.num_hidden_layers):
            for projection in EXPERT_PROJECTIONS:
                stacked = self.raw.get(expert_tensor_name(layer, projection))
                if stacked is None or len(stacked.shape) != 3:
                    continue
                in_features, out_features, count = (int(n) for n in stacked.shape)
                for expert in range(count):
                    name = f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"
                    self.tensors[name] = TensorInfo(name, path, torch.float32, (out_features, in_features), stacked.n_bytes // count)

    def missing(self, name: str) -> GgufError:
        return GgufError(f"{self.dir}: no tensor {self.holder(name)} (the model's {name})")

    def holder(self, name: str) -> str:
        """The GGUF tensor(s) that hold checkpoint tensor `name`, for messages."""
        if match := _EXPERT.match(name):
            return expert_tensor_name(int(match.group(1)), match.group(3))
        return " or ".join(self.held.get(name, (name,)))

    def block_type(self, name: str) -> BlockType:
        """The ggml type of the GGUF tensor holding `name` (not kv_b, which may be two)."""
        return _block_type(self.raw[self.holder(name)], self.dir)

    def blocks(self, name: str) -> torch.Tensor:
        """uint8 [out, row bytes]: `name`'s rows as stored, a read-only view of the mapping."""
        if match := _EXPERT.match(name):
            return _bytes(self.raw[self.holder(name)], int(match.group(2)))
        return _bytes(self.raw[self.holder(name)])

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`name` in its checkpoint shape, as fp32 (or `dtype`) in memory of its own."""
        self.info(name)
        if (match := _KV_B.match(name)) and f"blk.{match.group(1)}.attn_k_b.weight" in self.raw:
            values = self._kv_b(int(match.group(1)))
        elif match := _EXPERT.match(name):
            stacked = self.raw[self.holder(name)]
            values = _floats(_bytes(stacked, int(match.group(2))), _block_type(stacked, self.dir), int(stacked.shape[0]))
        else:
            (held,) = [h for h in self.held[name] if h in self.raw]
            tensor = self.raw[held]
            values = _floats(_bytes(tensor), _block_type(tensor, self.dir), int(tensor.shape[0]))
            values = values.view(self.tensors[name].shape)
        return values if dtype is None else values.to(dtype)

    def close(self) -> None:
        """Nothing to close: the mapping lives as long as the tensors that view it."""

    def _kv_b(self, layer: int) -> torch.Tensor:
        """[H * (nope + v), C] from attn_k_b ([H, C, nope]: W_UK per head, transposed) and attn_v_b ([H, v, C])."""
        k_b, v_b = self.raw[f"blk.{layer}.attn_k_b.weight"], self.raw[f"blk.{layer}.attn_v_b.weight"]
        nope, rank, heads = (int(n) for n in k_b.shape)
        uk = _floats(_bytes(k_b), _block_type(k_b, self.dir), nope).view(heads, rank, nope)
        uv = _floats(_bytes(v_b), _block_type(v_b, self.dir), rank).view(heads, -1, rank)
        return torch.cat([uk.transpose(1, 2), uv], dim=1).reshape(-1, rank)

    def _shape(self, name: str, present: list[str]) -> tuple[int, ...]:
        """The checkpoint shape of `name` from the GGUF tensors holding it (ggml order reversed)."""
        shapes = [tuple(int(n) for n in reversed(self.raw[h].shape)) for h in present]
        if _KV_B.match(name) and len(present) == 2:  # [H, C, nope] and [H, v, C]
            (heads, rank, nope), (_, v, _) = shapes
            return heads * (nope + v), rank
        return shapes[0]

    def _nbytes(self, present: list[str]) -> int:
        return sum(int(self.raw[h].n_bytes) for h in present)


@dataclass(frozen=True)
class GgufWeights:
    """The runtime's view of a GGUF's matrices (localv3.offload.runtime.Weights' interface): its
    block types as stored, whatever a scheme says; routed experts mapped (`mapped_experts`)."""

    reader: GgufCheckpoint
    manifest: None = None  # no localv3 manifest: nothing is stored as `.qweight`

    def validate(self, expected: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        """One GgufError for the first tensor of `expected` (checkpoint name -> (our name,
        shape)) that the file lacks, holds in another shape or in a type we do not read."""
        for name, (_, shape) in expected.items():
            info = self.reader.info(name)
            if info.shape != tuple(shape):
                raise GgufError(
                    f"{self.reader.dir}: tensor {self.reader.holder(name)} gives {name} the shape {list(info.shape)}; "
                    f"the file's metadata needs {list(shape)}"
                )
            if not _KV_B.match(name):
                self.reader.block_type(name)

    def stored_format(self, weight_name: str) -> None:
        """A GGUF stores no localv3 `.qweight` tensors (its blocks come through block_type)."""
        return None

    def held_in_bf16(self, weight_name: str) -> bool:
        """A GGUF's float tensors are held as floats (its block types come through block_type)."""
        return False

    def block_type(self, weight_name: str, scheme: str | None, in_features: int) -> BlockType | None:
        """The tensor's ggml block type when it is one (float types: None, held as floats)."""
        if _EXPERT.match(weight_name) is None and weight_name not in self.reader.held:
            return None
        block_type = self.reader.block_type(weight_name)
        return None if block_type.name in FLOAT_DTYPES else block_type

    def quantized(self, weight_name: str, block_type: BlockType, in_features: int) -> QuantizedWeight:
        return QuantizedWeight(self.reader.blocks(weight_name), block_type, in_features)

    def mapped_experts(self, layer: int, expert_ids: list[int]) -> QuantExpertBank | None:
        """Layer `layer`'s experts `expert_ids` as views of the file where ggml (or torch, for
        the block types it dequantises) computes their types on the CPU; else None."""
        stacked = [self.reader.raw[expert_tensor_name(layer, p)] for p in EXPERT_PROJECTIONS]
        types = [_block_type(t, self.reader.dir) for t in stacked]
        if not all(runs_blocks(t, HOST) for t in types):
            return None
        matrices = []
        for tensor, block_type in zip(stacked, types):
            in_features, out_features, count = (int(n) for n in tensor.shape)
            data = _bytes(tensor)
            if data.data_ptr() % ALIGNMENT:
                data = data.clone()
            matrices.append(QuantMatrices(block_type, count, out_features, in_features, data=data))
        return QuantExpertBank.over(*matrices, slots=expert_ids)


@dataclass(frozen=True)
class GgufSource:
    """A GGUF model opened for the native engine."""

    path: Path
    model: GgufModel  # configuration and tensor types
    weights: GgufWeights
    metadata: dict[str, str]

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def quantization(self, shape: ModelShape) -> Quantization:
        """The file's tensor types (`stored`) with the role schemes they imply: MLA's absorbed
        W_UK/W_UV are held in Q8_0 when the file's kv_b is quantised, as for a quantised localv3
        checkpoint, else in floats."""
        stored = self.model.stored_formats(shape)

        def scheme(role: str, default: str) -> str:
            names = {f.name for f in stored.get(role, {}).values()}
            return names.pop() if len(names) == 1 and names <= FORMATS.keys() else default

        absorbed = {f.quantized for f in stored.get("absorbed", {}).values()}
        dense = "q8" if True in absorbed else scheme("absorbed", "bf16")
        embeddings = scheme("embeddings", "bf16")
        return Quantization(
            experts=scheme("experts", "q4"),
            dense=dense,
            embeddings=embeddings if not FORMATS[embeddings].quantized else "bf16",
            stored=stored,
        )

    def tokenizer(self) -> Tokenizer:
        """tokenizer.json beside the file, else the GGUF's own vocabulary through llama.cpp."""
        if (self.path.parent / "tokenizer.json").is_file():
            return Tokenizer(self.path.parent)
        return _vocabulary(self.path, self.metadata)


def open_gguf(path: Path) -> GgufSource:
    """Map `path` (a .gguf file, or the first of its split parts) and read its header."""
    readers = open_parts(path)
    model = gguf_model(path, readers)
    weights = GgufWeights(GgufCheckpoint(path, readers, model.config))
    return GgufSource(path, model, weights, gguf_metadata(readers[0]))


def is_gguf_file(path: str | Path) -> bool:
    path = Path(path).expanduser()
    return path.suffix.lower() == ".gguf" and path.is_file()


def _block_type(tensor, path: Path) -> BlockType:
    block_type = GGUF_BLOCK_TYPES.get(tensor.tensor_type.name.lower())
    if block_type is None:
        readable = ", ".join(t.upper() for t in GGUF_BLOCK_TYPES)
        raise GgufError(
            f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, which the native engine does not read "
            f"({readable}); --engine llama.cpp runs it"
        )
    return block_type


def _bytes(tensor, index: int | None = None) -> torch.Tensor:
    """uint8 [..., row bytes]: the tensor's data (or its `index`-th matrix), a read-only view of the mapping."""
    data = tensor.data if index is None else tensor.data[index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch has no read-only tensors; nothing writes to these
        return torch.from_numpy(data.view(np.uint8))


def _floats(blocks: torch.Tensor, block_type: BlockType, n: int) -> torch.Tensor:
    """uint8 [..., row bytes] -> fp32 [..., n] in memory of its own."""
    if block_type.name in FLOAT_DTYPES:
        return blocks.view(FLOAT_DTYPES[block_type.name]).to(torch.float32, copy=True)
    rows = blocks.reshape(-1, blocks.shape[-1])
    if ggml.available():
        values = ggml.dequantize_rows(rows, block_type.ggml_type, n)
    else:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = torch.from_numpy(dequantize(rows.numpy(), GGMLQuantizationType(block_type.ggml_type)))
    return values.reshape(*blocks.shape[:-1], n)


def _vocabulary(path: Path, metadata: dict[str, str]) -> Tokenizer:
    """llama.cpp's tokenizer over the GGUF's vocabulary, from a vocabulary-only load."""
    try:
        import llama_cpp

        from localv3.engines.llama_backend import LOG, init_backend
        from localv3.engines.llama_cpp import LlamaCppTokenizer
    except ImportError:
        raise GgufError(
            f"{path}: no tokenizer.json beside it, and its own vocabulary is read through llama-cpp-python: "
            "pip install 'localv3[llama]'"
        ) from None
    init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with LOG.capture():
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise GgufError(f"{path}: llama.cpp could not read its vocabulary: {LOG.last_error() or 'see its log'}")
    tokenizer = LlamaCppTokenizer(model, metadata)
    weakref.finalize(tokenizer, llama_cpp.llama_model_free, model)
    return tokenizer
