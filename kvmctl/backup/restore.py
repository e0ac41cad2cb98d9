"""`kvmctl restore DIR [--host H] [--name NEW]`: a backup made by write.py, back on a host.

In this order, and nothing is created before the checks pass:

1. backup.json is read and checked (kvmctl.backup.parse_manifest): a damaged or edited one is
   refused, naming the file and the field;
2. every file's length and SHA-256 is checked against it;
3. the target host is checked: the VM's name (NEW, or the original) and every volume name the
   restore would create must be free, and every pool must exist and run there;
4. each disk is uploaded into a new volume of the same pool (claimed for the project first, in
   its ownership record), then downloaded again: length and SHA-256 must be the backup's;
5. the domain is defined from domain.xml, edited (`restored_xml`): the new name, no uuid, the
   new volumes, kvmctl's ownership mark for the project; with --name the MAC addresses go too,
   so that libvirt gives the copy new ones;
6. it is started only when it ran at backup time and the caller asks (`start`).

A failure after the first volume was created removes what this restore created (its volumes,
their claims, the domain), never anything else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lxml import etree

from ..errors import HypervisorError, KvmctlError, PlanError, UsageError
from ..host import backupio
from ..host.hypervisor import Hypervisor
from ..host.ownership import Owner, OwnershipRecord
from ..host.records import DEFINITION_NS
from ..kinds import NAMESPACE, Kind, known_kind
from . import (
    DOMAIN_FILE,
    KVMCTL_NAME,
    MANIFEST_FILE,
    BackupFile,
    BackupManifest,
    DiskRole,
    ProgressEvent,
    ProgressFn,
    open_member,
    parse_manifest,
    read_member,
    verify_member,
)


@dataclass(frozen=True)
class RestoredVolume:
    file: BackupFile
    pool: str
    volume: str  # its name on the target host
    owner: Owner


@dataclass(frozen=True)
class RestorePlan:
    """What a restore would create on the target host."""

    manifest: BackupManifest
    name: str
    project: str  # the project the copy belongs to
    volumes: tuple[RestoredVolume, ...]
    keep_macs: bool
    start: bool  # start it after the define
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Restored:
    plan: RestorePlan
    started: bool


def read_backup(directory: str) -> BackupManifest:
    """backup.json of `directory`, checked; UsageError naming what is wrong."""
    if not os.path.isdir(directory):
        raise UsageError(f"{directory}: no such directory" if not os.path.lexists(directory)
                         else f"{directory}: not a directory")
    where = os.path.join(directory, MANIFEST_FILE)
    if not os.path.lexists(where):
        raise UsageError(f"{where}: missing: {directory} is not a kvmctl backup (or one that "
                         "did not finish)")
    fd = open_member(directory, MANIFEST_FILE)
    try:
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
            if len(data) > 1 << 21:
                break
    finally:
        os.close(fd)
    return parse_manifest(data, where)


def verify(directory: str, manifest: BackupManifest, progress: ProgressFn | None = None
           ) -> None:
    """Every file of the backup has the length and SHA-256 backup.json gives it."""
    report = progress or (lambda _event: None)
    for f in manifest.files:
        report(ProgressEvent("verify", f.name, 0, f.length))
        verify_member(directory, f, _reporter(report, "verify", f.name, f.length))
        report(ProgressEvent("verify", f.name, f.length, f.length, finished=True))


def _reporter(report: ProgressFn, phase: str, item: str, total: int
              ) -> Callable[[int], None]:
    return lambda done: report(ProgressEvent(phase, item, done, total))


def restored_volume_name(volume: str, old_vm: str, new_vm: str, target: str, fmt: str) -> str:
    """A volume's name for a copy of the VM named `new_vm`: the old VM's name at its start
    replaced by the new one (`web-root.qcow2` -> `db-root.qcow2`), else `<new>-<target>` with
    the volume's extension (`db-vda.qcow2`)."""
    if new_vm == old_vm:
        return volume
    if old_vm and volume.startswith(old_vm) and len(volume) > len(old_vm):
        return new_vm + volume[len(old_vm):]
    _, dot, ext = volume.rpartition(".")
    return f"{new_vm}-{target}" + (f".{ext}" if dot and ext else f".{fmt}")


