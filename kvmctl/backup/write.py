"""`kvmctl backup VM --to DIR`: the VM's definition, its manifests and every disk volume's
content, read through libvirt's storage streams, into a new directory.

Consistency: a running (or paused) VM's writable disks are read through libvirt's backup API
in push mode: one job writes every such disk, as it was at the moment the job began, into a
scratch file of the disk's pool (`kvmctl-backup-<random>-<target>.<format>`); the scratch
volumes are then streamed into DIR and deleted, also when anything fails. The guest keeps
running meanwhile. Without a guest agent nothing is quiesced: the copy is what a power cut at
that moment would have left on the disks (crash-consistent). Read-only disks and CD-ROMs
(a cloud-init seed) cannot change and are streamed directly, as are all the disks of a VM that
is shut off; a VM that starts while its disks are read fails the backup.

Files are written first, `backup.json` last (renamed into place whole), then `SHA256SUMS`: a
directory without backup.json is no backup. A backup that fails removes what it wrote.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import HypervisorError, KvmctlError, PlanError, UsageError
from ..host import backupio
from ..host.hypervisor import Hypervisor
from ..host.ownership import owner_from_xml
from ..kinds import Kind
from . import (
    CONSISTENCY_BACKUP_API,
    CONSISTENCY_STOPPED,
    DOMAIN_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MANIFESTS_FILE,
    READ_BACKUP_API,
    READ_DIRECT,
    ROLE_DISK,
    ROLE_DOMAIN,
    ROLE_MANIFESTS,
    SCRATCH_PREFIX,
    SUMS_FILE,
    BackupFile,
    BackupManifest,
    DiskRole,
    ProgressEvent,
    ProgressFn,
    VolumeOwner,
    sums_text,
)

if TYPE_CHECKING:
    from ..manifest.documents import Document

DEFAULT_TIMEOUT = 3600.0  # seconds the backup job may take
_ACTIVE = ("running", "paused", "shutting-down", "crashed", "suspended", "other")


@dataclass(frozen=True)
class _Scratch:
    disk: backupio.DiskSource
    name: str  # the scratch volume in the disk's pool
    file: str  # its path, as the host sees it


def vm_documents(documents: Sequence[Document], vm: str) -> list[Document]:
    """The VirtualMachine document named `vm` and the Disk documents it uses, in that order;
    [] when the manifests do not declare it."""
    found = next((d for d in documents if d.kind == Kind.VM and d.name == vm), None)
    if found is None:
        return []
    spec = found.body.get("spec") if isinstance(found.body, dict) else None
    used = [att.get("disk") for att in (spec or {}).get("disks", ()) if isinstance(att, dict)]
    disks = {d.name: d for d in documents if d.kind == Kind.DISK}
    return [found] + [disks[name] for name in used if isinstance(name, str) and name in disks]


def manifests_yaml(documents: Sequence[Document]) -> str:
    import yaml
    header = ("# kvmctl backup: the documents that declared this VM when it was backed up "
              "(apply them with kvmctl apply -f, or keep them with the project's manifests)\n")
    return header + yaml.safe_dump_all([d.body for d in documents], sort_keys=False,
                                       allow_unicode=True)


def backup(hv: Hypervisor, vm: str, directory: str, *, project: str, host: str,
           documents: Sequence[Document] | None = None, progress: ProgressFn | None = None,
           timeout: float = DEFAULT_TIMEOUT, now: dt.datetime | None = None
           ) -> BackupManifest:
    """Back up VM `vm` of host `hv` (named `host` in the project `project`) into `directory`,
    which must not exist or be empty (its parent must exist). `documents`: the loaded
    manifests, whose documents for the VM go into manifests.yaml. Returns what backup.json
    says. UsageError for a wrong directory or VM, PlanError for a VM whose disks cannot be
    read consistently, HypervisorError when libvirt fails; nothing is left in `directory`
    then."""
    report = progress or (lambda _event: None)
    made_dir = _prepare(directory)
    written: list[str] = []
    try:
        try:
            return _backup(hv, vm, directory, project, host, documents or (), report, timeout,
                           now or dt.datetime.now(dt.UTC), written)
        except OSError as exc:  # the backup's own files: a full disk, a permission
            where = exc.filename or directory
            raise UsageError(f"writing the backup into {directory}: {where}: "
                             f"{exc.strerror or exc}") from None
    except BaseException:
        for path in reversed(written):
            with contextlib.suppress(OSError):
                os.unlink(path)
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def _prepare(directory: str) -> bool:
    """The target directory, checked (or made). Whether this call made it."""
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise UsageError(f"--to {directory}: exists and is not a directory")
        try:
            if os.listdir(directory):
                raise UsageError(f"--to {directory}: the directory is not empty; a backup "
                                 "goes into a new or empty directory")
        except OSError as exc:
            raise UsageError(f"--to {directory}: cannot read it: {exc.strerror}") from None
        return False
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent):
        raise UsageError(f"--to {directory}: its parent {parent} does not exist")
    try:
        os.mkdir(directory, 0o700)
    except OSError as exc:
        raise UsageError(f"--to {directory}: cannot create it: {exc.strerror}") from None
    return True


def _backup(hv: Hypervisor, vm: str, directory: str, project: str, host: str,
            documents: Sequence[Document], report: ProgressFn, timeout: float,
            now: dt.datetime, written: list[str]) -> BackupManifest:
    if hv.identity(Kind.VM, vm) is None:
        raise UsageError(f"no VM {vm!r} on host {host} ({hv.uri})")
    state = hv.domain_state(vm)
    xml = backupio.domain_xml(hv, vm)
    owner = owner_from_xml(xml)
    owning_project = owner.project if owner is not None else project
    disks, skipped = backupio.domain_disks(hv, xml)
    notes = [f"disk {s.target} is not in the backup: {s.why}" for s in skipped]
    owners = _volume_owners(hv, disks, owning_project)
    active = state in _ACTIVE
    live = [d for d in disks if active and d.device == "disk" and not d.readonly]
    files: list[BackupFile] = []
    if live:
        files += _through_backup_api(hv, vm, directory, live, disks, skipped, owners, report,
                                     timeout, written)
    for d in disks:
        if d in live:
            continue
        files.append(_direct(hv, directory, d, owners, report, written))
    if not active and hv.domain_state(vm) in _ACTIVE:
        raise PlanError(f"VM {vm!r} was started while its disks were read: the backup is not "
                        "of one moment; nothing was kept, back it up again")

    domain = _write(directory, DOMAIN_FILE, xml.encode(), written)
    files.insert(0, BackupFile(DOMAIN_FILE, ROLE_DOMAIN, *domain))
    docs = vm_documents(documents, vm)
    if docs:
        text = manifests_yaml(docs).encode()
        files.insert(1, BackupFile(MANIFESTS_FILE, ROLE_MANIFESTS,
                                   *_write(directory, MANIFESTS_FILE, text, written)))
    else:
        notes.append("the loaded manifests do not declare this VM"
                     + ("" if documents else " (none were given: -f)")
                     + ": no manifests.yaml; restore defines it from domain.xml")
    manifest = BackupManifest(
        FORMAT_VERSION, __version__, vm, owning_project, host, hv.uri,
        now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), state,
        CONSISTENCY_BACKUP_API if live else CONSISTENCY_STOPPED, bool(docs), tuple(files),
        tuple(notes))
    data = manifest.to_json().encode()
    tmp = _write(directory, MANIFEST_FILE + ".part", data, written)
    os.replace(os.path.join(directory, MANIFEST_FILE + ".part"),
               os.path.join(directory, MANIFEST_FILE))
    written[written.index(os.path.join(directory, MANIFEST_FILE + ".part"))] = \
        os.path.join(directory, MANIFEST_FILE)
    _write(directory, SUMS_FILE, sums_text(manifest.files, tmp[1]).encode(), written)
    _fsync_dir(directory)
    return manifest


def _volume_owners(hv: Hypervisor, disks: Sequence[backupio.DiskSource], project: str
                   ) -> dict[tuple[str, str], VolumeOwner]:
    """Who owns each disk's volume in the project's ownership records of its pool."""
    out: dict[tuple[str, str], VolumeOwner] = {}
    for pool in sorted({d.pool for d in disks}):
        record = hv.read_record(pool, project)
        for name, o in (record.volumes.items() if record is not None else ()):
            out[(pool, name)] = VolumeOwner(str(o.kind), o.name, o.spec_hash, o.protect)
    return out


def _disk_file(d: backupio.DiskSource) -> str:
    return f"disk-{d.target}.{d.format}"


def _role(d: backupio.DiskSource, read: str, owners: dict[tuple[str, str], VolumeOwner],
          backing: str | None) -> DiskRole:
    return DiskRole(d.target, d.device, d.pool, d.volume, d.format, d.capacity_bytes, read,
                    d.readonly, backing, owners.get((d.pool, d.volume)))


def _direct(hv: Hypervisor, directory: str, d: backupio.DiskSource,
            owners: dict[tuple[str, str], VolumeOwner], report: ProgressFn,
            written: list[str]) -> BackupFile:
    name = _disk_file(d)
    got = _download(hv, d.pool, d.volume, directory, name, d.length_bytes, report, written)
    backing = backupio.backing_path(hv, d.pool, d.volume)
    return BackupFile(name, ROLE_DISK, got.length, got.sha256,
                      _role(d, READ_DIRECT, owners, backing))


def _download(hv: Hypervisor, pool: str, volume: str, directory: str, name: str, total: int,
              report: ProgressFn, written: list[str]) -> backupio.FileDigest:
    path = os.path.join(directory, name)
    report(ProgressEvent("download", name, 0, total))
    if os.path.lexists(path):  # another backup writes into this directory too
        raise UsageError(f"{path} appeared while the backup ran: another backup into "
                         f"{directory}? Nothing of it is removed")
    written.append(path)
    got = backupio.download_to_file(
        hv, pool, volume, path,
        lambda done: report(ProgressEvent("download", name, done, max(total, done))))
    report(ProgressEvent("download", name, got.length, got.length, finished=True))
    return got


def _through_backup_api(hv: Hypervisor, vm: str, directory: str,
                        live: Sequence[backupio.DiskSource],
                        disks: Sequence[backupio.DiskSource],
                        skipped: Sequence[backupio.SkippedDisk],
                        owners: dict[tuple[str, str], VolumeOwner], report: ProgressFn,
                        timeout: float, written: list[str]) -> list[BackupFile]:
    """One push-mode backup job of the running VM's writable disks into scratch volumes of
    their pools, each streamed into the directory, every scratch volume deleted after."""
    from ..render.definitions import render_template
    token = secrets.token_hex(4)
    scratch: list[_Scratch] = []
    for d in live:
        folder = backupio.pool_directory(hv, d.pool)
        if folder is None:
            raise PlanError(f"VM {vm!r} runs and disk {d.target} is in pool {d.pool}, which "
                            "is not a directory pool: libvirt's backup API writes its copy "
                            "into a scratch file of the pool; shut the VM down and back it "
                            "up stopped")
        name = f"{SCRATCH_PREFIX}{token}-{d.target}.{d.format}"
        scratch.append(_Scratch(d, name, f"{folder.rstrip('/')}/{name}"))
    others = [d.target for d in disks if d not in live] + [s.target for s in skipped if
                                                            s.target]
    xml = render_template("backup.xml.j2", disks=[{"target": s.disk.target, "file": s.file,
                                                   "format": s.disk.format} for s in scratch],
                          skip=others)
    item = ", ".join(d.target for d in live)
    try:
        report(ProgressEvent("job", item, 0, sum(d.capacity_bytes for d in live)))
        backupio.push_backup(hv, vm, xml, timeout,
                             lambda done, total: report(ProgressEvent("job", item, done, total)))
        report(ProgressEvent("job", item, 1, 1, finished=True))
        for pool in sorted({s.disk.pool for s in scratch}):
            backupio.refresh_pool(hv, pool)
        files = []
        for s in scratch:
            name = _disk_file(s.disk)
            total = backupio.volume_length(hv, s.disk.pool, s.name)
            got = _download(hv, s.disk.pool, s.name, directory, name, total, report, written)
            files.append(BackupFile(name, ROLE_DISK, got.length, got.sha256,
                                    _role(s.disk, READ_BACKUP_API, owners, None)))
    except BaseException:
        _remove_scratch(hv, scratch, quiet=True)  # the error that stopped it is the one told
        raise
    _remove_scratch(hv, scratch, quiet=False)
    return files


def _remove_scratch(hv: Hypervisor, scratch: Sequence[_Scratch], quiet: bool) -> None:
    """Delete the scratch volumes the job made (only those: their names hold this run's random
    token); HypervisorError naming those left, unless `quiet`."""
    problems: list[str] = []
    for pool in sorted({s.disk.pool for s in scratch}):
        with contextlib.suppress(KvmctlError):
            backupio.refresh_pool(hv, pool)
    for s in scratch:
        try:
            if hv.volume_exists(s.disk.pool, s.name):
                hv.delete_volume(s.disk.pool, s.name)
        except HypervisorError as exc:
            problems.append(str(exc))
    if problems and not quiet:
        raise HypervisorError("the backup's scratch volumes could not all be deleted "
                              "(delete them by hand): " + "; ".join(problems))


def _write(directory: str, name: str, data: bytes, written: list[str]) -> tuple[int, str]:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    written.append(path)  # only once made here: a file another writer made is not removed
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data), hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: str) -> None:
    fd: Any = None
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        os.fsync(fd)
    if fd is not None:
        os.close(fd)
