"""The apply lock names its holder: a waiting apply never reads a missing or partial holder
line, not even while holders come and go, nor right after a new holder got the lock."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmctl.apply import lock
from kvmctl.errors import LockError


@pytest.fixture(autouse=True)
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(lock, "LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


def _churn(lock_dir: str, rounds: int, started: object) -> None:
    """Take and release the lock over and over, as a series of applies would."""
    lock.LOCK_DIR = lock_dir
    started.set()  # type: ignore[attr-defined]
    for _ in range(rounds):
        with lock.project_lock("qemu:///x", "p", 10):
            pass


def test_a_reader_always_finds_a_complete_holder_line(lock_dir: Path) -> None:
    started = multiprocessing.Event()
    with lock.project_lock("qemu:///x", "p", 0):  # the file exists, with a holder line
        pass
    path = lock._path("qemu:///x", "p")
    # A previous holder's longer line: the next holder's shorter one must not leave a mix.
    with open(path, "wb") as f:
        f.write(b"pid 1 on " + b"h" * 200 + b" since 00:00:00\n")
    churners = [multiprocessing.Process(target=_churn, args=(str(lock_dir), 400, started))
                for _ in range(2)]
    for c in churners:
        c.start()
    try:
        assert started.wait(10)
        reads = 0
        while any(c.is_alive() for c in churners) or reads < 1000:
            with open(path, "rb") as f:
                data = f.read()
            line = data.split(b"\n", 1)[0].decode()
            assert b"\n" in data and lock.HOLDER_LINE.fullmatch(line), (reads, data)
            reads += 1
    finally:
        for c in churners:
            c.join(30)
    assert all(c.exitcode == 0 for c in churners)
    assert Path(path).read_bytes().count(b"\n") == 1  # the longer line is gone


def _late_holder(path: str, locked: object, go: object) -> None:
    """Get the lock on a new, empty lock file, and write the holder line only when told."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    locked.set()  # type: ignore[attr-defined]
    go.wait(10)  # type: ignore[attr-defined]
    lock._name_holder(fd)
    time.sleep(3)
    os.close(fd)


def test_a_new_holder_is_named_once_it_wrote_its_line(lock_dir: Path) -> None:
    lock_dir.mkdir()
    path = lock._path("qemu:///x", "p")
    # What the previous holder, now gone, left: its line names a process that no longer runs.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(path).write_text(f"pid {dead.pid} on {socket.gethostname()} since 12:00:00\n")
    locked, go = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_late_holder, args=(path, locked, go))
    holder.start()
    try:
        assert locked.wait(10)
        assert lock._holder(path, wait=0.2) == "unknown holder"  # never the finished one
        go.set()
        with pytest.raises(LockError, match=rf"holds the lock \(pid {holder.pid} on "):
            with lock.project_lock("qemu:///x", "p", 0):
                pass
    finally:
        go.set()
        holder.join(10)


def test_a_holder_on_another_machine_is_named_as_written(lock_dir: Path) -> None:
    lock_dir.mkdir()
    path = Path(lock_dir / "x.lock")
    path.write_text("pid 1 on elsewhere since 12:00:00\nleft over\n")
    assert lock._holder(str(path), wait=0) == "pid 1 on elsewhere since 12:00:00"
    path.write_text("pid 1 on elsewh")  # no newline: not a complete line
    assert lock._holder(str(path), wait=0) == "unknown holder"
