"""The controller: one worker per project reconciling it on its interval (and at once on a
webhook or a "sync now"), with exponential back-off after failures, a history, metrics, and the
web layer reading it all through `ControllerView`.

Each project has one worker thread and one Reconciler, whose lock makes two reconciles of one
project impossible; the hypervisor-side lock `kvmctl apply` takes serialises it against people
and CI jobs. A stop request (SIGTERM) lets the change in progress finish and starts no other;
a SIGKILL leaves nothing the next start does not converge (locks die with the process, or
expire on the hypervisor).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import UsageError
from ..source import GitCache
from ..sync.reconcile import Outcome, ProjectSource, Reconciler
from ..sync.status import ProjectState, ProjectStatus, SyncRecord, SyncResult
from .history import History
from .metrics import Metrics

log = logging.getLogger("kvmctl.controller")

SETTLE_INTERVAL = 5.0  # seconds to the next round after one that changed something
SETTLE_ROUNDS = 12  # at most this many such rounds in a row
MAX_BACKOFF = 900.0


@dataclass(frozen=True)
class ControllerSettings:
    state_dir: str
    interval: float | None = None  # overrides every project's spec.sync.interval
    lock_timeout: float = 30.0
    parallelism: int = 8


class ProjectWorker:
    """One project: its reconciler, its schedule and back-off, its thread."""

    def __init__(self, reconciler: Reconciler, settings: ControllerSettings,
                 on_outcome: Callable[[ProjectWorker, Outcome], None],
                 stopping: threading.Event) -> None:
        self.reconciler = reconciler
        self.settings = settings
        self._on_outcome = on_outcome
        self._stopping = stopping
        self._wake = threading.Condition()
        self._requested: str | None = "start"
        self.failures = 0
        self.settling = 0
        self.next_due = time.time()
        self.busy = False
        self.thread = threading.Thread(target=self._run, name=f"project {reconciler.name}",
                                       daemon=True)

    @property
    def name(self) -> str:
        return self.reconciler.name

    def interval(self) -> float:
        if self.settings.interval is not None:
            return self.settings.interval
        loaded = self.reconciler.last_good
        return loaded.policy.interval if loaded else 60.0

    def request(self, trigger: str) -> None:
        with self._wake:
            self._requested = self._requested or trigger
            self._wake.notify_all()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._wake:
                while not self._stopping.is_set() and self._requested is None \
                        and time.time() < self.next_due:
                    self._wake.wait(timeout=min(1.0, max(0.05, self.next_due - time.time())))
                if self._stopping.is_set():
                    return
                trigger = self._requested or "poll"
                self._requested = None
            self.busy = True
            try:
                outcome = self.reconciler.reconcile(trigger, stop=self._stopping.is_set)
            except Exception as exc:  # a bug: logged, the project backs off, the others go on
                log.exception("project %s: internal error in a reconcile: %s", self.name, exc)
                outcome = None
            finally:
                self.busy = False
            self._schedule(outcome)
            if outcome is not None:
                self._on_outcome(self, outcome)

    def _schedule(self, outcome: Outcome | None) -> None:
        interval = self.interval()
        if outcome is None or outcome.record.result is SyncResult.FAILED:
            self.failures += 1
            delay = min(MAX_BACKOFF, interval * 2 ** min(self.failures - 1, 20))
        else:
            self.failures = 0
            # After a change, rounds come sooner for a while (a VM booting to its address),
            # never for good: an object that stays Progressing is seen at the interval.
            if outcome.changed:
                self.settling = SETTLE_ROUNDS
            settling = self.settling > 0 and (
                outcome.changed or outcome.status.state is ProjectState.PROGRESSING)
            self.settling = self.settling - 1 if settling else 0
            delay = min(interval, SETTLE_INTERVAL) if settling else interval
        self.next_due = time.time() + delay


class Controller:
    """Every project's worker, the history and the metrics; implements ControllerView."""

    def __init__(self, sources: list[ProjectSource], settings: ControllerSettings,
                 history: History | None = None) -> None:
        if not sources:
            raise UsageError("no project to run: give --repo, or --project-file with a "
                             "spec.sync.source")
        os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
        os.chmod(settings.state_dir, 0o700)
        self.settings = settings
        self.stopping = threading.Event()
        self.history = history
        self.metrics = Metrics(self.projects)
        cache = GitCache(os.path.join(settings.state_dir, "git"))
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[SyncResult, str]] = {}
        self._claims: dict[str, Reconciler] = {}
        self.workers: list[ProjectWorker] = []
        for source in sources:
            reconciler = Reconciler(source, cache, settings.lock_timeout, settings.parallelism,
                                    state_dir=settings.state_dir, claim=self._claim)
            self.workers.append(ProjectWorker(reconciler, settings, self._recorded,
                                              self.stopping))

    def _claim(self, project: str, reconciler: Reconciler) -> bool:
        """Whether `reconciler` may sync `project`: no other source of this controller does
        (the first to name it keeps it, from the moment its commit names it)."""
        with self._lock:
            owner = self._claims.setdefault(project, reconciler)
            return owner is reconciler

    # ---- running -----------------------------------------------------------------------------

    def start(self) -> None:
        for w in self.workers:
            w.thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask every worker to stop after the change in progress; True if all have."""
        self.stopping.set()
        for w in self.workers:
            w.wake()
        deadline = None if timeout is None else time.monotonic() + timeout
        for w in self.workers:
            w.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(w.thread.is_alive() for w in self.workers)

    def _recorded(self, worker: ProjectWorker, outcome: Outcome) -> None:
        record = outcome.record
        kept = (record.result, record.commit.sha if record.commit else "")
        # An idle round like the one before is not history: only what changed is kept.
        repeat = record.result is SyncResult.SYNCED and self._kept.get(record.project) == kept
        self._kept[record.project] = kept
        if self.history is not None and not repeat:
            try:
                record = self.history.record(record)
                self.history.event(record.project, record.finished,
                                   "error" if record.result is SyncResult.FAILED else "info",
                                   f"sync {record.result}: {record.summary}")
            except Exception as exc:
                log.warning("history unavailable: %s", exc)
        self.metrics.record(record)
        status = worker.reconciler.last_status
        if status is not None and status.last_sync is outcome.record:
            worker.reconciler.last_status = replace(status, last_sync=record)  # with its id
        _log_record(record, status)

    # ---- ControllerView ----------------------------------------------------------------------

    def projects(self) -> list[ProjectStatus]:
        return sorted((self._status_of(w) for w in self.workers), key=lambda s: s.name)

    def project(self, name: str) -> ProjectStatus | None:
        w = self._worker(name)
        return self._status_of(w) if w is not None else None

    def history_of(self, name: str | None = None, limit: int = 50) -> list[SyncRecord]:
        if self.history is None:
            return []
        try:
            return self.history.syncs(name, limit)
        except Exception as exc:
            log.warning("history unavailable: %s", exc)
            return []

    def request_sync(self, name: str, trigger: str) -> bool:
        w = self._worker(name)
        if w is None:
            return False
        log.info("project %s: sync requested (%s)", name, trigger)
        w.request(trigger)
        return True

    def set_suspended(self, name: str, suspended: bool) -> bool:
        w = self._worker(name)
        if w is None:
            return False
        w.reconciler.suspended = suspended
        log.info("project %s: %s", name, "suspended" if suspended else "resumed")
        w.request("manual")  # the status says so at once
        return True

    def webhook_project(self, repo_urls: list[str]) -> list[str]:
        wanted = {_normal_url(u) for u in repo_urls if u}
        return sorted(w.name for w in self.workers
                      if _normal_url(w.reconciler.source.spec.repo) in wanted)

    def _worker(self, name: str) -> ProjectWorker | None:
        return next((w for w in self.workers if w.name == name), None)

    def _status_of(self, w: ProjectWorker) -> ProjectStatus:
        status = w.reconciler.last_status
        if status is None:
            status = ProjectStatus(w.name, w.reconciler.source.spec.display,
                                   ProjectState.UNKNOWN, w.reconciler.suspended,
                                   "not reconciled yet")
        if w.reconciler.suspended and not status.suspended:
            status = replace(status, suspended=True, state=ProjectState.SUSPENDED,
                             state_reason="suspended through the API")
        return replace(status, next_sync=None if w.busy else w.next_due)


class ControllerViewAdapter:
    """The Controller as the web layer's ControllerView (its `history` is the database)."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def projects(self) -> list[ProjectStatus]:
        return self.c.projects()

    def project(self, name: str) -> ProjectStatus | None:
        return self.c.project(name)

    def history(self, name: str | None = None, limit: int = 50) -> list[SyncRecord]:
        return self.c.history_of(name, limit)

    def request_sync(self, name: str, trigger: str) -> bool:
        return self.c.request_sync(name, trigger)

    def set_suspended(self, name: str, suspended: bool) -> bool:
        return self.c.set_suspended(name, suspended)

    def webhook_project(self, repo_urls: list[str]) -> list[str]:
        return self.c.webhook_project(repo_urls)


