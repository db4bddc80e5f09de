"""The one table of weight formats: what each scheme name means, which tensors take it, and
how many bytes a matrix needs in it. The planner sizes tensors with it, `localv3 quantize`
writes them with it, the loader reads them with it.

Schemes (weights are [out, in]; blocks run along the input dimension of each row):
- `fp32`, `bf16`, `fp16`: plain elements.
- `fp8`: e4m3 elements plus one fp32 scale per 128x128 block (edge blocks partial), as the
  DeepSeek-V3 checkpoints ship; dequantised at load (there are no FP8 kernels here).
- `q8`: ggml's Q8_0: blocks of 32 int8 with one fp16 scale (34 bytes, 8.5 bits per weight).
- `q4`: ggml's Q4_K: super-blocks of 256 weights, 8 sub-blocks of 32 with 6-bit scales and
  mins under two fp16 super-scales (144 bytes, 4.5 bits per weight). A row whose length is
  not a multiple of 256 takes Q4_0 instead (blocks of 32 4-bit values and one fp16 scale:
  18 bytes, also 4.5 bits per weight), as llama.cpp falls back for narrow tensors.
Quantised weights are stored in ggml's block layout so that ggml's CPU kernels read them as
they are (localv3.formats.ggml); a matrix whose rows no block type of its scheme divides
stays in the compute dtype. One-dimensional tensors (norms, biases) are never quantised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from localv3.errors import LocalV3Error


class QuantError(LocalV3Error):
    """An unknown scheme, or a tensor a scheme cannot hold."""


@dataclass(frozen=True)
class BlockType:
    """A ggml block type: `block` weights of a row in `block_bytes` bytes."""

    name: str
    ggml_type: int  # enum ggml_type
    block: int
    block_bytes: int

    def row_bytes(self, in_features: int) -> int:
        return in_features // self.block * self.block_bytes


Q8_0 = BlockType("q8_0", 8, 32, 34)
Q4_0 = BlockType("q4_0", 2, 32, 18)
Q4_K = BlockType("q4_k", 12, 256, 144)
BLOCK_TYPES = {t.name: t for t in (Q8_0, Q4_0, Q4_K)}  # what a localv3 checkpoint stores
# The ggml types of GGUF tensors the native engine reads: the float ones (a "block" of one
# element) and further block types, which ggml's CPU kernels run as stored (another device gets
# them dequantised once, at load); ggml's sizes.
GGUF_BLOCK_TYPES = {
    t.name: t
    for t in (
        BlockType("f32", 0, 1, 4),
        BlockType("f16", 1, 1, 2),
        BlockType("bf16", 30, 1, 2),
        *BLOCK_TYPES.values(),
        BlockType("q4_1", 3, 32, 20),
        BlockType("q5_0", 6, 32, 22),
        BlockType("q5_1", 7, 32, 24),
        BlockType("q2_k", 10, 256, 84),
        BlockType("q3_k", 11, 256, 110),
        BlockType("q5_k", 13, 256, 176),
        BlockType("q6_k", 14, 256, 210),
        BlockType("iq4_nl", 20, 32, 18),
        BlockType("iq4_xs", 23, 256, 136),
    )
}


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int  # storage bits per element (float schemes) or per weight before block overhead
    block_types: tuple[BlockType, ...] = ()  # quantised schemes: preferred first
    fp8_block: tuple[int, int] | None = None  # fp8: 2-D scale blocks (rows, cols) of fp32 scales

    @property
    def quantized(self) -> bool:
        return bool(self.block_types)

    def block_type(self, in_features: int) -> BlockType | None:
        """The first of this scheme's block types that divides a row of `in_features`."""
        return next((t for t in self.block_types if in_features % t.block == 0), None)

    def takes(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of `shape` is stored in this scheme (else it keeps a float dtype)."""
        return not self.quantized or (len(shape) == 2 and self.block_type(shape[1]) is not None)

    def matrix_bytes(self, rows: int, cols: int) -> int:
        """Bytes to store a [rows, cols] weight; a quantised scheme's rows that no block type
        divides are sized as bf16, as the loader keeps them."""
        if self.quantized:
            block_type = self.block_type(cols)
            return rows * (block_type.row_bytes(cols) if block_type else 2 * cols)
        data = rows * math.ceil(cols * self.bits / 8)
        if self.fp8_block:
            data += math.ceil(rows / self.fp8_block[0]) * math.ceil(cols / self.fp8_block[1]) * 4
        return data

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        """A vector is a one-row matrix (and is never quantised)."""
        if len(shape) < 2 and self.quantized:
            return 2 * math.prod(shape)
        return self.matrix_bytes(math.prod(shape[:-1]), shape[-1])

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per weight of a large matrix, scales included."""
        if self.quantized:
            first = self.block_types[0]
            return 8 * first.block_bytes / first.block
        if self.fp8_block:
            return self.bits + 32 / (self.fp8_block[0] * self.fp8_block[1])
        return float(self.bits)


# MLA's absorbed per-head W_UK [C, nope] and W_UV [v, C] whenever the dense scheme is quantised:
# q8, i.e. Q8_0 (rows of nope = 128 are too short for Q4_K; the attention's precision is worth 8 bits).
ABSORBED_SCHEME = "q8"

FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("fp32", 32),
        WeightFormat("bf16", 16),
        WeightFormat("fp16", 16),
        WeightFormat("fp8", 8, fp8_block=(128, 128)),
        WeightFormat("q8", 8, (Q8_0,)),
        WeightFormat("q4", 4, (Q4_K, Q4_0)),
    )
}
QUANTIZED = tuple(name for name, f in FORMATS.items() if f.quantized)  # q8, q4
# config.json torch_dtype -> the scheme a Hugging Face checkpoint stored in it has
DTYPE_SCHEMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
EXPERT_SCHEMES = QUANTIZED  # what `localv3 quantize --experts` writes
DENSE_SCHEMES = ("bf16", *QUANTIZED)  # what `localv3 quantize --dense` writes


def weight_format(name: str) -> WeightFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise QuantError(f"unknown quantisation {name!r}; choose one of {', '.join(FORMATS)}") from None


def block_type(name: str) -> BlockType:
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise QuantError(f"unknown block type {name!r}; this localv3 reads {', '.join(BLOCK_TYPES)}") from None
