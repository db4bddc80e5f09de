"""Lazy access to Hugging Face safetensors checkpoints (single file or sharded).

Headers are parsed up front, so a missing shard, a truncated file or a tensor of the wrong
shape is reported before any weight is read. Tensors are read memory-mapped one at a time;
FP8 e4m3 weights with a `<name>_scale_inv` (one fp32 scale per block, edge blocks partial)
are dequantised on request. No pickle: only safetensors files are read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from localv3.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
# the router runs in fp32: its weight and correction bias stay fp32 whatever the model dtype

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)  # weights


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one file's header and check that the file holds every byte the header promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header cut off)")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    infos, spans = {}, []
    data_size = size - 8 - header_len
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        info, (start, end) = _tensor_info(path, name, meta)
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name} needs bytes up to {end}, file has {data_size}"
            )
        infos[name] = info
        spans.append((start, end, name))
    spans.sort()
    for (_, previous_end, previous), (start, _, name) in zip(spans, spans[1:]):
        if start < previous_end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {previous} and {name} overlap")
    return infos


def _tensor_info(path: Path, name: str, meta) -> tuple[TensorInfo, tuple[int, int]]:
    """One header entry, checked: dtype known, shape and data_offsets well formed, and the
    offsets spanning exactly the bytes the shape and dtype need."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {name} {why}")

    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise corrupt("lacks dtype, shape or data_offsets")
    dtype = SAFETENSORS_DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise corrupt(f"has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise corrupt(f"has data_offsets {offsets!r}")
    start, end = offsets
    needed = math.prod(shape) * dtype.itemsize
    if not 0 <= start <= end or end - start != needed:
        raise corrupt(f"has data_offsets [{start}, {end}] for {needed} bytes of {meta['dtype']} {shape}")
    return TensorInfo(name, path, dtype, tuple(shape), needed), (start, end)


class TensorIndex:
    """Tensors by checkpoint name (`tensors`, filled by the subclass), each a TensorInfo; a
    subclass says how a missing one is reported (`missing`)."""

    tensors: dict[str, TensorInfo]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self.missing(name) from None

    def missing(self, name: str) -> Exception:
        raise NotImplementedError


class CheckpointReader(TensorIndex):
    """All tensors of a model directory, by name; reads lazily."""

    def __init__(self, model_dir: str | os.PathLike, fp8_block: tuple[int, int] = (128, 128)):
        self.dir = Path(model_dir)
        self.fp8_block = fp8_block
        self.tensors: dict[str, TensorInfo] = {}
        for path in self._weight_files():
            self.tensors.update(read_safetensors_header(path))
        self._handles: dict[Path, object] = {}

    def _weight_files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not isinstance(name, str) or not (self.dir / name).resolve().is_relative_to(self.dir.resolve()):
                    raise CheckpointError(f"{index}: shard {name!r} lies outside the model directory")
                if not (self.dir / name).is_file():
                    tensor = next(t for t, f in weight_map.items() if f == name)
                    raise CheckpointError(f"{self.dir / name}: missing shard (holds tensor {tensor})")
            return [self.dir / name for name in files]
        if (self.dir / SINGLE_FILE).is_file():
            return [self.dir / SINGLE_FILE]
        shards = sorted(self.dir.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.dir}: no safetensors weights found")
        return shards

    def missing(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.dir}: tensor {name} not found in the checkpoint")

    def is_fp8(self, name: str) -> bool:
        return self.info(name).dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor as it is on disk (memory-mapped where safetensors can)."""
        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle.get_tensor(name)

    def get(self, name: str, dtype: torch.dtype | None = None):
        """The tensor in `dtype` (FP8 weights dequantised with their block scales)."""
        info = self.info(name)
        tensor = self.raw(name)
        if self.is_fp8(name):
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self.tensors:
                raise CheckpointError(f"{info.file}: FP8 tensor {name} has no {scale_name}")
            tensor = dequantize_fp8_blocks(tensor, self.raw(scale_name), self.fp8_block)
        return tensor.to(dtype) if dtype is not None else tensor

    def close(self) -> None:
        self._handles.clear()


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """weight [out, in] fp8, scale_inv [ceil(out/bo), ceil(in/bi)] fp32 -> fp32 [out, in]."""
    out_dim, in_dim = weight.shape
    block_out, block_in = block
    if scale_inv.shape != (-(-out_dim // block_out), -(-in_dim // block_in)):
        raise CheckpointError(
            f"FP8 scale of shape {list(scale_inv.shape)} does not fit weight {list(weight.shape)} in {block} blocks"
        )
    scale = scale_inv.float().repeat_interleave(block_out, 0)[:out_dim].repeat_interleave(block_in, 1)[:, :in_dim]
    return weight.float() * scale


def quantize_fp8_blocks(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, as DeepSeek's FP8 checkpoints store weights: per-block absmax / 448 scales."""
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[:out_dim, :in_dim] = weight.float()
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [rows, cols]
    q = (blocks / scale[:, None, :, None]).view(rows * block, cols * block)[:out_dim, :in_dim]
    return q.to(torch.float8_e4m3fn), scale
