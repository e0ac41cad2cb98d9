"""Facts as a person reads them in a plan's field diffs (`memory: 128MiB → 192MiB`)."""

from __future__ import annotations

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

KIB_FIELDS = ("memory", "memory.max")  # domain facts counted in KiB


def describe(field: str, value: object) -> object:
    """`value` of the fact `field` (of a domain or a network) for display; None when unset."""
    if value is None or value == () or value == "":
        return None
    if field in KIB_FIELDS and isinstance(value, int):
        return format_kib(value)
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
