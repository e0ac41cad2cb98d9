"""Moves between hosts: a VM whose `host` changed, planned as one `move` change.

Each host was planned on its own first (plan/__init__): there, the VM is a create on its new
host and an object the manifests no longer place on its old one. This module finds such VMs
among the hosts read and turns the two halves into one move:

1. on the old host, a running VM is shut down gracefully;
2. each of its Disks is streamed into the volume the new host's own plan created (and claimed)
   for it, and read back: length and sha256 must equal the original's;
3. the VM is defined on the new host, from the new host's create steps;
4. only then is it undefined on the old host, and its disks and seed deleted there;
5. last, it is started on the new host (if its manifest says running).

A move killed anywhere leaves the VM whole on one host: before step 3 the old host still has
everything (a copy left on the new host is overwritten by the next move); from step 3 on, the
new host has verified copies that nothing has started on, and the next plan finishes the move
(the VM defined on both hosts, or volumes left on the old one): the copies are verified once
more before an original goes, and the VM starts after.

A move is blocked (planned, not run, with the reason) whenever the copy could not stand for the
original: a host this run does not change (--host), a protected VM or disk, a disk other VMs
share, a disk whose pool is stopped on the old host, a format or size change at the same time,
a volume on the new host that is not the project's, an overlay whose base the new host lacks.
"""

from __future__ import annotations

import posixpath
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
    StartDomain,
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
    # Read, but not changed by this run (not among --host): moves from or to it are blocked.
    read_only: bool = False


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
    problems: list[str] = []
    if view.read_only or source.read_only:
        problems.append(f"{vm_ref} is on {from_host!r} and goes to {to_host!r}, and this run "
                        "changes only the hosts given with --host: run it with both")
    if vm.protect:
        problems.append("protect: true, and a move deletes the VM on its old host once the "
                        "copy is verified; set protect: false to move it")
    for att in vm.disks:
        disk = view.manifest.find(Kind.DISK, att.disk)
        if not isinstance(disk, Disk):
            continue
        problems += _disk_problems(project, vm, disk, from_host, to_host, views)
        found = _owned_volumes(source.live, project, Kind.DISK, disk.meta.name)
        if found:
            travelling.append((disk, found[0]))
    if travelling:
        reasons.append("disks travel (copied through libvirt, verified by sha256): " + ", ".join(
            f"{d.meta.name} ({format_size(v.capacity_bytes)})" for d, v in travelling))
    for disk, vol in travelling:
        problems += _copy_problems(project, disk, vol, from_host, to_host, view)
        landing = next((c for c in view.plan.changes if c.ref == disk.meta.ref), None)
        if landing is not None and landing.blocked:  # the volume the copy lands in
            problems.append(f"Disk/{disk.meta.name} on {to_host!r}: {landing.blocked}")
    vm_change = next((c for c in view.plan.changes if c.ref == vm_ref), None)
    # The VM starts on its new host only after it left the old one: until then the copies
    # stay equal to the originals, so a move killed in between is finished (verified again)
    # by the next apply instead of finding two different disks.
    later = [OnHost(to_host, st) for st in (vm_change.steps if vm_change else ())
             if isinstance(st, StartDomain)]
    if not arrived:
        if dom.running:
            reasons.append(f"running on {from_host!r}: shut down gracefully, moved, then "
                           f"{'started' if vm.state == 'running' else 'left stopped'} on "
                           f"{to_host!r} (a live migration needs storage both hosts share, "
                           "which kvmctl does not assume)")
            if vm.on_restart_needed == "fail":
                problems.append("the VM runs and onRestartNeeded is fail: a move shuts it "
                                "down; stop it first or allow the restart")
            steps.append(OnHost(from_host, ShutdownDomain(name, float(vm.shutdown_timeout))))
        created = {st.volume: st.xml for c in view.plan.changes for st in c.steps
                   if isinstance(st, CreateVolume)}
        for disk, vol in travelling:
            steps.append(CopyVolume(from_host, vol.pool, vol.name, to_host, disk.pool,
                                    created.get(disk.volume) or view.volume_xml.get(
                                        disk.volume, "")))
        if vm_change is not None:
            if vm_change.blocked:
                problems.append(vm_change.blocked)
            steps += [OnHost(to_host, st) for st in vm_change.steps
                      if not isinstance(st, StartDomain)]
    else:
        if dom.running:
            problems.append(f"{vm_ref} runs on {from_host!r} and is defined on {to_host!r}: "
                            "stop the one that should not run; kvmctl then removes it from "
                            f"{from_host!r}")
        steps += [VerifyCopy(from_host, vol.pool, vol.name, to_host, disk.pool)
                  for disk, vol in travelling]
        if vm_change is not None and vm_change.steps:
            if vm_change.blocked:
                problems.append(vm_change.blocked)
            steps_after = [OnHost(to_host, st) for st in vm_change.steps
                           if not isinstance(st, StartDomain)]
            later = steps_after + later
    steps.append(OnHost(from_host, DeleteDomain(name, float(vm.shutdown_timeout))))
    gone = [vol for _, vol in travelling]
    gone += _owned_volumes(source.live, project, Kind.SEED, name)
    for vol in gone:
        steps.append(OnHost(from_host, DeleteVolume(vol.pool, vol.name)))
        handled.add((from_host, vol.path))
    steps += later
    drop[to_host].add(vm_ref)  # its create (or update) runs inside the move
    drop[from_host] |= {vm_ref, ref(Kind.SEED, name)} | {d.meta.ref for d, _ in travelling}
    if problems and not blocked:
        blocked = "; ".join(problems)
    fp = fingerprint(dom.inactive_xml, dom.state, vm_change.fingerprint if vm_change else "",
                     [volume_fingerprint(v) for v in gone])
    return Change(Kind.VM, name, ChangeClass.MOVE, tuple(reasons), (), (), blocked,
                  fingerprint=fp, host=to_host, from_host=from_host, move_steps=tuple(steps))


