"""Weight-only quantisation (int8, int4) and the torch modules that multiply with it.

Formats (weights are [out, in]; a group is `group_size` consecutive input weights of one row
sharing one bf16 scale; symmetric, no zero point):
- `q8`: int8 in [-127, 127], one scale per output row (scale = absmax / 127).
- `q4`: int4 in [-8, 7], groups of 32, packed two per uint8 (even input column in the low
  nibble, stored as value + 8). The group's largest-magnitude weight maps to -8 exactly
  (scale = that weight / -8, so the scale may be negative), which uses all 16 levels.
These are the on-disk tensors of a localv3 checkpoint: `<name>.qweight` and `<name>.scales`.

Kernels, measured on the 2-core development machine (torch 2.13, one DeepSeek-V3 routed expert,
benchmarks/quant_kernels.py): at 1 token q4 2.9 ms, q8 3.2 ms, bf16 dense 8.4 ms; at 4 tokens
5.5 / 6.6 / 7.0 ms; at 16 tokens 22 / 24 / 8.8 ms (these kernels grow with the token count, the
bf16 GEMM does not: a prefill path is still to do). Both fast paths need bf16 activations (fp32
or fp16 ones take a reference path 10-100x slower), so the modules cast activations to bf16 for
the kernel and results back. q8 is per output row because torch._weight_int8pack_mm takes one
scale per row; group-wise int8 would need a dequantise-per-call (10-25x slower) or two int4
passes (2x slower). q4 uses torch._weight_int4pack_mm_for_cpu, whose packed layout is private
to torch: a module being filled repacks our layout into it (`repack_int4_for_cpu`, checked
against torch's packer once per process; torch's 5-6x slower packer is used if they differ).
Shapes or devices those kernels do not take (outside the checked limits they crash or return
wrong results) dequantise per call instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from localv3.errors import LocalV3Error
from localv3.model.moe import run_experts

SCALE_DTYPE = torch.bfloat16
KERNEL_DTYPE = torch.bfloat16  # activations the CPU kernels take at full speed


class QuantError(LocalV3Error):
    """A tensor cannot be quantised in the requested format."""


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int  # 8 or 4
    group_size: int | None  # input weights per scale; None: one scale per output row

    def group(self, in_features: int) -> int:
        return self.group_size or in_features

    def check(self, shape: tuple[int, ...], what: str = "tensor") -> None:
        if len(shape) != 2:
            raise QuantError(f"{what}: {self.name} quantises 2-D weights, got shape {list(shape)}")
        in_features = shape[1]
        if in_features % self.group(in_features) or in_features % (8 // self.bits):
            raise QuantError(
                f"{what}: input dimension {in_features} is not a multiple of the {self.name} group size {self.group(in_features)}"
            )

    def qweight_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, in_features * self.bits // 8

    def scales_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, in_features // self.group(in_features)

    @property
    def qweight_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8


Q8 = QuantFormat("q8", 8, None)
Q4 = QuantFormat("q4", 4, 32)
FORMATS = {f.name: f for f in (Q8, Q4)}


def quant_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise QuantError(f"unknown quantisation {name!r}; choose one of {', '.join(FORMATS)}") from None


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor  # int8 [out, in] (q8) or uint8 [out, in / 2] (q4, packed)
    scales: torch.Tensor  # bf16 [out, in / group]
    fmt: QuantFormat

    @property
    def shape(self) -> tuple[int, int]:
        out_features, stored = self.qweight.shape
        return out_features, stored * 8 // self.fmt.bits

    def values(self) -> torch.Tensor:
        """The integer values, int8 [out, in]."""
        return self.qweight if self.fmt.bits == 8 else unpack_int4(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.shape
        groups = self.scales.shape[1]
        q = self.values().view(out_features, groups, in_features // groups)  # [out, G, g]
        return (q.float() * self.scales.float()[..., None]).view(out_features, in_features).to(dtype)


def quantize_weight(weight: torch.Tensor, fmt: QuantFormat) -> QuantizedWeight:
    """weight [out, in] (any float dtype) -> its quantised form (rounded to nearest)."""
    fmt.check(tuple(weight.shape))
    out_features, in_features = weight.shape
    group = fmt.group(in_features)
    w = weight.float().reshape(out_features, in_features // group, group)  # [out, G, g]
    if fmt.bits == 8:
        scale = w.abs().amax(dim=-1) / 127.0  # [out, G]
        low, high = -127, 127
    else:
        extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # [out, G], signed
        scale = extreme / -8.0
        low, high = -8, 7
    scale = scale.to(SCALE_DTYPE)
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).float()[..., None]
    q = (w / divisor).round_().clamp_(low, high).to(torch.int8).view(out_features, in_features)
    return QuantizedWeight(q if fmt.bits == 8 else pack_int4(q), scale, fmt)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., n] in [-8, 7] -> uint8 [..., n / 2]: even column in the low nibble, value + 8."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n / 2] -> int8 [..., n] in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)


# ----- kernels: how a stack of quantised matrices is stored and multiplied -----------------


class _DequantKernel:
    """Any format, any device: the disk tensors as they are, dequantised on each call."""

    name = "dequant"

    def buffers(self, fmt: QuantFormat, count: int, out_features: int, in_features: int) -> dict:
        return {
            "qweight": ((count, *fmt.qweight_shape(out_features, in_features)), fmt.qweight_dtype),
            "scales": ((count, *fmt.scales_shape(out_features, in_features)), SCALE_DTYPE),
        }

    def store(self, m: QuantMatrices, index: int, weight: QuantizedWeight) -> None:
        m.qweight[index].copy_(weight.qweight)
        m.scales[index].copy_(weight.scales)

    def dense(self, m: QuantMatrices, index: int, dtype: torch.dtype) -> torch.Tensor:
        return QuantizedWeight(m.qweight[index], m.scales[index], m.fmt).dequantize(dtype)

    def matmul(self, m: QuantMatrices, index: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense(m, index, x.dtype))


class _Int8RowKernel(_DequantKernel):
    """q8 with one scale per row on the CPU: torch._weight_int8pack_mm (needs in % 16 == 0)."""

    name = "int8pack"

    def matmul(self, m: QuantMatrices, index: int, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), m.qweight[index], m.scales[index, :, 0])


class _Int4CpuKernel:
    """Group-wise int4 on the CPU: torch._weight_int4pack_mm_for_cpu, in torch's packed layout.

    That kernel dequantises (q - 8) * scale + zero with q in [0, 15]: our stored nibbles are
    q, and zero is 0. Needs group 32/64/128/256 and out % 16 == 0.
    """

    name = "int4pack"

    def buffers(self, fmt: QuantFormat, count: int, out_features: int, in_features: int) -> dict:
        groups = in_features // fmt.group(in_features)
        return {
            "packed": ((count, out_features, in_features // 2), torch.uint8),
            "scales_zeros": ((count, groups, out_features, 2), SCALE_DTYPE),
        }

    def store(self, m: QuantMatrices, index: int, weight: QuantizedWeight) -> None:
        if _repack_matches_torch():
            m.packed[index].copy_(repack_int4_for_cpu(weight.qweight))
        else:
            nibbles = (weight.values().to(torch.int32) + 8).contiguous()  # [out, in] in [0, 15]
            m.packed[index].copy_(torch._convert_weight_to_int4pack_for_cpu(nibbles, 1))
        m.scales_zeros[index, ..., 0].copy_(weight.scales.T)
        m.scales_zeros[index, ..., 1].zero_()

    def dense(self, m: QuantMatrices, index: int, dtype: torch.dtype) -> torch.Tensor:
        """Recovers the integers through the kernel itself (a bf16 identity with unit scales gives
        exact small integers), so torch's private layout is never parsed; meant for small matrices."""
        unit = torch.zeros_like(m.scales_zeros[index])
        unit[..., 0] = 1
        eye = torch.eye(m.in_features, dtype=KERNEL_DTYPE)
        values = torch._weight_int4pack_mm_for_cpu(eye, m.packed[index], m.group, unit).T  # [out, in]
        scales = m.scales_zeros[index, ..., 0].T.float()  # [out, G]
        q = values.float().view(m.out_features, -1, m.group)  # [out, G, g]
        return (q * scales[..., None]).view(m.out_features, m.in_features).to(dtype)

    def matmul(self, m: QuantMatrices, index: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(KERNEL_DTYPE).contiguous()
        return torch._weight_int4pack_mm_for_cpu(x, m.packed[index], m.group, m.scales_zeros[index])


def repack_int4_for_cpu(packed: torch.Tensor) -> torch.Tensor:
    """Our packed int4 [out, in / 2] -> the layout torch's CPU int4 kernel reads, 5-6x faster
    than `torch._convert_weight_to_int4pack_for_cpu` (which wants int32 values).

    That layout, for each block of 64 rows: per input column k, 32 bytes, byte j holding row j
    (low nibble) and row 32 + j (high nibble); a last block of fewer rows holds, per column,
    rows 2j and 2j + 1 in byte j. Checked against torch's own packer once per process.
    """
    out_features, half = packed.shape
    full = out_features // 64 * 64
    parts = []
    if full:
        blocks = packed[:full].view(-1, 2, 32, half)  # [B, 2, 32, in/2]: rows j and 32 + j
        parts.append(_pair_nibbles(blocks[:, 0], blocks[:, 1]).transpose(1, 2).reshape(-1))  # [B, in, 32]
    if out_features > full:
        pairs = packed[full:].view(-1, 2, half)  # [T/2, 2, in/2]: rows 2j and 2j + 1
        parts.append(_pair_nibbles(pairs[:, 0], pairs[:, 1]).T.reshape(-1))  # [in, T/2]
    return torch.cat(parts).view(out_features, half)


def _pair_nibbles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two rows [..., in/2] of our packing -> bytes [..., in]: per column, a's nibble | b's << 4."""
    even = (a & 0x0F) | ((b & 0x0F) << 4)
    odd = (a >> 4) | (b & 0xF0)
    return torch.stack([even, odd], dim=-1).flatten(-2)


@functools.cache
def _repack_matches_torch() -> bool:
    probe = torch.randint(-8, 8, (80, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    reference = torch._convert_weight_to_int4pack_for_cpu((probe.to(torch.int32) + 8).contiguous(), 1)
    return torch.equal(repack_int4_for_cpu(pack_int4(probe)), reference)


def _choose_kernel(fmt: QuantFormat, out_features: int, in_features: int, device: torch.device):
    group = fmt.group(in_features)
    if device.type == "cpu" and fmt.bits == 8 and group == in_features and in_features % 16 == 0:
        return _Int8RowKernel()
    if device.type == "cpu" and fmt.bits == 4 and group in (32, 64, 128, 256) and out_features % 16 == 0:
        return _Int4CpuKernel()
    return _DequantKernel()


class QuantMatrices(nn.Module):
    """`count` quantised [out, in] matrices of one shape, in the layout of the kernel that
    multiplies them on `device` (chosen here; build the module where it will run)."""

    def __init__(self, fmt: QuantFormat, count: int, out_features: int, in_features: int, device="cpu"):
        super().__init__()
        fmt.check((out_features, in_features))
        self.fmt = fmt
        self.out_features, self.in_features = out_features, in_features
        self.group = fmt.group(in_features)
        device = torch.device(device)
        self.kernel = _choose_kernel(fmt, out_features, in_features, device)
        for name, (shape, dtype) in self.kernel.buffers(fmt, count, out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    def store(self, index: int, weight: QuantizedWeight) -> None:
        if weight.shape != (self.out_features, self.in_features) or weight.fmt != self.fmt:
            raise QuantError(
                f"cannot store a {weight.fmt.name} {list(weight.shape)} weight in "
                f"{self.fmt.name} [{self.out_features}, {self.in_features}] matrices"
            )
        with torch.no_grad():
            self.kernel.store(self, index, weight)

    def matmul(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> x @ W[index].T [T, out], in the kernel's dtype (bf16) or x's."""
        return self.kernel.matmul(self, index, x)

    def dense(self, index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.kernel.dense(self, index, dtype)


class QuantLinear(nn.Module):
    """A drop-in for nn.Linear (no weight attribute) holding a q8/q4 weight."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat, bias: bool = False, device="cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.matrices = QuantMatrices(fmt, 1, out_features, in_features, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None, device="cpu") -> QuantLinear:
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, weight.fmt, bias is not None, device)
        module.matrices.store(0, weight)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [T, in]
        y = self.matrices.matmul(0, flat).to(x.dtype)  # [T, out]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantised weight [out, in] (MLA absorbs kv_b_proj through it)."""
        return self.matrices.dense(0, dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.matrices.fmt.name}, kernel={self.matrices.kernel.name}"


class QuantExpertBank(nn.Module):
    """The routed experts of one layer, quantised: the DenseExpertBank interface.

    gate_up: E matrices [2 * I, D] (gate rows, then up rows); down: E matrices [D, I].
    Each expert runs once on the tokens routed to it (`run_experts`); outputs accumulate in x's dtype.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, fmt: QuantFormat, device="cpu"):
        super().__init__()
        self.gate_up = QuantMatrices(fmt, n_experts, 2 * hidden, dim, device)
        self.down = QuantMatrices(fmt, n_experts, dim, hidden, device)

    def store(self, expert: int, gate: QuantizedWeight, up: QuantizedWeight, down: QuantizedWeight) -> None:
        """Gate and up are quantised row by row, so stacking their rows stacks their quantised forms."""
        gate_up = QuantizedWeight(torch.cat([gate.qweight, up.qweight]), torch.cat([gate.scales, up.scales]), gate.fmt)
        self.gate_up.store(expert, gate_up)
        self.down.store(expert, down)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return run_experts(x, indices, weights, self.expert_forward)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up.matmul(expert, x).chunk(2, dim=-1)  # [N, I] each
        return self.down.matmul(expert, F.silu(gate) * up).to(x.dtype)  # [N, D]
