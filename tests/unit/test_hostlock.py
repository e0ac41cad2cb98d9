"""The lock on the hypervisor (kvmctl.apply.hostlock), its policy against an in-memory store:
exclusive, waits and names its holder, renews its lease, takes over stale leases (one taker
only) and stale takeover markers, and never removes or overwrites a successor's lease."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable

import pytest
from testdriver import MemoryLockStore
from thread_support import run_in_threads

from kvmctl.apply.hostlock import HostLock, Record, hypervisor_lock, project_key
from kvmctl.errors import LockError

HOST = "qemu+ssh://root@hv1/system"


class FakeStore(MemoryLockStore):
    """testdriver's in-memory LeaseBackend (every operation atomic), optionally slowed to widen
    races, and logging what each delete removed."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(HOST)
        self.deleted: list[tuple[str, bytes]] = []
        self.delay = delay

    def _pause(self) -> None:
        if self.delay:
            time.sleep(self.delay)

    def create(self, name: str, data: bytes) -> bool:
        self._pause()
        return super().create(name, data)

    def read(self, name: str) -> bytes | None:
        self._pause()
        return super().read(name)

    def write(self, name: str, data: bytes,
              only_if: Callable[[bytes], bool] | None = None) -> bool:
        self._pause()
        return super().write(name, data, only_if)

    def delete(self, name: str) -> bool:
        self._pause()
        with self._lock:
            data = self.records.pop(name, None)
            if data is None:
                return False
            self.deleted.append((name, data))
            return True


PROJECT = "web shop/prod"
LEASE = f"{project_key(PROJECT)}.lease"


def record(holder: str = "ci@runner pid 4242 (kvmctl apply)", nonce: str = "ab" * 8,
           expires_in: float = 30.0, kind: str = "lease") -> Record:
    now = time.time()
    return Record(kind, PROJECT, holder, nonce, now - 1, now + expires_in, 30.0)


def current(store: FakeStore, name: str = LEASE) -> Record | None:
    data = store.records.get(name)
    return Record.parse(data) if data is not None else None


def test_acquire_and_release_leave_nothing_behind() -> None:
    store = FakeStore()
    with hypervisor_lock(store, PROJECT, "me@laptop pid 1 (kvmctl apply)", 0):
        held = current(store)
        assert held is not None and held.holder == "me@laptop pid 1 (kvmctl apply)"
        assert held.kind == "lease" and held.project == PROJECT
        assert held.expires_at - held.acquired_at == pytest.approx(30.0)
        assert list(store.records) == [LEASE]
    assert store.records == {}


def test_a_second_acquirer_with_no_timeout_fails_naming_the_holder_and_host() -> None:
    store = FakeStore()
    with hypervisor_lock(store, PROJECT, "root@ci-7 pid 123 (kvmctl apply)", 0):
        with pytest.raises(LockError) as err:
            with hypervisor_lock(store, PROJECT, "me@laptop pid 9 (kvmctl apply)", 0):
                pytest.fail("got a held lock")
    assert re.fullmatch(rf"project 'web shop/prod' on {re.escape(HOST)} is locked by "
                        r"root@ci-7 pid 123 \(kvmctl apply\) since \d\d:\d\d:\d\d, lease "
                        r"until \d\d:\d\d:\d\d; gave up after 0 s \(--lock-timeout\)",
                        str(err.value)), str(err.value)
    assert store.records == {}


def test_a_waiter_is_told_once_and_gets_the_lock_after_its_release() -> None:
    store = FakeStore()
    events: list[str] = []
    told: list[str] = []
    held = threading.Event()

    def first() -> None:
        with hypervisor_lock(store, PROJECT, "a@m pid 1 (kvmctl apply)", 0, lease_s=0.3):
            events.append("a in")
            held.set()
            time.sleep(0.3)
            events.append("a out")

    t = threading.Thread(target=first)
    t.start()
    assert held.wait(2)
    with hypervisor_lock(store, PROJECT, "b@m pid 2 (kvmctl apply)", 5, waiting=told.append,
                         lease_s=0.3):
        events.append("b in")
    t.join()
    assert events == ["a in", "a out", "b in"]
    assert len(told) == 1 and "locked by a@m pid 1 (kvmctl apply)" in told[0], told
    assert told[0].endswith("waiting up to 5 s (--lock-timeout)")


