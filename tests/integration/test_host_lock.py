"""The lock on the hypervisor (kvmctl.apply.hostlock over kvmctl.host.leases) against the real
libvirtd: it serialises separate processes whose local lock directories differ, a holder killed
by SIGKILL is taken over once its lease has expired, and of racing creators exactly one wins.

Every lease record is named after the test's ``prefix`` (the project name starts with it) and
is removed at teardown; the ``kvmctl-locks`` pool itself stays (it is kvmctl's, and may hold
other leases).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from thread_support import run_in_threads

from kvmctl.apply.hostlock import SKEW_S, Record, hypervisor_lock, project_key
from kvmctl.errors import LockError
from kvmctl.host.hypervisor import Hypervisor
from kvmctl.host.leases import POOL_NAME, LeaseStore

URI = os.environ.get("KVMCTL_TEST_URI", "qemu:///system")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# Takes the local lock (in $KVMCTL_LOCK_DIR) and the lock on the hypervisor, as an apply would,
# notes when it held it, and holds it for a while.
HOLDER = r"""
import sys, time
from kvmctl.apply.hostlock import hypervisor_lock, holder_line
from kvmctl.apply.lock import project_lock
from kvmctl.host.hypervisor import Hypervisor
from kvmctl.host.leases import LeaseStore
uri, project, hold, lease, log = sys.argv[1:6]
store = LeaseStore(Hypervisor(uri))
with project_lock(uri, project, 60):
    with hypervisor_lock(store, project, holder_line("test holder"), 60, lease_s=float(lease),
                         waiting=lambda m: print("WAITING", m, flush=True)):
        with open(log, "a") as f:
            f.write(f"start {time.time()}\n")
        print("HELD", flush=True)
        time.sleep(float(hold))
        with open(log, "a") as f:
            f.write(f"end {time.time()}\n")
"""


def lease_volumes(conn, prefix: str) -> list[str]:
    pool = conn.storagePoolLookupByName(POOL_NAME)
    return sorted(v.name() for v in pool.listAllVolumes(0) if v.name().startswith(prefix))


@pytest.fixture
def store(conn, cleanup, prefix):
    """A LeaseStore on its own connection; this test's lease records are removed at the end."""
    hv = Hypervisor(URI)
    s = LeaseStore(hv)
    s.ensure_pool()
    yield s
    try:
        pool = conn.storagePoolLookupByName(POOL_NAME)
        for vol in pool.listAllVolumes(0):
            if vol.name().startswith(prefix):
                vol.delete(0)
    finally:
        hv.close()


