"""A safetensors file written piecewise: the header first, then rows of tensors in any order.

A safetensors header holds every tensor's byte range, so it can be written before the data
when the names, dtypes and shapes are known up front (a converter knows them from the input
headers). Rows are then written where they belong as they are produced: neither a tensor
nor the file is ever held whole in memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from localv3.checkpoint import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the first dimension (a 1-D tensor's rows are its elements)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


class StreamedSafetensors:
    def __init__(self, path: Path, specs: list[OutputTensor]):
        self.path = path
        self.specs = {spec.name: spec for spec in specs}
        self.offsets: dict[str, int] = {}
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            self.offsets[spec.name] = offset
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        self.data_start = 8 + len(encoded)
        self.size = self.data_start + offset
        self.unwritten = {spec.name: spec.nbytes for spec in specs}
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, len(encoded).to_bytes(8, "little") + encoded)

    def write_rows(self, name: str, first_row: int, rows: torch.Tensor) -> None:
        """Write `rows` (the tensor's rows first_row.. in its dtype) into place."""
        spec = self.specs[name]
        if rows.dtype != spec.dtype or tuple(rows.shape[1:]) != spec.shape[1:]:
            raise ValueError(f"{name}: rows of {rows.dtype} {list(rows.shape)} do not fit {spec.dtype} {list(spec.shape)}")
        data = rows.contiguous().view(torch.uint8).numpy()
        position = self.data_start + self.offsets[name] + first_row * spec.row_bytes
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written
        self.unwritten[name] -= data.nbytes

    def finish(self) -> None:
        """Check that every byte the header promises was written, flush to disk, close."""
        missing = [name for name, left in self.unwritten.items() if left]
        if missing:
            raise ValueError(f"{self.path}: tensors not fully written: {', '.join(missing[:3])}")
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