def plan_restore(hv: Hypervisor, manifest: BackupManifest, project: str, host: str,
                 new_name: str | None = None, start: bool = False) -> RestorePlan:
    """What a restore onto `hv` would create, checked against what the host has: PlanError
    naming every conflict (an existing VM or volume, a missing or stopped pool)."""
    if new_name is not None and not KVMCTL_NAME.match(new_name):
        raise UsageError(f"--name {new_name!r}: lower-case letters, digits and . _ - only, at "
                         "most 63, starting with a letter or digit")
    name = new_name or manifest.vm
    renamed = name != manifest.vm
    problems: list[str] = []
    if hv.identity(Kind.VM, name) is not None:
        problems.append(f"a VM {name!r} exists on {host} already: restore never overwrites; "
                        + ("pick another --name" if renamed else
                           "delete it first, or restore a copy with --name NEW"))
    pools: dict[str, set[str] | None] = {}
    volumes = []
    for f in manifest.disks:
        assert f.disk is not None
        d = f.disk
        if d.pool not in pools:
            pools[d.pool] = _pool_volumes(hv, d.pool, host, problems)
        vol_name = restored_volume_name(d.volume, manifest.vm, name, d.target, d.format)
        taken = pools[d.pool]
        if taken is not None and vol_name in taken:
            problems.append(f"volume {vol_name} exists in pool {d.pool} on {host} already: "
                            "restore never overwrites; "
                            + ("pick another --name" if renamed else
                               "delete it first, or restore a copy with --name NEW"))
        if d.backing_path and not backupio.volume_at(hv, d.backing_path):
            problems.append(f"disk {d.target} ({f.name}) is a qcow2 overlay of "
                            f"{d.backing_path}, which {host} does not have: put that image "
                            f"there first (the same path), or back the VM up while it runs "
                            "(the backup API copies the whole chain into one image)")
        volumes.append(RestoredVolume(f, d.pool, vol_name, _owner(project, d, vol_name, name,
                                                                   renamed)))
    names = [(v.pool, v.volume) for v in volumes]
    if len(set(names)) != len(names):
        problems.append("two disks of the backup would get the same volume name: restore it "
                        "with another --name")
    if problems:
        raise PlanError(f"cannot restore {manifest.vm!r}"
                        + (f" as {name!r}" if renamed else "") + f" on {host}:\n  "
                        + "\n  ".join(problems) + "\nnothing was changed")
    notes = []
    if start and manifest.state != "running":
        notes.append(f"not started: it was {manifest.state} when it was backed up")
    return RestorePlan(manifest, name, project, tuple(volumes), keep_macs=not renamed,
                       start=start and manifest.state == "running", notes=tuple(notes))


def _pool_volumes(hv: Hypervisor, pool: str, host: str, problems: list[str]) -> set[str] | None:
    try:
        names = hv.volume_names(pool)
    except HypervisorError as exc:
        text = str(exc)
        if "not found" in text.lower() or "no storage pool" in text.lower():
            problems.append(f"pool {pool} does not exist on {host}: create StoragePool {pool} "
                            f"on {host} first (kvmctl apply), then restore")
        elif "inactive" in text.lower() or "not active" in text.lower():
            problems.append(f"pool {pool} is not running on {host}: start it first "
                            "(kvmctl apply does)")
        else:
            problems.append(f"pool {pool} on {host}: {text}")
        return None
    return names


def _owner(project: str, d: DiskRole, volume: str, vm: str, renamed: bool) -> Owner:
    """Whom the restored volume belongs to: the project, as the Disk (or seed) it was, or, for
    a copy under a new name, as the Disk its new volume name makes (name.format)."""
    # backup.json is not trusted for the kind: a data disk recorded as a seed would be
    # pruned without --prune-disks. A disk is a Disk, a CD-ROM the VM's seed.
    kind = Kind.SEED if d.device == "cdrom" else Kind.DISK
    o = d.owner if d.owner is not None and known_kind(d.owner.kind) == kind else None
    if not renamed and o is not None:
        return Owner(project, kind, o.name, o.spec_hash, "", o.protect)
    if kind == Kind.SEED:
        return Owner(project, kind, vm)
    stem = volume[:-len(d.format) - 1] if volume.endswith(f".{d.format}") else volume
    return Owner(project, kind, stem)


# ---- the definition -----------------------------------------------------------------------------

