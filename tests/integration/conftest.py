"""Shared fixtures for kvmctl's integration tests.

They need a real libvirtd answering at ``qemu:///system`` (``scripts/host-setup`` starts one) and
root (serial logs written by virtlogd are 0600 root; bridges need CAP_NET_ADMIN). Tests that boot
the test guest also need ``scripts/build-test-guest`` to have run. Nothing is skipped: a missing
prerequisite FAILS the test with a message saying what to run.

Fixtures
--------
``conn`` (session)
    ``libvirt.virConnect`` to ``$KVMCTL_TEST_URI`` (default ``qemu:///system``).
``prefix``
    A unique name prefix for this test, ``kt-<8 hex>-`` (12 characters). Name every libvirt
    object and host interface the test creates with it: that is what ``cleanup`` removes. Linux
    interface names are limited to 15 characters, so a bridge can be ``prefix + "br"``.
``cleanup``
    A ``Cleanup`` registry. At teardown, pass or fail, it removes every libvirt domain, network,
    storage volume and storage pool, and every host network interface (bridges, ...) whose name
    starts with ``prefix`` -- and nothing else -- then runs the callbacks and removes the paths
    registered with ``cleanup.add(fn, *args)`` / ``cleanup.path(p)``. Teardown errors fail the test.
``scratch_dir``
    A fresh world-traversable (0755) directory ``/var/tmp/kvmctl-tests/<prefix>...`` for files
    QEMU must open (disk images, dir pools, ISOs) and serial logs; removed at teardown. (pytest's
    ``tmp_path`` is under a 0700 directory that QEMU, running as libvirt-qemu, cannot enter.)
``free_subnet`` (session)
    A callable: ``free_subnet()`` returns an ``ipaddress.IPv4Network`` /24 in 10.0.0.0/8 or
    172.16.0.0/12 overlapping no host address or route, no libvirt network (active or not) and no
    subnet handed out to any live pytest process of this machine (registry and lock in
    ``/run/kvmctl-tests/``). Never 192.0.2.0/24. Handed-out subnets stay reserved for the run.
``test_guest`` (session)
    ``guestlog.GuestFiles`` (kernel, initrd, image paths) from ``$KVMCTL_TEST_GUEST_DIR`` (default
    ``/var/cache/kvmctl/test-guest``).
``domain_type`` (session)
    The ``<domain type=...>`` to boot guests with: ``$KVMCTL_TEST_DOMAIN_TYPE`` or ``qemu`` (TCG;
    KVM does not work on this project's machines, see shared/HOST-NOTES.md).

Helpers that are not fixtures (serial log waiting, KVMCTL line parsing) are in ``guestlog.py``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from glob import escape as glob_escape
from pathlib import Path

import pytest

# guestlog.py sits next to this file; make it importable whatever the rootdir/package layout.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import libvirt
except ImportError as _e:  # reported by the conn fixture, so that collection still works
    libvirt = None
    _LIBVIRT_IMPORT_ERROR = _e

from guestlog import GuestFiles
from testhosts import session_hosts  # noqa: E402,F401  (the fixture, for every module)

from kvmctl.apply.lock import pid_alive

URI = os.environ.get("KVMCTL_TEST_URI", "qemu:///system")
TEST_GUEST_DIR = Path(os.environ.get("KVMCTL_TEST_GUEST_DIR", "/var/cache/kvmctl/test-guest"))
RUN_DIR = Path("/run/kvmctl-tests")
SCRATCH_ROOT = Path("/var/tmp/kvmctl-tests")
PREFIX_STEM = "kt-"

# Subnets free_subnet() may hand out, and ones it never will.
_CANDIDATE_SPACES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("172.16.0.0/12")]
_NEVER = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("10.0.0.0/16")]


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration is an integration test (marker ``integration``)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


# --- libvirt connection --------------------------------------------------------------------------


def _quiet_libvirt_errors() -> None:
    # libvirt-python prints every error to stderr by default, even handled ones.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@pytest.fixture(scope="session")
def conn():
    """A libvirt connection to qemu:///system (or $KVMCTL_TEST_URI) for the whole session."""
    if libvirt is None:
        pytest.fail(
            f"cannot import libvirt ({_LIBVIRT_IMPORT_ERROR}); install libvirt-python into the "
            "venv (it builds from source: needs libvirt-dev and pkg-config)",
            pytrace=False,
        )
    _quiet_libvirt_errors()
    try:
        c = libvirt.open(URI)
    except libvirt.libvirtError as e:
        pytest.fail(
            f"libvirtd is not reachable at {URI}: {e}. Run scripts/host-setup as root "
            "(it starts virtlogd and libvirtd).",
            pytrace=False,
        )
    if c is None:
        pytest.fail(f"libvirt.open({URI!r}) returned None", pytrace=False)
    yield c
    try:
        c.close()
    except libvirt.libvirtError:
        pass


