"""Running the `localv3` command in tests: in-process through the real entry point (cli.main,
as the console script runs it), or as the venv's own executable in a child process."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

import cli

LOCALV3 = Path(sys.executable).parent / "localv3"  # this venv's entry point, never one found on PATH


class Terminal(io.TextIOWrapper):
    """A stdin that is a terminal where nothing is typed."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(b""), encoding="utf-8")

    def isatty(self) -> bool:
        return True


def run_main(monkeypatch, capsys, args: list[str], stdin: bytes | None = b"") -> tuple[int, str, str]:
    """cli.main with `args` and `stdin` (None: a terminal): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["localv3", *args])
    monkeypatch.setattr(sys, "stdin", Terminal() if stdin is None else io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The single `error: ...` line on stderr (fails the test when there is anything else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
