"""The localv3 checkpoint that `localv3 quantize` writes, and the modules built from it.

Safetensors shards (+ index) and `localv3_manifest.json`. A quantised weight `X.weight` is
stored as `X.qweight` and `X.scales` (formats in localv3.quant); every other tensor keeps its
Hugging Face name. The manifest names each quantised weight with its format, says where the
model came from, and carries `scheme` / `experts` / `dense` for `localv3 ls`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from localv3.checkpoint import CheckpointReader
from localv3.errors import CheckpointError
from localv3.quant import SCALE_DTYPE, QuantExpertBank, QuantFormat, QuantizedWeight, QuantLinear, quant_format

MANIFEST_NAME = "localv3_manifest.json"
MANIFEST_VERSION = 1
QUANTIZED_SUFFIXES = (".qweight", ".scales")


def qweight_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + QUANTIZED_SUFFIXES[0]


def scales_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + QUANTIZED_SUFFIXES[1]


@dataclass
class Manifest:
    experts: str  # routed experts: q4 | q8
    dense: str  # attention, shared experts, dense FFN: bf16 | q8
    source: dict  # model, path, revision, dtype of the checkpoint it was made from
    tensors: dict[str, str] = field(default_factory=dict)  # HF weight name -> format, quantised ones only
    dropped: list[str] = field(default_factory=list)  # source tensors not written (MTP copies of embed/head)
    scheme: str = "localv3"
    version: int = MANIFEST_VERSION

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    def format_of(self, weight_name: str) -> QuantFormat | None:
        name = self.tensors.get(weight_name)
        return quant_format(name) if name else None


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
        raise CheckpointError(f"{path}: manifest version {manifest.version}; this localv3 reads {MANIFEST_VERSION}")
    return manifest


def quantized_expectations(
    expected: dict[str, tuple[str, tuple[int, ...]]], manifest: Manifest
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The loader's expected tensors (HF name -> (our name, shape)) with each quantised
    weight replaced by its q-weight and scales, so a checkpoint is validated before loading."""
    out = {}
    for tensor_name, (name, shape) in expected.items():
        fmt = manifest.format_of(tensor_name)
        if fmt is None:
            out[tensor_name] = (name, shape)
            continue
        base = name.removesuffix(".weight")
        out[qweight_name(tensor_name)] = (f"{base}.qweight", fmt.qweight_shape(*shape))
        out[scales_name(tensor_name)] = (f"{base}.scales", fmt.scales_shape(*shape))
    return out


def read_quantized(reader: CheckpointReader, weight_name: str, fmt: QuantFormat) -> QuantizedWeight:
    qweight = reader.get(qweight_name(weight_name))
    if qweight.dtype != fmt.qweight_dtype:
        raise CheckpointError(f"{reader.dir}: {qweight_name(weight_name)} is {qweight.dtype}, {fmt.name} needs {fmt.qweight_dtype}")
    return QuantizedWeight(qweight, reader.get(scales_name(weight_name), SCALE_DTYPE), fmt)


def load_quant_linear(
    reader: CheckpointReader, weight_name: str, fmt: QuantFormat, bias: torch.Tensor | None, device
) -> QuantLinear:
    return QuantLinear.from_weight(read_quantized(reader, weight_name, fmt), bias, device)


def load_quant_expert_bank(
    reader: CheckpointReader, names: list[dict[str, str]], fmt: QuantFormat, dim: int, hidden: int, device
) -> QuantExpertBank:
    """names: per expert, {gate_proj, up_proj, down_proj} -> HF weight name."""
    bank = QuantExpertBank(len(names), dim, hidden, fmt, device)
    for expert, expert_names in enumerate(names):
        bank.store(expert, *(read_quantized(reader, expert_names[p], fmt) for p in ("gate_proj", "up_proj", "down_proj")))
    return bank