def _disk_problems(project: str, vm: VirtualMachine, disk: Disk, from_host: str, to_host: str,
                   views: Mapping[str, HostView]) -> list[str]:
    """Why a Disk of a moving VM cannot travel with it."""
    out = []
    name = disk.meta.name
    source = views[from_host].live
    if not _owned_volumes(source, project, Kind.DISK, name):
        pool = source.pools.get(disk.pool)
        if pool is None or not pool.active:
            out.append(f"Disk/{name}'s pool {disk.pool} is not running on {from_host!r}, so "
                       "its data cannot be read there: start the pool first")
    others = sorted({v.meta.name for h in views.values() for v in h.manifest.vms
                     if v.meta.name != vm.meta.name
                     and any(att.disk == name for att in v.disks)})
    if others:
        out.append(f"Disk/{name} is also used by {', '.join(others)}: a disk several VMs "
                   "share does not move")
    if disk.protect:
        out.append(f"Disk/{name} has protect: true, and a move deletes the original once the "
                   "copy is verified; set protect: false to move it")
    return out


def _copy_problems(project: str, disk: Disk, vol: LiveVolume, from_host: str, to_host: str,
                   view: HostView) -> list[str]:
    """Why the copy of `vol` could not stand for it on the new host."""
    out = []
    name = disk.meta.name
    if vol.format != disk.format:
        out.append(f"Disk/{name} is {vol.format} on {from_host!r} and {disk.format} in the "
                   "manifests: a move copies it as it is; move it first, change its format "
                   "afterwards")
    if vol.capacity_bytes != disk.size_bytes:
        out.append(f"Disk/{name} is {format_size(vol.capacity_bytes)} on {from_host!r} and "
                   f"{format_size(disk.size_bytes)} in the manifests: move it first, resize "
                   "it afterwards")
    there = view.live.volume(disk.pool, disk.volume)
    if there is not None and (there.owner is None or there.owner.project != project):
        out.append(f"{disk.pool}/{disk.volume} exists on {to_host!r} and is not this "
                   "project's: the copy would overwrite it")
    if vol.backing_path and not _backing_on(vol.backing_path, view):
        out.append(f"Disk/{name} is an overlay of {vol.backing_path}, which {to_host!r} does "
                   "not have (nor will its plan create it at that path): put its Image on "
                   f"{to_host!r} in a pool with the same path")
    return out


def _backing_on(path: str, view: HostView) -> bool:
    """Whether the host has, or its own plan creates, a volume at `path`."""
    if any(v.path == path for p in view.live.pools.values() for v in p.volumes):
        return True
    for image in view.manifest.images:
        pool = view.manifest.find(Kind.POOL, image.pool)
        folder = getattr(pool, "path", None) or (view.live.pools[image.pool].path
                                                 if image.pool in view.live.pools else "")
        if folder and posixpath.join(folder, image.volume) == path:
            return True
    return False


def _leftovers(project: str, views: Mapping[str, HostView], drop: dict[str, set[str]],
               handled: set[tuple[str, str]]) -> list[Change]:
    """Volumes a killed move left on the old host after the VM left it: a Disk with a verified
    copy on its new host, a seed. Deleted once the copy verifies again."""
    out: list[Change] = []
    for to_host, view in views.items():
        if view.read_only:
            continue
        for disk in view.manifest.disks:
            there = view.live.volume(disk.pool, disk.volume)
            mine = there is not None and there.owner is not None \
                and there.owner.project == project
            for from_host, other in views.items():
                if from_host == to_host:
                    continue
                for vol in _owned_volumes(other.live, project, Kind.DISK, disk.meta.name):
                    if (from_host, vol.path) in handled or not mine or other.read_only:
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
                    if (from_host, vol.path) in handled or other.read_only:
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
