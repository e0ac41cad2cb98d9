"""Snapshots on the real libvirtd.

- A stopped VM: its qcow2 Disk holds a marker written through QEMU's own qcow2 layer (qemu-io),
  a snapshot is taken, the marker is changed, a revert brings the old one back; the plan then
  blocks deleting the VM with the count of its snapshots.
- A running test guest: it writes a marker (kvmctl.write_marker on its kernel command line), a
  snapshot with memory is taken, a restart writes another, a revert leaves the guest running as
  the snapshot recorded it, and after a reset it reads the old marker back; the next plan is
  empty for manifests that agree with the snapshot and names the difference for ones that do
  not; a checkpoint on the VM makes a snapshot a clear refusal that changes nothing.
- A policy with keep: 3 run five times keeps exactly the newest three; a declared Snapshot is
  taken once, immutable, pruned only with --prune; a Disk format change of a VM with snapshots
  is blocked with the count.
- The unsupported combinations (UEFI, raw disks, external snapshots' revert) are refused, and
  change nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_support import Kvmctl, change  # noqa: E402
from guestlog import SerialLog  # noqa: E402

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


def _pool(prefix: str, path: Path) -> dict:
    path.mkdir(exist_ok=True)
    path.chmod(0o755)
    return {"apiVersion": "kvmctl/v1", "kind": "StoragePool", "metadata": {"name": prefix + "pool"},
            "spec": {"type": "dir", "path": str(path)}}


def _disk(name: str, prefix: str, fmt: str = "qcow2") -> dict:
    return {"apiVersion": "kvmctl/v1", "kind": "Disk", "metadata": {"name": name},
            "spec": {"pool": prefix + "pool", "size": "16MiB", "format": fmt}}


def _vm(name: str, disk: str, test_guest, cmdline: str = "console=ttyS0 kvmctl.dhcp=0",
        **spec) -> dict:
    body = {"memory": "128MiB",
            "boot": {"kernel": str(test_guest.kernel), "initrd": str(test_guest.initrd),
                     "cmdline": cmdline},
            "disks": [{"disk": disk}], **spec}
    return {"apiVersion": "kvmctl/v1", "kind": "VirtualMachine", "metadata": {"name": name},
            "spec": body}


def test_a_running_guest_reverted_reads_its_old_marker_and_the_plan_knows(
        prefix, cleanup, scratch_dir, test_guest, conn) -> None:
    k = Kvmctl(prefix + "live", scratch_dir)
    serial = scratch_dir / "serial.log"
    vm_name, disk = prefix + "vm", prefix + "d"

    def docs(text: str) -> list[dict]:
        return [_pool(prefix, scratch_dir / "pool"), _disk(disk, prefix),
                _vm(vm_name, disk, test_guest,
                    f"console=ttyS0 kvmctl.dhcp=0 kvmctl.write_marker={text}",
                    console={"log": str(serial)}, onRestartNeeded="restart",
                    shutdownTimeout=5)]

    one = k.write("one.yaml", docs("one"))
    k.apply(one)
    log = SerialLog(serial)
    dom = conn.lookupByName(vm_name)
    log.wait_for(r"^KVMCTL-MARKER-WRITTEN dev=vda text=one$", timeout=180, alive=dom.isActive)
    # A checkpoint (incremental backup) makes libvirt refuse snapshots: a clear refusal.
    dom.checkpointCreateXML(f"<domaincheckpoint><name>{prefix}cp</name></domaincheckpoint>", 0)
    try:
        before = len(dom.listAllSnapshots(0))
        refused = k.run("snapshot", "create", vm_name, "with-cp", *k.engine_args())
        assert refused.code != 0 and "checkpoint" in refused.stderr, refused
        assert len(dom.listAllSnapshots(0)) == before
        declared = k.write("declared.yaml", docs("one") + [{
            "apiVersion": "kvmctl/v1", "kind": "Snapshot", "metadata": {"name": prefix + "s"},
            "spec": {"vm": vm_name}}])
        planned = k.plan(declared)
        assert planned.code == 1 and "checkpoint" in planned.stderr, planned
    finally:
        dom.checkpointLookupByName(f"{prefix}cp", 0).delete(0)
    made = k.run("snapshot", "create", vm_name, "at-one", *k.engine_args())
    assert made.code == 0 and "with memory" in made.stdout, made

    two = k.write("two.yaml", docs("two"))
    mark = log.mark()
    k.apply(two)  # a restart: the guest reads marker one, then writes two
    log.wait_for(r"^KVMCTL-MARKER dev=vda text=one$", since=mark, timeout=180)
    log.wait_for(r"^KVMCTL-MARKER-WRITTEN dev=vda text=two$", since=mark, timeout=120)

    back = k.run("snapshot", "revert", vm_name, "at-one", "-y", *k.engine_args())
    assert back.code == 0, back
    assert "it is running now" in back.stdout, back.stdout
    assert conn.lookupByName(vm_name).isActive()
    # The snapshot's definition came back with it: manifests that agree plan nothing, ones that
    # do not name the difference (and a restart, for a kernel command line).
    assert k.plan(one).code == 0, "a plan calls the reverted state drift"
    differs = k.plan_json(two)
    vm_change = change(differs, f"VirtualMachine/{vm_name}")
    assert vm_change is not None and vm_change["class"] == "update-restart", differs
    # The disk went back too: a reset boots the guest from the disk as the snapshot had it.
    mark = log.mark()
    conn.lookupByName(vm_name).reset(0)
    log.wait_for(r"^KVMCTL-MARKER dev=vda text=one$", since=mark, timeout=180)


def test_a_policy_keeps_the_newest_three_and_a_declared_snapshot_is_immutable(
        prefix, cleanup, scratch_dir, test_guest, conn) -> None:
    k = Kvmctl(prefix + "pol", scratch_dir)
    vm_name, disk = prefix + "vm", prefix + "d"
    declared = {"apiVersion": "kvmctl/v1", "kind": "Snapshot",
                "metadata": {"name": prefix + "golden"},
                "spec": {"vm": vm_name, "description": "the golden state"}}
    base = [_pool(prefix, scratch_dir / "pool"), _disk(disk, prefix),
            _vm(vm_name, disk, test_guest, state="stopped",
                snapshots={"every": "1s", "keep": 3, "whenStopped": True})]
    path = k.write("m.yaml", base + [declared])
    k.apply(path)
    dom = conn.lookupByName(vm_name)
    assert [s.getName() for s in dom.listAllSnapshots(0)] == [prefix + "golden"]
    taken = []
    for _ in range(5):
        time.sleep(1.1)  # every: 1s
        ran = k.run("snapshot", "run", "-f", path, *k.engine_args())
        assert ran.code == 0 and "took" in ran.stdout, ran
        taken.append(ran.stdout.split("took ", 1)[1].split(" ", 1)[0])
    names = {s.getName() for s in dom.listAllSnapshots(0)}
    assert names == {prefix + "golden", *taken[-3:]}, (names, taken)
    rows = k.run("get", "snapshots", "-o", "json", *k.engine_args()).json()
    origins = {r["name"]: r["origin"] for r in rows}
    assert origins[prefix + "golden"] == "declared" and origins[taken[-1]] == "policy", rows

    # Immutable: a changed spec is a located error, and nothing changes.
    declared["spec"]["description"] = "another"
    changed = k.write("m.yaml", base + [declared])
    refused = k.plan(changed)
    assert refused.code == 1 and "immutable" in refused.stderr, refused
    assert "m.yaml:" in refused.stderr, refused.stderr
    # Gone from the manifests: kept without --prune, deleted with it; the policy's stay.
    without = k.write("m.yaml", base)
    assert k.plan(without).code == 0
    k.apply(without, "--prune")
    names = {s.getName() for s in dom.listAllSnapshots(0)}
    assert names == set(taken[-3:]), names

    # A Disk format change would destroy the snapshots inside the qcow2: blocked, counted.
    raw = k.write("raw.yaml", [base[0], _disk(disk, prefix, "raw"),
                               _vm(vm_name, disk, test_guest, state="stopped")])
    plan = k.plan_json(raw)
    replaced = change(plan, f"Disk/{disk}")
    assert replaced is not None and replaced["class"] == "replace", plan
    assert "has 3 snapshots" in (replaced["blocked"] or ""), replaced
    assert (scratch_dir / "pool" / f"{disk}.qcow2").exists()
    k.run("destroy", "-y", "--with-disks", "--allow-snapshot-loss", "-f", without,
          *k.engine_args())


def test_what_libvirt_would_refuse_is_refused_and_changes_nothing(
        prefix, cleanup, scratch_dir, test_guest, conn) -> None:
    k = Kvmctl(prefix + "no", scratch_dir)
    pool = _pool(prefix, scratch_dir / "pool")
    snap = {"apiVersion": "kvmctl/v1", "kind": "Snapshot", "metadata": {"name": prefix + "s"},
            "spec": {"vm": prefix + "vm"}}
    cases = {
        "uefi": ([pool, _disk(prefix + "d", prefix),
                  _vm(prefix + "vm", prefix + "d", test_guest, firmware="uefi",
                      state="stopped")], "UEFI"),
        "raw": ([pool, _disk(prefix + "d", prefix, "raw"),
                 _vm(prefix + "vm", prefix + "d", test_guest, state="stopped")], "qcow2"),
    }
    for name, (docs, why) in cases.items():
        path = k.write(f"{name}.yaml", docs + [snap])
        refused = k.run("apply", "-y", "-f", path, *k.engine_args())
        assert refused.code != 0 and why in refused.stderr, (name, refused)
        assert prefix + "vm" not in conn.listDefinedDomains(), name
    # A raw Disk's VM, applied without a Snapshot: `snapshot create` refuses it by hand too.
    path = k.write("raw-vm.yaml", cases["raw"][0])
    k.apply(path)
    refused = k.run("snapshot", "create", prefix + "vm", *k.engine_args())
    assert refused.code != 0 and "qcow2" in refused.stderr, refused
    assert conn.lookupByName(prefix + "vm").snapshotNum(0) == 0
    k.run("destroy", "-y", "--with-disks", "-f", path, *k.engine_args())

    # An external snapshot (made here with virsh's API) cannot be reverted on libvirt 9.0.
    path = k.write("ext.yaml", [pool, _disk(prefix + "d", prefix),
                                _vm(prefix + "vm", prefix + "d", test_guest, state="stopped")])
    k.apply(path)
    dom = conn.lookupByName(prefix + "vm")
    overlay = scratch_dir / "pool" / f"{prefix}d.ext"
    dom.snapshotCreateXML(
        f"<domainsnapshot><name>ext</name><disks><disk name='vda' snapshot='external'>"
        f"<source file='{overlay}'/></disk></disks></domainsnapshot>",
        __import__("libvirt").VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
    before = dom.XMLDesc(0)
    refused = k.run("snapshot", "revert", prefix + "vm", "ext", "-y", *k.engine_args())
    assert refused.code != 0 and "external" in refused.stderr and "9.9" in refused.stderr, \
        refused
    assert dom.XMLDesc(0) == before and dom.snapshotNum(0) == 1  # no safety snapshot either
    dom.undefineFlags(__import__("libvirt").VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    overlay.unlink(missing_ok=True)
