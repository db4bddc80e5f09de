"""MTP speculative decoding against plain decoding, measured in the same run.

    python benchmarks/mtp_speedup.py [--model localv3/assets/tiny] [--questions 10] [--tasks count reverse]
                                     [--repeats 3] [--drafts 1 2] [--threads 1] [--json out.json]

Greedy answers to held-out chat questions of the tiny model's tasks (their answers are
2-40 tokens; counting and word reversal give the long ones). Each repetition answers every
question in every mode back to back, the order rotating, so that load changes on a shared
machine hit all modes alike; speed-up = decode tok/s over all answers / plain's.
Decode tok/s = tokens after the first / time after the first (as GenerationStats). Reports
MTP acceptance, tokens per verify step and distinct routed experts read per step and per token
(summed over MoE layers; the cost that matters when experts live in CPU RAM).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import localv3
from localv3.generate import stream_generate
from localv3.sampling import SamplingSettings
from localv3.speculative import MTPSpeculation, PlainSteps
from localv3.tinydata import GENERATED_TASKS, held_out_questions

REPO = Path(__file__).resolve().parent.parent


COUNTS = ("steps", "drafted", "accepted", "emitted", "experts_read")


def answer(engine, prompt: list[int], drafts: int) -> tuple[list[int], float, dict]:
    """One greedy answer with `drafts` MTP drafts per step (0 = plain decoding).

    -> (token ids, decode seconds after the first token, the strategy's raw counts).
    """
    steps = MTPSpeculation(engine.model, drafts) if drafts else PlainSteps(engine.model)
    session = engine.new_session(len(prompt) + 65)
    out = []
    for chunk in stream_generate(session, None, prompt, 64, SamplingSettings(), engine.stop_token_ids(), steps=steps):
        out.extend(chunk.token_ids)
        if chunk.stats:
            return out, chunk.stats.decode_s, {key: chunk.stats.speculation[key] for key in COUNTS}
    raise AssertionError("stream_generate ends with a stats chunk")


@dataclass
class ModeTotals:
    drafts: int
    tokens: int = 0  # decoded after the first token of each answer
    decode_s: float = 0.0
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    outputs: list = field(default_factory=list)  # the last repetition's answers
    repeat_tok_s: list = field(default_factory=list)

    def add(self, out: list[int], decode_s: float, counts: dict) -> None:
        self.tokens += len(out) - 1
        self.decode_s += decode_s
        for key in COUNTS:
            self.counts[key] += counts[key]
        self.outputs.append(out)

    def summary(self, plain: "ModeTotals") -> dict:
        c = self.counts
        tok_s = self.tokens / self.decode_s
        return {
            "drafts": self.drafts,
            "tokens": self.tokens,
            "decode_s": self.decode_s,
            "decode_tok_s": tok_s,
            "speedup": tok_s / (plain.tokens / plain.decode_s),
            "speedup_per_repeat": [t / p for t, p in zip(self.repeat_tok_s, plain.repeat_tok_s)],
            "acceptance": c["accepted"] / c["drafted"] if c["drafted"] else None,
            "tokens_per_step": c["emitted"] / c["steps"],
            "experts_read_per_step": c["experts_read"] / c["steps"],
            "experts_read_per_token": c["experts_read"] / c["emitted"],
            "identical_to_plain": self.outputs == plain.outputs,
        }


def measure(engine, prompts: list[list[int]], modes: list[int], repeats: int) -> dict[int, ModeTotals]:
    """Every mode on every prompt, back to back, the order rotating, so that load changes on a
    shared machine hit all modes alike."""
    totals = {mode: ModeTotals(mode) for mode in modes}
    for repeat in range(repeats):
        before = {mode: (t.tokens, t.decode_s) for mode, t in totals.items()}
        for t in totals.values():
            t.outputs = []
        for i, prompt in enumerate(prompts):
            shift = (repeat + i) % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                totals[mode].add(*answer(engine, prompt, mode))
        for mode, t in totals.items():
            tokens, seconds = t.tokens - before[mode][0], t.decode_s - before[mode][1]
            t.repeat_tok_s.append(tokens / seconds)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "localv3" / "assets" / "tiny")
    parser.add_argument("--questions", type=int, default=10, help="per task")
    parser.add_argument("--tasks", nargs="+", default=list(GENERATED_TASKS), help="e.g. count reverse (long answers)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drafts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = localv3.load(args.model, device="cpu", dtype=torch.float32)
    tok = engine.tokenizer
    questions = [e for e in held_out_questions(args.questions) if e.task in args.tasks]
    prompts = [tok.encode_chat([{"role": "user", "content": e.question}]) for e in questions]
    modes = [0] + args.drafts
    for prompt in prompts[:3]:  # warm-up
        answer(engine, prompt, max(modes))
    totals = measure(engine, prompts, modes, args.repeats)
    results = {mode: t.summary(totals[0]) for mode, t in totals.items()}

    header = f"{'mode':10s} {'accept':>7s} {'tok/step':>9s} {'experts/step':>13s} {'experts/tok':>12s} {'tok/s':>8s} {'speed-up':>9s}"
    print(f"{len(prompts)} questions x {args.repeats} repeats, {results[0]['tokens'] // args.repeats} decoded tokens each")
    print(header)
    for mode, r in results.items():
        name = f"MTP k={mode}" if mode else "plain"
        accept = f"{r['acceptance']:.1%}" if r["acceptance"] is not None else "-"
        print(
            f"{name:10s} {accept:>7s} {r['tokens_per_step']:9.2f} {r['experts_read_per_step']:13.1f} "
            f"{r['experts_read_per_token']:12.1f} {r['decode_tok_s']:8.1f} {r['speedup']:8.2f}x"
            + ("" if r["identical_to_plain"] else "  (output differs!)")
        )
    for mode in args.drafts:
        repeats = " ".join(f"{x:.2f}" for x in results[mode]["speedup_per_repeat"])
        print(f"MTP k={mode} speed-up per repeat: {repeats}")
    summary = {
        "model": str(args.model),
        "tasks": args.tasks,
        "questions": len(prompts),
        "repeats": args.repeats,
        "threads": args.threads,
        "modes": {("plain" if m == 0 else f"mtp{m}"): r for m, r in results.items()},
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
