"""`kvmctl backup` and `kvmctl restore`: one VM into a self-contained directory and back, on
the same host or another (write.py, restore.py).

A backup directory holds:

- `backup.json`: what the backup is (`BackupManifest`): format version, kvmctl version, the
  VM, its project, the host it came from, when, the VM's state then, how its disks were read
  consistently, and every other file with its role, length and SHA-256;
- `domain.xml`: the VM's persistent libvirt definition, kvmctl's ownership metadata included;
- `manifests.yaml`: the project's documents that declare the VM (its VirtualMachine and the
  Disks it uses), when the loaded manifests have it;
- one file per disk volume (`disk-<target>.<format>`), sparse where the volume was;
- `SHA256SUMS`, for `sha256sum -c`.

This module holds the manifest's types and the checks of a backup read back: backup.json is
input like any other, so every field is checked (types, ranges, names that could leave the
directory) before anything is opened, and every error names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..xmltext import first_non_xml_char

FORMAT = "kvmctl-backup"
FORMAT_VERSION = 1
MANIFEST_FILE = "backup.json"
DOMAIN_FILE = "domain.xml"
MANIFESTS_FILE = "manifests.yaml"
SUMS_FILE = "SHA256SUMS"
SCRATCH_PREFIX = "kvmctl-backup-"  # scratch volumes of the backup API in the disks' pools

# How the disks were read so that they are one moment's content.
CONSISTENCY_BACKUP_API = "libvirt-backup-api"  # running: virDomainBackupBegin, push mode
CONSISTENCY_STOPPED = "stopped"  # shut off: its volumes read directly
CONSISTENCIES = (CONSISTENCY_BACKUP_API, CONSISTENCY_STOPPED)
READ_BACKUP_API, READ_DIRECT = "backup-api", "direct"
ROLE_DISK, ROLE_DOMAIN, ROLE_MANIFESTS = "disk", "domain", "manifests"
STATES = ("running", "shutoff", "paused", "shutting-down", "crashed", "suspended", "other")

# A file of the backup: a plain name in the directory, never a path (no "/", not "." or "..").
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
TARGET = re.compile(r"^[a-z]{1,4}[a-z0-9]{0,8}$")
FORMAT_NAME = re.compile(r"^[a-z0-9]{1,16}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A name kvmctl gives (a manifest's metadata.name): what --name accepts.
KVMCTL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILES = 256
_HASH_CHUNK = 1 << 20

ProgressFn = Callable[["ProgressEvent"], None]


@dataclass(frozen=True)
class ProgressEvent:
    """What a backup or a restore is doing: `phase` of `item`, `done` of `total` bytes.

    phases: "job" (the backup API writing the scratch files; item: the disk targets),
    "download", "verify" (a backup file hashed before a restore), "upload". `finished` on the
    last event of an item."""

    phase: str
    item: str
    done: int
    total: int
    finished: bool = False


@dataclass(frozen=True)
class VolumeOwner:
    """Who owned a disk's volume on the source host (its project's ownership record)."""

    kind: str
    name: str
    spec_hash: str = ""
    protect: bool = False


@dataclass(frozen=True)
class DiskRole:
    """The disk a file holds: where it was, what it is, how it was read."""

    target: str
    device: str
    pool: str
    volume: str
    format: str
    capacity_bytes: int
    read: str  # READ_BACKUP_API or READ_DIRECT
    readonly: bool = False
    backing_path: str | None = None  # a qcow2 overlay read directly keeps naming its base
    owner: VolumeOwner | None = None


@dataclass(frozen=True)
class BackupFile:
    name: str
    role: str  # ROLE_DISK, ROLE_DOMAIN, ROLE_MANIFESTS
    length: int
    sha256: str
    disk: DiskRole | None = None


@dataclass(frozen=True)
class BackupManifest:
    """backup.json."""

    version: int
    kvmctl_version: str
    vm: str
    project: str
    source_host: str
    source_uri: str
    created: str  # ISO 8601, UTC
    state: str  # the VM's state when it was backed up
    consistency: str
    in_manifests: bool
    files: tuple[BackupFile, ...]
    notes: tuple[str, ...] = ()

    @property
    def disks(self) -> tuple[BackupFile, ...]:
        return tuple(f for f in self.files if f.role == ROLE_DISK)

    def file(self, role: str) -> BackupFile | None:
        return next((f for f in self.files if f.role == role), None)

    def to_json(self) -> str:
        def disk(d: DiskRole) -> dict[str, Any]:
            return {"target": d.target, "device": d.device, "pool": d.pool,
                    "volume": d.volume, "format": d.format,
                    "capacity_bytes": d.capacity_bytes, "read": d.read,
                    "readonly": d.readonly, "backing_path": d.backing_path,
                    "owner": None if d.owner is None else {
                        "kind": d.owner.kind, "name": d.owner.name,
                        "spec_hash": d.owner.spec_hash, "protect": d.owner.protect}}

        body = {"format": FORMAT, "version": self.version,
                "kvmctl_version": self.kvmctl_version, "vm": self.vm, "project": self.project,
                "source": {"host": self.source_host, "uri": self.source_uri},
                "created": self.created, "state": self.state,
                "consistency": self.consistency, "in_manifests": self.in_manifests,
                "notes": list(self.notes),
                "files": [{"name": f.name, "role": f.role, "length": f.length,
                           "sha256": f.sha256,
                           **({"disk": disk(f.disk)} if f.disk is not None else {})}
                          for f in self.files]}
        return json.dumps(body, indent=2) + "\n"


# ---- reading backup.json ------------------------------------------------------------------------

class _Reader:
    """Typed access to parsed JSON, each refusal naming the file and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, why: str) -> UsageError:
        return UsageError(f"{self.where}: {field}: {why}; this is not a backup kvmctl can "
                          "restore (damaged or edited)")

    def obj(self, value: Any, field: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, f"expected an object, found {_type(value)}")
        return value

    def text(self, raw: Mapping[str, Any], key: str, field: str, *, empty: bool = False,
             limit: int = 4096) -> str:
        value = raw.get(key)
        name = f"{field}.{key}" if field else key
        if not isinstance(value, str):
            raise self.fail(name, f"expected a string, found {_type(value)}")
        if not value and not empty:
            raise self.fail(name, "is empty")
        if len(value) > limit:
            raise self.fail(name, f"longer than {limit} characters")
        at = first_non_xml_char(value)
        if at >= 0 or any(c in value for c in "\n\r\t"):
            raise self.fail(name, "holds a control character")
        return value

    def name(self, raw: Mapping[str, Any], key: str, field: str) -> str:
        """A libvirt object's name (VM, pool, volume): one line, no "/", not "." or ".."."""
        value = self.text(raw, key, field, limit=255)
        if "/" in value or value in (".", "..") or value != value.strip():
            raise self.fail(f"{field}.{key}" if field else key,
                            f"{value!r} is not a plain name")
        return value

    def match(self, raw: Mapping[str, Any], key: str, field: str, pattern: re.Pattern[str],
              what: str) -> str:
        value = self.text(raw, key, field, limit=300)
        if not pattern.match(value):
            raise self.fail(f"{field}.{key}", f"{value!r} is not {what}")
        return value

    def integer(self, raw: Mapping[str, Any], key: str, field: str, low: int = 0) -> int:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{field}.{key}", f"expected a whole number, found {_type(value)}")
        if not low <= value < 1 << 62:
            raise self.fail(f"{field}.{key}", f"{value} is out of range")
        return value

    def flag(self, raw: Mapping[str, Any], key: str, field: str) -> bool:
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(f"{field}.{key}", f"expected true or false, found {_type(value)}")
        return value

    def choice(self, raw: Mapping[str, Any], key: str, field: str,
               choices: tuple[str, ...]) -> str:
        value = self.text(raw, key, field, limit=100)
        if value not in choices:
            raise self.fail(f"{field}.{key}" if field else key,
                            f"{value!r} is not one of {', '.join(choices)}")
        return value


