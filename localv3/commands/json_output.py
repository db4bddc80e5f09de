"""JSON for scripts: measured floats rounded to what a measurement can tell."""

from __future__ import annotations

SIGNIFICANT_DIGITS = 4  # timings repeat to a few percent at best: 48.13 tok/s, 0.01234 s


def rounded(value, digits: int = SIGNIFICANT_DIGITS):
    """`value` with every float in it (through dicts and lists) kept to `digits` significant
    digits; other values unchanged."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    return value
