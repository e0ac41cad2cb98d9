"""What a sync found and did, as values: per object its sync status and health, per project
its last sync and state. The controller's API, page, metrics, history and `kvmctl status` all
show these; nothing here talks to a host."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, unique
from typing import Any

# Re-exported: a sync names the commit it synced.
from ..schedule import WindowState as WindowState
from ..source.commit import Commit as Commit


@unique
class SyncStatus(StrEnum):
    """Whether an object is as git says (Argo CD's names)."""

    SYNCED = "Synced"
    OUT_OF_SYNC = "OutOfSync"  # the plan has a change for it that was not (yet) made
    FAILED = "Failed"  # its change was tried and failed
    PROGRESSING = "Progressing"  # its change was just made; the next round confirms it


@unique
class Health(StrEnum):
    HEALTHY = "Healthy"
    PROGRESSING = "Progressing"  # on its way (a VM booting, without its address yet)
    DEGRADED = "Degraded"  # exists, but not as it should work (a network inactive, ...)
    MISSING = "Missing"  # declared, absent on its host
    UNKNOWN = "Unknown"  # its host could not be read


@unique
class SyncResult(StrEnum):
    """The outcome of one reconcile of a project."""

    SYNCED = "synced"  # nothing to change
    APPLIED = "applied"  # changes made, all of them
    PARTIAL = "partial"  # some changes made, others wait (window, class, manual)
    OUT_OF_SYNC = "out-of-sync"  # changes found, none made (manual, no selfHeal, waiting)
    FAILED = "failed"  # invalid commit, plan error, unreachable host, a change failed
    SUSPENDED = "suspended"  # not reconciled: the project is suspended


@unique
class ProjectState(StrEnum):
    HEALTHY = "Healthy"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"  # a host unreachable, git unreachable, the last sync failed
    SUSPENDED = "Suspended"
    UNKNOWN = "Unknown"  # not reconciled yet


@dataclass(frozen=True)
class FieldChange:
    """One field an object differs in, as shown (sensitive values already masked)."""

    field: str
    old: str
    new: str


@dataclass(frozen=True)
class ObjectStatus:
    host: str
    kind: str
    name: str
    sync: SyncStatus
    health: Health
    health_reason: str = ""  # why it is not Healthy
    change_class: str = ""  # the plan's class of its pending or last change ("" if none)
    reasons: tuple[str, ...] = ()
    fields: tuple[FieldChange, ...] = ()
    waiting: str = ""  # why its change was not made now (window, class, manual, selfHeal)
    error: str = ""  # why its change failed

    @property
    def id(self) -> str:
        return f"{self.host}:{self.kind}/{self.name}"


@dataclass(frozen=True)
class HostStatus:
    name: str
    uri: str
    reachable: bool
    error: str = ""


@dataclass(frozen=True)
class SyncRecord:
    """One reconcile of one project, as kept in the history."""

    project: str
    started: float
    finished: float
    trigger: str  # start | poll | webhook | manual | cli | status
    result: SyncResult
    commit: Commit | None = None
    summary: str = ""  # one line
    changed: tuple[str, ...] = ()  # ids of the changes made
    waiting: tuple[str, ...] = ()  # ids of the changes found and not made
    failed: tuple[tuple[str, str], ...] = ()  # (id, why) of the changes that failed
    errors: tuple[str, ...] = ()  # located errors of an invalid commit, a plan error
    drift: int = 0  # objects out of sync when the round began, git unchanged
    id: int | None = None  # its row in the history database

    @property
    def duration(self) -> float:
        return self.finished - self.started


@dataclass(frozen=True)
class ProjectStatus:
    name: str
    source: str  # repository, ref and path, credentials removed
    state: ProjectState
    suspended: bool = False
    state_reason: str = ""
    commit: Commit | None = None  # the commit in force (the last good one)
    last_sync: SyncRecord | None = None
    last_success: float | None = None  # when a sync last ended without failing
    hosts: tuple[HostStatus, ...] = ()
    objects: tuple[ObjectStatus, ...] = ()
    pending_restarts: tuple[str, ...] = ()  # VM ids whose definition waits for a restart
    window: WindowState = WindowState()
    next_sync: float | None = None
    policy: dict[str, Any] = field(default_factory=dict, compare=False)
    plan: dict[str, Any] = field(default_factory=dict, compare=False)  # plan JSON, format 2

    def count(self, what: SyncStatus | Health) -> int:
        if isinstance(what, SyncStatus):
            return sum(1 for o in self.objects if o.sync is what)
        return sum(1 for o in self.objects if o.health is what)
