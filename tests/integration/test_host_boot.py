"""The host can boot kvmctl's test guest through libvirt (no kvmctl code involved).

These tests pin down what the rest of the integration suite builds on: a NAT network with DHCP on
a free subnet, direct kernel boot of the test guest under TCG, its serial log, DHCP leases seen
from both sides, and virtio disks (with the guest's disk marker surviving a power cycle).
The domain XML here is written by hand on purpose.
"""

from __future__ import annotations

import ipaddress
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
from guestlog import SerialLog, fields

BOOT_TIMEOUT = 90    # TCG boot to /init: a few seconds idle, slower on a loaded host
LEASE_TIMEOUT = 90   # from start; the guest gives up printing ip=none after 30 s of trying
MIB = 1024 * 1024


def network_xml(name: str, bridge: str, subnet: ipaddress.IPv4Network) -> str:
    hosts = list(subnet.hosts())
    gw, first, last = hosts[0], hosts[99], hosts[199]
    return f"""<network>
  <name>{escape(name)}</name>
  <forward mode='nat'/>
  <bridge name={quoteattr(bridge)} stp='off' delay='0'/>
  <ip address='{gw}' netmask='{subnet.netmask}'>
    <dhcp><range start='{first}' end='{last}'/></dhcp>
  </ip>
</network>"""


def guest_xml(name: str, domain_type: str, guest, serial_log: Path, *, cmdline: str = "",
              disks: list[Path] = (), network: str | None = None, memory_mib: int = 256,
              uuid: str | None = None) -> str:
    """A minimal q35 domain that direct-boots the test guest, serial port logged to a file.

    Disks are virtio-blk, in the order given (the guest names them vda, vdb, ... in that order:
    the guest's names come from PCI order, not from libvirt's <target dev>).
    Redefining an existing domain needs its ``uuid``, or defineXML fails with "domain ... already
    exists with uuid ...".
    """
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(p))}/>
      <target dev='vd{chr(ord("a") + i)}' bus='virtio'/>
    </disk>"""
        for i, p in enumerate(disks)
    )
    nic_xml = (
        f"""
    <interface type='network'>
      <source network={quoteattr(network)}/>
      <model type='virtio'/>
    </interface>"""
        if network
        else ""
    )
    # panic=-1 + on_reboot=destroy: a guest kernel panic stops the domain at once, so the
    # waits below fail fast (with the log tail) instead of timing out.
    return f"""<domain type={quoteattr(domain_type)}>
  <name>{escape(name)}</name>{f"<uuid>{uuid}</uuid>" if uuid else ""}
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(guest.kernel))}</kernel>
    <initrd>{escape(str(guest.initrd))}</initrd>
    <cmdline>{escape(("console=ttyS0 panic=-1 " + cmdline).strip())}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{disk_xml}{nic_xml}
    <serial type='file'>
      <source path={quoteattr(str(serial_log))} append='off'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>"""


def domain_macs(dom) -> list[str]:
    root = ET.fromstring(dom.XMLDesc(0))
    return [m.get("address").lower() for m in root.findall("./devices/interface/mac")]


def wait_dhcp_lease(net, mac: str, timeout: float = 15.0) -> dict:
    """The libvirt-side lease (network.DHCPLeases()) of ``mac``, waiting a little for it."""
    deadline = time.monotonic() + timeout
    while True:
        leases = net.DHCPLeases()
        for lease in leases:
            if (lease.get("mac") or "").lower() == mac:
                return lease
        if time.monotonic() >= deadline:
            pytest.fail(f"no DHCP lease for {mac} in network {net.name()} after {timeout}s: "
                        f"{leases}")
        time.sleep(0.5)


@pytest.mark.integration
def test_guest_boots_and_gets_dhcp_lease(conn, prefix, cleanup, scratch_dir, free_subnet,
                                          test_guest, domain_type, record_property):
    subnet = free_subnet()
    net = conn.networkDefineXML(network_xml(f"{prefix}net", f"{prefix}br", subnet))
    net.create()
    assert net.isActive()

    log_path = scratch_dir / "serial.log"
    dom = conn.defineXML(guest_xml(f"{prefix}vm", domain_type, test_guest, log_path,
                                   network=f"{prefix}net"))
    [mac] = domain_macs(dom)
    log = SerialLog(log_path)

    t0 = time.monotonic()
    dom.create()
    log.wait_for(r"^KVMCTL-BOOT ok$", BOOT_TIMEOUT, alive=dom.isActive)
    t_boot = time.monotonic() - t0
    m = log.wait_for(r"^KVMCTL-LEASE iface=eth0 .*$", LEASE_TIMEOUT, alive=dom.isActive)
    t_lease = time.monotonic() - t0
    record_property("boot_to_marker_s", round(t_boot, 2))
    record_property("boot_to_lease_s", round(t_lease, 2))
    print(f"boot-to-KVMCTL-BOOT {t_boot:.1f}s, boot-to-KVMCTL-LEASE {t_lease:.1f}s")

    lease = fields(m.group(0))
    assert lease["mac"] == mac, f"guest reports MAC {lease['mac']}, domain XML has {mac}"
    assert lease["ip"] != "none", f"guest got no DHCP lease; log:\n{log.tail()}"
    ip = ipaddress.ip_address(lease["ip"])
    assert ip in subnet, f"leased {ip} is not in the network's subnet {subnet}"

    host_side = wait_dhcp_lease(net, mac)
    assert host_side["ipaddr"] == str(ip), f"libvirt lease {host_side} != guest's {ip}"
    assert host_side["prefix"] == 24
    assert host_side["iface"] == f"{prefix}br"

    # Exactly one boot and one lease so far; the guest reports its CPUs and memory.
    assert len(log.kvmctl_lines("BOOT")) == 1
    assert log.kvmctl_lines("LEASE") == [m.group(0)]
    log.wait_for(r"^KVMCTL-READY$", 30, alive=dom.isActive)
    assert log.kvmctl_lines("CPUS") == ["KVMCTL-CPUS online=1"]
    [mem] = log.kvmctl_lines("MEM")
    assert 128 * 1024 < int(fields(mem)["kib"]) <= 256 * 1024
    assert not log.kvmctl_lines("WARN"), log.tail()


def create_dir_pool(conn, name: str, path: Path):
    path.mkdir(mode=0o755, exist_ok=True)
    pool = conn.storagePoolDefineXML(
        f"""<pool type='dir'>
  <name>{escape(name)}</name>
  <target><path>{escape(str(path))}</path><permissions><mode>0755</mode></permissions></target>
