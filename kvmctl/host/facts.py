"""What kvmctl owns in a libvirt definition, as comparable facts.

Desired XML (from the templates) and live XML (from libvirt) go through the same extraction, so
everything libvirt adds or rewrites (uuid, PCI addresses, controllers, `pc-q35-7.2` for `q35`,
units, emulator path) either normalises to the same value or is not a fact at all. That is what
keeps a second plan empty.

Objects made by other tools (virt-install, virt-manager, virsh) spell the same settings in other
ways, which compare equal too: a netmask or a prefix length, a disk given by the path of a pool's
volume or by the pool and volume (`domain_facts` takes a resolver, `volume_resolver`), a disk
without a format (qemu opens it as raw), the serial console's log on the console element.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from lxml import etree

from ..units import xml_kib
from .ownership import resource_element, resource_fields
from .state import LiveState

# Fact name -> value. Scalars for single settings (`memory` in KiB, `vcpus`, `machine`), the
# named tuples below for devices and network entries; a device's fact name carries its key.
Facts = dict[str, Any]
DISK_PREFIX = "disk:"  # disk:<target dev>
NIC_PREFIX = "nic:"  # nic:<mac>

# The (pool, volume) of the volume at a path on the host, None for a path that is no volume.
VolumeResolver = Callable[[str], "tuple[str, str] | None"]


class DiskFact(NamedTuple):
    device: str
    bus: str | None
    source: tuple[str | None, str | None] | str | None  # (pool, volume) or a path
    format: str | None
    readonly: bool
    shareable: bool


class NicFact(NamedTuple):
    type: str | None  # network | bridge
    source: str | None  # the network's or the bridge's name
    model: str | None
    link: str | None


class MetadataFact(NamedTuple):
    spec_hash: str
    seed_hash: str


class Ipv4Fact(NamedTuple):
    address: str | None
    prefix: str | None  # the prefix length (from a prefix or a netmask); as written if invalid


class RangeFact(NamedTuple):
    start: str | None
    end: str | None


class DhcpHostFact(NamedTuple):
    mac: str
    name: str | None
    ip: str | None


class DnsHostFact(NamedTuple):
    ip: str | None
    hostnames: tuple[str | None, ...]


def disk_key(target: str) -> str:
    return DISK_PREFIX + target


def nic_key(mac: str) -> str:
    return NIC_PREFIX + mac.lower()


def key_id(key: str) -> str:
    """The target dev of a disk fact's name, the MAC of a NIC's."""
    return key.partition(":")[2]


def tree(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


def child(el: etree._Element, path: str) -> etree._Element:
    """The element at `path` under `el`, one that libvirt always writes; ValueError if absent."""
    found = el.find(path)
    if found is None:
        raise ValueError(f"<{el.tag}> has no <{path}> element")
    return found


def _required_attr(el: etree._Element, name: str) -> str:
    """Attribute `name` of `el`, one that libvirt always writes; ValueError if absent."""
    value = el.get(name)
    if value is None:
        raise ValueError(f"<{el.tag}> has no {name} attribute")
    return value


def _attr(el: etree._Element | None, name: str) -> str | None:
    """Attribute `name` of `el`, None when there is no such element or attribute."""
    return el.get(name) if el is not None else None


def _kib(el: etree._Element | None) -> int | None:
    if el is None or el.text is None:
        return None
    return xml_kib(el.text, el.get("unit"))


def machine_alias(machine: str | None) -> str | None:
    if machine is None:
        return None
    if machine == "q35" or machine.startswith("pc-q35"):
        return "q35"
    if machine == "pc" or machine.startswith("pc-i440fx"):
        return "pc"
    return machine


def _metadata(root: etree._Element) -> MetadataFact | None:
    fields = resource_fields(root)
    if fields is None:
        return None
    return MetadataFact(fields.get("spec-hash", ""), fields.get("seed-hash", ""))


def _labels(root: etree._Element) -> tuple[tuple[str, str], ...]:
    """The labels in kvmctl's mark, by key (the manifests' `metadata.labels`)."""
    found = resource_element(root)
    if found is None:
        return ()
    return tuple(sorted((child.get("key", ""), (child.text or "").strip()) for child in found
                        if isinstance(child.tag, str)
                        and etree.QName(child).localname == "label"))


def volume_resolver(live: LiveState) -> VolumeResolver:
    """Resolves a path to the (pool, volume) the host has there, from the volumes of every pool
    in `live` (indexed on the first call, so a resolver nobody asks costs nothing)."""
    index: dict[str, tuple[str, str]] | None = None

    def resolve(path: str) -> tuple[str, str] | None:
        nonlocal index
        if index is None:
            index = {_norm_path(v.path): (v.pool, v.name)
                     for p in live.pools.values() for v in p.volumes}
        return index.get(_norm_path(path))

    return resolve


def _norm_path(path: str) -> str:
    """`/pool//dir/./x.qcow2` and `/pool/dir/x.qcow2` are one file (libvirt keeps a disk's path as
    written); symbolic links are not followed: this runs where kvmctl runs, not on the host."""
    return posixpath.normpath(path) if path else path


def _disk_fact(disk: etree._Element, resolve: VolumeResolver | None = None
               ) -> tuple[str, DiskFact] | None:
    """A disk given by its file or block device path (`<disk type="file"><source file=...>`, as
    virt-install writes `--disk vol=pool/vol` and `--disk path=...`) is the (pool, volume) that
    path resolves to, so it equals `<disk type="volume"><source pool=... volume=...>`. A disk
    without a format (no `<driver type>`) is opened by qemu as raw: its format is raw."""
    target = disk.find("target")
    if target is None:
        return None
    source = disk.find("source")
    driver = disk.find("driver")
    src: tuple[str | None, str | None] | str | None = None
    if source is not None:
        if disk.get("type") == "volume":
            src = (source.get("pool"), source.get("volume"))
        else:
            path = source.get("file") or source.get("dev")
            src = (resolve(path) if resolve is not None and path else None) or path
    fmt = driver.get("type") if driver is not None else None
    if fmt is None and src is not None:
        fmt = "raw"
    return disk_key(target.get("dev") or ""), DiskFact(
        disk.get("device", "disk"), target.get("bus"), src, fmt,
        disk.find("readonly") is not None, disk.find("shareable") is not None)


def _nic_fact(nic: etree._Element) -> tuple[str, NicFact] | None:
    mac = nic.find("mac")
    if mac is None:
        return None
    source = nic.find("source")
    model = nic.find("model")
    link = nic.find("link")
    src = source.get("network") or source.get("bridge") if source is not None else None
    return nic_key(mac.get("address", "")), NicFact(
        nic.get("type"), src, model.get("type") if model is not None else None,
        link.get("state") if link is not None else "up")


def domain_facts(xml: str, resolve: VolumeResolver | None = None) -> Facts:
    """The facts of a domain definition; `resolve` (see volume_resolver) turns disks given by a
    path into the pool volumes they are. Without it, such a disk's source is its path."""
    root = tree(xml)
    os_el = root.find("os")
    os_type = os_el.find("type") if os_el is not None else None
    vcpu = root.find("vcpu")
    facts: Facts = {
        "type": root.get("type"),
        "vcpus.max": int(vcpu.text) if vcpu is not None and vcpu.text else None,
        "vcpus": int(vcpu.get("current") or vcpu.text) if vcpu is not None and vcpu.text else None,
        "memory.max": _kib(root.find("memory")),
        "memory": _kib(root.find("currentMemory")) or _kib(root.find("memory")),
        "machine": machine_alias(_attr(os_type, "machine")),
        "firmware": "uefi" if os_el is not None and (os_el.get("firmware") == "efi"
                                                     or os_el.find("loader") is not None)
        else "bios",
        "boot.kernel": root.findtext("os/kernel"),
        "boot.initrd": root.findtext("os/initrd"),
        "boot.cmdline": root.findtext("os/cmdline"),
        # libvirt writes <boot dev="hd"/> when a definition names no boot device.
        "boot.order": tuple(b.get("dev") for b in root.iterfind("os/boot")) or ("hd",),
        "console.log": _serial_log(root),
        "guestAgent": any(_attr(c.find("target"), "name") == "org.qemu.guest_agent.0"
                          for c in root.iterfind("devices/channel")),
        "graphics": tuple((g.get("type"), g.get("listen"))
                          for g in root.iterfind("devices/graphics")),
        "metadata": _metadata(root),
        "labels": _labels(root),
    }
    cpu = root.find("cpu")
    facts["cpu.mode"] = cpu.get("mode") if cpu is not None else None
    facts["cpu.model"] = cpu.findtext("model") if cpu is not None and cpu.get("mode") == "custom" \
        else None
    for disk in root.iterfind("devices/disk"):
        if (disk_fact := _disk_fact(disk, resolve)) is not None:
            facts[disk_fact[0]] = disk_fact[1]
    for nic in root.iterfind("devices/interface"):
        if (nic_fact := _nic_fact(nic)) is not None:
            facts[nic_fact[0]] = nic_fact[1]
    return facts


