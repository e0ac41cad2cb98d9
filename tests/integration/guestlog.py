"""Helpers (not fixtures) for integration tests that boot kvmctl's test guest.

The test guest (``scripts/build-test-guest``, ``scripts/guest/init``) prints ``KVMCTL-*`` lines on
its serial port; a domain whose serial port is logged to a file lets a test read them. The line
formats are documented at the top of ``scripts/guest/init``, for example::

    KVMCTL-BOOT ok
    KVMCTL-LEASE iface=eth0 mac=52:54:00:12:34:56 ip=10.213.7.118
    KVMCTL-DISK dev=vdb bytes=67108864
    KVMCTL-READY

Typical use::

    log = SerialLog(serial_path)
    log.wait_for(r"^KVMCTL-BOOT ok$", timeout=60, alive=dom.isActive)
    m = log.wait_for(r"^KVMCTL-LEASE iface=eth0 mac=(\\S+) ip=(\\S+)$", timeout=60)
    fields(m.group(0))  # {'iface': 'eth0', 'mac': '52:54:...', 'ip': '10.…'}

The text searched is the log with ``\\r\\n`` turned into ``\\n`` (the serial line adds ``\\r``), so
``^`` and ``$`` (patterns given as strings are compiled with re.MULTILINE) match whole lines.
Kernel messages are in the same log (before the guest's init silences them); KVMCTL lines are
never split by them afterwards.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from re import Pattern
from typing import Union

__all__ = [
    "GuestFiles",
    "GuestLogTimeout",
    "SerialLog",
    "fields",
    "kvmctl_lines",
    "wait_for",
    "REPO_ROOT",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

PatternLike = Union[str, Pattern[str]]


class GuestLogTimeout(AssertionError):
    """A wait_for() did not see its pattern in time (or the guest stopped first)."""


def _compile(pattern: PatternLike) -> Pattern[str]:
    if isinstance(pattern, str):
        return re.compile(pattern, re.MULTILINE)
    return pattern


class SerialLog:
    """A guest's serial log file, read from the start each time (it is small).

    The file may not exist yet when the object is made (libvirt creates it at domain start).
    Offsets given to and returned by its methods are offsets in the normalised text.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    def text(self) -> str:
        """The whole log so far, '\\r\\n' normalised to '\\n'; '' if it does not exist yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return ""
        return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")

    def mark(self) -> int:
        """The current end of the log: pass it as ``since`` to only see what comes after."""
        return len(self.text())

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines, for failure messages."""
        text = self.text()
        if not text:
            return f"(log {self.path} is empty or does not exist)"
        return "\n".join(text.rstrip("\n").split("\n")[-lines:])

    def search(self, pattern: PatternLike, since: int = 0) -> re.Match | None:
        """The first match of ``pattern`` at or after offset ``since``, or None (no waiting)."""
        return _compile(pattern).search(self.text(), since)

    def findall(self, pattern: PatternLike, since: int = 0) -> list[re.Match]:
        """Every match of ``pattern`` at or after offset ``since`` (no waiting)."""
        return list(_compile(pattern).finditer(self.text(), since))

    def wait_for(
        self,
        pattern: PatternLike,
        timeout: float = 60.0,
        *,
        since: int = 0,
        alive: Callable[[], object] | None = None,
        interval: float = 0.2,
        what: str | None = None,
    ) -> re.Match:
        """Wait until ``pattern`` appears at or after offset ``since``; return the match.

        ``alive``: optional callable (e.g. ``dom.isActive``); when it returns false the wait
        fails at once instead of running into the timeout (after one last look at the log).
        Raises GuestLogTimeout with the log's tail in its message.
        """
        rx = _compile(pattern)
        start = time.monotonic()
        deadline = start + timeout
        while True:
            m = rx.search(self.text(), since)
            if m:
                return m
            if alive is not None:
                try:
                    is_alive = bool(alive())
                except Exception as e:  # a vanished domain raises
                    is_alive, why = False, f" ({e})"
                else:
                    why = ""
                if not is_alive:
                    m = rx.search(self.text(), since)
                    if m:
                        return m
                    raise GuestLogTimeout(
                        f"guest stopped{why} after {time.monotonic() - start:.1f}s before "
                        f"{what or '/' + rx.pattern + '/'} appeared in {self.path}; "
                        f"last lines:\n{self.tail()}"
                    )
            if time.monotonic() >= deadline:
                raise GuestLogTimeout(
                    f"timed out after {timeout:.0f}s waiting for {what or '/' + rx.pattern + '/'} "
                    f"in {self.path}; last lines:\n{self.tail()}"
                )
            time.sleep(interval)

    def kvmctl_lines(self, kind: str | None = None, since: int = 0) -> list[str]:
        """The guest's ``KVMCTL-...`` lines (only those of ``kind``, e.g. "DISK", if given)."""
        return kvmctl_lines(self.text()[since:], kind)


