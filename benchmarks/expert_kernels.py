#!/usr/bin/env python3
"""Routed-expert kernels at DeepSeek-V3 width, against this machine's read bandwidth.

One MoE layer's bank of `--experts` V3 routed experts (gate+up [4096, 7168], down [7168, 2048])
in each format, called as the engine calls it (`QuantExpertBank.forward`), at T = 1, 2, 4, 8, 64,
256 tokens with top-8 routing (at 64 and 256 each chosen expert gets 16 and 64 rows: prompt
chunks), plus one expert alone at T = 1; with each of `--kernels`: localv3's own CPU kernels (row
kernels to 8 tokens, panels beyond where the CPU has AVX-512 VNNI) and ggml's mul_mat_id graph.
Effective GB/s = bytes of the distinct experts the call reads / median time. The bandwidth probe
is localv3.offload.hardware.measure_cpu (an fp32 matrix-vector product over 512 MiB). Experts differ
from call to call and the bank is larger than the caches, so the weights stream from RAM.

    python benchmarks/expert_kernels.py [--threads 2] [--experts 32] [--repeats 9] [--kernels localv3,ggml] [--json]

Prints a table (stderr: progress) and one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from localv3.formats.blocks import quantize_weight
from localv3.formats.modules import QuantExpertBank
from localv3.formats.table import FORMATS
from localv3.kernels import build
from localv3.offload.hardware import measure_cpu

DIM, HIDDEN, TOP_K = 7168, 2048, 8
TOKEN_COUNTS = (1, 2, 4, 8, 64, 256)


@dataclass
class Row:
    kernels: str  # localv3 or ggml
    format: str
    tokens: int
    experts_read: float  # distinct experts per call, mean
    ms: float  # median per call
    gb_s: float  # distinct expert bytes / median time
    of_probe: float  # gb_s / probe GB/s
    gflop_s: float  # 2 * tokens * top-k * 3 * DIM * HIDDEN / median time (prompt chunks: compute-bound)


def build_bank(scheme: str, n_experts: int) -> QuantExpertBank:
    """n_experts V3 experts, each in its own memory (so no expert is cached for another), all
    holding the blocks of one random expert (quantising 24+ V3 experts would take minutes)."""
    fmt = FORMATS[scheme]
    bank = QuantExpertBank(n_experts, DIM, HIDDEN, fmt.block_type(DIM), fmt.block_type(HIDDEN))
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(HIDDEN, DIM, generator=gen) / DIM**0.5 for _ in range(2))
    down = torch.randn(DIM, HIDDEN, generator=gen) / HIDDEN**0.5
    expert = [quantize_weight(w, fmt) for w in (gate, up, down)]
    for e in range(n_experts):
        bank.store(e, *expert)
    return bank


def expert_bytes(bank: QuantExpertBank) -> int:
    return bank.gate_up.data[0].nbytes + bank.down.data[0].nbytes


def time_calls(bank: QuantExpertBank, tokens: int, top_k: int, repeats: int, gen: torch.Generator) -> tuple[float, float]:
    """(median seconds, mean distinct experts) over `repeats` calls with fresh routing each."""
    n_experts = bank.gate_up.data.shape[0]
    x = torch.randn(tokens, DIM, generator=gen)
    seconds, distinct = [], []
    for _ in range(repeats + 1):  # the first builds the graph
        indices = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(tokens)])  # [T, k]
        weights = torch.rand(tokens, top_k, generator=gen)
        start = time.perf_counter()
        bank(x, indices, weights)
        seconds.append(time.perf_counter() - start)
        distinct.append(indices.unique().numel())
    return statistics.median(seconds[1:]), statistics.mean(distinct[1:])


def use_kernels(kernels: str) -> None:
    """Route decode-sized calls to localv3's kernels, or keep every call on ggml's."""
    if kernels == "ggml":
        os.environ[build.SWITCH] = "ggml"
    else:
        os.environ.pop(build.SWITCH, None)
    build.library.cache_clear()
    if kernels == "localv3" and build.library() is None:
        sys.exit("localv3's CPU kernels cannot be built on this machine")


def measure(kernels: str, bank: QuantExpertBank, scheme: str, repeats: int, probe_gb_s: float) -> list[Row]:
    use_kernels(kernels)
    per_expert = expert_bytes(bank)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for tokens, top_k in [(1, 1)] + [(t, TOP_K) for t in TOKEN_COUNTS]:
        median, distinct = time_calls(bank, tokens, top_k, repeats, gen)
        gb_s = distinct * per_expert / median / 1e9
        label = f"{scheme} {'1 expert' if top_k == 1 else 'top-8'}"
        gflop_s = 2 * tokens * top_k * 3 * DIM * HIDDEN / median / 1e9
        rows.append(Row(kernels, label, tokens, distinct, median * 1e3, gb_s, gb_s / probe_gb_s, gflop_s))
        print(f"  {kernels} {label} T={tokens}: {median * 1e3:.2f} ms, {gb_s:.1f} GB/s", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=32, help="experts in the bank (each 22-39 MB)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--formats", default="q4,q8")
    parser.add_argument("--kernels", default="localv3,ggml", help="comma-separated: localv3, ggml")
    parser.add_argument("--json", action="store_true", help="print only the JSON document")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probe_gb_s = measure_cpu()[0] / 1e9
    print(f"read-bandwidth probe: {probe_gb_s:.1f} GB/s ({args.threads} threads)", file=sys.stderr)
    rows = []
    for scheme in args.formats.split(","):
        bank = build_bank(scheme, args.experts)
        for kernels in args.kernels.split(","):
            rows += measure(kernels, bank, scheme, args.repeats, probe_gb_s)
    if not args.json:
        print(f"| kernels | format | T | experts read | ms | GB/s | of probe ({probe_gb_s:.1f} GB/s) | GFLOP/s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r.kernels} | {r.format} | {r.tokens} | {r.experts_read:.1f} | {r.ms:.2f} | {r.gb_s:.1f} | {r.of_probe:.0%} | {r.gflop_s:.0f} |")
    print(json.dumps({"threads": args.threads, "probe_gb_s": probe_gb_s, "rows": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
