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


def verbose_lines(
    stats: GenerationStats, load_s: float, total_s: float, plain: GenerationStats | None = None
) -> list[str]:
    """`ollama run --verbose` timings, plus time to first token and, for a speculative run, MTP's
    figures (and its speed-up over `plain`, the same answer decoded again without speculation)."""
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
    speculation = stats.speculation or {}
    if speculation.get("acceptance") is not None:
        lines.append(f"MTP acceptance:       {speculation['acceptance']:.1%}")
    if speculation.get("tokens_per_step") is not None:
        lines.append(f"MTP tokens per step:  {speculation['tokens_per_step']:.2f}")
    if speculation.get("experts_read_per_step") is not None:
        lines.append(f"experts read / step:  {speculation['experts_read_per_step']:.1f} (routed, all MoE layers)")
    if plain is not None and plain.decode_tok_s > 0:
        lines.append(
            f"MTP speed-up:         {stats.decode_tok_s / plain.decode_tok_s:.2f}x"
            f" (without MTP: {plain.decode_tok_s:.2f} tokens/s, same prompt, decoded after the answer)"
        )
    return lines
