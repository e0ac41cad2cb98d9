"""The controller's loop: one ProjectWorker per project (its schedule, back-off, wake-ups), the
Controller over them (stop, suspend, webhooks), and one whole run against real git and
libvirt's in-process test driver.

The schedule tests use a Reconciler whose round (`_reconcile`) is scripted, so that the real
`Reconciler.reconcile` (and its lock) and the real worker thread run around it; nothing of
git or libvirt is replaced.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifest_docs import doc
from testdriver import install

from kvmctl.controller.loop import (
    MAX_BACKOFF,
    SETTLE_INTERVAL,
    Controller,
    ControllerSettings,
    ProjectWorker,
)
from kvmctl.errors import UsageError
from kvmctl.source import GitCache, SourceSpec
from kvmctl.sync.reconcile import Outcome, ProjectSource, Reconciler
from kvmctl.sync.status import ProjectState, ProjectStatus, SyncRecord, SyncResult

OK, FAILED, CHANGED = "ok", "failed", "changed"


def outcome(name: str, trigger: str, what: str) -> Outcome:
    now = time.time()
    result = {OK: SyncResult.SYNCED, FAILED: SyncResult.FAILED,
              CHANGED: SyncResult.APPLIED}[what]
    state = ProjectState.DEGRADED if what == FAILED else ProjectState.HEALTHY
    return Outcome(SyncRecord(name, now, now, trigger, result),
                   ProjectStatus(name, "src", state), changed=what == CHANGED)


class Scripted(Reconciler):
    """A Reconciler whose rounds give the results of `script` in turn (the last one again when
    it runs out), each taking `seconds`; it notes every round's trigger and start, and how many
    ran at once."""

    def __init__(self, cache: GitCache, script: list[str | Exception], seconds: float = 0.0,
                 repo: str = "https://git.example.org/org/repo.git") -> None:
        super().__init__(ProjectSource(SourceSpec.of(repo), label="p"), cache)
        self.script = list(script)
        self.seconds = seconds
        self.rounds: list[tuple[str, float]] = []
        self.stops: list[Callable[[], bool] | None] = []
        self.active = 0
        self.peak = 0
        self._guard = threading.Lock()
        self.ran = threading.Event()

    def _reconcile(self, trigger: str, stop: Callable[[], bool] | None, dry_run: bool,
                   now: Callable[[], float]) -> Outcome:
        with self._guard:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.rounds.append((trigger, time.monotonic()))
            self.stops.append(stop)
            what = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        try:
            if self.seconds:
                time.sleep(self.seconds)
            if isinstance(what, Exception):
                raise what
            return outcome(self.name, trigger, what)
        finally:
            with self._guard:
                self.active -= 1
            self.ran.set()

    def wait_rounds(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.rounds) < n:
            assert time.monotonic() < deadline, f"only {len(self.rounds)} of {n} rounds"
            time.sleep(0.005)


@pytest.fixture
def cache(tmp_path: Path) -> GitCache:
    return GitCache(str(tmp_path / "git"))


def worker_for(reconciler: Reconciler, tmp_path: Path, interval: float | None,
               stopping: threading.Event | None = None,
               seen: list[Outcome] | None = None) -> ProjectWorker:
    settings = ControllerSettings(str(tmp_path / "state"), interval=interval)
    return ProjectWorker(reconciler, settings,
                         lambda _w, o: seen.append(o) if seen is not None else None,
                         stopping or threading.Event())


@pytest.fixture
def stopping() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # every worker a test started ends with it


# ---- the schedule ------------------------------------------------------------------------------

def delay_after(worker: ProjectWorker, result: Outcome | None) -> float:
    before = time.time()
    worker._schedule(result)
    return worker.next_due - before


def test_backoff_grows_exponentially_capped_and_resets(cache: GitCache, tmp_path: Path) -> None:
    r = Scripted(cache, [OK])
    w = worker_for(r, tmp_path, interval=10.0)
    delays = [delay_after(w, outcome("p", "poll", FAILED)) for _ in range(9)]
    assert [round(d) for d in delays] == [10, 20, 40, 80, 160, 320, 640, 900, 900]
    assert MAX_BACKOFF == 900.0 and w.failures == 9
    assert round(delay_after(w, outcome("p", "poll", OK))) == 10 and w.failures == 0
    assert round(delay_after(w, outcome("p", "poll", FAILED))) == 10  # from the start again
    assert round(delay_after(w, None)) == 20  # an internal error counts as a failure
    assert w.failures == 2


def test_after_a_change_the_next_round_comes_soon(cache: GitCache, tmp_path: Path) -> None:
    w = worker_for(Scripted(cache, [OK]), tmp_path, interval=120.0)
    assert delay_after(w, outcome("p", "poll", CHANGED)) == pytest.approx(SETTLE_INTERVAL,
                                                                          abs=0.5)
    progressing = outcome("p", "poll", OK)
    progressing = Outcome(progressing.record,
                          ProjectStatus("p", "src", ProjectState.PROGRESSING), False)
    assert delay_after(w, progressing) == pytest.approx(SETTLE_INTERVAL, abs=0.5)
    assert delay_after(w, outcome("p", "poll", OK)) == pytest.approx(120.0, abs=0.5)
    short = worker_for(Scripted(cache, [OK]), tmp_path, interval=2.0)
    assert delay_after(short, outcome("p", "poll", CHANGED)) == pytest.approx(2.0, abs=0.5)


def test_the_interval_without_a_setting_is_the_default(cache: GitCache, tmp_path: Path) -> None:
    w = worker_for(Scripted(cache, [OK]), tmp_path, interval=None)
    assert w.interval() == 60.0
    assert round(delay_after(w, outcome("p", "poll", FAILED))) == 60


def test_the_worker_thread_backs_off_then_resets(cache: GitCache, tmp_path: Path,
                                                 stopping: threading.Event) -> None:
    base = 0.1
    r = Scripted(cache, [FAILED, FAILED, FAILED, OK, OK])
    seen: list[Outcome] = []
    w = worker_for(r, tmp_path, interval=base, stopping=stopping, seen=seen)
    w.thread.start()
    r.wait_rounds(5)
    stopping.set()
    w.thread.join(5)
    assert not w.thread.is_alive()
    triggers = [t for t, _ in r.rounds]
    assert triggers[:5] == ["start", "poll", "poll", "poll", "poll"]
    starts = [at for _, at in r.rounds]
    gaps = [b - a for a, b in zip(starts, starts[1:5], strict=False)]
    wanted = [base, 2 * base, 4 * base, base]  # back-off 1, 2, 4 intervals; then the interval
    for gap, want in zip(gaps, wanted, strict=True):
        assert want - 0.02 <= gap <= want + 0.4, (gaps, wanted)
    assert [o.record.result for o in seen[:5]] == [SyncResult.FAILED] * 3 + [SyncResult.SYNCED] * 2
    assert w.failures == 0


def test_an_internal_error_backs_off_and_the_worker_goes_on(cache: GitCache, tmp_path: Path,
                                                            stopping: threading.Event) -> None:
    r = Scripted(cache, [RuntimeError("a bug"), OK])
    seen: list[Outcome] = []
    w = worker_for(r, tmp_path, interval=0.05, stopping=stopping, seen=seen)
    w.thread.start()
    r.wait_rounds(2)
    stopping.set()
    w.thread.join(5)
    assert seen and seen[0].record.result is SyncResult.SYNCED  # the error itself: no outcome


def test_request_wakes_the_worker_at_once(cache: GitCache, tmp_path: Path,
                                          stopping: threading.Event) -> None:
    r = Scripted(cache, [OK])
    w = worker_for(r, tmp_path, interval=3600.0, stopping=stopping)
    w.thread.start()
    r.wait_rounds(1)
    while w.busy or w.next_due < time.time() + 3000:
        time.sleep(0.005)  # the first round is scheduled: the next is an hour away
    w.request("webhook")
    r.wait_rounds(2, timeout=2.0)  # the next poll is an hour away: only the request runs it
    assert r.rounds[1][0] == "webhook"


def test_a_request_during_a_round_runs_right_after_it(cache: GitCache, tmp_path: Path,
                                                      stopping: threading.Event) -> None:
    r = Scripted(cache, [OK], seconds=0.2)
    w = worker_for(r, tmp_path, interval=3600.0, stopping=stopping)
    w.thread.start()
    r.wait_rounds(1)
    w.request("manual")
    w.request("webhook")  # the first request's trigger is kept
    r.wait_rounds(2, timeout=2.0)
    assert [t for t, _ in r.rounds] == ["start", "manual"]
    time.sleep(0.3)
    assert len(r.rounds) == 2  # one request, one round


def test_two_reconciles_of_one_project_never_overlap(cache: GitCache, tmp_path: Path,
                                                     stopping: threading.Event) -> None:
    r = Scripted(cache, [OK], seconds=0.1)
    w = worker_for(r, tmp_path, interval=0.01, stopping=stopping)
    w.thread.start()  # the worker's own rounds, back to back
    threads = [threading.Thread(target=r.reconcile, args=(f"manual {i}",)) for i in range(3)]
    for t in threads:
        t.start()
    w.request("webhook")
    for t in threads:
        t.join(10)
    r.wait_rounds(5)
    stopping.set()
    w.thread.join(5)
    assert r.peak == 1, r.rounds


# ---- the Controller ----------------------------------------------------------------------------

def controller(tmp_path: Path, *repos: str, interval: float = 3600.0) -> Controller:
    sources = [ProjectSource(SourceSpec.of(repo), label=f"p{i}") for i, repo in
               enumerate(repos)]
    return Controller(sources, ControllerSettings(str(tmp_path / "state"), interval=interval))


def test_a_controller_needs_a_project(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no project to run"):
        Controller([], ControllerSettings(str(tmp_path / "state")))


def test_stop_returns_promptly_and_every_worker_ends(tmp_path: Path) -> None:
    c = controller(tmp_path, "https://git.invalid/a.git", "https://git.invalid/b.git")
    scripted = []
    for w in c.workers:
        w.reconciler = Scripted(GitCache(str(tmp_path / "git")), [OK])
        scripted.append(w.reconciler)
    c.start()
    for r in scripted:
        r.wait_rounds(1)
    assert c.stop(timeout=5)
    assert not any(w.thread.is_alive() for w in c.workers)


def test_stop_lets_the_round_in_progress_finish(tmp_path: Path) -> None:
    c = controller(tmp_path, "https://git.invalid/a.git")
    r = Scripted(GitCache(str(tmp_path / "git")), [OK], seconds=0.3)
    c.workers[0].reconciler = r
    c.start()
    while not r.rounds:
        time.sleep(0.005)
    stop = r.stops[0]
    assert stop is not None and not stop()
    assert c.stop(timeout=5)
    assert stop()  # the round was told: it starts no other change
    assert r.ran.is_set() and r.active == 0 and len(r.rounds) == 1
    assert not c.workers[0].thread.is_alive()


def test_stop_with_a_timeout_says_whether_all_ended(tmp_path: Path) -> None:
    c = controller(tmp_path, "https://git.invalid/a.git")
    r = Scripted(GitCache(str(tmp_path / "git")), [OK], seconds=1.0)
    c.workers[0].reconciler = r
    c.start()
    while not r.rounds:
        time.sleep(0.005)
    assert c.stop(timeout=0.05) is False
    assert c.stop(timeout=5) is True


FORMS = ["https://git.example.org/org/repo.git", "git@git.example.org:org/repo.git",
         "ssh://git@git.example.org/org/repo", "http://git.example.org/org/repo/",
         "https://GIT.example.org/org/repo", "ssh://git@git.example.org:2222/org/repo.git",
         "https://deploy:s3cret@git.example.org/org/repo.git",
         "git://git.example.org/org/repo.git"]


@pytest.mark.parametrize("configured", FORMS)
def test_a_webhook_finds_its_project_however_the_url_is_written(tmp_path: Path,
                                                                configured: str) -> None:
    c = controller(tmp_path, configured, "https://git.example.org/org/other.git",
                   "https://elsewhere.example.org/org/repo.git")
    for sent in FORMS:
        assert c.webhook_project([sent]) == ["p0"], (configured, sent)
    assert c.webhook_project(["https://git.example.org/org/other"]) == ["p1"]
    assert c.webhook_project(["git@elsewhere.example.org:org/repo.git"]) == ["p2"]
    assert c.webhook_project(["https://git.example.org/org/repo2.git", ""]) == []
    assert c.webhook_project([FORMS[0], "https://git.example.org/org/other.git"]) == ["p0",
                                                                                      "p1"]


def test_set_suspended_and_request_sync_by_name(tmp_path: Path) -> None:
    c = controller(tmp_path, "https://git.invalid/a.git")
    r = Scripted(GitCache(str(tmp_path / "git")), [OK])
    c.workers[0].reconciler = r
    assert c.set_suspended("nobody", True) is False
    assert c.request_sync("nobody", "manual") is False
    status = c.project("p")
    assert status is not None and status.state is ProjectState.UNKNOWN
    assert c.set_suspended("p", True) is True
    assert r.suspended
    status = c.project("p")
    assert status is not None and status.suspended  # and not reconciled yet
    assert c.workers[0]._requested == "start"  # the worker has not run: "start" comes first
    assert c.set_suspended("p", False) and not r.suspended
    assert c.request_sync("p", "webhook")
    assert [p.name for p in c.projects()] == ["p"]


# ---- one whole run: real git, the test driver ------------------------------------------------

def git(work: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=Ada Lovelace", "-c",
                           "user.email=ada@example.org", "-C", str(work), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def wait_for(what: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_controller_syncs_suspends_and_resumes(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    (tmp_path / "host").mkdir()
    hv, uri = install(monkeypatch, tmp_path / "host")
    work = tmp_path / "repo"
    (work / "m").mkdir(parents=True)
    git(work, "init", "-q", "-b", "main")
    project = {"apiVersion": "kvmctl/v1", "kind": "Project", "metadata": {"name": "live"},
               "spec": {"hosts": [{"name": "h1", "uri": uri, "domainType": "qemu"}]}}
    (work / "m" / "kvmctl.yaml").write_text(yaml.safe_dump(project), encoding="utf-8")

    def net(name: str, third: int) -> str:
        return yaml.safe_dump(doc("Network", name, {"mode": "nat", "ipv4": {
            "cidr": f"10.253.{third}.0/24",
            "dhcp": {"start": f"10.253.{third}.100", "end": f"10.253.{third}.199"}}}))

    (work / "m" / "a.yaml").write_text(net("c-a", 1), encoding="utf-8")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "one network")
    c = Controller([ProjectSource(SourceSpec.of(work.as_uri(), "main", "m"))],
                   ControllerSettings(str(tmp_path / "state"), interval=3600.0))

    def networks() -> set[str]:
        return {n.name() for n in hv.conn.listAllNetworks()}

    c.start()
    try:
        first = wait_for(lambda: c.project("live"))
        assert first.last_sync is not None
        assert first.last_sync.result in (SyncResult.APPLIED, SyncResult.SYNCED)
        assert networks() == {"c-a"}
        assert c.metrics is not None
        assert c.set_suspended("live", True)
        wait_for(lambda: (s := c.project("live")) and s.last_sync
                 and s.last_sync.result is SyncResult.SUSPENDED)
        (work / "m" / "b.yaml").write_text(net("c-b", 2), encoding="utf-8")
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", "two networks")
        assert c.request_sync("live", "manual")
        time.sleep(0.2)
        assert networks() == {"c-a"}  # suspended: nothing made
        assert c.webhook_project([work.as_uri() + ".git"]) == ["live"]
        assert c.set_suspended("live", False)
        wait_for(lambda: networks() == {"c-a", "c-b"})
        done = wait_for(lambda: (s := c.project("live")) and s.last_sync
                        and s.last_sync.result is SyncResult.APPLIED and s)
        assert not done.suspended and done.next_sync is not None
    finally:
        c.stop()
    assert not c.workers[0].thread.is_alive()
