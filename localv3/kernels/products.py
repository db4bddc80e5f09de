"""torch-facing calls of localv3's CPU kernels (quant_products.c): products of block-quantised
weights with a few float32 activation rows, for the modules in localv3.formats.modules.

Decode-sized calls (at most DECODE_TOKENS rows) are a matter of reading the weights, which the
row kernels do near the memory bandwidth. Larger calls (prefill chunks) are compute-bound: there
the panel kernels (quant_panels.c, AVX-512 VNNI builds) take the block types they have, and
ggml's matrix-matrix kernels the others, except for routed experts that get few rows each (a
512-token chunk of DeepSeek-V3 gives each of its 256 experts 16 on average), where the row
kernels beat ggml's. Every function returns None when the kernels do not take the call, and the
caller uses ggml's.
"""

from __future__ import annotations

import torch

from localv3.errors import LocalV3Error
from localv3.formats import ggml
from localv3.formats.table import BlockType
from localv3.kernels.build import library

# Rows up to which the row kernels beat ggml's (benchmarks/expert_kernels.py): each weight row is
# read once and dotted with every activation row while it is in the L1 cache.
DECODE_TOKENS = 8
# Routed experts of block types without panels: the mean rows per chosen expert up to which the
# row kernels beat ggml's mul_mat_id. On the 2-core development machine (V3 experts, Q4_K, 2
# threads, before panels): 16 rows 331 vs 544 ms, 32 rows 633 vs 650 ms, 64 rows 1311 vs 994 ms:
# the row kernels stay at ~138 GFLOP/s while ggml's grow with the rows.
EXPERT_ROWS = 32


class KernelError(LocalV3Error):
    """A kernel call failed: out of memory for its scratch space, or a call it should not refuse."""


def takes(*block_types: BlockType) -> bool:
    """Whether these kernels are here and compute these block types."""
    kernels = library()
    return kernels is not None and all(kernels.lv3_supports(block_type.ggml_type) for block_type in block_types)


def panels_take(*block_types: BlockType) -> bool:
    """Whether the panel kernels (prefill-sized products) compute these block types here."""
    kernels = library()
    return kernels is not None and all(kernels.lv3_panel_takes(block_type.ggml_type) for block_type in block_types)


def _checked(status: int, what: str) -> None:
    if status == -2:
        raise KernelError(f"out of memory for the scratch space of localv3's CPU kernels ({what})")
    if status != 0:
        raise KernelError(f"localv3's CPU kernel {what} refused its call (status {status})")


def matmul(weights: torch.Tensor, block_type: BlockType, in_features: int, x: torch.Tensor) -> torch.Tensor | None:
    """weights uint8 [G, rows, row_bytes] (or [rows, row_bytes]), x float32 [G, T, in] (or [T, in])
    -> [G, T, rows] (or [T, rows]): each group's matrix times its own activation rows."""
    grouped = weights.dim() == 3
    groups, rows = (weights.shape[0], weights.shape[1]) if grouped else (1, weights.shape[0])
    tokens = x.shape[-2]
    if not tokens or not weights.is_contiguous() or not takes(block_type):
        return None  # (the kernel walks the groups and rows of one contiguous block of memory)
    if tokens > DECODE_TOKENS and not panels_take(block_type):
        return None
    x = x.to(torch.float32).contiguous()
    out = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)
    status = library().lv3_matmul(
        block_type.ggml_type, weights.data_ptr(), weights[0].nbytes if grouped else 0, rows, in_features,
        x.data_ptr(), tokens * in_features, tokens, out.data_ptr(), tokens * rows, groups, ggml.compute_threads(),
    )  # fmt: skip
    _checked(status, "lv3_matmul")
    return out


def swiglu_experts(
    gate: torch.Tensor, up: torch.Tensor, gate_type: BlockType, down: torch.Tensor, down_type: BlockType,
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
) -> torch.Tensor | None:  # fmt: skip
    """SwiGLU experts over block-quantised matrices: gate and up uint8 [E, I, row_bytes] (views
    whose expert stride is gate.stride(0), shared by up), down [E, D, row_bytes]; x float32
    [T, D], ids int32 [T, k] (the matrices chosen), weights [T, k] -> [T, D], the weighted sum
    of each token's experts' outputs. A dense SwiGLU MLP is one expert every token chooses."""
    tokens, k = ids.shape
    if not tokens or not takes(gate_type, down_type) or gate.stride(0) != up.stride(0):
        return None
    if tokens > DECODE_TOKENS and not panels_take(gate_type, down_type) and tokens * k > EXPERT_ROWS * ids.unique().numel():
        return None
    dim, hidden = down.shape[1], gate.shape[1]
    x = x.to(torch.float32).contiguous()
    ids = ids.to(torch.int32).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty(tokens, dim, dtype=torch.float32)
    status = library().lv3_swiglu_experts(
        gate_type.ggml_type, gate.data_ptr(), up.data_ptr(), gate.stride(0), down_type.ggml_type, down.data_ptr(),
        down.stride(0), dim, hidden, x.data_ptr(), tokens, ids.data_ptr(), weights.data_ptr(), k, out.data_ptr(),
        ggml.compute_threads(),
    )  # fmt: skip
    _checked(status, "lv3_swiglu_experts")
    return out


def dequantize_transposed(weights: torch.Tensor, block_type: BlockType, in_features: int) -> torch.Tensor | None:
    """weights uint8 [H, rows, row_bytes] (H matrices [rows, in]) -> float32 [H * in, rows], row
    h * in + i being column i of matrix h (32-value block types; None for others)."""
    heads, rows = weights.shape[0], weights.shape[1]
    if block_type.block != 32 or not takes(block_type):
        return None
    weights = weights.contiguous()  # held while the kernel reads it
    out = torch.empty(heads * in_features, rows, dtype=torch.float32)
    status = library().lv3_dequantize_transposed(
        block_type.ggml_type, weights.data_ptr(), heads, rows, in_features, out.data_ptr(), ggml.compute_threads()
    )
    _checked(status, "lv3_dequantize_transposed")
    return out
