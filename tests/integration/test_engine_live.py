"""The engine against running guests: changes made live (vCPUs, memory, disk and NIC hot-plug,
disk grow, DHCP reservations) without a reboot, and the three onRestartNeeded policies.

Each test boots the test guest once and makes several changes to it; the guest's serial log
(``KVMCTL-*`` lines, see scripts/guest/init) tells what the guest saw.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import libvirt
import pytest
from engine_support import (
    Kvmctl,
    bridge_ifindex,
    change,
    disk,
    domain_xml,
    fields,
    host_ip,
    network,
    pool,
    virsh,
    vm,
    wait_until,
)
from guestlog import SerialLog

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

BOOT = r"^KVMCTL-BOOT ok$"
BOOT_TIMEOUT = 150  # TCG on a busy 2-core machine


@pytest.fixture
def kv(prefix: str, tmp_path: Path, cleanup) -> Kvmctl:
    return Kvmctl(prefix, tmp_path)


def _alive(conn, name: str):
    return lambda: conn.lookupByName(name).isActive()


def _mem_values(log: SerialLog, since: int, accept) -> list[int]:
    """MemTotal values (KiB) the guest reported after `since` that `accept` accepts."""
    values = [int(m.group(1)) for m in log.findall(r"^KVMCTL-MEM kib=(\d+)$", since=since)]
    return [v for v in values if accept(v)]


def _dnsmasq_pid(net: str) -> str:
    return Path(f"/run/libvirt/network/{net}.pid").read_text().strip()


def test_quickstart_like_running_guest(kv, prefix, free_subnet, test_guest, scratch_dir, conn):
    """examples/quickstart as it is meant to run: the guest boots, gets its reserved address,
    and a plan made right after the apply (guest still booting) is empty."""
    subnet = free_subnet()
    net, name = f"{prefix}qs-net", f"{prefix}qs-vm"
    log = SerialLog(scratch_dir / "qs-vm.log")
    manifest = kv.write("qs.yaml", [
        network(net, subnet),
        vm(name, test_guest, log=log.path, state="running", cpus=1, memory="256MiB",
           interfaces=[{"network": net, "ip": host_ip(subnet, 10)}]),
    ])
    kv.converge(manifest)
    log.wait_for(BOOT, BOOT_TIMEOUT, alive=_alive(conn, name))
    log.wait_for(rf"^KVMCTL-LEASE iface=eth0 mac=\S+ ip={re.escape(host_ip(subnet, 10))}$",
                 BOOT_TIMEOUT, alive=_alive(conn, name))
    assert kv.plan(manifest).code == 0, "plan after the guest booted is not empty"
    rows = kv.get("vms")
    assert rows == [{"name": name, "state": "running", "addresses": [host_ip(subnet, 10)],
                     "autostart": False, "pending_restart": []}]


def test_live_changes_without_reboot(kv, prefix, free_subnet, test_guest, scratch_dir, conn):
    subnet = free_subnet()
    p, d1, d2 = f"{prefix}pool", f"{prefix}d1", f"{prefix}d2"
    net, bridge, name = f"{prefix}net", f"{prefix}br", f"{prefix}vm"
    log = SerialLog(scratch_dir / "vm.log")
    spec = dict(log=log.path, state="running", shutdownTimeout=5,
                cpus={"count": 1, "max": 2}, memory={"size": "128MiB", "max": "256MiB"},
                disks=[{"disk": d1}],
                interfaces=[{"network": net, "ip": host_ip(subnet, 10)}])
    storage = [pool(p, scratch_dir / "pool"), disk(d1, p, "8MiB"), disk(d2, p, "8MiB")]
    docs = storage + [network(net, subnet, bridge=bridge), vm(name, test_guest, **spec)]
    manifest = kv.write("live.yaml", docs)
    kv.converge(manifest)  # the plan right after the apply is empty, the guest still booting
    alive = _alive(conn, name)
    log.wait_for(r"^KVMCTL-READY$", BOOT_TIMEOUT, alive=alive)
    first_lease = log.wait_for(
        rf"^KVMCTL-LEASE iface=eth0 mac=\S+ ip={re.escape(host_ip(subnet, 10))}$",
        BOOT_TIMEOUT, alive=alive)
    assert log.search(r"^KVMCTL-DISK dev=vda bytes=8388608$")
    # MemTotal once the balloon has given back what is above memory.size (128 MiB)
    wait_until(lambda: _mem_values(log, 0, lambda kib: kib <= 128 * 1024), 60,
               "the guest's memory to settle at 128 MiB")

    def step(**changes) -> dict:
        """Rewrite the manifest with the VM's spec changed; the plan of it (JSON)."""
        spec.update(changes)
        docs[-1] = vm(name, test_guest, **spec)
        kv.write("live.yaml", docs)
        return kv.plan_json(manifest)

    # 1. vCPUs 1 -> 2 (max 2) and memory 128 -> 192 MiB (max 256): live.
    plan = step(cpus={"count": 2, "max": 2}, memory={"size": "192MiB", "max": "256MiB"})
    c = change(plan, f"VirtualMachine/{name}")
    assert c["class"] == "update-live" and {"vcpus", "memory"} <= fields(c), c
    assert not c["pending_restart"]
    since = log.mark()
    kv.converge(manifest)
    log.wait_for(r"^KVMCTL-CPUS online=2$", 60, since=since, alive=alive)
    wait_until(lambda: _mem_values(log, since, lambda kib: kib > 128 * 1024), 60,
               f"KVMCTL-MEM above 128 MiB; log:\n{log.tail()}")
    dom = conn.lookupByName(name)
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 2
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == 2  # the definition too

    # 2. Disk hot-plug: a second Disk attached to the running VM appears as vdb.
    plan = step(disks=[{"disk": d1}, {"disk": d2}])
    c = change(plan, f"VirtualMachine/{name}")
    assert c["class"] == "update-live" and "disk:vdb" in fields(c), c
    since = log.mark()
    kv.converge(manifest)
    log.wait_for(r"^KVMCTL-DISK dev=vdb bytes=8388608$", 60, since=since, alive=alive)

    # 3. Disk grow while attached: the guest sees the new size at once.
    docs[1] = disk(d1, p, "16MiB")
    kv.write("live.yaml", docs)
    assert change(kv.plan_json(manifest), f"Disk/{d1}")["class"] == "update-live"
    since = log.mark()
    kv.converge(manifest)
    log.wait_for(r"^KVMCTL-DISK dev=vda bytes=16777216$", 60, since=since, alive=alive)

    # 4. NIC hot-plug with a new DHCP reservation: the network changes live, not restarted
    #    (same bridge, same dnsmasq), eth0 keeps its lease, eth1 gets the reserved address.
    ifindex, dnsmasq = bridge_ifindex(bridge), _dnsmasq_pid(net)
    assert ifindex is not None
    plan = step(interfaces=[{"network": net, "ip": host_ip(subnet, 10)},
                            {"network": net, "ip": host_ip(subnet, 11)}])
    assert change(plan, f"Network/{net}")["class"] == "update-live"
    assert "dhcp.hosts" in fields(change(plan, f"Network/{net}"))
    c = change(plan, f"VirtualMachine/{name}")
    assert c["class"] == "update-live" and any(f.startswith("nic:") for f in fields(c)), c
    since = log.mark()
    kv.converge(manifest)
    log.wait_for(rf"^KVMCTL-LEASE iface=eth1 mac=\S+ ip={re.escape(host_ip(subnet, 11))}$",
                 90, since=since, alive=alive)
    assert bridge_ifindex(bridge) == ifindex, "the network's bridge was recreated"
    assert _dnsmasq_pid(net) == dnsmasq, "the network was restarted"
    assert not log.findall(r"^KVMCTL-LEASE iface=eth0 ", since=since), log.tail()
    assert first_lease.group(0) in log.text()
    hosts = virsh("net-dumpxml", net)
    assert f"ip='{host_ip(subnet, 11)}'" in hosts and f"ip='{host_ip(subnet, 10)}'" in hosts

    # 5. A reservation for another (stopped) VM on the running network: live as well.
    other = f"{prefix}vm2"
    docs.append(vm(other, test_guest, interfaces=[{"network": net, "ip": host_ip(subnet, 20)}]))
    kv.write("live.yaml", docs)
    plan = kv.plan_json(manifest)
    assert change(plan, f"Network/{net}")["class"] == "update-live"
    kv.converge(manifest)
    assert f"ip='{host_ip(subnet, 20)}'" in virsh("net-dumpxml", net)
    assert bridge_ifindex(bridge) == ifindex and _dnsmasq_pid(net) == dnsmasq

    # 6. A new cidr replaces the network; the running guest's NICs are unplugged and plugged
    #    back (same MACs), so it joins the new network without a reboot.
    moved = free_subnet()
    docs[3] = network(net, moved, bridge=bridge)
    spec["interfaces"] = [{"network": net, "ip": host_ip(moved, 10)},
                          {"network": net, "ip": host_ip(moved, 11)}]
    docs[4] = vm(name, test_guest, **spec)
    docs[5] = vm(other, test_guest, interfaces=[{"network": net, "ip": host_ip(moved, 20)}])
    kv.write("live.yaml", docs)
    c = change(kv.plan_json(manifest), f"Network/{net}")
    assert c["class"] == "replace" and any(name in r and "plugged again" in r
                                           for r in c["reasons"]), c
    since = log.mark()
    kv.converge(manifest)
    for ip in (host_ip(moved, 10), host_ip(moved, 11)):
        log.wait_for(rf"^KVMCTL-LEASE iface=eth\d+ mac=\S+ ip={re.escape(ip)}$", 120,
                     since=since, alive=alive)

    # Through all of it, one boot: nothing was restarted.
    time.sleep(1)
    assert len(log.findall(BOOT)) == 1, log.tail(60)
    assert conn.lookupByName(name).isActive()

    # destroy --with-disks: the disks go with the running VM they are attached to
    destroyed = kv.run("destroy", "-y", "--with-disks", "-f", manifest, *kv.engine_args())
    assert destroyed.code == 0 and "kept" not in destroyed.stderr, str(destroyed)
    assert not [d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)]
    assert not [n.name() for n in conn.listAllNetworks(0) if n.name().startswith(prefix)]
    assert not [s.name() for s in conn.listAllStoragePools(0) if s.name().startswith(prefix)]


