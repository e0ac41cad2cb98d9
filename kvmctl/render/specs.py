"""The values rendering produces and the planner reads: volume and seed specifications, the
desired state of a manifest set, and the host facts it is rendered with. No jinja2 here, so
the planner can read them without loading the templates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..kinds import Kind

if TYPE_CHECKING:  # the host reads these values without loading the manifest stage
    from ..manifest.cloudinit import SeedContent


@dataclass(frozen=True)
class Rendered:
    """The desired libvirt XML of one object."""

    kind: Kind
    name: str
    xml: str


@dataclass(frozen=True)
class VolumeSpec:
    pool: str
    name: str
    capacity_bytes: int
    format: str
    backing_path: str | None = None
    backing_format: str | None = None
    allocation_bytes: int | None = None


@dataclass(frozen=True)
class SeedSpec:
    pool: str
    volume: str
    target: str
    content: SeedContent

    @property
    def digest(self) -> str:
        return self.content.digest()


@dataclass(frozen=True)
class HostHints:
    """The few host facts a definition must carry: the uuids of objects that exist (a
    redefinition keeps its identity) and the paths of volumes (an overlay names its base)."""

    domain_uuids: Mapping[str, str] = field(default_factory=dict)
    network_uuids: Mapping[str, str] = field(default_factory=dict)
    volume_paths: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (pool, volume)


@dataclass(frozen=True)
class DesiredVolume:
    spec: VolumeSpec
    xml: str


@dataclass(frozen=True)
class DesiredSnapshot:
    """A declared snapshot: its VM, the XML that creates it, and how it is taken."""

    vm: str
    name: str
    xml: str
    memory: bool
    quiesce: bool
    spec: str  # the digest its mark carries: a changed spec is an error (snapshots are immutable)


@dataclass(frozen=True)
class Desired:
    """Every definition the manifests want, by object name: what the planner compares."""

    project: str
    pools: Mapping[str, str]
    images: Mapping[str, str]  # the volume a host-file import creates
    disks: Mapping[str, DesiredVolume]
    seeds: Mapping[str, SeedSpec]  # by VM name, for VMs with cloudInit
    networks: Mapping[str, str]
    domains: Mapping[str, str]
    # render.definitions.domain_digest of each VM: what a definition record must name
    domain_digests: Mapping[str, str] = field(default_factory=dict)
    snapshots: Mapping[str, DesiredSnapshot] = field(default_factory=dict)
