"""Decode speed of the offload runtime vs the planner's prediction, on this machine, CPU only.

A random ~110M-parameter DeepSeek-V3-shaped model (the one benchmarks/engine_vs_transformers.py
uses), planned for this machine as detected (`localv3.offload.hardware.detect_hardware`; without a GPU
the plan is the cpu-only kind: everything in RAM) under a few quantisations, built by
`localv3.offload.runtime.load_planned`, and timed: greedy plain decoding after a short prompt, the
median step; the unplaced engine (`localv3.load`, fp32) is timed beside them. Prints a table and JSON.

    python benchmarks/offload_predicted_vs_measured.py [--threads N] [--prompt 32] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import localv3
from engine_vs_transformers import V3_110M  # benchmarks/ is on sys.path when this script runs
from localv3.synthetic import write_checkpoint
from localv3.offload.hardware import detect_hardware
from localv3.offload.quant import Quantization
from localv3.offload.runtime import load_planned
from localv3.offload.units import format_rate

QUANTISATIONS = {  # float schemes run in fp32 on the CPU, so they are planned as fp32
    "q4 experts, q8 dense": Quantization(experts="q4", dense="q8", embeddings="fp32"),
    "q8 experts, q8 dense": Quantization(experts="q8", dense="q8", embeddings="fp32"),
    "fp32": Quantization(experts="fp32", dense="fp32", embeddings="fp32"),
}


def measure_decode(engine, prompt: list[int], n_tokens: int) -> list[float]:
    """Seconds of each plain greedy decode step after the prompt."""
    session = engine.new_session(len(prompt) + n_tokens + 1)
    token = int(session.prefill(prompt).argmax())
    steps = []
    for _ in range(n_tokens):
        start = time.perf_counter()
        token = int(session.decode(token).argmax())
        steps.append(time.perf_counter() - start)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    prompt = [(7 * i + 3) % V3_110M["vocab_size"] for i in range(args.prompt)]
    context = args.prompt + args.tokens + 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(Path(tmp) / "v3-110m", V3_110M, dtype=torch.bfloat16)
        hardware = detect_hardware()
        for label, quant in QUANTISATIONS.items():
            engine = load_planned(
                model_dir, hardware, context, quantization=quant, gpu_device="cpu", dtype=torch.float32,
                with_mtp=False, cpu_threads=args.threads,
            )
            steps = measure_decode(engine, prompt, args.tokens)
            predicted = engine.plan.predicted
            measured = 1.0 / statistics.median(steps)
            rows.append(
                {
                    "model": "planned",
                    "quantisation": label,
                    "placement": engine.placement,
                    "predicted_decode_tok_s": predicted.decode_tok_s,
                    "measured_decode_tok_s": measured,
                    "measured_over_predicted": measured / predicted.decode_tok_s,
                    "predicted_ms_per_token": {k: v * 1e3 for k, v in predicted.decode_seconds.items()},
                    "measured_ms_per_token": statistics.median(steps) * 1e3,
                    "bottleneck": predicted.bottleneck,
                }
            )
        unplaced = localv3.load(model_dir, device="cpu", dtype=torch.float32, with_mtp=False)
        steps = measure_decode(unplaced, prompt, args.tokens)
        measured = 1.0 / statistics.median(steps)
        rows.append({"model": "unplaced (localv3.load)", "quantisation": "fp32", "measured_decode_tok_s": measured})
    bandwidth = format_rate(hardware.effective("cpu_bw"))
    print(f"hardware: {hardware.describe()} ({hardware.source}); cpu bandwidth {bandwidth}")
    load = os.getloadavg()[0]
    print(f"threads {torch.get_num_threads()}, load average {load:.1f}; prompt {args.prompt}, {args.tokens} decoded tokens")
    columns = ("predicted tok/s", "measured tok/s", "measured/pred")
    print(f"{'model':<24} {'quantisation':<22} " + " ".join(f"{c:>16}" for c in columns) + "  bottleneck (predicted)")
    for r in rows:
        predicted = f"{r['predicted_decode_tok_s']:.1f}" if "predicted_decode_tok_s" in r else "-"
        ratio = f"{r['measured_over_predicted']:.2f}" if "measured_over_predicted" in r else "-"
        print(
            f"{r['model']:<24} {r['quantisation']:<22} {predicted:>16} {r['measured_decode_tok_s']:>16.1f} "
            f"{ratio:>16}  {r.get('bottleneck', '-')}"
        )
    print(json.dumps({"hardware": hardware.describe(), "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
