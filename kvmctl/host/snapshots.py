"""A domain's snapshots on its host: read, created from rendered XML, reverted, deleted.

What libvirt 9.0 and QEMU 7.2 can do, and so what kvmctl offers (checked against libvirt's
formatsnapshot and the snapshot API docs):
- internal snapshots (qcow2 disks only; with the guest's memory when it runs): create, list,
  revert, delete;
- external snapshots: create and delete only; reverting one arrived in libvirt 9.9, so kvmctl
  never offers it here;
- a UEFI (pflash) guest: no internal snapshot (libvirt 9.2 forbade them; kvmctl refuses them
  on every version), a raw disk: none either.

Ownership: a snapshot has no metadata element of its own, so the mark is the last line of its
description, `kvmctl: project=NAME` (a line kvmctl writes and reads, nothing else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import libvirt
from lxml import etree

from ..errors import HypervisorError
from .connection import STATES, call

MARK = re.compile(r"(?:^|\n)kvmctl: project=(?P<project>[^\n]+)\Z")
_UEFI = re.compile(r"<nvram|<loader[^>]*type=['\"]pflash['\"]|firmware=['\"]efi['\"]")


@dataclass(frozen=True)
class LiveSnapshot:
    domain: str
    name: str
    created: int  # seconds since the epoch, as libvirt recorded it
    state: str  # the domain's state it recorded: running | shutoff | paused ...
    parent: str | None
    description: str  # without kvmctl's mark
    project: str | None  # the project that made it (its mark), None: not kvmctl's
    memory: bool  # holds the guest's memory (revert resumes it running)
    external: bool
    current: bool

    @property
    def revertible(self) -> bool:
        return not self.external


def mark(description: str, project: str) -> str:
    """A description with kvmctl's ownership line at its end."""
    text = description.rstrip("\n")
    return (text + "\n" if text else "") + f"kvmctl: project={project}"


def parse(domain: str, xml: str, current: bool) -> LiveSnapshot:
    root = etree.fromstring(xml.encode())
    description = root.findtext("description") or ""
    found = MARK.search(description)
    project = found.group("project") if found else None
    if found:
        description = description[:found.start()]
    memory = root.find("memory")
    memory_kind = memory.get("snapshot") if memory is not None else None
    disks = [d.get("snapshot") for d in root.iterfind("disks/disk")]
    external = memory_kind == "external" or "external" in disks
    return LiveSnapshot(
        domain, root.findtext("name") or "", int(root.findtext("creationTime") or 0),
        root.findtext("state") or "", root.findtext("parent/name"), description, project,
        memory_kind in ("internal", "external"), external, current)


def internal_refusal(domain_xml: str) -> str | None:
    """Why the domain cannot hold internal snapshots (None: it can), and what would work."""
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


class SnapshotOps:
    """Snapshot calls on one libvirt connection (mixed into Hypervisor)."""

    conn: Any

    def _lookup_domain(self, name: str) -> Any:
        return call(f"look up domain {name}", self.conn.lookupByName, name)

    def domain_xml(self, domain: str) -> str:
        """The domain's persistent definition."""
        dom = self._lookup_domain(domain)
        return str(call(f"read domain {domain}", dom.XMLDesc,
                        libvirt.VIR_DOMAIN_XML_INACTIVE))

    def snapshots(self, domain: str) -> list[LiveSnapshot]:
        dom = self._lookup_domain(domain)
        current = None
        try:
            if dom.hasCurrentSnapshot():
                current = dom.snapshotCurrent().getName()
        except libvirt.libvirtError:
            current = None
        out = []
        for snap in call(f"list the snapshots of {domain}", dom.listAllSnapshots, 0):
            try:
                xml = snap.getXMLDesc(0)
            except libvirt.libvirtError:
                continue  # deleted meanwhile
            out.append(parse(domain, xml, snap.getName() == current))
        return sorted(out, key=lambda s: (s.created, s.name))

    def create_snapshot(self, domain: str, xml: str, quiesce: bool = False) -> None:
        dom = self._lookup_domain(domain)
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        if quiesce:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        call(f"snapshot {domain}", dom.snapshotCreateXML, xml, flags)

    def revert_snapshot(self, domain: str, name: str) -> str:
        """Revert to `name`; the domain's state afterwards (the one the snapshot recorded)."""
        dom = self._lookup_domain(domain)
        snap = call(f"look up snapshot {name} of {domain}", dom.snapshotLookupByName, name, 0)
        call(f"revert {domain} to snapshot {name}", dom.revertToSnapshot, snap, 0)
        return STATES.get(call(f"read domain {domain}", dom.state)[0], "other")

    def delete_snapshot(self, domain: str, name: str) -> None:
        dom = self._lookup_domain(domain)
        snap = call(f"look up snapshot {name} of {domain}", dom.snapshotLookupByName, name, 0)
        try:
            snap.delete(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"delete snapshot {name} of {domain}: "
                                  f"{exc.get_error_message()}") from None
