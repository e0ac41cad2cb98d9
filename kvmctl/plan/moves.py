"""Moves between hosts: a VM whose `host` changed, planned as one `move` change.

Each host was planned on its own first (plan/__init__): there, the VM is a create on its new
host and an object the manifests no longer place on its old one. This module finds such VMs
among the hosts read and turns the two halves into one move:

1. on the old host, a running VM is shut down gracefully;
2. each of its Disks is streamed into the volume the new host's own plan created (and claimed)
   for it, and read back: length and sha256 must equal the original's;
3. the VM is defined (and started, as its manifest says) on the new host, from the new host's
   create steps;
4. only then is it undefined on the old host, and its disks and seed deleted there.

A move killed anywhere leaves the VM whole on one host: before step 3 the old host still has
everything (a copy left on the new host is overwritten by the next move); from step 3 on, the
new host has verified copies, and the next plan finishes the move (the VM defined on both hosts,
or volumes left on the old one): the copies are verified once more before an original goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..host.state import LiveDomain, LiveState, LiveVolume, fingerprint, volume_fingerprint
from ..kinds import Kind, ref
from ..manifest.model import Disk, ManifestSet, VirtualMachine
from ..units import format_size
from .steps import (
    CopyVolume,
    CreateVolume,
    DeleteDomain,
    DeleteVolume,
    MoveStep,
    OnHost,
    ShutdownDomain,
    VerifyCopy,
)
from .types import Change, ChangeClass, Plan


@dataclass(frozen=True)
class HostView:
    """One host as planned on its own: what is placed there, what it has, its plan."""

    manifest: ManifestSet
    live: LiveState
    plan: Plan
    volume_xml: Mapping[str, str] = field(default_factory=dict)  # by volume name: its Disks'


def plan_moves(project: str, views: Mapping[str, HostView]
               ) -> tuple[dict[str, Plan], tuple[Change, ...]]:
    """Each host's plan without the halves of moves, and the moves."""
    drop: dict[str, set[str]] = {h: set() for h in views}
    moves: list[Change] = []
    handled: set[tuple[str, str]] = set()  # (host, volume path) a move already deletes
    for to_host, view in views.items():
        for vm in view.manifest.vms:
            sources = [h for h, other in views.items()
                       if h != to_host and _owned_domain(other.live, project, vm.meta.name)]
            if not sources:
                continue
            move = _move(project, vm, to_host, view, sources, views, drop, handled)
            moves.append(move)
    moves += _leftovers(project, views, drop, handled)
    plans = {h: replace(v.plan, changes=tuple(c for c in v.plan.changes
                                              if c.ref not in drop[h]))
             for h, v in views.items()}
    stalled = {(m.host, m.name) for m in moves if m.kind is Kind.VM and m.blocked}
    for h, v in views.items():
        plans[h] = _block_empty_disks(project, h, v, views, plans[h], stalled)
    return plans, tuple(moves)


def _owned_domain(live: LiveState, project: str, name: str) -> LiveDomain | None:
    dom = live.domains.get(name)
    if dom is not None and dom.owner is not None and dom.owner.project == project \
            and dom.owner.kind == Kind.VM:
        return dom
    return None


def _owned_volumes(live: LiveState, project: str, kind: Kind, name: str) -> list[LiveVolume]:
    return [v for p in live.pools.values() for v in p.volumes
            if v.owner is not None and v.owner.project == project and v.owner.kind == kind
            and v.owner.name == name]