def test_the_heartbeat_renews_the_lease_while_it_is_held() -> None:
    store = FakeStore()
    with hypervisor_lock(store, PROJECT, "a@m pid 1 (x)", 0, lease_s=0.15, skew_s=0.0):
        first = current(store)
        time.sleep(0.45)  # three leases long
        later = current(store)
        assert first is not None and later is not None
        assert later.nonce == first.nonce and later.acquired_at == first.acquired_at
        assert later.expires_at > first.expires_at + 0.2
        with pytest.raises(LockError, match="locked by a@m pid 1"):  # never went stale
            with hypervisor_lock(store, PROJECT, "b@m pid 2 (x)", 0, lease_s=0.15, skew_s=0.0):
                pass
    assert store.records == {}


def test_a_stale_lease_is_taken_over() -> None:
    store = FakeStore()
    stale = record(holder="ghost@gone pid 7 (kvmctl apply)", expires_in=-10)
    store.records[LEASE] = stale.to_bytes()
    with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 0):
        mine = current(store)
        assert mine is not None and mine.holder == "me@m pid 1 (x)"
        assert list(store.records) == [LEASE]  # the takeover marker is gone again
    assert store.deleted[0] == (LEASE, stale.to_bytes())
    assert store.records == {}


def test_a_lease_renewed_after_it_was_found_stale_is_not_taken_over() -> None:
    """A late holder renews between the taker's look and its takeover: the taker, having won
    the marker, reads the lease again and leaves it alone."""
    late = record(holder="slow@m pid 5 (x)", expires_in=-60)
    renewed = record(holder="slow@m pid 5 (x)", expires_in=30).to_bytes()

    class RenewingStore(FakeStore):
        def create(self, name: str, data: bytes) -> bool:
            won = super().create(name, data)
            if won and ".takeover-" in name:
                self.records[LEASE] = renewed
            return won

    store = RenewingStore()
    store.records[LEASE] = late.to_bytes()
    with pytest.raises(LockError, match="locked by slow@m pid 5"):
        with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 0):
            pass
    assert store.records == {LEASE: renewed}


def test_a_lease_within_the_clock_skew_margin_is_not_taken_over() -> None:
    store = FakeStore()
    store.records[LEASE] = record(expires_in=-2).to_bytes()  # expired 2 s ago, margin 5 s
    with pytest.raises(LockError, match="locked by ci@runner pid 4242"):
        with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 0):
            pass


@pytest.mark.parametrize("round_", range(5))
def test_concurrent_takeovers_of_one_stale_lease_have_exactly_one_winner(round_: int) -> None:
    store = FakeStore(delay=0.001)
    stale = record(expires_in=-60).to_bytes()
    store.records[LEASE] = stale
    start = threading.Barrier(8)
    won: list[int] = []
    failed: list[str] = []

    def attempt(i: int) -> None:
        start.wait()
        try:
            with hypervisor_lock(store, PROJECT, f"t@m pid {i} (x)", 0):
                won.append(i)
                time.sleep(0.1)  # longer than all the others take to fail
        except LockError as e:
            failed.append(str(e))

    run_in_threads(attempt, 8)
    assert len(won) == 1 and len(failed) == 7, (won, failed)
    assert [d for d in store.deleted if d == (LEASE, stale)] == [(LEASE, stale)]
    assert len([n for n, _ in store.deleted if n == LEASE]) == 2  # and the winner's, at last
    assert store.records == {}


def test_many_acquirers_never_hold_the_lock_at_once() -> None:
    store = FakeStore(delay=0.0005)
    inside = []
    overlap = []

    def worker(i: int) -> None:
        for _ in range(4):
            with hypervisor_lock(store, PROJECT, f"w@m pid {i} (x)", 5, lease_s=0.3):
                inside.append(i)
                if len(inside) > 1:
                    overlap.append(tuple(inside))
                time.sleep(0.005)
                inside.remove(i)

    run_in_threads(worker, 6)
    assert overlap == []
    assert store.records == {}


