"""Stage 2 values: the validated, typed model of a manifest set.

Built only from documents that passed the JSON schemas (see validate.py), so construction here
can trust types and apply defaults without re-checking them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import count, islice
from typing import Any

from ..errors import Location
from ..kinds import MANIFEST_KINDS, Kind
from ..schedule import parse_duration
from ..units import KIB, parse_size
from .documents import Document


@dataclass(frozen=True)
class Meta:
    kind: Kind
    name: str
    labels: tuple[tuple[str, str], ...]
    spec_hash: str
    source: Location = field(compare=False, repr=False)  # where it is written, not what

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


def volume_name(name: str, fmt: str) -> str:
    """The volume that holds an Image or a Disk: its name and format (`root.qcow2`)."""
    return f"{name}.{fmt}"


def seed_volume_name(vm_name: str) -> str:
    """The volume that holds a VM's cloud-init seed."""
    return f"{vm_name}-cidata.iso"


@dataclass(frozen=True)
class StoragePool:
    meta: Meta
    type: str
    path: str
    autostart: bool


@dataclass(frozen=True)
class Image:
    meta: Meta
    pool: str
    format: str
    url: str | None
    sha256: str | None
    path: str | None

    @property
    def source(self) -> str:
        return self.url or self.path or ""

    @property
    def volume(self) -> str:
        return volume_name(self.meta.name, self.format)


@dataclass(frozen=True)
class Disk:
    meta: Meta
    pool: str
    size_bytes: int
    format: str
    image: str | None
    clone: bool
    shareable: bool
    protect: bool

    @property
    def volume(self) -> str:
        return volume_name(self.meta.name, self.format)


@dataclass(frozen=True)
class DnsHost:
    ip: str
    hostnames: tuple[str, ...]


@dataclass(frozen=True)
class IPv4:
    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    dhcp_start: ipaddress.IPv4Address | None
    dhcp_end: ipaddress.IPv4Address | None


@dataclass(frozen=True)
class Network:
    meta: Meta
    mode: str
    bridge: str | None
    ipv4: IPv4 | None
    dns_domain: str | None
    dns_hosts: tuple[DnsHost, ...]
    mtu: int | None
    autostart: bool
    protect: bool


@dataclass(frozen=True)
class DiskAttachment:
    disk: str
    bus: str
    readonly: bool


@dataclass(frozen=True)
class Interface:
    network: str | None
    bridge: str | None
    mac: str
    mac_given: bool
    ip: str | None
    model: str
    link_state: str


@dataclass(frozen=True)
class CloudInit:
    hostname: str | None
    user_data: Any
    network_config: Any
    ssh_authorized_keys: tuple[str, ...]
    instance_id: str | None


@dataclass(frozen=True)
class Graphics:
    type: str
    listen: str


@dataclass(frozen=True)
class VirtualMachine:
    meta: Meta
    vcpus: int
    max_vcpus: int
    memory_bytes: int  # whole KiB (validation checks it)
    max_memory_bytes: int
    machine: str
    firmware: str
    domain_type: str | None
    cpu_mode: str | None
    cpu_model: str | None
    boot_order: tuple[str, ...]
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    disks: tuple[DiskAttachment, ...]
    interfaces: tuple[Interface, ...]
    cloud_init: CloudInit | None
    graphics: Graphics | None
    console_log: str | None
    guest_agent: bool
    autostart: bool
    state: str
    protect: bool
    on_restart_needed: str
    shutdown_timeout: int
    snapshot_policy: SnapshotPolicy | None = None
    keep_unmanaged: bool = False  # elements the manifests do not model stay as the host has them

    @property
    def memory_kib(self) -> int:
        return self.memory_bytes // KIB

    @property
    def max_memory_kib(self) -> int:
        return self.max_memory_bytes // KIB


@dataclass(frozen=True)
class SnapshotPolicy:
    """A VM's scheduled snapshots (spec.snapshots): exactly one of every_s and schedule."""

    every_s: float | None
    schedule: str | None
    timezone: str
    keep: int | None
    keep_for_s: float | None
    name: str
    when_stopped: bool


@dataclass(frozen=True)
class Snapshot:
    """A snapshot of a VM that should exist (immutable once taken)."""

    meta: Meta
    vm: str
    description: str
    memory: bool | None  # None: as the VM's state gives (running: with memory)
    quiesce: bool


