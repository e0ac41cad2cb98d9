"""One reconciliation of one project from git: what `kvmctl sync` runs once and the controller
runs on every round.

    ls-remote the ref -> the commit -> its tree (fetched once, cached) -> its documents (parsed
    once per commit, kept) -> a plan over the project's hosts, read unlocked -> the changes the
    policy allows now -> only if there are any: the hosts locked (this machine's lock and each
    hypervisor's, as `kvmctl apply` takes them), planned again, applied -> statuses and health.

An idle round therefore costs one read of each host and no write anywhere. A commit that does
not load, validate or plan changes nothing: its sync fails with the located errors and the
commit, and the last good commit stays in force. A commit with no manifests prunes nothing
unless the policy allows empty. A host that does not answer is reported unreachable; the others
go on (disks are then never created empty, see engine.Deployment).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..engine import Deployment, LockRequest, PlanRequest, Prepared
from ..errors import KvmctlError, ManifestError, SourceError, UnreachableError
from ..kinds import PROJECT_FILE, Kind
from ..manifest import documents
from ..manifest.documents import Document
from ..manifest.model import ManifestSet
from ..manifest.project import (
    Overrides,
    Placement,
    ProjectConfig,
    load_project_file,
    resolve,
    split_project,
)
from ..plan.types import MASK, Change, ChangeClass, ProjectPlan, project_plan_json
from ..source import Checkout, GitCache, SourceSpec
from .health import HostProbe, object_health
from .policy import SyncPolicy, read_policy, waiting_reasons
from .snapshots import PolicyRun, run_policies
from .status import (
    Commit,
    FieldChange,
    Health,
    HostStatus,
    ObjectStatus,
    ProjectState,
    ProjectStatus,
    SyncRecord,
    SyncResult,
    SyncStatus,
)
from .synced import SourceState, digests

log = logging.getLogger("kvmctl.controller")


@dataclass(frozen=True)
class ProjectSource:
    """What to reconcile: a git source, and what this machine adds (a project file of its own
    for a repository without one, the command line's overrides)."""

    spec: SourceSpec
    local_project_file: str | None = None
    overrides: Overrides = Overrides()
    label: str = ""  # how logs name it before its project file is read

    @property
    def key(self) -> str:
        return self.label or self.spec.display


@dataclass(frozen=True)
class Loaded:
    """A commit's documents, project and policy, parsed once and kept while it is in force."""

    checkout: Checkout
    config: ProjectConfig
    policy: SyncPolicy
    documents: list[Document]
    # Their schema check, placement and per-host models, made by the first round's Deployment
    # and taken by every later round at this commit while the host's facts stay the same.
    prepared: Prepared = field(compare=False, repr=False)
    local_stamp: int | None = None  # the local project file's mtime, when one stands in


@dataclass(frozen=True)
class Outcome:
    record: SyncRecord
    status: ProjectStatus
    changed: bool  # something was made: the next round should come soon, to see it settle


@dataclass
class Reconciler:
    """One project's reconciliations, with what they keep between rounds."""

    source: ProjectSource
    cache: GitCache
    lock_timeout: float = 30.0
    parallelism: int = 8
    command: str = "kvmctl controller"
    # Where what the source last synced is kept (synced.py); None: in memory only.
    state_dir: str | None = None
    # Asked when a commit names its project: False if another source already syncs it.
    claim: Callable[[str, Reconciler], bool] | None = None
    last_good: Loaded | None = None
    synced_commit: str | None = None  # the last commit a round left with nothing to do
    last_status: ProjectStatus | None = None
    # What the snapshot policies did after the last round (empty: none was due).
    snapshot_runs: list[PolicyRun] = field(default_factory=list)
    state: SourceState = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _seen_name: str | None = None  # the project's name in a commit that did not load
    _digests: tuple[Loaded, dict[str, str]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.state = SourceState.load(self.state_dir, self.source.spec.display)

    @property
    def suspended(self) -> bool:
        """Suspended by a person, through the API (the policy's own suspend aside); kept in
        the state directory, so a restart does not resume it."""
        return self.state.suspended

    @suspended.setter
    def suspended(self, on: bool) -> None:
        self.state.suspended = on
        self.state.save(self.source.spec.display)

    @property
    def name(self) -> str:
        if self.last_good:
            return self.last_good.config.name
        return self._seen_name or self.source.key

    def reconcile(self, trigger: str, stop: Callable[[], bool] | None = None,
                  dry_run: bool = False, now: Callable[[], float] = time.time) -> Outcome:
        """One round; never raises for what a round can meet (git, manifests, hosts, locks):
        those become a failed record. Two calls never overlap."""
        with self._lock:
            outcome = self._reconcile(trigger, stop, dry_run, now)
            # The policies run after every round, a failed one too (a bad commit, a failed
            # change): on the commit last in force, unless suspended or stopping.
            self.snapshot_runs = []
            good = self.last_good
            if not dry_run and not self.suspended and not (stop and stop()) \
                    and good is not None and not good.policy.suspend:
                self.snapshot_runs = self._snapshot_policies(good, now)
            return outcome

    def _reconcile(self, trigger: str, stop: Callable[[], bool] | None, dry_run: bool,
                   now: Callable[[], float]) -> Outcome:
        started = now()
        notes: list[str] = []
        try:
            loaded = self._load()
        except SourceError as exc:
            if self.last_good is None:
                return self._failed(trigger, started, None, [str(exc)], now,
                                    ProjectState.DEGRADED, f"git: {exc}")
            loaded = self.last_good  # git is down: the commit in force stays, drift is seen
            notes.append(f"git unreachable, keeping commit {loaded.checkout.commit.short}: "
                         f"{exc}")
        except _InvalidCommit as exc:
            return self._failed(trigger, started, exc.commit, exc.errors, now,
                                ProjectState.DEGRADED,
                                f"commit {exc.commit.short} is invalid; "
                                + (f"{self.last_good.checkout.commit.short} stays in force"
                                   if self.last_good else "nothing is in force yet"))
        policy = loaded.policy
        commit = loaded.checkout.commit
        if self.suspended or policy.suspend:
            why = "suspended through the API" if self.suspended else "spec.sync.suspend"
            record = SyncRecord(self.name, started, now(), trigger, SyncResult.SUSPENDED,
                                commit, f"suspended ({why}): nothing reconciled")
            status = self._status(loaded, ProjectState.SUSPENDED, why, record,
                                  self.last_status.objects if self.last_status else (),
                                  self.last_status.hosts if self.last_status else (), (), {})
            self.last_status = status  # what the controller's API and page show
            return Outcome(record, status, False)
        objects = [d for d in loaded.documents]
        if not objects and policy.prune and not policy.allow_empty:
            return self._failed(
                trigger, started, commit,
                [f"commit {commit.short} has no manifests under {loaded.checkout.spec.path!r}: "
                 "nothing is pruned (spec.sync.allowEmpty is false)"], now,
                ProjectState.DEGRADED, "empty commit refused")
        request = PlanRequest(prune=policy.prune, prune_disks=policy.prune_disks,
                              allow_empty=policy.allow_empty)
        try:
            return self._plan_and_apply(loaded, request, trigger, started, stop, dry_run,
                                        notes, now)
        except ManifestError as exc:
            return self._failed(trigger, started, commit, _problems(exc, loaded.checkout), now,
                                ProjectState.DEGRADED, "the manifests do not fit the hosts")
        except KvmctlError as exc:
            return self._failed(trigger, started, commit, [str(exc)], now,
                                ProjectState.DEGRADED, str(exc).splitlines()[0])

    def _snapshot_policies(self, loaded: Loaded, now: Callable[[], float]) -> list[PolicyRun]:
        """The VMs' snapshot policies, after the round: read unlocked; taken and expired
        under the project's lock, as `kvmctl snapshot run` does, only when one is due."""
        if not any(d.kind == Kind.VM and (d.body.get("spec") or {}).get("snapshots")
                   for d in loaded.documents):
            return []
        moment = dt.datetime.fromtimestamp(now(), dt.UTC)
        try:
            with _deployment(loaded) as (deployment, _):
                pending = [r.vm for r in run_policies(deployment.sessions, loaded.config.name,
                                                      moment, dry_run=True)
                           if r.took or r.removed]
            if not pending:
                return []
            with _deployment(loaded, _lock(self.lock_timeout, self.command)) as (deployment,
                                                                                 _):
                runs = run_policies(deployment.sessions, loaded.config.name, moment,
                                    only_vms=tuple(pending))
        except KvmctlError as exc:
            log.warning("project %s: snapshot policies: %s", loaded.config.name, exc)
            return []
        for r in runs:
            if r.error:
                log.warning("project %s: snapshot policy of %s: %s", loaded.config.name, r.vm,
                            r.error)
            elif r.took or r.removed:
                log.info("project %s: snapshot policy of %s: took %s, removed %s",
                         loaded.config.name, r.vm, r.took or "none",
                         ", ".join(r.removed) or "none")
        return runs

    # ---- the commit --------------------------------------------------------------------------

    def _load(self) -> Loaded:
        spec = self.source.spec
        sha = self.cache.remote_commit(spec)
        stamp = _stamp(self.source.local_project_file)
        if self.last_good is not None and self.last_good.checkout.commit.sha == sha \
                and self.last_good.local_stamp == stamp:
            return self.last_good  # parsed once per commit (and edit of the local file)
        try:
            checkout = self.cache.checkout(spec, sha)
        except SourceError as exc:  # git answered, but this commit cannot be read (no path)
            raise _InvalidCommit(Commit(sha), [str(exc)]) from None
        try:
            loaded = _load_commit(checkout, self.source)
        except KvmctlError as exc:
            # its failure is recorded under the project's name, as its successes are
            self._seen_name = _name_in(checkout, self.source) or self._seen_name
            errors = _problems(exc, checkout) if isinstance(exc, ManifestError) \
                else [_relative(str(exc), checkout)]
            raise _InvalidCommit(checkout.commit, errors) from None
        bound = self.last_good.config.name if self.last_good else self.state.project
        if bound is not None and loaded.config.name != bound:
            # A commit that lost its project file, or renamed the project, would hand the
            # objects to another owner: a project is renamed by a new source, not a commit.
            raise _InvalidCommit(checkout.commit, [
                f"the commit's project is {loaded.config.name!r}, the one this source syncs "
                f"is {bound!r} (is kvmctl.yaml missing under {checkout.spec.path!r}?): "
                "nothing is changed"])
        if self.claim is not None and not self.claim(loaded.config.name, self):
            raise _InvalidCommit(checkout.commit, [
                f"project {loaded.config.name!r} is already synced from another source of "
                "this controller: two sources would fight over (and prune) its objects"])
        return replace(loaded, local_stamp=stamp)

    # ---- plan, decide, apply -----------------------------------------------------------------

    def _plan_and_apply(self, loaded: Loaded, request: PlanRequest, trigger: str,
                        started: float, stop: Callable[[], bool] | None, dry_run: bool,
                        notes: list[str], now: Callable[[], float]) -> Outcome:
        policy, commit = loaded.policy, loaded.checkout.commit
        stopping = stop if stop is not None else (lambda: False)
        with _deployment(loaded) as (deployment, hosts):
            plan = deployment.plan(request)
            placement = deployment.placement
            declared = self._declared(loaded, placement.by_host)
            git = self._git(declared)
            moment = dt.datetime.fromtimestamp(now(), dt.UTC)
            waits = waiting_reasons(plan.changes, policy, moment, git)
            runnable = _runnable(plan, waits)
            drift = sum(1 for c in plan.changes if _differs(c) and not git(c))
            away = [h for h in hosts if not h.reachable]
            if away:  # the others go on; this commit is not synced everywhere
                notes.insert(0, "unreachable: " + ", ".join(f"{h.name} ({h.error})"
                                                            for h in away))
            # Health is read here, unlocked: never while a person's apply waits for the lock.
            health = _health(deployment, plan, self.parallelism)
        if dry_run:
            waits.update({c.id: "dry run: would be made" for c in runnable})
        if not runnable or dry_run or stopping() or self.suspended:
            status = self._round_status(loaded, placement, hosts, plan, waits, {}, set(), health)
            result = SyncResult.OUT_OF_SYNC if plan.changes_present else SyncResult.SYNCED
            if result is SyncResult.SYNCED and away:
                result = SyncResult.PARTIAL
            if result is SyncResult.SYNCED and not waits:
                self.synced_commit = commit.sha
            self.last_good = loaded
            if not dry_run:
                self._remember(loaded, plan, declared, waits, {}, set())
            record = SyncRecord(self.name, started, now(), trigger, result, commit,
                                _summary(result, (), waits, notes),
                                waiting=tuple(sorted(waits)), drift=drift)
            status = _degraded(replace(status, last_sync=record), notes)
            return Outcome(record, self._keep(status), False)
        # Something may be made: locked, as `kvmctl apply` is, and planned again under the lock.
        done: set[str] = set()
        failed: dict[str, str] = {}
        skipped: tuple[str, ...] = ()
        try:
            with _deployment(loaded, _lock(self.lock_timeout, self.command)) as (deployment,
                                                                                 hosts):
                plan = deployment.plan(request)
                placement = deployment.placement
                declared = self._declared(loaded, placement.by_host)
                moment = dt.datetime.fromtimestamp(now(), dt.UTC)  # after the lock's wait
                waits = waiting_reasons(plan.changes, policy, moment, self._git(declared))
                if self.suspended or stopping():  # asked while the lock was awaited
                    waits.update({c.id: "not started: suspended or stopping"
                                  for c in _runnable(plan, waits)})
                todo = _without(plan, waits)
                log.info("project %s: applying %d change(s) at %s", loaded.config.name,
                         len(_runnable(todo, {})), commit.short)
                result_set = deployment.execute(todo, self.parallelism, stop=stop)
                done, failed = set(result_set.done), dict(result_set.failed)
                skipped = result_set.skipped
        except KvmctlError as exc:
            if not done and not failed:
                raise  # nothing was made: the round failed before its changes
            notes.append(f"after the changes: {exc}")  # made, then the release failed
        status = self._round_status(loaded, placement, hosts, plan, waits, failed, done, health)
        self._remember(loaded, plan, declared, waits, failed, done)
        if failed:
            result = SyncResult.FAILED
        elif waits or skipped or any(not h.reachable for h in hosts):
            result = SyncResult.PARTIAL if done else SyncResult.OUT_OF_SYNC
        else:
            result = SyncResult.APPLIED
            self.synced_commit = commit.sha
        self.last_good = loaded
        record = SyncRecord(self.name, started, now(), trigger, result, commit,
                            _summary(result, tuple(sorted(done)), waits, notes),
                            changed=tuple(sorted(done)), waiting=tuple(sorted(waits)),
                            failed=tuple(sorted(failed.items())), drift=drift)
        if failed:
            status = replace(status, state=ProjectState.DEGRADED,
                             state_reason=f"{len(failed)} change(s) failed")
        elif status.state is not ProjectState.DEGRADED and done:
            status = replace(status, state=ProjectState.PROGRESSING,
                             state_reason="changes made; the next round checks them")
        status = replace(status, last_sync=record)
        return Outcome(record, self._keep(_degraded(status, notes)), bool(done))

    # ---- what is git's, what is drift --------------------------------------------------------

    def _declared(self, loaded: Loaded, by_host: Mapping[str, Iterable[Document]]
                  ) -> dict[str, str]:
        if self._digests is None or self._digests[0] is not loaded:
            self._digests = (loaded, digests(loaded.config, by_host))
        return self._digests[1]

    def _git(self, declared: dict[str, str]) -> Callable[[Change], bool]:
        state = self.state
        return lambda c: state.is_git(c.id, declared.get(c.id))

    def _remember(self, loaded: Loaded, plan: ProjectPlan, declared: dict[str, str],
                  waits: dict[str, str], failed: dict[str, str], done: set[str]) -> None:
        """Each object the round left with nothing to do is synced as declared now."""
        state = self.state
        for c in plan.changes:
            if c.id in waits or c.id in failed or c.blocked or (_differs(c) and c.id not in done):
                continue
            state.synced(c.id, declared.get(c.id))
            if c.change_class is ChangeClass.MOVE:
                state.synced(f"{c.from_host}:{c.ref}", None)
        state.known = True
        state.project = loaded.config.name
        state.commit = loaded.checkout.commit.sha
        state.save(self.source.spec.display)

    # ---- statuses ----------------------------------------------------------------------------

    def _round_status(self, loaded: Loaded, placement: Placement, hosts: list[HostStatus],
                      plan: ProjectPlan, waits: dict[str, str], failed: dict[str, str],
                      done: set[str], health: dict[str, tuple[Health, str]]) -> ProjectStatus:
        objects = []
        pending = []
        for c in plan.changes:
            if c.kind is Kind.SEED:
                continue
            objects.append(_object_status(c, health, waits, failed, done))
            if c.pending_restart:
                pending.append(c.id)
        for h in hosts:  # what lives on a host that did not answer: not known
            if not h.reachable:
                objects += [ObjectStatus(h.name, d.kind, d.name, SyncStatus.OUT_OF_SYNC,
                                         Health.UNKNOWN, f"host {h.name} is unreachable",
                                         waiting=f"host {h.name} is unreachable: {h.error}")
                            for d in placement.by_host.get(h.name, ())]
        unreachable = [h for h in hosts if not h.reachable]
        bad = [o for o in objects if o.health in (Health.DEGRADED, Health.MISSING)]
        if unreachable:
            state, why = ProjectState.DEGRADED, "unreachable: " + ", ".join(
                h.name for h in unreachable)
        elif failed:
            state, why = ProjectState.DEGRADED, f"{len(failed)} change(s) failed"
        elif bad:
            state, why = ProjectState.DEGRADED, f"{len(bad)} object(s) degraded or missing"
        elif any(o.health is Health.PROGRESSING or o.sync is SyncStatus.PROGRESSING
                 for o in objects):
            state, why = ProjectState.PROGRESSING, "objects on their way"
        else:
            state, why = ProjectState.HEALTHY, ""
        return self._status(loaded, state, why, None, tuple(objects), tuple(hosts),
                            tuple(pending), project_plan_json(plan))

    def _status(self, loaded: Loaded, state: ProjectState, why: str, record: SyncRecord | None,
                objects: tuple[ObjectStatus, ...], hosts: tuple[HostStatus, ...],
                pending: tuple[str, ...], plan: dict[str, Any]) -> ProjectStatus:
        policy = loaded.policy
        last_success = self.last_status.last_success if self.last_status else None
        if record is not None and record.result not in (SyncResult.FAILED,
                                                          SyncResult.SUSPENDED):
            last_success = record.finished
        return ProjectStatus(
            loaded.config.name, loaded.checkout.spec.display, state,
            self.suspended or policy.suspend, why, loaded.checkout.commit, record,
            last_success, hosts, objects, pending,
            policy.window_state(dt.datetime.now(dt.UTC)), None, policy.summary(), plan)

    def _keep(self, status: ProjectStatus) -> ProjectStatus:
        if status.last_sync is not None and status.last_sync.result is not SyncResult.FAILED:
            status = replace(status, last_success=status.last_sync.finished)
        self.last_status = status
        return status

    def _failed(self, trigger: str, started: float, commit: Commit | None, errors: list[str],
                now: Callable[[], float], state: ProjectState, why: str) -> Outcome:
        record = SyncRecord(self.name, started, now(), trigger, SyncResult.FAILED, commit,
                            errors[0].splitlines()[0] if errors else why,
                            errors=tuple(errors))
        previous = self.last_status
        if self.last_good is not None:
            status = self._status(self.last_good, state, why, None,
                                  previous.objects if previous else (),
                                  previous.hosts if previous else (),
                                  previous.pending_restarts if previous else (),
                                  previous.plan if previous else {})
        else:
            status = ProjectStatus(self.name, self.source.spec.display, state, self.suspended,
                                   why)
        status = replace(status, last_sync=record,
                         last_success=previous.last_success if previous else None)
        self.last_status = status
        return Outcome(record, status, False)


class _InvalidCommit(Exception):
    def __init__(self, commit: Commit, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.commit, self.errors = commit, errors


def _load_commit(checkout: Checkout, source: ProjectSource) -> Loaded:
    """A commit's project file (the one under its path, else this machine's), its documents and
    its policy; ManifestError, located, when any of it is invalid."""
    root = checkout.manifests
    project_path = _project_file_in(checkout)
    if project_path is None and source.local_project_file:
        project_path = source.local_project_file
    project_doc = load_project_file(project_path) if project_path else None
    config = resolve(project_doc, source.overrides)
    if os.path.isdir(root):
        # a directory without manifests is an empty set (allowEmpty decides), not an error
        loaded = documents.load([root], recursive=True) if _has_manifests(root) else []
    else:
        loaded = documents.load([root])
    _, rest = split_project(loaded, config.source)
    from ..manifest.project import place, with_defaults
    docs = with_defaults(rest, config)
    from ..manifest import validate
    validate.check_schemas(docs)
    placement = place(docs, config)
    policy = read_policy(project_doc, docs)
    # Checked and placed once: every round's Deployment at this commit takes them.
    return Loaded(checkout, config, policy, docs, Prepared(docs, placement))


def _name_in(checkout: Checkout, source: ProjectSource) -> str | None:
    """The project's name at a commit that does not load, if its project file does."""
    path = _project_file_in(checkout) or source.local_project_file
    try:
        return resolve(load_project_file(path) if path else None, source.overrides).name
    except KvmctlError:
        return None


def _has_manifests(root: str) -> bool:
    return any(p.is_file() and p.suffix in documents.MANIFEST_SUFFIXES
               for p in Path(root).glob("**/*"))


def _project_file_in(checkout: Checkout) -> str | None:
    """kvmctl.yaml in the manifests' directory (only that path of the commit is extracted), or
    beside the manifests' file when the path names one."""
    top = os.path.realpath(checkout.root)
    here = os.path.realpath(checkout.manifests)
    if not os.path.isdir(here):
        here = os.path.dirname(here)
    while True:
        candidate = os.path.join(here, PROJECT_FILE)
        if os.path.isfile(candidate):
            return candidate
        if here == top or not here.startswith(top):
            return None
        here = os.path.dirname(here)


@contextlib.contextmanager
def _deployment(loaded: Loaded, lock: LockRequest | None = None
                ) -> Iterator[tuple[Deployment, list[HostStatus]]]:
    """The project's hosts read (and locked, with `lock`); hosts that do not answer are left
    out and reported, the others go on."""
    config = loaded.config
    hosts = {h.name: HostStatus(h.name, h.uri, True) for h in config.hosts}
    only: tuple[str, ...] = ()
    with contextlib.ExitStack() as held:
        if lock is not None:
            from ..apply.lock import project_lock
            for h in sorted(config.hosts, key=lambda h: h.uri):
                held.enter_context(project_lock(h.uri, config.name, lock.timeout))
        while True:
            try:
                deployment = Deployment(config, docs=loaded.documents, only=only, lock=lock,
                                        prepared=loaded.prepared)
                break
            except UnreachableError as exc:
                for name, uri, why in exc.hosts:
                    hosts[name] = HostStatus(name, uri, False, why)
                only = tuple(h for h in config.host_names if hosts[h].reachable)
                if not only:
                    raise
        held.callback(deployment.close)
        yield deployment, list(hosts.values())


def _degraded(status: ProjectStatus, notes: list[str]) -> ProjectStatus:
    """A round made with the last good commit because git did not answer: degraded."""
    if not notes:
        return status
    return replace(status, state=ProjectState.DEGRADED, state_reason=notes[0])


def _stamp(path: str | None) -> int | None:
    """When a local project file last changed (its edit is a new configuration)."""
    if not path:
        return None
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _lock(timeout: float, command: str) -> LockRequest:
    return LockRequest(timeout, None, command)


def _runnable(plan: ProjectPlan, waits: dict[str, str]) -> list[Change]:
    return [c for c in plan.changes if (c.steps or c.move_steps) and not c.blocked
            and c.id not in waits]


def _without(plan: ProjectPlan, waits: dict[str, str]) -> ProjectPlan:
    """The plan with the changes that wait stripped of their steps (apply skips them)."""
    def strip(c: Change) -> Change:
        return replace(c, steps=(), move_steps=(), upkeep=()) if c.id in waits else c

    hosts = tuple(replace(h, plan=replace(h.plan, changes=tuple(strip(c)
                                                                  for c in h.plan.changes)))
                  for h in plan.hosts)
    return replace(plan, hosts=hosts, moves=tuple(strip(c) for c in plan.moves))


def _differs(c: Change) -> bool:
    return c.change_class is not ChangeClass.NOOP


def _object_status(c: Change, health: dict[str, tuple[Health, str]], waits: dict[str, str],
                   failed: dict[str, str], done: set[str]) -> ObjectStatus:
    if c.change_class is ChangeClass.DELETE:
        shown, why = Health.HEALTHY, "no longer in git"
    else:
        shown, why = health.get(c.id, (Health.UNKNOWN, ""))
    fields = tuple(FieldChange(f.field, MASK if f.sensitive else _shown(f.old),
                               MASK if f.sensitive else _shown(f.new)) for f in c.fields)
    if c.id in failed:
        sync, error = SyncStatus.FAILED, failed[c.id]
    elif c.id in done:
        sync, error = SyncStatus.PROGRESSING, ""
        shown, why = (Health.PROGRESSING, "just changed") if shown is not Health.HEALTHY \
            else (shown, why)
    elif _differs(c):
        sync, error = SyncStatus.OUT_OF_SYNC, ""
    else:
        sync, error = SyncStatus.SYNCED, ""
    waiting = waits.get(c.id, "") or (c.blocked or "")
    return ObjectStatus(c.host, str(c.kind), c.name, sync, shown, why,
                        "" if c.change_class is ChangeClass.NOOP else str(c.change_class),
                        c.reasons, fields, waiting, error)


def _health(deployment: Deployment, plan: ProjectPlan, parallelism: int
            ) -> dict[str, tuple[Health, str]]:
    """Each declared object's health on its host, by change id; the probes of a host run side
    by side (a guest agent that does not answer costs its timeout, once)."""
    out: dict[str, tuple[Health, str]] = {}
    for name, session in deployment.sessions.items():
        probe = HostProbe(session.hv, session.live, _is_local(session.uri))
        wanted = [c for c in plan.host_plan(name).plan.changes
                  if c.kind is not Kind.SEED and c.change_class is not ChangeClass.DELETE]
        with ThreadPoolExecutor(max_workers=max(1, min(parallelism, len(wanted)))) as pool:
            found = pool.map(_probe, wanted, [session.manifest] * len(wanted),
                             [probe] * len(wanted))
            out.update(zip((c.id for c in wanted), found, strict=True))
    for c in plan.moves:
        out[c.id] = (Health.UNKNOWN, "moving")
    return out


def _probe(c: Change, manifest: ManifestSet, probe: HostProbe) -> tuple[Health, str]:
    try:
        return object_health(c.kind, c.name, manifest, probe)
    except KvmctlError as exc:
        return Health.UNKNOWN, f"could not be read: {str(exc).splitlines()[0]}"


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, tuple):
        return ", ".join(_shown(v) for v in value)
    return str(value)


def _summary(result: SyncResult, done: tuple[str, ...], waits: dict[str, str],
             notes: list[str]) -> str:
    parts = []
    if result is SyncResult.SYNCED:
        parts.append("in sync")
    if done:
        parts.append(f"{len(done)} change(s) made")
    if waits:
        parts.append(f"{len(waits)} waiting")
    if result is SyncResult.OUT_OF_SYNC and not waits:
        parts.append("out of sync")
    return "; ".join(parts + notes)


def _problems(exc: ManifestError, checkout: Checkout) -> list[str]:
    return [_relative(str(p), checkout) for p in exc.problems]


def _relative(text: str, checkout: Checkout) -> str:
    """Locations inside the extracted tree, written as the repository's paths."""
    tree = os.path.basename(os.path.normpath(checkout.root))  # <sha>-<key>: unique
    return re.sub(r"[^\s'\"]*" + re.escape(tree) + "/", "", text)


def _is_local(uri: str) -> bool:
    scheme, _, rest = uri.partition("://")
    return "+" not in scheme and not rest.split("/", 1)[0]
