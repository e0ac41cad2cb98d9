"""The typed steps of a plan: one frozen dataclass per hypervisor operation.

The planner decides everything a step needs and puts it in the step: the exact XML to define,
the one element to hot-plug or to add to a network, the size in bytes or KiB (the field's name
says which). apply dispatches on the step's type and parses nothing. `step_json` is the form the
golden plan cases compare, so a change to any step's argument or unit fails a case.
"""

from __future__ import annotations

import dataclasses
import re
from enum import StrEnum, unique
from typing import Any, Union

from ..kinds import Kind
from ..manifest.cloudinit import SeedContent


@unique
class NetworkCommand(StrEnum):
    ADD = "add"
    DELETE = "delete"


@unique
class NetworkSection(StrEnum):
    DHCP_HOST = "dhcp-host"
    DNS_HOST = "dns-host"
    DHCP_RANGE = "dhcp-range"


@dataclasses.dataclass(frozen=True)
class VolumeRef:
    pool: str
    volume: str


@dataclasses.dataclass(frozen=True)
class Attachment:
    """A running domain that uses a volume, and the target dev it has it as."""

    domain: str
    target: str


@dataclasses.dataclass(frozen=True)
class VolumeOwner:
    """What an ownership record says of a volume kvmctl claims."""

    kind: Kind
    name: str
    spec_hash: str
    protect: bool = False


# ---- pools --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CreatePool:
    """Define, build, start and claim a pool; undone if any of that fails."""

    name: str
    xml: str


@dataclasses.dataclass(frozen=True)
class StartPool:
    name: str


@dataclasses.dataclass(frozen=True)
class SetPoolAutostart:
    name: str
    on: bool


@dataclasses.dataclass(frozen=True)
class ClaimPool:
    name: str


@dataclasses.dataclass(frozen=True)
class DeletePool:
    name: str


# ---- volumes ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CreateVolume:
    """Claim, then create a volume (empty, an overlay, or a copy of `clone_of`), then grow a
    copy to `size_bytes` when libvirt made it smaller."""

    pool: str
    volume: str
    xml: str
    owner: VolumeOwner
    size_bytes: int
    clone_of: VolumeRef | None = None


@dataclasses.dataclass(frozen=True)
class ClaimVolume:
    pool: str
    volume: str
    owner: VolumeOwner


@dataclasses.dataclass(frozen=True)
class GrowVolume:
    """Grow a volume in place: through the running QEMUs that use it, else through libvirt."""

    pool: str
    volume: str
    size_bytes: int
    attached: tuple[Attachment, ...] = ()


@dataclasses.dataclass(frozen=True)
class DeleteVolume:
    pool: str
    volume: str


@dataclasses.dataclass(frozen=True)
class ImportImage:
    """Copy an image into a pool: from a file on the hypervisor host (`path`, with `xml`), or
    from a URL, downloaded and verified against `sha256` before anything is claimed."""

    pool: str
    volume: str
    format: str
    owner: VolumeOwner
    xml: str  # the volume of a host-file import; a download's size is known only after it
    path: str | None = None
    url: str | None = None
    sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class WriteSeed:
    """(Re)build a VM's cloud-init seed ISO from `content` and upload it into its volume."""

    pool: str
    volume: str
    owner: VolumeOwner
    content: SeedContent


# ---- networks -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DefineNetwork:
    name: str
    xml: str


@dataclasses.dataclass(frozen=True)
class StartNetwork:
    name: str


@dataclasses.dataclass(frozen=True)
class RestartNetwork:
    """Stop and start a network (its bridge, dnsmasq and NAT rules are made anew)."""

    name: str


@dataclasses.dataclass(frozen=True)
class SetNetworkAutostart:
    name: str
    on: bool


@dataclasses.dataclass(frozen=True)
class DeleteNetwork:
    name: str


@dataclasses.dataclass(frozen=True)
class UpdateNetwork:
    """Add or delete one entry of a network, live and in its definition (no restart)."""

    name: str
    command: NetworkCommand
    section: NetworkSection
    xml: str


@dataclasses.dataclass(frozen=True)
class ReplugNic:
    """Unplug a running guest's NIC (`nic_xml`, as it is now) and plug `plug_xml` back, so it
    joins a network that was just created again."""

    domain: str
    mac: str
    nic_xml: str
    plug_xml: str


# ---- domains ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DefineDomain:
    name: str
    xml: str
    # render.definitions.domain_digest and records.rendered_digest of the definition: recorded
    # with it once libvirt's copy is checked (host/records.py); "" records nothing. They change
    # with kvmctl's code, so step_json shows only whether there are any.
    digest: str = dataclasses.field(default="", metadata={"shown_as_set": True})
    rendered: str = dataclasses.field(default="", metadata={"shown_as_set": True})


