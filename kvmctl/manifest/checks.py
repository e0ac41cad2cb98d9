"""Semantic checks: what a JSON schema cannot say about a set of manifests.

Each check is a small function returning located problems. `HostFacts` is the hook through which
the engine adds what exists on the hypervisor (objects not in the manifests, host subnets), so the
same checks run offline in `validate` and against a host in `plan`.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..errors import Problem
from ..kinds import Kind
from ..units import format_size
from .cloudinit import SeedError, seed_content_of, seed_pool
from .devices import Q35_DEVICES, Q35_ROOT_PORTS, TARGET_NAMES
from .documents import Document, JsonPath, json_path
from .model import Disk, ManifestSet, Network, Resource, VirtualMachine

DocIndex = Mapping[tuple[str, str], Document]
ObjIndex = Mapping[tuple[str, str], Resource]


@dataclass(frozen=True)
class HostFacts:
    """Names that exist on the hypervisor though not in the manifests, its subnets, and the MACs
    of its domains (by domain name)."""

    networks: frozenset[str] = frozenset()
    pools: frozenset[str] = frozenset()
    subnets: tuple[tuple[str, ipaddress.IPv4Network], ...] = ()
    domain_macs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def duplicates(documents: list[Document]) -> Iterator[Problem]:
    seen: dict[tuple[str, str], Document] = {}
    for doc in documents:
        key = (doc.kind, doc.name)
        if key in seen:
            first = seen[key].source
            yield Problem(f"duplicate {doc.kind} {doc.name!r}", doc.locate(("metadata", "name")),
                          "metadata.name", hint=f"first defined at {first}")
        else:
            seen[key] = doc


def _problem(docs: DocIndex, kind: str, name: str, path: JsonPath, message: str,
             hint: str = "") -> Problem:
    doc = docs[(kind, name)]
    return Problem(message, doc.locate(path + ("<value>",)), json_path(path), hint=hint)


def _refs(m: ManifestSet) -> Iterator[tuple[Kind, str, JsonPath, Kind, str]]:
    """(kind, name, path, target kind, target name) for every reference in the set."""
    for image in m.images:
        yield Kind.IMAGE, image.meta.name, ("spec", "pool"), Kind.POOL, image.pool
    for disk in m.disks:
        yield Kind.DISK, disk.meta.name, ("spec", "pool"), Kind.POOL, disk.pool
        if disk.image:
            yield Kind.DISK, disk.meta.name, ("spec", "image"), Kind.IMAGE, disk.image
    for vm in m.vms:
        for i, att in enumerate(vm.disks):
            yield Kind.VM, vm.meta.name, ("spec", "disks", i, "disk"), Kind.DISK, att.disk
        for i, nic in enumerate(vm.interfaces):
            if nic.network:
                yield (Kind.VM, vm.meta.name, ("spec", "interfaces", i, "network"),
                       Kind.NETWORK, nic.network)
    for snap in m.snapshots:
        yield Kind.SNAPSHOT, snap.meta.name, ("spec", "vm"), Kind.VM, snap.vm


def references(m: ManifestSet, docs: DocIndex, host: HostFacts | None) -> Iterator[Problem]:
    on_host: dict[Kind, frozenset[str]] = {
        Kind.NETWORK: host.networks if host else frozenset(),
        Kind.POOL: host.pools if host else frozenset()}
    for kind, name, path, target_kind, target in _refs(m):
        if (target_kind, target) in docs or target in on_host.get(target_kind, frozenset()):
            continue
        known = sorted(n for k, n in docs if k == target_kind)
        hint = ("defined: " + ", ".join(known)) if known else f"no {target_kind} is defined"
        yield _problem(docs, kind, name, path, f"unknown {target_kind} {target!r}", hint)


def shared_disks(m: ManifestSet, docs: DocIndex, objs: ObjIndex | None = None
                 ) -> Iterator[Problem]:
    objs = m.index if objs is None else objs
    users: dict[str, list[tuple[VirtualMachine, int]]] = defaultdict(list)
    for vm in m.vms:
        for i, att in enumerate(vm.disks):
            users[att.disk].append((vm, i))
    for disk_name, uses in users.items():
        disk = objs.get((Kind.DISK, disk_name))
        shareable = bool(disk and getattr(disk, "shareable", False))
        if len(uses) < 2 or shareable or all(vm.disks[i].readonly for vm, i in uses):
            continue
        names = ", ".join(vm.meta.name for vm, _ in uses)
        vm, i = uses[1]
        yield _problem(docs, Kind.VM, vm.meta.name, ("spec", "disks", i, "disk"),
                       f"Disk {disk_name!r} is attached to several VMs ({names})",
                       "mark it readonly on every VM, or shareable: true on the Disk")


def network_ranges(m: ManifestSet, docs: DocIndex) -> Iterator[Problem]:
    for net in m.networks:
        ip = net.ipv4
        if ip is None:
            continue
        name = net.meta.name
        if ip.gateway not in ip.network or ip.gateway in (ip.network.network_address,
                                                          ip.network.broadcast_address):
            yield _problem(docs, Kind.NETWORK, name, ("spec", "ipv4", "gateway"),
                           f"gateway {ip.gateway} is not a host address of {ip.network}")
        for which, addr in (("start", ip.dhcp_start), ("end", ip.dhcp_end)):
            if addr is not None and addr not in ip.network:
                yield _problem(docs, Kind.NETWORK, name, ("spec", "ipv4", "dhcp", which),
                               f"DHCP {which} {addr} is outside {ip.network}")
        if ip.dhcp_start and ip.dhcp_end and ip.dhcp_start > ip.dhcp_end:
            yield _problem(docs, Kind.NETWORK, name, ("spec", "ipv4", "dhcp"),
                           f"DHCP range is reversed: {ip.dhcp_start} > {ip.dhcp_end}")
        if ip.dhcp_start and ip.gateway and \
                ip.dhcp_start <= ip.gateway <= (ip.dhcp_end or ip.gateway):
            yield _problem(docs, Kind.NETWORK, name, ("spec", "ipv4", "dhcp"),
                           f"DHCP range includes the gateway {ip.gateway}")


def overlapping_subnets(m: ManifestSet, docs: DocIndex,
                        host: HostFacts | None) -> Iterator[Problem]:
    nets = [(n.meta.name, n.ipv4.network) for n in m.networks if n.ipv4]
    for i, (name, cidr) in enumerate(nets):
        for other, other_cidr in nets[:i]:
            if cidr.overlaps(other_cidr):
                yield _problem(docs, Kind.NETWORK, name, ("spec", "ipv4", "cidr"),
                               f"{cidr} overlaps {other_cidr} of Network {other!r}")
        for where, host_net in (host.subnets if host else ()):
            if where != name and cidr.overlaps(host_net):
                yield _problem(docs, Kind.NETWORK, name, ("spec", "ipv4", "cidr"),
                               f"{cidr} overlaps {host_net} of libvirt network {where!r} on the "
                               "host")


def _mac_problem(mac: str) -> str:
    if int(mac.split(":")[0], 16) & 1:
        return f"MAC {mac} is a multicast address (lowest bit of the first byte is set)"
    if mac == "00:00:00:00:00:00":
        return f"MAC {mac} is not a usable address"
    return ""


def interfaces(m: ManifestSet, docs: DocIndex, objs: ObjIndex | None = None
               ) -> Iterator[Problem]:
    objs = m.index if objs is None else objs
    macs: dict[str, str] = {}
    reserved: dict[tuple[str, str], str] = {}
    for vm in m.vms:
        name = vm.meta.name
        for i, nic in enumerate(vm.interfaces):
            path = ("spec", "interfaces", i)
            if nic.mac_given and (message := _mac_problem(nic.mac)):
                yield _problem(docs, Kind.VM, name, path + ("mac",), message)
            if nic.mac in macs:
                yield _problem(docs, Kind.VM, name, path + ("mac",),
                               f"MAC {nic.mac} is also used by {macs[nic.mac]}")
            macs.setdefault(nic.mac, f"VirtualMachine {name!r}")
            if nic.ip:
                yield from _reservation(objs, docs, vm, i, reserved)


def _reservation(objs: ObjIndex, docs: DocIndex, vm: VirtualMachine, i: int,
                 reserved: dict[tuple[str, str], str]) -> Iterator[Problem]:
    nic, name, path = vm.interfaces[i], vm.meta.name, ("spec", "interfaces", i, "ip")
    net = objs.get((Kind.NETWORK, nic.network)) if nic.network else None
    if not isinstance(net, Network) or net.ipv4 is None or net.ipv4.dhcp_start is None:
        where = f"Network {nic.network!r}" if nic.network else f"host bridge {nic.bridge!r}"
        yield _problem(docs, Kind.VM, name, path,
                       f"ip {nic.ip} needs a DHCP-capable managed network, and {where} is not one",
                       "set ipv4.dhcp on the Network, or configure the address in the guest")
        return
    ip4 = net.ipv4
    addr = ipaddress.IPv4Address(nic.ip)
    net_name = net.meta.name
    wrong = ""
    if addr not in ip4.network:
        wrong = f"is outside {ip4.network} of Network {net_name!r}"
    elif addr == ip4.gateway:
        wrong = f"is the gateway of Network {net_name!r}"
    elif addr == ip4.network.network_address and ip4.network.prefixlen < 31:
        wrong = f"is the network address of {ip4.network}"
    elif addr == ip4.network.broadcast_address and ip4.network.prefixlen < 31:
        wrong = f"is the broadcast address of {ip4.network}"
    if wrong:
        yield _problem(docs, Kind.VM, name, path, f"ip {addr} {wrong}",
                       f"use a free host address of {ip4.network} other than {ip4.gateway}")
    key = (net_name, str(addr))
    if key in reserved:
        yield _problem(docs, Kind.VM, name, path,
                       f"ip {addr} is already reserved for {reserved[key]}")
    reserved.setdefault(key, f"VirtualMachine {name!r}")


def limits(m: ManifestSet, docs: DocIndex) -> Iterator[Problem]:
    for vm in m.vms:
        if vm.max_vcpus < vm.vcpus:
            yield _problem(docs, Kind.VM, vm.meta.name, ("spec", "cpus", "max"),
                           f"cpus.max ({vm.max_vcpus}) is smaller than cpus.count ({vm.vcpus})")
        if vm.max_memory_bytes < vm.memory_bytes:
            yield _problem(docs, Kind.VM, vm.meta.name, ("spec", "memory", "max"),
                           f"memory.max ({format_size(vm.max_memory_bytes)}) is smaller than "
                           f"memory.size ({format_size(vm.memory_bytes)})")


def device_limits(m: ManifestSet, docs: DocIndex) -> Iterator[Problem]:
    """Disks and interfaces within the target names and the machine's buses (devices.py)."""
    for vm in m.vms:
        name = vm.meta.name
        virtio = [i for i, att in enumerate(vm.disks) if att.bus == "virtio"]
        sd = [i for i, att in enumerate(vm.disks) if att.bus != "virtio"]
        if len(virtio) > TARGET_NAMES:
            yield _problem(docs, Kind.VM, name, ("spec", "disks", virtio[TARGET_NAMES]),
                           f"too many virtio disks: {len(virtio)} (at most {TARGET_NAMES}, "
                           "vda to vdzz)", "attach some on bus sata or scsi")
        seed = 1 if vm.cloud_init is not None else 0
        if len(sd) + seed > TARGET_NAMES:
            first = sd[TARGET_NAMES - seed]
            yield _problem(docs, Kind.VM, name, ("spec", "disks", first),
                           f"too many sata and scsi disks: {len(sd)}"
                           + (" and the cloud-init seed" if seed else "")
                           + f" (at most {TARGET_NAMES} together, sda to sdzz)",
                           "attach some on bus virtio")
        devices = len(vm.disks) + len(vm.interfaces)
        if vm.machine == "q35" and devices > Q35_DEVICES:
            path: JsonPath = (("spec", "disks", Q35_DEVICES) if len(vm.disks) > Q35_DEVICES
                              else ("spec", "interfaces", Q35_DEVICES - len(vm.disks)))
            yield _problem(docs, Kind.VM, name, path,
                           f"too many disks and interfaces for machine q35: {devices} (at most "
                           f"{Q35_DEVICES})",
                           f"each gets a pcie-root-port, and the q35 root bus holds "
                           f"{Q35_ROOT_PORTS} (29 slots of 8), 10 of them for the VM's own "
                           "controllers and hot-plug; use fewer, or machine: pc")


