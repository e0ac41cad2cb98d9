"""Serialise applies of one project against one hypervisor.

An advisory lock file (flock) per (URI, project) on the machine running kvmctl. The kernel drops
it when the holder dies, even by SIGKILL, so a killed apply never leaves a stale lock. Applies of
the same project from two different machines are not serialised by this lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%H:%M:%S')}\n".encode(), 0)
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


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "unknown holder"
    except OSError:
        return "unknown holder"