def _type(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
            str: "a string", list: "a list", dict: "an object"}.get(type(value), "a value")


def parse_manifest(data: bytes, where: str) -> BackupManifest:
    """backup.json's bytes as a BackupManifest; UsageError naming `where` and the field."""
    r = _Reader(where)
    if len(data) > MAX_MANIFEST_BYTES:
        raise r.fail("the file", f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{where}: not valid JSON ({exc}); this is not a backup kvmctl can "
                         "restore (damaged or cut short)") from None
    top = r.obj(raw, "the document")
    if top.get("format") != FORMAT:
        raise r.fail("format", f"expected {FORMAT!r}: not a kvmctl backup")
    version = r.integer(top, "version", "", 1)
    if version > FORMAT_VERSION:
        raise UsageError(f"{where}: backup format {version} is newer than this kvmctl reads "
                         f"({FORMAT_VERSION}); restore it with a newer kvmctl")
    source = r.obj(top.get("source"), "source")
    notes = top.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise r.fail("notes", "expected a list of strings")
    listed = top.get("files")
    if not isinstance(listed, list) or not listed:
        raise r.fail("files", "expected a non-empty list")
    if len(listed) > MAX_FILES:
        raise r.fail("files", f"more than {MAX_FILES}")
    files = tuple(_file(r, entry, i) for i, entry in enumerate(listed))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise r.fail("files", "a file is listed twice")
    reserved = {MANIFEST_FILE, SUMS_FILE} & set(names)
    if reserved:
        raise r.fail("files", f"lists {', '.join(sorted(reserved))}, which holds no data")
    roles = [f.role for f in files]
    if roles.count(ROLE_DOMAIN) != 1 or roles.count(ROLE_MANIFESTS) > 1:
        raise r.fail("files", "expected exactly one domain file and at most one manifests file")
    targets = [f.disk.target for f in files if f.disk is not None]
    if len(set(targets)) != len(targets):
        raise r.fail("files", "two files hold the same disk target")
    in_manifests = r.flag(top, "in_manifests", "")
    if in_manifests and ROLE_MANIFESTS not in roles:
        raise r.fail("in_manifests", "is true, but no manifests file is listed")
    return BackupManifest(
        version, r.text(top, "kvmctl_version", "", limit=100), r.name(top, "vm", ""),
        r.text(top, "project", "", empty=True, limit=255),
        r.text(source, "host", "source", empty=True, limit=255),
        r.text(source, "uri", "source", empty=True), r.text(top, "created", "", limit=100),
        r.choice(top, "state", "", STATES), r.choice(top, "consistency", "", CONSISTENCIES),
        in_manifests, files, tuple(notes))