def cloud_init(m: ManifestSet, docs: DocIndex) -> Iterator[Problem]:
    """The seed content is built here too, so that `validate` catches what `render` would."""
    if not any(vm.cloud_init for vm in m.vms):
        return
    for vm in m.vms:
        if vm.cloud_init is None:
            continue
        if seed_pool(vm, m) is None:
            yield _problem(docs, Kind.VM, vm.meta.name, ("spec", "cloudInit"),
                           "cloudInit needs a StoragePool to hold the seed, and this VM has no "
                           "disk and the manifests define no StoragePool",
                           "add a StoragePool document, or a disk to the VM")
        try:
            seed_content_of(vm)
        except SeedError as exc:
            where: JsonPath = ("spec", "cloudInit") + ((exc.field,) if exc.field else ())
            yield _problem(docs, Kind.VM, vm.meta.name, where, str(exc))


def internal_snapshot_refusal(vm: VirtualMachine, m: ManifestSet) -> str | None:
    """Why `vm` cannot hold internal snapshots as the manifests declare it (None: it can), and
    what would work. The host checks its live definition too (host/snapshots.py)."""
    if vm.firmware == "uefi":
        return ("it boots UEFI firmware (pflash): internal snapshots of such guests are "
                "unsupported (libvirt 9.2 and later refuse them); kvmctl backup works for it")
    if not vm.disks:
        return "it has no disk to hold the snapshot (give it a qcow2 Disk)"
    raw = [att.disk for att in vm.disks
           if isinstance(d := m.find(Kind.DISK, att.disk), Disk) and d.format != "qcow2"]
    if raw:
        return (f"Disk {', '.join(raw)} {'are' if len(raw) > 1 else 'is'} raw: an internal "
                "snapshot lives inside qcow2 images (format: qcow2 would work)")
    return None


