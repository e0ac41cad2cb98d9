"""Stage 5 values: a plan is a list of changes, each with its class, reasons, field diffs and the
typed steps that carry it out (steps.py). Also the plan's versioned JSON form
(`kvmctl plan -o json`, format version 1, docs/plan-format.md)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum, unique
from typing import Any

from ..kinds import Kind
from .steps import MoveStep, RecordDefinition, Step, step_json

FORMAT_VERSION = 1
MASK = "(sensitive value hidden)"


@unique
class ChangeClass(StrEnum):
    """What a change does to an object; the values are the plan JSON's `class`."""

    CREATE = "create"
    NOOP = "no-op"
    UPDATE_LIVE = "update-live"
    UPDATE_RESTART = "update-restart"
    REPLACE = "replace"
    DELETE = "delete"
    MOVE = "move"  # to another host of the project: disks copied and verified, then removed


SYMBOLS = {ChangeClass.CREATE: "+", ChangeClass.NOOP: " ", ChangeClass.UPDATE_LIVE: "~",
           ChangeClass.UPDATE_RESTART: "~", ChangeClass.REPLACE: "-/+", ChangeClass.DELETE: "-",
           ChangeClass.MOVE: "->"}


@dataclass(frozen=True)
class FieldDiff:
    field: str
    old: Any
    new: Any
    sensitive: bool = False


@dataclass(frozen=True)
class Change:
    kind: Kind
    name: str
    change_class: ChangeClass
    reasons: tuple[str, ...] = ()
    fields: tuple[FieldDiff, ...] = ()
    steps: tuple[Step, ...] = ()
    blocked: str | None = None
    pending_restart: bool = False
    fingerprint: str = ""
    depends: tuple[str, ...] = ()  # refs (KIND/NAME) of the changes this one needs first
    host: str = ""  # the project host it is made on (a move: the host it goes to)
    from_host: str = ""  # a move: the host it leaves
    move_steps: tuple[MoveStep, ...] = ()  # a move's steps, each naming its host(s)
    # Run by apply after the changes, also when there are none; not part of the plan shown.
    upkeep: tuple[RecordDefinition, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def id(self) -> str:
        """`HOST:KIND/NAME`, how a project of several hosts names a change."""
        return f"{self.host}:{self.ref}" if self.host else self.ref

    @property
    def is_change(self) -> bool:
        return self.change_class is not ChangeClass.NOOP or self.pending_restart


@dataclass(frozen=True)
class Plan:
    project: str
    uri: str
    changes: tuple[Change, ...]

    @property
    def changes_present(self) -> bool:
        return any(c.change_class is not ChangeClass.NOOP for c in self.changes)

    def summary(self) -> dict[str, int]:
        return summary(self.changes)


def summary(changes: tuple[Change, ...]) -> dict[str, int]:
    order = (ChangeClass.CREATE, ChangeClass.UPDATE_LIVE, ChangeClass.UPDATE_RESTART,
             ChangeClass.REPLACE, ChangeClass.DELETE, ChangeClass.NOOP)
    counts = {str(k): 0 for k in order}
    for c in changes:
        if not c.blocked:  # a blocked change is counted apart: it will not be made
            counts[c.change_class] = counts.get(c.change_class, 0) + 1  # "move": projects only
    counts["blocked"] = sum(1 for c in changes if c.blocked)
    counts["pending_restart"] = sum(1 for c in changes if c.pending_restart)
    return counts


@dataclass(frozen=True)
class HostPlan:
    """One host's share of a project plan."""

    host: str
    uri: str
    plan: Plan


@dataclass(frozen=True)
class ProjectPlan:
    """A plan over the hosts of a project: each host's plan, and the moves between hosts (run
    after every host's own changes, so networks and pools are there on the new host)."""

    project: str
    hosts: tuple[HostPlan, ...]
    moves: tuple[Change, ...] = ()
    multi_host: bool = False  # the project has several hosts: changes are named HOST:KIND/NAME

    @property
    def changes(self) -> tuple[Change, ...]:
        return tuple(c for h in self.hosts for c in h.plan.changes) + self.moves

    @property
    def changes_present(self) -> bool:
        return any(c.change_class is not ChangeClass.NOOP for c in self.changes)

    def summary(self) -> dict[str, int]:
        counts = summary(self.changes)  # moves are counted there, as "move"
        counts.setdefault(str(ChangeClass.MOVE), 0)
        return counts

    def host_plan(self, host: str) -> HostPlan:
        return next(h for h in self.hosts if h.host == host)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def change_json(c: Change) -> dict[str, Any]:
    updates = (ChangeClass.UPDATE_LIVE, ChangeClass.UPDATE_RESTART)
    return {
        "kind": str(c.kind), "name": c.name,
        "action": "update" if c.change_class in updates else str(c.change_class),
        "class": str(c.change_class), "reasons": list(c.reasons), "blocked": c.blocked,
        "pending_restart": c.pending_restart,
        "fields": [{"field": f.field, "old": MASK if f.sensitive else _jsonable(f.old),
                    "new": MASK if f.sensitive else _jsonable(f.new), "sensitive": f.sensitive}
                   for f in c.fields],
        "fingerprint": c.fingerprint,
    }


PROJECT_FORMAT_VERSION = 2


def project_plan_json(plan: ProjectPlan) -> dict[str, Any]:
    """The plan JSON of `kvmctl plan -o json`, format version 2 (docs/plan-format.md): the hosts,
    and each change with its host and id (HOST:KIND/NAME); a move names both hosts."""
    def one(c: Change) -> dict[str, Any]:
        out = change_json(c)
        out["host"] = c.host
        out["id"] = c.id
        if c.change_class is ChangeClass.MOVE:
            out["from_host"] = c.from_host
        return out

    return {"format_version": PROJECT_FORMAT_VERSION, "project": plan.project,
            "hosts": [{"name": h.host, "uri": h.uri, "changes_present": h.plan.changes_present}
                      for h in plan.hosts],
            "changes_present": plan.changes_present, "summary": plan.summary(),
            "changes": [one(c) for c in plan.changes if c.is_change]}


def plan_json(plan: Plan) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "project": plan.project, "uri": plan.uri,
            "changes_present": plan.changes_present, "summary": plan.summary(),
            "changes": [change_json(c) for c in plan.changes if c.is_change]}


def steps_json(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """Every change's steps by ref, in plan order (what golden cases assert besides plan_json)."""
    return {c.ref: [step_json(s) for s in c.steps] for c in plan.changes if c.steps}

