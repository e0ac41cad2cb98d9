"""What `kvmctl backup` and `kvmctl restore` ask of a host: a volume streamed into a local file
and a local file streamed into a new volume (libvirt's storage streams, so remote URIs work),
the disks a domain's definition names, and libvirt's backup API in push mode (a full backup of
a running guest's disks into scratch files of their pools, at one point in time).

Files are written sparse: a hole of a sparse stream is a seek in the file, never zeros written.
Uploads go sparse where the host accepts it: the file's holes (SEEK_HOLE) travel as lengths.
Every SHA-256 is of the logical content (a hole counts as its zeros), so it is the `sha256sum` of
the file and of the volume alike, whichever way the bytes went.

Receiving and hashing overlap: the stream is read in one thread while another hashes and
writes (libvirt's calls and hashlib both release the GIL), so a copy runs at the speed of the
slower of the two, not of their sum.

Only Hypervisor talks to libvirt (its connection, `call`); like transfer.py this module imports
no libvirt and uses libvirt's stable ABI values instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from lxml import etree

from ..errors import HypervisorError
from .connection import call, send_all
from .hypervisor import Hypervisor
from .transfer import (
    CHUNK,
    DOWNLOAD_SPARSE,
    UPLOAD_SPARSE,
    _abort,
    _active_pool,
    _Digester,
    _lookup,
    _open,
    _received,
    _send_hole,
)

Progress = Callable[[int], object]  # bytes done so far (holes included)

# libvirt's ABI values (libvirt.h), stable since the calls came (backup API: libvirt 6.0):
XML_INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE
VOL_GET_PHYSICAL = 1  # VIR_STORAGE_VOL_GET_PHYSICAL
JOB_STATS_COMPLETED = 1  # VIR_DOMAIN_JOB_STATS_COMPLETED
JOB_NONE, JOB_COMPLETED = 0, 3  # VIR_DOMAIN_JOB_NONE, VIR_DOMAIN_JOB_COMPLETED
JOB_BACKUP = 9  # VIR_DOMAIN_JOB_OPERATION_BACKUP
ERR_NO_SUPPORT, ERR_OPERATION_INVALID, ERR_OPERATION_UNSUPPORTED = 3, 55, 84
FILE_POOL_TYPES = ("dir", "fs", "netfs")  # pools whose volumes are files in one directory
_QUEUE_DEPTH = 8  # chunks in flight between the stream and the file


@dataclass(frozen=True)
class FileDigest:
    """Logical length and SHA-256 of a file's or a volume's content (holes read as zeros)."""

    length: int
    sha256: str


@dataclass(frozen=True)
class DiskSource:
    """One `<disk>` of a definition whose source is a volume of a pool on the host."""

    target: str  # target dev: vda, sdb ...
    device: str  # disk, cdrom, ...
    pool: str
    volume: str
    path: str
    format: str  # the driver type (raw, qcow2), else the volume's own
    capacity_bytes: int
    length_bytes: int  # what a download of it streams: the file's length
    readonly: bool
    source_type: str  # the <disk type>: volume or file


@dataclass(frozen=True)
class SkippedDisk:
    target: str
    why: str


# ---- the disks of a definition ---------------------------------------------------------------

def domain_xml(hv: Hypervisor, name: str) -> str:
    """The domain's persistent definition (VIR_DOMAIN_XML_INACTIVE), metadata included."""
    dom = hv._dom(name)
    return str(call(f"read domain {name}", dom.XMLDesc, XML_INACTIVE))