def _normal_url(url: str) -> str:
    """A repository URL as forges and users variously write it, in one form."""
    text = url.strip().rstrip("/")
    text = text.removesuffix(".git")
    with_scheme = False
    for scheme in ("https://", "http://", "ssh://", "git://", "file://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
            with_scheme = True  # host:port and user:password@ are no scp syntax
            break
    host, _, path = text.partition("/")
    host = host.rpartition("@")[2].split(":")[0]
    first = text.split("/")[0]
    if not with_scheme and ":" in first and "@" in first:  # user@host:path
        host, _, path = text.rpartition("@")[2].partition(":")
    return f"{host.lower()}/{path.lstrip('/')}"


def _log_record(record: SyncRecord, status: ProjectStatus | None) -> None:
    level = logging.ERROR if record.result is SyncResult.FAILED else logging.INFO
    extra = {"project": record.project, "result": str(record.result),
             "trigger": record.trigger,
             "commit": record.commit.sha if record.commit else "",
             "changed": list(record.changed), "waiting": list(record.waiting),
             "failed": [f"{i}: {why}" for i, why in record.failed],
             "errors": list(record.errors), "duration": round(record.duration, 3),
             "state": str(status.state) if status else ""}
    log.log(level, "project %s: %s at %s (%s, %.2f s)%s", record.project, record.result,
            record.commit.short if record.commit else "no commit", record.summary or "-",
            record.duration, "".join(f"\n  {e}" for e in record.errors), extra={"kv": extra})

