"""Edits of libvirt definitions the planner hands to apply, so that apply parses nothing.

A redefinition carries the current definition's identity (uuid, device addresses,
controllers); a hot-plug call gets one device's element; a network update one entry's element.
Everything here reads XML and writes XML: no libvirt.
"""

from __future__ import annotations

import copy

from lxml import etree

from ..host.facts import child, disk_key, machine_alias, nic_key, tree
from ..kinds import NAMESPACE


def carry_identity(desired_xml: str, current_xml: str) -> str:
    """The desired definition with the current one's device addresses and controllers.

    Redefining without them would let libvirt renumber PCI slots, which reorders the guest's
    devices (and renames its NICs) at the next boot.
    """
    desired, current = tree(desired_xml), tree(current_xml)
    if machine_alias(child(desired, "os/type").get("machine")) != \
            machine_alias(child(current, "os/type").get("machine")):
        # Another machine type has another PCI topology (pc: pci-root, q35: pcie-root and
        # root ports): the old controllers and addresses do not fit it, libvirt lays it out anew.
        return desired_xml
    addresses = {}
    for el in current.iterfind("devices/*"):
        key = _device_key(el)
        address = el.find("address")
        if key and address is not None:
            addresses[key] = address
    devices = child(desired, "devices")
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
    root = tree(xml)
    if root.find("uuid") is None:
        element = etree.Element("uuid")
        element.text = uuid
        child(root, "name").addnext(element)
    return etree.tostring(root, encoding="unicode")


def _device_key(el: etree._Element) -> str | None:
    target, mac = el.find("target"), el.find("mac")
    if el.tag == "disk" and target is not None:
        return disk_key(target.get("dev") or "")
    if el.tag == "interface" and mac is not None:
        return nic_key(mac.get("address") or "")
    if el.tag in ("memballoon", "rng", "channel", "serial", "console", "video"):
        return el.tag
    return None


def device_element(xml: str, key: str) -> str | None:
    """The XML of one disk or NIC (by fact key) of a definition, for hot-plug calls."""
    for el in tree(xml).iterfind("devices/*"):
        if _device_key(el) == key:
            return etree.tostring(el, encoding="unicode")
    return None


def metadata_element(xml: str) -> str | None:
    """kvmctl's metadata element without namespaces, as libvirt's setMetadata wants it (it
    puts the element into the namespace given with the call)."""
    found = tree(xml).find(f"metadata/{{{NAMESPACE}}}resource")
    if found is None:
        return None
    plain = copy.deepcopy(found)
    for el in plain.iter():
        if isinstance(el.tag, str):
            el.tag = etree.QName(el).localname
    etree.cleanup_namespaces(plain)
    return etree.tostring(plain, encoding="unicode")


def network_entry(xml: str, section: str, key: str) -> str | None:
    """One DHCP host (by MAC), DNS host (by IP) or the DHCP range of a network definition."""
    root = tree(xml)
    if section == "dhcp-range":
        found = root.find("ip/dhcp/range")
    elif section == "dhcp-host":
        found = next((h for h in root.iterfind("ip/dhcp/host")
                      if (h.get("mac") or "").lower() == key.lower()), None)
    else:
        found = next((h for h in root.iterfind("dns/host") if h.get("ip") == key), None)
    return etree.tostring(found, encoding="unicode") if found is not None else None


def plug_again(nic_xml: str) -> str:
    """A live NIC definition without what belongs to its previous connection (tap device,
    alias, network port), keeping its MAC, model and PCI slot."""
    nic = etree.fromstring(nic_xml.encode())
    for tag in ("target", "alias"):
        for el in nic.findall(tag):
            nic.remove(el)
    source = nic.find("source")
    if source is not None:
        for attribute in ("portid", "bridge"):
            if attribute in source.attrib:
                del source.attrib[attribute]
    return etree.tostring(nic, encoding="unicode")


# ---- elements the manifests do not model -------------------------------------------------------

# Elements of a domain definition kvmctl renders or libvirt adds to every definition by
# itself (their values are then libvirt's defaults): the XML paths, without indexes.
_DOMAIN_KNOWN = frozenset({
    "name", "uuid", "title", "description", "metadata", "memory", "currentMemory", "vcpu",
    "os", "os/type", "os/kernel", "os/initrd", "os/cmdline", "os/boot", "os/loader",
    "os/nvram", "os/firmware", "os/firmware/feature", "features", "features/acpi",
    "features/apic", "features/vmport", "features/pae", "cpu", "cpu/model", "cpu/topology",
    "cpu/feature", "clock", "clock/timer", "on_poweroff", "on_reboot", "on_crash", "pm",
    "pm/suspend-to-mem", "pm/suspend-to-disk", "devices", "devices/emulator",
    "devices/disk", "devices/controller", "devices/interface", "devices/serial",
    "devices/console", "devices/channel", "devices/input", "devices/graphics",
    "devices/video", "devices/memballoon", "devices/rng", "devices/audio",
    "resource", "resource/partition", "seclabel", "vcpus", "vcpus/vcpu",
})
# Devices libvirt adds by itself, and the ones kvmctl renders only in one form.
_CHANNEL_AGENT = "org.qemu.guest_agent.0"


