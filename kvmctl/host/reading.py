"""Reading the host: every domain, network, pool and volume once (`HostReader.read`), and the
few single reads apply, `get` and `--wait` make (state, addresses, leases, identity)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import libvirt
from lxml import etree

from ..errors import HypervisorError
from ..kinds import RECORD_PREFIX, Kind
from ..units import xml_bytes
from .connection import STATES, call, each_listed
from .ownership import (
    Owner,
    OwnershipRecord,
    choose_record,
    owner_from_xml,
    parse_record_name,
    record_names,
)
from .snapshots import snapshots_of
from .state import LiveDomain, LiveNetwork, LivePool, LiveState, LiveVolume

T = TypeVar("T")


class HostReader:
    """The reading half of Hypervisor (which holds the connection)."""

    conn: Any
    interfaces_listed = False  # whether the last host_bridges() could list every interface


    def read(self) -> LiveState:
        listed = call("list domains", self.conn.listAllDomains, 0)
        # Two filtered lists instead of a state and an autostart call per domain: a domain that
        # is not active is shut off; only the active ones are asked for their exact state.
        active, autostart = ({d.UUIDString() for d in call("list domains",
                                                          self.conn.listAllDomains, flags)}
                             for flags in (libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE,
                                           libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART))
        domains = {d.name: d for d in _in_parallel(
            lambda some: list(each_listed(lambda dom: self._domain(dom, active, autostart),
                                          some)), listed)}
        domains = self._with_snapshots(domains)
        networks = {n.name: n for n in each_listed(self._network, call("list networks",
                                                                self.conn.listAllNetworks, 0))}
        pools = {p.name: p for p in each_listed(self._pool, call("list storage pools",
                                                          self.conn.listAllStoragePools, 0))}
        bridges = self.host_bridges()
        return LiveState(domains, networks, pools, bridges, self.interfaces_listed)

    def _with_snapshots(self, domains: dict[str, LiveDomain]) -> dict[str, LiveDomain]:
        """Snapshots, asked only of the domains one filtered list names as having any."""
        try:
            having = self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_HAS_SNAPSHOT)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT,
                                        libvirt.VIR_ERR_INVALID_ARG):
                return domains  # a driver without snapshots: none to lose
            # Never read as "no snapshots": a plan would then delete VMs that have some.
            raise HypervisorError(f"list the domains with snapshots: "
                                  f"{exc.get_error_message()}") from None
        out = dict(domains)
        with contextlib.suppress(HypervisorError, AttributeError):
            for dom in call("list domains", self.conn.listAllDomains,
                            libvirt.VIR_CONNECT_LIST_DOMAINS_HAS_CHECKPOINT):
                with contextlib.suppress(libvirt.libvirtError):
                    name = dom.name()
                    if name in out:
                        out[name] = dataclasses.replace(
                            out[name], checkpoints=len(dom.listAllCheckpoints(0)))
        for dom in having:
            with contextlib.suppress(libvirt.libvirtError, HypervisorError):  # gone meanwhile
                name = dom.name()
                if name in out:
                    taken = tuple(snapshots_of(dom, name))
                    out[name] = dataclasses.replace(out[name], snapshots=len(taken), taken=taken)
        return out

    def _domain(self, dom: Any, active: set[str] | None = None,
                autostart: set[str] | None = None) -> LiveDomain:
        """One domain; `active` and `autostart` (UUIDs, from filtered lists) spare two calls.

        Its name and uuid come from its XML where they can: every libvirt call, local or not,
        gives up the GIL and waits to get it back while the manifests load beside the read."""
        inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)  # each_listed names it
        name, uuid = _element_text(inactive, "name") or dom.name(), \
            _element_text(inactive, "uuid") or dom.UUIDString()
        state = STATES.get(call(f"read domain {name}", dom.state)[0], "other") \
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
        active = bool(net.isActive())
        bridge = None
        if active:
            with contextlib.suppress(libvirt.libvirtError):  # a network without a bridge
                bridge = net.bridgeName() or None
        return LiveNetwork(name, net.UUIDString(), xml, active,
                           bool(call(f"read network {name}", net.autostart)), owner_from_xml(xml),
                           bridge)

    def _pool(self, pool: Any) -> LivePool:
        name = pool.name()
        xml = call(f"read pool {name}", pool.XMLDesc, 0)
        active = bool(pool.isActive())
        path = etree.fromstring(xml.encode()).findtext("target/path") or ""
        volumes: list[LiveVolume] = []
        slots: dict[str, dict[bool, Any]] = {}  # project -> {is the next-record slot: volume}
        target_missing = False
        if active and _kvmctl_dir_pool(pool, xml):
            # libvirt lists what it saw when it last scanned the directory: files deleted or
            # added since would make a plan wrong. Only kvmctl's dir pools are refreshed (a
            # failed refresh stops a pool in libvirt; others' pools are never touched), and
            # only a directory that is gone counts as one.
            try:
                pool.refresh(0)
            except libvirt.libvirtError as exc:
                active = bool(pool.isActive())
                target_missing = not active and "No such file or directory" in str(exc)
        listed: list[Any] = []
        if active:
            try:
                listed = pool.listAllVolumes(0)
            except libvirt.libvirtError as exc:
                active = bool(pool.isActive())  # stopped by someone else since it was listed
                if active:
                    raise HypervisorError(f"list volumes of pool {name}: "
                                          f"{exc.get_error_message() or exc}") from None
        if active:
            for vol in listed:
                if vol.name().startswith(RECORD_PREFIX):
                    if found := parse_record_name(vol.name()):
                        slots.setdefault(found[0], {})[found[1]] = vol
                    continue
                volumes.extend(each_listed(lambda v: self._volume(name, v), [vol]))
        records = [r for project, vols in sorted(slots.items())
                   if (r := self._record(pool, project, vols)) is not None]
        owners = {v: o for r in records for v, o in r.volumes.items()}
        pool_owner = next((r.project for r in records if r.owns_pool), None)
        return LivePool(name, pool.UUIDString(), xml, path, active,
                        bool(call(f"read pool {name}", pool.autostart)),
                        Owner(pool_owner, Kind.POOL, name) if pool_owner else None,
                        tuple(LiveVolume(v.pool, v.name, v.path, v.capacity_bytes, v.format,
                                         v.backing_path, owners.get(v.name)) for v in volumes),
                        target_missing)

    def read_record(self, pool_name: str, project: str) -> OwnershipRecord | None:
        """One project's record in one (running) pool, read now."""
        pool = call(f"look up pool {pool_name}", self.conn.storagePoolLookupByName, pool_name)
        if not pool.isActive():
            return None
        slots: dict[bool, Any] = {}
        for vol in call(f"list volumes of pool {pool_name}", pool.listAllVolumes, 0):
            found = parse_record_name(vol.name())
            if found is not None and found[0] == project:
                slots[found[1]] = vol
        return self._record(pool, project, slots) if slots else None

    def _record(self, pool: Any, project: str, vols: dict[bool, Any]) -> OwnershipRecord | None:
        """A project's record in a pool from its listed slots (see ownership.choose_record)."""
        pending = self._download(vols[True]) if True in vols else None
        if pending is not None and (record := OwnershipRecord.from_json(pending, project)):
            return record  # the record slot is not read: it may be half rewritten
        current = self._download(vols[False]) if False in vols else None
        record = choose_record(project, current, None)
        if record is None and current is not None and pending is None:
            # A writer may have begun rewriting the record slot after the pool was listed; its
            # next record is complete by then.
            with contextlib.suppress(libvirt.libvirtError):
                late = pool.storageVolLookupByName(record_names(project)[1])
                record = choose_record(project, None, self._download(late))
        return record

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
        self.interfaces_listed = False
        with contextlib.suppress(libvirt.libvirtError):
            names.update(i.name() for i in self.conn.listAllInterfaces(0))
            self.interfaces_listed = True
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

    def agent_answers(self, domain: str, timeout: int = 2) -> bool:
        """Whether the running guest's agent answers a ping within `timeout` seconds."""
        import libvirt_qemu
        try:
            libvirt_qemu.qemuAgentCommand(self._dom(domain), '{"execute":"guest-ping"}',
                                          timeout, 0)
        except (libvirt.libvirtError, HypervisorError):
            return False
        return True

    def vcpus_live(self, name: str) -> int | None:
        """The running guest's vCPU count (None when it is not running)."""
        dom = self._dom(name)
        if not dom.isActive():
            return None
        return int(call(f"read vCPUs of domain {name}", dom.vcpusFlags,
                        libvirt.VIR_DOMAIN_AFFECT_LIVE))

    def live_xml(self, name: str) -> str:
        return str(call(f"read domain {name}", self._dom(name).XMLDesc, 0))

    def domain_state(self, name: str) -> str:
        return STATES.get(call(f"read domain {name}", self._dom(name).state)[0], "other")

    def identity(self, kind: str, name: str) -> tuple[str, Owner | None] | None:
        """(uuid, ownership mark) of the domain or network called `name`, if there is one."""
        lookup = self.conn.lookupByName if kind == Kind.VM else \
            self.conn.networkLookupByName
        try:
            obj = lookup(name)
            return obj.UUIDString(), owner_from_xml(obj.XMLDesc(0))
        except libvirt.libvirtError:
            return None

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

    def _dom(self, name: str) -> Any:
        return call(f"look up domain {name}", self.conn.lookupByName, name)