def snapshots(m: ManifestSet, docs: DocIndex) -> Iterator[Problem]:
    """What libvirt 9.0 would refuse of a Snapshot or a snapshot policy, before anything runs."""
    from ..schedule import CronExpr, zone
    for snap in m.snapshots:
        vm = m.find(Kind.VM, snap.vm)
        if not isinstance(vm, VirtualMachine):
            continue  # references() names it
        name = snap.meta.name
        why = internal_snapshot_refusal(vm, m)
        if why:
            yield _problem(docs, Kind.SNAPSHOT, name, ("spec", "vm"),
                           f"VM {vm.meta.name} cannot be snapshotted: {why}")
        if snap.memory is True and vm.state == "stopped":
            yield _problem(docs, Kind.SNAPSHOT, name, ("spec", "memory"),
                           f"VM {vm.meta.name} is declared stopped: it has no memory to keep "
                           "(omit memory, or declare the VM running)")
        if snap.memory is False and vm.state == "running":
            yield _problem(docs, Kind.SNAPSHOT, name, ("spec", "memory"),
                           f"VM {vm.meta.name} runs: on libvirt 9.0 an internal snapshot of a "
                           "running guest always holds its memory (a disk-only one would be "
                           "external, which libvirt 9.0 cannot revert); omit memory, or "
                           "declare the VM stopped")
        if snap.quiesce and not vm.guest_agent:
            yield _problem(docs, Kind.SNAPSHOT, name, ("spec", "quiesce"),
                           f"quiesce freezes the guest's file systems through the QEMU guest "
                           f"agent: VM {vm.meta.name} needs guestAgent: true")
        if snap.quiesce and vm.state == "stopped":
            yield _problem(docs, Kind.SNAPSHOT, name, ("spec", "quiesce"),
                           f"VM {vm.meta.name} is declared stopped: there is nothing to freeze "
                           "(omit quiesce)")
    for vm in m.vms:
        policy = vm.snapshot_policy
        if policy is None:
            continue
        at: JsonPath = ("spec", "snapshots")
        why = internal_snapshot_refusal(vm, m)
        if why:
            yield _problem(docs, Kind.VM, vm.meta.name, at, f"a snapshot policy cannot run: {why}")
        if policy.every_s == 0:
            yield _problem(docs, Kind.VM, vm.meta.name, at + ("every",),
                           "every must be at least 1s (0 would take a snapshot on every run)")
        if policy.keep_for_s == 0:
            yield _problem(docs, Kind.VM, vm.meta.name, at + ("keepFor",),
                           "keepFor must be at least 1s (0 would remove every snapshot it took)")
        if policy.schedule is None and policy.every_s is None:
            yield _problem(docs, Kind.VM, vm.meta.name, at, "a snapshot policy needs every (an "
                           "interval: 6h, 1d) or schedule (a cron expression: 0 3 * * *)")
        if policy.schedule is not None:
            try:
                CronExpr.parse(policy.schedule)
            except ValueError as exc:
                yield _problem(docs, Kind.VM, vm.meta.name, at + ("schedule",), str(exc))
        try:
            zone(policy.timezone)
        except ValueError as exc:
            yield _problem(docs, Kind.VM, vm.meta.name, at + ("timezone",), str(exc))
        problem = policy_name_problem(policy.name, vm.meta.name, policy.timezone)
        if problem:
            yield _problem(docs, Kind.VM, vm.meta.name, at + ("name",), problem)


SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,99}$")


def policy_name(pattern: str, vm: str, when: datetime) -> str:
    """A policy snapshot's name: {vm} and strftime fields of `when` filled in."""
    return when.strftime(pattern.replace("{vm}", vm.replace("%", "%%")))


def policy_name_problem(pattern: str, vm: str, timezone: str = "UTC") -> str | None:
    leftover = re.sub(r"%[A-Za-z%]", "", pattern.replace("{vm}", ""))
    if "{" in leftover or "}" in leftover:
        return "only {vm} may stand in braces"
    if "%" in leftover:
        return "a % must start a strftime field (%Y, %m, %d, %H, %M, %S, ...)"
    from ..schedule import zone
    try:
        tz = zone(timezone)
    except ValueError:
        tz = UTC  # the timezone's own problem is reported beside this one
    sample = policy_name(pattern, vm, datetime(2026, 12, 31, 23, 59, 58, tzinfo=UTC).astimezone(tz))
    if not SNAPSHOT_NAME.match(sample) or len(sample) > 97:  # room for a -NN suffix
        return (f"gives names like {sample!r}: a snapshot name has letters, digits and "
                "_ . : + - only, at most 97 characters here, and starts with a letter or digit")
    return None


def semantic(m: ManifestSet, docs: DocIndex, host: HostFacts | None = None) -> list[Problem]:
    found: list[Problem] = []
    objs = m.index
    checks: Iterable[Iterator[Problem]] = (
        references(m, docs, host), shared_disks(m, docs, objs), network_ranges(m, docs),
        overlapping_subnets(m, docs, host), interfaces(m, docs, objs), limits(m, docs),
        device_limits(m, docs), cloud_init(m, docs), snapshots(m, docs))
    for check in checks:
        found.extend(check)
    return found
