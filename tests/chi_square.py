"""A goodness-of-fit check for sampled tokens: Pearson's chi-square against the expected
distribution, with a bound computed for the number of trials and categories."""

from __future__ import annotations

import math
from collections import Counter

import torch

MIN_EXPECTED = 5.0  # categories expected fewer times than this are pooled (the chi-square approximation needs it)
Z = 4.0  # the bound's one-sided normal quantile: a correct sampler exceeds it with probability ~3e-5


def chi_square_bound(df: int, z: float = Z) -> float:
    """The chi-square distribution's quantile at the normal quantile z (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: Counter, expected: torch.Tensor) -> tuple[float, int]:
    """counts: token -> times drawn; expected [V]: probabilities (sum 1).

    -> (Pearson's statistic, degrees of freedom), categories expected < MIN_EXPECTED pooled.
    """
    trials = sum(counts.values())
    outside = {token: n for token, n in counts.items() if expected[token] == 0}
    assert not outside, f"tokens drawn that have probability 0: {outside}"
    cells, pooled_expected, pooled_observed = [], 0.0, 0
    for token in expected.nonzero().flatten().tolist():
        e = float(expected[token]) * trials
        if e < MIN_EXPECTED:
            pooled_expected += e
            pooled_observed += counts.get(token, 0)
        else:
            cells.append((counts.get(token, 0), e))
    if pooled_expected > 0:
        cells.append((pooled_observed, pooled_expected))
    statistic = sum((observed - e) ** 2 / e for observed, e in cells)
    return statistic, len(cells) - 1


def assert_follows(counts: Counter, expected: torch.Tensor) -> None:
    """The drawn tokens are a plausible sample of `expected`: the chi-square statistic is within
    the bound for its degrees of freedom."""
    statistic, df = chi_square(counts, expected)
    assert df >= 1, "the check needs at least two categories"
    bound = chi_square_bound(df)
    assert statistic <= bound, f"chi-square {statistic:.1f} > {bound:.1f} ({df} degrees of freedom, {sum(counts.values())} draws)"