def restored_xml(xml: str, *, name: str, project: str,
                 volumes: Mapping[str, tuple[str, str, str]], keep_macs: bool) -> str:
    """domain.xml for the target host: named `name`, without <uuid> (libvirt gives a new one)
    and kvmctl's definition record (it proves nothing of this definition), every restored
    disk (by target: (pool, volume, path)) pointing at its new volume, no <backingStore>
    under them (the images are whole, or name their base themselves), kvmctl's ownership
    mark naming `project` and `name`; MAC addresses dropped unless `keep_macs`."""
    from ..render.definitions import render_template
    try:
        root = etree.fromstring(xml.encode(), etree.XMLParser(resolve_entities=False,
                                                              no_network=True))
    except etree.XMLSyntaxError as exc:
        raise UsageError(f"{DOMAIN_FILE}: not XML ({exc})") from None
    if root.getroottree().docinfo.internalDTD is not None or root.tag != "domain":
        raise UsageError(f"{DOMAIN_FILE}: not a libvirt domain definition (which has no "
                         "DOCTYPE and one <domain> element)")
    _text(root, "name", name)
    for uuid in root.findall("uuid"):
        root.remove(uuid)
    title = root.find("title")
    if title is not None and "(kvmctl project" in (title.text or ""):
        title.text = f"{name} (kvmctl project {project})"
    metadata = root.find("metadata")
    if metadata is None:
        metadata = etree.Element("metadata")
        root.insert(_after(root, ("name", "title", "description")), metadata)
    for element in list(metadata):
        if isinstance(element.tag, str) and etree.QName(element).namespace == DEFINITION_NS:
            metadata.remove(element)
    resource = metadata.find(f"{{{NAMESPACE}}}resource")
    if resource is None:
        fragment = render_template("restore-owner.xml.j2", project=project, name=name)
        metadata.append(etree.fromstring(fragment.encode()))
    else:
        for child in resource:
            if isinstance(child.tag, str) and etree.QName(child).localname == "project":
                child.text = project
            elif isinstance(child.tag, str) and etree.QName(child).localname == "name":
                child.text = name
    # A UEFI guest's variables file is not in the backup: libvirt makes a fresh one from its
    # template (a copy must never share, and an undo never delete, the original's).
    for os_element in root.findall("os"):
        for nvram in os_element.findall("nvram"):
            os_element.remove(nvram)
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if dev not in volumes:
            writable = disk.get("device", "disk") == "disk" and disk.find("readonly") is None
            if writable and disk.find("source") is not None:
                raise PlanError(f"{DOMAIN_FILE}: disk {dev or '?'} is not in the backup (not "
                                "a volume of a pool): the restored VM would write to the "
                                "original's disk; give it a volume in a pool, or detach it "
                                "before the backup")
            continue
        pool, volume, path = volumes[dev]
        source = disk.find("source")
        if source is None:
            continue
        if disk.get("type") == "volume":
            source.set("pool", pool)
            source.set("volume", volume)
        else:
            disk.set("type", "file")
            for attr in list(source.attrib):
                if attr != "index":
                    del source.attrib[attr]
            source.set("file", path)
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
    if not keep_macs:
        for iface in root.iterfind("devices/interface"):
            for mac in iface.findall("mac"):
                iface.remove(mac)
    return etree.tostring(root, encoding="unicode")


def _text(root: etree._Element, tag: str, value: str) -> None:
    element = root.find(tag)
    if element is None:
        raise UsageError(f"{DOMAIN_FILE}: the definition has no <{tag}>")
    element.text = value


def _after(root: etree._Element, tags: tuple[str, ...]) -> int:
    index = 0
    for i, child in enumerate(root):
        if child.tag in tags:
            index = i + 1
    return index


# ---- the restore --------------------------------------------------------------------------------