</pool>""",
        0,
    )
    pool.create(0)
    return pool


def create_raw_volume(pool, name: str, capacity: int):
    return pool.createXML(
        f"""<volume>
  <name>{escape(name)}</name>
  <capacity unit='bytes'>{capacity}</capacity>
  <allocation unit='bytes'>0</allocation>
  <target><format type='raw'/><permissions><mode>0644</mode></permissions></target>
</volume>""",
        0,
    )


def upload_file(conn, vol, src: Path) -> None:
    """Copy a local file into a volume through libvirt's stream API (as a remote client would)."""
    size = src.stat().st_size
    stream = conn.newStream(0)
    vol.upload(stream, 0, size, 0)
    with open(src, "rb") as f:
        stream.sendAll(lambda _st, nbytes, fh: fh.read(nbytes), f)
    stream.finish()


@pytest.mark.integration
def test_disk_marker_survives_power_cycle(conn, prefix, cleanup, scratch_dir, test_guest,
                                          domain_type):
    pool = create_dir_pool(conn, f"{prefix}pool", scratch_dir / "pool")
    root = create_raw_volume(pool, f"{prefix}root.raw", test_guest.image.stat().st_size)
    upload_file(conn, root, test_guest.image)
    data = create_raw_volume(pool, f"{prefix}data.raw", 64 * MIB)
    assert data.info()[1] == 64 * MIB
    disks = [Path(root.path()), Path(data.path())]

    # Boot 1: write the marker to every virtio disk.
    log1 = SerialLog(scratch_dir / "serial-1.log")
    dom = conn.defineXML(guest_xml(f"{prefix}vm", domain_type, test_guest, log1.path,
                                   cmdline="kvmctl.write_marker=hello kvmctl.dhcp=0",
                                   disks=disks))
    dom.create()
    log1.wait_for(r"^KVMCTL-BOOT ok$", BOOT_TIMEOUT, alive=dom.isActive)
    log1.wait_for(r"^KVMCTL-READY$", 60, alive=dom.isActive)
    assert "KVMCTL-DISK dev=vdb bytes=67108864" in log1.kvmctl_lines("DISK")
    assert f"KVMCTL-DISK dev=vda bytes={16 * MIB}" in log1.kvmctl_lines("DISK")
    assert log1.kvmctl_lines("MARKER") == [], "fresh volumes must carry no marker"
    assert "KVMCTL-MARKER-WRITTEN dev=vdb text=hello" in log1.kvmctl_lines("MARKER-WRITTEN")

    # Power cycle: a hard stop (the guest synced after writing), then boot without the option.
    dom.destroy()
    with open(data.path(), "rb") as f:
        assert f.read(20) == b"KVMCTL-MARKER:hello\n"
    log2 = SerialLog(scratch_dir / "serial-2.log")
    dom = conn.defineXML(guest_xml(f"{prefix}vm", domain_type, test_guest, log2.path,
                                   cmdline="kvmctl.dhcp=0", disks=disks,
                                   uuid=dom.UUIDString()))
    dom.create()
    log2.wait_for(r"^KVMCTL-BOOT ok$", BOOT_TIMEOUT, alive=dom.isActive)
    log2.wait_for(r"^KVMCTL-READY$", 60, alive=dom.isActive)
    assert "KVMCTL-MARKER dev=vdb text=hello" in log2.kvmctl_lines("MARKER")
    assert "KVMCTL-DISK dev=vdb bytes=67108864" in log2.kvmctl_lines("DISK")
    assert log2.kvmctl_lines("MARKER-WRITTEN") == []
    assert not log2.kvmctl_lines("WARN"), log2.tail()
