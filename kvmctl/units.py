"""Sizes with units, the one place they are parsed and formatted.

Manifests write sizes with a unit (`512MiB`, `20GiB`, `1.5TB`; a bare number is never a size);
libvirt XML writes a number and a `unit` attribute (`<memory unit='KiB'>`, `<capacity
unit='bytes'>`). Both are parsed exactly (no float), an unknown unit is an error, never a guess,
and values carry their unit in their names (`kib`, `bytes`) once parsed.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, InvalidOperation, localcontext

from .errors import KvmctlError

KIB = 1024
MAX_BYTES = 2**64 - 1  # libvirt's sizes are unsigned 64-bit

_UNITS = {
    "B": 1,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*")  # [0-9]: ASCII digits only
_MAX_DIGITS = 40  # more digits than any size libvirt can hold, in the number or its fraction
_EXACT = Context(prec=2 * _MAX_DIGITS + 8)  # products of such numbers are never rounded
_XML_PREFIX = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


class SizeError(KvmctlError, ValueError):
    """Not a size with a known unit; the message is fit for a user."""


def parse_size(text: object) -> int:
    """Bytes in a manifest size such as `512MiB`; raises SizeError."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise SizeError(f"expected a size such as 512MiB, got {type(text).__name__}")
    if isinstance(text, (int, float)):
        shown = text if abs(text) < 10**12 else "a number"
        raise SizeError(f"{shown} has no unit: write e.g. {shown}MiB or {shown}GiB")
    match = _SIZE.fullmatch(text)
    if not match:
        raise SizeError(f"{_short(text)!r} is not a size: write a number and a unit, "
                        "e.g. 512MiB")
    number, unit = match.groups()
    if unit not in _UNITS:
        raise SizeError(f"unknown unit {unit!r} in {_short(text)!r} "
                        f"(known: {', '.join(_UNITS)})")
    if len(number) > _MAX_DIGITS:
        raise SizeError(f"{_short(text)!r} is too large (at most 16EiB)")
    with localcontext(_EXACT):
        return _exact(Decimal(number) * _UNITS[unit], text)


def xml_bytes(number: str | None, unit: str | None, default_unit: str = "bytes") -> int | None:
    """Bytes in a libvirt XML size (`<memory unit='KiB'>524288</memory>`); None without a number.

    libvirt's units: b, byte(s); k, m, g, t, p, e alone or with `iB` (powers of 1024) or with
    `B` (powers of 1000), in any case. Anything else raises SizeError."""
    if number is None or not number.strip():
        return None
    factor = _xml_factor(unit or default_unit)
    if len(number.strip()) > _MAX_DIGITS:
        raise SizeError(f"{_short(number)!r} is too large for a size")
    try:
        value = Decimal(number.strip())
    except InvalidOperation:
        raise SizeError(f"{_short(number)!r} is not a number") from None
    with localcontext(_EXACT):
        return _exact(value * factor, f"{number} {unit or default_unit}")


def xml_kib(number: str | None, unit: str | None) -> int | None:
    """KiB in a libvirt XML memory size (whose unit defaults to KiB); rounded down, as libvirt
    rounds memory to whole KiB."""
    size = xml_bytes(number, unit, default_unit="KiB")
    return None if size is None else size // KIB


def _xml_factor(unit: str) -> int:
    lowered = unit.strip().lower()
    if lowered in ("b", "byte", "bytes"):
        return 1
    prefix, rest = lowered[:1], lowered[1:]
    if prefix in _XML_PREFIX and prefix and rest in ("", "ib"):
        return int(1024 ** _XML_PREFIX[prefix])  # int ** int is typed Any (it may be a float)
    if prefix in _XML_PREFIX and prefix and rest == "b":
        return int(1000 ** _XML_PREFIX[prefix])
    raise SizeError(f"unknown unit {unit!r} in libvirt XML")


def _exact(value: Decimal, text: str) -> int:
    if not value.is_finite() or value < 0:
        raise SizeError(f"{_short(text)!r} is not a size")
    if value != value.to_integral_value():
        raise SizeError(f"{_short(text)!r} is not a whole number of bytes")
    if value > MAX_BYTES:
        raise SizeError(f"{_short(text)!r} is too large (at most 16EiB)")
    return int(value)


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def format_size(size: int) -> str:
    """The shortest exact binary spelling: 536870912 -> 512MiB."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}B"


def format_kib(kib: int) -> str:
    """A size counted in KiB (libvirt's memory unit), spelled as format_size does."""
    return format_size(kib * KIB)
