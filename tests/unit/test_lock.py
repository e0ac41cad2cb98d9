"""The apply lock: one holder per (URI, project), released by the kernel, waits and names the
holder."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from kvmctl.apply import lock
from kvmctl.errors import LockError


@pytest.fixture(autouse=True)
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(lock, "LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "locks"


def _hold(uri: str, project: str, seconds: float, lock_dir: str, ready: object) -> None:
    lock.LOCK_DIR = lock_dir
    with lock.project_lock(uri, project, 0):
        ready.set()  # type: ignore[attr-defined]
        time.sleep(seconds)


def _holder(lock_dir: Path, seconds: float) -> multiprocessing.Process:
    """Another process that holds the lock of qemu:///x, project p, for `seconds`."""
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=("qemu:///x", "p", seconds,
                                                         str(lock_dir), ready))
    holder.start()
    assert ready.wait(10)
    return holder


def test_a_second_apply_fails_naming_the_holder(lock_dir: Path) -> None:
    holder = _holder(lock_dir, 2.0)
    try:
        told: list[str] = []
        started = time.monotonic()
        with pytest.raises(LockError, match=rf"pid {holder.pid} on .* gave up after 0.3 s"):
            with lock.project_lock("qemu:///x", "p", 0.3, told.append):
                pass
        assert time.monotonic() - started >= 0.3
        assert told and told[0].startswith(f"waiting for the lock held by pid {holder.pid}")
        with lock.project_lock("qemu:///x", "other-project", 0):  # another project: free
            pass
        with lock.project_lock("qemu:///y", "p", 0):  # another host: free
            pass
    finally:
        holder.join(10)


def test_the_lock_is_released_when_its_holder_dies(lock_dir: Path) -> None:
    holder = _holder(lock_dir, 60)
    holder.kill()
    holder.join(10)
    with lock.project_lock("qemu:///x", "p", 5):
        pass


def test_a_waiting_apply_gets_the_lock_when_it_is_released(lock_dir: Path) -> None:
    holder = _holder(lock_dir, 0.5)
    told: list[str] = []
    try:
        with lock.project_lock("qemu:///x", "p", 10, told.append):  # LockError if never free
            assert not holder.is_alive()  # it had it, released it, and only then we got it
        assert told and told[0].startswith(f"waiting for the lock held by pid {holder.pid}")
    finally:
        holder.join(10)


def test_holder_of_a_missing_file_is_unknown(lock_dir: Path) -> None:
    assert lock._holder(str(lock_dir / "absent.lock")) == "unknown holder"
