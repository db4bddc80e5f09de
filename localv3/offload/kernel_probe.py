"""What the engine's CPU kernels reach on this machine, for the roofline: per weight scheme the
fraction of the read-bandwidth probe that a one-token product streams at (localv3's own
kernels where they are built, else ggml's: `decode_kernels` says which, and a cache measured
with others is measured again), and the FLOP/s of
prefill-sized products at two sizes (ggml's products run faster with more rows per matrix: a
Q4_K [4096, 7168] one at 256 rows reached ~2x its 64-row FLOP/s on the 2-core development
machine), which the roofline interpolates between; and the fixed cost of one torch op and of
one ggml graph call.

The products are the engine's own (localv3.formats.modules.QuantExpertBank) over DeepSeek-V3
expert shapes, on weights larger than the caches. Block contents do not
change the kernels' speed, so the weights are one quantised tile of random rows repeated
(quantising ~200 MB would take longer than the probe). Stated and profile hardware use `ASSUMED`, never this machine's figures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

DIM, HIDDEN = 7168, 2048  # a DeepSeek-V3 routed expert
READ_SET_BYTES = 192 * 2**20  # weights streamed per one-token product: beyond the caches
DENSE_BATCHES = (64, 256)  # rows of the two dense products measured
EXPERT_BATCHES = (16, 64)  # rows per routed expert of the two expert products measured (V3: a
# 512-token chunk gives each of 256 experts 16 rows on average; a 32-expert model, 128)
TILE_ROWS = 64  # rows quantised once and repeated through the probe's weights
DENSE_ROWS = 4096


@dataclass(frozen=True)
class CpuKernels:
    read_fraction: dict[str, float] = field(default_factory=dict)  # scheme -> of the probe's bandwidth
    flops: dict[str, float] = field(default_factory=dict)  # scheme -> FLOP/s of a dense product, DENSE_BATCHES[0] rows
    expert_flops: dict[str, float] = field(default_factory=dict)  # scheme -> FLOP/s of routed experts, EXPERT_BATCHES[0] rows each
    op_seconds: float = 4e-6  # one small torch op, dispatch included
    graph_seconds: float = 30e-6  # one ggml graph call on a tiny matrix: thread wake-up, ctypes
    large_flops: dict[str, float] = field(default_factory=dict)  # as `flops`, DENSE_BATCHES[1] rows
    large_expert_flops: dict[str, float] = field(default_factory=dict)  # as `expert_flops`, EXPERT_BATCHES[1] rows each
    decode_kernels: str = ""  # localv3.kernels.build.decode_kernels() when measured ("": assumed)

    def read_rate(self, scheme: str, cpu_bw: float) -> float:
        """Bytes/s a one-token product of `scheme` weights streams at (float schemes: the probe's)."""
        return cpu_bw * self.read_fraction.get(scheme, 1.0)

    def flop_rate(self, scheme: str, cpu_flops: float, experts: bool = False, rows: float | None = None) -> float:
        """FLOP/s of `scheme` products, dense or routed experts (float schemes: the probe's fp32
        matrix product), at `rows` rows per matrix: between the two measured sizes interpolated
        in log(rows), outside them the nearer one's (None: the smaller size's)."""
        small = (self.expert_flops if experts else self.flops).get(scheme)
        large = (self.large_expert_flops if experts else self.large_flops).get(scheme)
        if small is None:
            return cpu_flops
        if large is None or rows is None:
            return small
        low, high = EXPERT_BATCHES if experts else DENSE_BATCHES
        where = min(max(math.log(rows / low) / math.log(high / low), 0.0), 1.0) if rows > 0 else 0.0
        return small + where * (large - small)

    def to_dict(self) -> dict:
        return {
            "read_fraction": self.read_fraction,
            "flops": self.flops,
            "expert_flops": self.expert_flops,
            "op_seconds": self.op_seconds,
            "graph_seconds": self.graph_seconds,
            "large_flops": self.large_flops,
            "large_expert_flops": self.large_expert_flops,
            "decode_kernels": self.decode_kernels,
        }

    @classmethod
    def from_dict(cls, data: dict) -> CpuKernels:
        def rates(key: str) -> dict[str, float]:
            return {str(k): float(v) for k, v in data.get(key, {}).items()}  # large_*: absent in older caches

        kernels = cls(
            rates("read_fraction"),
            rates("flops"),
            rates("expert_flops"),
            float(data["op_seconds"]),
            float(data["graph_seconds"]),
            rates("large_flops"),
            rates("large_expert_flops"),
            str(data.get("decode_kernels", "")),
        )
        rates_ = [
            *kernels.read_fraction.values(),
            *kernels.flops.values(),
            *kernels.expert_flops.values(),
            *kernels.large_flops.values(),
            *kernels.large_expert_flops.values(),
        ]
        if not all(0 < rate < math.inf for rate in rates_) or not all(
            0 <= seconds < math.inf for seconds in (kernels.op_seconds, kernels.graph_seconds)
        ):
            raise ValueError("kernel rates must be positive and finite, op and graph costs finite")
        return kernels


# Hardware that is stated or named, not measured: ggml's block kernels stream at about two
# thirds of the read bandwidth (llama.cpp's Q4_K_M at ~65%, Q8_0 a little better), and their
# integer dot products multiply about twice as fast as an fp32 matrix product; these fractions
# apply to the profile's own FLOP/s through `flops_factor`.
ASSUMED = CpuKernels(read_fraction={"q4": 0.65, "q8": 0.7})
ASSUMED_FLOPS_FACTOR = {"q4": 2.0, "q8": 2.0}


def describe_assumed() -> str:
    """How `assumed_kernels` rates the kernels, for the plan's list of assumed figures."""
    reads = ", ".join(f"{scheme} at {fraction:.0%}" for scheme, fraction in ASSUMED.read_fraction.items())
    products = ", ".join(f"{scheme} at {factor:g}x" for scheme, factor in ASSUMED_FLOPS_FACTOR.items())
    return f"assumed: ggml's block kernels stream {reads} of the bandwidth and multiply {products} the CPU FLOP/s"


def assumed_kernels(cpu_flops: float) -> CpuKernels:
    flops = {scheme: factor * cpu_flops for scheme, factor in ASSUMED_FLOPS_FACTOR.items()}
    return CpuKernels(read_fraction=dict(ASSUMED.read_fraction), flops=flops, expert_flops=dict(flops))


def measure_cpu_kernels(cpu_bw: float, schemes: tuple[str, ...] = ("q4", "q8"), repeats: int = 3) -> CpuKernels:
    """Measures this machine (a few seconds); `cpu_bw` is the read-bandwidth probe's figure."""
    import torch

    from localv3.formats import ggml
    from localv3.kernels.build import decode_kernels

    if not ggml.available():
        return CpuKernels(op_seconds=_op_seconds(), graph_seconds=0.0)
    read_fraction, dense, experts = {}, ({}, {}), ({}, {})
    for scheme in schemes:
        bank = _random_bank(scheme)
        n_experts = bank.gate_up.data.shape[0]
        nbytes = bank.gate_up.data.nbytes + bank.down.data.nbytes
        read_fraction[scheme] = nbytes / best_time(lambda: _run(bank, 1, n_experts), repeats) / cpu_bw
        layer = _random_linear(scheme)
        for size, (rows, expert_rows) in enumerate(zip(DENSE_BATCHES, EXPERT_BATCHES)):
            # every token picks every expert of the bank: each gets `expert_rows` rows
            seconds = best_time(lambda: _run(bank, expert_rows, n_experts), repeats)
            experts[size][scheme] = 2 * expert_rows * n_experts * 3 * DIM * HIDDEN / seconds
            x = torch.randn(rows, DIM)
            dense[size][scheme] = 2 * rows * DIM * layer.out_features / best_time(lambda: layer(x), repeats)
    return CpuKernels(read_fraction, dense[0], experts[0], _op_seconds(), _graph_seconds(), dense[1], experts[1], decode_kernels())


def _random_bank(scheme: str):
    from localv3.formats.modules import QuantExpertBank
    from localv3.formats.table import FORMATS

    fmt = FORMATS[scheme]
    gate_up_type, down_type = fmt.block_type(DIM), fmt.block_type(HIDDEN)
    per_expert = 2 * HIDDEN * gate_up_type.row_bytes(DIM) + DIM * down_type.row_bytes(HIDDEN)
    bank = QuantExpertBank(max(READ_SET_BYTES // per_expert, 1), DIM, HIDDEN, gate_up_type, down_type)
    _fill_with_tiles(bank.gate_up)
    _fill_with_tiles(bank.down)
    return bank


def _random_linear(scheme: str):
    """A dense [DENSE_ROWS, DIM] matrix in `scheme`, as an attention projection or FFN is held."""
    from localv3.formats.modules import QuantLinear
    from localv3.formats.table import FORMATS

    layer = QuantLinear(DIM, DENSE_ROWS, FORMATS[scheme].block_type(DIM))
    _fill_with_tiles(layer.matrices)
    return layer


def _fill_with_tiles(matrices) -> None:
    """Every matrix of a QuantMatrices: one quantised tile of TILE_ROWS random rows, repeated
    (real blocks: random bytes would hold denormal scales, which slow the kernels)."""
    import torch

    from localv3.formats.blocks import quantize_to

    rows = torch.randn(TILE_ROWS, matrices.in_features, generator=torch.Generator().manual_seed(0))
    tile = quantize_to(rows, matrices.block_type).data  # [R, row bytes]
    matrices.data.view(-1, TILE_ROWS, tile.shape[1]).copy_(tile)


def _run(bank, tokens: int, top_k: int) -> None:
    """Token t picks experts t, t + 1, ... (mod the bank): the whole set streams at one token,
    and a prefill chunk spreads its rows evenly over the experts."""
    import torch

    n_experts = bank.gate_up.data.shape[0]
    indices = (torch.arange(tokens)[:, None] + torch.arange(top_k)[None, :]) % n_experts  # [T, k]
    bank(torch.randn(tokens, DIM), indices, torch.ones(tokens, top_k))


def _op_seconds(count: int = 2000) -> float:
    import torch

    a, b = torch.ones(64), torch.ones(64)
    return best_time(lambda: [torch.add(a, b) for _ in range(count)], 3) / count


def _graph_seconds(count: int = 200) -> float:
    import torch

    from localv3.formats.blocks import quantize_weight
    from localv3.formats.modules import QuantLinear
    from localv3.formats.table import FORMATS

    layer = QuantLinear.from_weight(quantize_weight(torch.randn(32, 256), FORMATS["q8"]))
    x = torch.randn(1, 256)
    return best_time(lambda: [layer(x) for _ in range(count)], 3) / count


def best_time(work, repeats: int) -> float:
    """The fastest of `repeats` timed runs of `work`, after one untimed (graphs built, pages
    faulted in, thread pools started, caches warm)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best
