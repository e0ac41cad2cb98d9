"""The apply lock that lives on the hypervisor: applies of one project to one libvirt host are
serialised whatever machine they run on (a CI job and a laptop), unlike the local lock of
lock.py, which only serialises applies on one machine.

The policy lives here and knows nothing of libvirt; the records are kept by a LeaseBackend
(kvmctl.host.leases.LeaseStore: 4 KiB volumes in kvmctl's pool ``kvmctl-locks``).

Records
    ``<key>.lease`` is the lock; ``<key>.takeover-<id>`` a takeover marker. ``<key>`` is a
    filesystem-safe form of the project name plus 12 hex digits of its sha256, so any project
    string works and two projects never share a key. Each record holds one checksummed JSON
    line: kind, project, holder ("user@machine pid N (command)"), a random nonce, acquired_at
    and expires_at (UTC epoch seconds), lease_s. A record whose checksum fails (a read torn by
    a concurrent rewrite, damage) is "unreadable".

Acquiring
    Create ``<key>.lease``. The backend's create is exclusive (one creator of a name wins) and
    the record appears with its whole content (LeaseStore copies it from a staging volume).
    Else read the lease and wait, polling, up to `timeout` seconds; `waiting(message)` is called
    once when waiting starts; at the end LockError names the holder, since when, until when and
    the host.

Heartbeat
    A daemon thread rewrites the lease with expires_at = now + lease_s every lease_s/3, only if
    the record still carries our nonce -- the backend checks and writes the same volume, so a
    successor's record is never overwritten. It uses the store's connection: libvirt
    connections are thread-safe, one connection multiplexes calls from several threads (the
    daemon serves several calls of one client at once, so a long call of the apply does not hold
    the heartbeat up), and a second connection would authenticate again (an ssh prompt) and
    could fail on its own.

Stale records and takeover
    A record is stale when its expires_at + skew_s (5 s, for clocks of different machines) is
    before this machine's clock, or when it has stayed unreadable, unchanged, for lease_s (as
    measured by this reader, with a clock that counts suspend). A waiter that finds the lease
    stale creates the marker ``<key>.takeover-<nonce of the stale record>`` (exclusive: one
    winner per stale record); the winner reads the lease again and deletes it only if its bytes
    are exactly those judged stale (a renewal in between changes them), tries to create its own
    lease at once, then deletes its marker. Losers go back to waiting. Markers have their own
    expires_at: a marker whose winner died goes stale and is taken over the same way, with a
    marker named after its own nonce, after which the lease is taken over as before.

Why exactly one holder
    A lease is removed only by its holder (release, after reading its own nonce back) or by the
    one winner of the marker for those exact bytes, after they were found stale; a new lease can
    then be created by exactly one party. A live holder renews every lease_s/3, so its lease goes
    stale only if it has not renewed for lease_s + skew_s.

Assumptions, and the races that remain
    - Wall clocks of the machines applying differ by less than skew_s.
    - A holder that is stopped (SIGSTOP, a suspended laptop, a frozen VM) or cut off from the
      host for longer than about 2/3 lease_s + skew_s can be taken over while it still runs its
      apply: libvirt offers no fencing, so its remaining steps would run beside its
      successor's. It sees this at its next heartbeat (the record is gone or not its own), stops
      renewing, and hypervisor_lock raises LockError when the body finishes. The same
      assumption covers the two read-then-delete steps, which libvirt cannot make atomic: a
      record can change between the read and the delete only if its holder is alive after being
      judged stale. Release skips the delete when its last renewal is older than lease_s (a
      takeover may be under way); the lease then just expires.
    - A process killed inside create leaves a ``.staging-`` volume, and a takeover winner killed
      between its two deletes leaves its marker, whose name nobody uses again: 4 KiB each, they
      block nothing.
    - The lock is not re-entrant: a second hypervisor_lock of the same project in the same
      process waits for the first.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Protocol

from ..errors import KvmctlError, LockError
from .lock import pid_alive

if TYPE_CHECKING:  # the store for a libvirt host satisfies the protocol (checked by mypy)
    from ..host.leases import LeaseStore

LEASE_S = 30.0
SKEW_S = 5.0
_MAGIC = b"kvmctl-lease/1"
_BOOTTIME: int = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
_MAX_TEXT = 512  # holder and project as stored (a record is at most 4 KiB)


class LeaseBackend(Protocol):
    """Named small records on the hypervisor (kvmctl.host.leases.LeaseStore)."""

    @property
    def host(self) -> str: ...

    def create(self, name: str, data: bytes) -> bool:
        """Make the record with its content; False if one of that name exists (exclusive)."""
        ...

    def read(self, name: str) -> bytes | None:
        """The content; None if absent; b"" if it exists but cannot be read yet."""
        ...

    def write(self, name: str, data: bytes,
              only_if: Callable[[bytes], bool] | None = None) -> bool:
        """Replace the content if the record exists and `only_if` accepts its content, checked
        and written on the same record; False otherwise."""
        ...

    def delete(self, name: str) -> bool:
        """Remove the record; False if it was absent."""
        ...


if TYPE_CHECKING:
    def _satisfies(store: LeaseStore) -> LeaseBackend:
        return store


def _elapsed() -> float:
    """Seconds on a clock that never goes back and counts time suspended."""
    return time.clock_gettime(_BOOTTIME)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def project_key(project: str) -> str:
    """A filesystem-safe, collision-free name for `project`."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", project)[:40] or "project"
    if not (safe[0].isalnum() or safe[0] == "_"):
        safe = "_" + safe[1:]
    return f"{safe}-{hashlib.sha256(project.encode()).hexdigest()[:12]}"