def _file(r: _Reader, entry: Any, i: int) -> BackupFile:
    field = f"files[{i}]"
    raw = r.obj(entry, field)
    name = r.text(raw, "name", field, limit=300)
    if not FILE_NAME.match(name):
        raise r.fail(f"{field}.name", f"{name!r} is not a plain file name of the backup "
                                      "directory (a path, or characters it may not hold)")
    role = r.choice(raw, "role", field, (ROLE_DISK, ROLE_DOMAIN, ROLE_MANIFESTS))
    length = r.integer(raw, "length", field)
    digest = r.match(raw, "sha256", field, SHA256, "a SHA-256 in lower-case hex")
    disk = None
    if role == ROLE_DISK:
        d = r.obj(raw.get("disk"), f"{field}.disk")
        where = f"{field}.disk"
        owner = None
        if d.get("owner") is not None:
            o = r.obj(d.get("owner"), f"{where}.owner")
            owner = VolumeOwner(r.text(o, "kind", f"{where}.owner", limit=100),
                                r.name(o, "name", f"{where}.owner"),
                                r.text(o, "spec_hash", f"{where}.owner", empty=True, limit=200),
                                r.flag(o, "protect", f"{where}.owner"))
        backing = d.get("backing_path")
        if backing is not None:
            backing = r.text(d, "backing_path", where)
            if not backing.startswith("/"):
                raise r.fail(f"{where}.backing_path", "is not an absolute path")
        disk = DiskRole(r.match(d, "target", where, TARGET, "a disk target such as vda"),
                        r.text(d, "device", where, limit=20), r.name(d, "pool", where),
                        r.name(d, "volume", where),
                        r.match(d, "format", where, FORMAT_NAME, "a volume format"),
                        r.integer(d, "capacity_bytes", where, 1),
                        r.choice(d, "read", where, (READ_BACKUP_API, READ_DIRECT)),
                        r.flag(d, "readonly", where), backing, owner)
    elif raw.get("disk") is not None:
        raise r.fail(f"{field}.disk", f"a {role} file has no disk")
    return BackupFile(name, role, length, digest, disk)


