"""Stage 4 values: what the hypervisor really has, read once per plan.

Plain frozen dataclasses filled by hypervisor.py (the only module that talks to libvirt), so
planning can be tested from data without a daemon.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from .render import NAMESPACE

RECORD_PREFIX = "kvmctl-owner-"  # a per-project ownership record volume in each pool


@dataclass(frozen=True)
class Owner:
    project: str
    kind: str
    name: str
    spec_hash: str = ""
    seed_hash: str = ""
    protect: bool = False


@dataclass(frozen=True)
class LiveDomain:
    name: str
    uuid: str
    inactive_xml: str
    live_xml: str | None  # only while running
    state: str  # running | shutoff | paused | other libvirt states, lowercased
    autostart: bool
    owner: Owner | None

    @property
    def running(self) -> bool:
        return self.live_xml is not None


@dataclass(frozen=True)
class LiveNetwork:
    name: str
    uuid: str
    xml: str
    active: bool
    autostart: bool
    owner: Owner | None


@dataclass(frozen=True)
class LiveVolume:
    pool: str
    name: str
    path: str
    capacity: int
    format: str
    backing_path: str | None
    owner: Owner | None = None


@dataclass(frozen=True)
class LivePool:
    name: str
    uuid: str
    xml: str
    path: str
    active: bool
    autostart: bool
    owner: Owner | None
    volumes: tuple[LiveVolume, ...] = ()

    def volume(self, name: str) -> LiveVolume | None:
        return next((v for v in self.volumes if v.name == name), None)


@dataclass(frozen=True)
class LiveState:
    domains: dict[str, LiveDomain] = field(default_factory=dict)
    networks: dict[str, LiveNetwork] = field(default_factory=dict)
    pools: dict[str, LivePool] = field(default_factory=dict)
    host_bridges: frozenset[str] = frozenset()

    def volume(self, pool: str, name: str) -> LiveVolume | None:
        live_pool = self.pools.get(pool)
        return live_pool.volume(name) if live_pool else None

    def volume_by_path(self, path: str) -> LiveVolume | None:
        for pool in self.pools.values():
            for vol in pool.volumes:
                if vol.path == path:
                    return vol
        return None


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
    return Owner(fields.get("project", ""), fields.get("kind", ""), fields.get("name", ""),
                 fields.get("spec-hash", ""), fields.get("seed-hash", ""),
                 fields.get("protect") == "true")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of live objects, to detect change between plan and apply."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


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
    def from_json(data: bytes) -> "OwnershipRecord | None":
        try:
            raw = json.loads(data.rstrip(b"\0").decode() or "{}")
            project = raw["project"]
            volumes = {name: Owner(project, kind, obj, spec, "", bool(protect))
                       for name, (kind, obj, spec, protect) in raw.get("volumes", {}).items()}
            return OwnershipRecord(project, bool(raw.get("owns_pool")), volumes)
        except (ValueError, KeyError, TypeError):
            return None
