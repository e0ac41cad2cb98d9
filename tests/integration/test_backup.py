"""`kvmctl backup` and `kvmctl restore` on real libvirt hosts (scripts/test-hosts: h1 over
qemu+unix, h2 over qemu+ssh): a running test guest writes a marker on its qcow2 Disk on h1, is
backed up while it runs (libvirt's backup API, push mode), destroyed with its disks, and
restored on h2, where the marker is on the restored disk (read through QEMU's qcow2 layer, and
seen by the guest itself when it boots there). A backup with one byte changed is refused before
anything is created on h2, and a restore never overwrites a VM or a volume that exists.

No network: the VM has no interface (kvmctl.dhcp=0). Everything the test makes carries its
prefix and is removed from every host at the end, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guestlog
import libvirt
import pytest
import testhosts
import yaml
from conftest import Cleanup

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv/bin/python").exists() \
    else sys.executable
FORBIDDEN = ("Traceback (most recent call last)", "internal error: ")


class Bed:
    """A two-host project (h1, h2) in a folder, its manifests, the CLI run against it."""

    def __init__(self, folder: Path, hosts: list[testhosts.TestHost], prefix: str,
                 guest: Any) -> None:
        self.folder, self.hosts, self.prefix, self.guest = folder, hosts, prefix, guest
        self.by_name = {h.name: h for h in hosts}
        self.project = prefix + "proj"
        self.vm, self.disk, self.pool = prefix + "vm", prefix + "d", prefix + "pool"
        self.volume = f"{self.disk}.qcow2"
        self.pool_path = f"/var/lib/libvirt/images/{self.pool}"
        self.text = prefix.strip("-").replace("-", "") + "marker"
        self.log = Path("/var/log/kvmctl") / f"{self.vm}.log"  # the same file on every host
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.conns = {h.name: libvirt.open(h.uri) for h in hosts}
        self.manifests = folder / "all"
        self.pool_only = folder / "pool"

    def write(self) -> None:
        hosts = [{"name": h.name, "uri": h.uri, "domainType": "qemu"} for h in self.hosts]
        project = {"apiVersion": "kvmctl/v1", "kind": "Project",
                   "metadata": {"name": self.project},
                   "spec": {"hosts": hosts, "defaultHost": self.hosts[0].name}}
        (self.folder / "kvmctl.yaml").write_text(yaml.safe_dump(project), encoding="utf-8")
        pool = {"apiVersion": "kvmctl/v1", "kind": "StoragePool",
                "metadata": {"name": self.pool},
                "spec": {"path": self.pool_path, "hosts": "all"}}
        disk = {"apiVersion": "kvmctl/v1", "kind": "Disk", "metadata": {"name": self.disk},
                "spec": {"pool": self.pool, "size": "16MiB", "format": "qcow2"}}
        vm = {"apiVersion": "kvmctl/v1", "kind": "VirtualMachine",
              "metadata": {"name": self.vm},
              "spec": {"memory": "128MiB", "state": "running", "shutdownTimeout": 5,
                       "boot": {"kernel": str(self.guest.kernel),
                                "initrd": str(self.guest.initrd),
                                "cmdline": "console=ttyS0 kvmctl.dhcp=0 "
                                           f"kvmctl.write_marker={self.text}"},
                       "disks": [{"disk": self.disk}], "console": {"log": str(self.log)}}}
        self.manifests.mkdir()
        self.pool_only.mkdir()
        (self.manifests / "all.yaml").write_text(yaml.safe_dump_all([pool, disk, vm]),
                                                 encoding="utf-8")
        (self.pool_only / "pool.yaml").write_text(yaml.safe_dump(pool), encoding="utf-8")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("KVMCTL_PROJECT", "KVMCTL_CONNECT", "KVMCTL_DOMAIN_TYPE")}
        env["KVMCTL_LOCK_DIR"] = str(self.folder / "locks")
        return env

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([PYTHON, "-m", "kvmctl", *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env(), check=False, cwd=self.folder)
        for word in FORBIDDEN:
            assert word not in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        return proc

    def ok(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = self.cli(*args, **kw)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def domain(self, host: str, name: str | None = None) -> Any | None:
        with contextlib.suppress(libvirt.libvirtError):
            return self.conns[host].lookupByName(name or self.vm)
        return None

    def volumes(self, host: str) -> set[str]:
        try:
            pool = self.conns[host].storagePoolLookupByName(self.pool)
            pool.refresh(0)
            return {v.name() for v in pool.listAllVolumes(0)}
        except libvirt.libvirtError:
            return set()

    def names(self, host: str) -> tuple[set[str], set[str]]:
        """(domains, volumes) of the host that carry the prefix."""
        conn = self.conns[host]
        doms = {d.name() for d in conn.listAllDomains(0) if d.name().startswith(self.prefix)}
        return doms, self.volumes(host)

    def guest_head(self, host: str, volume: str, scratch: Path) -> bytes:
        """The first sector the guest sees on a qcow2 volume (QEMU's qcow2 layer), read from
        the volume's file as this machine sees it."""
        path = self.by_name[host].outside(f"{self.pool_path}/{volume}")
        out = scratch / f"{host}-{volume}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path),
                        str(out)], check=True, capture_output=True, timeout=60)
        with open(out, "rb") as f:
            return f.read(512)

    def remove_everything(self) -> None:
        errors = []
        for h in self.hosts:
            sweep = Cleanup(self.conns[h.name], self.prefix)
            sweep.path(h.outside(self.pool_path))
            errors += [f"{h.name}: {e}" for e in sweep.run()]
            self.conns[h.name].close()
        self.log.unlink(missing_ok=True)
        assert not errors, errors