def restore(hv: Hypervisor, directory: str, plan: RestorePlan,
            progress: ProgressFn | None = None) -> Restored:
    """Carry out `plan` (from `plan_restore`, after `verify`): volumes, domain, start. On any
    failure what it created is removed again, and the error raised."""
    report = progress or (lambda _event: None)
    manifest = plan.manifest
    domain_file = manifest.file("domain")
    assert domain_file is not None
    try:
        xml = read_member(directory, domain_file).decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise UsageError(f"{os.path.join(directory, domain_file.name)}: not UTF-8 text") from None
    # Checked, as it will be edited, before anything is created: a definition that cannot be
    # restored fails here, not after every disk went up.
    restored_xml(xml, name=plan.name, project=plan.project,
                 volumes={v.file.disk.target: (v.pool, v.volume, "/")
                          for v in plan.volumes if v.file.disk is not None},
                 keep_macs=plan.keep_macs)
    claimed: list[RestoredVolume] = []
    created: list[RestoredVolume] = []
    defined = False
    try:
        paths: dict[str, tuple[str, str, str]] = {}
        for v in plan.volumes:
            assert v.file.disk is not None
            # Claimed first, as apply does: a volume of the project is never unclaimed.
            _claim(hv, v.pool, plan.project, v.volume, v.owner)
            claimed.append(v)
            _upload(hv, directory, v, report)  # made here, or removed again by it
            created.append(v)
            backupio.refresh_pool(hv, v.pool)  # libvirt learns the format from the header
            paths[v.file.disk.target] = (v.pool, v.volume,
                                         backupio.volume_path(hv, v.pool, v.volume))
        new_xml = restored_xml(xml, name=plan.name, project=plan.project, volumes=paths,
                               keep_macs=plan.keep_macs)
        hv.define_domain(plan.name, new_xml)
        defined = True
        started = False
        if plan.start:
            hv.start_domain(plan.name)
            started = True
        return Restored(plan, started)
    except BaseException:
        _undo(hv, plan.name if defined else None, plan.project, claimed, created)
        raise


def _upload(hv: Hypervisor, directory: str, v: RestoredVolume, report: ProgressFn) -> None:
    """The file into a new volume; what was sent is hashed on the way and must be what
    backup.json says (the file was verified before anything was created, so this catches a
    file changed since). It is not read back: the backup stays the source of truth, and a
    read-back would double the transfer (a move between hosts does read back, for there the
    source goes away). The volume is deleted again on any mismatch."""
    from ..render.definitions import volume_xml
    from ..render.specs import VolumeSpec
    f = v.file
    path = os.path.join(directory, f.name)
    # A raw volume of exactly the file's length, overwritten whole: the file holds the
    # volume's bytes (a qcow2's header included), and the pool's refresh reads its format.
    xml = volume_xml(VolumeSpec(v.pool, v.volume, max(f.length, 1), "raw",
                                allocation_bytes=0))
    report(ProgressEvent("upload", f.name, 0, f.length))
    sent = backupio.upload_from_file(hv, v.pool, v.volume, xml, path,
                                     _reporter(report, "upload", f.name, f.length))
    report(ProgressEvent("upload", f.name, sent.length, f.length, finished=True))
    problem: KvmctlError | None = None
    if (sent.length, sent.sha256) != (f.length, f.sha256):
        problem = UsageError(f"{path} changed while it was restored (its SHA-256 is no "
                             "longer backup.json's)")
    elif backupio.volume_length(hv, v.pool, v.volume) != f.length:
        problem = HypervisorError(
            f"volume {v.volume} in pool {v.pool} on {hv.uri} is not {f.length} bytes long "
            f"after the upload from {path}")
    if problem is not None:
        with contextlib.suppress(KvmctlError):
            hv.delete_volume(v.pool, v.volume)
        raise problem


def _claim(hv: Hypervisor, pool: str, project: str, volume: str, owner: Owner | None) -> None:
    """Record (or, with None, remove) the project's claim on a volume in the pool's record."""
    record = hv.read_record(pool, project) or OwnershipRecord(project, False, {})
    volumes = dict(record.volumes)
    if owner is None:
        if volume not in volumes:
            return
        volumes.pop(volume)
    else:
        volumes[volume] = owner
    hv.write_record(pool, OwnershipRecord(project, record.owns_pool, volumes))


def _undo(hv: Hypervisor, domain: str | None, project: str, claimed: list[RestoredVolume],
          created: list[RestoredVolume]) -> None:
    """Remove what this restore created: the domain it defined, the volumes it made, the
    claims it recorded. Errors here are swallowed: the failure that got here is the one
    reported."""
    if domain is not None:
        with contextlib.suppress(KvmctlError):
            hv.undefine_domain(domain)
    for v in reversed(created):
        with contextlib.suppress(KvmctlError):
            hv.delete_volume(v.pool, v.volume)
    for v in reversed(claimed):
        with contextlib.suppress(KvmctlError):
            _claim(hv, v.pool, project, v.volume, None)
