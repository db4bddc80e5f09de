"""Quantised weights in ggml block layouts: quantising a matrix (ggml's reference quantiser) and
dequantising it in torch on any device (the GPU path and the reference for the CPU kernels).

Block layouts (little-endian; one row of a matrix is a run of whole blocks):
- Q8_0 (34 bytes / 32 weights): fp16 d, then 32 int8 q; w = d * q.
- Q4_0 (18 bytes / 32 weights): fp16 d, then 16 bytes; byte j holds weight j in its low nibble
  and weight j + 16 in its high nibble, each stored as q + 8; w = d * q.
- Q4_K (144 bytes / 256 weights): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for the
  8 sub-blocks of 32, then 128 bytes: bytes 32c..32c+31 hold sub-block 2c in their low nibbles
  and sub-block 2c + 1 in their high nibbles; w = d * scale * q - dmin * min, q in [0, 15].
  Sub-block j < 4: scale = s[j] & 63, min = s[j + 4] & 63; j >= 4: scale = (s[j + 4] & 15) |
  (s[j - 4] >> 6) << 4, min = (s[j + 4] >> 4) | (s[j] >> 6) << 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from localv3.formats import ggml
from localv3.formats.table import Q4_0, Q4_K, Q8_0, BlockType, QuantError, WeightFormat


@dataclass
class QuantizedWeight:
    data: torch.Tensor  # uint8 [out, row_bytes]: each row a run of blocks
    block_type: BlockType
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.in_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] in `dtype`, on the data's device."""
        return dequantize_rows(self.data, self.block_type, self.in_features).to(dtype)


def check_shape(shape: tuple[int, ...], fmt: WeightFormat, what: str = "tensor") -> BlockType:
    """The block type a [out, in] weight takes in `fmt`, or a QuantError saying why none."""
    if len(shape) != 2:
        raise QuantError(f"{what}: {fmt.name} quantises 2-D weights, got shape {list(shape)}")
    block_type = fmt.block_type(shape[1])
    if block_type is None:
        blocks = " or ".join(str(t.block) for t in fmt.block_types)
        raise QuantError(f"{what}: input dimension {shape[1]} is not a multiple of the {fmt.name} block size {blocks}")
    return block_type


def quantize_weight(weight: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """weight [out, in] (any float dtype, CPU) -> its blocks in the block type `fmt` gives it."""
    return quantize_to(weight, check_shape(tuple(weight.shape), fmt))


def quantize_to(weight: torch.Tensor, block_type: BlockType) -> QuantizedWeight:
    """weight [out, in] -> `block_type` blocks, by ggml's reference quantiser."""
    return QuantizedWeight(ggml.quantize_rows(weight, block_type.ggml_type), block_type, weight.shape[1])


def dequantize_rows(data: torch.Tensor, block_type: BlockType, in_features: int) -> torch.Tensor:
    """uint8 [..., row_bytes] -> fp32 [..., in_features]."""
    blocks = data.reshape(*data.shape[:-1], in_features // block_type.block, block_type.block_bytes)
    values = _DEQUANTIZERS[block_type.name](blocks)  # [..., n_blocks, block]
    return values.reshape(*data.shape[:-1], in_features)


def _fp16(two_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> fp32 [..., 1]."""
    return two_bytes.contiguous().view(torch.float16).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _fp16(blocks[..., 0:2])  # [..., 1]
    q = blocks[..., 2:].contiguous().view(torch.int8)  # [..., 32]
    return q.float() * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _fp16(blocks[..., 0:2])  # [..., 1]
    qs = blocks[..., 2:].to(torch.int32)  # [..., 16]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1) - 8  # [..., 32]
    return q.float() * d


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])  # [..., 1] each
    s = blocks[..., 4:16].to(torch.int32)  # [..., 12]
    scales = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], dim=-1)  # [..., 8]
    mins = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)  # [..., 8]
    qs = blocks[..., 16:].to(torch.int32).unflatten(-1, (4, 32))  # [..., 4, 32]
    q = torch.stack([qs & 0x0F, qs >> 4], dim=-2).flatten(-3, -2)  # [..., 8, 32]: sub-blocks in order
    values = (d * scales.float()).unsqueeze(-1) * q.float() - (dmin * mins.float()).unsqueeze(-1)  # [..., 8, 32]
    return values.flatten(-2)  # [..., 256]


_DEQUANTIZERS = {Q8_0.name: _q8_0, Q4_0.name: _q4_0, Q4_K.name: _q4_k}