def test_a_stale_takeover_marker_is_recovered() -> None:
    store = FakeStore()
    stale = record(nonce="cd" * 8, expires_in=-60)
    marker = f"{project_key(PROJECT)}.takeover-{stale.nonce}"
    store.records[LEASE] = stale.to_bytes()
    store.records[marker] = record(holder="dead taker", nonce="ef" * 8, expires_in=-30,
                                   kind="takeover").to_bytes()
    with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 0):
        assert list(store.records) == [LEASE]
        assert current(store).holder == "me@m pid 1 (x)"
    assert store.records == {}


def test_a_live_takeover_marker_makes_others_wait() -> None:
    store = FakeStore()
    stale = record(nonce="cd" * 8, expires_in=-60)
    store.records[LEASE] = stale.to_bytes()
    store.records[f"{project_key(PROJECT)}.takeover-{stale.nonce}"] = record(
        holder="busy taker", nonce="ef" * 8, kind="takeover").to_bytes()
    with pytest.raises(LockError, match=r"lease expired at .*, being taken over; gave up"):
        with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 0):
            pass
    assert store.records[LEASE] == stale.to_bytes()


def test_release_leaves_a_successors_lease_alone() -> None:
    store = FakeStore()
    successor = record(holder="next@m pid 2 (x)", nonce="12" * 8).to_bytes()
    with pytest.raises(LockError, match="was lost while this command ran: it expired and was "
                                        r"taken over by next@m pid 2 \(x\)"):
        with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 0, lease_s=0.15):
            # as if this process had been stopped beyond its lease and taken over meanwhile
            store.records[LEASE] = successor
            time.sleep(0.2)  # a heartbeat comes and must not overwrite it
            assert store.records[LEASE] == successor
    assert store.records == {LEASE: successor}


def test_a_body_error_wins_over_a_lost_lease() -> None:
    store = FakeStore()
    with pytest.raises(RuntimeError, match="boom"):
        with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 0, lease_s=0.15):
            del store.records[LEASE]
            time.sleep(0.1)
            raise RuntimeError("boom")


def test_a_lease_that_cannot_be_read_is_held_then_stale_after_a_lease() -> None:
    store = FakeStore()
    store.records[LEASE] = b""  # exists, content not readable (yet)
    with pytest.raises(LockError, match="locked by an apply that is taking the lock just now"):
        with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 0, lease_s=0.2):
            pass
    started = time.monotonic()
    with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 2, lease_s=0.2):
        assert time.monotonic() - started >= 0.2
        assert current(store).holder == "me@m pid 1 (x)"
    store.records[LEASE] = b"garbage"
    with pytest.raises(LockError, match="an unreadable lease record"):
        with hypervisor_lock(store, PROJECT, "me@m pid 1 (x)", 0, lease_s=0.2):
            pass


def test_records_parse_only_when_complete() -> None:
    original = record()
    data = original.to_bytes()
    assert Record.parse(data) == original
    assert Record.parse(data[:-5]) is None  # torn
    assert Record.parse(data.replace(b"4242", b"4243")) is None  # checksum
    assert Record.parse(b"") is None
    lock = HostLock(FakeStore(), "p" * 5000, "h" * 5000)
    assert len(lock._new_record("lease", lock.nonce).to_bytes()) < 4096


@pytest.mark.parametrize("project", ["web", "web shop/prod", "../..", "", "-x", ".hidden",
                                     "ünïcode ☃", "a" * 300])
def test_project_keys_are_safe_names(project: str) -> None:
    key = project_key(project)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,60}", key), key
    assert key != project_key(project + "x")


def test_a_holder_process_of_this_machine_that_is_gone_is_stale_at_once() -> None:
    import subprocess

    from kvmctl.apply.hostlock import holder_died, process_identity
    assert not holder_died(process_identity(os.getpid()))  # alive: its lease must expire
    child = subprocess.Popen(["sleep", "0.05"])
    identity = process_identity(child.pid)
    assert identity and not holder_died(identity)
    child.wait()
    assert holder_died(identity)
    # Another kernel (boot id) or pid namespace says nothing about a pid here; nor does nothing.
    boot, rest = identity.split(":", 1)
    assert not holder_died("0" * len(boot) + ":" + rest)
    assert not holder_died(identity.replace("pid:[", "pid:[9"))
    assert not holder_died("")