@pytest.fixture
def holders():
    """Start HOLDER processes; any still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(project: str, hold: float, lease: float, lock_dir: Path, log: Path,
              wrap: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        env = dict(os.environ, KVMCTL_LOCK_DIR=str(lock_dir), PYTHONPATH=str(ROOT))
        p = subprocess.Popen([*wrap, sys.executable, "-c", HOLDER, URI, project, str(hold),
                              str(lease), str(log)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate()


def wait_held(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()
    if line != "HELD\n":
        p.kill()
        pytest.fail(f"holder did not get the lock: {line!r} {p.communicate()[1]}")


def test_processes_with_different_local_lock_dirs_are_serialised(store, holders, prefix,
                                                                 tmp_path):
    project = prefix + "serial"
    log = tmp_path / "log"
    first = holders(project, 1.5, 30, tmp_path / "locks-a", log)
    wait_held(first)
    second = holders(project, 0.1, 30, tmp_path / "locks-b", log)
    out2, err2 = second.communicate(timeout=60)
    out1, err1 = first.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    # each took its local lock (different directories: that lock did not serialise them) ...
    assert list((tmp_path / "locks-a").glob("*.lock")) and list((tmp_path / "locks-b").glob(
        "*.lock"))
    # ... and the second waited on the hypervisor, told who held it, until the first was done
    waited = [line for line in out2.splitlines() if line.startswith("WAITING")]
    assert len(waited) == 1 and "HELD" in out2, out2
    assert (f"project '{project}' on {URI} is locked by " in waited[0]
            and f"pid {first.pid} (test holder) since " in waited[0]), waited[0]
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end", "start", "end"], events
    assert float(events[1][1]) <= float(events[2][1])
    assert lease_volumes(store.hv.conn, prefix) == []


# A holder in a pid namespace of its own is one this process cannot judge, as one on another
# machine: its record names a process this kernel's view here does not hold.
ELSEWHERE = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc")


@pytest.mark.parametrize("same_machine", [True, False], ids=["here", "elsewhere"])
def test_a_holder_killed_by_sigkill_is_taken_over(store, holders, prefix, tmp_path,
                                                  same_machine):
    """A holder of this machine that is gone is stale at once (its record names its process),
    long before its lease (300 s) would run out; one the lock cannot judge (in another pid
    namespace, as on another machine) only once its lease (3 s) ran out."""
    project = prefix + "killed"
    lease = f"{project_key(project)}.lease"
    victim = holders(project, 300, 300 if same_machine else 3, tmp_path / "locks-a",
                     tmp_path / "log", () if same_machine else ELSEWHERE)
    wait_held(victim)
    named = rf"pid {victim.pid}" if same_machine else r"pid \d+"
    with pytest.raises(LockError, match=rf"locked by \S+ {named} \(test holder\)"):
        with hypervisor_lock(store, project, "test pid 0 (pytest)", 0, lease_s=3):
            pass
    seen = Record.parse(store.read(lease) or b"")
    assert seen is not None
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed = time.monotonic()
    told: list[str] = []
    with hypervisor_lock(store, project, "test pid 0 (pytest)", 60, waiting=told.append,
                         lease_s=3):
        taken = time.monotonic()
        if not same_machine:  # not before its lease (as last seen, or renewed later) and skew
            assert time.time() > seen.expires_at + SKEW_S
            assert len(told) == 1 and "(test holder)" in told[0], told
        mine = Record.parse(store.read(lease) or b"")
        assert mine is not None and mine.holder == "test pid 0 (pytest)"
        assert lease_volumes(store.hv.conn, prefix) == [lease]  # no takeover marker left
    assert lease_volumes(store.hv.conn, prefix) == []
    print(f"taken over {taken - killed:.1f} s after the SIGKILL (lease "
          f"{seen.lease_s:g} s, skew {SKEW_S} s, "
          f"{'same machine' if same_machine else 'judged by its lease'})")


def test_of_two_racing_creators_exactly_one_wins_50_times(store, prefix):
    """Two clients (own connections) create the same record at the same moment, 50 times."""
    stores = [LeaseStore(Hypervisor(URI)) for _ in range(2)]
    try:
        for n in range(50):
            name = f"{prefix}race-{n}.lease"
            start = threading.Barrier(2)
            won: list[bool | None] = [None, None]

            def create(i: int, name: str = name, start: threading.Barrier = start,
                       won: list[bool | None] = won) -> None:
                start.wait()
                won[i] = stores[i].create(name, f"creator {i}".encode())

            run_in_threads(create, 2)
            assert sorted(won) == [False, True], (n, won)  # type: ignore[type-var]
            assert store.read(name) == f"creator {won.index(True)}".encode()
            assert store.delete(name)
    finally:
        for s in stores:
            s.hv.close()
    assert lease_volumes(store.hv.conn, prefix) == []


def test_racing_lockers_never_overlap_and_one_takes_over_a_stale_lease(store, prefix):
    project = prefix + "race"
    lease = f"{project_key(project)}.lease"
    stores = [LeaseStore(Hypervisor(URI)) for _ in range(4)]
    inside: list[int] = []
    overlaps: list[tuple[int, ...]] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(5):
                with hypervisor_lock(stores[i], project, f"worker {i}", 60):
                    inside.append(i)
                    if len(inside) > 1:
                        overlaps.append(tuple(inside))
                    time.sleep(0.01)
                    inside.remove(i)
        except BaseException as e:  # reported below
            errors.append(e)

    try:
        run_in_threads(worker, 4)
        assert errors == [] and overlaps == []

        for _ in range(5):  # a stale lease, four takers at once: one wins, the others give up
            dead = Record("lease", project, "ghost pid 1 (dead)", "0f" * 8, time.time() - 99,
                          time.time() - 60, 30.0)
            assert store.create(lease, dead.to_bytes())
            start = threading.Barrier(4)
            won: list[int] = []
            failed: list[str] = []

            def take(i: int, start: threading.Barrier = start, won: list[int] = won,
                     failed: list[str] = failed) -> None:
                start.wait()
                try:
                    with hypervisor_lock(stores[i], project, f"taker {i}", 0):
                        won.append(i)
                        time.sleep(0.5)
                except LockError as e:
                    failed.append(str(e))

            run_in_threads(take, 4)
            assert len(won) == 1 and len(failed) == 3, (won, failed)
            assert lease_volumes(store.hv.conn, prefix) == []
    finally:
        for s in stores:
            s.hv.close()
