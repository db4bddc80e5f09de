"""Exact-match accuracy of the bundled tiny model on held-out questions from its task generator.

    python scripts/eval_tiny.py [--model localv3/assets/tiny] [--per-task 100] [--cli 5] [--json out.json]

Each question is asked as `localv3 run tiny "<question>"` asks it: the chat template with one
user message, greedy decoding (the model's generation_config.json sets do_sample false, which
the CLI follows), stop at the end-of-sentence token; the answer must equal the
expected text exactly (after stripping surrounding whitespace). The held-out problems are
never trained on (localv3.tinydata decides the split by operands). Runs in-process through the
engine for speed; --cli N also asks N of them, spread over the tasks, through the real CLI
(--cli 579: every one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import localv3
from localv3.tinydata import Example, fact_examples, held_out_questions

REPO = Path(__file__).resolve().parent.parent


def ask(engine, question: str, max_new_tokens: int = 64) -> str:
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
    return engine.tokenizer.decode(engine.generate(prompt, max_new_tokens)).strip()


def ask_cli(question: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "run", "tiny", question],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    return result.stdout.strip()


def evaluate(engine, examples: list[Example]) -> dict:
    per_task: dict[str, list[bool]] = defaultdict(list)
    failures = []
    for example in examples:
        answer = ask(engine, example.question)
        per_task[example.task].append(answer == example.answer)
        if answer != example.answer:
            failures.append({"question": example.question, "expected": example.answer, "got": answer})
    results = [ok for oks in per_task.values() for ok in oks]
    return {
        "questions": len(results),
        "exact_match": sum(results) / len(results),
        "per_task": {task: sum(oks) / len(oks) for task, oks in per_task.items()},
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "localv3" / "assets" / "tiny")
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--cli", type=int, default=0, help="also ask N questions (spread over all tasks) through the CLI")
    parser.add_argument("--json", type=Path, help="write the full results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = localv3.load(args.model, device="cpu", dtype=torch.float32)
    held_out = held_out_questions(args.per_task)
    started = time.perf_counter()
    results = {"held_out": evaluate(engine, held_out), "seen_facts": evaluate(engine, fact_examples())}
    results["seconds"] = time.perf_counter() - started
    if args.cli:
        spots = held_out[:: max(1, len(held_out) // args.cli)][: args.cli]
        results["cli"] = [{"question": e.question, "expected": e.answer, "got": ask_cli(e.question)} for e in spots]
    held = results["held_out"]
    print(f"held-out: {held['questions']} questions, exact match {held['exact_match']:.1%}")
    for task, accuracy in held["per_task"].items():
        print(f"  {task:8s} {accuracy:.1%}")
    print(f"seen facts: {results['seen_facts']['exact_match']:.1%}  ({results['seconds']:.0f}s)")
    for failure in held["failures"][:10]:
        print(f"  miss: {failure['question']!r} expected {failure['expected']!r} got {failure['got']!r}")
    spots = results.get("cli", [])
    if spots:
        right = sum(spot["got"] == spot["expected"] for spot in spots)
        print(f"through `localv3 run tiny`: {right}/{len(spots)} exact match ({right / len(spots):.1%})")
    for spot in spots[:10]:
        mark = "ok" if spot["got"] == spot["expected"] else "MISS"
        print(f"  cli {mark}: {spot['question']!r} -> {spot['got']!r}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