# ---- the files ----------------------------------------------------------------------------------

def open_member(directory: str, name: str) -> int:
    """A file of the backup directory opened for reading: a plain name (FILE_NAME), no
    symbolic link, a regular file. UsageError naming it otherwise."""
    path = os.path.join(directory, name)
    if not FILE_NAME.match(name):
        raise UsageError(f"{path}: not a file name of a backup")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise UsageError(f"{path}: cannot open it: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path}: not a regular file")
    return fd


def file_digest(fd: int, progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """(length, SHA-256) of an open file's content, read from its start; holes (SEEK_HOLE)
    are hashed as their zeros without being read."""
    from ..host.backupio import read_pieces
    length = os.fstat(fd).st_size
    sha = hashlib.sha256()
    done = 0
    zeros = memoryview(bytes(_HASH_CHUNK))
    for piece in read_pieces(fd, length, f"file descriptor {fd}"):
        if isinstance(piece, int):
            left = piece
            while left > 0:
                n = min(left, len(zeros))
                sha.update(zeros[:n])
                left -= n
            done += piece
        else:
            sha.update(piece)
            done += len(piece)
        if progress is not None:
            progress(done)
    return done, sha.hexdigest()


def verify_member(directory: str, f: BackupFile,
                  progress: Callable[[int], None] | None = None) -> None:
    """The file holds exactly what backup.json says (length, then SHA-256); UsageError naming
    it and what differs otherwise."""
    path = os.path.join(directory, f.name)
    fd = open_member(directory, f.name)
    try:
        size = os.fstat(fd).st_size
        if size != f.length:
            raise UsageError(f"{path}: {size} bytes, but backup.json says {f.length}: the file "
                             f"is {'cut short' if size < f.length else 'longer'}; nothing was "
                             "restored")
        try:
            length, digest = file_digest(fd, progress)
        except OSError as exc:
            raise UsageError(f"{path}: cannot read it: {exc.strerror}") from None
    finally:
        os.close(fd)
    if (length, digest) != (f.length, f.sha256):
        raise UsageError(f"{path}: its SHA-256 is {digest}, but backup.json says {f.sha256}: "
                         "the file changed since the backup; nothing was restored")


def read_member(directory: str, f: BackupFile, limit: int = 16 << 20) -> bytes:
    """A small file of the backup (domain.xml, manifests.yaml), verified."""
    path = os.path.join(directory, f.name)
    if f.length > limit:
        raise UsageError(f"{path}: backup.json says {f.length} bytes, more than such a file "
                         "holds")
    fd = open_member(directory, f.name)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            if sum(map(len, chunks)) > limit:
                raise UsageError(f"{path}: larger than backup.json says")
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != f.length or hashlib.sha256(data).hexdigest() != f.sha256:
        raise UsageError(f"{path}: its length or SHA-256 differs from backup.json's: the file "
                         "changed since the backup; nothing was restored")
    return data


def sums_text(files: tuple[BackupFile, ...], manifest_sha256: str) -> str:
    """SHA256SUMS: every file's checksum, backup.json's too, for `sha256sum -c`."""
    lines = [f"{f.sha256}  {f.name}" for f in files]
    lines.append(f"{manifest_sha256}  {MANIFEST_FILE}")
    return "\n".join(lines) + "\n"
