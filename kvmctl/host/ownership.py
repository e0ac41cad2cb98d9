"""Who owns what on the host: kvmctl's metadata mark in domain and network definitions, and
the per-project ownership record volume in each pool (libvirt 9.0 has no metadata for pools
and volumes)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lxml import etree

from ..kinds import NAMESPACE, Kind, known_kind


@dataclass(frozen=True)
class Owner:
    project: str
    kind: Kind | str  # a Kind when kvmctl wrote it; whatever a foreign record says otherwise
    name: str
    spec_hash: str = ""
    seed_hash: str = ""
    protect: bool = False
    shutdown_timeout_s: float | None = None  # a VM's shutdownTimeout, for deletes of it


def resource_fields(root: etree._Element) -> dict[str, str] | None:
    """The fields of kvmctl's <resource> metadata element, by local name.

    libvirt's setMetadata puts only the element itself in our namespace, not its children, so
    children are matched by local name whatever their namespace.
    """
    found = root.find(f"metadata/{{{NAMESPACE}}}resource")
    if found is None:
        return None
    return {etree.QName(child).localname: (child.text or "").strip() for child in found
            if isinstance(child.tag, str)}


def owner_from_xml(xml: str) -> Owner | None:
    """The kvmctl ownership mark in a domain or network definition, if any."""
    # Only the <metadata> element is parsed: it is self-contained (libvirt writes the namespace
    # declarations on its children), and most of a definition is not needed here.
    start, end = xml.find("<metadata>"), xml.find("</metadata>")
    if start < 0 or end < 0 or NAMESPACE not in xml[start:end]:
        return None
    try:
        fragment = etree.fromstring(("<x>" + xml[start:end + 11] + "</x>").encode())
    except etree.XMLSyntaxError:
        return None
    fields = resource_fields(fragment)
    if fields is None:
        return None
    return Owner(fields.get("project", ""), known_kind(fields.get("kind", "")),
                 fields.get("name", ""),
                 fields.get("spec-hash", ""), fields.get("seed-hash", ""),
                 fields.get("protect") == "true", _seconds(fields.get("shutdown-timeout")))


def _seconds(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value <= 86400 else None


@dataclass(frozen=True)
class OwnershipRecord:
    """What one project owns in one pool: the pool itself and/or some of its volumes."""

    project: str
    owns_pool: bool
    volumes: dict[str, Owner]

    def to_json(self) -> bytes:
        return json.dumps({"version": 1, "project": self.project, "owns_pool": self.owns_pool,
                           "volumes": {name: [o.kind, o.name, o.spec_hash, o.protect]
                                       for name, o in sorted(self.volumes.items())}},
                          indent=1).encode()

    @staticmethod
    def from_json(data: bytes) -> OwnershipRecord | None:
        try:
            raw = json.loads(data.rstrip(b"\0").decode() or "{}")
            project = raw["project"]
            volumes = {name: Owner(project, known_kind(kind), obj, spec, "", bool(protect))
                       for name, (kind, obj, spec, protect) in raw.get("volumes", {}).items()}
            return OwnershipRecord(project, bool(raw.get("owns_pool")), volumes)
        except (ValueError, KeyError, TypeError):
            return None
