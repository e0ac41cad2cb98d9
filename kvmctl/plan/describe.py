"""Facts as a person reads them in a plan's field diffs (`memory: 128MiB → 192MiB`)."""

from __future__ import annotations

from collections.abc import Mapping

from ..host.facts import (
    DhcpHostFact,
    DiskFact,
    DnsHostFact,
    Ipv4Fact,
    MetadataFact,
    NicFact,
    RangeFact,
)
from ..units import format_kib
from .types import FieldDiff

KIB_FIELDS = ("memory", "memory.max")  # domain facts counted in KiB


INTERNAL_FIELDS = ("metadata",)  # kvmctl's own record (digests): shown in JSON, not in text


def created(facts: Mapping[str, object]) -> tuple[FieldDiff, ...]:
    """What a create makes, as field diffs from nothing: a reviewer sees the whole object."""
    return tuple(FieldDiff(field, None, shown) for field, value in facts.items()
                 if field not in INTERNAL_FIELDS
                 and (shown := describe(field, value)) not in (None, False, ()))


def describe(field: str, value: object) -> object:
    """`value` of the fact `field` (of a domain or a network) for display; None when unset."""
    if value is None or value == () or value == "":
        return None
    if field in KIB_FIELDS and isinstance(value, int):
        return format_kib(value)
    if field == "labels" and isinstance(value, tuple):
        return ", ".join(f"{key}={text}" for key, text in value)
    if isinstance(value, MetadataFact):
        return f"spec {value.spec_hash[:8]}" + (
            f", seed {value.seed_hash[:8]}" if value.seed_hash else "")
    if isinstance(value, DiskFact):
        where = "/".join(map(str, value.source)) if isinstance(value.source, tuple) \
            else value.source
        return f"{value.device} on {value.bus}: {where} ({value.format})" + (
            ", readonly" if value.readonly else "") + (", shareable" if value.shareable else "")
    if isinstance(value, NicFact):
        return f"{value.type} {value.source}, model {value.model}, link {value.link}"
    if isinstance(value, Ipv4Fact):
        return f"{value.address}/{value.prefix}"
    if isinstance(value, RangeFact):
        return f"{value.start}-{value.end}"
    if isinstance(value, tuple) and all(isinstance(v, DhcpHostFact) for v in value):
        return ", ".join(f"{h.name or h.mac} {h.ip}" for h in value)
    if isinstance(value, tuple) and all(isinstance(v, DnsHostFact) for v in value):
        return ", ".join(f"{h.ip} {' '.join(map(str, h.hostnames))}" for h in value)
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return value
