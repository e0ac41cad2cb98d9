"""What kvmctl owns in a libvirt definition, as comparable facts.

Desired XML (from the templates) and live XML (from libvirt) go through the same extraction, so
everything libvirt adds or rewrites (uuid, PCI addresses, controllers, `pc-q35-7.2` for `q35`,
units, emulator path) either normalises to the same value or is not a fact at all. That is what
keeps a second plan empty.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from lxml import etree

from .render import NAMESPACE
from .state import resource_fields

Facts = dict[str, Any]
_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
          "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3}

# How a changed domain fact reaches a running guest.
RESTART = "restart"
LIVE = "live"
DOMAIN_LIVE_FIELDS = ("vcpus", "memory", "metadata")
DOMAIN_LIVE_PREFIXES = ("disk:", "nic:")


def _tree(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


def _kib(el: etree._Element | None) -> int | None:
    if el is None or el.text is None:
        return None
    return int(el.text) * _UNITS.get((el.get("unit") or "KiB").lower(), 1024) // 1024


def machine_alias(machine: str | None) -> str | None:
    if machine is None:
        return None
    if machine == "q35" or machine.startswith("pc-q35"):
        return "q35"
    if machine == "pc" or machine.startswith("pc-i440fx"):
        return "pc"
    return machine


def _metadata(root: etree._Element) -> tuple[str, str] | None:
    fields = resource_fields(root)
    if fields is None:
        return None
    return fields.get("spec-hash", ""), fields.get("seed-hash", "")


def _disk_fact(disk: etree._Element) -> tuple[str, Any] | None:
    target = disk.find("target")
    if target is None:
        return None
    source = disk.find("source")
    driver = disk.find("driver")
    src = None
    if source is not None:
        src = (source.get("pool"), source.get("volume")) if disk.get("type") == "volume" else \
            source.get("file") or source.get("dev")
    return f"disk:{target.get('dev')}", (
        disk.get("device", "disk"), target.get("bus"), src,
        driver.get("type") if driver is not None else None,
        disk.find("readonly") is not None, disk.find("shareable") is not None)


def _nic_fact(nic: etree._Element) -> tuple[str, Any] | None:
    mac = nic.find("mac")
    if mac is None:
        return None
    source = nic.find("source")
    model = nic.find("model")
    link = nic.find("link")
    src = source.get("network") or source.get("bridge") if source is not None else None
    return f"nic:{mac.get('address', '').lower()}", (
        nic.get("type"), src, model.get("type") if model is not None else None,
        link.get("state") if link is not None else "up")


def domain_facts(xml: str) -> Facts:
    root = _tree(xml)
    os_el = root.find("os")
    vcpu = root.find("vcpu")
    facts: Facts = {
        "type": root.get("type"),
        "vcpus.max": int(vcpu.text) if vcpu is not None and vcpu.text else None,
        "vcpus": int(vcpu.get("current") or vcpu.text) if vcpu is not None and vcpu.text else None,
        "memory.max": _kib(root.find("memory")),
        "memory": _kib(root.find("currentMemory")) or _kib(root.find("memory")),
        "machine": machine_alias(os_el.find("type").get("machine") if os_el is not None
                                 and os_el.find("type") is not None else None),
        "firmware": "uefi" if os_el is not None and (os_el.get("firmware") == "efi"
                                                     or os_el.find("loader") is not None)
        else "bios",
        "boot.kernel": root.findtext("os/kernel"),
        "boot.initrd": root.findtext("os/initrd"),
        "boot.cmdline": root.findtext("os/cmdline"),
        # libvirt writes <boot dev="hd"/> when a definition names no boot device.
        "boot.order": tuple(b.get("dev") for b in root.iterfind("os/boot")) or ("hd",),
        "console.log": _serial_log(root),
        "guestAgent": any(c.find("target") is not None and c.find("target").get("name")
                          == "org.qemu.guest_agent.0" for c in root.iterfind("devices/channel")),
        "graphics": tuple((g.get("type"), g.get("listen")) for g in root.iterfind("devices/graphics")),
        "metadata": _metadata(root),
    }
    cpu = root.find("cpu")
    facts["cpu.mode"] = cpu.get("mode") if cpu is not None else None
    facts["cpu.model"] = cpu.findtext("model") if cpu is not None and cpu.get("mode") == "custom" \
        else None
    for disk in root.iterfind("devices/disk"):
        if (fact := _disk_fact(disk)) is not None:
            facts[fact[0]] = fact[1]
    for nic in root.iterfind("devices/interface"):
        if (fact := _nic_fact(nic)) is not None:
            facts[fact[0]] = fact[1]
    return facts


def _serial_log(root: etree._Element) -> str | None:
    log = root.find("devices/serial/log")
    return log.get("file") if log is not None else None


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


def domain_field_class(change: FactChange) -> str:
    if change.field in DOMAIN_LIVE_FIELDS:
        return LIVE
    if change.field.startswith(DOMAIN_LIVE_PREFIXES):
        if change.old is None or change.new is None:  # hot-plug or unplug
            bus = (change.new or change.old)[1]
            return LIVE if bus in ("virtio", "scsi", None) or change.field.startswith("nic:") \
                else RESTART
        if change.field.startswith("nic:") and change.old[:3] == change.new[:3]:
            return LIVE  # only the link state differs
        return RESTART
    return RESTART


# ---- networks ---------------------------------------------------------------------------------

NETWORK_LIVE_FIELDS = ("dhcp.hosts", "dns.hosts", "dhcp.range", "metadata")


def network_facts(xml: str, bridge_owned: bool = True) -> Facts:
    root = _tree(xml)
    forward = root.find("forward")
    mode = forward.get("mode", "nat") if forward is not None else "isolated"
    ip = root.find("ip")
    dhcp_range = ip.find("dhcp/range") if ip is not None else None
    mtu = root.find("mtu")
    facts: Facts = {
        "mode": mode,
        "ipv4": (ip.get("address"), ip.get("prefix") or ip.get("netmask")) if ip is not None else None,
        "dhcp.range": (dhcp_range.get("start"), dhcp_range.get("end"))
        if dhcp_range is not None else None,
        "dhcp.hosts": tuple(sorted((h.get("mac", "").lower(), h.get("name"), h.get("ip"))
                                   for h in ip.iterfind("dhcp/host"))) if ip is not None else (),
        "dns.hosts": tuple(sorted((h.get("ip"), tuple(n.text for n in h.iterfind("hostname")))
                                  for h in root.iterfind("dns/host"))),
        "domain": root.find("domain").get("name") if root.find("domain") is not None else None,
        "mtu": int(mtu.get("size")) if mtu is not None else None,
        "metadata": _metadata(root),
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


# ---- identity carried across redefinitions -------------------------------------------------------

def carry_identity(desired_xml: str, current_xml: str) -> str:
    """The desired definition with the current one's device addresses and controllers.

    Redefining without them would let libvirt renumber PCI slots, which reorders the guest's
    devices (and renames its NICs) at the next boot.
    """
    desired, current = _tree(desired_xml), _tree(current_xml)
    if machine_alias(desired.find("os/type").get("machine")) != \
            machine_alias(current.find("os/type").get("machine")):
        # Another machine type has another PCI topology (pc: pci-root, q35: pcie-root and
        # root ports): the old controllers and addresses do not fit it, libvirt lays it out anew.
        return desired_xml
    addresses = {}
    for el in current.iterfind("devices/*"):
        key = _device_key(el)
        address = el.find("address")
        if key and address is not None:
            addresses[key] = address
    devices = desired.find("devices")
    for el in list(devices):
        key = _device_key(el)
        if key in addresses and el.find("address") is None:
            el.append(copy.deepcopy(addresses[key]))
    wanted_scsi = devices.find("controller[@type='scsi']") is not None
    for el in devices.findall("controller"):
        devices.remove(el)
    for el in current.iterfind("devices/controller"):
        devices.append(copy.deepcopy(el))
    if wanted_scsi and current.find("devices/controller[@type='scsi']") is None:
        devices.append(etree.fromstring(b'<controller type="scsi" model="virtio-scsi"/>'))
    return etree.tostring(desired, encoding="unicode")


def with_uuid(xml: str, uuid: str) -> str:
    """A domain or network definition that names `uuid`, when it names none yet."""
    root = _tree(xml)
    if root.find("uuid") is None:
        element = etree.Element("uuid")
        element.text = uuid
        root.find("name").addnext(element)
    return etree.tostring(root, encoding="unicode")


def _device_key(el: etree._Element) -> str | None:
    if el.tag == "disk" and el.find("target") is not None:
        return "disk:" + el.find("target").get("dev")
    if el.tag == "interface" and el.find("mac") is not None:
        return "nic:" + el.find("mac").get("address").lower()
    if el.tag in ("memballoon", "rng", "channel", "serial", "console", "video"):
        return el.tag
    return None


def device_element(xml: str, key: str) -> str | None:
    """The XML of one disk or NIC (by fact key) of a definition, for hot-plug calls."""
    for el in _tree(xml).iterfind("devices/*"):
        if _device_key(el) == key:
            return etree.tostring(el, encoding="unicode")
    return None


def metadata_element(xml: str) -> str | None:
    """kvmctl's metadata element without namespaces, as libvirt's setMetadata wants it (it
    puts the element into the namespace given with the call)."""
    found = _tree(xml).find(f"metadata/{{{NAMESPACE}}}resource")
    if found is None:
        return None
    plain = copy.deepcopy(found)
    for el in plain.iter():
        if isinstance(el.tag, str):
            el.tag = etree.QName(el).localname
    etree.cleanup_namespaces(plain)
    return etree.tostring(plain, encoding="unicode")
