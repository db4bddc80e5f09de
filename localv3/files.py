"""Small files localv3 writes beside its work (caches, profiles): whole or not at all, and never
a reason for a command to fail; and the free space of the disk a write will land on."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write to a temporary name beside `path`, then rename: a reader never sees half a file
    (a full disk leaves the old file, or none). Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    return path


def warn(message: str) -> None:
    """One line on stderr for something that went wrong but does not stop the command."""
    print(f"localv3: warning: {message}", file=sys.stderr)


def cache_text(path: Path, text: str, what: str) -> None:
    """A best-effort cache write: a failure is one warning line, never an error."""
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        warn(f"could not save {what} in {path}: {exc.strerror or exc}")


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free