def _move(project: str, vm: VirtualMachine, to_host: str, view: HostView,
          sources: list[str], views: Mapping[str, HostView], drop: dict[str, set[str]],
          handled: set[tuple[str, str]]) -> Change:
    name, vm_ref = vm.meta.name, vm.meta.ref
    from_host = sources[0]
    source = views[from_host]
    dom = _owned_domain(source.live, project, name)
    assert dom is not None
    arrived = _owned_domain(view.live, project, name) is not None
    reasons = [f"host changed from {from_host!r} to {to_host!r}" if not arrived else
               f"finish the move from {from_host!r}: the VM is already defined on {to_host!r}"]
    blocked: str | None = None
    if len(sources) > 1:
        blocked = (f"{vm_ref} is defined on several other hosts ({', '.join(sources)}): "
                   "remove the copies that should not stay by hand")
    steps: list[MoveStep] = []
    travelling: list[tuple[Disk, LiveVolume]] = []
    for att in vm.disks:
        disk = view.manifest.find(Kind.DISK, att.disk)
        if not isinstance(disk, Disk):
            continue
        found = _owned_volumes(source.live, project, Kind.DISK, disk.meta.name)
        if not found:
            continue
        vol = found[0]
        if vol.format != disk.format:
            blocked = blocked or (f"Disk/{disk.meta.name} is {vol.format} on {from_host!r} and "
                                  f"{disk.format} in the manifests: a move copies it as it is; "
                                  "move it first, change its format afterwards")
        travelling.append((disk, vol))
    if travelling:
        reasons.append("disks travel (copied through libvirt, verified by sha256): " + ", ".join(
            f"{d.meta.name} ({format_size(v.capacity_bytes)})" for d, v in travelling))
    vm_change = next((c for c in view.plan.changes if c.ref == vm_ref), None)
    if not arrived:
        if dom.running:
            reasons.append(f"running on {from_host!r}: shut down gracefully, moved, then "
                           f"{'started' if vm.state == 'running' else 'left stopped'} on "
                           f"{to_host!r} (a live migration needs storage both hosts share, "
                           "which kvmctl does not assume)")
            if vm.on_restart_needed == "fail":
                blocked = blocked or ("the VM runs and onRestartNeeded is fail: a move shuts it "
                                      "down; stop it first or allow the restart")
            steps.append(OnHost(from_host, ShutdownDomain(name, float(vm.shutdown_timeout))))
        created = {st.volume: st.xml for c in view.plan.changes for st in c.steps
                   if isinstance(st, CreateVolume)}
        for disk, vol in travelling:
            steps.append(CopyVolume(from_host, vol.pool, vol.name, to_host, disk.pool,
                                    created.get(disk.volume) or view.volume_xml.get(
                                        disk.volume, "")))
        if vm_change is not None:
            blocked = blocked or vm_change.blocked
            steps += [OnHost(to_host, st) for st in vm_change.steps]
    else:
        if dom.running:
            blocked = blocked or (f"{vm_ref} runs on {from_host!r} and is defined on {to_host!r}"
                                  f": stop the one that should not run; kvmctl then removes "
                                  f"it from {from_host!r}")
        steps += [VerifyCopy(from_host, vol.pool, vol.name, to_host, disk.pool)
                  for disk, vol in travelling]
    steps.append(OnHost(from_host, DeleteDomain(name, float(vm.shutdown_timeout))))
    gone = [vol for _, vol in travelling]
    gone += _owned_volumes(source.live, project, Kind.SEED, name)
    for vol in gone:
        steps.append(OnHost(from_host, DeleteVolume(vol.pool, vol.name)))
        handled.add((from_host, vol.path))
    if not arrived:
        drop[to_host].add(vm_ref)  # its create is the move's third step
    drop[from_host] |= {vm_ref, ref(Kind.SEED, name)} | {d.meta.ref for d, _ in travelling}
    fp = fingerprint(dom.inactive_xml, dom.state, vm_change.fingerprint if vm_change else "",
                     [volume_fingerprint(v) for v in gone])
    return Change(Kind.VM, name, ChangeClass.MOVE, tuple(reasons), (), (), blocked,
                  fingerprint=fp, host=to_host, from_host=from_host, move_steps=tuple(steps))


