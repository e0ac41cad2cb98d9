"""Several independent libvirt hosts on this machine, for multi-host integration tests.

``scripts/test-hosts up N`` starts hosts ``h1``..``hN``: each one a libvirtd of its own in its own
mount and network namespace, with private ``/run/libvirt``, ``/var/lib/libvirt``, ``/etc/libvirt``
and ``/var/log/libvirt`` (under ``TestHost.root``). ``h1`` is reached over its local socket
(``qemu+unix``), ``h2`` and above over real ssh to 127.0.0.1 (``qemu+ssh``). Networks, bridges,
dnsmasq, pools and domains defined on one host are invisible to the others and to the main daemon
(``qemu:///system``); a pool path under ``/var/lib/libvirt`` is private to its host (on this
machine it is ``root / "lib" / ...``, see ``TestHost.outside``).

conftest.py offers the session fixture ``session_hosts`` to every test module::

    def test_something(session_hosts):
        h1, h2, h3 = session_hosts
        ...

or call ``hosts(n)`` directly. A session that started the hosts stops them at its end (they
start again in about 2 s); hosts that already ran when it began (a developer's, a benchmark's)
are left running. ``scripts/test-hosts down`` stops them all (``purge`` also deletes
their state). Name what you create on them with the ``prefix`` fixture's prefix and remove it
yourself: conftest's ``cleanup`` fixture sweeps only the main daemon.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "test-hosts"
MAX_HOSTS = 8
SESSION_HOSTS = int(os.environ.get("KVMCTL_TEST_HOSTS", "3"))

# Directories each host has of its own: where they are inside the host -> subdirectory of root.
_PRIVATE_DIRS = {
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/etc/libvirt": "etc",
    "/var/log/libvirt": "log",
}


@dataclass(frozen=True)
class TestHost:
    """One test host: its name (``h1``...), libvirt URI and state root on this machine."""

    __test__ = False  # not a test class, even when imported into a test module

    name: str
    uri: str
    root: Path

    @property
    def transport(self) -> str:
        """``unix`` or ``ssh``: the part of the URI scheme after ``qemu+``."""
        scheme = self.uri.split(":", 1)[0]
        return scheme.split("+", 1)[1] if "+" in scheme else "unix"

    def outside(self, path: str | os.PathLike[str]) -> Path:
        """Where a path as the host's libvirtd sees it is on this machine.

        ``/var/lib/libvirt/images/x`` on h2 is ``<h2 root>/lib/images/x`` here; a path outside the
        private directories is the same path on every host and here.
        """
        p = PurePosixPath(os.fspath(path))
        for inside, sub in _PRIVATE_DIRS.items():
            try:
                rel = p.relative_to(inside)
            except ValueError:
                continue
            return self.root / sub / rel
        return Path(p)


def _run(*args: str) -> str:
    try:
        proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                              check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"{SCRIPT} not found or not executable: {e}") from e
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/test-hosts {' '.join(args)} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout


def parse_env(text: str) -> list[TestHost]:
    """The lines of ``scripts/test-hosts env`` (``NAME URI ROOT``) as TestHosts."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, uri, root = line.split()
        out.append(TestHost(name=name, uri=uri, root=Path(root)))
    return out


def hosts(n: int = 3) -> list[TestHost]:
    """Start (if need be) test hosts h1..hn and return them in order. Root only.

    Idempotent and cheap when they already run (about a second); hosts above n that already run
    are left running and not returned.
    """
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"n must be 1..{MAX_HOSTS}, not {n}")
    _run("up", str(n))
    by_name = {h.name: h for h in parse_env(_run("env"))}
    missing = [f"h{i}" for i in range(1, n + 1) if f"h{i}" not in by_name]
    if missing:
        raise RuntimeError(f"scripts/test-hosts up {n} succeeded but env lacks {missing}")
    return [by_name[f"h{i}"] for i in range(1, n + 1)]


def running() -> set[str]:
    """The names of the test hosts that run now."""
    return {h.name for h in parse_env(_run("env"))} if SCRIPT.exists() else set()


@pytest.fixture(scope="session")
def session_hosts() -> Iterator[list[TestHost]]:
    """``hosts($KVMCTL_TEST_HOSTS or 3)`` for the session, stopped at its end if it started
    them (none ran before it)."""
    if os.geteuid() != 0:
        pytest.fail("test hosts need root (namespaces, mounts, libvirtd)", pytrace=False)
    try:
        before = running()
        started = hosts(SESSION_HOSTS)
    except (RuntimeError, ValueError) as e:
        pytest.fail(f"could not start the test hosts: {e}\n(scripts/host-setup installs what "
                    "they need: libvirt, openssh-server, netcat-openbsd)", pytrace=False)
    yield started
    if not before:
        _run("down")