@pytest.fixture(scope="module")
def bed(session_hosts: list[testhosts.TestHost], tmp_path_factory: pytest.TempPathFactory,
        test_guest: Any) -> Iterator[Bed]:
    import secrets
    prefix = f"kt-{secrets.token_hex(4)}-"
    b = Bed(tmp_path_factory.mktemp("backup"), session_hosts[:2], prefix, test_guest)
    Path("/var/log/kvmctl").mkdir(parents=True, exist_ok=True)
    b.write()
    try:
        yield b
    finally:
        b.remove_everything()


def _marker(text: str) -> bytes:
    return f"KVMCTL-MARKER:{text}\n".encode()


def test_a_running_vm_backed_up_on_h1_comes_back_on_h2_with_its_marker(bed: Bed,
                                                                         tmp_path: Path) -> None:
    started = time.monotonic()
    h1, h2 = (h.name for h in bed.hosts)
    bed.ok("apply", "-y", "-f", str(bed.manifests))
    dom = bed.domain(h1)
    assert dom is not None and dom.isActive()
    guestlog.SerialLog(bed.log).wait_for(
        rf"^KVMCTL-MARKER-WRITTEN dev=vda text={bed.text}$", timeout=180, alive=dom.isActive)

    # -- the backup, while the guest runs --
    target = tmp_path / "bk"
    done = bed.ok("backup", bed.vm, "--to", str(target), "-f", str(bed.manifests))
    assert "read through libvirt's backup API" in done.stdout, done.stdout
    assert "download disk-vda.qcow2" in done.stderr  # plain progress lines: not a terminal
    assert dom.isActive(), "the backup stopped the guest"
    manifest = json.loads((target / "backup.json").read_text())
    assert (manifest["state"], manifest["consistency"], manifest["in_manifests"]) == \
        ("running", "libvirt-backup-api", True)
    assert manifest["source"]["host"] == h1
    disk = next(f for f in manifest["files"] if f["role"] == "disk")
    assert (disk["disk"]["target"], disk["disk"]["volume"], disk["disk"]["read"]) == \
        ("vda", bed.volume, "backup-api")
    assert not [v for v in bed.volumes(h1) if v.startswith("kvmctl-backup-")], \
        "a scratch volume of the backup API was left in the pool"
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=target, capture_output=True,
                          text=True, check=False)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    docs = list(yaml.safe_load_all((target / "manifests.yaml").read_text()))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == \
        [("VirtualMachine", bed.vm), ("Disk", bed.disk)]
    assert _marker(bed.text) in _backup_head(target / "disk-vda.qcow2", tmp_path)

    # -- the VM and its disks go, and so does the pool (destroy --with-disks) --
    bed.ok("destroy", "-y", "--with-disks", "-f", str(bed.manifests))
    assert bed.domain(h1) is None and bed.volumes(h1) == set()

    # -- no pool on h2: refused, saying what would work --
    refused = bed.cli("restore", str(target), "--host", h2, "-y")
    assert refused.returncode != 0
    assert f"create StoragePool {bed.pool} on {h2} first (kvmctl apply)" in refused.stderr
    bed.ok("apply", "-y", "-f", str(bed.pool_only))

    # -- a backup with one byte changed: refused before anything is created on h2 --
    tampered = tmp_path / "tampered"
    shutil.copytree(target, tampered)
    path = tampered / "disk-vda.qcow2"
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = bed.names(h2)
    refused = bed.cli("restore", str(tampered), "--host", h2, "--name", bed.prefix + "copy",
                      "-y")
    assert refused.returncode != 0
    assert "disk-vda.qcow2: its SHA-256" in refused.stderr, refused.stderr
    assert bed.names(h2) == before, "the refused restore created something on h2"

    # -- the restore on h2 --
    restored = bed.ok("restore", str(target), "--host", h2, "-y")
    assert f"Restored VM {bed.vm} on host {h2}" in restored.stdout, restored.stdout
    assert "upload disk-vda.qcow2" in restored.stderr
    copy = bed.domain(h2)
    assert copy is not None and not copy.isActive()  # no --start: left stopped
    assert bed.volume in bed.volumes(h2)
    assert _marker(bed.text) in bed.guest_head(h2, bed.volume, tmp_path)
    record = bed.conns[h2].storagePoolLookupByName(bed.pool).storageVolLookupByName(
        f"kvmctl-owner-{bed.project}.json")
    assert record is not None  # the project owns the restored volume there

    # -- a restore never overwrites --
    again = bed.cli("restore", str(target), "--host", h2, "-y")
    assert again.returncode != 0
    assert f"a VM {bed.vm!r} exists on {h2} already" in again.stderr, again.stderr
    assert f"volume {bed.volume} exists in pool {bed.pool} on {h2}" in again.stderr

    # -- the guest itself finds the marker when it boots on h2 --
    bed.log.unlink(missing_ok=True)
    copy.create()
    guestlog.SerialLog(bed.log).wait_for(rf"^KVMCTL-MARKER dev=vda text={bed.text}$",
                                         timeout=180, alive=copy.isActive)
    copy.destroy()
    print(f"backup on h1 and restore on h2: {time.monotonic() - started:.1f} s")


def _backup_head(path: Path, scratch: Path) -> bytes:
    out = scratch / "backup-head.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(out)],
                   check=True, capture_output=True, timeout=60)
    with open(out, "rb") as f:
        return f.read(512)