def test_restart_policies(kv, prefix, test_guest, scratch_dir, conn):
    """cpus.max needs a restart: defer leaves the guest running and reports the pending restart;
    fail refuses before changing anything; restart reboots the guest."""
    name = f"{prefix}vm"
    log = SerialLog(scratch_dir / "vm.log")
    spec = dict(log=log.path, state="running", shutdownTimeout=3,
                cpus={"count": 1, "max": 2}, onRestartNeeded="defer")
    manifest = kv.write("restart.yaml", [vm(name, test_guest, **spec)])
    kv.converge(manifest)
    alive = _alive(conn, name)
    log.wait_for(r"^KVMCTL-READY$", BOOT_TIMEOUT, alive=alive)
    uuid = conn.lookupByName(name).UUIDString()

    def step(**changes):
        spec.update(changes)
        kv.write("restart.yaml", [vm(name, test_guest, **spec)])

    # defer
    step(cpus={"count": 1, "max": 3})
    plan = kv.plan_json(manifest)
    c = change(plan, f"VirtualMachine/{name}")
    assert c["class"] == "update-restart" and c["pending_restart"], c
    assert "vcpus.max" in fields(c)
    kv.apply(manifest)
    after = kv.plan(manifest)
    assert after.code == 0, str(after)  # nothing left to apply ...
    assert "pending restart" in after.stdout  # ... but the restart is still owed
    c = change(kv.plan_json(manifest), f"VirtualMachine/{name}")
    assert c["pending_restart"] and c["class"] == "no-op", c
    rows = kv.get("vms")
    assert rows[0]["state"] == "running" and rows[0]["pending_restart"] == ["vcpus.max"], rows
    assert conn.lookupByName(name).isActive()
    assert domain_xml(conn, name).find("vcpu").text == "3"
    assert domain_xml(conn, name, inactive=False).find("vcpu").text == "2"

    # fail: the same pending restart plus a machine change; refused, nothing changes
    step(onRestartNeeded="fail", machine="pc")
    inactive_before = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    refused = kv.plan(manifest)
    assert refused.code == 1, str(refused)
    assert f"VirtualMachine/{name}" in refused.stderr
    assert "onRestartNeeded is fail" in refused.stderr and "restart" in refused.stderr
    assert kv.apply(manifest, expect=1).code == 1
    assert conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == inactive_before
    assert conn.lookupByName(name).isActive()
    assert len(log.findall(BOOT)) == 1

    # restart: the guest is shut down and started again, with the new definition
    step(onRestartNeeded="restart")
    c = change(kv.plan_json(manifest), f"VirtualMachine/{name}")
    assert c["class"] == "update-restart" and "machine" in fields(c), c
    assert not c["pending_restart"]
    since = log.mark()
    kv.apply(manifest)
    log.wait_for(BOOT, BOOT_TIMEOUT, since=since, alive=alive)
    assert len(log.findall(BOOT)) == 2
    live = domain_xml(conn, name, inactive=False)
    assert live.find("os/type").get("machine").startswith("pc-i440fx")
    assert live.find("vcpu").text == "3"
    assert conn.lookupByName(name).UUIDString() == uuid
    assert kv.plan(manifest).code == 0
    assert kv.get("vms")[0]["pending_restart"] == []
