"""`kvmctl snapshot create|list|revert|delete`: snapshots of one VM, made and undone on request.

Imperative, never desired state: a revert asks first (or -y), takes a safety snapshot first
unless told not to, and leaves the VM as the snapshot recorded it (running or stopped); the next
plan compares that with the manifests like any other state. Only snapshots this project made
(kvmctl's mark in the description) are deleted unless --force says otherwise. What libvirt 9.0
cannot do is refused before anything changes, saying why and what would work
(host/snapshots.py).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from .errors import HypervisorError, PlanError, UsageError
from .host.facts import internal_refusal
from .host.hypervisor import Hypervisor
from .host.snapshots import mark
from .host.state import LiveSnapshot
from .kinds import Kind, SnapshotOrigin
from .xmltext import first_non_xml_char

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,99}$")


@dataclass(frozen=True)
class Reverted:
    snapshot: LiveSnapshot
    state: str  # the VM's state afterwards
    safety: str | None  # the safety snapshot taken first


def default_name(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("kvmctl-%Y%m%d-%H%M%S")


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UsageError(f"snapshot name {name!r}: letters, digits and _ . : + - only, "
                         "at most 100, starting with a letter or digit")
    return name


def _owned_vm(hv: Hypervisor, vm: str, project: str) -> None:
    found = hv.identity(Kind.VM, vm)
    if found is None:
        raise UsageError(f"no VM {vm!r} on {hv.uri}")
    _, owner = found
    if owner is None or owner.project != project:
        who = f"project {owner.project!r}" if owner else "nobody (not made by kvmctl)"
        raise PlanError(f"VM {vm!r} belongs to {who}, not to project {project!r}: kvmctl "
                        "snapshots only its own VMs")


def create(hv: Hypervisor, vm: str, project: str, name: str | None = None,
           description: str = "", memory: bool = True, quiesce: bool = False,
           origin: SnapshotOrigin = SnapshotOrigin.MANUAL) -> LiveSnapshot:
    """A new internal snapshot of the project's VM; PlanError when the VM cannot hold one."""
    from .render.definitions import snapshot_xml
    _owned_vm(hv, vm, project)
    name = check_name(name or default_name())
    if first_non_xml_char(description) >= 0:
        raise UsageError("the description holds a character XML cannot carry")
    why = internal_refusal(hv.domain_xml(vm), hv.checkpoint_count(vm))
    if why:
        raise PlanError(f"VM {vm!r} cannot be snapshotted: {why}")
    if any(s.name == name for s in hv.snapshots(vm)):
        raise UsageError(f"VM {vm!r} already has a snapshot {name!r}")
    running = hv.domain_state(vm) == "running"
    if running and not memory:
        raise PlanError(f"VM {vm!r} runs: an internal snapshot of a running guest holds its "
                        "memory (QEMU's savevm); stop it first for one without")
    xml = snapshot_xml(name, mark(description, project, origin, quiesce), running)
    hv.create_snapshot(vm, xml, quiesce=quiesce)
    made = next((s for s in hv.snapshots(vm) if s.name == name), None)
    if made is None:
        raise HypervisorError(f"snapshot {name!r} of {vm!r} was created but is gone again "
                              "(deleted meanwhile?)")
    return made


def listed(hv: Hypervisor, vm: str) -> list[LiveSnapshot]:
    if hv.identity(Kind.VM, vm) is None:
        raise UsageError(f"no VM {vm!r} on {hv.uri}")
    return hv.snapshots(vm)


def revert(hv: Hypervisor, vm: str, project: str, name: str, safety: bool = True) -> Reverted:
    _owned_vm(hv, vm, project)
    target = next((s for s in hv.snapshots(vm) if s.name == name), None)
    if target is None:
        raise UsageError(f"VM {vm!r} has no snapshot {name!r}")
    if not target.revertible:
        raise PlanError(f"snapshot {name!r} of {vm!r} is external: reverting external "
                        "snapshots needs libvirt 9.9 (this host has an older one)")
    taken = None
    if safety:
        taken = create(hv, vm, project, f"{default_name()}-before-revert",
                       f"taken by kvmctl before reverting to {name}").name
    state = hv.revert_snapshot(vm, name, thaw=target.quiesced)
    return Reverted(target, state, taken)


def delete(hv: Hypervisor, vm: str, project: str, name: str, force: bool = False) -> None:
    """Delete a snapshot of the project's VM; --force only overrides the snapshot's mark, never
    whose VM it is."""
    _owned_vm(hv, vm, project)
    target = next((s for s in listed(hv, vm) if s.name == name), None)
    if target is None:
        raise UsageError(f"VM {vm!r} has no snapshot {name!r}")
    if target.project != project and not force:
        who = f"project {target.project!r}" if target.project else "someone else"
        raise PlanError(f"snapshot {name!r} of {vm!r} was made by {who}, not by project "
                        f"{project!r}: not deleted (--force deletes it anyway)")
    hv.delete_snapshot(vm, name)
