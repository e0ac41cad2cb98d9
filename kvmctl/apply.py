"""Stage 6: run a plan's steps against the hypervisor -> result.

Changes run in dependency order (pools, images, disks and seeds, networks, VMs; deletes in the
reverse order afterwards), independent changes of one level in parallel. A failure stops later
levels; what was done stays done, and a new plan picks up from there because every object's
ownership is recorded before (volumes) or together with (domains, networks) its creation.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

from lxml import etree

from . import compare, render, seed
from .errors import ApplyError, KvmctlError
from .hypervisor import Hypervisor
from .model import ManifestSet, VirtualMachine
from .plan import SEED_KIND
from .plan_types import DELETE, Change, Plan
from .units import format_size
from .state import LiveState, OwnershipRecord, Owner

LEVELS = {"StoragePool": 0, "Image": 1, "Disk": 2, SEED_KIND: 2, "Network": 3,
          "VirtualMachine": 4}
SEED_CAPACITY = 1024 * 1024
CHUNK = 1024 * 1024

Progress = Callable[[Change, str, str], None]  # change, "start" | "done" | "failed", detail


@dataclass(frozen=True)
class ApplyResult:
    done: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failed


def levels(plan: Plan) -> list[list[Change]]:
    """Groups of changes that may run in parallel, in the order they must run."""
    todo = [c for c in plan.changes if c.steps]
    forward = [c for c in todo if c.klass != DELETE]
    backward = [c for c in todo if c.klass == DELETE]
    groups: list[list[Change]] = []
    for level in sorted({LEVELS[c.kind] for c in forward}):
        groups.append([c for c in forward if LEVELS[c.kind] == level])
    for level in sorted({LEVELS[c.kind] for c in backward}, reverse=True):
        groups.append([c for c in backward if LEVELS[c.kind] == level])
    return groups


def run(plan: Plan, hv: Hypervisor, m: ManifestSet, live: LiveState, parallelism: int = 8,
        progress: Progress | None = None) -> ApplyResult:
    executor = Executor(hv, m, live, plan.project)
    done: list[str] = []
    failed: list[tuple[str, str]] = []
    groups = levels(plan)
    for i, group in enumerate(groups):
        with ThreadPoolExecutor(max_workers=max(1, parallelism)) as pool:
            outcomes = list(pool.map(lambda c: _run_change(executor, c, progress), group))
        for change, error in zip(group, outcomes):
            (failed.append((change.ref, error)) if error else done.append(change.ref))
        if failed:
            skipped = tuple(c.ref for g in groups[i + 1:] for c in g)
            return ApplyResult(tuple(done), tuple(failed), skipped)
    return ApplyResult(tuple(done), (), ())


def _run_change(executor: "Executor", change: Change, progress: Progress | None) -> str:
    if progress:
        progress(change, "start", "")
    try:
        for step in change.steps:
            getattr(executor, step.op)(*step.args)
    except KvmctlError as exc:
        if progress:
            progress(change, "failed", str(exc))
        return str(exc)
    if progress:
        progress(change, "done", "")
    return ""


class Executor:
    """One method per step operation; ownership records are kept per pool under a lock."""

    def __init__(self, hv: Hypervisor, m: ManifestSet, live: LiveState, project: str) -> None:
        self.hv, self.m, self.project = hv, m, project
        self._lock = threading.Lock()
        self._network_lock = threading.Lock()
        self._records: dict[str, OwnershipRecord] = {}
        for name, pool in live.pools.items():
            owned = {v.name: v.owner for v in pool.volumes
                     if v.owner is not None and v.owner.project == project}
            owns = pool.owner is not None and pool.owner.project == project
            self._records[name] = OwnershipRecord(project, owns, owned)  # type: ignore[arg-type]

    # ---- ownership records ----
    def _update_record(self, pool: str, volume: str | None, owner: Owner | None,
                       owns_pool: bool | None = None) -> None:
        with self._lock:
            record = self._records.get(pool, OwnershipRecord(self.project, False, {}))
            volumes = dict(record.volumes)
            if volume is not None:
                if owner is None:
                    volumes.pop(volume, None)
                else:
                    volumes[volume] = owner
            record = OwnershipRecord(self.project, record.owns_pool if owns_pool is None
                                     else owns_pool, volumes)
            self._records[pool] = record
            self.hv.write_record(pool, record)

    def claim_pool(self, name: str) -> None:
        self._update_record(name, None, None, owns_pool=True)

    def claim_volume(self, pool: str, volume: str, kind: str, name: str, spec_hash: str,
                     protect: bool = False) -> None:
        self._update_record(pool, volume, Owner(self.project, kind, name, spec_hash, "", protect))

    # ---- pools ----
    def create_pool(self, name: str, xml: str) -> None:
        """Define, build, start and claim a new pool; undone if any of it fails, because an
        unclaimed pool would look like somebody else's to the next plan."""
        self.hv.define_pool(name, xml)
        try:
            self.hv.start_pool(name)
            self.claim_pool(name)
        except KvmctlError:
            with contextlib.suppress(KvmctlError):
                self.hv.delete_pool(name, remove_directory=False)
            raise

    def start_pool(self, name: str) -> None:
        self.hv.start_pool(name)

    def pool_autostart(self, name: str, on: bool) -> None:
        self.hv.set_pool_autostart(name, on)

    def delete_pool(self, name: str) -> None:
        self.hv.delete_pool(name)
        with self._lock:
            self._records.pop(name, None)

    # ---- volumes ----
    def create_volume(self, pool: str, volume: str, xml: str, clone: tuple[str, str] | None,
                      kind: str, name: str, spec_hash: str, protect: bool, size: int) -> None:
        if clone and (base := self.hv.volume_capacity(*clone)) > size:
            raise ApplyError(f"{kind} {name}: its size ({format_size(size)}) is smaller than "
                             f"the image it copies ({format_size(base)})")
        self.claim_volume(pool, volume, kind, name, spec_hash, protect)
        with self._unclaim_on_failure(pool, volume):
            self.hv.create_volume(pool, volume, xml, clone)
        # libvirt gives a copy at least its source's size; a larger request is grown to.
        if clone and self.hv.volume_capacity(pool, volume) < size:
            self.hv.resize_volume(pool, volume, size)

    def grow_volume(self, pool: str, volume: str, size: int,
                    attached: tuple[tuple[str, str], ...]) -> None:
        if not attached:
            self.hv.resize_volume(pool, volume, size)
            return
        # A running QEMU holds the image's write lock (qemu-img resize would be refused): it
        # grows the image itself, and the guest sees the new size at once.
        for domain, target in attached:
            self.hv.block_resize(domain, target, size)

    def delete_volume(self, pool: str, volume: str, kind: str, name: str) -> None:
        self.hv.delete_volume(pool, volume)
        self._update_record(pool, volume, None)

    def import_image(self, pool: str, volume: str, fmt: str, url: str | None,
                     sha256: str | None, path: str | None, name: str, spec_hash: str) -> None:
        spec = render.VolumeSpec(pool, volume, 0, fmt)
        if path:
            self.claim_volume(pool, volume, "Image", name, spec_hash)
            with self._unclaim_on_failure(pool, volume):
                self.hv.import_host_file(pool, volume, render.volume_xml(spec), path)
            return
        assert url and sha256
        # Download and verify first: a bad checksum leaves neither a volume nor a claim.
        with _download(url, sha256) as (filename, size):
            xml = render.volume_xml(render.VolumeSpec(pool, volume, size, "raw", allocation=size))
            self.claim_volume(pool, volume, "Image", name, spec_hash)
            with self._unclaim_on_failure(pool, volume):
                self.hv.create_volume(pool, volume, xml)
                try:
                    self.hv.upload(pool, volume, _chunks(filename), size)
                except KvmctlError:
                    self.hv.delete_volume(pool, volume)
                    raise

    @contextlib.contextmanager
    def _unclaim_on_failure(self, pool: str, volume: str) -> Iterator[None]:
        """Drop the ownership claim of a volume whose creation failed (it does not exist)."""
        try:
            yield
        except KvmctlError:
            with contextlib.suppress(KvmctlError):
                if volume not in self.hv.volume_names(pool):
                    self._update_record(pool, volume, None)
            raise

    def write_seed(self, pool: str, volume: str, vm_name: str, digest: str) -> None:
        vm = self.m.find("VirtualMachine", vm_name)
        assert isinstance(vm, VirtualMachine)
        spec = render.seed_spec(vm, self.m)
        assert spec is not None
        data = seed.build_seed_iso(spec.content)
        capacity = max(SEED_CAPACITY, -(-len(data) // SEED_CAPACITY) * SEED_CAPACITY)
        self.claim_volume(pool, volume, SEED_KIND, vm_name, digest)
        try:
            self.hv.delete_volume(pool, volume)
        except KvmctlError:
            pass  # not there yet
        xml = render.volume_xml(render.VolumeSpec(pool, volume, capacity, "raw"))
        self.hv.create_volume(pool, volume, xml)
        padded = data + b"\0" * (capacity - len(data))
        self.hv.upload(pool, volume, iter([padded]), capacity)

    # ---- networks ----
    # libvirt picks a free virbrN for a network without a bridge name when it is defined; two
    # defined at once can get the same one ("error creating bridge interface virbr2: File
    # exists" when the second starts). Networks are defined and started one at a time.
    def define_network(self, name: str, xml: str) -> None:
        with self._network_lock:
            self._define("Network", name, xml, self.hv.define_network)

    def start_network(self, name: str) -> None:
        with self._network_lock:
            self.hv.start_network(name)

    def network_autostart(self, name: str, on: bool) -> None:
        self.hv.set_network_autostart(name, on)

    def delete_network(self, name: str) -> None:
        self.hv.delete_network(name)

    def network_dhcp_host(self, name: str, command: str, xml: str, mac: str) -> None:
        hosts = etree.fromstring(xml.encode()).iterfind("ip/dhcp/host")
        host = next(h for h in hosts if h.get("mac", "").lower() == mac)
        self.hv.update_network(name, command, "dhcp-host", etree.tostring(host, encoding="unicode"))

    def network_dns_host(self, name: str, command: str, xml: str, ip: str) -> None:
        host = next(h for h in etree.fromstring(xml.encode()).iterfind("dns/host")
                    if h.get("ip") == ip)
        self.hv.update_network(name, command, "dns-host", etree.tostring(host, encoding="unicode"))

    def network_dhcp_range(self, name: str, actual: str, desired: str) -> None:
        for command, xml in (("delete", actual), ("add", desired)):
            found = etree.fromstring(xml.encode()).find("ip/dhcp/range")
            if found is not None:
                self.hv.update_network(name, command, "dhcp-range",
                                       etree.tostring(found, encoding="unicode"))

    def replug_nic(self, domain: str, nic_xml: str) -> None:
        """Reconnect a running guest's NIC to a network that was just created again: libvirt
        does not move its tap to the new bridge, so the NIC is unplugged and plugged back."""
        mac = etree.fromstring(nic_xml.encode()).find("mac").get("address")
        self.hv.detach_device_live(domain, nic_xml)
        deadline = time.monotonic() + 20
        while mac in self.hv.live_xml(domain):  # unplugging waits for the guest to let go
            if time.monotonic() > deadline:
                raise ApplyError(f"VirtualMachine {domain}: the guest did not release its NIC "
                                 f"{mac} within 20 s; restart it to reconnect it")
            time.sleep(0.2)
        self.hv.attach_device_live(domain, _plug_again(nic_xml))

    # ---- domains ----
    def define_domain(self, name: str, xml: str) -> None:
        self._define("VirtualMachine", name, xml, self.hv.define_domain)

    def _define(self, kind: str, name: str, xml: str,
                define: Callable[[str, str], None]) -> None:
        """Define an object; if creating it collides with one of this project's own, take that
        one's uuid. That happens right after an apply was killed: libvirtd may still finish the
        killed client's define after the new run has read the host."""
        try:
            define(name, xml)
        except KvmctlError:
            found = self.hv.identity(kind, name)
            owner = found[1] if found else None
            if found is None or owner is None or (owner.project, owner.kind, owner.name) != (
                    self.project, kind, name) or "<uuid>" in xml:
                raise
            define(name, compare.with_uuid(xml, found[0]))

    def domain_autostart(self, name: str, on: bool) -> None:
        self.hv.set_domain_autostart(name, on)

    def start_domain(self, name: str) -> None:
        if self.hv.domain_state(name) != "running":
            self.hv.start_domain(name)

    def shutdown_domain(self, name: str, timeout: float) -> None:
        self.hv.shutdown_domain(name, timeout)

    def restart_domain(self, name: str, timeout: float) -> None:
        self.hv.shutdown_domain(name, timeout)
        self.hv.start_domain(name)

    def delete_domain(self, name: str, timeout: float) -> None:
        self.hv.shutdown_domain(name, timeout)
        self.hv.undefine_domain(name)

    def set_vcpus_live(self, name: str, count: int) -> None:
        self.hv.set_vcpus_live(name, count)

    def set_memory_live(self, name: str, kib: int) -> None:
        self.hv.set_memory_live(name, kib)

    def set_metadata_live(self, name: str, xml: str) -> None:
        self.hv.set_metadata_live(name, xml)

    def attach_device(self, name: str, xml: str) -> None:
        self.hv.attach_device_live(name, xml)

    def detach_device(self, name: str, xml: str) -> None:
        self.hv.detach_device_live(name, xml)

    def update_device(self, name: str, xml: str) -> None:
        self.hv.update_device_live(name, xml)


class _download:
    """Fetch a URL into a temporary file, verifying its sha256; removed on exit."""

    def __init__(self, url: str, sha256: str) -> None:
        self.url, self.sha256 = url, sha256.lower()
        self.path = ""

    def __enter__(self) -> tuple[str, int]:
        digest = hashlib.sha256()
        fd, self.path = tempfile.mkstemp(prefix="kvmctl-image-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(self.url, timeout=60) as resp:
                while chunk := resp.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except OSError as exc:
            self.__exit__()
            raise ApplyError(f"cannot download {self.url}: {exc}") from None
        if digest.hexdigest() != self.sha256:
            self.__exit__()
            raise ApplyError(f"checksum mismatch for {self.url}: expected sha256 {self.sha256}, "
                             f"got {digest.hexdigest()}; nothing was imported")
        return self.path, size

    def __exit__(self, *_: object) -> None:
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)


def _chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _plug_again(nic_xml: str) -> str:
    """A live NIC definition without what belongs to its previous connection (tap device,
    alias, network port), keeping its MAC, model and PCI slot."""
    nic = etree.fromstring(nic_xml.encode())
    for tag in ("target", "alias"):
        for el in nic.findall(tag):
            nic.remove(el)
    source = nic.find("source")
    if source is not None:
        for attribute in ("portid", "bridge"):
            source.attrib.pop(attribute, None)
    return etree.tostring(nic, encoding="unicode")
