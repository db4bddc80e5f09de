"""Numbers for people: durations, sizes, counts, the stats line after an answer and the
Ollama-style timing lines of `run --verbose`. Pure formatting; nothing here prints."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localv3.generate import GenerationStats


def format_duration(seconds: float) -> str:
    """Like Go's time.Duration, as Ollama prints it: 812.4ms, 2.031s."""
    if seconds < 1.0:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.3f}s"


def format_bytes(n_bytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{n_bytes} B"


def format_count(n: int) -> str:
    """Parameter counts as llama-bench prints them: 671.03 B, 6.74 M."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def mtp_acceptance(stats: GenerationStats) -> float | None:
    """The share of MTP drafts the main model accepted, when the run speculated."""
    if not stats.speculation:
        return None
    return stats.speculation.get("acceptance")


def stats_line(stats: GenerationStats, context_used: int, context_size: int) -> str:
    """The dim line chat prints after each answer."""
    parts = [
        f"{stats.completion_tokens} tokens",
        f"{stats.decode_tok_s:.1f} tok/s",
        f"TTFT {format_duration(stats.ttft_s)}",
        f"context {context_used}/{context_size}",
    ]
    acceptance = mtp_acceptance(stats)
    if acceptance is not None:
        parts.append(f"MTP acceptance {acceptance:.0%}")
    return " · ".join(parts)


def verbose_lines(stats: GenerationStats, load_s: float, total_s: float) -> list[str]:
    """`ollama run --verbose` timings, plus time to first token and MTP acceptance."""
    lines = [
        f"total duration:       {format_duration(total_s)}",
        f"load duration:        {format_duration(load_s)}",
        f"prompt eval count:    {stats.prompt_tokens} token(s)",
        f"prompt eval duration: {format_duration(stats.prompt_s)}",
        f"prompt eval rate:     {stats.prompt_tok_s:.2f} tokens/s",
        f"time to first token:  {format_duration(stats.ttft_s)}",
        f"eval count:           {stats.completion_tokens} token(s)",
        f"eval duration:        {format_duration(stats.decode_s)}",
        f"eval rate:            {stats.decode_tok_s:.2f} tokens/s",
    ]
    acceptance = mtp_acceptance(stats)
    if acceptance is not None:
        lines.append(f"MTP acceptance:       {acceptance:.1%}")
    return lines
