"""Copying a storage volume from one libvirt host to another, through libvirt's storage streams
only: a download stream on the source, an upload stream on the destination, no shared file
system, so remote URIs (qemu+ssh://...) work. The basis of moving a stopped VM between hosts.

Both ends are hashed: the copy is only returned once the destination, downloaded again, has the
source's SHA-256 and length.

Sparse streams (libvirt >= 3.4; VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM and ..._UPLOAD_SPARSE_STREAM)
are used where the hosts accept them: a hole of the source travels as its length, not as zeros,
so a 1 GiB raw disk holding 1 MiB sends about 1 MiB. Where a host refuses them (an older libvirt,
a pool type whose backend does not stream sparsely), that end falls back to a dense stream: holes
are then sent, or read, as the zeros they are. The SHA-256 is always of the logical content
(holes count as zeros): it is the `sha256sum` of the volume's file, the same whether the copy went
sparse or dense. Zeros are still hashed, at the speed of SHA-256 (roughly 1-2 GB/s), but not sent.

Only Hypervisor talks to libvirt (its connection, `call`); this module imports no libvirt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import HypervisorError
from .connection import call, send_all
from .hypervisor import Hypervisor

CHUNK = 1 << 20  # asked of a stream per call; libvirt's RPC messages carry up to 256 KiB each
_ZEROS = memoryview(bytes(CHUNK))

# libvirt's ABI values (libvirt.h, stable since 3.4), so that this module needs no libvirt import:
DOWNLOAD_SPARSE = 1  # VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM
UPLOAD_SPARSE = 1  # VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM
RECV_STOP_AT_HOLE = 1  # VIR_STREAM_RECV_STOP_AT_HOLE
_HOLE = -3  # what virStreamRecvFlags returns at a hole when asked to stop there
_WOULD_BLOCK = -2


@dataclass(frozen=True)
class VolumeDigest:
    """A volume's content: its capacity (libvirt's), the bytes a download streams (its file's
    length for raw and qcow2 volumes in dir pools) and their SHA-256 (holes read as zeros)."""

    capacity_bytes: int
    length_bytes: int
    sha256: str


class _Digester:
    """SHA-256 and length of a stream's logical content: a hole counts as its zeros."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.length = 0

    def data(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self.length += len(chunk)

    def hole(self, length: int) -> None:
        self.length += length
        while length > 0:
            n = min(length, len(_ZEROS))
            self._sha.update(_ZEROS[:n])
            length -= n

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


# ---- the ends of a copy -----------------------------------------------------------------------


def _active_pool(hv: Hypervisor, pool: str) -> Any:
    pool_obj = hv._pool_obj(pool)
    if not call(f"read pool {pool} on {hv.uri}", pool_obj.isActive):
        raise HypervisorError(f"pool {pool} on {hv.uri} is not active: start it first")
    return pool_obj


def _lookup(hv: Hypervisor, pool: str, name: str) -> Any:
    pool_obj = _active_pool(hv, pool)
    return call(f"look up volume {name} in pool {pool} on {hv.uri}",
                pool_obj.storageVolLookupByName, name)


def _abort(stream: Any) -> None:
    try:
        call("abort a stream", stream.abort)
    except HypervisorError:
        pass


def _open(hv: Hypervisor, what: str, method: Any, sparse_flag: int) -> tuple[Any, bool]:
    """A stream opened by `method(stream, 0, 0, flags)` (a volume's download or upload): sparse
    if the host accepts it, else dense. Returns (stream, sparse)."""
    for flags in (sparse_flag, 0):
        stream = call(f"open a stream to {hv.uri}", hv.conn.newStream, 0)
        try:
            call(what, method, stream, 0, 0, flags)
        except HypervisorError:
            _abort(stream)
            if flags:
                # A host or pool backend without sparse streams refuses the flag when the stream
                # is opened (libvirt < 3.4: unsupported flags): dense it is then.
                continue
            raise
        return stream, bool(flags)
    raise AssertionError("unreachable")


def _received(stream: Any, sparse: bool, what: str) -> Iterator[bytes | int]:
    """What a download stream brings: data (bytes) and, on a sparse stream, holes (lengths)."""
    while True:
        if sparse:
            got = call(what, stream.recvFlags, CHUNK, RECV_STOP_AT_HOLE)
            if got == _HOLE:
                length = int(call(what, stream.recvHole, 0))
                if length > 0:
                    yield length
                continue
        else:
            got = call(what, stream.recv, CHUNK)
        if isinstance(got, int):
            raise HypervisorError(f"{what}: the stream answered {got}"
                                  + (" (would block)" if got == _WOULD_BLOCK else ""))
        if not got:
            return
        yield got


def _send_hole(stream: Any, sparse: bool, length: int, what: str) -> None:
    if sparse:
        call(what, stream.sendHole, length, 0)
        return
    while length > 0:  # a dense destination gets the zeros the hole stands for
        n = min(length, len(_ZEROS))
        send_all(stream, _ZEROS[:n], what)
        length -= n


# ---- digest -----------------------------------------------------------------------------------


def volume_digest(hv: Hypervisor, pool: str, name: str) -> VolumeDigest:
    """Download a whole volume through a stream (offset 0, length 0: all of it), hashing as it
    comes, chunk by chunk (constant memory). Sparse where the host allows it: holes are not sent
    but hashed as zeros, so the digest is that of the file's bytes either way. Read only."""
    vol = _lookup(hv, pool, name)
    capacity = int(call(f"read volume {name} in pool {pool} on {hv.uri}", vol.info)[1])
    what = f"download volume {name} of pool {pool} from {hv.uri}"
    stream, sparse = _open(hv, what, vol.download, DOWNLOAD_SPARSE)
    digest = _Digester()
    try:
        for piece in _received(stream, sparse, what):
            if isinstance(piece, int):
                digest.hole(piece)
            else:
                digest.data(piece)
        call(what, stream.finish)
    except BaseException:
        _abort(stream)
        raise
    return VolumeDigest(capacity, digest.length, digest.hexdigest())


# ---- copy -------------------------------------------------------------------------------------


def copy_volume(src: Hypervisor, src_pool: str, name: str, dst: Hypervisor, dst_pool: str,
                volume_xml: str, progress: Callable[[int], object] | None = None
                ) -> VolumeDigest:
    """Copy volume `name` of `src_pool` on `src` into `dst_pool` on `dst`, verified.

    The destination volume is created from `volume_xml` (the caller renders it: name, capacity,
    format); its file is then overwritten whole by the source file's bytes (for a qcow2 the
    source's qcow2 bytes, header included). A volume of that name already on `dst` is replaced
    (the caller decided it may be): it is deleted and created again from `volume_xml`, because
    an upload writes over a file in place -- it neither shortens a longer file nor clears what
    lies under a hole of a sparse stream, so stale bytes would survive.

    Streams src -> dst chunk by chunk (constant memory; sparse where both hosts allow it),
    hashing on the way; then downloads the destination again (`volume_digest`) and compares
    SHA-256 and length with the source's. On a mismatch raises HypervisorError("copy of ... did
    not verify: ..."); on any failure the destination volume is deleted if it did not exist
    before this call (a volume it replaced is left, holding what arrived). Returns the
    destination's verified digest. `progress(n)` is called with the bytes of the source done so
    far (holes included). The source is only read.

    A qcow2 overlay keeps the absolute path of its backing file in its header, and the copy
    keeps that header: the destination host must have the backing image at the same path (the
    caller checks that). Allocation is not copied: holes of the source are holes on the
    destination, and a sparse copy leaves no more allocated than the data needs.
    """
    where = f"{name} from {src.uri} to {dst.uri}"
    if src_pool == dst_pool and (src is dst or src.uri == dst.uri):
        raise HypervisorError(f"copy of {where}: source and destination are the same volume")
    src_vol = _lookup(src, src_pool, name)
    dst_pool_obj = _active_pool(dst, dst_pool)
    existed = dst.volume_exists(dst_pool, name)

    down = f"download volume {name} of pool {src_pool} from {src.uri}"
    up = f"upload volume {name} into pool {dst_pool} on {dst.uri}"
    src_stream, src_sparse = _open(src, down, src_vol.download, DOWNLOAD_SPARSE)
    dst_stream: Any = None
    created = False
    digest = _Digester()
    try:
        if existed:
            dst.delete_volume(dst_pool, name)
        call(f"create volume {name} in pool {dst_pool} on {dst.uri}", dst_pool_obj.createXML,
             volume_xml, 0)
        created = not existed
        dst_vol = dst._vol(dst_pool, name)
        dst_stream, dst_sparse = _open(dst, up, dst_vol.upload, UPLOAD_SPARSE)
        for piece in _received(src_stream, src_sparse, down):
            if isinstance(piece, int):
                _send_hole(dst_stream, dst_sparse, piece, up)
                digest.hole(piece)
            else:
                send_all(dst_stream, piece, up)
                digest.data(piece)
            if progress is not None:
                progress(digest.length)
        call(down, src_stream.finish)
        src_stream = None
        call(up, dst_stream.finish)
        dst_stream = None
        copied = volume_digest(dst, dst_pool, name)
        problems: list[str] = []
        if copied.length_bytes != digest.length:
            problems.append(f"{copied.length_bytes} bytes arrived of {digest.length}")
        if copied.sha256 != digest.hexdigest():
            problems.append(f"sha256 {copied.sha256} is not the source's {digest.hexdigest()}")
        if problems:
            left = "deleted" if created else "left in place"
            raise HypervisorError(f"copy of {where} did not verify: {'; '.join(problems)} "
                                  f"(destination volume {left})")
        return copied
    except BaseException:
        for stream in (src_stream, dst_stream):
            if stream is not None:
                _abort(stream)
        if created:
            try:
                dst.delete_volume(dst_pool, name)
            except HypervisorError:
                pass
        raise
