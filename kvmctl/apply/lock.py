"""Serialise applies of one project against one hypervisor.

An advisory lock file (flock) per (URI, project) on the machine running kvmctl. The kernel drops
it when the holder dies, even by SIGKILL, so a killed apply never leaves a stale lock. Applies of
the same project from two different machines are not serialised by this lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import LockError

LOCK_DIR = os.environ.get("KVMCTL_LOCK_DIR", "/run/lock/kvmctl")


def _path(uri: str, project: str) -> str:
    key = hashlib.sha256(f"{uri}\0{project}".encode()).hexdigest()[:16]
    return os.path.join(LOCK_DIR, f"{project}-{key}.lock")


@contextmanager
def project_lock(uri: str, project: str, timeout: float,
                 waiting: Callable[[str], object] | None = None) -> Iterator[None]:
    os.makedirs(LOCK_DIR, exist_ok=True)
    path = _path(uri, project)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, timeout, waiting)
        _name_holder(fd)
        yield
    finally:
        os.close(fd)


def _acquire(fd: int, path: str, timeout: float, waiting: Callable[[str], object] | None
             ) -> None:
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _holder(path)
            if time.monotonic() >= deadline:
                raise LockError(f"another apply of this project holds the lock ({holder}); "
                                f"gave up after {timeout:g} s (--lock-timeout)") from None
            if waiting and not told:
                waiting(f"waiting for the lock held by {holder}")
                told = True
            time.sleep(0.2)


def _name_holder(fd: int) -> None:
    """Put this process's holder line at the start of the lock file.

    One write over the previous holder's line, then the file is cut to this line's length: the
    file never is empty or shorter than a line, so a reader finds the previous holder's complete
    line or this one's (a longer previous line's tail, until the cut, follows the newline).
    """
    line = (f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%H:%M:%S')}\n").encode()
    os.pwrite(fd, line, 0)
    os.ftruncate(fd, len(line))


HOLDER_LINE = re.compile(r"pid (\d+) on (\S+) since \d\d:\d\d:\d\d")
HOLDER_WAIT_S = 1.0  # how long a reader waits for a new holder to write its line


def _holder(path: str, wait: float = HOLDER_WAIT_S) -> str:
    """Who holds the lock: the first line of the lock file, once it is a complete holder line
    of a live process. A holder writes its line right after it got the lock, so for a moment
    the file may still be new (empty) or name the previous, finished holder: read again."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path, "rb") as f:
                first = f.read(4096).split(b"\n", 1)
        except OSError:
            return "unknown holder"
        line = first[0].decode("utf-8", "replace").strip() if len(first) == 2 else ""
        found = HOLDER_LINE.fullmatch(line)
        if found and not (found[2] == socket.gethostname() and not pid_alive(int(found[1]))):
            return line
        if time.monotonic() >= deadline:
            return "unknown holder"
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine (this pid namespace) runs with `pid`; when the kernel
    will not say (another user's process), it does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
