"""Running typed steps against the hypervisor: one handler per step type.

The planner put everything a step needs into it (XML, sizes, elements); handlers parse nothing.
Ownership records are kept per pool, under a lock, so parallel changes never lose a claim.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from ..errors import ApplyError, HypervisorError, KvmctlError
from ..host.hypervisor import Hypervisor
from ..host.ownership import Owner, OwnershipRecord
from ..host.state import LiveState
from ..kinds import Kind
from ..plan import steps as s
from ..plan.xmledit import with_uuid
from ..render.definitions import volume_xml
from ..render.iso import build_seed_iso
from ..render.specs import VolumeSpec
from ..units import format_size
from .download import chunks, download

SEED_CAPACITY = 1024 * 1024  # seeds are padded to whole MiB
NIC_RELEASE_TIMEOUT_S = 20


class Executor:
    """Runs steps for one project on one hypervisor; safe to call from several threads."""

    def __init__(self, hv: Hypervisor, live: LiveState, project: str) -> None:
        self.hv, self.project = hv, project
        self._lock = threading.Lock()
        self._network_lock = threading.Lock()
        self._records: dict[str, OwnershipRecord] = {}
        for name, pool in live.pools.items():
            if not pool.active:  # its records were not read: they are read when first needed
                continue
            owned = {v.name: v.owner for v in pool.volumes
                     if v.owner is not None and v.owner.project == project}
            owns = pool.owner is not None and pool.owner.project == project
            self._records[name] = OwnershipRecord(project, owns, owned)
        # A handler's result is ignored (shutdown_domain's says whether the shutdown was graceful).
        self._handlers: dict[type, Callable[[Any], object]] = {
            s.CreatePool: self.create_pool, s.StartPool: lambda st: hv.start_pool(st.name),
            s.SetPoolAutostart: lambda st: hv.set_pool_autostart(st.name, st.on),
            s.ClaimPool: lambda st: self._update_record(st.name, None, None, owns_pool=True),
            s.DeletePool: self.delete_pool,
            s.CreateVolume: self.create_volume, s.ClaimVolume: self.claim_volume,
            s.GrowVolume: self.grow_volume, s.DeleteVolume: self.delete_volume,
            s.ImportImage: self.import_image, s.WriteSeed: self.write_seed,
            s.DefineNetwork: self.define_network, s.StartNetwork: self.start_network,
            s.SetNetworkAutostart: lambda st: hv.set_network_autostart(st.name, st.on),
            s.DeleteNetwork: lambda st: hv.delete_network(st.name),
            s.RestartNetwork: self.restart_network,
            s.UpdateNetwork: lambda st: hv.update_network(st.name, str(st.command),
                                                          str(st.section), st.xml),
            s.ReplugNic: self.replug_nic,
            s.DefineDomain: self.define_domain,
            s.SetDomainAutostart: lambda st: hv.set_domain_autostart(st.name, st.on),
            s.StartDomain: self.start_domain,
            s.ShutdownDomain: self.shutdown_domain,
            s.RestartDomain: self.restart_domain, s.DeleteDomain: self.delete_domain,
            s.SetVcpusLive: self.set_vcpus_live,
            s.SetMemoryLive: lambda st: hv.set_memory_live(st.name, st.kib),
            s.SetMetadataLive: lambda st: hv.set_metadata_live(st.name, st.xml),
            s.AttachDevice: lambda st: hv.attach_device_live(st.name, st.xml),
            s.DetachDevice: lambda st: hv.detach_device_live(st.name, st.xml),
            s.UpdateDevice: lambda st: hv.update_device_live(st.name, st.xml),
            s.CreateSnapshot: self.create_snapshot,
            s.DeleteSnapshot: lambda st: hv.delete_snapshot(st.vm, st.name),
        }
        missing = set(s.STEP_TYPES) - set(self._handlers)
        assert not missing, f"steps without a handler: {missing}"

    def run(self, step: s.Step) -> str:
        """Run one step; what the user should hear of it besides success ("" if nothing)."""
        note = self._handlers[type(step)](step)
        return note if isinstance(note, str) else ""

    # ---- ownership records ----
    def _update_record(self, pool: str, volume: str | None, owner: Owner | None,
                       owns_pool: bool | None = None) -> None:
        with self._lock:
            record = self._records.get(pool)
            if record is None:  # a pool that was stopped when the host was read: read it now
                record = self.hv.read_record(pool, self.project) or OwnershipRecord(
                    self.project, False, {})
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

    def _claim(self, pool: str, volume: str, owner: s.VolumeOwner) -> None:
        self._update_record(pool, volume, Owner(self.project, owner.kind, owner.name,
                                                owner.spec_hash, "", owner.protect))

    def claim_volume(self, step: s.ClaimVolume) -> None:
        self._claim(step.pool, step.volume, step.owner)

    # ---- pools ----
    def create_pool(self, step: s.CreatePool) -> None:
        """Define, build, start and claim a new pool; undone if any of it fails, because an
        unclaimed pool would look like somebody else's to the next plan."""
        self.hv.define_pool(step.name, step.xml)
        try:
            self.hv.start_pool(step.name)
            self._update_record(step.name, None, None, owns_pool=True)
        except KvmctlError:
            with contextlib.suppress(KvmctlError):
                self.hv.delete_pool(step.name, remove_directory=False)
            raise

    def delete_pool(self, step: s.DeletePool) -> None:
        self.hv.delete_pool(step.name)
        with self._lock:
            self._records.pop(step.name, None)

    # ---- volumes ----
    def create_volume(self, step: s.CreateVolume) -> None:
        clone = (step.clone_of.pool, step.clone_of.volume) if step.clone_of else None
        if clone and (base := self.hv.volume_capacity_bytes(*clone)) > step.size_bytes:
            raise ApplyError(f"{step.owner.kind} {step.owner.name}: its size "
                             f"({format_size(step.size_bytes)}) is smaller than the image it "
                             f"copies ({format_size(base)})")
        if self.hv.volume_exists(step.pool, step.volume):
            # Not this plan's to claim: somebody's volume (another project's, or one the
            # plan could not see because its pool was stopped). Claiming it would make it ours.
            raise ApplyError(f"{step.owner.kind} {step.owner.name}: volume {step.volume} already "
                             f"exists in pool {step.pool}; it was not created and not claimed "
                             "(plan again: if it is this project's, the new plan sees it)")
        self._claim(step.pool, step.volume, step.owner)
        with self._unclaim_on_failure(step.pool, step.volume):
            self.hv.create_volume(step.pool, step.volume, step.xml, clone)
        # libvirt gives a copy at least its source's size; a larger request is grown to.
        if clone and self.hv.volume_capacity_bytes(step.pool, step.volume) < step.size_bytes:
            self.hv.resize_volume(step.pool, step.volume, step.size_bytes)

    def grow_volume(self, step: s.GrowVolume) -> None:
        if not step.attached:
            self.hv.resize_volume(step.pool, step.volume, step.size_bytes)
            return
        # A running QEMU holds the image's write lock (qemu-img resize would be refused): it
        # grows the image itself, and the guest sees the new size at once.
        for use in step.attached:
            self.hv.block_resize(use.domain, use.target, step.size_bytes)

    def delete_volume(self, step: s.DeleteVolume) -> None:
        self.hv.delete_volume(step.pool, step.volume)
        self._update_record(step.pool, step.volume, None)

    def import_image(self, step: s.ImportImage) -> None:
        if step.path:
            self._claim(step.pool, step.volume, step.owner)
            with self._unclaim_on_failure(step.pool, step.volume):
                self.hv.import_host_file(step.pool, step.volume, step.xml, step.path)
            return
        if not step.url or not step.sha256:
            raise ApplyError(f"Image {step.owner.name}: neither a path nor a URL with its "
                             "sha256 to import from")
        # Download and verify first: a bad checksum leaves neither a volume nor a claim.
        with download(step.url, step.sha256) as (filename, size):
            xml = volume_xml(VolumeSpec(step.pool, step.volume, size, "raw",
                                        allocation_bytes=size))
            self._claim(step.pool, step.volume, step.owner)
            with self._unclaim_on_failure(step.pool, step.volume):
                self.hv.create_volume(step.pool, step.volume, xml)
                try:
                    self.hv.upload(step.pool, step.volume, chunks(filename), size)
                except KvmctlError:
                    self.hv.delete_volume(step.pool, step.volume)
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

    def write_seed(self, step: s.WriteSeed) -> None:
        data = build_seed_iso(step.content)
        capacity = max(SEED_CAPACITY, -(-len(data) // SEED_CAPACITY) * SEED_CAPACITY)
        # Claimed without its digest until the content is written: a kill in between leaves a
        # seed the next plan rebuilds, never one it believes holds the new content.
        self._claim(step.pool, step.volume, replace(step.owner, spec_hash=""))
        with contextlib.suppress(KvmctlError):  # not there yet
            self.hv.delete_volume(step.pool, step.volume)
        self.hv.create_volume(step.pool, step.volume,
                              volume_xml(VolumeSpec(step.pool, step.volume, capacity, "raw")))
        padded = data + b"\0" * (capacity - len(data))
        self.hv.upload(step.pool, step.volume, iter([padded]), capacity)
        self._claim(step.pool, step.volume, step.owner)

    # ---- networks ----
    # libvirt picks a free virbrN for a network without a bridge name when it is defined; two
    # defined at once can get the same one ("error creating bridge interface virbr2: File
    # exists" when the second starts). Networks are defined and started one at a time.
    def define_network(self, step: s.DefineNetwork) -> None:
        with self._network_lock:
            self._define(Kind.NETWORK, step.name, step.xml, self.hv.define_network)

    def start_network(self, step: s.StartNetwork) -> None:
        with self._network_lock:
            self.hv.start_network(step.name)

    def restart_network(self, step: s.RestartNetwork) -> None:
        with self._network_lock:
            self.hv.restart_network(step.name)

    def replug_nic(self, step: s.ReplugNic) -> None:
        """Reconnect a running guest's NIC to a network that was just created again: libvirt
        does not move its tap to the new bridge, so the NIC is unplugged and plugged back."""
        self.hv.detach_device_live(step.domain, step.nic_xml)
        deadline = time.monotonic() + NIC_RELEASE_TIMEOUT_S
        while step.mac in self.hv.live_xml(step.domain):  # the guest must let go of it first
            if time.monotonic() > deadline:
                raise ApplyError(f"VirtualMachine {step.domain}: the guest did not release its "
                                 f"NIC {step.mac} within {NIC_RELEASE_TIMEOUT_S} s; restart it "
                                 "to reconnect it")
            time.sleep(0.2)
        self.hv.attach_device_live(step.domain, step.plug_xml)

    # ---- domains ----
    def _define(self, kind: Kind, name: str, xml: str,
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
            define(name, with_uuid(xml, found[0]))

    def define_domain(self, step: s.DefineDomain) -> None:
        self._define(Kind.VM, step.name, step.xml, self.hv.define_domain)
        if step.digest and step.rendered:
            self.upkeep(s.RecordDefinition(step.name, step.xml, step.digest, step.rendered))

    def upkeep(self, step: s.RecordDefinition) -> None:
        """A record is only a shortcut for later plans (without it they compare in full), so
        writing one never fails an apply."""
        with contextlib.suppress(KvmctlError):
            self.hv.record_definition(step.name, step.digest, step.rendered, step.xml)

    def set_vcpus_live(self, step: s.SetVcpusLive) -> str:
        """Hot-plug or unplug vCPUs. The guest must release unplugged ones and may not (libvirt
        gives up waiting): the definition already has the new count, so the change is done and
        the running guest keeps its vCPUs until its next restart, which the next plan shows as
        pending."""
        running = self.hv.vcpus_live(step.name)
        try:
            self.hv.set_vcpus_live(step.name, step.count)
        except HypervisorError as exc:
            if running is None or step.count >= running:
                raise
            return (f"the guest did not release vCPUs ({exc}); it keeps {running} until its "
                    f"next restart, its definition has {step.count}")
        return ""

    def start_domain(self, step: s.StartDomain) -> None:
        if self.hv.domain_state(step.name) != "running":
            self.hv.start_domain(step.name)

    def shutdown_domain(self, step: s.ShutdownDomain) -> str:
        return self._shut_down(step.name, step.timeout_s)

    def restart_domain(self, step: s.RestartDomain) -> str:
        note = self._shut_down(step.name, step.timeout_s)
        self.hv.start_domain(step.name)
        return note

    def delete_domain(self, step: s.DeleteDomain) -> str:
        note = self._shut_down(step.name, step.timeout_s)
        self.hv.undefine_domain(step.name)
        return note

    def create_snapshot(self, step: s.CreateSnapshot) -> None:
        state = self.hv.domain_state(step.vm)
        if (state == "running") != step.memory:
            raise ApplyError(
                f"Snapshot {step.name} is taken {'with' if step.memory else 'without'} the "
                f"guest's memory, so {step.vm} must be "
                f"{'running' if step.memory else 'stopped'}, and it is {state}: start or stop "
                "it (its state in the manifests), or say memory: in the Snapshot")
        self.hv.create_snapshot(step.vm, step.xml, quiesce=step.quiesce)

    def _shut_down(self, name: str, timeout_s: float) -> str:
        if self.hv.shutdown_domain(name, timeout_s):
            return ""
        return (f"{name} did not shut down within {timeout_s:g} s of the ACPI request and was "
                "powered off")