def _serial(root: etree._Element) -> etree._Element | None:
    """The serial port the guest's ttyS0 is (port 0, else the first).

    libvirt turns a lone `<console type="pty"><target type="serial"/>` (virt-install
    `--graphics none` or `--console pty,target_type=serial,log.file=...`) into this serial, with
    its log, and formats the console as a copy of it, so the console element is never read."""
    serials = root.findall("devices/serial")
    return next((s for s in serials if _attr(s.find("target"), "port") in ("0", None)),
                serials[0] if serials else None)


FILE_SERIAL = " (a file serial: no interactive console)"


def _serial_log(root: etree._Element) -> str | None:
    """The file receiving the serial console's output: the `<log file>` of its pty (kvmctl's,
    virt-install `--serial pty,log.file=...`, or libvirt's move of a console's log).

    A `<serial type="file"><source path>` (virt-install `--serial file,path=...`) writes the
    output to that file too, but has no pty: `virsh console` has nothing to attach to, while
    kvmctl's console is always there. Not the same for the user, so its fact is the path with
    FILE_SERIAL after it: it differs from the manifest's `console.log` and says why. Whether a
    log is appended or truncated at start (`append`) is not a fact: manifests do not own it."""
    serial = _serial(root)
    if serial is None:
        return None
    log = serial.find("log")
    path = log.get("file") if log is not None else None
    if serial.get("type") == "file":
        return (path or _attr(serial.find("source"), "path") or "") + FILE_SERIAL
    return path


