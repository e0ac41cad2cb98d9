"""What kvmctl manages, in the one order everything follows, and how it marks what it owns.

Shared by every stage (manifests, rendering, host, plan, apply), so it depends on nothing.
"""

from __future__ import annotations

import uuid
from enum import StrEnum, unique

# libvirt metadata namespace of kvmctl's ownership mark (domains, networks).
NAMESPACE = "https://kvmctl.dev/xmlns/resource/v1"
# A per-project ownership record volume in each pool (pools and volumes have no metadata).
RECORD_PREFIX = "kvmctl-owner-"


@unique
class Kind(StrEnum):
    """A kind of object kvmctl plans; the values are the manifests' `kind` strings."""

    POOL = "StoragePool"
    IMAGE = "Image"
    DISK = "Disk"
    SEED = "CloudInitSeed"  # not a manifest kind: a VM's cloudInit becomes one
    NETWORK = "Network"
    VM = "VirtualMachine"
    SNAPSHOT = "Snapshot"  # a VM's snapshot the manifests declare (immutable)


# The one table of order. Lower levels are created first and deleted last; kinds on one level
# never depend on each other, so apply runs them in parallel.
LEVEL: dict[Kind, int] = {Kind.POOL: 0, Kind.IMAGE: 1, Kind.DISK: 2, Kind.SEED: 2,
                          Kind.NETWORK: 3, Kind.VM: 4, Kind.SNAPSHOT: 5}
ORDER: tuple[Kind, ...] = tuple(sorted(LEVEL, key=lambda k: (LEVEL[k], list(Kind).index(k))))
# The project file's kind: it configures a run (hosts, project name), it declares no object.
PROJECT_KIND = "Project"
PROJECT_FILE = "kvmctl.yaml"
# What a manifest document may declare, in that order.
MANIFEST_KINDS: tuple[Kind, ...] = tuple(k for k in ORDER if k is not Kind.SEED)


@unique
class SnapshotOrigin(StrEnum):
    """Why kvmctl took a snapshot: what may remove it again."""

    DECLARED = "declared"  # a Snapshot document: --prune, once the document is gone
    POLICY = "policy"  # a VM's spec.snapshots: its retention
    MANUAL = "manual"  # `kvmctl snapshot create`: only `kvmctl snapshot delete`


def snapshot_mark(project: str, origin: SnapshotOrigin, spec: str = "",
                  quiesced: bool = False) -> str:
    """kvmctl's ownership line, the last of a snapshot's description (snapshots have no
    metadata element): `kvmctl: project=P origin=O [spec=H] [quiesced]`."""
    return (f"kvmctl: project={project} origin={origin}" + (f" spec={spec}" if spec else "")
            + (" quiesced" if quiesced else ""))


def ref(kind: Kind | str, name: str) -> str:
    """`KIND/NAME`, how plans, targets and errors name an object."""
    return f"{kind}/{name}"


def known_kind(text: str) -> Kind | str:
    """`text` as a Kind when it names one; read from the host, where anything may be written."""
    try:
        return Kind(text)
    except ValueError:
        return text


def pool_uuid(project: str, name: str) -> str:
    """The uuid of a pool kvmctl creates for `project`: its definition is its mark until its
    ownership record is written (libvirt 9.0 has no metadata for pools)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{NAMESPACE}#pool/{project}/{name}"))