Resource = StoragePool | Image | Disk | Network | VirtualMachine | Snapshot


@dataclass(frozen=True)
class ManifestSet:
    """Every object of one apply, by kind, in a stable order."""

    pools: tuple[StoragePool, ...] = ()
    images: tuple[Image, ...] = ()
    disks: tuple[Disk, ...] = ()
    networks: tuple[Network, ...] = ()
    vms: tuple[VirtualMachine, ...] = ()
    snapshots: tuple[Snapshot, ...] = ()

    def of_kind(self, kind: Kind) -> tuple[Resource, ...]:
        by_kind: dict[Kind, tuple[Resource, ...]] = {
            Kind.POOL: self.pools, Kind.IMAGE: self.images, Kind.DISK: self.disks,
            Kind.NETWORK: self.networks, Kind.VM: self.vms, Kind.SNAPSHOT: self.snapshots}
        return by_kind.get(kind, ())

    def all(self) -> Iterator[Resource]:
        """Every object, in kinds.ORDER."""
        for kind in MANIFEST_KINDS:
            yield from self.of_kind(kind)

    def find(self, kind: str, name: str) -> Resource | None:
        return self.index.get((kind, name))

    @staticmethod
    def union(models: Iterable[ManifestSet]) -> ManifestSet:
        """Every object of several sets once, the first of each name per kind (the hosts of a
        project: an object placed on several hosts is one document, hence one object)."""
        models = list(models)

        def each(pick: Callable[[ManifestSet], tuple[Any, ...]]) -> tuple[Any, ...]:
            seen: dict[str, Any] = {}
            for m in models:
                for o in pick(m):
                    seen.setdefault(o.meta.name, o)
            return tuple(seen.values())

        return ManifestSet(each(lambda m: m.pools), each(lambda m: m.images),
                           each(lambda m: m.disks), each(lambda m: m.networks),
                           each(lambda m: m.vms), each(lambda m: m.snapshots))

    @cached_property
    def index(self) -> dict[tuple[str, str], Resource]:
        """(kind, name) -> object, the first of duplicates; built once (the set is frozen)."""
        index: dict[tuple[str, str], Resource] = {}
        for obj in self.all():
            index.setdefault((obj.meta.kind, obj.meta.name), obj)
        return index


