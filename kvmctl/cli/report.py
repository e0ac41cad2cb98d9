"""How results reach the user: problems (text, JSON, GitHub annotations), plans, apply
progress and tables. The only code that writes to the terminal, with cli/commands.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import Problem

if TYPE_CHECKING:  # rich and the plan types are imported when there is something to show
    from ..apply import Event
    from ..plan.types import Change, FieldDiff, ProjectPlan


@dataclass(frozen=True)
class Env:
    """Every stream the program uses, so tests run the real CLI with captured output."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    @property
    def interactive(self) -> bool:
        return self.stdin.isatty() and self.stdout.isatty()


# ---- manifest problems --------------------------------------------------------------------------

def print_problems(problems: Sequence[Problem], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        json.dump([_problem_json(p) for p in problems], out, indent=2)
        out.write("\n")
    elif fmt == "github":
        for p in problems:
            message = p.message + (f" ({p.path})" if p.path else "") + \
                (f" hint: {p.hint}" if p.hint else "")
            where = f"file={_gh_escape(p.location.file, True)}"
            if p.location.line:  # a problem of a whole file has no line
                where += f",line={p.location.line},col={p.location.column}"
            out.write(f"::error {where}::{_gh_escape(message)}\n")
    else:
        for p in problems:
            out.write(f"{p}\n")
        count = len(problems)
        out.write(f"{count} problem{'s' if count != 1 else ''} found\n")


def _gh_escape(text: str, property_value: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if property_value:  # workflow command properties are separated by , and end at ::
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def _problem_json(p: Problem) -> dict[str, Any]:
    return {"file": p.location.file, "line": p.location.line, "column": p.location.column,
            "severity": p.severity, "message": p.message, "path": p.path, "hint": p.hint}


# ---- plans --------------------------------------------------------------------------------------

_COLORS = {"create": "green", "update-live": "yellow", "update-restart": "yellow",
           "replace": "magenta", "delete": "red", "no-op": "cyan", "move": "blue"}


def print_plan(plan: ProjectPlan, env: Env) -> None:
    """The plan as text; a project of several hosts grouped by host, each change named
    HOST:KIND/NAME, and its moves last."""
    if not plan.multi_host:
        _print_changes(plan.changes, env, False)
    else:
        for h in plan.hosts:
            shown = [c for c in h.plan.changes if c.is_change]
            env.stdout.write(f"Host {h.host} ({h.uri}): "
                             + (f"{len(shown)} change(s)\n" if shown else "no changes\n"))
            _print_changes(h.plan.changes, env, True)
        if plan.moves:
            env.stdout.write("Moves between hosts:\n")
            _print_changes(plan.moves, env, True)
    s = plan.summary()
    env.stdout.write(
        f"Plan: {s['create']} to create, {s['update-live']} to update live, "
        f"{s['update-restart']} needing a restart, {s['replace']} to replace, "
        + (f"{s['move']} to move, " if s.get("move") else "")
        + f"{s['delete']} to delete, {s['no-op']} unchanged"
        + (f", {s['blocked']} blocked" if s["blocked"] else "")
        + (f", {s['pending_restart']} pending restart" if s["pending_restart"] else "") + ".\n")
    if not plan.changes_present:
        env.stdout.write("No changes: the host" + ("s match" if plan.multi_host else " matches")
                         + " the manifests.\n")


def _print_changes(changes: tuple[Change, ...], env: Env, with_host: bool) -> None:
    from ..plan.describe import INTERNAL_FIELDS
    from ..plan.types import SYMBOLS, ChangeClass
    shown = [c for c in changes if c.is_change]
    if shown:  # rich is imported only when there is something to print in colour
        from rich.console import Console
        console = Console(file=env.stdout, highlight=False, soft_wrap=True)
    for c in shown:
        cls = c.change_class
        tag = "pending restart" if cls is ChangeClass.NOOP else str(cls)
        name = c.id if with_host else c.ref
        if cls is ChangeClass.MOVE:
            name = f"{c.ref} {c.from_host} -> {c.host}" if with_host else c.ref
        console.print(f"[{_COLORS[cls]}]{SYMBOLS[cls]:>3} {name}[/] [dim]({tag})[/]",
                      markup=True)
        for reason in c.reasons:
            console.print(f"      {reason}", markup=False)
        if c.blocked:
            console.print(f"      [bold red]blocked:[/] {c.blocked}", markup=True)
        shown_fields = [f for f in c.fields if f.field not in INTERNAL_FIELDS]
        for f in shown_fields:
            console.print("      " + _field_line(f, c.change_class), markup=False)
        if c.fields and not shown_fields and all(f.field == "metadata" and f.old is None
                                                 for f in c.fields):
            console.print("      adopted: kvmctl's ownership mark is added; nothing else "
                          "changes", markup=False)
        elif c.fields and not shown_fields:
            console.print("      only kvmctl's record of the manifest changes (settings that "
                          "are not part of the libvirt definition, e.g. onRestartNeeded or "
                          "protect)", markup=False)


def _field_line(f: FieldDiff, change_class: str) -> str:
    from ..plan.types import MASK
    old, new = (MASK, MASK) if f.sensitive else (_fmt(f.old), _fmt(f.new))
    if change_class == "create":  # a create lists what it makes, from nothing
        return f"{f.field}: {new}"
    return f"{f.field}: {old} → {new}"


def _fmt(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


# ---- apply progress -----------------------------------------------------------------------------

class ProgressView:
    """A rich progress bar on a terminal; one plain line per event otherwise (CI logs)."""

    def __init__(self, env: Env, total: int, with_host: bool = False) -> None:
        self.env, self.total, self.with_host = env, total, with_host
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> ProgressView:
        if self.env.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
            console = Console(file=self.env.stdout)
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                     BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     console=console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("applying", total=self.total)
        return self

    def __exit__(self, *_: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def event(self, change: Change, event: Event, detail: str) -> None:
        name = change.id if self.with_host else change.ref
        if self.with_host and change.from_host:
            name = f"{change.ref} {change.from_host} -> {change.host}"
        line = {"start": f"{name}: {change.change_class}...",
                "done": f"{name}: done" + (f" ({detail})" if detail else ""),
                "failed": f"{name}: FAILED: {detail}"}[str(event)]
        if self.progress is None:
            (self.env.stderr if event == "failed" else self.env.stdout).write(line + "\n")
            self.env.stdout.flush()
            return
        if event == "start":
            self.progress.update(self.task, description=name)
            return
        self.progress.console.print(line, markup=False, highlight=False)
        self.progress.advance(self.task)


# ---- tables -------------------------------------------------------------------------------------

def print_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(box=None, pad_edge=False)
    columns = list(rows[0]) if rows else ["name"]
    for col in columns:
        table.add_column(col.upper())
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    Console(file=out, highlight=False, width=200).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value in (None, "") else str(value)
