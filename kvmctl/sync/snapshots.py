"""Snapshot policies (a VM's spec.snapshots): which snapshots are due, which have expired, and a
run that takes and removes them (`kvmctl snapshot run`, and the controller after each round).

Only snapshots this project's policy took (their mark: origin=policy) count toward a policy and
are ever removed by it, oldest first; never one a Snapshot document declares (by name), never
one taken by hand. `decide` is pure; `run_policies` acts on the hosts of a Deployment.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..engine import Session
from ..errors import KvmctlError
from ..host.state import LiveSnapshot
from ..kinds import SnapshotOrigin
from ..manifest.checks import policy_name
from ..manifest.model import SnapshotPolicy
from ..schedule import Window, zone

# A cron policy looks back this far for its latest firing (longer than any sane period).
_LOOKBACK_S = 400 * 86400


@dataclass(frozen=True)
class Decision:
    take: str | None  # the name of the snapshot to take now, None: none is due
    remove: tuple[str, ...]  # this policy's snapshots that expire, oldest first
    why: str  # why one is taken, or why not


@dataclass(frozen=True)
class PolicyRun:
    """What a run did for one VM."""

    host: str
    vm: str
    took: str | None
    removed: tuple[str, ...]
    why: str
    error: str | None = None


def policy_snapshots(taken: Iterable[LiveSnapshot], project: str,
                     declared: frozenset[str]) -> list[LiveSnapshot]:
    """The snapshots this project's policy took of a VM, oldest first."""
    return sorted((s for s in taken if s.project == project
                   and s.origin is SnapshotOrigin.POLICY and s.name not in declared),
                  key=lambda s: (s.created, len(s.name), s.name))  # name-2 before name-10


def due(policy: SnapshotPolicy, newest: LiveSnapshot | None, now: dt.datetime) -> str | None:
    """Why a snapshot is due now (None: not yet)."""
    if newest is None:
        return "the policy has no snapshot yet"
    age = now.timestamp() - newest.created
    if policy.every_s is not None:
        if age >= policy.every_s:
            return f"the newest is {_age(age)} old (every {_age(policy.every_s)})"
        return None
    assert policy.schedule is not None
    fired = Window.parse(policy.schedule, _LOOKBACK_S, policy.timezone).opened_at(now)
    if fired is not None and fired.timestamp() > newest.created:
        return f"{policy.schedule!r} fired at {fired.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    return None


def decide(policy: SnapshotPolicy, vm: str, running: bool, taken: list[LiveSnapshot],
           project: str, declared: frozenset[str], now: dt.datetime,
           ignore_schedule: bool = False) -> Decision:
    mine = policy_snapshots(taken, project, declared)
    take: str | None = None
    why = ""
    if not running and not policy.when_stopped:
        why = "the VM is stopped (whenStopped: false)"
    else:
        why = "asked to (--ignore-schedule)" if ignore_schedule else (
            due(policy, mine[-1] if mine else None, now) or "")
        if why:
            take = _free_name(policy_name(policy.name, vm, now.astimezone(zone(policy.timezone))),
                              {s.name for s in taken} | declared)
        else:
            why = "not due yet"
    kept = [s.name for s in mine] + ([take] if take else [])
    created = {s.name: s.created for s in mine}
    remove: list[str] = []
    if policy.keep is not None and len(kept) > policy.keep:
        remove = kept[:len(kept) - policy.keep]
    if policy.keep_for_s is not None:
        limit = now.timestamp() - policy.keep_for_s
        remove += [n for n in kept if n != take and n not in remove and created[n] < limit]
    if take is None and kept:  # nothing new (a stopped VM): the newest stays, whatever its age
        remove = [n for n in remove if n != kept[-1]]
    order = {n: i for i, n in enumerate(kept)}
    return Decision(take, tuple(sorted(remove, key=order.__getitem__)), why)


def _free_name(name: str, used: set[str]) -> str:
    if name not in used:
        return name
    n = 2
    while f"{name}-{n}" in used:
        n += 1
    return f"{name}-{n}"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def run_policies(sessions: Mapping[str, Session], project: str, now: dt.datetime | None = None,
                 ignore_schedule: bool = False, only_vms: tuple[str, ...] = (),
                 dry_run: bool = False,
                 progress: Callable[[PolicyRun], None] | None = None) -> list[PolicyRun]:
    """Run every snapshot policy of the sessions' manifests on their hosts. A VM that fails
    is reported and the others still run."""
    from .. import snapshot as snapshots  # the imperative commands take and delete
    now = now or dt.datetime.now(dt.UTC)
    out: list[PolicyRun] = []
    for host, session in sessions.items():
        declared = frozenset(s.meta.name for s in session.manifest.snapshots)
        for vm in session.manifest.vms:
            policy = vm.snapshot_policy
            if policy is None or (only_vms and vm.meta.name not in only_vms):
                continue
            name = vm.meta.name
            dom = session.live.domains.get(name)
            if dom is None or dom.owner is None or dom.owner.project != project:
                result = PolicyRun(host, name, None, (), "the VM does not exist yet (apply "
                                   "first)" if dom is None else "the VM is not this project's")
            else:
                try:
                    taken = session.hv.snapshots(name)
                    running = session.hv.domain_state(name) == "running"
                    d = decide(policy, name, running, taken, project, declared, now,
                               ignore_schedule)
                    if not dry_run:
                        if d.take:
                            snapshots.create(session.hv, name, project, d.take,
                                             f"taken by the snapshot policy of {name}",
                                             memory=running, origin=SnapshotOrigin.POLICY)
                        for old in d.remove:
                            session.hv.delete_snapshot(name, old)
                    result = PolicyRun(host, name, d.take, d.remove, d.why)
                except KvmctlError as exc:
                    result = PolicyRun(host, name, None, (), "failed", str(exc))
            out.append(result)
            if progress is not None:
                progress(result)
    return out