def spec_hash(spec: Any) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def derived_mac(vm_name: str, index: int, attempt: int = 0) -> str:
    """The `attempt`-th candidate MAC of a VM's NIC at `index`: the same on every run and every
    machine. Identity must not depend on libvirt's random choice: a redefinition, a replace, or a
    fresh CI runner gives the guest the same MAC, hence the same DHCP lease.
    """
    seed = f"kvmctl:{vm_name}:{index}" + (f":{attempt}" if attempt else "")
    digest = hashlib.sha256(seed.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def assign_macs(vms: tuple[VirtualMachine, ...],
                host_macs: Mapping[str, tuple[str, ...]]) -> tuple[VirtualMachine, ...]:
    """`vms` with a unique MAC on every NIC the manifest gives none.

    24 bits of a hash collide within a few thousand NICs, so each NIC takes the first of its
    candidates (derived_mac attempts 0, 1, ...) that nothing else uses: no MAC written in the
    manifests, no other NIC of the set, no domain on the host (`host_macs`: domain name -> its
    MACs). A VM that is defined keeps the candidate it already has, so adding or removing other
    VMs never moves a defined VM's MAC.
    """
    taken = {nic.mac for vm in vms for nic in vm.interfaces if nic.mac_given}
    on_host = {mac for macs in host_macs.values() for mac in macs}
    chosen: dict[tuple[str, int], str] = {}
    for vm in vms:  # first what defined VMs already have
        own = set(host_macs.get(vm.meta.name, ()))
        for i, nic in enumerate(vm.interfaces):
            kept = next((mac for mac in islice(_candidates(vm.meta.name, i), MAC_KEPT_LOOKUP)
                         if mac in own and mac not in taken), None) if own else None
            if not nic.mac_given and kept is not None:
                chosen[(vm.meta.name, i)] = kept
                taken.add(kept)
    for vm in vms:
        for i, nic in enumerate(vm.interfaces):
            if nic.mac_given or (vm.meta.name, i) in chosen:
                continue
            # nic.mac is the first candidate already (_interfaces): most NICs take it.
            mac = nic.mac if nic.mac not in taken and nic.mac not in on_host else next(
                m for m in _candidates(vm.meta.name, i) if m not in taken and m not in on_host)
            chosen[(vm.meta.name, i)] = mac
            taken.add(mac)
    return tuple(_with_macs(vm, chosen) for vm in vms)


def _with_macs(vm: VirtualMachine, chosen: Mapping[tuple[str, int], str]) -> VirtualMachine:
    """`vm` with the MACs chosen for its NICs; itself when they are the ones it has (nearly
    always: a NIC's first candidate is the MAC it was built with)."""
    macs = [chosen.get((vm.meta.name, i), nic.mac) for i, nic in enumerate(vm.interfaces)]
    if all(mac == nic.mac for mac, nic in zip(macs, vm.interfaces, strict=True)):
        return vm
    return replace(vm, interfaces=tuple(replace(nic, mac=mac)
                                        for mac, nic in zip(macs, vm.interfaces, strict=True)))


# How far back a defined VM's MAC is looked for among its candidates: a NIC only moves past
# its first candidate on a collision, and more than a few in a row never happen in 2^24 MACs.
MAC_KEPT_LOOKUP = 64


def _candidates(vm_name: str, index: int) -> Iterator[str]:
    return (derived_mac(vm_name, index, attempt) for attempt in count())


def _meta(doc: Document) -> Meta:
    labels = (doc.body.get("metadata") or {}).get("labels") or {}
    return Meta(Kind(doc.kind), doc.name,
                tuple(sorted((str(k), str(v)) for k, v in labels.items())),
                spec_hash(doc.body.get("spec")), doc.source)


def _pool(doc: Document, spec: dict[str, Any]) -> StoragePool:
    return StoragePool(_meta(doc), spec.get("type", "dir"), spec["path"],
                       spec.get("autostart", True))


def _image(doc: Document, spec: dict[str, Any]) -> Image:
    return Image(_meta(doc), spec["pool"], spec.get("format", "qcow2"), spec.get("url"),
                 spec.get("sha256"), spec.get("path"))


def _disk(doc: Document, spec: dict[str, Any]) -> Disk:
    return Disk(_meta(doc), spec["pool"], parse_size(spec["size"]), spec.get("format", "qcow2"),
                spec.get("image"), spec.get("clone", False), spec.get("shareable", False),
                spec.get("protect", False))


def _ipv4(spec: dict[str, Any] | None) -> IPv4 | None:
    if not spec:
        return None
    net = ipaddress.IPv4Network(spec["cidr"], strict=False)
    gateway = ipaddress.IPv4Address(spec["gateway"]) if spec.get("gateway") else net[1]
    dhcp = spec.get("dhcp") or {}
    start = ipaddress.IPv4Address(dhcp["start"]) if dhcp.get("start") else None
    end = ipaddress.IPv4Address(dhcp["end"]) if dhcp.get("end") else None
    return IPv4(net, gateway, start, end)


def _network(doc: Document, spec: dict[str, Any]) -> Network:
    dns = spec.get("dns") or {}
    hosts = tuple(DnsHost(h["ip"], tuple(h["hostnames"])) for h in dns.get("hosts", ()))
    return Network(_meta(doc), spec.get("mode", "nat"), spec.get("bridge"),
                   _ipv4(spec.get("ipv4")), dns.get("domain"), hosts, spec.get("mtu"),
                   spec.get("autostart", True), spec.get("protect", False))


def _count_and_max(value: Any, key: str, parse: Any) -> tuple[int, int]:
    if isinstance(value, dict):
        current = parse(value[key])
        return current, parse(value["max"]) if "max" in value else current
    return parse(value), parse(value)


def _interfaces(vm_name: str, items: list[dict[str, Any]]) -> tuple[Interface, ...]:
    return tuple(
        Interface(i.get("network"), i.get("bridge"),
                  (i.get("mac") or derived_mac(vm_name, n)).lower(), "mac" in i, i.get("ip"),
                  i.get("model", "virtio"), i.get("linkState", "up"))
        for n, i in enumerate(items))


def _cloud_init(spec: dict[str, Any] | None) -> CloudInit | None:
    if spec is None:
        return None
    return CloudInit(spec.get("hostname"), spec.get("userData"), spec.get("networkConfig"),
                     tuple(spec.get("sshAuthorizedKeys", ())), spec.get("instanceId"))


def _graphics(value: Any) -> Graphics | None:
    if value is None or value == "none":
        return None
    if isinstance(value, str):
        return Graphics(value, "127.0.0.1")
    return Graphics(value["type"], value.get("listen", "127.0.0.1"))


def _vm(doc: Document, spec: dict[str, Any]) -> VirtualMachine:
    vcpus, max_vcpus = _count_and_max(spec.get("cpus", 1), "count", int)
    memory, max_memory = _count_and_max(spec.get("memory", "512MiB"), "size", parse_size)
    boot = spec.get("boot") or {}
    cpu = spec.get("cpu") or {}
    return VirtualMachine(
        meta=_meta(doc), vcpus=vcpus, max_vcpus=max_vcpus, memory_bytes=memory,
        max_memory_bytes=max_memory,
        machine=spec.get("machine", "q35"), firmware=spec.get("firmware", "bios"),
        domain_type=spec.get("domainType"), cpu_mode=cpu.get("mode"), cpu_model=cpu.get("model"),
        boot_order=tuple(boot.get("order", ())), kernel=boot.get("kernel"),
        initrd=boot.get("initrd"), cmdline=boot.get("cmdline"),
        disks=tuple(DiskAttachment(d["disk"], d.get("bus", "virtio"), d.get("readonly", False))
                    for d in spec.get("disks", ())),
        interfaces=_interfaces(doc.name, spec.get("interfaces", [])),
        cloud_init=_cloud_init(spec.get("cloudInit")), graphics=_graphics(spec.get("graphics")),
        console_log=(spec.get("console") or {}).get("log"),
        guest_agent=spec.get("guestAgent", False), autostart=spec.get("autostart", False),
        state=spec.get("state", "running"), protect=spec.get("protect", False),
        on_restart_needed=spec.get("onRestartNeeded", "defer"),
        shutdown_timeout=spec.get("shutdownTimeout", 120),
        snapshot_policy=_snapshot_policy(spec.get("snapshots")),
        keep_unmanaged=spec.get("keepUnmanaged", False))


def _snapshot_policy(spec: dict[str, Any] | None) -> SnapshotPolicy | None:
    if spec is None:
        return None
    every, keep_for = spec.get("every"), spec.get("keepFor")
    return SnapshotPolicy(
        parse_duration(every) if every is not None else None, spec.get("schedule"),
        spec.get("timezone", "UTC"), spec.get("keep"),
        parse_duration(keep_for) if keep_for is not None else None,
        spec.get("name", "{vm}-auto-%Y%m%d-%H%M%S"), spec.get("whenStopped", False))


def _snapshot(doc: Document, spec: dict[str, Any]) -> Snapshot:
    return Snapshot(_meta(doc), spec["vm"], spec.get("description", ""), spec.get("memory"),
                    spec.get("quiesce", False))


_BUILDERS: dict[Kind, Callable[[Document, dict[str, Any]], Resource]] = {
    Kind.POOL: _pool, Kind.IMAGE: _image, Kind.DISK: _disk, Kind.NETWORK: _network, Kind.VM: _vm,
    Kind.SNAPSHOT: _snapshot}


def build(documents: list[Document],
          host_macs: Mapping[str, tuple[str, ...]] | None = None) -> ManifestSet:
    """The typed model of schema-valid documents (semantic checks come after, in checks.py);
    `host_macs` (domain name -> MACs on the host) keeps derived MACs unique and stable."""
    by_kind: dict[Kind, list[Any]] = {kind: [] for kind in MANIFEST_KINDS}
    for doc in documents:
        kind = Kind(doc.kind)
        by_kind[kind].append(_BUILDERS[kind](doc, doc.body.get("spec") or {}))
    return ManifestSet(pools=tuple(by_kind[Kind.POOL]), images=tuple(by_kind[Kind.IMAGE]),
                       disks=tuple(by_kind[Kind.DISK]), networks=tuple(by_kind[Kind.NETWORK]),
                       vms=assign_macs(tuple(by_kind[Kind.VM]), host_macs or {}),
                       snapshots=tuple(by_kind[Kind.SNAPSHOT]))
