"""A project's sync policy (the project file's `spec.sync`, objects' `metadata.sync`) and the one
decision it makes: may this change of the plan be made now, and if not, why not.

The policy in force is the one read at the commit being synced: changing it is a commit like
any other. A change waits, with its reason shown, when the policy says manual, when it is drift
and selfHeal is off, when its class is not unattended and no window for it is open, or when it
needs a change that waits.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ManifestError, Problem
from ..kinds import Kind
from ..manifest.documents import Document, json_path
from ..plan.types import Change, ChangeClass
from ..schedule import CronExpr, Window, parse_duration, windows_state
from .status import WindowState

DEFAULT_INTERVAL = 60.0
DEFAULT_UNATTENDED = frozenset({ChangeClass.CREATE, ChangeClass.UPDATE_LIVE})
DEFAULT_WINDOW_CLASSES = frozenset({ChangeClass.UPDATE_RESTART, ChangeClass.REPLACE,
                                    ChangeClass.MOVE})


@dataclass(frozen=True)
class MaintenanceWindow:
    window: Window
    classes: frozenset[ChangeClass] = DEFAULT_WINDOW_CLASSES


@dataclass(frozen=True)
class ObjectPolicy:
    """An object's own exceptions (`metadata.sync`); None: as the project."""

    apply: str | None = None
    self_heal: bool | None = None
    unattended: frozenset[ChangeClass] | None = None


@dataclass(frozen=True)
class SyncPolicy:
    apply: str = "auto"  # auto | manual
    prune: bool = False
    prune_disks: bool = False
    allow_empty: bool = False
    self_heal: bool = False
    unattended: frozenset[ChangeClass] = DEFAULT_UNATTENDED
    windows: tuple[MaintenanceWindow, ...] = ()
    suspend: bool = False
    interval: float = DEFAULT_INTERVAL
    objects: Mapping[str, ObjectPolicy] = field(default_factory=dict)  # by KIND/NAME

    def window_state(self, now: dt.datetime) -> WindowState:
        return windows_state([w.window for w in self.windows], now)

    def summary(self) -> dict[str, Any]:
        """The policy as the API and page show it."""
        return {"apply": self.apply, "prune": self.prune, "pruneDisks": self.prune_disks,
                "allowEmpty": self.allow_empty, "selfHeal": self.self_heal,
                "suspend": self.suspend, "interval": self.interval,
                "unattended": sorted(str(c) for c in self.unattended),
                "windows": [{"schedule": w.window.text, "duration": w.window.duration,
                             "timezone": w.window.timezone,
                             "classes": sorted(str(c) for c in w.classes)}
                            for w in self.windows],
                "objects": {ref: {k: v for k, v in (("apply", o.apply),
                                                    ("selfHeal", o.self_heal)) if v is not None}
                            | ({"unattended": sorted(str(c) for c in o.unattended)}
                               if o.unattended is not None else {})
                            for ref, o in sorted(self.objects.items())}}


@dataclass(frozen=True)
class SourceDefaults:
    """spec.sync.source of a project file: where its manifests live in git."""

    repo: str
    ref: str = "HEAD"
    path: str = "."


def read_policy(project: Document | None, documents: Iterable[Document] = ()) -> SyncPolicy:
    """The policy of a project file (defaults without one), with the objects' exceptions;
    ManifestError, located, for a schedule, duration or time zone that does not parse (the
    schema has checked the rest)."""
    body: dict[str, Any] = project.body if project is not None else {}
    sync = (body.get("spec") or {}).get("sync") or {}
    problems: list[Problem] = []

    def locate(path: tuple[str | int, ...], message: str, hint: str = "") -> None:
        assert project is not None  # only a project file has values to be wrong
        problems.append(Problem(message, project.locate(path + ("<value>",)),
                                json_path(path), hint=hint))

    base = ("spec", "sync")
    interval = DEFAULT_INTERVAL
    if "interval" in sync:
        try:
            interval = parse_duration(sync["interval"])
            if interval < 1:  # the schema's pattern lets "0s" through; 0 would busy-loop
                raise ValueError(f"{sync['interval']!r} is less than 1 second")
        except ValueError as exc:
            locate(base + ("interval",), f"interval: {exc}", "a duration: 90s, 5m, 1h")
    windows = []
    for i, w in enumerate(sync.get("windows") or ()):
        here = base + ("windows", i)
        try:
            cron = CronExpr.parse(w["schedule"])
        except ValueError as exc:
            locate(here + ("schedule",), str(exc),
                   "minute hour day-of-month month day-of-week, e.g. '0 2 * * SAT'")
            continue
        try:
            duration = parse_duration(w["duration"])
            if duration <= 0:
                raise ValueError("a window must stay open for more than 0 seconds")
        except ValueError as exc:
            locate(here + ("duration",), f"duration: {exc}", "e.g. 2h, 30m, 1h30m")
            continue
        try:
            window = Window(cron, duration, w.get("timezone", "UTC"), w["schedule"])
        except ValueError as exc:
            locate(here + ("timezone",), str(exc), "an IANA time zone name: UTC, Europe/Berlin")
            continue
        classes = frozenset(ChangeClass(c) for c in w["classes"]) if "classes" in w \
            else DEFAULT_WINDOW_CLASSES
        windows.append(MaintenanceWindow(window, classes))
    objects: dict[str, ObjectPolicy] = {}
    for d in documents:
        meta = d.body.get("metadata") if isinstance(d.body, dict) else None
        own = meta.get("sync") if isinstance(meta, dict) else None
        if isinstance(own, dict) and own:
            objects[f"{d.kind}/{d.name}"] = ObjectPolicy(
                own.get("apply"), own.get("selfHeal"),
                frozenset(ChangeClass(c) for c in own["unattended"])
                if "unattended" in own else None)
    if problems:
        raise ManifestError(problems)
    unattended = frozenset(ChangeClass(c) for c in sync["unattended"]) \
        if "unattended" in sync else DEFAULT_UNATTENDED
    return SyncPolicy(sync.get("apply", "auto"), bool(sync.get("prune", False)),
                      bool(sync.get("pruneDisks", False)), bool(sync.get("allowEmpty", False)),
                      bool(sync.get("selfHeal", False)), unattended, tuple(windows),
                      bool(sync.get("suspend", False)), interval, objects)


