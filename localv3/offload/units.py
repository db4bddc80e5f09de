"""Quantities the way people write them: `24GiB`, `512G`, `300GB/s`, `25 GB/s`, `165TFLOPS`.

Sizes: `GB` is 10^9 bytes, `GiB` 2^30, and a bare letter (`512G`, `64k`) is binary, as `free -g`
and llama.cpp read it. Rates and FLOP rates are decimal (`GB/s` = 10^9 bytes per second), as
hardware is specified. Written text needs a unit (`24` could be bytes or GiB, so it is
refused; `24B` is 24 bytes), except `0`; numbers given as numbers by code are bytes (bytes/s,
FLOP/s). Values must be finite and at most `LIMITS` (`1e300GiB` is refused, not overflowed).
"""

from __future__ import annotations

import math
import re

from localv3.errors import LocalV3Error

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([A-Za-z]*)\s*(/\s*s)?\s*$")
_PREFIX_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
# The largest value each kind of quantity may take: beyond any machine this plans for.
LIMITS = {"a size": (2.0**60, "1 EiB"), "a bandwidth": (1e15, "1 PB/s"), "a FLOP rate": (1e19, "10 EFLOP/s")}


class UnitError(LocalV3Error):
    """A size, rate or FLOP rate that could not be read."""


def parse_bytes(text: str | int | float) -> int:
    """`24GiB`, `512G`, `96GB`, `1.5T`, `123456` -> bytes."""
    value, unit, per_second = _split(text, "a size", "24GiB, 512G or 96GB")
    if per_second:
        raise UnitError(f"{text!r} is a rate, not a size; write e.g. 24GiB, 512G or 96GB")
    return int(_bounded(value * _byte_multiplier(unit, text, "a size", "24GiB, 512G or 96GB"), text, "a size"))


def parse_rate(text: str | int | float) -> float:
    """`300GB/s`, `25 GB/s`, `1.5TB/s`, `460.8GB` -> bytes per second."""
    value, unit, _ = _split(text, "a bandwidth", "300GB/s or 1.5TB/s")
    multiplier = _byte_multiplier(unit, text, "a bandwidth", "300GB/s or 1.5TB/s", decimal=True)
    return _bounded(value * multiplier, text, "a bandwidth")


def parse_flops(text: str | int | float) -> float:
    """`165TFLOPS`, `71 TFLOP/s`, `2.3T` -> floating-point operations per second."""
    value, unit, _ = _split(text, "a FLOP rate", "165TFLOPS or 71 TFLOP/s")
    match = re.fullmatch(r"([kmgtp]?)(?:flops?)?", unit.lower())
    if not match:
        raise UnitError(f"{text!r} is not a FLOP rate; write e.g. 165TFLOPS or 71 TFLOP/s")
    return _bounded(value * 1000.0 ** _PREFIX_POWER[match.group(1)], text, "a FLOP rate")


def format_rate(bytes_per_second: float) -> str:
    """Decimal units, three significant figures, as hardware is specified: `461 GB/s`, `1.01 TB/s`."""
    for unit, power in (("TB/s", 4), ("GB/s", 3), ("MB/s", 2)):
        scaled = bytes_per_second / 1000.0**power
        if scaled >= 1:
            return f"{_three_figures(scaled)} {unit}"
    return f"{bytes_per_second:.0f} B/s"


def format_flops(flops: float) -> str:
    for unit, power in (("PFLOP/s", 5), ("TFLOP/s", 4), ("GFLOP/s", 3)):
        scaled = flops / 1000.0**power
        if scaled >= 1:
            return f"{_three_figures(scaled)} {unit}"
    return f"{flops:.0f} FLOP/s"


def _split(text: str | int | float, what: str, example: str) -> tuple[float, str, bool]:
    """(value, unit, whether `/s` was written); a number from code has no unit and needs none."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not 0 <= text < math.inf:
            raise UnitError(f"{text!r} is not {what}: it must be a finite number, not negative")
        return (math.inf if text > LIMITS[what][0] else float(text)), "", False
    match = _QUANTITY.match(str(text))
    if not match:
        raise UnitError(f"{text!r} is not {what}; write e.g. {example}")
    mantissa, exponent, unit, per_second = match.groups()
    try:
        value = float(mantissa) and float(mantissa) * 10.0 ** int(exponent or 0)
    except OverflowError:
        value = math.inf
    if not unit and value != 0:
        raise UnitError(f"{text!r} has no unit; write e.g. {example}")
    return value, unit, per_second is not None


def _bounded(value: float, text, what: str) -> float:
    limit, written = LIMITS[what]
    if not value <= limit:
        raise UnitError(f"{text!r} is too large for {what} (at most {written})")
    return value


def _byte_multiplier(unit: str, text, what: str, example: str, decimal: bool = False) -> float:
    match = re.fullmatch(r"([kKmMgGtTpP]?)(i?)([bB]?)", unit)
    if not match:
        raise UnitError(f"{text!r} is not {what}; write e.g. {example}")
    prefix, binary_marker, byte_marker = match.groups()
    if binary_marker and not prefix:
        raise UnitError(f"{text!r} is not {what}; write e.g. {example}")
    power = _PREFIX_POWER[prefix.lower()]
    binary = bool(binary_marker) or (not decimal and bool(prefix) and not byte_marker)
    return (1024.0 if binary else 1000.0) ** power


def _three_figures(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"