def unmanaged(xml: str) -> list[tuple[str, str, etree._Element, str]]:
    """(path, parent path, element, why) of every element of a domain definition that kvmctl
    neither renders nor leaves to libvirt's defaults: a hostdev, a filesystem, a TPM, another
    tool's channel, QEMU command-line passthrough, ... The path is `/domain/...` with 1-based
    indexes among the element's siblings of its name; the parent path has none."""
    root = tree(xml)
    out: list[tuple[str, str, etree._Element, str]] = []

    def walk(el: etree._Element, path: str, depth: int) -> None:
        counts: dict[str, int] = {}
        for item in el:
            if not isinstance(item.tag, str):
                continue
            tag = _short_tag(item.tag)
            counts[tag] = counts.get(tag, 0) + 1
            here = f"{path}/{tag}" if path else tag
            where = f"/domain/{here}[{counts[tag]}]"
            if path == "metadata":
                continue  # other tools' metadata: libvirt keeps it, kvmctl never renders over
            if here not in _DOMAIN_KNOWN:
                out.append((where, path, item, "the manifests do not model it"))
            elif here == "clock" and (len(item) or item.get("offset", "utc") != "utc"):
                out.append((where, path, item, "clock settings (timers, an offset) the "
                                               "manifests do not model"))
            elif here == "pm":
                out.append((where, path, item, "power-management settings the manifests do "
                                               "not model"))
            elif here == "devices/channel" and _channel_name(item) != _CHANNEL_AGENT:
                out.append((where, path, item, "only the QEMU guest agent channel is "
                                               "modelled"))
            elif here == "devices/disk" and (why := _unmodelled_disk(item)):
                out.append((where, path, item, why))
            elif here == "devices/input" and item.get("bus") not in (None, "ps2"):
                out.append((where, path, item, "kvmctl's VMs have libvirt's PS/2 keyboard and "
                                               "mouse only"))
            elif here == "devices/video" and _video_model(item) not in (None, "vga", "cirrus",
                                                                          "bochs", "none"):
                out.append((where, path, item, "kvmctl leaves video to libvirt's default"))
            elif depth < 1 and here in ("os", "features", "cpu", "devices", "pm"):
                walk(item, here, depth + 1)

    walk(root, "", 0)
    return out


def with_unmanaged(desired_xml: str, live_xml: str) -> str:
    """The desired definition with the live one's unmanaged elements (unmanaged()) copied in
    as they are, at the end of the same parent: what keepUnmanaged keeps across redefinitions."""
    kept = unmanaged(live_xml)
    if not kept:
        return desired_xml
    desired = tree(desired_xml)
    have = {etree.tostring(el) for _, _, el, _ in unmanaged(desired_xml)}
    for _, parent_path, el, _ in kept:
        if etree.tostring(el) in have:
            continue
        if not parent_path and el.tag in _REPLACED:
            _keep_settings(desired, el)
            continue
        parent = desired if not parent_path else desired.find(parent_path)
        if parent is None:
            parent = etree.SubElement(desired, parent_path)
        parent.append(copy.deepcopy(el))
    return etree.tostring(desired, encoding="unicode")


_PREFIXES = {"http://libvirt.org/schemas/domain/qemu/1.0": "qemu"}


def _short_tag(tag: str) -> str:
    """`{ns}name` as `prefix:name` for the namespaces libvirt documents (qemu:commandline)."""
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return f"{_PREFIXES.get(ns, ns)}:{name}"
    return tag


def _unmodelled_disk(disk: etree._Element) -> str | None:
    """Why a disk element is none kvmctl renders (None: it is one)."""
    device = disk.get("device", "disk")
    source = disk.find("source")
    if device in ("cdrom", "floppy"):
        volume = source.get("volume", "") if source is not None else ""
        if device == "cdrom" and volume.endswith("-cidata.iso"):
            return None  # kvmctl's cloud-init seed
        return (f"a {device} (kvmctl attaches only its own cloud-init seed as one)")
    if disk.get("type") in ("block", "network", "dir", "nvme", "vhostuser"):
        return f"a {disk.get('type')} disk (kvmctl attaches volumes of pools)"
    return None


# Elements kvmctl renders too, whose unmodelled settings keepUnmanaged keeps whole: the clock
# and power management (kvmctl models neither). (libvirt rewrites a CPU's check and fallback
# itself, kvmctl's own definitions too: those are not told apart.)
_REPLACED = ("clock", "pm")


def _keep_settings(desired: etree._Element, live: etree._Element) -> None:
    mine = desired.find(live.tag)
    if mine is not None:
        desired.replace(mine, copy.deepcopy(live))  # clock and pm are children of <domain>
    else:
        desired.append(copy.deepcopy(live))


def _video_model(video: etree._Element) -> str | None:
    model = video.find("model")
    return model.get("type") if model is not None else None


def _channel_name(channel: etree._Element) -> str | None:
    target = channel.find("target")
    return target.get("name") if target is not None else None
