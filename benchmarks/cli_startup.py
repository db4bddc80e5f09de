"""Start-up time of `localv3` commands that compute nothing: wall time from exec to exit.

    python benchmarks/cli_startup.py [--repeats 5] [--json out.json]

Runs this venv's own `localv3` entry point for `--help`, `ls`, `rm` of a model that does not
exist, `pull tiny` (bundled: nothing to fetch) and `plan tiny`, each `--repeats` times after
one untimed run (which fills the page cache and, for `plan`, the hardware probe's cache), and
prints the fastest and the median run per command, then the same as JSON. For reference it
times `python -c "import torch"` too: what each command would pay if it imported torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOCALV3 = Path(sys.executable).parent / "localv3"
COMMANDS = {
    "localv3 --help": [str(LOCALV3), "--help"],
    "localv3 ls": [str(LOCALV3), "ls"],
    "localv3 rm no-such-model": [str(LOCALV3), "rm", "no-such-model", "--yes"],
    "localv3 pull tiny": [str(LOCALV3), "pull", "tiny"],
    "localv3 plan tiny": [str(LOCALV3), "plan", "tiny"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


@dataclass
class StartupTime:
    command: str
    best_s: float
    median_s: float
    samples_s: list[float]
    exit_code: int


def time_command(name: str, argv: list[str], repeats: int) -> StartupTime:
    subprocess.run(argv, capture_output=True)  # untimed: caches warm
    samples, exit_code = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        exit_code = subprocess.run(argv, capture_output=True).returncode
        samples.append(time.perf_counter() - started)
    return StartupTime(name, min(samples), statistics.median(samples), samples, exit_code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    results = [time_command(name, argv, args.repeats) for name, argv in COMMANDS.items()]
    width = max(len(r.command) for r in results)
    print(f"{'command':<{width}}  {'best s':>7}  {'median s':>8}  exit")
    for r in results:
        print(f"{r.command:<{width}}  {r.best_s:7.3f}  {r.median_s:8.3f}  {r.exit_code:>4}")
    report = json.dumps([asdict(r) for r in results], indent=2)
    print(report)
    if args.json:
        args.json.write_text(report + "\n")


if __name__ == "__main__":
    main()
