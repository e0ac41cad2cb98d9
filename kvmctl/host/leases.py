"""Small named records kept on the hypervisor, for the apply lock that lives there
(kvmctl/apply/hostlock.py holds the policy; this module only stores bytes).

Each record is a 4 KiB raw volume in kvmctl's own dir pool ``kvmctl-locks`` (directory
/var/lib/libvirt/kvmctl-locks), which is defined, built, started and marked autostart on first
use. Only the libvirt API is used, so it works over any URI (qemu+ssh://, qemu+unix://).

What libvirt guarantees, and what this module builds on (checked against libvirt 9.0):

- A volume name is claimed under the pool's lock: of two ``createXML``/``createXMLFrom`` calls
  for one name exactly one succeeds; the other fails (VIR_ERR_STORAGE_VOL_EXIST, or an internal
  error "already in use" for createXMLFrom) -- also while the first is still being built.
- ``create`` makes a record appear with its whole content: the data is first written into a
  private staging volume, and the record is a copy of it (``createXMLFrom``). Until the copy is
  done the record exists but cannot be read (libvirt: "still being allocated"); ``read`` then
  answers ``b""``, and it cannot be deleted. No one ever sees a claimed name with a blank body
  because its creator has not written it yet.
- An upload stream opens the volume's file when ``upload`` is called, not when data arrives.
  ``write(..., only_if=...)`` therefore opens the stream first, reads the record by name, and
  sends only if ``only_if`` accepts what it read: if the record was deleted and made again in
  between, the read shows the new record (and the write, had it happened, would have gone to
  the deleted file). Aborting a stream before any data leaves the content as it was.
- Uploads do not truncate: a record is always written whole, zero-padded to its fixed size, and
  ``read`` strips the padding.
- Downloads do not stop deletes, and deletes do not wait for uploads; a volume still being
  built refuses both (a delete is retried for a moment).

Volumes live in the pool across libvirtd restarts (they are files; a started pool lists them).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import libvirt

from ..errors import HypervisorError
from .hypervisor import Hypervisor

POOL_NAME = "kvmctl-locks"
POOL_PATH = "/var/lib/libvirt/kvmctl-locks"
SLOT_BYTES = 4096
# A fixed UUID: two first uses that define the pool at once define the very same pool.
_POOL_UUID = uuid.uuid5(uuid.NAMESPACE_URL, "kvmctl:pool:" + POOL_NAME)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
_STAGING = ".staging-"
_BUSY_RETRY_S = 2.0


def _pool_xml(name: str, path: str) -> str:
    return (f"<pool type='dir'><name>{name}</name><uuid>{_POOL_UUID}</uuid>"
            f"<target><path>{path}</path><permissions><mode>0700</mode></permissions>"
            "</target></pool>")


def _volume_xml(name: str) -> str:
    return (f"<volume type='file'><name>{name}</name>"
            f"<capacity unit='bytes'>{SLOT_BYTES}</capacity>"
            f"<allocation unit='bytes'>{SLOT_BYTES}</allocation>"
            "<target><format type='raw'/><permissions><mode>0600</mode></permissions></target>"
            "</volume>")


def _code(exc: libvirt.libvirtError) -> int:
    return int(exc.get_error_code() or 0)


def _volume(pool: Any, name: str) -> Any | None:
    """The volume `name` of the pool; None if there is none."""
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def _abort(stream: Any) -> None:
    # Called while a failure is being handled: an abort that fails too (the connection broke)
    # must not replace that failure.
    with contextlib.suppress(libvirt.libvirtError):
        stream.abort()


class LeaseStore:
    """Named byte records (at most SLOT_BYTES, not ending in NUL) in the ``kvmctl-locks`` pool
    of one hypervisor. Safe to use from several threads (libvirt connections are)."""

    def __init__(self, hv: Hypervisor, pool: str = POOL_NAME, path: str = POOL_PATH) -> None:
        self.hv = hv
        self.pool_name = pool
        self.pool_path = path
        self._pool: Any | None = None
        self._setup = threading.Lock()

    @property
    def host(self) -> str:
        return self.hv.uri

    # ---- the pool --------------------------------------------------------------------------

    def ensure_pool(self) -> Any:
        """The started pool, defined, built, started and set to autostart if it is not yet.
        Concurrent first uses (other processes, other machines) are tolerated."""
        with self._setup:
            if self._pool is None:
                what = f"set up the lock pool {self.pool_name} on {self.host}"
                try:
                    self._pool = self._set_up()
                except libvirt.libvirtError as exc:
                    raise HypervisorError(f"{what}: {exc.get_error_message() or exc}") from None
            return self._pool

    def _set_up(self) -> Any:
        """Look the pool up; define it (never over an existing one: a define of an existing
        name replaces its definition), build it, start it, set autostart, as far as needed."""
        conn = self.hv.conn
        try:
            pool = conn.storagePoolLookupByName(self.pool_name)
        except libvirt.libvirtError as exc:
            if _code(exc) != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
            try:
                pool = conn.storagePoolDefineXML(_pool_xml(self.pool_name, self.pool_path), 0)
            except libvirt.libvirtError:  # defined by someone else meanwhile?
                pool = conn.storagePoolLookupByName(self.pool_name)
            with contextlib.suppress(libvirt.libvirtError):  # mkdir -p; the start says if not
                pool.build(0)
        if not pool.isActive():
            try:
                pool.create(0)
            except libvirt.libvirtError:
                if not pool.isActive():  # not started by someone else meanwhile
                    # its directory may be gone: a build makes it again
                    with contextlib.suppress(libvirt.libvirtError):
                        pool.build(0)
                    try:
                        pool.create(0)
                    except libvirt.libvirtError:
                        if not pool.isActive():
                            raise
        if not pool.autostart():
            pool.setAutostart(1)
        return pool

    def _run(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """fn(pool); once more with the pool set up again if it was stopped or undefined."""
        for attempt in (1, 2):
            pool = self.ensure_pool()
            try:
                return fn(pool)
            except libvirt.libvirtError as exc:
                if attempt == 1 and self._pool_gone(pool, exc):
                    with self._setup:
                        self._pool = None
                    continue
                raise HypervisorError(f"{what} on {self.host}: "
                                      f"{exc.get_error_message() or exc}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _pool_gone(pool: Any, exc: libvirt.libvirtError) -> bool:
        if _code(exc) in (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_INVALID_STORAGE_POOL):
            return True
        if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID:
            try:
                return not pool.isActive()
            except libvirt.libvirtError:
                return True
        return False

    # ---- records ---------------------------------------------------------------------------

    @staticmethod
    def _check(name: str, data: bytes | None = None) -> None:
        if not _NAME.fullmatch(name) or _STAGING in name:
            raise ValueError(f"not a lease record name: {name!r}")
        if data is not None and (len(data) > SLOT_BYTES or data.endswith(b"\0")):
            raise ValueError(f"a lease record holds at most {SLOT_BYTES} bytes, not ending "
                             "in NUL")

    def create(self, name: str, data: bytes) -> bool:
        """Make record `name` holding `data`; False if a record of that name exists.
        The record appears with its whole content (see the module docstring)."""
        self._check(name, data)
        if self._run(f"look up lease record {name}", lambda pool: self._exists(pool, name)):
            return False  # spares the copy, and an error in libvirtd's log
        staging = f"{name}{_STAGING}{secrets.token_hex(4)}"
        self._run(f"create lease record {staging}",
                  lambda pool: pool.createXML(_volume_xml(staging), 0))
        try:
            self._upload(staging, data)
            return bool(self._run(f"create lease record {name}",
                                  lambda pool: self._clone(pool, name, staging)))
        finally:
            with contextlib.suppress(HypervisorError):
                self.delete(staging, staging=True)

    @staticmethod
    def _exists(pool: Any, name: str) -> bool:
        return _volume(pool, name) is not None

    @staticmethod
    def _clone(pool: Any, name: str, staging: str) -> bool:
        source = pool.storageVolLookupByName(staging)
        try:
            pool.createXMLFrom(_volume_xml(name), source, 0)
            return True
        except libvirt.libvirtError as exc:
            # VIR_ERR_STORAGE_VOL_EXIST from some paths, "already in use" (internal error)
            # from createXMLFrom: the name is taken if a volume of that name is there now.
            try:
                pool.storageVolLookupByName(name)
                return False
            except libvirt.libvirtError:
                raise exc from None

    def read(self, name: str) -> bytes | None:
        """The record's content; None if there is no such record; b"" if it exists but cannot
        be read yet (still being copied)."""
        self._check(name)
        found: bytes | None = self._run(f"read lease record {name}",
                                        lambda pool: self._download(pool, name))
        return found

    def _download(self, pool: Any, name: str) -> bytes | None:
        vol = _volume(pool, name)
        if vol is None:
            return None
        stream = self.hv.conn.newStream(0)
        data = bytearray()
        try:
            vol.download(stream, 0, 0, 0)
            while chunk := stream.recv(65536):
                if isinstance(chunk, int):  # -2: would block; not with a blocking stream
                    break
                data += chunk
            stream.finish()
        except libvirt.libvirtError as exc:
            _abort(stream)
            if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None  # deleted since it was looked up
            if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and pool.isActive():
                return b""  # still being allocated (copied) by its creator
            raise
        return bytes(data).rstrip(b"\0")

    def write(self, name: str, data: bytes,
              only_if: Callable[[bytes], bool] | None = None) -> bool:
        """Replace the content of record `name`; False if there is no such record, or if
        `only_if` (given the content found) refuses. The check and the write are about the same
        volume: a record deleted and made again meanwhile is never written (module docstring).
        """
        self._check(name, data)
        return bool(self._run(f"write lease record {name}",
                              lambda pool: self._guarded_upload(pool, name, data, only_if)))

    def _guarded_upload(self, pool: Any, name: str, data: bytes,
                        only_if: Callable[[bytes], bool] | None) -> bool:
        vol = _volume(pool, name)
        if vol is None:
            return False
        stream = self.hv.conn.newStream(0)
        try:
            vol.upload(stream, 0, SLOT_BYTES, 0)  # opens the file: this volume, from now on
        except libvirt.libvirtError as exc:
            _abort(stream)
            if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return False
            raise
        try:
            if only_if is not None:
                current = self._download(pool, name)
                if current is None or not only_if(current):
                    stream.abort()
                    return False
            stream.send(data.ljust(SLOT_BYTES, b"\0"))
            stream.finish()
            return True
        except BaseException:
            _abort(stream)
            raise

    def _upload(self, name: str, data: bytes) -> None:
        if not self._run(f"write lease record {name}",
                         lambda pool: self._guarded_upload(pool, name, data, None)):
            raise HypervisorError(f"write lease record {name} on {self.host}: it vanished")

    def delete(self, name: str, *, staging: bool = False) -> bool:
        """Remove record `name`; False if there was none."""
        if not staging:
            self._check(name)
        return bool(self._run(f"delete lease record {name}",
                              lambda pool: self._remove(pool, name)))

    @staticmethod
    def _remove(pool: Any, name: str) -> bool:
        deadline = time.monotonic() + _BUSY_RETRY_S
        while True:
            try:
                pool.storageVolLookupByName(name).delete(0)
                return True
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    return False
                # still being allocated (copied), or in use as a copy's source: a moment
                if (_code(exc) != libvirt.VIR_ERR_OPERATION_INVALID or not pool.isActive()
                        or time.monotonic() >= deadline):
                    raise
                time.sleep(0.02)
