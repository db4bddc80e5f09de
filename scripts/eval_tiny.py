"""Exact-match accuracy of the bundled tiny model on held-out questions from its task generator.

    python scripts/eval_tiny.py [--model localv3/assets/tiny] [--per-task 100] [--multi-turn]
                                [--cli 5] [--json out.json]

Each question is asked as `localv3 run tiny "<question>"` asks it: the chat template with one
user message, greedy decoding (the model's generation_config.json sets do_sample false, which
the CLI follows), stop at the end-of-sentence token; the answer must equal the
expected text exactly (after stripping surrounding whitespace). The held-out problems are
never trained on (localv3.tinydata decides the split by operands). Runs in-process through the
engine for speed; --cli N also asks N of them, spread over the tasks, through the real CLI
(--cli 579: every one).

--multi-turn also asks every held-out question once at turn 5..10 of a 10-turn conversation
of held-out questions, as `localv3 chat` does (the model's own earlier answers in the
transcript, the cache reused), and reports that exact match next to the single-question one.
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
from localv3.tinydata import Example, converse, held_out_conversations, held_out_questions, seen_examples

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


def score(examples: list[Example], answers: list[str]) -> dict:
    per_task: dict[str, list[bool]] = defaultdict(list)
    failures = []
    for example, answer in zip(examples, answers, strict=True):
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


def evaluate(engine, examples: list[Example]) -> dict:
    return score(examples, [ask(engine, example.question) for example in examples])


def evaluate_conversations(engine, conversations: list[list[Example]], first_scored: int) -> dict:
    """Exact match over the turns from first_scored on (counted from 1), with per-turn figures."""
    scored: list[Example] = []
    answers: list[str] = []
    per_turn: dict[int, list[bool]] = defaultdict(list)
    for conversation in conversations:
        replies = converse(engine, [example.question for example in conversation])
        for turn, (example, reply) in enumerate(zip(conversation, replies), start=1):
            per_turn[turn].append(reply == example.answer)
            if turn >= first_scored:
                scored.append(example)
                answers.append(reply)
    results = score(scored, answers)
    results["conversations"] = len(conversations)
    results["per_turn"] = {turn: sum(oks) / len(oks) for turn, oks in sorted(per_turn.items())}
    return results


def print_tasks(results: dict) -> None:
    for task, accuracy in results["per_task"].items():
        print(f"  {task:8s} {accuracy:.1%}")
    for failure in results["failures"][:10]:
        print(f"  miss: {failure['question']!r} expected {failure['expected']!r} got {failure['got']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "localv3" / "assets" / "tiny")
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--cli", type=int, default=0, help="also ask N questions (spread over all tasks) through the CLI")
    parser.add_argument("--multi-turn", action="store_true", help="also ask each held-out question at turn 5-10 of a conversation")
    parser.add_argument("--json", type=Path, help="write the full results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = localv3.load(args.model, device="cpu", dtype=torch.float32)
    held_out = held_out_questions(args.per_task)
    started = time.perf_counter()
    results = {"held_out": evaluate(engine, held_out), "seen": evaluate(engine, seen_examples())}
    if args.multi_turn:
        conversations = held_out_conversations(args.per_task, turns=10, first_scored=5)
        results["turns_5_to_10"] = evaluate_conversations(engine, conversations, first_scored=5)
    results["seconds"] = time.perf_counter() - started
    if args.cli:
        spots = held_out[:: max(1, len(held_out) // args.cli)][: args.cli]
        results["cli"] = [{"question": e.question, "expected": e.answer, "got": ask_cli(e.question)} for e in spots]
    held = results["held_out"]
    print(f"held-out, single questions: {held['questions']} questions, exact match {held['exact_match']:.1%}")
    print_tasks(held)
    seen = results["seen"]
    seen_tasks = "  ".join(f"{task} {accuracy:.1%}" for task, accuracy in seen["per_task"].items())
    print(f"seen questions: {seen['exact_match']:.1%} ({seen_tasks})")
    if args.multi_turn:
        multi = results["turns_5_to_10"]
        print(
            f"held-out at turns 5-10 of {multi['conversations']} conversations: {multi['questions']} questions, "
            f"exact match {multi['exact_match']:.1%}"
        )
        print("  per turn: " + "  ".join(f"{turn}: {accuracy:.0%}" for turn, accuracy in multi["per_turn"].items()))
        print_tasks(multi)
    print(f"({results['seconds']:.0f}s)")
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