def wait_for(
    path: Union[str, Path],
    pattern: PatternLike,
    timeout: float = 60.0,
    *,
    since: int = 0,
    alive: Callable[[], object] | None = None,
) -> re.Match:
    """Function form of SerialLog(path).wait_for(...)."""
    return SerialLog(path).wait_for(pattern, timeout, since=since, alive=alive)


def kvmctl_lines(text: str, kind: str | None = None) -> list[str]:
    """Lines of ``text`` that are KVMCTL lines; with ``kind`` ("LEASE", "DISK", ...) only those
    whose first word is exactly ``KVMCTL-<kind>``."""
    out = []
    for line in text.replace("\r", "").split("\n"):
        if not line.startswith("KVMCTL-"):
            continue
        if kind is not None and line.split(" ", 1)[0] != f"KVMCTL-{kind}":
            continue
        out.append(line)
    return out


def fields(line: str) -> dict[str, str]:
    """The ``key=value`` words of a KVMCTL line: ``fields("KVMCTL-DISK dev=vdb bytes=5")`` is
    ``{"dev": "vdb", "bytes": "5"}``."""
    out = {}
    for word in line.strip().split()[1:]:
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out


@dataclass(frozen=True)
class GuestFiles:
    """The built test guest: see ``scripts/build-test-guest``.

    ``kernel`` and ``initrd`` are for direct kernel boot (``<os><kernel>``/``<initrd>``, with
    ``console=ttyS0`` on the command line); ``image`` is a 16 MiB zero-filled raw file to use as a
    stand-in base image. All are world-readable, in a 0755 directory.
    """

    dir: Path
    kernel: Path
    initrd: Path
    image: Path
    kernel_version: str

    @classmethod
    def load(cls, directory: Union[str, Path]) -> GuestFiles:
        """Read the cache dir; raises FileNotFoundError (missing) or ValueError (stale)."""
        d = Path(directory)
        files = {name: d / name for name in ("vmlinuz", "initrd.img", "image.raw")}
        missing = [str(p) for p in files.values() if not p.is_file() or p.stat().st_size == 0]
        if missing:
            raise FileNotFoundError(", ".join(missing))
        inputs = d / "initrd.inputs"
        recorded = inputs.read_text().strip() if inputs.exists() else ""
        current = initrd_inputs_hash()
        if current is not None and recorded != current:
            raise ValueError(
                f"{files['initrd.img']} was built from another scripts/guest/init or "
                "scripts/build-test-guest than the ones in this work tree"
            )
        version_file = d / "kernel-version"
        version = version_file.read_text().strip() if version_file.exists() else ""
        return cls(d, files["vmlinuz"], files["initrd.img"], files["image.raw"], version)


def initrd_inputs_hash() -> str | None:
    """The hash scripts/build-test-guest records in initrd.inputs for this work tree (sha256 of
    scripts/guest/init + scripts/build-test-guest + /bin/busybox), or None if it cannot tell."""
    h = hashlib.sha256()
    for p in (REPO_ROOT / "scripts/guest/init", REPO_ROOT / "scripts/build-test-guest",
              Path("/bin/busybox")):
        try:
            h.update(p.read_bytes())
        except OSError:
            return None
    return h.hexdigest()
