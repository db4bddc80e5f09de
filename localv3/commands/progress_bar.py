"""Tearing down the rich progress displays of pull and quantize."""

from __future__ import annotations

from rich.progress import Progress


def stop_progress(bar: Progress, exc_type: type[BaseException] | None) -> None:
    """Stop `bar` when its command ends. Ctrl-C or SIGTERM raise wherever Python happens to be,
    also inside rich while it starts the display, which then fails to stop (measured: 1 SIGTERM in
    ~30 mid-quantize gave `IndexError: pop from empty list`). While such an interrupt propagates,
    a failed teardown must not replace it: the user is told "interrupted", the exit code stays."""
    try:
        bar.stop()
    except Exception:
        if exc_type is None:
            raise
