"""The localv3 checkpoint that `localv3 quantize` writes, and the modules built from it.

Safetensors shards (+ index) and `localv3_manifest.json`. A quantised weight `X.weight` is
stored as `X.qweight`, uint8 [out, row bytes] in a ggml block layout (localv3.formats); every
other tensor keeps its Hugging Face name. The manifest names each quantised weight with its
block type, says where the model came from, and carries `scheme` / `experts` / `dense` for
`localv3 ls`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from localv3.errors import CheckpointError
from localv3.formats.table import BlockType, QuantError, block_type

if TYPE_CHECKING:  # torch is imported where weights are read: `plan` reads only the manifest
    from localv3.checkpoint import CheckpointReader
    from localv3.formats.blocks import QuantizedWeight

MANIFEST_NAME = "localv3_manifest.json"
MANIFEST_VERSION = 2  # 1: torch int4/int8 layouts with separate scales, no longer read
QUANTIZED_SUFFIX = ".qweight"


def qweight_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + QUANTIZED_SUFFIX


@dataclass
class Manifest:
    experts: str  # routed experts: q4 | q8
    dense: str  # attention, shared experts, dense FFN: bf16 | q8
    source: dict  # model, path, revision, dtype of the checkpoint it was made from
    tensors: dict[str, str] = field(default_factory=dict)  # HF weight name -> block type, quantised ones only
    dropped: list[str] = field(default_factory=list)  # source tensors not written (MTP copies of embed/head)
    scheme: str = "localv3"
    version: int = MANIFEST_VERSION

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    def format_of(self, weight_name: str) -> BlockType | None:
        name = self.tensors.get(weight_name)
        return block_type(name) if name else None


def read_manifest(model_dir: Path) -> Manifest | None:
    """The manifest of a localv3 checkpoint; None for a Hugging Face one."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest(**raw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed manifest ({exc})") from None
    if manifest.version != MANIFEST_VERSION:
        raise CheckpointError(
            f"{path}: manifest version {manifest.version}; this localv3 reads {MANIFEST_VERSION} "
            "(quantize the original model again)"
        )
    try:
        for name in manifest.tensors.values():
            block_type(name)
    except QuantError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return manifest


def quantized_expectations(
    expected: dict[str, tuple[str, tuple[int, ...]]], manifest: Manifest
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The loader's expected tensors (HF name -> (our name, shape)) with each quantised weight
    replaced by its block data [out, row bytes], so a checkpoint is validated before loading."""
    out = {}
    for tensor_name, (name, shape) in expected.items():
        stored = manifest.format_of(tensor_name)
        if stored is None:
            out[tensor_name] = (name, shape)
            continue
        rows, in_features = shape
        out[qweight_name(tensor_name)] = (name.removesuffix(".weight") + QUANTIZED_SUFFIX, (rows, stored.row_bytes(in_features)))
    return out


def read_quantized(reader: CheckpointReader, weight_name: str, stored: BlockType, in_features: int) -> QuantizedWeight:
    """A weight of `in_features` columns stored as `stored` blocks."""
    import torch

    from localv3.formats.blocks import QuantizedWeight

    data = reader.get(qweight_name(weight_name))
    if data.dtype != torch.uint8 or data.shape[-1] != stored.row_bytes(in_features):
        raise CheckpointError(
            f"{reader.dir}: {qweight_name(weight_name)} is {data.dtype} {list(data.shape)}, "
            f"not {stored.name} blocks for {in_features} columns"
        )
    return QuantizedWeight(data, stored, in_features)
