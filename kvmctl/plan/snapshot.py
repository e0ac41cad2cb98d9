"""Planning declared snapshots (the Snapshot kind) and pruning the ones whose documents are gone.

A Snapshot is taken once and never changed: a spec that no longer matches the digest in the
mark of the snapshot taken from it is an error, not a replace (a new name takes a new one).
Only snapshots this project took from a Snapshot document are pruned; a policy's snapshots go
by its retention (sync/snapshots.py), a `kvmctl snapshot create` one only by hand.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from ..host import facts
from ..host.state import LiveDomain, LiveSnapshot, fingerprint
from ..kinds import Kind, SnapshotOrigin, ref
from ..manifest.model import Snapshot
from .context import Context
from .steps import CreateSnapshot, DeleteSnapshot
from .types import Change, ChangeClass, FieldDiff


def plan_snapshot(ctx: Context, snap: Snapshot) -> Change:
    name, project = snap.meta.name, ctx.opts.project
    want = ctx.desired.snapshots[name]
    deps = (ref(Kind.VM, snap.vm),)
    dom = ctx.live.domains.get(snap.vm)
    live = _find(dom, name)
    if live is None:
        if dom is not None:
            why = facts.internal_refusal(dom.inactive_xml, dom.checkpoints)
            if why:
                ctx.error(snap.meta, f"VM {snap.vm} cannot be snapshotted: {why}")
        how = "with the guest's memory" if want.memory else "of the disks (VM stopped)"
        return Change(Kind.SNAPSHOT, name, ChangeClass.CREATE,
                      (f"new snapshot of VM {snap.vm}, {how}",),
                      (FieldDiff("vm", None, snap.vm), FieldDiff("memory", None, want.memory)),
                      (CreateSnapshot(snap.vm, name, want.xml, want.memory, want.quiesce),),
                      depends=deps)
    fp = fingerprint(snap.vm, live.name, live.created)
    if live.project != project or live.origin is not SnapshotOrigin.DECLARED:
        who = (f"project {live.project!r} ({live.origin})" if live.project
               else "someone else (not kvmctl)")
        if live.project == project:
            who = f"this project, not from a Snapshot document ({live.origin})"
        ctx.error(snap.meta, f"VM {snap.vm} already has a snapshot {name!r}, taken by {who}: "
                             "kvmctl never takes it over; give the Snapshot another name")
    elif live.spec != want.spec:
        ctx.error(snap.meta, "a Snapshot is immutable, and this one's spec changed since it "
                             f"was taken ({_when(live)}): give the changed one a new name (the "
                             "old one is deleted by --prune once its document is gone)")
    return Change(Kind.SNAPSHOT, name, ChangeClass.NOOP, fingerprint=fp, depends=deps)


def prune_snapshots(ctx: Context, in_scope: Callable[[str, str], bool]) -> list[Change]:
    """Deletes of the declared snapshots of this project's VMs whose documents are gone (a
    Snapshot is its VM and its name: one whose document now names another VM goes too)."""
    project = ctx.opts.project
    declared = {(s.vm, s.meta.name) for s in ctx.m.snapshots}
    out = []
    for dom in ctx.live.domains.values():
        if dom.owner is None or dom.owner.project != project:
            continue  # a snapshot's mark alone never makes it ours: its VM must be too
        for snap in dom.taken:
            if snap.project != project or snap.origin is not SnapshotOrigin.DECLARED \
                    or (dom.name, snap.name) in declared:
                continue
            if not in_scope(Kind.SNAPSHOT, snap.name):
                continue
            out.append(Change(Kind.SNAPSHOT, snap.name, ChangeClass.DELETE,
                              (f"no longer in the manifests (of VM {dom.name}, {_when(snap)})",),
                              steps=(DeleteSnapshot(dom.name, snap.name),),
                              fingerprint=fingerprint(dom.name, snap.name, snap.created)))
    return out


def snapshot_loss(count: int, what: str = "deleting it") -> str:
    """Why a change is blocked: the snapshots it would destroy."""
    return (f"has {count} snapshot{'s' if count != 1 else ''}: {what} loses them "
            "(--allow-snapshot-loss)")


def snapshot_holders(ctx: Context, pool: str, volume: str) -> list[tuple[str, int]]:
    """(VM, snapshot count) of the VMs with snapshots whose definition uses this volume: an
    internal snapshot lives inside it, and goes with it."""
    out = []
    for dom in ctx.live.domains.values():
        if not dom.snapshots:
            continue
        for value in facts.domain_facts(dom.inactive_xml, ctx.resolve_volume).values():
            if isinstance(value, facts.DiskFact) and value.source == (pool, volume):
                out.append((dom.name, dom.snapshots))
                break
    return out


def snapshots_in(ctx: Context, pool: str, volume: str,
                 leaving: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, int]]:
    """(VM, count) of the snapshots whose kept definition names this volume: their data is
    inside it, whether or not the VM's present definition still uses it. VMs in `leaving`
    (deleted by the same plan, with their snapshots) are left out."""
    out = []
    for dom in ctx.live.domains.values():
        if dom.name in leaving:
            continue
        n = sum(1 for s in dom.taken if s.domain_xml and any(
            isinstance(v, facts.DiskFact) and v.source == (pool, volume)
            for v in facts.domain_facts(s.domain_xml, ctx.resolve_volume).values()))
        if n:
            out.append((dom.name, n))
    return out


def _find(dom: LiveDomain | None, name: str) -> LiveSnapshot | None:
    return next((s for s in dom.taken if s.name == name), None) if dom else None


def _when(snap: LiveSnapshot) -> str:
    return "taken " + dt.datetime.fromtimestamp(snap.created, dt.UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC")
