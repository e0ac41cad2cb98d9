"""Copying volumes between hosts through libvirt's storage streams (kvmctl/host/transfer.py).

One real host here: two Hypervisor connections to qemu:///system, each with its own dir pool in
``scratch_dir``, stand in for two hosts -- the copy only ever goes through the two connections'
streams (download on one, upload on the other), exactly as it would between hosts.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab_support import download, upload  # noqa: E402

from kvmctl.errors import HypervisorError  # noqa: E402
from kvmctl.host import transfer  # noqa: E402
from kvmctl.host.hypervisor import Hypervisor  # noqa: E402
from kvmctl.host.transfer import VolumeDigest, copy_volume, volume_digest  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
URI = os.environ.get("KVMCTL_TEST_URI", "qemu:///system")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _pattern(size: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest() * (4096 // 32)
    return (block * (size // len(block) + 1))[:size]


def _vol_xml(name: str, capacity: int, fmt: str = "raw") -> str:
    compat = "<compat>1.1</compat>" if fmt == "qcow2" else ""
    return (f"<volume type='file'><name>{name}</name><capacity unit='bytes'>{capacity}</capacity>"
            f"<allocation>0</allocation><target><format type='{fmt}'/>{compat}</target></volume>")


def _file_sha256(path: str) -> tuple[int, str]:
    sha, length = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            sha.update(chunk)
            length += len(chunk)
    return length, sha.hexdigest()


class Hosts:
    """Two connections ("hosts") and a dir pool on each."""

    def __init__(self, conn, prefix: str, scratch_dir: Path, cleanup) -> None:
        self.conn = conn
        self.src, self.dst = Hypervisor(URI), Hypervisor(URI)
        cleanup.add(self.src.close)
        cleanup.add(self.dst.close)
        self.src_pool, self.dst_pool = f"{prefix}src", f"{prefix}dst"
        for pool in (self.src_pool, self.dst_pool):
            xml = (f"<pool type='dir'><name>{pool}</name><target><path>{scratch_dir / pool}"
                   "</path></target></pool>")
            obj = conn.storagePoolDefineXML(xml, 0)
            obj.build(0)
            obj.create(0)

    def path(self, hv: Hypervisor, pool: str, name: str) -> str:
        return str(hv._vol(pool, name).path())

    def src_path(self, name: str) -> str:
        return self.path(self.src, self.src_pool, name)

    def dst_path(self, name: str) -> str:
        return self.path(self.dst, self.dst_pool, name)

    def make_src(self, name: str, capacity: int, fmt: str = "raw") -> str:
        self.src.create_volume(self.src_pool, name, _vol_xml(name, capacity, fmt))
        return self.src_path(name)

    def copy(self, name: str, capacity: int, fmt: str = "raw", **kw) -> VolumeDigest:
        return copy_volume(self.src, self.src_pool, name, self.dst, self.dst_pool,
                           _vol_xml(name, capacity, fmt), **kw)


@pytest.fixture
def hosts(conn, prefix, scratch_dir, cleanup) -> Hosts:
    return Hosts(conn, prefix, scratch_dir, cleanup)


def _raw_with_data(hosts: Hosts, name: str, capacity: int) -> dict[int, bytes]:
    """A raw source volume with data at its start, middle and end (holes between)."""
    hosts.make_src(name, capacity)
    pieces = {0: _pattern(512 * KiB + 17, b"start"),
              capacity // 2 - 1000: _pattern(300 * KiB, b"middle"),
              capacity - 64 * KiB: _pattern(64 * KiB, b"end")}
    for offset, data in pieces.items():
        upload(hosts.conn, hosts.src_pool, name, data, offset)
    return pieces


def test_raw_volume_survives_byte_for_byte(hosts, prefix):
    name, capacity = f"{prefix}disk.raw", 256 * MiB
    pieces = _raw_with_data(hosts, name, capacity)
    before = volume_digest(hosts.src, hosts.src_pool, name)
    src_stat = os.stat(hosts.src_path(name))
    assert before.length_bytes == capacity == before.capacity_bytes
    assert (before.length_bytes, before.sha256) == _file_sha256(hosts.src_path(name))

    done: list[int] = []
    copied = hosts.copy(name, capacity, progress=done.append)

    assert copied == before
    assert volume_digest(hosts.dst, hosts.dst_pool, name) == before
    assert (copied.length_bytes, copied.sha256) == _file_sha256(hosts.dst_path(name))
    for offset, data in pieces.items():
        assert download(hosts.conn, hosts.dst_pool, name, len(data) + 2048,
                        max(offset - 1024, 0)) == (
            download(hosts.conn, hosts.src_pool, name, len(data) + 2048, max(offset - 1024, 0)))
        assert download(hosts.conn, hosts.dst_pool, name, len(data), offset) == data
    assert done and done[-1] == capacity and done == sorted(done)
    # The holes stayed holes (sparse streams): not 256 MiB allocated, about the data written.
    assert os.stat(hosts.dst_path(name)).st_blocks * 512 < 8 * MiB
    # The source was only read.
    after = os.stat(hosts.src_path(name))
    assert (after.st_mtime_ns, after.st_size) == (src_stat.st_mtime_ns, src_stat.st_size)
    assert volume_digest(hosts.src, hosts.src_pool, name) == before


@pytest.mark.parametrize("down,up", [(0, 0), (1, 0), (0, 1)], ids=["dense", "sparse-to-dense",
                                                                 "dense-to-sparse"])
def test_dense_streams_give_the_same_copy(hosts, prefix, monkeypatch, down, up):
    """Where a host has no sparse streams, that end goes dense; the digest does not change."""
    name, capacity = f"{prefix}disk.raw", 32 * MiB
    _raw_with_data(hosts, name, capacity)
    sparse_digest = volume_digest(hosts.src, hosts.src_pool, name)
    monkeypatch.setattr(transfer, "DOWNLOAD_SPARSE", down)
    monkeypatch.setattr(transfer, "UPLOAD_SPARSE", up)
    assert volume_digest(hosts.src, hosts.src_pool, name) == sparse_digest
    assert hosts.copy(name, capacity) == sparse_digest
    assert _file_sha256(hosts.dst_path(name)) == (capacity, sparse_digest.sha256)


def _qemu_io(path: str, command: str) -> str:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, path], check=True,
                          capture_output=True, text=True).stdout


def test_qcow2_volume_copies_and_checks_clean(hosts, prefix):
    name, capacity = f"{prefix}disk.qcow2", 512 * MiB
    path = hosts.make_src(name, capacity, "qcow2")
    _qemu_io(path, "write -P 0xab 0 1M")
    _qemu_io(path, f"write -P 0xcd {300 * MiB} 2M")
    _qemu_io(path, f"write -P 0xef {capacity - 64 * KiB} 64k")
    before = volume_digest(hosts.src, hosts.src_pool, name)

    copied = hosts.copy(name, capacity, "qcow2")

    dst = hosts.dst_path(name)
    assert copied.sha256 == before.sha256 and copied.length_bytes == before.length_bytes
    assert _file_sha256(dst) == (before.length_bytes, before.sha256)
    subprocess.run(["qemu-img", "check", "-f", "qcow2", dst], check=True, capture_output=True)
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", path, dst], check=True,
                   capture_output=True)
    assert "Pattern verification failed" not in _qemu_io(dst, f"read -P 0xcd {300 * MiB} 2M")
    info = hosts.dst._vol(hosts.dst_pool, name).info()
    assert info[1] == capacity


def test_mismatch_deletes_the_created_volume(hosts, prefix, monkeypatch):
    name, capacity = f"{prefix}disk.raw", 16 * MiB
    _raw_with_data(hosts, name, capacity)
    real = transfer.volume_digest

    def corrupted(hv, pool, vol):
        digest = real(hv, pool, vol)
        return replace(digest, sha256="0" * 64) if hv is hosts.dst else digest

    monkeypatch.setattr(transfer, "volume_digest", corrupted)
    with pytest.raises(HypervisorError, match=f"copy of {name} from .* to .* did not verify: "
                                              "sha256 0+ is not the source's"):
        hosts.copy(name, capacity)
    assert not hosts.dst.volume_exists(hosts.dst_pool, name)
    assert name not in hosts.dst.volume_names(hosts.dst_pool)
    assert hosts.src.volume_exists(hosts.src_pool, name)


def test_mismatch_leaves_a_volume_it_replaced(hosts, prefix, monkeypatch):
    name, capacity = f"{prefix}disk.raw", 16 * MiB
    _raw_with_data(hosts, name, capacity)
    hosts.dst.create_volume(hosts.dst_pool, name, _vol_xml(name, capacity))
    monkeypatch.setattr(transfer, "volume_digest",
                        lambda hv, pool, vol: VolumeDigest(capacity, capacity - 1, "0" * 64))
    with pytest.raises(HypervisorError, match=r"did not verify: \d+ bytes arrived of \d+.*"
                                              r"left in place"):
        hosts.copy(name, capacity)
    assert hosts.dst.volume_exists(hosts.dst_pool, name)


def test_failed_upload_deletes_the_created_volume(hosts, prefix, monkeypatch):
    name, capacity = f"{prefix}disk.raw", 16 * MiB
    _raw_with_data(hosts, name, capacity)

    def broken(stream, data, what):
        raise HypervisorError(f"{what}: connection reset")

    monkeypatch.setattr(transfer, "send_all", broken)  # the upload side of the copy
    with pytest.raises(HypervisorError, match="connection reset"):
        hosts.copy(name, capacity)
    assert not hosts.dst.volume_exists(hosts.dst_pool, name)


def test_existing_destination_volume_is_overwritten(hosts, prefix):
    name, capacity = f"{prefix}disk.raw", 16 * MiB
    pieces = _raw_with_data(hosts, name, capacity)
    # What is there already is longer than the source and has data where the source has holes.
    hosts.dst.create_volume(hosts.dst_pool, name, _vol_xml(name, 2 * capacity))
    stale = _pattern(4 * MiB, b"stale")
    upload(hosts.conn, hosts.dst_pool, name, stale, 4 * MiB)
    upload(hosts.conn, hosts.dst_pool, name, stale, capacity + MiB)

    copied = hosts.copy(name, capacity)

    assert copied == volume_digest(hosts.src, hosts.src_pool, name)
    assert _file_sha256(hosts.dst_path(name)) == (capacity, copied.sha256)
    assert download(hosts.conn, hosts.dst_pool, name, 3 * MiB, 4 * MiB) == bytes(3 * MiB)
    assert download(hosts.conn, hosts.dst_pool, name, len(pieces[0]), 0) == pieces[0]


def test_inactive_pools_are_refused(hosts, prefix, conn):
    name, capacity = f"{prefix}disk.raw", 4 * MiB
    _raw_with_data(hosts, name, capacity)
    conn.storagePoolLookupByName(hosts.dst_pool).destroy()
    with pytest.raises(HypervisorError, match=f"pool {hosts.dst_pool} on .* is not active"):
        hosts.copy(name, capacity)
    conn.storagePoolLookupByName(hosts.dst_pool).create(0)
    assert name not in hosts.dst.volume_names(hosts.dst_pool)

    conn.storagePoolLookupByName(hosts.src_pool).destroy()
    with pytest.raises(HypervisorError, match=f"pool {hosts.src_pool} on .* is not active"):
        hosts.copy(name, capacity)
    with pytest.raises(HypervisorError, match="is not active"):
        volume_digest(hosts.src, hosts.src_pool, name)
    assert name not in hosts.dst.volume_names(hosts.dst_pool)
    conn.storagePoolLookupByName(hosts.src_pool).create(0)  # its volume is swept at teardown


def test_copy_onto_itself_is_refused(hosts, prefix):
    name, capacity = f"{prefix}disk.raw", 4 * MiB
    pieces = _raw_with_data(hosts, name, capacity)
    with pytest.raises(HypervisorError, match="source and destination are the same volume"):
        copy_volume(hosts.src, hosts.src_pool, name, hosts.dst, hosts.src_pool,
                    _vol_xml(name, capacity))
    assert download(hosts.conn, hosts.src_pool, name, len(pieces[0]), 0) == pieces[0]


def test_missing_source_volume(hosts, prefix):
    name = f"{prefix}none.raw"
    with pytest.raises(HypervisorError, match=f"look up volume {name} in pool"):
        hosts.copy(name, MiB)
    assert name not in hosts.dst.volume_names(hosts.dst_pool)


# --- across two of scripts/test-hosts' hosts -----------------------------------------------------

HOST_LIBVIRT = "/var/lib/libvirt"  # each test host's, kept under its ROOT/lib on this machine



def _local(root: str, host_path: str) -> str:
    """Where a test host's file under /var/lib/libvirt is on this machine."""
    assert host_path.startswith(HOST_LIBVIRT + "/"), host_path
    return root + "/lib" + host_path.removeprefix(HOST_LIBVIRT)