def domain_disks(hv: Hypervisor, xml: str) -> tuple[list[DiskSource], list[SkippedDisk]]:
    """The disks of definition `xml` whose source is a volume of a pool on this host (a volume
    disk names its pool and volume; a file disk is looked up by its path), and the others."""
    root = etree.fromstring(xml.encode())
    found: list[DiskSource] = []
    skipped: list[SkippedDisk] = []
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        kind = disk.get("type", "file")
        source = disk.find("source")
        if source is None:
            skipped.append(SkippedDisk(dev, "no source (an empty drive)"))
            continue
        vol: Any = None
        if kind == "volume":
            pool_name, vol_name = source.get("pool", ""), source.get("volume", "")
            try:
                vol = _active_pool(hv, pool_name).storageVolLookupByName(vol_name)
            except Exception as exc:  # noqa: BLE001 - libvirtError, without importing it
                raise HypervisorError(f"disk {dev}: volume {vol_name} of pool {pool_name} on "
                                      f"{hv.uri}: {_message(exc)}") from None
        elif kind == "file" and source.get("file"):
            path = source.get("file", "")
            try:
                vol = hv.conn.storageVolLookupByPath(path)
            except Exception:  # noqa: BLE001
                skipped.append(SkippedDisk(dev, f"{path} is not a volume of any pool on "
                                                f"{hv.uri}"))
                continue
        else:
            skipped.append(SkippedDisk(dev, f"a {kind} disk, not a volume of a pool"))
            continue
        driver = disk.find("driver")
        found.append(_disk_source(hv, vol, dev, disk.get("device", "disk"),
                                  driver.get("type", "") if driver is not None else "",
                                  disk.find("readonly") is not None, kind))
    return found, skipped


def _disk_source(hv: Hypervisor, vol: Any, dev: str, device: str, driver_type: str,
                 readonly: bool, kind: str) -> DiskSource:
    what = f"read volume {vol.name()} on {hv.uri}"
    pool = call(what, vol.storagePoolLookupByVolume)
    xml = etree.fromstring(call(what, vol.XMLDesc, 0).encode())
    fmt = xml.find("target/format")
    info = call(what, vol.infoFlags, VOL_GET_PHYSICAL)  # (type, capacity, physical)
    return DiskSource(dev, device, str(pool.name()), str(vol.name()), str(call(what, vol.path)),
                      driver_type or (fmt.get("type", "raw") if fmt is not None else "raw"),
                      int(info[1]), int(info[2]), readonly, kind)