def owned_domain_facts(desired: Facts, actual: Facts) -> tuple[Facts, Facts]:
    """Restrict both sides to what the manifest owns.

    The CPU element is owned only when the manifest sets a CPU mode: libvirt may add its own.
    """
    if desired.get("cpu.mode") is None:
        desired = {k: v for k, v in desired.items() if not k.startswith("cpu.")}
        actual = {k: v for k, v in actual.items() if not k.startswith("cpu.")}
    return desired, actual


@dataclass(frozen=True)
class FactChange:
    field: str
    old: Any
    new: Any


def diff(desired: Facts, actual: Facts) -> list[FactChange]:
    desired, actual = owned_domain_facts(desired, actual)
    keys = sorted(set(desired) | set(actual), key=_field_order)
    return [FactChange(k, actual.get(k), desired.get(k)) for k in keys
            if desired.get(k) != actual.get(k)]


def _field_order(key: str) -> tuple[int, str]:
    return (1 if ":" in key else 0, key)


# ---- networks ---------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")


def _ip_text(value: str | None) -> str | None:
    """An IP address in its one spelling (as Python writes it); as written when it is none."""
    if value is None:
        return None
    if _CANONICAL_IPV4.match(value):  # spelled as Python spells it: nothing to normalise
        return value
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def _prefix(ip: etree._Element) -> str | None:
    """The prefix length of an IPv4 `<ip>`, as libvirt derives it: `prefix="24"`, else
    `netmask="255.255.255.0"` (virsh's and virt-manager's spelling; libvirt keeps whichever it
    was given), else the address's classful prefix (10.x: 8, 172.16.x: 16, 192.168.x: 24)."""
    prefix, netmask, address = ip.get("prefix"), ip.get("netmask"), ip.get("address")
    try:
        if prefix is not None and int(prefix) > 0:
            return str(int(prefix))
        if netmask is not None:
            return str(ipaddress.IPv4Network(f"0.0.0.0/{netmask.strip()}").prefixlen)
        if address is not None:
            value = int(ipaddress.IPv4Address(address.strip()))
            octet = value >> 24
            return "0" if value == 0 else "8" if octet < 0x80 else "16" if octet < 0xC0 \
                else "24" if octet < 0xE0 else None
    except ValueError:
        return prefix or netmask
    return prefix


