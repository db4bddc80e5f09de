"""One DeepSeek-V3 routed expert (gate+up [4096, 7168], down [7168, 2048]) on the CPU:
bf16 dense vs localv3's q8 and q4 banks, at a few batch sizes; plus the one-off cost of
filling a q4 bank (torch's int4 repacking). Prints a table and JSON.

    python benchmarks/quant_kernels.py [--threads N] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from localv3.quant import Q4, Q8, QuantExpertBank, quantize_weight

DIM, HIDDEN = 7168, 2048


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gate, up = (torch.randn(HIDDEN, DIM) / DIM**0.5 for _ in range(2))
    down = torch.randn(DIM, HIDDEN) / HIDDEN**0.5
    gate_up_bf16, down_bf16 = torch.cat([gate, up]).bfloat16(), down.bfloat16()

    def dense_expert(x):
        g, u = F.linear(x, gate_up_bf16).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down_bf16)

    banks = {}
    fill_ms = {}
    for fmt in (Q8, Q4):
        quantized = [quantize_weight(t, fmt) for t in (gate, up, down)]
        bank = QuantExpertBank(1, DIM, HIDDEN, fmt)
        start = time.perf_counter()
        bank.store(0, *quantized)
        fill_ms[fmt.name] = (time.perf_counter() - start) * 1e3
        banks[fmt.name] = bank

    rows = []
    for tokens in (1, 4, 16):
        x = torch.randn(tokens, DIM)
        row = {"tokens": tokens, "bf16_ms": median_ms(lambda: dense_expert(x.bfloat16()), args.repeats)}
        for name, bank in banks.items():
            row[f"{name}_ms"] = median_ms(lambda: bank.expert_forward(0, x), args.repeats)
        rows.append(row)
    print(f"one V3 expert, {args.threads} thread(s); median ms")
    print(f"{'tokens':>6} {'bf16':>8} {'q8':>8} {'q4':>8}")
    for row in rows:
        print(f"{row['tokens']:>6} {row['bf16_ms']:>8.2f} {row['q8_ms']:>8.2f} {row['q4_ms']:>8.2f}")
    print(f"filling one expert into a bank: q8 {fill_ms['q8']:.1f} ms, q4 {fill_ms['q4']:.1f} ms")
    print(json.dumps({"threads": args.threads, "rows": rows, "fill_ms": fill_ms}))


if __name__ == "__main__":
    main()
