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

import json
import re
import subprocess
import time
from typing import Any

import libvirt
from lxml import etree

from ..errors import HypervisorError
from ..kinds import SnapshotOrigin, snapshot_mark
from .connection import STATES, call
from .state import LiveSnapshot

MARK = re.compile(r"(?:^|\n)kvmctl: project=(?P<project>[^\s]+)(?: origin=(?P<origin>[a-z]+))?"
                  r"(?: spec=(?P<spec>[0-9a-f]+))?(?P<quiesced> quiesced)?\Z")


def mark(description: str, project: str, origin: SnapshotOrigin = SnapshotOrigin.MANUAL,
         quiesced: bool = False) -> str:
    """A description with kvmctl's ownership line at its end."""
    text = description.rstrip("\n")
    return (text + "\n" if text else "") + snapshot_mark(project, origin, quiesced=quiesced)


def parse(domain: str, xml: str, current: bool) -> LiveSnapshot:
    root = etree.fromstring(xml.encode())
    description = root.findtext("description") or ""
    found = MARK.search(description)
    project = found.group("project") if found else None
    origin = None
    if found:
        try:
            origin = SnapshotOrigin(found.group("origin") or SnapshotOrigin.MANUAL)
        except ValueError:
            origin = SnapshotOrigin.MANUAL  # a newer kvmctl's: kept, never removed by a rule
    if found:
        description = description[:found.start()]
    memory = root.find("memory")
    memory_kind = memory.get("snapshot") if memory is not None else None
    disks = [d.get("snapshot") for d in root.iterfind("disks/disk")]
    external = memory_kind == "external" or "external" in disks
    inner = root.find("domain")
    return LiveSnapshot(
        domain, root.findtext("name") or "", int(root.findtext("creationTime") or 0),
        root.findtext("state") or "", root.findtext("parent/name"), description, project,
        origin, (found.group("spec") or "") if found else "",
        memory_kind in ("internal", "external"), external, current,
        bool(found and found.group("quiesced")),
        etree.tostring(inner, encoding="unicode") if inner is not None else "")


def snapshots_of(dom: Any, domain: str) -> list[LiveSnapshot]:
    """A domain's snapshots, oldest first."""
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
        return snapshots_of(self._lookup_domain(domain), domain)

    def create_snapshot(self, domain: str, xml: str, quiesce: bool = False) -> None:
        """An internal snapshot. `quiesce`: the guest agent freezes the guest's file systems for
        that moment (QEMU's quiesce flag is for disk-only snapshots, which are external here)."""
        dom = self._lookup_domain(domain)
        if quiesce:
            call(f"freeze the file systems of {domain} (QEMU guest agent)", dom.fsFreeze, None, 0)
        try:
            call(f"snapshot {domain}", dom.snapshotCreateXML, xml,
                 libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
        finally:
            if quiesce:
                call(f"thaw the file systems of {domain} (QEMU guest agent)", dom.fsThaw, None, 0)

    def snapshot_sizes(self, domain: str) -> dict[str, int]:
        """Bytes of guest state (memory) each snapshot holds, by name, read with qemu-img from
        the domain's qcow2 files where this machine can read them (a local URI); {} otherwise:
        libvirt has no call for it. A disk-only snapshot holds 0 of it."""
        uri = str(call("read the connection's URI", self.conn.getURI))
        if "://" in uri and uri.split("://", 1)[1].split("/", 1)[0] not in ("", "localhost"):
            return {}
        root = etree.fromstring(self.domain_xml(domain).encode())
        sizes: dict[str, int] = {}
        for disk in root.iterfind("devices/disk"):
            driver, source = disk.find("driver"), disk.find("source")
            path = source.get("file") if source is not None else None
            if source is not None and source.get("pool") and source.get("volume"):
                try:
                    path = self.conn.storagePoolLookupByName(source.get("pool")) \
                        .storageVolLookupByName(source.get("volume")).path()
                except libvirt.libvirtError:
                    path = None
            if driver is None or driver.get("type") != "qcow2" or not path:
                continue
            try:
                done = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                                      capture_output=True, text=True, timeout=30, check=True)
                info = json.loads(done.stdout)
            except (OSError, subprocess.SubprocessError, ValueError):
                return {}
            for snap in info.get("snapshots", []) if isinstance(info, dict) else []:
                name, size = snap.get("name"), snap.get("vm-state-size", 0)
                if isinstance(name, str) and isinstance(size, int):
                    sizes[name] = sizes.get(name, 0) + size
        return sizes

    def checkpoint_count(self, domain: str) -> int:
        """How many checkpoints (incremental backup) libvirt keeps of the domain."""
        dom = self._lookup_domain(domain)
        try:
            return len(dom.listAllCheckpoints(0))
        except (libvirt.libvirtError, AttributeError):
            return 0  # a driver or binding without checkpoints has none

    def revert_snapshot(self, domain: str, name: str, thaw: bool = False) -> str:
        """Revert to `name`; the domain's state afterwards (the one the snapshot recorded).
        `thaw`: the snapshot was taken frozen, so the guest resumes frozen: thaw it (the agent
        reconnects first; tried for up to 30 s)."""
        dom = self._lookup_domain(domain)
        snap = call(f"look up snapshot {name} of {domain}", dom.snapshotLookupByName, name, 0)
        call(f"revert {domain} to snapshot {name}", dom.revertToSnapshot, snap, 0)
        state = STATES.get(call(f"read domain {domain}", dom.state)[0], "other")
        if thaw and state == "running":
            deadline = time.monotonic() + 30
            while True:
                try:
                    dom.fsThaw(None, 0)
                    break
                except libvirt.libvirtError as exc:
                    if time.monotonic() > deadline:
                        raise HypervisorError(
                            f"reverted {domain} to {name}, but its file systems stay frozen: "
                            f"the guest agent did not answer ({exc.get_error_message()}); "
                            f"run virsh domfsthaw {domain}") from None
                    time.sleep(0.5)
        return state

    def delete_snapshot(self, domain: str, name: str) -> None:
        dom = self._lookup_domain(domain)
        snap = call(f"look up snapshot {name} of {domain}", dom.snapshotLookupByName, name, 0)
        try:
            snap.delete(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"delete snapshot {name} of {domain}: "
                                  f"{exc.get_error_message()}") from None
