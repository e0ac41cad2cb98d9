"""Stage 4 values: what the hypervisor really has, read once per plan.

Plain frozen dataclasses filled by hypervisor.py (the only module that talks to libvirt), so
planning can be tested from data without a daemon.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..kinds import SnapshotOrigin
from ..render.specs import HostHints
from .ownership import Owner
from .records import DefinitionRecord, find_record


@dataclass(frozen=True)
class LiveSnapshot:
    domain: str
    name: str
    created: int  # seconds since the epoch, as libvirt recorded it
    state: str  # the domain's state it recorded: running | shutoff | paused ...
    parent: str | None
    description: str  # without kvmctl's mark
    project: str | None  # the project that made it (its mark), None: not kvmctl's
    origin: SnapshotOrigin | None  # why kvmctl took it (its mark)
    spec: str  # a declared snapshot's spec digest (its mark), else ""
    memory: bool  # holds the guest's memory (revert resumes it running)
    external: bool
    current: bool
    quiesced: bool = False  # taken with the guest's file systems frozen: a revert thaws them
    # The domain's definition the snapshot keeps (its disks hold the snapshot's data, also
    # after they left the domain's present definition).
    domain_xml: str = field(default="", repr=False)

    @property
    def revertible(self) -> bool:
        return not self.external


@dataclass(frozen=True)
class LiveDomain:
    name: str
    uuid: str
    inactive_xml: str
    live_xml: str | None  # only while running
    state: str  # running | shutoff | paused | other libvirt states, lowercased
    autostart: bool
    owner: Owner | None
    snapshots: int = 0  # how many snapshots libvirt keeps of it (a delete would lose them)
    taken: tuple[LiveSnapshot, ...] = ()  # those snapshots, oldest first
    checkpoints: int = 0  # incremental-backup checkpoints: libvirt refuses snapshots beside them

    @property
    def running(self) -> bool:
        return self.live_xml is not None

    @property
    def record(self) -> DefinitionRecord | None:
        """The definition record kvmctl left in the persistent definition (host/records.py)."""
        return find_record(self.inactive_xml)


@dataclass(frozen=True)
class LiveNetwork:
    name: str
    uuid: str
    xml: str
    active: bool
    autostart: bool
    owner: Owner | None
    # The bridge the running network has (its persistent definition may name another, once
    # libvirt gave a redefinition a free virbrN); None when it is not running.
    bridge: str | None = None


@dataclass(frozen=True)
class LiveVolume:
    pool: str
    name: str
    path: str
    capacity_bytes: int
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
    # Its directory is gone (deleted outside libvirt): libvirt stopped it when the read
    # refreshed it, and its volumes and ownership records went with the directory.
    target_missing: bool = False

    def volume(self, name: str) -> LiveVolume | None:
        return next((v for v in self.volumes if v.name == name), None)


@dataclass(frozen=True)
class LiveState:
    domains: dict[str, LiveDomain] = field(default_factory=dict)
    networks: dict[str, LiveNetwork] = field(default_factory=dict)
    pools: dict[str, LivePool] = field(default_factory=dict)
    host_bridges: frozenset[str] = frozenset()
    # Whether host_bridges lists every interface (libvirt's interface driver answered); a
    # missing bridge means something only then.
    interfaces_listed: bool = False

    def volume(self, pool: str, name: str) -> LiveVolume | None:
        live_pool = self.pools.get(pool)
        return live_pool.volume(name) if live_pool else None

    def hints(self) -> HostHints:
        """What rendering needs from the host: uuids of existing objects, volume paths."""
        return HostHints(
            domain_uuids={d.name: d.uuid for d in self.domains.values()},
            network_uuids={n.name: n.uuid for n in self.networks.values()},
            volume_paths={(v.pool, v.name): v.path for p in self.pools.values()
                          for v in p.volumes})


def fingerprint(*parts: Any) -> str:
    """A short stable hash of live objects, to detect change between plan and apply."""
    blob = _FINGERPRINT_JSON.encode(parts).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


# json.dumps(parts, sort_keys=True, default=str), without building an encoder per call.
_FINGERPRINT_JSON = json.JSONEncoder(sort_keys=True, default=str)


def volume_fingerprint(vol: LiveVolume) -> str:
    """The fingerprint of a volume: of the canonical text below, which is what plans of format
    version 1 have always hashed (it must not follow renames of the fields in this module)."""
    o = vol.owner
    owner = "None" if o is None else (
        f"Owner(project={o.project!r}, kind={str(o.kind)!r}, name={o.name!r}, "
        f"spec_hash={o.spec_hash!r}, seed_hash={o.seed_hash!r}, protect={o.protect!r})")
    return fingerprint(
        f"LiveVolume(pool={vol.pool!r}, name={vol.name!r}, path={vol.path!r}, "
        f"capacity={vol.capacity_bytes!r}, format={vol.format!r}, "
        f"backing_path={vol.backing_path!r}, owner={owner})")
