"""Faults made on the host behind kvmctl's back, which a plan must detect and an apply repair:
a network stopped by hand, a network whose bridge was deleted (libvirt still calls it active),
a deleted disk file, a deleted pool directory.

The network faults share one booted guest: what it prints on its serial console (a NIC
re-plugged, a new DHCP lease) shows that it is connected again, not only that libvirt says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from engine_support import Kvmctl, change, disk, fields, host_ip, network, pool, vm
from guestlog import SerialLog

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BOOT = r"^KVMCTL-BOOT ok$"
BOOT_TIMEOUT = 150


@pytest.fixture
def kv(prefix: str, tmp_path: Path, cleanup) -> Kvmctl:
    return Kvmctl(prefix, tmp_path)


def _bridge(conn, net: str) -> str:
    xml = conn.networkLookupByName(net).XMLDesc(0)
    found = re.search(r"<bridge name='([^']+)'", xml)
    assert found, xml
    return found.group(1)


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True,
                          check=False).returncode == 0


def test_a_stopped_network_and_a_deleted_bridge_are_repaired(kv, prefix, free_subnet,
                                                            test_guest, scratch_dir, conn):
    subnet = free_subnet()
    net, name = f"{prefix}net", f"{prefix}vm"
    ip = host_ip(subnet, 10)
    log = SerialLog(scratch_dir / "vm.log")
    manifest = kv.write("faults.yaml", [
        network(net, subnet),
        vm(name, test_guest, log=log.path, state="running",
           interfaces=[{"network": net, "ip": ip}]),
    ])
    kv.converge(manifest)
    alive = lambda: conn.lookupByName(name).isActive()  # noqa: E731
    log.wait_for(BOOT, BOOT_TIMEOUT, alive=alive)
    lease = rf"^KVMCTL-LEASE iface=eth0 mac=\S+ ip={re.escape(ip)}$"
    log.wait_for(lease, BOOT_TIMEOUT, alive=alive)

    # 1. Stopped by hand: the plan says it is started, and the guest's NIC is plugged again.
    conn.networkLookupByName(net).destroy()
    c = change(kv.plan_json(manifest), f"Network/{net}")
    assert c is not None and c["class"] == "update-live", c
    assert "active" in fields(c)
    assert any("not running" in r and "started" in r and name in r for r in c["reasons"]), c
    since = log.mark()
    kv.converge(manifest)
    assert conn.networkLookupByName(net).isActive()
    log.wait_for(r"^KVMCTL-NIC-REMOVED iface=eth0 ", 60, since=since, alive=alive)
    log.wait_for(lease, 90, since=since, alive=alive)

    # 2. Its bridge deleted (libvirt still calls the network active): restarted, re-plugged.
    bridge = _bridge(conn, net)
    subprocess.run(["ip", "link", "del", bridge], check=True)
    assert conn.networkLookupByName(net).isActive()
    c = change(kv.plan_json(manifest), f"Network/{net}")
    assert c is not None and "bridge" in fields(c), c
    assert any(bridge in r and "gone" in r and "restarted" in r for r in c["reasons"]), c
    since = log.mark()
    kv.converge(manifest)
    assert _link_exists(_bridge(conn, net))
    log.wait_for(r"^KVMCTL-NIC-REMOVED iface=eth0 ", 60, since=since, alive=alive)
    log.wait_for(lease, 90, since=since, alive=alive)


def test_a_deleted_disk_file_and_a_deleted_pool_directory_are_repaired(kv, prefix, test_guest,
                                                                      scratch_dir, conn):
    pool_name, data = f"{prefix}pool", f"{prefix}data"
    target = scratch_dir / "pool"
    docs = [pool(pool_name, target), disk(data, pool_name, "16MiB"),
            vm(f"{prefix}vm", test_guest, disks=[{"disk": data}])]
    manifest = kv.write("storage.yaml", docs)
    kv.converge(manifest)
    volume = target / f"{data}.qcow2"
    assert volume.is_file()

    # 1. The disk's file deleted by hand: created again at once (the read refreshes the pool).
    volume.unlink()
    c = change(kv.plan_json(manifest), f"Disk/{data}")
    assert c is not None and c["class"] == "create", c
    kv.converge(manifest)
    assert volume.is_file()

    # 2. The pool's directory deleted, with its volumes and kvmctl's record: made again.
    shutil.rmtree(target)
    plan = kv.plan_json(manifest)
    c = change(plan, f"StoragePool/{pool_name}")
    assert c is not None and any("is gone from the host" in r for r in c["reasons"]), c
    assert change(plan, f"Disk/{data}")["class"] == "create"
    kv.converge(manifest)
    assert volume.is_file() and conn.storagePoolLookupByName(pool_name).isActive()

    # 3. Gone again, then destroyed: the pool goes too, nothing is left silently.
    shutil.rmtree(target)
    done = kv.run("destroy", "-y", "--with-disks", "-f", manifest, *kv.engine_args())
    assert done.code == 0, done
    assert pool_name not in {p.name() for p in conn.listAllStoragePools()}
