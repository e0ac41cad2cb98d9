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
An overlay's base on the new host is verified (length and sha256, like a copy) before anything
is shut down or copied: the guest reads it there by the same path.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..host import facts
from ..host.state import LiveDomain, LiveState, LiveVolume, fingerprint, volume_fingerprint
from ..kinds import Kind, ref
from ..manifest.model import Disk, ManifestSet, VirtualMachine
from ..units import format_size
from .steps import (
    ClaimVolume,
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
    landings: set[str] = set()
    if view.read_only or source.read_only:
        problems.append(f"{vm_ref} is on {from_host!r} and goes to {to_host!r}, and this run "
                        "changes only the hosts given with --host: run it with both")
    if dom.snapshots:
        problems.append(
            f"{vm_ref} has {dom.snapshots} snapshot{'s' if dom.snapshots != 1 else ''} on "
            f"{from_host!r}: a move would lose them (libvirt's record of them stays behind); "
            "delete them first (kvmctl snapshot delete), or move it with kvmctl backup and "
            "restore --host")
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
    for _, vol in travelling:  # first of all: nothing is shut down or copied for a wrong base
        checks, why = _base_checks(vol, source, from_host, view, to_host)
        steps += checks
        problems += why
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
        for disk, vol in travelling:
            # The new host's own create of the Disk becomes the move's: claimed, then made by
            # the copy, which removes what it made if it fails. No empty volume is left there
            # to pass for the data when the move stops early.
            landing = next((c for c in view.plan.changes if c.ref == disk.meta.ref), None)
            create = next((st for st in (landing.steps if landing else ())
                           if isinstance(st, CreateVolume)), None)
            if create is not None:
                steps.append(OnHost(to_host, ClaimVolume(create.pool, create.volume,
                                                         create.owner)))
                landings.add(disk.meta.ref)
            steps.append(CopyVolume(from_host, vol.pool, vol.name, to_host, disk.pool,
                                    create.xml if create else view.volume_xml.get(
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
    # The originals go before the definition that names them: a VM still defined on its old
    # host is the mark of a move not finished, whatever a kill left of its volumes.
    gone = [vol for _, vol in travelling]
    gone += _owned_volumes(source.live, project, Kind.SEED, name)
    for vol in gone:
        steps.append(OnHost(from_host, DeleteVolume(vol.pool, vol.name)))
        handled.add((from_host, vol.path))
    steps.append(OnHost(from_host, DeleteDomain(name, float(vm.shutdown_timeout))))
    steps += later
    drop[to_host].add(vm_ref)  # its create (or update) runs inside the move
    drop[from_host] |= {vm_ref, ref(Kind.SEED, name)} | {d.meta.ref for d, _ in travelling}
    if problems and not blocked:
        blocked = "; ".join(problems)
    if not blocked:  # a blocked move's Disk creates stay, blocked, in the new host's plan
        drop[to_host] |= landings
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
    elsewhere = _holders(project, name, disk.pool, views, exclude=(from_host, to_host))
    if elsewhere:
        out.append(f"Disk/{name} may also have data on {_listing(elsewhere)}: kvmctl moves "
                   "one copy, not one of several")
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
    if vol.backing_path and _backing_on(vol.backing_path, view) is None:
        out.append(f"Disk/{name} is an overlay of {vol.backing_path}, which {to_host!r} does "
                   "not have (nor will its plan create it at that path): put its Image on "
                   f"{to_host!r} in a pool with the same path")
    return out


def _backing_on(path: str, view: HostView) -> tuple[str, str] | None:
    """(pool, volume) the host has, or its own plan creates, at `path`."""
    found = facts.volume_resolver(view.live)(path)
    if found is not None:
        return found
    for image in view.manifest.images:
        pool = view.manifest.find(Kind.POOL, image.pool)
        folder = getattr(pool, "path", None) or (view.live.pools[image.pool].path
                                                 if image.pool in view.live.pools else "")
        if folder and posixpath.join(folder, image.volume) == path:
            return image.pool, image.volume
    return None


def _base_checks(disk_vol: LiveVolume, source: HostView, from_host: str, view: HostView,
                 to_host: str) -> tuple[list[MoveStep], list[str]]:
    """An overlay reads its base by path: the base at that path on the new host must be the
    same bytes as the old host's, verified before any original is deleted."""
    if not disk_vol.backing_path:
        return [], []
    here = facts.volume_resolver(source.live)(disk_vol.backing_path)
    there = _backing_on(disk_vol.backing_path, view)
    if here is None or there is None:
        return [], [f"the base {disk_vol.backing_path} of {disk_vol.name} is not a volume on "
                    f"{from_host!r} and {to_host!r}: kvmctl cannot verify it is the same"]
    if here[1] != there[1]:
        return [], [f"the base of {disk_vol.name} is {here[1]} on {from_host!r} and "
                    f"{there[1]} on {to_host!r}"]
    return [VerifyCopy(from_host, here[0], here[1], to_host, there[0])], []


def _leftovers(project: str, views: Mapping[str, HostView], drop: dict[str, set[str]],
               handled: set[tuple[str, str]]) -> list[Change]:
    """Seeds a killed move left on the old host after the VM left it (a seed is made from the
    manifests again on the new host, so nothing needs verifying). A Disk volume is never such
    a leftover: a move deletes the originals before it undefines the VM there."""
    out: list[Change] = []
    for to_host, view in views.items():
        if view.read_only:
            continue
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


def _holders(project: str, disk: str, pool: str, views: Mapping[str, HostView],
             exclude: tuple[str, ...]) -> dict[str, str]:
    """Hosts (not in `exclude`) that hold, or may hold, a Disk's data: host -> why."""
    out = {}
    for h, other in views.items():
        if h in exclude:
            continue
        if _owned_volumes(other.live, project, Kind.DISK, disk):
            out[h] = "a volume of it"
        elif pool in other.live.pools and not other.live.pools[pool].active:
            out[h] = f"pool {pool} is stopped there, so what it holds is unknown"
    return out


def _listing(holders: Mapping[str, str]) -> str:
    return ", ".join(f"{h!r} ({why})" for h, why in sorted(holders.items()))


def _block_empty_disks(project: str, host: str, view: HostView, views: Mapping[str, HostView],
                       plan: Plan, stalled: set[tuple[str, str]]) -> Plan:
    """Changes that would put a VM on one of two copies of a Disk, outside a move that carries
    it: its create while another host holds (or may hold) its data, and a VM's create on this
    host while another host holds a copy too (a move that stopped, a copy made by hand). Also
    the creates of a blocked move (`stalled`: (host, VM name)), which wait for it. Refused,
    with what needs them, so that no VM starts on an empty or a stale disk."""
    changes = []
    refused: set[str] = set()  # refs whose dependants wait
    two_copies: set[str] = set()  # of those, Disks that exist here and on another host too
    disks = {d.meta.name: d for d in view.manifest.disks}
    for c in plan.changes:
        disk = disks.get(c.name) if c.kind is Kind.DISK else None
        if disk is not None and c.change_class is ChangeClass.CREATE and not c.blocked:
            carrier = _carrier(c.name, host, view, views, project)
            holders = _holders(project, c.name, disk.pool, views, exclude=(host,))
            if carrier is not None and (host, carrier) in stalled:
                c = replace(c, steps=(), blocked=(
                    f"waits for the move of {ref(Kind.VM, carrier)} to {host!r}, which is "
                    "blocked"))
                refused.add(c.ref)
            elif carrier is None and holders:
                c = replace(c, steps=(), blocked=(
                    f"Disk/{c.name} holds data on {_listing(holders)}: kvmctl "
                    f"does not create it empty on {host!r}; move its VM with it (spec.host), "
                    "or delete it there first"))
                refused.add(c.ref)
        elif disk is not None and not c.blocked and _holders(
                project, c.name, disk.pool, views, exclude=(host,)) and _carrier(
                c.name, host, view, views, project) is None:
            two_copies.add(c.ref)  # its VM's create waits; the volume itself is left alone
            refused.add(c.ref)
        changes.append(c)
    out = []
    for c in changes:
        needs = set(c.depends) & refused
        if c.steps and not c.blocked and needs and (
                needs - two_copies or c.change_class is ChangeClass.CREATE):
            why = ", ".join(sorted(needs))
            c = replace(c, steps=(), blocked=(
                f"needs {why}, which is blocked" if needs - two_copies else
                f"{why} has a copy on another host too (a move that did not finish, or made "
                "by hand): kvmctl does not start a VM on one of two copies; delete the one "
                "that is not the data"))
        out.append(c)
    return replace(plan, changes=tuple(out))


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