def read_source(project: Document | None) -> SourceDefaults | None:
    body: dict[str, Any] = project.body if project is not None else {}
    source = ((body.get("spec") or {}).get("sync") or {}).get("source")
    if not source:
        return None
    return SourceDefaults(source["repo"], source.get("ref", "HEAD"), source.get("path", "."))


def waiting_reasons(changes: Iterable[Change], policy: SyncPolicy, now: dt.datetime,
                    from_git: bool | Callable[[Change], bool]) -> dict[str, str]:
    """Why each change that may not be made now waits, by change id (those absent may run).
    `from_git`: whether a change is git's (its object's manifest changed since it was last
    synced, see synced.py), for all changes or per change; otherwise it is drift, made only
    with selfHeal. A delete waits while any other change of its host waits: what waits may
    still need what would be deleted (a VM left on the network a commit removes)."""
    git = from_git if callable(from_git) else (lambda _c: bool(from_git))
    todo = [c for c in changes if c.change_class is not ChangeClass.NOOP and not c.blocked]
    open_windows = [w for w in policy.windows if w.window.opened_at(now) is not None]
    waits: dict[str, str] = {}
    for c in todo:
        # A VM's cloud-init seed follows its VM's exceptions.
        own = policy.objects.get(c.ref) or (policy.objects.get(f"{Kind.VM}/{c.name}")
                                            if c.kind is Kind.SEED else None)
        why = _why_waiting(c, policy, own or ObjectPolicy(), now, open_windows, git(c))
        if why:
            waits[c.id] = why
    # A change that needs one that waits, waits too (a VM for its network, its disk).
    by_host_ref = {(c.host, c.ref): c.id for c in todo}
    grew = True
    while grew:
        grew = False
        for c in todo:
            if c.id in waits:
                continue
            for dep in c.depends:
                dep_id = by_host_ref.get((c.host, dep))
                if dep_id is not None and dep_id in waits:
                    waits[c.id] = f"needs {dep}, which waits"
                    grew = True
                    break
    hosts_waiting = {c.host for c in changes if c.id in waits or (
        c.blocked and c.change_class is not ChangeClass.DELETE)}
    for c in todo:
        if c.change_class is ChangeClass.DELETE and c.id not in waits \
                and c.host in hosts_waiting:
            waits[c.id] = ("deleted once the other changes of its host are made (one that "
                           "waits may still need it)")
    return waits


def _why_waiting(c: Change, policy: SyncPolicy, own: ObjectPolicy, now: dt.datetime,
                 open_windows: list[MaintenanceWindow], from_git: bool) -> str:
    if (own.apply or policy.apply) == "manual":
        return "apply is manual: detected and reported, not made"
    heal = policy.self_heal if own.self_heal is None else own.self_heal
    if not from_git and not heal:
        return "drift (git did not change) and selfHeal is off: reported, not reverted"
    if c.change_class is ChangeClass.DELETE:
        return ""  # the plan has deletes only when prune is on: prune is their consent
    unattended = policy.unattended if own.unattended is None else own.unattended
    if c.change_class in unattended:
        return ""
    if any(c.change_class in w.classes for w in open_windows):
        return ""
    fitting = [w for w in policy.windows if c.change_class in w.classes]
    if not fitting:
        return (f"{c.change_class} is not unattended and no maintenance window allows it "
                "(spec.sync.unattended, spec.sync.windows)")
    starts = [s for s in (w.window.next_open(now) for w in fitting) if s is not None]
    when = f"; the next opens {min(starts).astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC" \
        if starts else ""
    return f"{c.change_class} waits for a maintenance window{when}"
