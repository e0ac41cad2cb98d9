"""`kvmctl snapshot` on the real libvirtd: a stopped VM's qcow2 Disk holds a marker written
through QEMU's own qcow2 layer (qemu-io), a snapshot is taken, the marker is changed, and a
revert brings the old one back; the plan then blocks deleting the VM with the count of its
snapshots. (The running-guest case, with the test guest's own marker, comes with the rest of
issue 13.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_support import Kvmctl  # noqa: E402

pytestmark = pytest.mark.integration


def _qemu_io(path: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)],
                          capture_output=True, text=True, timeout=60)


def _marker(path: Path, byte: int) -> bool:
    done = _qemu_io(path, f"read -P {byte:#x} 0 512")
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def test_a_revert_brings_the_marker_back_and_the_plan_blocks_the_delete(
        prefix, cleanup, scratch_dir, test_guest, conn) -> None:
    k = Kvmctl(prefix + "snap", scratch_dir)
    pool_dir = scratch_dir / "pool"
    pool_dir.mkdir()
    pool_dir.chmod(0o755)
    docs = [{"apiVersion": "kvmctl/v1", "kind": "StoragePool",
             "metadata": {"name": prefix + "pool"},
             "spec": {"type": "dir", "path": str(pool_dir)}},
            {"apiVersion": "kvmctl/v1", "kind": "Disk", "metadata": {"name": prefix + "d"},
             "spec": {"pool": prefix + "pool", "size": "16MiB", "format": "qcow2"}},
            {"apiVersion": "kvmctl/v1", "kind": "VirtualMachine",
             "metadata": {"name": prefix + "vm"},
             "spec": {"memory": "128MiB", "state": "stopped",
                      "boot": {"kernel": str(test_guest.kernel),
                               "initrd": str(test_guest.initrd), "cmdline": "console=ttyS0"},
                      "disks": [{"disk": prefix + "d"}]}}]
    path = k.write("m.yaml", docs)
    k.apply(path)
    volume = pool_dir / f"{prefix}d.qcow2"
    assert _qemu_io(volume, "write -P 0x41 0 512").returncode == 0
    made = k.run("snapshot", "create", prefix + "vm", "before", *k.engine_args())
    assert made.code == 0, made
    assert _qemu_io(volume, "write -P 0x42 0 512").returncode == 0
    assert _marker(volume, 0x42)
    back = k.run("snapshot", "revert", prefix + "vm", "before", "-y", *k.engine_args())
    assert back.code == 0, back
    assert "Safety snapshot" in back.stdout and "it is shutoff now" in back.stdout
    assert _marker(volume, 0x41), "the revert did not bring the marker back"
    listed = k.run("snapshot", "list", prefix + "vm", "-o", "json", *k.engine_args())
    assert listed.code == 0
    assert "before" in listed.stdout and "before-revert" in listed.stdout
    kept = k.run("destroy", "-y", "--with-disks", "-f", path, *k.engine_args())
    assert "has 2 snapshots: deleting it loses them" in kept.stderr, kept
    assert conn.lookupByName(prefix + "vm") is not None
    assert volume.exists()
    gone = k.run("destroy", "-y", "--with-disks", "--allow-snapshot-loss", "-f", path,
                 *k.engine_args())
    assert gone.code == 0, gone