@pytest.fixture(scope="session")
def domain_type() -> str:
    """'qemu' (TCG) unless $KVMCTL_TEST_DOMAIN_TYPE says otherwise (e.g. 'kvm' on real hosts)."""
    return os.environ.get("KVMCTL_TEST_DOMAIN_TYPE", "qemu")


# --- names and cleanup ---------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    """A unique name prefix for this test: ``kt-<8 hex>-``."""
    return f"{PREFIX_STEM}{secrets.token_hex(4)}-"


class Cleanup:
    """Removes, on ``run()``, everything of one test: see the module docstring.

    Order: registered callbacks (last registered first), domains (destroyed, then undefined with
    their managed save, snapshot/checkpoint metadata and NVRAM), networks, volumes (in any pool),
    pools (stopped and undefined; their directory is not deleted), host interfaces, then
    registered paths. Every step runs even if an earlier one failed; ``run()`` returns the errors.
    """

    def __init__(self, conn, prefix: str):
        if not prefix or not prefix.startswith(PREFIX_STEM) or len(prefix) < 8:
            raise ValueError(f"refusing to clean up with prefix {prefix!r}")
        self.conn = conn
        self.prefix = prefix
        self._callbacks: list[tuple[Callable, tuple, dict]] = []
        self._paths: list[Path] = []
        self.removed: list[str] = []

    # registration
    def add(self, fn: Callable, *args, **kwargs) -> None:
        """Run ``fn(*args, **kwargs)`` at teardown, before the sweep (last added runs first)."""
        self._callbacks.append((fn, args, kwargs))

    def path(self, p) -> Path:
        """Delete file or directory tree ``p`` at teardown, after the sweep; returns its Path."""
        p = Path(p)
        self._paths.append(p)
        return p

    def mine(self, name: str) -> bool:
        return name.startswith(self.prefix)

    # the sweep
    def run(self) -> list[str]:
        errors: list[str] = []

        def attempt(what: str, fn: Callable, *args) -> None:
            try:
                fn(*args)
            except Exception as e:  # keep going: report everything at the end
                errors.append(f"{what}: {e}")

        while self._callbacks:
            fn, args, kwargs = self._callbacks.pop()
            attempt(f"callback {getattr(fn, '__name__', fn)}",
                    lambda: fn(*args, **kwargs))  # noqa: B023 (called at once)
        attempt("domains", self._domains)
        attempt("networks", self._networks)
        attempt("volumes and pools", self._storage)
        attempt("host interfaces", self._links)
        attempt("kvmctl lock files", self._locks)
        for p in reversed(self._paths):
            attempt(f"path {p}", self._remove_path, p)
        self._paths.clear()
        return errors

    def _locks(self) -> None:
        """kvmctl's lock files of the projects named after this test (see kvmctl/lock.py)."""
        from kvmctl.apply import lock
        folder = Path(lock.LOCK_DIR)
        for path in folder.glob(glob_escape(self.prefix) + "*.lock") if folder.is_dir() else ():
            path.unlink(missing_ok=True)
            self.removed.append(f"lock file {path.name}")

    def _domains(self) -> None:
        flags = 0
        for name in ("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA",
                     "VIR_DOMAIN_UNDEFINE_NVRAM", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA"):
            flags |= getattr(libvirt, name, 0)
        for dom in self.conn.listAllDomains(0):
            name = dom.name()
            if not self.mine(name):
                continue
            if dom.isActive():
                _retry(dom.destroy)
            try:
                persistent = dom.isPersistent()
            except libvirt.libvirtError:  # a transient domain vanishes when destroyed
                persistent = False
            if persistent:
                try:
                    dom.undefineFlags(flags)
                except libvirt.libvirtError:
                    dom.undefine()
            self.removed.append(f"domain {name}")

    def _networks(self) -> None:
        for net in self.conn.listAllNetworks(0):
            name = net.name()
            if not self.mine(name):
                continue
            if net.isActive():
                net.destroy()
            try:
                persistent = net.isPersistent()
            except libvirt.libvirtError:
                persistent = False
            if persistent:
                net.undefine()
            self.removed.append(f"network {name}")

    def _storage(self) -> None:
        for pool in self.conn.listAllStoragePools(0):
            if not pool.isActive():
                continue
            if self.mine(pool.name()):
                # Only our own pools are rescanned: a refresh of another test's pool could race
                # with its volume operations.
                try:
                    pool.refresh(0)
                except libvirt.libvirtError:
                    pass
            try:
                volumes = pool.listAllVolumes(0)
            except libvirt.libvirtError:
                continue  # another test's pool went away meanwhile: none of ours is in it
            for vol in volumes:
                if self.mine(vol.name()):
                    vol.delete(0)
                    self.removed.append(f"volume {pool.name()}/{vol.name()}")
        for pool in self.conn.listAllStoragePools(0):
            name = pool.name()
            if not self.mine(name):
                continue
            persistent = pool.isPersistent()  # a transient pool is gone once destroyed
            if pool.isActive():
                _retry(pool.destroy)  # "asynchronous jobs running" passes within seconds
            if persistent:
                pool.undefine()
            self.removed.append(f"pool {name}")

    def _links(self) -> None:
        for link in _ip_json("link"):
            name = link.get("ifname", "")
            if self.mine(name):
                subprocess.run(["ip", "link", "del", "dev", name], check=True,
                               capture_output=True, text=True)
                self.removed.append(f"link {name}")

    @staticmethod
    def _remove_path(p: Path) -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _retry(fn: Callable, tries: int = 5, delay: float = 1.0):
    """libvirt's destroy can fail transiently ("Device or resource busy") on a loaded host."""
    for i in range(tries):
        try:
            return fn()
        except libvirt.libvirtError:
            if i == tries - 1:
                raise
            time.sleep(delay)


@pytest.fixture
def cleanup(conn, prefix):
    """The test's Cleanup registry; the sweep runs at teardown even if the test failed."""
    c = Cleanup(conn, prefix)
    yield c
    errors = c.run()
    if errors:
        pytest.fail("cleanup of " + prefix + "* failed:\n  " + "\n  ".join(errors), pytrace=False)


@pytest.fixture
def scratch_dir(prefix, cleanup) -> Path:
    """A 0755 directory under /var/tmp/kvmctl-tests/ named after the prefix, removed at teardown.

    Use it for anything QEMU opens (images, pool targets, ISOs) and for serial logs.
    """
    SCRATCH_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(SCRATCH_ROOT, 0o755)
    d = SCRATCH_ROOT / prefix.rstrip("-")
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    cleanup.path(d)
    return d


# --- subnets -------------------------------------------------------------------------------------


def _ip_json(*args: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out or "[]")


def host_ipv4_networks() -> list[ipaddress.IPv4Network]:
    """Networks of every IPv4 address on the host and every IPv4 route (any table)."""
    nets: list[ipaddress.IPv4Network] = []
    for link in _ip_json("-4", "addr", "show"):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet" and a.get("local"):
                nets.append(ipaddress.ip_interface(
                    f"{a['local']}/{a.get('prefixlen', 32)}").network)
    for r in _ip_json("-4", "route", "show", "table", "all"):
        dst = r.get("dst", "")
        if not dst or dst == "default":
            continue
        try:
            nets.append(ipaddress.ip_network(dst, strict=False))
        except ValueError:
            pass
    return nets


def libvirt_ipv4_networks(conn) -> list[ipaddress.IPv4Network]:
    """IPv4 networks of every libvirt network, active or not."""
    nets: list[ipaddress.IPv4Network] = []
    for net in conn.listAllNetworks(0):
        try:
            root = ET.fromstring(net.XMLDesc(0))
        except Exception:
            continue
        for ip in root.findall("ip"):
            if ip.get("family", "ipv4") != "ipv4" or not ip.get("address"):
                continue
            if ip.get("prefix"):
                mask = ip.get("prefix")
            elif ip.get("netmask"):
                mask = ip.get("netmask")
            else:
                mask = "24"
            nets.append(ipaddress.ip_interface(f"{ip.get('address')}/{mask}").network)
    return nets


class SubnetAllocator:
    """free_subnet(): see the module docstring. Safe across parallel pytest processes."""

    def __init__(self, conn, run_dir: Path = RUN_DIR):
        self.conn = conn
        self.run_dir = run_dir
        self.lock_path = run_dir / "subnets.lock"
        self.registry_path = run_dir / "subnets.json"
        self.handed_out: list[ipaddress.IPv4Network] = []

    def _load(self) -> dict:
        try:
            data = json.loads(self.registry_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in data.items() if pid_alive(int(v.get("pid", 0)))}

    def _save(self, data: dict) -> None:
        tmp = self.registry_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(self.registry_path)

    def _locked(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    def __call__(self) -> ipaddress.IPv4Network:
        with self._locked():
            reserved = self._load()
            taken = (host_ipv4_networks() + libvirt_ipv4_networks(self.conn) + _NEVER
                     + [ipaddress.ip_network(k) for k in reserved])
            rng = random.Random(secrets.randbits(64))
            for _ in range(5000):
                space = rng.choice(_CANDIDATE_SPACES)
                n_subnets = 2 ** (24 - space.prefixlen)
                base = int(space.network_address) + rng.randrange(n_subnets) * 256
                cand = ipaddress.IPv4Network((base, 24))
                if any(cand.overlaps(t) for t in taken):
                    continue
                reserved[str(cand)] = {"pid": os.getpid(), "time": time.time()}
                self._save(reserved)
                self.handed_out.append(cand)
                return cand
        pytest.fail("free_subnet(): no free /24 found in 10.0.0.0/8 or 172.16.0.0/12",
                    pytrace=False)

    def release(self) -> None:
        """Forget this process's reservations (at the end of the session)."""
        if not self.handed_out:
            return
        with self._locked():
            data = self._load()
            for n in self.handed_out:
                if data.get(str(n), {}).get("pid") == os.getpid():
                    del data[str(n)]
            self._save(data)
        self.handed_out.clear()


@pytest.fixture(scope="session")
def free_subnet(conn) -> Iterable[Callable[[], ipaddress.IPv4Network]]:
    """``free_subnet()`` -> a free IPv4Network /24 (see the module docstring)."""
    alloc = SubnetAllocator(conn)
    yield alloc
    alloc.release()


# --- the test guest ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_guest() -> GuestFiles:
    """The built test guest (vmlinuz, initrd.img, image.raw); fails if it is missing or stale."""
    try:
        return GuestFiles.load(TEST_GUEST_DIR)
    except FileNotFoundError as e:
        pytest.fail(f"test guest missing ({e}): run scripts/build-test-guest (as root)",
                    pytrace=False)
    except ValueError as e:
        pytest.fail(f"test guest is stale: {e}: run scripts/build-test-guest (as root)",
                    pytrace=False)