def _leftovers(project: str, views: Mapping[str, HostView], drop: dict[str, set[str]],
               handled: set[tuple[str, str]]) -> list[Change]:
    """Volumes a killed move left on the old host after the VM left it: a Disk with a verified
    copy on its new host, a seed. Deleted once the copy verifies again."""
    out: list[Change] = []
    for to_host, view in views.items():
        for disk in view.manifest.disks:
            there = view.live.volume(disk.pool, disk.volume)
            mine = there is not None and there.owner is not None \
                and there.owner.project == project
            for from_host, other in views.items():
                if from_host == to_host:
                    continue
                for vol in _owned_volumes(other.live, project, Kind.DISK, disk.meta.name):
                    if (from_host, vol.path) in handled or not mine:
                        continue
                    handled.add((from_host, vol.path))
                    drop[from_host].add(disk.meta.ref)
                    out.append(Change(
                        Kind.DISK, disk.meta.name, ChangeClass.MOVE,
                        (f"finish the move from {from_host!r}: the copy on {to_host!r} is "
                         "verified, then the original is deleted",),
                        fingerprint=volume_fingerprint(vol), host=to_host, from_host=from_host,
                        move_steps=(VerifyCopy(from_host, vol.pool, vol.name, to_host,
                                               disk.pool),
                                    OnHost(from_host, DeleteVolume(vol.pool, vol.name)))))
        for vm in view.manifest.vms:
            for from_host, other in views.items():
                if from_host == to_host or _owned_domain(other.live, project, vm.meta.name):
                    continue
                for vol in _owned_volumes(other.live, project, Kind.SEED, vm.meta.name):
                    if (from_host, vol.path) in handled:
                        continue
                    handled.add((from_host, vol.path))
                    drop[from_host].add(ref(Kind.SEED, vm.meta.name))
                    out.append(Change(
                        Kind.SEED, vm.meta.name, ChangeClass.MOVE,
                        (f"finish the move from {from_host!r}: the VM's old seed is deleted",),
                        fingerprint=volume_fingerprint(vol), host=to_host, from_host=from_host,
                        move_steps=(OnHost(from_host, DeleteVolume(vol.pool, vol.name)),)))
    return out


def _block_empty_disks(project: str, host: str, view: HostView, views: Mapping[str, HostView],
                       plan: Plan, stalled: set[tuple[str, str]]) -> Plan:
    """A Disk the new host would create empty while another host holds its data, outside any
    move (the VM already there, or no VM), or for a move that is blocked (`stalled`: (host,
    VM name)): refused, with what needs it, so that no VM starts on an empty disk and no empty
    claimed copy is left to pass for the data."""
    changes = []
    refused: set[str] = set()
    for c in plan.changes:
        if c.kind is Kind.DISK and c.change_class is ChangeClass.CREATE and not c.blocked:
            carrier = _carrier(c.name, host, view, views, project)
            holders = [h for h, other in views.items() if h != host
                       and _owned_volumes(other.live, project, Kind.DISK, c.name)]
            if carrier is not None and (host, carrier) in stalled:
                c = replace(c, steps=(), blocked=(
                    f"waits for the move of {ref(Kind.VM, carrier)} to {host!r}, which is "
                    "blocked"))
                refused.add(c.ref)
            elif carrier is None and holders:
                c = replace(c, steps=(), blocked=(
                    f"Disk/{c.name} holds data on {', '.join(repr(h) for h in holders)}: kvmctl "
                    f"does not create it empty on {host!r}; move its VM with it (spec.host), "
                    "or delete it there first"))
                refused.add(c.ref)
        changes.append(c)
    # What needs such a Disk (a VM's create or update attaching it) waits for it too.
    changes = [replace(c, steps=(), blocked=f"needs {', '.join(sorted(set(c.depends) & refused))}"
                                            ", which is blocked")
               if c.steps and not c.blocked and set(c.depends) & refused else c for c in changes]
    return replace(plan, changes=tuple(changes))


def _carrier(disk: str, host: str, view: HostView, views: Mapping[str, HostView],
             project: str) -> str | None:
    """The VM moving to `host` that carries this Disk (its create is where the copy lands)."""
    for vm in view.manifest.vms:
        if any(att.disk == disk for att in vm.disks) and any(
                h != host and _owned_domain(o.live, project, vm.meta.name)
                for h, o in views.items()) and not _owned_domain(view.live, project,
                                                                  vm.meta.name):
            return vm.meta.name
    return None