@dataclasses.dataclass(frozen=True)
class SetDomainAutostart:
    name: str
    on: bool


@dataclasses.dataclass(frozen=True)
class StartDomain:
    name: str


@dataclasses.dataclass(frozen=True)
class ShutdownDomain:
    name: str
    timeout_s: float


@dataclasses.dataclass(frozen=True)
class RestartDomain:
    name: str
    timeout_s: float


@dataclasses.dataclass(frozen=True)
class DeleteDomain:
    """Shut down (powered off after `timeout_s`) and undefine; its disks stay."""

    name: str
    timeout_s: float


@dataclasses.dataclass(frozen=True)
class SetVcpusLive:
    name: str
    count: int


@dataclasses.dataclass(frozen=True)
class SetMemoryLive:
    name: str
    kib: int


@dataclasses.dataclass(frozen=True)
class SetMetadataLive:
    name: str
    xml: str


@dataclasses.dataclass(frozen=True)
class AttachDevice:
    name: str
    xml: str


@dataclasses.dataclass(frozen=True)
class DetachDevice:
    name: str
    xml: str


@dataclasses.dataclass(frozen=True)
class UpdateDevice:
    name: str
    xml: str


# ---- snapshots ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CreateSnapshot:
    """Take an internal snapshot of domain `vm` from `xml`; `memory` says whether the domain
    must be running (with memory) or shut off (without) when it is taken."""

    vm: str
    name: str
    xml: str
    memory: bool
    quiesce: bool = False


@dataclasses.dataclass(frozen=True)
class DeleteSnapshot:
    vm: str
    name: str


Step = Union[
    CreatePool, StartPool, SetPoolAutostart, ClaimPool, DeletePool,
    CreateVolume, ClaimVolume, GrowVolume, DeleteVolume, ImportImage, WriteSeed,
    DefineNetwork, StartNetwork, RestartNetwork, SetNetworkAutostart, DeleteNetwork,
    UpdateNetwork, ReplugNic,
    DefineDomain, SetDomainAutostart, StartDomain, ShutdownDomain, RestartDomain, DeleteDomain,
    SetVcpusLive, SetMemoryLive, SetMetadataLive, AttachDevice, DetachDevice, UpdateDevice,
    CreateSnapshot, DeleteSnapshot,
]
STEP_TYPES: tuple[type, ...] = Step.__args__  # type: ignore[attr-defined]
# Steps that change a running guest (the others change definitions, pools, volumes, networks).
GUEST_STEPS: tuple[type, ...] = (StartDomain, ShutdownDomain, RestartDomain, SetVcpusLive,
                                 SetMemoryLive, SetMetadataLive, AttachDevice, DetachDevice,
                                 UpdateDevice, ReplugNic)


@dataclasses.dataclass(frozen=True)
class RecordDefinition:
    """Upkeep, not a change: record with domain `name` that its persistent definition has no
    owned difference from `xml`, its rendered definition (host/records.py). A plan asks for it
    where it had to compare a definition in full and found it unchanged (no record yet, or one
    of another kvmctl version), so that the next plan need not."""

    name: str
    xml: str
    digest: str = dataclasses.field(default="", metadata={"shown_as_set": True})
    rendered: str = dataclasses.field(default="", metadata={"shown_as_set": True})


# ---- moves between hosts (run by apply/moves.py, which holds every host's executor) ---------

@dataclasses.dataclass(frozen=True)
class OnHost:
    """A step of a move, run on one host of the project."""

    host: str
    step: Step


@dataclasses.dataclass(frozen=True)
class CopyVolume:
    """Stream a volume from one host into its created (and claimed) volume on another, through
    libvirt only, then read the copy back: its length and sha256 must equal the source's."""

    from_host: str
    pool: str
    volume: str
    to_host: str
    to_pool: str
    xml: str


@dataclasses.dataclass(frozen=True)
class VerifyCopy:
    """Fail unless a volume and its copy on another host have the same length and sha256 (before
    the original is deleted by a move that an earlier apply left half-done)."""

    from_host: str
    pool: str
    volume: str
    to_host: str
    to_pool: str


MoveStep = Union[OnHost, CopyVolume, VerifyCopy]


def op_name(step: object) -> str:
    """`SetMemoryLive` -> `set_memory_live`: how steps are named in JSON and in messages."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(step).__name__).lower()


def step_json(step: Step | MoveStep) -> dict[str, Any]:
    """The step as plain JSON values: its operation and every field, by name."""
    if isinstance(step, OnHost):
        return {"op": op_name(step), "host": step.host, "step": step_json(step.step)}
    shown = _plain(dataclasses.asdict(step))
    for f in dataclasses.fields(step):
        if f.metadata.get("shown_as_set"):
            shown[f.name] = bool(shown[f.name])
    return {"op": op_name(step), **shown}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, StrEnum):
        return str(value)
    return value