# Readers of one host's domains at once, on its one connection: libvirtd answers several calls
# of a client at a time, and while one reader waits to get the GIL back, the others' calls are
# under way. Two halve a thousand reads; more gain little on a small host.
READERS = 4
_READERS_FROM = 64  # domains; below this a single reader is as fast


def _in_parallel(read: Callable[[list[Any]], list[T]], objects: list[Any]) -> list[T]:
    """read(objects), in READERS interleaved slices at once; in the objects' order."""
    if len(objects) < _READERS_FROM:
        return read(objects)
    slices = [objects[i::READERS] for i in range(READERS)]
    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="kvmctl-read") as pool:
        done = list(pool.map(read, slices))
    ordered: list[T] = []
    for i in range(max(len(part) for part in done)):
        ordered.extend(part[i] for part in done if i < len(part))
    return ordered


def _element_text(xml: str, tag: str) -> str:
    """The text of the first `<tag>` element of a libvirt definition, which for `name` and
    `uuid` is the object's own (libvirt writes them first); "" when it holds markup or an
    entity, which the caller then asks libvirt for."""
    start = xml.find(f"<{tag}>")
    end = xml.find(f"</{tag}>", start)
    if start < 0 or end < 0:
        return ""
    text = xml[start + len(tag) + 2:end]
    return "" if "&" in text or "<" in text else text


def _kvmctl_dir_pool(pool: Any, xml: str) -> bool:
    """A dir pool that holds kvmctl ownership records (as libvirt listed it last)."""
    if not xml.lstrip().startswith(("<pool type='dir'", '<pool type="dir"')):
        return False
    with contextlib.suppress(libvirt.libvirtError):
        return any(v.name().startswith(RECORD_PREFIX) for v in pool.listAllVolumes(0))
    return False
