"""Sizes with units: `512MiB`, `20GiB`, `1.5TB`. A bare number is never a size."""

from __future__ import annotations

import re

_UNITS = {
    "B": 1,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*$")


class SizeError(ValueError):
    """Not a size with a known unit."""


def parse_size(text: object) -> int:
    """Bytes in `text`; raises SizeError with a message fit for a user."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise SizeError(f"expected a size such as 512MiB, got {type(text).__name__}")
    if isinstance(text, (int, float)):
        raise SizeError(f"{text} has no unit: write e.g. {text}MiB or {text}GiB")
    match = _SIZE.match(text)
    if not match:
        raise SizeError(f"{text!r} is not a size: write a number and a unit, e.g. 512MiB")
    number, unit = match.groups()
    if unit not in _UNITS:
        known = ", ".join(_UNITS)
        raise SizeError(f"unknown unit {unit!r} in {text!r} (known: {known})")
    value = float(number) * _UNITS[unit]
    if value != int(value):
        raise SizeError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    """The shortest exact binary spelling: 536870912 -> 512MiB."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}B"
