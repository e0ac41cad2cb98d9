"""The hypervisor: one libvirt connection; reads live state (reading.py), performs single
operations (here).

Every libvirt error is wrapped into HypervisorError naming the object and the operation. Nothing
here decides anything: the planner decides, apply sequences, this module does one call at a time.
Everything goes through the libvirt connection (streams for file content), so remote URIs work.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import re
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import libvirt
from lxml import etree

from ..errors import HypervisorError
from ..kinds import NAMESPACE, RECORD_PREFIX
from ..render.specs import VolumeSpec
from . import early, facts, records
from .connection import call, send_all, silence_default_handler
from .ownership import OwnershipRecord, record_names, slot_capacity
from .reading import HostReader
from .snapshots import SnapshotOps

if TYPE_CHECKING:
    from .leases import LeaseStore
    from .state import LiveState

AFFECT_LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
_UEFI = re.compile(r"<nvram|<loader|firmware=['\"]efi['\"]")


class Hypervisor(HostReader, SnapshotOps):
    """One libvirt connection: reads (HostReader) and single operations."""

    def __init__(self, uri: str) -> None:
        silence_default_handler()
        self.uri = uri
        # A connection the CLI started early (host/early.py), else a new one.
        self.conn = call(f"cannot connect to {uri}", lambda: early.take(uri)
                         or libvirt.open(uri))
        self._import_lock = threading.Lock()

    def read(self) -> LiveState:
        """Every object of the host: the read the CLI started with the connection, if it did
        (host/early.py), else one now."""
        return early.take_read(self.uri, self.conn) or super().read()

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

    def lock_store(self) -> LeaseStore:
        """Where this host keeps the project locks (host/leases.py)."""
        from .leases import LeaseStore
        return LeaseStore(self)

    # ---- domains ---------------------------------------------------------------------------

    def define_domain(self, name: str, xml: str) -> None:
        call(f"define domain {name}", self.conn.defineXMLFlags, xml,
             libvirt.VIR_DOMAIN_DEFINE_VALIDATE)

    def record_definition(self, name: str, digest: str, rendered: str, sent_xml: str) -> bool:
        """Record with domain `name`, just defined from `sent_xml` (rendered from what `digest`
        names, to XML of the digest `rendered`), that the definition libvirt made of it has no
        owned difference from it (host/records.py). False, recording nothing, when it has one."""
        from ..render.definitions import render_template
        dom = self._dom(name)
        returned = call(f"read domain {name}", dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE)
        if facts.diff(facts.domain_facts(sent_xml), facts.domain_facts(returned)):
            return False
        record = render_template("definition-record.xml.j2", desired=digest, rendered=rendered,
                                 defined=records.config_digest(returned))
        call(f"record the definition of domain {name}", dom.setMetadata,
             libvirt.VIR_DOMAIN_METADATA_ELEMENT, record, records.DEFINITION_KEY,
             records.DEFINITION_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        return True

    def start_domain(self, name: str) -> None:
        call(f"start domain {name}", self._dom(name).create)

    def shutdown_domain(self, name: str, timeout: float) -> bool:
        """ACPI shutdown, waiting up to `timeout`; then power off. True if it was graceful."""
        dom = self._dom(name)
        if not dom.isActive():
            return True
        with contextlib.suppress(libvirt.libvirtError):
            dom.shutdown()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dom.isActive():
                return True
            time.sleep(0.5)
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        return False

    def undefine_domain(self, name: str) -> None:
        dom = self._dom(name)
        if call(f"read domain {name}", dom.isActive):
            call(f"power off domain {name}", dom.destroy)
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        # Its snapshots' metadata goes with it: the plan deletes a VM that has snapshots only
        # when asked to (--allow-snapshot-loss); the snapshots inside its disks go with those.
        if call(f"read the snapshots of {name}", dom.snapshotNum, 0):
            flags |= libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        # A UEFI guest's NVRAM file goes with it; only such guests get the flag, which some
        # drivers (libvirt's test driver) do not know. libvirt before 9.2 keeps no <nvram> in
        # the definition of a firmware="efi" guest, yet refuses to undefine it without the flag.
        xml = call(f"read domain {name}", dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE)
        if _UEFI.search(xml):
            flags |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        call(f"undefine domain {name}", dom.undefineFlags, flags)

    def set_domain_autostart(self, name: str, on: bool) -> None:
        call(f"set autostart of domain {name}", self._dom(name).setAutostart, int(on))

    def set_vcpus_live(self, name: str, count: int) -> None:
        call(f"set vCPUs of running domain {name} to {count}", self._dom(name).setVcpusFlags,
             count, AFFECT_LIVE)

    def set_memory_live(self, name: str, kib: int) -> None:
        call(f"set memory of running domain {name}", self._dom(name).setMemoryFlags, kib,
             AFFECT_LIVE)

    def attach_device_live(self, name: str, xml: str) -> None:
        call(f"hot-plug a device into domain {name}", self._dom(name).attachDeviceFlags, xml,
             AFFECT_LIVE)

    def detach_device_live(self, name: str, xml: str) -> None:
        call(f"hot-unplug a device from domain {name}", self._dom(name).detachDeviceFlags, xml,
             AFFECT_LIVE)

    def update_device_live(self, name: str, xml: str) -> None:
        call(f"update a device of domain {name}", self._dom(name).updateDeviceFlags, xml,
             AFFECT_LIVE)

    def set_metadata_live(self, name: str, xml: str) -> None:
        call(f"set metadata of domain {name}", self._dom(name).setMetadata,
             libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, "kvmctl", NAMESPACE, AFFECT_LIVE)

    def block_resize(self, name: str, target: str, size_bytes: int) -> None:
        call(f"grow disk {target} of running domain {name}", self._dom(name).blockResize,
             target, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    # ---- networks --------------------------------------------------------------------------

    def _net(self, name: str) -> Any:
        return call(f"look up network {name}", self.conn.networkLookupByName, name)

    def define_network(self, name: str, xml: str) -> None:
        call(f"define network {name}", self.conn.networkDefineXML, xml)

    def start_network(self, name: str) -> None:
        net = self._net(name)
        if not net.isActive():
            call(f"start network {name}", net.create)

    def restart_network(self, name: str) -> None:
        net = self._net(name)
        if net.isActive():
            call(f"stop network {name}", net.destroy)
        call(f"start network {name}", net.create)

    def set_network_autostart(self, name: str, on: bool) -> None:
        call(f"set autostart of network {name}", self._net(name).setAutostart, int(on))

    def delete_network(self, name: str) -> None:
        net = self._net(name)
        if net.isActive():
            call(f"stop network {name}", net.destroy)
        call(f"undefine network {name}", net.undefine)

    def update_network(self, name: str, command: str, section: str, xml: str) -> None:
        """Live and persistent update of one DHCP host or DNS host entry (no restart)."""
        commands = {"add": libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
                    "delete": libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE,
                    "modify": libvirt.VIR_NETWORK_UPDATE_COMMAND_MODIFY}
        sections = {"dhcp-host": libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
                    "dns-host": libvirt.VIR_NETWORK_SECTION_DNS_HOST,
                    "dhcp-range": libvirt.VIR_NETWORK_SECTION_IP_DHCP_RANGE}
        net = self._net(name)
        flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        if net.isActive():
            flags |= libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
        call(f"update {section} of network {name}", net.update, commands[command],
             sections[section], -1, xml, flags)

    # ---- pools and volumes -----------------------------------------------------------------

    def _pool_obj(self, name: str) -> Any:
        return call(f"look up pool {name}", self.conn.storagePoolLookupByName, name)

    def define_pool(self, name: str, xml: str) -> None:
        pool = call(f"define pool {name}", self.conn.storagePoolDefineXML, xml, 0)
        call(f"build pool {name}", pool.build, 0)

    def start_pool(self, name: str) -> None:
        """Start a pool; if its directory is gone, make it again (libvirt's pool build) first.
        An existing directory is never built over: a build may change its permissions."""
        pool = self._pool_obj(name)
        if pool.isActive():
            return
        try:
            pool.create(0)
        except libvirt.libvirtError:
            call(f"make the directory of pool {name} again", pool.build, 0)
            call(f"start pool {name}", pool.create, 0)

    def set_pool_autostart(self, name: str, on: bool) -> None:
        call(f"set autostart of pool {name}", self._pool_obj(name).setAutostart, int(on))

    def delete_pool(self, name: str, remove_directory: bool = True) -> None:
        pool = self._pool_obj(name)
        if not pool.isActive():
            # What a stopped pool holds is unknown: it is started to be looked at. One that
            # cannot start (its directory is gone) holds nothing any more.
            with contextlib.suppress(libvirt.libvirtError):
                pool.create(0)
        if pool.isActive():
            call(f"refresh pool {name}", pool.refresh, 0)
            left = [v.name() for v in call(f"list volumes of pool {name}", pool.listAllVolumes, 0)
                    if not v.name().startswith(RECORD_PREFIX)]
            if left:  # undefining it would orphan them
                raise HypervisorError(f"pool {name} is not empty ({', '.join(left[:5])}); "
                                      "not deleted")
            for vol in call(f"list volumes of pool {name}", pool.listAllVolumes, 0):
                if vol.name().startswith(RECORD_PREFIX):
                    call(f"delete ownership record in {name}", vol.delete, 0)
            call(f"stop pool {name}", pool.destroy)
        if remove_directory:
            with contextlib.suppress(HypervisorError):  # the directory may hold foreign files
                call(f"remove directory of pool {name}", pool.delete, 0)
        call(f"undefine pool {name}", pool.undefine)

    def _vol(self, pool: str, name: str) -> Any:
        return call(f"look up volume {name} in pool {pool}",
                    self._pool_obj(pool).storageVolLookupByName, name)

    def create_volume(self, pool: str, name: str, xml: str, clone_from: tuple[str, str] | None
                      = None) -> None:
        pool_obj = self._pool_obj(pool)
        if clone_from:
            source = self._vol(*clone_from)
            call(f"copy volume {clone_from[1]} to {name}", pool_obj.createXMLFrom, xml, source, 0)
        else:
            call(f"create volume {name} in pool {pool}", pool_obj.createXML, xml, 0)

    def resize_volume(self, pool: str, name: str, size_bytes: int) -> None:
        call(f"grow volume {name} in pool {pool}", self._vol(pool, name).resize, size_bytes, 0)

    def volume_capacity_bytes(self, pool: str, name: str) -> int:
        return int(call(f"read volume {name} in pool {pool}", self._vol(pool, name).info)[1])

    def delete_volume(self, pool: str, name: str) -> None:
        call(f"delete volume {name} in pool {pool}", self._vol(pool, name).delete, 0)

    def volume_exists(self, pool: str, name: str) -> bool:
        try:
            self._pool_obj(pool).storageVolLookupByName(name)
            return True
        except libvirt.libvirtError:
            return False

    def volume_names(self, pool: str) -> set[str]:
        pool_obj = self._pool_obj(pool)
        call(f"refresh pool {pool}", pool_obj.refresh, 0)
        return {v.name() for v in call(f"list volumes of pool {pool}", pool_obj.listAllVolumes, 0)}

    def upload(self, pool: str, name: str, chunks: Iterator[bytes], length: int) -> None:
        """Write `length` bytes into a volume through libvirt's stream API."""
        vol = self._vol(pool, name)
        stream = call("open a stream", self.conn.newStream, 0)
        try:
            call(f"upload into volume {name}", vol.upload, stream, 0, length, 0)
            for chunk in chunks:
                send_all(stream, chunk, f"upload into volume {name}")
            call(f"finish upload into volume {name}", stream.finish)
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise

    def write_record(self, pool: str, record: OwnershipRecord) -> None:
        """Store a project's ownership record as a small volume inside the pool it describes.

        Never a moment without a complete record (see ownership.py): the new record is written
        whole into the next-record slot, then into the record slot, and only then is the
        next-record slot removed. The new record is in force from the moment its next-record
        slot is complete (readers prefer a complete one); a kill before that leaves the
        previous record in force. An empty record removes both slots.
        """
        current, pending = record_names(record.project)
        has_current = self._record_slot(pool, current)
        if self._record_slot(pool, pending):
            if OwnershipRecord.from_json(self._slot_bytes(pool, pending), record.project):
                # A killed write left its complete next record, which is in force: the record
                # slot is free for the new one, which is in force once that slot is removed.
                if record.empty:
                    if has_current:
                        self.delete_volume(pool, current)
                else:
                    self._put_slot(pool, current, record.to_json())
                self.delete_volume(pool, pending)
                return
            self.delete_volume(pool, pending)  # incomplete: it never replaced anything
        if record.empty:
            if has_current:
                self.delete_volume(pool, current)
            return
        data = record.to_json()
        if not has_current:
            # A first record: until it is complete there is none, and it claims nothing yet.
            self._put_slot(pool, current, data)
            return
        self._put_slot(pool, pending, data)
        self._put_slot(pool, current, data)
        self.delete_volume(pool, pending)

    def _record_slot(self, pool: str, name: str) -> bool:
        try:
            self._pool_obj(pool).storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return False
            raise HypervisorError(f"look up ownership record {name} in pool {pool}: "
                                  f"{exc.get_error_message() or exc}") from None
        return True

    def _slot_bytes(self, pool: str, name: str) -> bytes:
        return self._download(self._vol(pool, name))

    def _put_slot(self, pool: str, name: str, data: bytes) -> None:
        """Make the slot `name` hold `data` (zero-padded to its size): in place if it exists and
        is large enough, else in a new volume."""
        if self._record_slot(pool, name):
            size = self.volume_capacity_bytes(pool, name)
            if size >= len(data):
                self.upload(pool, name, iter([data.ljust(size, b"\0")]), size)
                return
            self.delete_volume(pool, name)
        size = slot_capacity(len(data))
        from ..render.definitions import volume_xml
        self.create_volume(pool, name, volume_xml(VolumeSpec(pool, name, size, "raw",
                                                              allocation_bytes=size)))
        self.upload(pool, name, iter([data.ljust(size, b"\0")]), size)

    def import_host_file(self, pool: str, name: str, xml: str, path: str) -> None:
        """Copy a file that lives on the hypervisor host into a pool, through libvirt.

        A transient dir pool over the file's directory lets libvirt copy it (createXMLFrom),
        so this works on remote hosts too; the transient pool disappears afterwards. Imports
        run one at a time: two over one directory would share, and remove, that pool.
        """
        with self._import_lock:
            self._import_host_file(pool, xml, path)

    def _import_host_file(self, pool: str, xml: str, path: str) -> None:
        folder, filename = posixpath.split(path)
        tmp_name = "kvmctl-import-" + hashlib.sha256(path.encode()).hexdigest()[:10]
        from ..render.definitions import pool_definition
        tmp_xml = pool_definition("dir", tmp_name, folder)
        # libvirt refuses a second pool over a directory that already is one (another pool,
        # or the transient pool of a concurrent import): use that pool then.
        tmp = self._pool_over(folder)
        if tmp is None:
            try:
                tmp = self.conn.storagePoolCreateXML(tmp_xml, 0)
            except libvirt.libvirtError as exc:
                tmp = self._pool_over(folder)
                if tmp is None:
                    raise HypervisorError(f"open {folder} on the host: "
                                          f"{exc.get_error_message() or exc}") from None
        else:
            call(f"refresh pool {tmp.name()}", tmp.refresh, 0)
        try:
            source = call(f"find {path} on the host", tmp.storageVolLookupByName, filename)
            call(f"import {path} into pool {pool}", self._pool_obj(pool).createXMLFrom, xml,
                 source, 0)
        finally:
            # Only a transient import pool goes; if a concurrent import still copies from it,
            # this fails and that import removes it when it is done.
            with contextlib.suppress(libvirt.libvirtError):
                if tmp.name().startswith("kvmctl-import-") and not tmp.isPersistent():
                    tmp.destroy()

    def _pool_over(self, folder: str) -> Any | None:
        """The active pool whose directory is `folder`, if there is one."""
        flags = libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE
        for pool in call("list storage pools", self.conn.listAllStoragePools, flags):
            with contextlib.suppress(libvirt.libvirtError, etree.XMLSyntaxError):
                target = etree.fromstring(pool.XMLDesc(0).encode()).findtext("target/path")
                if (target or "").rstrip("/") == folder.rstrip("/"):
                    return pool
        return None