def process_identity(pid: int) -> str:
    """`boot-id:pid-namespace:pid:start-time` of a process of this machine, or "" when /proc
    does not tell. Equal only for the same process: a reused pid has another start time."""
    return _identity(pid) or ""


def _identity(pid: int) -> str | None:
    """process_identity, or "" when no process `pid` runs here, or None when this process may
    not look (another user's namespace link): unknown is never taken for gone."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            start = f.read().rpartition(")")[2].split()[19]
    except FileNotFoundError:
        return "" if not pid_alive(pid) else None  # /proc may hide others' processes (hidepid)
    except (OSError, IndexError):
        return None
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
    except FileNotFoundError:
        return "" if not pid_alive(pid) else None
    except OSError:
        return None
    return f"{boot}:{namespace}:{pid}:{start}"


def holder_died(process: str) -> bool:
    """Whether the holder named by `process` (process_identity) was a process of this very
    kernel and pid namespace that no longer runs (or whose pid now is another process's): then
    its lease is stale at once, instead of when it expires. A holder elsewhere (another machine,
    container or boot), or one this process may not inspect, is never judged so."""
    parts = process.split(":")  # the namespace itself reads "pid:[4026531836]"
    if len(parts) < 4 or not parts[-2].isdigit():
        return False
    mine = (_identity(os.getpid()) or "").split(":")
    if len(mine) < 4 or parts[0] != mine[0] or parts[1:-2] != mine[1:-2]:
        return False  # another kernel or pid namespace: nothing here can say
    now = _identity(int(parts[-2]))
    if now is None:
        return False
    return now != process


def holder_line(command: str = "kvmctl apply") -> str:
    """``user@machine pid N (command)``: who holds a lock, as waiters are told."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()} pid {os.getpid()} ({command})"


@dataclass(frozen=True)
class Record:
    """What a lease or takeover-marker record says."""

    kind: str  # "lease" or "takeover"
    project: str
    holder: str
    nonce: str
    acquired_at: float
    expires_at: float
    lease_s: float
    # The holding process, exactly: boot id, pid namespace, pid and start time (see
    # process_identity); "" in records that do not say.
    process: str = ""

    def to_bytes(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return b"%s %s\n%s\n" % (_MAGIC, hashlib.sha256(body).hexdigest()[:16].encode(), body)

    @classmethod
    def parse(cls, data: bytes) -> Record | None:
        """The record, or None if `data` is not a complete record (blank, torn, damaged)."""
        head, _, rest = data.partition(b"\n")
        body = rest.rstrip(b"\n")
        if head != b"%s %s" % (_MAGIC, hashlib.sha256(body).hexdigest()[:16].encode()):
            return None
        try:
            raw = json.loads(body)
            record = cls(kind=str(raw["kind"]), project=str(raw["project"]),
                         holder=str(raw["holder"]), nonce=str(raw["nonce"]),
                         acquired_at=float(raw["acquired_at"]),
                         expires_at=float(raw["expires_at"]), lease_s=float(raw["lease_s"]),
                         process=str(raw.get("process", "")))
        except (ValueError, KeyError, TypeError):
            return None
        if record.kind not in ("lease", "takeover") or not re.fullmatch(r"[0-9a-f]{16}",
                                                                          record.nonce):
            return None
        return record


class HostLock:
    """One acquisition of a project's lock on one host (see the module docstring)."""

    def __init__(self, store: LeaseBackend, project: str, holder: str, lease_s: float = LEASE_S,
                 skew_s: float = SKEW_S) -> None:
        if lease_s <= 0 or skew_s < 0:
            raise ValueError("the lease must be positive and the skew margin not negative")
        self.store = store
        self.project = project
        self.holder = holder[:_MAX_TEXT]
        self.lease_s = lease_s
        self.skew_s = skew_s
        self.key = project_key(project)
        self.lease_name = f"{self.key}.lease"
        self.nonce = secrets.token_hex(8)
        self.record: Record | None = None  # ours, as last written
        self.lost: str | None = None  # set by the heartbeat: how the lease was lost
        self.heartbeat_error: str | None = None  # the last failed renewal, if the last failed
        self._renewed = 0.0  # _elapsed() of the last renewal
        self._unreadable: dict[str, tuple[bytes, float]] = {}  # name -> (content, first seen)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ---- acquiring -------------------------------------------------------------------------

    def acquire(self, timeout: float, waiting: Callable[[str], object] | None = None) -> None:
        deadline = _elapsed() + max(0.0, timeout)
        told = False
        create = True  # the lease may be free: try to create it (else only read it)
        again = 0  # looks again at once: after a release seen, or a takeover tried
        while True:
            if create and self._try_create():
                return
            data = self.store.read(self.lease_name)
            create = data is None
            if create and again < 20:  # released just now: try again at once
                again += 1
                continue
            record, stale = self._judge(self.lease_name, data or b"")
            if stale and data is not None:
                removed = self._take_over(self.lease_name, data)
                if self.record is not None:
                    return
                if removed and again < 20:  # the lease or a dead taker's marker: look again
                    again += 1
                    create = True
                    continue
            again = 0
            now = _elapsed()
            if now >= deadline:
                raise LockError(self._busy(record, data, f"gave up after {timeout:g} s "
                                                         "(--lock-timeout)"))
            if waiting is not None and not told:
                waiting(self._busy(record, data, f"waiting up to {timeout:g} s "
                                                 "(--lock-timeout)"))
                told = True
            pause = min(0.5, max(0.01, self.lease_s / 10)) * random.uniform(0.8, 1.2)
            time.sleep(max(0.0, min(pause, deadline - now)))

    def _new_record(self, kind: str, nonce: str) -> Record:
        now = time.time()
        return Record(kind, self.project[:_MAX_TEXT], self.holder, nonce, now,
                      now + self.lease_s, self.lease_s, process_identity(os.getpid()))

    def _try_create(self) -> bool:
        record = self._new_record("lease", self.nonce)
        if not self.store.create(self.lease_name, record.to_bytes()):
            return False
        self.record = record
        self._renewed = _elapsed()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                      name=f"kvmctl-lease-{self.key}")
        self._beat.start()
        return True

    def _judge(self, name: str, data: bytes) -> tuple[Record | None, bool]:
        """What record `data` (the content of `name`) is, and whether it is stale."""
        record = Record.parse(data)
        if record is not None:
            self._unreadable.pop(name, None)
            return record, (record.expires_at + self.skew_s < time.time()
                            or holder_died(record.process))
        now = _elapsed()
        seen = self._unreadable.get(name)
        if seen is None or seen[0] != data:
            self._unreadable[name] = (data, now)
            return None, False
        return None, now - seen[1] >= self.lease_s

    def _take_over(self, name: str, data: bytes, depth: int = 0) -> bool:
        """Remove record `name`, found stale with content `data`, if this process wins its
        takeover marker; then, for the lease, try to create ours at once. Whether it removed
        that record, or the stale marker of a taker that died at it."""
        record = Record.parse(data)
        stale_id = record.nonce if record else "u" + hashlib.sha256(data).hexdigest()[:15]
        marker = f"{self.key}.takeover-{stale_id}"
        mine = self._new_record("takeover", secrets.token_hex(8))
        if not self.store.create(marker, mine.to_bytes()):
            # Another process is taking it over -- unless that one died at it.
            other = self.store.read(marker)
            if other is not None and depth < 3 and self._judge(marker, other)[1]:
                return self._take_over(marker, other, depth + 1)
            return False
        try:
            if self.store.read(name) != data:  # changed: renewed, released or taken over
                return False
            removed = self.store.delete(name)
            self._unreadable.pop(name, None)
            if name == self.lease_name:
                self._try_create()
            return removed
        finally:
            self._delete_if(marker, mine.nonce)

    def _delete_if(self, name: str, nonce: str) -> bool:
        """Delete record `name` if it still carries `nonce`."""
        data = self.store.read(name)
        record = Record.parse(data) if data else None
        if record is None or record.nonce != nonce:
            return False
        return self.store.delete(name)

    def _busy(self, record: Record | None, data: bytes | None, tail: str) -> str:
        where = f"project {self.project!r} on {self.store.host} is locked by"
        if record is None:
            who = ("an apply that is taking the lock just now" if not data else
                   "an unreadable lease record")
            return f"{where} {who}; {tail}"
        if record.expires_at + self.skew_s < time.time():
            until = f"lease expired at {_clock(record.expires_at)}, being taken over"
        else:
            until = f"lease until {_clock(record.expires_at)}"
        return f"{where} {record.holder} since {_clock(record.acquired_at)}, {until}; {tail}"

    # ---- holding ---------------------------------------------------------------------------

    def _ours(self, data: bytes) -> bool:
        record = Record.parse(data)
        return record is not None and record.kind == "lease" and record.nonce == self.nonce

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            assert self.record is not None
            renewed = replace(self.record, expires_at=time.time() + self.lease_s)
            try:
                ok = self.store.write(self.lease_name, renewed.to_bytes(), only_if=self._ours)
            except Exception as exc:  # the host did not answer: try again at the next beat
                self.heartbeat_error = str(exc) if isinstance(exc, KvmctlError) else repr(exc)
                continue
            if not ok:
                self.lost = self._successor()
                return
            self.record = renewed
            self._renewed = _elapsed()
            self.heartbeat_error = None

    def _successor(self) -> str:
        try:
            data = self.store.read(self.lease_name)
        except KvmctlError:
            data = b""
        record = Record.parse(data) if data else None
        if record is None:
            return "its lease record was removed (taken over after it expired)"
        return (f"it expired and was taken over by {record.holder} at "
                f"{_clock(record.acquired_at)}")

    def release(self) -> str | None:
        """Stop renewing and remove the lease if it still is ours; how it was lost, if it was.
        """
        self._stop.set()
        if self._beat is not None:
            # A renewal still under way after this only ever writes our own record, and one
            # that lands after the delete below writes the deleted volume.
            self._beat.join(timeout=max(1.0, self.lease_s))
        if self.lost is not None:
            return self.lost
        if self.record is None:
            return None
        if _elapsed() - self._renewed >= self.lease_s:
            return None  # possibly being taken over right now: let it expire (module docstring)
        if not self._delete_if(self.lease_name, self.nonce):
            return self._successor()
        return None


@contextmanager
def hypervisor_lock(store: LeaseBackend, project: str, holder: str, timeout: float,
                    waiting: Callable[[str], object] | None = None, lease_s: float = LEASE_S,
                    *, skew_s: float = SKEW_S) -> Iterator[None]:
    """Hold the lock of `project` on the store's host while the body runs.

    `holder` is what waiters are told (holder_line()); `timeout` is how long to wait (0: fail
    at once) before LockError. If the lease was lost while the body ran (see the module
    docstring) and the body did not fail, LockError is raised when it finishes.
    """
    lock = HostLock(store, project, holder, lease_s, skew_s)
    try:
        lock.acquire(timeout, waiting)
    except BaseException:
        try:
            lock.release()  # if it was acquired after all (an interrupt in its last step)
        except KvmctlError:
            pass
        raise
    try:
        yield
    except BaseException:
        try:
            lock.release()
        except KvmctlError:
            pass  # the body's error is the one to report
        raise
    lost = lock.release()
    if lost is not None:
        raise LockError(f"the lock of project {project!r} on {store.host} was lost while this "
                        f"command ran: {lost}; another apply may have run at the same time")
