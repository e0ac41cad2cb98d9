"""The only module that imports libvirt: reads live state and performs single operations.

Every libvirt error is wrapped into HypervisorError naming the object and the operation. Nothing
here decides anything: the planner decides, apply sequences, this module does one call at a time.
Everything goes through the libvirt connection (streams for file content), so remote URIs work.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt
from lxml import etree

from ..errors import HypervisorError
from ..kinds import NAMESPACE, RECORD_PREFIX, Kind
from ..render.definitions import pool_definition, volume_xml
from ..render.specs import VolumeSpec
from ..units import xml_bytes
from .ownership import Owner, OwnershipRecord, owner_from_xml
from .state import LiveDomain, LiveNetwork, LivePool, LiveState, LiveVolume

T = TypeVar("T")
_STATES = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
           libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
           libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
           libvirt.VIR_DOMAIN_BLOCKED: "running"}
AFFECT_LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
_libvirt_quiet = threading.Lock()


def _silence_default_handler() -> None:
    # libvirt prints every error to stderr by default; we report them ourselves.
    with _libvirt_quiet:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def call(what: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"{what}: {exc.get_error_message() or exc}") from None


_VANISHED = {libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK,
             libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL}


def _each(read: Callable[[Any], T], objects: list[Any]) -> Iterator[T]:
    """Read every listed object, skipping those deleted by someone else in the meantime."""
    for obj in objects:
        try:
            yield read(obj)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in _VANISHED:
                continue
            raise HypervisorError(f"read {obj.name()}: {exc.get_error_message()}") from None
        except HypervisorError:
            if not _exists(obj):
                continue
            raise


def _exists(obj: Any) -> bool:
    try:
        obj.XMLDesc(0)
        return True
    except libvirt.libvirtError:
        return False


class Hypervisor:
    """One libvirt connection."""

    def __init__(self, uri: str) -> None:
        _silence_default_handler()
        self.uri = uri
        self.conn = call(f"cannot connect to {uri}", libvirt.open, uri)
        self._import_lock = threading.Lock()

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

    # ---- reading -------------------------------------------------------------------------

    def read(self) -> LiveState:
        listed = call("list domains", self.conn.listAllDomains, 0)
        # Two filtered lists instead of a state and an autostart call per domain: a domain that
        # is not active is shut off; only the active ones are asked for their exact state.
        active, autostart = ({d.UUIDString() for d in call("list domains",
                                                          self.conn.listAllDomains, flags)}
                             for flags in (libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE,
                                           libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART))
        domains = {d.name: d for d in _each(lambda dom: self._domain(dom, active, autostart),
                                            listed)}
        networks = {n.name: n for n in _each(self._network, call("list networks",
                                                                self.conn.listAllNetworks, 0))}
        pools = {p.name: p for p in _each(self._pool, call("list storage pools",
                                                          self.conn.listAllStoragePools, 0))}
        return LiveState(domains, networks, pools, self.host_bridges())

    def _domain(self, dom: Any, active: set[str] | None = None,
                autostart: set[str] | None = None) -> LiveDomain:
        """One domain; `active` and `autostart` (UUIDs, from filtered lists) spare two calls."""
        name, uuid = dom.name(), dom.UUIDString()
        inactive = call(f"read domain {name}", dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE)
        state = _STATES.get(call(f"read domain {name}", dom.state)[0], "other") \
            if active is None or uuid in active else "shutoff"
        live = call(f"read domain {name}", dom.XMLDesc, 0) if state != "shutoff" else None
        auto = uuid in autostart if autostart is not None else \
            bool(call(f"read domain {name}", dom.autostart))
        return LiveDomain(name, uuid, inactive, live, state, auto, owner_from_xml(inactive))

    def _network(self, net: Any) -> LiveNetwork:
        name = net.name()
        try:
            xml = net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                raise
            # Drivers without separate persistent network XML (test:///default) reject the flag.
            xml = call(f"read network {name}", net.XMLDesc, 0)
        return LiveNetwork(name, net.UUIDString(), xml, bool(net.isActive()),
                           bool(call(f"read network {name}", net.autostart)), owner_from_xml(xml))

    def _pool(self, pool: Any) -> LivePool:
        name = pool.name()
        xml = call(f"read pool {name}", pool.XMLDesc, 0)
        active = bool(pool.isActive())
        path = etree.fromstring(xml.encode()).findtext("target/path") or ""
        volumes: list[LiveVolume] = []
        records: list[OwnershipRecord] = []
        if active:
            for vol in call(f"list volumes of pool {name}", pool.listAllVolumes, 0):
                if vol.name().startswith(RECORD_PREFIX):
                    record = OwnershipRecord.from_json(self._download(vol))
                    if record:
                        records.append(record)
                    continue
                volumes.extend(_each(lambda v: self._volume(name, v), [vol]))
        owners = {v: o for r in records for v, o in r.volumes.items()}
        pool_owner = next((r.project for r in records if r.owns_pool), None)
        return LivePool(name, pool.UUIDString(), xml, path, active,
                        bool(call(f"read pool {name}", pool.autostart)),
                        Owner(pool_owner, Kind.POOL, name) if pool_owner else None,
                        tuple(LiveVolume(v.pool, v.name, v.path, v.capacity_bytes, v.format,
                                         v.backing_path, owners.get(v.name)) for v in volumes))

    def _volume(self, pool: str, vol: Any) -> LiveVolume:
        xml = etree.fromstring(call(f"read volume {vol.name()}", vol.XMLDesc, 0).encode())
        capacity = xml.find("capacity")
        size = xml_bytes(capacity.text, capacity.get("unit")) if capacity is not None else None
        fmt = xml.find("target/format")
        return LiveVolume(pool, vol.name(), vol.path(), size or 0,
                          fmt.get("type", "raw") if fmt is not None else "raw",
                          xml.findtext("backingStore/path"))

    def host_bridges(self) -> frozenset[str]:
        """Network interface names on the hypervisor host (bridges included), via libvirt."""
        names: set[str] = set()
        # The interface driver enumerates the host's links on every call; the node device
        # driver only learns of links created after libvirtd started through udev events, which
        # hosts without a running udevd never send. Ask both.
        with contextlib.suppress(libvirt.libvirtError):
            names.update(i.name() for i in self.conn.listAllInterfaces(0))
        flags = libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_NET
        for dev in call("list host network devices", self.conn.listAllDevices, flags):
            with contextlib.suppress(libvirt.libvirtError, etree.XMLSyntaxError):
                iface = etree.fromstring(dev.XMLDesc(0).encode()).findtext("capability/interface")
                if iface:
                    names.add(iface)
        return frozenset(names)

    def host_has_virt(self) -> bool:
        """Whether the host CPU has VT-x/AMD-V (slow: libvirt probes the host each time)."""
        caps = etree.fromstring(call("read host capabilities", self.conn.getCapabilities).encode())
        features = {f.get("name") for f in caps.iterfind("host/cpu/feature")}
        return bool(features & {"vmx", "svm"})

    def dhcp_leases(self, network: str) -> list[dict[str, Any]]:
        net = call(f"look up network {network}", self.conn.networkLookupByName, network)
        return call(f"read DHCP leases of {network}", net.DHCPLeases) if net.isActive() else []

    def agent_addresses(self, domain: str) -> dict[str, list[str]]:
        dom = self._dom(domain)
        try:
            ifaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0)
        except libvirt.libvirtError:
            return {}
        return {(i.get("hwaddr") or "").lower(): [a["addr"] for a in (i.get("addrs") or [])]
                for i in ifaces.values()}

    def live_xml(self, name: str) -> str:
        return str(call(f"read domain {name}", self._dom(name).XMLDesc, 0))

    def domain_state(self, name: str) -> str:
        return _STATES.get(call(f"read domain {name}", self._dom(name).state)[0], "other")

    # ---- domains ---------------------------------------------------------------------------

    def _dom(self, name: str) -> Any:
        return call(f"look up domain {name}", self.conn.lookupByName, name)

    def define_domain(self, name: str, xml: str) -> None:
        call(f"define domain {name}", self.conn.defineXMLFlags, xml,
             libvirt.VIR_DOMAIN_DEFINE_VALIDATE)

    def identity(self, kind: str, name: str) -> tuple[str, Owner | None] | None:
        """(uuid, ownership mark) of the domain or network called `name`, if there is one."""
        lookup = self.conn.lookupByName if kind == Kind.VM else \
            self.conn.networkLookupByName
        try:
            obj = lookup(name)
            return obj.UUIDString(), owner_from_xml(obj.XMLDesc(0))
        except libvirt.libvirtError:
            return None

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
        if dom.isActive():
            call(f"power off domain {name}", dom.destroy)
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        # A UEFI guest's NVRAM file goes with it; only such guests get the flag, which some
        # drivers (libvirt's test driver) do not know.
        if "<nvram" in call(f"read domain {name}", dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE):
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
        pool = self._pool_obj(name)
        if not pool.isActive():
            call(f"start pool {name}", pool.create, 0)

    def set_pool_autostart(self, name: str, on: bool) -> None:
        call(f"set autostart of pool {name}", self._pool_obj(name).setAutostart, int(on))

    def delete_pool(self, name: str, remove_directory: bool = True) -> None:
        pool = self._pool_obj(name)
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
                call(f"upload into volume {name}", stream.send, chunk)
            call(f"finish upload into volume {name}", stream.finish)
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise

    def _download(self, vol: Any) -> bytes:
        stream = self.conn.newStream(0)
        data = bytearray()
        try:
            vol.download(stream, 0, 0, 0)
            while chunk := stream.recv(65536):
                if isinstance(chunk, int):  # -2: would block; not used with a blocking stream
                    break
                data += chunk
            stream.finish()
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
        return bytes(data)

    def write_record(self, pool: str, record: OwnershipRecord) -> None:
        """Store a project's ownership record as a small volume inside the pool it describes."""
        name = f"{RECORD_PREFIX}{record.project}.json"
        data = record.to_json()
        pool_obj = self._pool_obj(pool)
        with contextlib.suppress(libvirt.libvirtError):
            pool_obj.storageVolLookupByName(name).delete(0)
        if not record.owns_pool and not record.volumes:
            return
        xml = volume_xml(VolumeSpec(pool, name, len(data), "raw", allocation_bytes=len(data)))
        call(f"write ownership record in pool {pool}", pool_obj.createXML, xml, 0)
        self.upload(pool, name, iter([data]), len(data))

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
