"""Stage 5 values: a plan is a list of changes, each with its class, reasons, field diffs and the
steps that carry it out. Also the plan's versioned JSON form (`kvmctl plan -o json`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1

CREATE, NOOP, LIVE, RESTART, REPLACE, DELETE = (
    "create", "no-op", "update-live", "update-restart", "replace", "delete")
SYMBOLS = {CREATE: "+", NOOP: " ", LIVE: "~", RESTART: "~", REPLACE: "-/+", DELETE: "-"}
MASK = "(sensitive value hidden)"


@dataclass(frozen=True)
class Step:
    """One hypervisor operation; `op` names a method of apply.Executor."""

    op: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class FieldDiff:
    field: str
    old: Any
    new: Any
    sensitive: bool = False


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    klass: str
    reasons: tuple[str, ...] = ()
    fields: tuple[FieldDiff, ...] = ()
    steps: tuple[Step, ...] = ()
    blocked: str | None = None
    pending_restart: bool = False
    fingerprint: str = ""
    depends: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def is_change(self) -> bool:
        return self.klass != NOOP or self.pending_restart


@dataclass(frozen=True)
class Plan:
    project: str
    uri: str
    changes: tuple[Change, ...]
    manifest_fingerprint: str = ""
    documents: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @property
    def changes_present(self) -> bool:
        return any(c.klass != NOOP for c in self.changes)

    def summary(self) -> dict[str, int]:
        counts = {k: 0 for k in (CREATE, LIVE, RESTART, REPLACE, DELETE, NOOP)}
        for c in self.changes:
            counts[c.klass] += 1
        counts["blocked"] = sum(1 for c in self.changes if c.blocked)
        counts["pending_restart"] = sum(1 for c in self.changes if c.pending_restart)
        return counts


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def change_json(c: Change) -> dict[str, Any]:
    return {
        "kind": c.kind, "name": c.name,
        "action": {LIVE: "update", RESTART: "update"}.get(c.klass, c.klass),
        "class": c.klass, "reasons": list(c.reasons), "blocked": c.blocked,
        "pending_restart": c.pending_restart,
        "fields": [{"field": f.field, "old": MASK if f.sensitive else _jsonable(f.old),
                    "new": MASK if f.sensitive else _jsonable(f.new), "sensitive": f.sensitive}
                   for f in c.fields],
        "fingerprint": c.fingerprint,
    }


def plan_json(plan: Plan) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "project": plan.project, "uri": plan.uri,
            "changes_present": plan.changes_present, "summary": plan.summary(),
            "changes": [change_json(c) for c in plan.changes if c.is_change]}