def _ipv4_element(root: etree._Element) -> etree._Element | None:
    """The network's IPv4 `<ip>`: the first one of family ipv4 (written or not) whose address is
    not IPv6. An IPv6 one may come first: libvirt keeps the order it was given."""
    return next((ip for ip in root.iterfind("ip") if ip.get("family", "ipv4") == "ipv4"
                 and ":" not in (ip.get("address") or "")), None)


def network_facts(xml: str, bridge_owned: bool = True) -> Facts:
    root = tree(xml)
    forward = root.find("forward")
    mode = forward.get("mode", "nat") if forward is not None else "isolated"
    ip = _ipv4_element(root)
    dhcp_range = ip.find("dhcp/range") if ip is not None else None
    mtu = root.find("mtu")
    facts: Facts = {
        "mode": mode,
        "ipv4": Ipv4Fact(_ip_text(ip.get("address")), _prefix(ip)) if ip is not None else None,
        "dhcp.range": RangeFact(_ip_text(dhcp_range.get("start")),
                                _ip_text(dhcp_range.get("end")))
        if dhcp_range is not None else None,
        # libvirt keeps a DHCP host's MAC as written (virsh net-define with upper case)
        "dhcp.hosts": tuple(sorted(DhcpHostFact(h.get("mac", "").lower(), h.get("name"),
                                                _ip_text(h.get("ip")))
                                   for h in ip.iterfind("dhcp/host"))) if ip is not None else (),
        "dns.hosts": tuple(sorted(DnsHostFact(_ip_text(h.get("ip")),
                                              tuple(n.text for n in h.iterfind("hostname")))
                                  for h in root.iterfind("dns/host"))),
        "domain": _attr(root.find("domain"), "name"),
        "mtu": int(_required_attr(mtu, "size")) if mtu is not None else None,
        "metadata": _metadata(root),
        "labels": _labels(root),
    }
    if bridge_owned or mode == "bridge":
        bridge = root.find("bridge")
        facts["bridge"] = bridge.get("name") if bridge is not None else None
    return facts


def network_diff(desired_xml: str, actual_xml: str) -> list[FactChange]:
    desired = network_facts(desired_xml)
    actual = network_facts(actual_xml, bridge_owned=desired.get("bridge") is not None)
    if desired.get("bridge") is None:
        desired.pop("bridge", None)
    return [FactChange(k, actual.get(k), desired.get(k)) for k in sorted(set(desired) | set(actual))
            if desired.get(k) != actual.get(k)]


# ---- snapshots --------------------------------------------------------------------------------

_UEFI = re.compile(r"<nvram|<loader[^>]*type=['\"]pflash['\"]|firmware=['\"]efi['\"]")


def internal_refusal(domain_xml: str, checkpoints: int = 0) -> str | None:
    """Why the domain cannot hold internal snapshots (None: it can), and what would work."""
    if checkpoints:
        return (f"it has {checkpoints} checkpoint{'s' if checkpoints != 1 else ''} "
                "(incremental backup): libvirt refuses snapshots while checkpoints exist; "
                f"delete them (virsh checkpoint-delete) to snapshot it, or back it up instead")
    if _UEFI.search(domain_xml):
        return ("it boots UEFI firmware (pflash): internal snapshots of such guests are "
                "unsupported (libvirt 9.2 and later refuse them); use a backup instead")
    root = etree.fromstring(domain_xml.encode())
    raw = []
    for disk in root.iterfind("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue  # a cdrom holds no snapshot and needs none
        driver = disk.find("driver")
        if driver is None or driver.get("type") != "qcow2":
            target = disk.find("target")
            raw.append(target.get("dev", "?") if target is not None else "?")
    if raw:
        return (f"its disk{'s' if len(raw) > 1 else ''} {', '.join(raw)} "
                f"{'are' if len(raw) > 1 else 'is'} not qcow2: an internal snapshot lives "
                "inside qcow2 images (Disk format: qcow2 would work)")
    if not any(True for _ in root.iterfind("devices/disk")):
        return "it has no disk to hold the snapshot (give it a qcow2 Disk)"
    return None