def _sweep(hv: Hypervisor, prefix: str) -> None:
    """Remove this test's volumes and pools (and their directories) on a test host."""
    for pool in hv.conn.listAllStoragePools(0):
        if not pool.name().startswith(prefix):
            continue
        if pool.isActive():
            pool.refresh(0)
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
            pool.destroy()
        pool.delete(0)
        pool.undefine()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_copy_between_two_test_hosts(prefix, cleanup, fmt, session_hosts):
    """From the first test host to the last (h1's local socket to hN over real ssh): nothing
    shared but the two libvirt connections."""
    found = [(h.name, h.uri, str(h.root)) for h in session_hosts]
    (src_name, src_uri, src_root), (dst_name, dst_uri, dst_root) = found[0], found[-1]
    src, dst = Hypervisor(src_uri), Hypervisor(dst_uri)
    cleanup.add(src.close)
    cleanup.add(dst.close)
    pool = f"{prefix}pool"
    for hv in (src, dst):
        cleanup.add(_sweep, hv, prefix)
        obj = hv.conn.storagePoolDefineXML(
            f"<pool type='dir'><name>{pool}</name><target><path>{HOST_LIBVIRT}/images/{pool}"
            "</path></target></pool>", 0)
        obj.build(0)
        obj.create(0)
    name, capacity = f"{prefix}disk.{fmt}", 256 * MiB
    src.create_volume(pool, name, _vol_xml(name, capacity, fmt))
    if fmt == "raw":
        for offset, seed in ((0, b"start"), (capacity // 2, b"middle"),
                             (capacity - 64 * KiB, b"end")):
            upload(src.conn, pool, name, _pattern(64 * KiB, seed), offset)
    else:  # a qcow2 written with qemu-io where the source host keeps its file on this machine
        path = _local(src_root, src._vol(pool, name).path())
        _qemu_io(path, "write -P 0xab 0 1M")
        _qemu_io(path, f"write -P 0xcd {capacity - MiB} 1M")
    before = volume_digest(src, pool, name)

    copied = copy_volume(src, pool, name, dst, pool, _vol_xml(name, capacity, fmt))

    assert copied.sha256 == before.sha256 and copied.length_bytes == before.length_bytes
    assert volume_digest(dst, pool, name) == copied
    local = _local(dst_root, dst._vol(pool, name).path())
    assert _file_sha256(local) == (before.length_bytes, before.sha256), (src_name, dst_name)
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-f", "qcow2", local], check=True,
                       capture_output=True)
