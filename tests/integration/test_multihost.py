"""One project over three real libvirt hosts (scripts/test-hosts: h1 over qemu+unix, h2 and h3
over qemu+ssh through an sshd on 127.0.0.1): placement, plan and apply across hosts, `get` on
every host, an unreachable host, the hypervisor-side lock, and moves of a stopped and a running
VM with their data, and a move killed half-way.

The module shares one project (its objects carry the module's prefix) and runs in order: each
test starts from what the previous one left. Everything it made is removed from every host at
the end, pass or fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guestlog
import libvirt
import pytest
import testhosts
import yaml
from conftest import Cleanup

KILLWRAP = Path(__file__).with_name("killwrap.py")
MARKER_BYTES = 4096


class Bed:
    """The project's manifests in a folder, its hosts, and the CLI run against them."""

    def __init__(self, folder: Path, hosts: list[testhosts.TestHost], prefix: str,
                 subnet: Any, guest: Any) -> None:
        self.folder, self.hosts, self.prefix = folder, hosts, prefix
        self.project = prefix + "proj"
        self.subnet, self.guest = subnet, guest
        self.placement = {"vm-a": "h1", "vm-b": "h2", "vm-c": "h3"}
        self.extra_hosts: list[dict[str, str]] = []
        self.conns = {h.name: libvirt.open(h.uri) for h in hosts}
        self.lock_dir = folder / "locks-a"

    def name(self, short: str) -> str:
        return self.prefix + short

    def write(self) -> None:
        p, net = self.prefix, self.subnet
        hosts = [{"name": h.name, "uri": h.uri, "domainType": "qemu"} for h in self.hosts]
        project = {"apiVersion": "kvmctl/v1", "kind": "Project",
                   "metadata": {"name": self.project},
                   "spec": {"hosts": hosts + self.extra_hosts, "defaultHost": "h1",
                            "defaults": {"virtualMachine": {"memory": "128MiB"}}}}
        (self.folder / "kvmctl.yaml").write_text(yaml.safe_dump(project), encoding="utf-8")
        docs: list[dict[str, Any]] = [
            {"apiVersion": "kvmctl/v1", "kind": "StoragePool", "metadata": {"name": p + "pool"},
             "spec": {"path": f"/var/lib/libvirt/images/{p}pool", "hosts": "all"}},
            {"apiVersion": "kvmctl/v1", "kind": "Network", "metadata": {"name": p + "net"},
             "spec": {"mode": "isolated", "ipv4": {"cidr": str(net)}, "hosts": "all"}},
        ]
        for vm in ("a", "b"):
            docs.append({"apiVersion": "kvmctl/v1", "kind": "Disk",
                         "metadata": {"name": f"{p}d{vm}"},
                         "spec": {"pool": p + "pool", "size": "8MiB", "format": "raw"}})
        for short, host in self.placement.items():
            spec: dict[str, Any] = {
                "host": host, "state": "running" if short == "vm-b" else "stopped",
                "boot": {"kernel": str(self.guest.kernel), "initrd": str(self.guest.initrd),
                         "cmdline": "console=ttyS0"},
                "interfaces": [{"network": p + "net"}], "shutdownTimeout": 30,
                "console": {"log": str(self.console_log(short))}}
            if short in ("vm-a", "vm-b"):
                spec["disks"] = [{"disk": f"{p}d{short[-1]}", "bus": "virtio"}]
            docs.append({"apiVersion": "kvmctl/v1", "kind": "VirtualMachine",
                         "metadata": {"name": p + short}, "spec": spec})
        (self.folder / "all.yaml").write_text(yaml.safe_dump_all(docs), encoding="utf-8")

    def console_log(self, short: str) -> Path:
        """Outside the hosts' private directories: the same file whichever host runs it."""
        return Path("/var/log/kvmctl") / f"{self.name(short)}.log"

    def env(self, lock_dir: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("KVMCTL_PROJECT", "KVMCTL_CONNECT", "KVMCTL_DOMAIN_TYPE")}
        env["KVMCTL_LOCK_DIR"] = str(lock_dir or self.lock_dir)
        return env

    def cli(self, *args: str, lock_dir: Path | None = None, timeout: float = 600,
            wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, *wrap] if wrap else [sys.executable, "-m", "kvmctl"]
        return subprocess.run([*argv, *args, "-f", str(self.folder)], capture_output=True,
                              text=True, timeout=timeout, env=self.env(lock_dir), check=False)

    def ok(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = self.cli(*args, **kw)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def domain(self, host: str, short: str) -> Any | None:
        with contextlib.suppress(libvirt.libvirtError):
            return self.conns[host].lookupByName(self.name(short))
        return None

    def pool(self, host: str) -> Any:
        pool = self.conns[host].storagePoolLookupByName(self.name("pool"))
        pool.refresh(0)
        return pool

    def volume(self, host: str, disk: str) -> Any | None:
        with contextlib.suppress(libvirt.libvirtError):
            return self.pool(host).storageVolLookupByName(f"{self.name(disk)}.raw")
        return None

    def write_marker(self, host: str, disk: str, text: str = "") -> bytes:
        """The test guest's disk marker (scripts/guest/init: "KVMCTL-MARKER:" TEXT "\n" in the
        first sector), then a pattern to the end of the first 4 KiB."""
        text = text or secrets.token_hex(8)
        head = f"KVMCTL-MARKER:{text}\n".encode().ljust(512, b"\0")
        marker = (head + f"moved {secrets.token_hex(16)}\n".encode() * 100)[:MARKER_BYTES]
        conn = self.conns[host]
        vol = self.volume(host, disk)
        stream = conn.newStream(0)
        vol.upload(stream, 0, len(marker), 0)
        stream.send(marker)
        stream.finish()
        return marker

    def read_head(self, host: str, disk: str) -> bytes:
        conn = self.conns[host]
        vol = self.volume(host, disk)
        stream = conn.newStream(0)
        vol.download(stream, 0, MARKER_BYTES, 0)
        data = b""
        while len(data) < MARKER_BYTES:
            chunk = stream.recv(MARKER_BYTES - len(data))
            if not chunk:
                break
            data += chunk
        stream.finish()
        return data

    def remove_everything(self) -> None:
        """Every object with the prefix on every host (conftest's Cleanup, per host: the lease
        records too, named after the project, hence the prefix), the pools' directories and
        the console logs; fails the teardown if anything could not be removed."""
        errors = []
        for h in self.hosts:
            sweep = Cleanup(self.conns[h.name], self.prefix)
            sweep.path(h.outside(f"/var/lib/libvirt/images/{self.prefix}pool"))
            errors += [f"{h.name}: {e}" for e in sweep.run()]
            self.conns[h.name].close()
        for short in self.placement:
            self.console_log(short).unlink(missing_ok=True)
        assert not errors, errors


@pytest.fixture(scope="module")
def bed(session_hosts: list[testhosts.TestHost], tmp_path_factory: pytest.TempPathFactory,
        free_subnet: Any, test_guest: Any) -> Iterator[Bed]:
    prefix = f"kt-{secrets.token_hex(4)}-"
    b = Bed(tmp_path_factory.mktemp("multihost"), session_hosts, prefix, free_subnet(),
            test_guest)
    Path("/var/log/kvmctl").mkdir(parents=True, exist_ok=True)
    b.write()
    try:
        yield b
    finally:
        b.remove_everything()


def test_one_manifest_set_applies_across_three_hosts(bed: Bed) -> None:
    transports = {h.transport for h in bed.hosts}
    assert transports == {"unix", "ssh"}, transports  # libvirt's real remote transport
    plan = json.loads(bed.ok("plan", "-o", "json").stdout)
    assert plan["format_version"] == 2
    assert {h["name"] for h in plan["hosts"]} == {"h1", "h2", "h3"}
    ids = {c["id"] for c in plan["changes"]}
    for host in ("h1", "h2", "h3"):  # the network and the pool on every host: one document
        assert f"{host}:Network/{bed.name('net')}" in ids
        assert f"{host}:StoragePool/{bed.name('pool')}" in ids
    assert f"h2:VirtualMachine/{bed.name('vm-b')}" in ids
    assert f"h1:Disk/{bed.name('da')}" in ids and f"h2:Disk/{bed.name('db')}" in ids

    applied = bed.ok("apply", "-y")
    assert "Host h1:" in applied.stdout and "Host h3:" in applied.stdout
    for short, host in bed.placement.items():
        assert bed.domain(host, short) is not None, (short, host)
        assert all(bed.domain(other, short) is None for other in ("h1", "h2", "h3")
                   if other != host)
    assert bed.domain("h2", "vm-b").isActive()

    again = bed.cli("plan", "--detailed-exitcode")
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert "No changes" in again.stdout

    rows = json.loads(bed.ok("get", "-o", "json").stdout)
    assert {(r["host"], r["name"]) for r in rows} == {
        (host, bed.name(short)) for short, host in bed.placement.items()}
    table = bed.ok("get").stdout
    assert "HOST" in table and all(h in table for h in ("h1", "h2", "h3"))


def test_an_unreachable_host_is_named_and_nothing_is_applied(bed: Bed) -> None:
    missing = bed.folder / "no-such-host" / "libvirt-sock"
    bed.extra_hosts = [{"name": "h4", "uri": f"qemu+unix:///system?socket={missing}"}]
    bed.placement["vm-d"] = "h1"  # a new VM on a reachable host must not be created either
    bed.write()
    try:
        for command in (("plan",), ("apply", "-y")):
            proc = bed.cli(*command)
            assert proc.returncode == 1, (proc.stdout, proc.stderr)
            assert f"host h4 (qemu+unix:///system?socket={missing}) is unreachable" \
                in proc.stderr
            assert "Traceback" not in proc.stderr
        assert bed.domain("h1", "vm-d") is None
        limited = bed.ok("plan", "--host", "h1", "--host", "h2", "--host", "h3", "-o", "json")
        ids = {c["id"] for c in json.loads(limited.stdout)["changes"]}
        assert ids == {f"h1:VirtualMachine/{bed.name('vm-d')}"}
    finally:
        bed.extra_hosts = []
        del bed.placement["vm-d"]
        bed.write()
    assert bed.cli("plan", "--detailed-exitcode").returncode == 0


HOLDER = """
import sys
from kvmctl.apply.hostlock import hypervisor_lock
from kvmctl.host.hypervisor import Hypervisor
uri, project = sys.argv[1], sys.argv[2]
hv = Hypervisor(uri)
with hypervisor_lock(hv.lock_store(), project, "laptop pid-holder (kvmctl apply)", 30,
                     lease_s=3.0):
    print("locked", flush=True)
    sys.stdin.readline()  # held until told
print("released", flush=True)
"""


def _holder(bed: Bed) -> subprocess.Popen[str]:
    """Another machine's apply, holding the project's lock on h2 until a line on its stdin:
    it has a lock directory of its own, so only the lock on the hypervisor can stop us."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, bed.hosts[1].uri, bed.project],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=bed.env(bed.folder / "locks-b"))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _lease_on(bed: Bed, host: str) -> bool:
    """Whether the project's lease record is on the host (kvmctl's pool kvmctl-locks)."""
    from kvmctl.apply.hostlock import project_key
    from kvmctl.host.leases import POOL_NAME
    pool = bed.conns[host].storagePoolLookupByName(POOL_NAME)
    pool.refresh(0)
    return f"{project_key(bed.project)}.lease" in {v.name() for v in pool.listAllVolumes(0)}


def test_the_lock_on_the_hypervisor_serialises_two_lock_directories(bed: Bed) -> None:
    holder = _holder(bed)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        refused = bed.cli("apply", "-y", "--lock-timeout", "0")
        assert refused.returncode == 1, (refused.stdout, refused.stderr)
        assert "laptop pid-holder" in refused.stderr and "h2" in refused.stderr
        second = subprocess.Popen(
            [sys.executable, "-m", "kvmctl", "apply", "-y", "--lock-timeout", "60", "-f",
             str(bed.folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=bed.env())
        assert second.stderr is not None
        told = second.stderr.readline()
        assert "waiting" in told and "laptop pid-holder" in told, told
        assert second.poll() is None  # it waits while the lock is held...
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        out, err = second.communicate(timeout=300)  # ...and applies once it is released
        assert second.returncode == 0, (out, err)
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_lock_holder_is_taken_over(bed: Bed) -> None:
    holder = _holder(bed)
    holder.send_signal(signal.SIGKILL)  # it never releases: its process is gone
    holder.wait()
    assert _lease_on(bed, "h2")  # the dead holder's lease is still there...
    bed.ok("apply", "-y", "--lock-timeout", "90")
    assert not _lease_on(bed, "h2")  # ...taken over, then released by the apply


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_stopped_vm_moves_with_its_data(bed: Bed) -> None:
    marker = bed.write_marker("h1", "da")
    bed.placement["vm-a"] = "h2"
    bed.write()
    plan = bed.ok("plan")
    assert f"VirtualMachine/{bed.name('vm-a')} h1 -> h2 (move)" in plan.stdout
    assert "disks travel" in plan.stdout
    bed.ok("apply", "-y")
    assert bed.domain("h1", "vm-a") is None and bed.volume("h1", "da") is None
    assert bed.domain("h2", "vm-a") is not None and not bed.domain("h2", "vm-a").isActive()
    assert _digest(bed.read_head("h2", "da")) == _digest(marker)
    assert bed.cli("plan", "--detailed-exitcode").returncode == 0


def test_a_running_vm_is_shut_down_moved_and_started(bed: Bed) -> None:
    assert bed.domain("h2", "vm-b").isActive()
    text = "moved-" + secrets.token_hex(6)
    marker = bed.write_marker("h2", "db", text)
    bed.placement["vm-b"] = "h3"
    bed.write()
    plan = bed.ok("plan")
    assert "shut down gracefully, moved, then started" in plan.stdout
    bed.ok("apply", "-y")
    assert bed.domain("h2", "vm-b") is None and bed.volume("h2", "db") is None
    assert bed.domain("h3", "vm-b").isActive()
    assert _digest(bed.read_head("h3", "db")) == _digest(marker)
    # The guest itself, booted on h3, finds on its disk the marker written on h2.
    guestlog.wait_for(bed.console_log("vm-b"), rf"KVMCTL-MARKER dev=vda text={text}", 120)
    assert bed.cli("plan", "--detailed-exitcode").returncode == 0


def test_a_move_killed_half_way_converges(bed: Bed) -> None:
    marker = bed.write_marker("h2", "da")
    bed.placement["vm-a"] = "h1"
    bed.write()
    # Killed right after the VM was defined on h1 (its disk copied and verified there),
    # before it left h2: it is whole on both, and the next apply finishes the move.
    killed = bed.cli("apply", "-y", "--parallelism", "1",
                     wrap=(str(KILLWRAP), str(bed.folder / "kill.log"),
                           "after-call:define_domain"))
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    assert bed.domain("h1", "vm-a") is not None and bed.domain("h2", "vm-a") is not None
    plan = bed.ok("plan")
    assert "finish the move" in plan.stdout
    # The killed apply's lease on the hypervisors: its process is gone, so it is taken over.
    bed.ok("apply", "-y", "--lock-timeout", "90")
    assert bed.domain("h2", "vm-a") is None and bed.volume("h2", "da") is None
    assert _digest(bed.read_head("h1", "da")) == _digest(marker)
    assert bed.cli("plan", "--detailed-exitcode").returncode == 0