def _message(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    return str(get() if callable(get) and get() else exc)


def _code(exc: Exception) -> int:
    get = getattr(exc, "get_error_code", None)
    return int(get()) if callable(get) else -1


def pool_directory(hv: Hypervisor, pool: str) -> str | None:
    """The directory of a pool whose volumes are files in it (dir, fs, netfs), else None."""
    pool_obj = _active_pool(hv, pool)
    root = etree.fromstring(call(f"read pool {pool} on {hv.uri}", pool_obj.XMLDesc, 0).encode())
    if root.get("type") not in FILE_POOL_TYPES:
        return None
    return root.findtext("target/path") or None


def refresh_pool(hv: Hypervisor, pool: str) -> None:
    call(f"refresh pool {pool} on {hv.uri}", _active_pool(hv, pool).refresh, 0)


def volume_at(hv: Hypervisor, path: str) -> bool:
    """Whether a volume of some pool of the host is at `path`."""
    try:
        hv.conn.storageVolLookupByPath(path)
    except Exception:  # noqa: BLE001 - libvirt's error: no volume there
        return False
    return True


def volume_length(hv: Hypervisor, pool: str, name: str) -> int:
    """What a download of the volume streams: its file's length (physical)."""
    vol = hv._vol(pool, name)
    return int(call(f"read volume {name} in pool {pool} on {hv.uri}", vol.infoFlags,
                    VOL_GET_PHYSICAL)[2])


def backing_path(hv: Hypervisor, pool: str, name: str) -> str | None:
    """The base a qcow2 overlay names in its header (its volume's backingStore), if any."""
    vol = hv._vol(pool, name)
    xml = call(f"read volume {name} in pool {pool} on {hv.uri}", vol.XMLDesc, 0)
    return etree.fromstring(xml.encode()).findtext("backingStore/path") or None


def volume_path(hv: Hypervisor, pool: str, name: str) -> str:
    vol = hv._vol(pool, name)
    return str(call(f"read volume {name} in pool {pool} on {hv.uri}", vol.path))


# ---- the backup API (push mode) --------------------------------------------------------------

def push_backup(hv: Hypervisor, domain: str, xml: str, timeout: float,
                progress: Callable[[int, int], object] | None = None,
                interval: float = 0.2) -> None:
    """Run a push-mode backup job of a running domain (virDomainBackupBegin with `xml`, a
    <domainbackup>) and wait for it: libvirt writes each listed disk's content, as it was when
    the job began, into the target files. Polls the job (`progress(done, total)` in bytes of
    the disks); aborts it after `timeout` seconds. HypervisorError when libvirt refuses the
    job (its reason, and what would work), the job fails, or the time runs out."""
    dom = hv._dom(domain)
    try:
        dom.backupBegin(xml, None, 0)
    except Exception as exc:  # noqa: BLE001
        why = _message(exc)
        hint = ("this libvirt or QEMU does not offer the backup API for it"
                if _code(exc) in (ERR_NO_SUPPORT, ERR_OPERATION_UNSUPPORTED) else
                "another job of the domain may be running (a backup, a migration, a "
                "block job)" if _code(exc) == ERR_OPERATION_INVALID else "")
        raise HypervisorError(
            f"libvirt refused a backup of running domain {domain} on {hv.uri}: {why}"
            + (f" ({hint})" if hint else "")
            + "; shut it down and back it up stopped (its disks are then read directly)"
        ) from None
    deadline = time.monotonic() + timeout
    try:
        while True:
            stats = call(f"read the backup job of {domain}", dom.jobStats, 0)
            kind = int(stats.get("type", JOB_NONE))
            if kind == JOB_NONE:
                break
            if progress is not None and stats.get("disk_total"):
                progress(int(stats.get("disk_processed", 0)), int(stats["disk_total"]))
            if time.monotonic() > deadline:
                raise HypervisorError(f"the backup job of {domain} on {hv.uri} did not finish "
                                      f"within {timeout:g} s: aborted")
            time.sleep(interval)
    except BaseException:
        with contextlib.suppress(Exception):
            dom.abortJob()
        _wait_gone(dom)
        raise
    done = {}
    with contextlib.suppress(Exception):
        done = dom.jobStats(JOB_STATS_COMPLETED)
    kind = int(done.get("type", JOB_COMPLETED)) if done else JOB_COMPLETED
    if done.get("operation", JOB_BACKUP) != JOB_BACKUP:
        return  # another job's record (nothing of ours to judge): the files are checked later
    if kind != JOB_COMPLETED or done.get("success") is False:
        why = done.get("errmsg") or "libvirt reports it did not complete"
        raise HypervisorError(f"the backup job of {domain} on {hv.uri} failed: {why}")
    if progress is not None and done.get("disk_total"):
        progress(int(done.get("disk_total", 0)), int(done["disk_total"]))


def _wait_gone(dom: Any, timeout: float = 30) -> None:
    """Until an aborted job is gone (its scratch files can then be deleted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if int(dom.jobStats(0).get("type", JOB_NONE)) == JOB_NONE:
                return
        except Exception:  # noqa: BLE001 - the domain went away: no job left either
            return
        time.sleep(0.2)


# ---- volume -> file --------------------------------------------------------------------------

def _pump(source: Iterator[bytes | int], what: str) -> Generator[bytes | int, None, None]:
    """`source` read in a thread of its own, a few pieces ahead of the consumer. Closing the
    iterator early stops the thread once its current read returns (abort the stream first)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(_QUEUE_DEPTH)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for piece in source:
                if not put(("piece", piece)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", exc))

    worker = threading.Thread(target=run, name=f"kvmctl-stream {what}"[:60], daemon=True)
    worker.start()
    try:
        while True:
            tag, value = q.get()
            if tag == "end":
                return
            if tag == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=60)


def download_to_file(hv: Hypervisor, pool: str, name: str, path: str,
                     progress: Progress | None = None) -> FileDigest:
    """Stream volume `name` of `pool` into a new file `path` (refused if it exists), sparse:
    holes are seeks. Returns the length and SHA-256 of what arrived. On failure the file is
    removed."""
    vol = _lookup(hv, pool, name)
    what = f"download volume {name} of pool {pool} from {hv.uri}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
    except OSError as exc:
        raise HypervisorError(f"{what}: cannot create {path}: {exc.strerror}") from None
    digest = _Digester()
    ok = False
    try:
        stream, sparse = _open(hv, what, vol.download, DOWNLOAD_SPARSE)
        with _streaming(stream, _received(stream, sparse, what), what) as pieces:
            for piece in pieces:
                if isinstance(piece, int):
                    os.lseek(fd, piece, os.SEEK_CUR)
                    digest.hole(piece)
                else:
                    digest.data(piece)
                    _write_all(fd, piece, path)
                if progress is not None:
                    progress(digest.length)
        os.ftruncate(fd, digest.length)  # a hole at the end has no byte written after it
        os.fsync(fd)
        ok = True
    except OSError as exc:
        raise HypervisorError(f"{what}: writing {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return FileDigest(digest.length, digest.hexdigest())


@contextlib.contextmanager
def _streaming(stream: Any, source: Iterator[bytes | int], what: str
               ) -> Iterator[Iterator[bytes | int]]:
    """`source` (pieces of `stream`) through `_pump`; the stream finished when all went well,
    else aborted first and the pump stopped after."""
    pieces = _pump(source, what)
    try:
        yield pieces
        call(what, stream.finish)
    except BaseException:
        _abort(stream)
        pieces.close()
        raise
    pieces.close()


def _write_all(fd: int, data: bytes, path: str) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, f"short write to {path}")
        view = view[written:]


# ---- file -> volume --------------------------------------------------------------------------

def file_regions(fd: int, length: int, start: int = 0) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is data) of a file from `start` up to `length`, from SEEK_DATA and
    SEEK_HOLE; one data region when the file system cannot tell."""
    offset = start
    while offset < length:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end
                yield offset, length - offset, False
                return
            yield offset, length - offset, True  # no SEEK_DATA here: all of it is data
            return
        if data > offset:
            yield offset, min(data, length) - offset, False
        if data >= length:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), length)
        yield data, hole - data, True
        offset = hole


def read_pieces(fd: int, length: int, path: str, start: int = 0) -> Iterator[bytes | int]:
    """A file's content from `start` up to `length` as data chunks and hole lengths, at most
    CHUNK bytes a chunk."""
    for offset, size, is_data in file_regions(fd, length, start):
        if not is_data:
            yield size
            continue
        os.lseek(fd, offset, os.SEEK_SET)
        left = size
        while left > 0:
            chunk = os.read(fd, min(CHUNK, left))
            if not chunk:
                raise HypervisorError(f"{path} ended at byte {offset + size - left} of "
                                      f"{length}: it is shorter than it was")
            left -= len(chunk)
            yield chunk


def upload_from_file(hv: Hypervisor, pool: str, name: str, volume_xml: str, path: str,
                     progress: Progress | None = None) -> FileDigest:
    """Create volume `name` in `pool` from `volume_xml` (refused if it exists) and write the
    file `path` into it through a stream (sparse where the host accepts it). Returns the
    length and SHA-256 of what was sent. On failure the volume is deleted. The caller verifies
    what arrived (`volume_file_digest`)."""
    pool_obj = _active_pool(hv, pool)
    up = f"upload {path} into volume {name} of pool {pool} on {hv.uri}"
    if hv.volume_exists(pool, name):
        raise HypervisorError(f"{up}: the volume exists already; not overwritten")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise HypervisorError(f"{up}: cannot open {path}: {exc.strerror}") from None
    created = False
    digest = _Digester()
    try:
        length = os.fstat(fd).st_size
        call(f"create volume {name} in pool {pool} on {hv.uri}", pool_obj.createXML,
             volume_xml, 0)
        created = True
        vol = hv._vol(pool, name)
        stream, sparse = _open(hv, up, vol.upload, UPLOAD_SPARSE)
        with _streaming(stream, _hashed(read_pieces(fd, length, path), digest), up) as pieces:
            for piece in pieces:
                if isinstance(piece, int):
                    _send_hole(stream, sparse, piece, up)
                else:
                    send_all(stream, piece, up)
                if progress is not None:
                    progress(digest.length)
        return FileDigest(digest.length, digest.hexdigest())
    except BaseException as exc:
        if created:
            with contextlib.suppress(HypervisorError):
                hv.delete_volume(pool, name)
        if isinstance(exc, OSError):
            raise HypervisorError(f"{up}: reading {path}: {exc.strerror}") from None
        raise
    finally:
        os.close(fd)


def _hashed(pieces: Iterator[bytes | int], digest: _Digester) -> Iterator[bytes | int]:
    """`pieces` as they are, hashed on the way (in the reading thread)."""
    for piece in pieces:
        if isinstance(piece, int):
            digest.hole(piece)
        else:
            digest.data(piece)
        yield piece
