"""Stage 6: run a plan's steps against the hypervisor -> result.

Changes run in dependency order (kinds.LEVEL: pools, images, disks and seeds, networks, VMs;
deletes in the reverse order afterwards), independent changes of one level in parallel. Any
exception inside one change is that change's failure; the others of its level still finish and
are reported, later levels are skipped. What was done stays done, and a new plan picks up from
there because every object's ownership is recorded before (volumes) or together with
(domains, networks) its creation.

Over the hosts of a project (`run_project`), each host's plan runs at once, in its own order; a
failing host does not stop the others. The moves between hosts (apply/moves.py) run after,
those of a host that failed are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum, unique
from typing import TypeVar

from ..errors import KvmctlError
from ..host.hypervisor import Hypervisor
from ..host.state import LiveState
from ..kinds import LEVEL
from ..plan.steps import op_name
from ..plan.types import Change, ChangeClass, Plan, ProjectPlan
from .executor import Executor

S = TypeVar("S")

__all__ = ["ApplyResult", "ChangeResult", "Event", "Outcome", "ProjectResult", "levels", "run",
           "run_project", "run_upkeep"]


@unique
class Event(StrEnum):
    START = "start"
    DONE = "done"
    FAILED = "failed"


@unique
class Outcome(StrEnum):
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # a change of a later level after a failure; a move after its host's


@dataclass(frozen=True)
class ChangeResult:
    ref: str  # the change's id: KIND/NAME, or HOST:KIND/NAME in a project's apply
    outcome: Outcome
    detail: str = ""  # why it failed, or what the user should know of how it was done


Progress = Callable[[Change, Event, str], None]  # change, event, detail


@dataclass(frozen=True)
class ApplyResult:
    results: tuple[ChangeResult, ...]

    def _refs(self, outcome: Outcome) -> tuple[str, ...]:
        return tuple(r.ref for r in self.results if r.outcome is outcome)

    @property
    def done(self) -> tuple[str, ...]:
        return self._refs(Outcome.DONE)

    @property
    def failed(self) -> tuple[tuple[str, str], ...]:
        return tuple((r.ref, r.detail) for r in self.results if r.outcome is Outcome.FAILED)

    @property
    def skipped(self) -> tuple[str, ...]:
        return self._refs(Outcome.SKIPPED)

    @property
    def ok(self) -> bool:
        return not self.failed


def levels(plan: Plan) -> list[list[Change]]:
    """Groups of changes that may run in parallel, in the order they must run."""
    todo = [c for c in plan.changes if c.steps]
    forward = [c for c in todo if c.change_class is not ChangeClass.DELETE]
    backward = [c for c in todo if c.change_class is ChangeClass.DELETE]
    groups: list[list[Change]] = []
    for level in sorted({LEVEL[c.kind] for c in forward}):
        groups.append([c for c in forward if LEVEL[c.kind] == level])
    for level in sorted({LEVEL[c.kind] for c in backward}, reverse=True):
        groups.append([c for c in backward if LEVEL[c.kind] == level])
    return groups


STOPPING = "not started: the process is stopping"


def run(plan: Plan, hv: Hypervisor, live: LiveState, parallelism: int = 8,
        progress: Progress | None = None, executor: Executor | None = None,
        stop: Callable[[], bool] | None = None) -> ApplyResult:
    """`stop`: asked before each change starts; once it says so, the changes in progress
    finish and no other starts (a controller told to terminate)."""
    executor = executor or Executor(hv, live, plan.project)
    results: list[ChangeResult] = []
    groups = levels(plan)

    def one(c: Change) -> ChangeResult:
        if stop is not None and stop():
            return ChangeResult(c.id, Outcome.SKIPPED, STOPPING)
        return run_change(executor, c, progress)

    for i, group in enumerate(groups):
        with ThreadPoolExecutor(max_workers=max(1, parallelism)) as pool:
            results += pool.map(one, group)
        stopping = stop is not None and stop()
        if stopping or any(r.outcome is Outcome.FAILED for r in results):
            results += [ChangeResult(c.id, Outcome.SKIPPED, STOPPING if stopping else "")
                        for g in groups[i + 1:] for c in g]
            return ApplyResult(tuple(results))
    run_upkeep(plan, executor, parallelism)
    return ApplyResult(tuple(results))


def run_upkeep(plan: Plan, executor: Executor, parallelism: int = 8) -> None:
    """The plan's upkeep (records of definitions found unchanged), after its changes; it never
    fails the apply and is not reported."""
    todo = [step for c in plan.changes for step in c.upkeep]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(parallelism, len(todo)))) as pool:
            list(pool.map(executor.upkeep, todo))


def run_change(executor: Executor, change: Change, progress: Progress | None) -> ChangeResult:
    """Run one change's steps in order; whatever goes wrong becomes this change's failure."""
    return run_steps(change, change.steps, executor.run, progress)


def run_steps(change: Change, steps: Sequence[S], run_step: Callable[[S], str],
              progress: Progress | None) -> ChangeResult:
    """`steps` of `change` in order through `run_step` (which returns what the user should hear
    of a step, or ""); any exception is this change's failure, the others' are their own."""
    if progress:
        progress(change, Event.START, "")
    step_name = ""
    notes: list[str] = []
    try:
        for step in steps:
            step_name = op_name(step)
            if note := run_step(step):
                notes.append(note)
    except KvmctlError as exc:
        return _failed(change, str(exc), progress)
    except Exception as exc:  # a bug or an unexpected library error: still only this change
        return _failed(change, f"internal error in step {step_name}: {type(exc).__name__}: "
                               f"{exc}", progress)
    detail = "; ".join(notes)
    if progress:
        progress(change, Event.DONE, detail)
    return ChangeResult(change.id, Outcome.DONE, detail)


def _failed(change: Change, detail: str, progress: Progress | None) -> ChangeResult:
    if progress:
        progress(change, Event.FAILED, detail)
    return ChangeResult(change.id, Outcome.FAILED, detail)


@dataclass(frozen=True)
class ProjectResult(ApplyResult):
    """What an apply over the project's hosts did: per host, then the moves between them;
    `results` holds them all, in that order."""

    hosts: tuple[tuple[str, ApplyResult], ...] = ()
    moves: ApplyResult = ApplyResult(())

    @staticmethod
    def of(hosts: tuple[tuple[str, ApplyResult], ...],
           moves: ApplyResult = ApplyResult(())) -> ProjectResult:
        return ProjectResult(tuple(r for _, res in hosts for r in res.results) + moves.results,
                             hosts, moves)

    def host_failed(self, host: str) -> bool:
        return any(not res.ok for name, res in self.hosts if name == host)


def run_project(plan: ProjectPlan, hosts: Mapping[str, tuple[Hypervisor, LiveState]],
                parallelism: int = 8, progress: Progress | None = None,
                stop: Callable[[], bool] | None = None) -> ProjectResult:
    """Every host's plan at once, each in its own dependency order (a failing host does not stop
    the others), then the moves between hosts whose own changes all succeeded."""
    executors = {name: Executor(hv, live, plan.project) for name, (hv, live) in hosts.items()}
    todo = [h for h in plan.hosts if any(c.steps or c.upkeep for c in h.plan.changes)]
    results: dict[str, ApplyResult] = {h.host: ApplyResult(()) for h in plan.hosts}
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        running = {h.host: pool.submit(run, h.plan, hosts[h.host][0], hosts[h.host][1],
                                       parallelism, progress, executors[h.host], stop)
                   for h in todo}
        for name, future in running.items():
            results[name] = future.result()
    outcome = ProjectResult.of(tuple(results.items()))
    moves = [c for c in plan.moves if c.move_steps and not c.blocked]
    if not moves:
        return outcome
    from .moves import run_move
    ready = [c for c in moves if not outcome.host_failed(c.host)
             and not outcome.host_failed(c.from_host) and not (stop is not None and stop())]
    skipped = [ChangeResult(c.id, Outcome.SKIPPED, "a change on one of its hosts failed")
               for c in moves if c not in ready]
    with ThreadPoolExecutor(max_workers=max(1, min(parallelism, len(ready)))) as pool:
        done = list(pool.map(lambda c: run_move(c, executors, progress), ready))
    return ProjectResult.of(outcome.hosts, ApplyResult(tuple(done + skipped)))
