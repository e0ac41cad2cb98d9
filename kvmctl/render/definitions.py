"""Stage 3: validated model -> libvirt XML, through the Jinja templates in templates/.

Autoescaping is on and undefined names are errors, so a manifest value can never change the
structure of the XML it lands in. No XML is built any other way.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from ..errors import RenderError
from ..kinds import NAMESPACE, Kind, SnapshotOrigin, pool_uuid, snapshot_mark
from ..manifest.cloudinit import seed_content_of, seed_pool
from ..manifest.devices import pcie_root_ports, target_names
from ..manifest.model import (
    Disk,
    Image,
    ManifestSet,
    Network,
    Resource,
    Snapshot,
    StoragePool,
    VirtualMachine,
    seed_volume_name,
    volume_name,
)
from .specs import (
    Desired,
    DesiredSnapshot,
    DesiredVolume,
    HostHints,
    Rendered,
    SeedSpec,
    VolumeSpec,
)


@dataclass(frozen=True)
class _DiskDevice:
    pool: str
    volume: str
    format: str
    target: str
    bus: str
    readonly: bool
    shareable: bool


def _load_template(name: str) -> str:
    try:
        return resources.files("kvmctl.templates").joinpath(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise RenderError(f"template {name} is missing from the installation: {exc}") from None


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FunctionLoader(_load_template), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_template(template: str, **values: Any) -> str:
    try:
        return environment().get_template(template).render(namespace=NAMESPACE, **values)
    except jinja2.TemplateError as exc:
        raise RenderError(f"cannot render {template}: {exc}") from None


def _targets(prefix: str) -> Iterator[str]:
    return target_names(prefix)


def _next_target(names: Iterator[str], vm: VirtualMachine) -> str:
    """The next target name; validation (checks.device_limits) keeps a VM within them."""
    name = next(names, None)
    if name is None:
        raise RenderError(f"VirtualMachine {vm.meta.name}: more disks than target names")
    return name


def _disk_devices(vm: VirtualMachine, m: ManifestSet) -> list[_DiskDevice]:
    virtio, sd = _targets("vd"), _targets("sd")
    devices = []
    for att in vm.disks:
        disk = m.find(Kind.DISK, att.disk)
        if not isinstance(disk, Disk):
            raise RenderError(f"VirtualMachine {vm.meta.name}: Disk {att.disk} is not defined")
        target = _next_target(virtio if att.bus == "virtio" else sd, vm)
        devices.append(_DiskDevice(disk.pool, disk.volume,
                                   disk.format, target, att.bus, att.readonly, disk.shareable))
    return devices


def seed_spec(vm: VirtualMachine, m: ManifestSet) -> SeedSpec | None:
    ci = vm.cloud_init
    if ci is None:
        return None
    pool = seed_pool(vm, m)
    if pool is None:
        raise RenderError(f"VirtualMachine {vm.meta.name}: cloudInit needs a StoragePool")
    used = sum(1 for att in vm.disks if att.bus != "virtio")
    names = _targets("sd")
    for _ in range(used):
        next(names, None)
    target = _next_target(names, vm)
    content = seed_content_of(vm)
    return SeedSpec(pool, seed_volume_name(vm.meta.name), target, content)


# The code that turns a model value into XML besides the value itself: this module, what it
# calls, and what the templates read (the model's properties). A change to any other module
# leaves definition records valid (tests/unit/test_records.py keeps this list complete).
RENDER_MODULES = (__name__, "kvmctl.render.specs", "kvmctl.manifest.model",
                  "kvmctl.manifest.devices", "kvmctl.manifest.cloudinit", "kvmctl.kinds",
                  "kvmctl.units", "kvmctl.schedule")


@lru_cache(maxsize=1)
def _render_fingerprint() -> str:
    """The rendering code, Jinja's version and the templates."""
    digest = hashlib.sha256()
    for name in RENDER_MODULES:
        digest.update(name.encode() + b"\0" + Path(sys.modules[name].__file__ or "").read_bytes())
    digest.update(f"jinja2 {jinja2.__version__}".encode())
    folder = resources.files("kvmctl.templates")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".j2"):
            digest.update(entry.name.encode() + b"\0" + entry.read_bytes())
    return digest.hexdigest()


def domain_digest(vm: VirtualMachine, m: ManifestSet, project: str, domain_type: str) -> str:
    """A digest of everything `domain_xml` renders `vm` from but the uuid (which only the host
    gives, and which is no fact): equal digests render the same definition. The reprs of the
    model's frozen values hold every field but where in the manifests a VM is written."""
    seed = seed_spec(vm, m)
    inputs = (vm, _disk_devices(vm, m),
              None if seed is None else (seed.pool, seed.volume, seed.target, seed.digest),
              project, vm.domain_type or domain_type)
    return hashlib.sha256((_render_fingerprint() + repr(inputs)).encode()).hexdigest()


def domain_xml(vm: VirtualMachine, m: ManifestSet, project: str, domain_type: str,
               uuid: str | None = None) -> str:
    disks = _disk_devices(vm, m)
    seed = seed_spec(vm, m)
    needs_scsi = seed is not None or any(d.bus == "scsi" for d in disks)
    pcie = vm.machine == "q35"
    spare = pcie_root_ports(len(disks), len(vm.interfaces)) if pcie else 0
    return render_template("domain.xml.j2", vm=vm, disks=disks, seed=seed, project=project,
                           domain_type=vm.domain_type or domain_type, uuid=uuid,
                           needs_scsi=needs_scsi, spare_ports=spare)


@dataclass(frozen=True)
class Reservation:
    mac: str
    name: str
    ip: str


def reservations(net: Network, m: ManifestSet) -> list[Reservation]:
    found = []
    for vm in m.vms:
        named = False
        for position, nic in enumerate(vm.interfaces):
            if nic.network == net.meta.name and nic.ip:
                # libvirt refuses a second DHCP host entry with a name already in use (and
                # dnsmasq would give the name one address): a VM's further reserved NICs on the
                # same network are named after their position.
                name = f"{vm.meta.name}-{position}" if named else vm.meta.name
                found.append(Reservation(nic.mac, name, nic.ip))
                named = True
    return found


def network_xml(net: Network, m: ManifestSet, project: str, uuid: str | None = None) -> str:
    return render_template("network.xml.j2", net=net, reservations=reservations(net, m),
                           project=project, uuid=uuid)


def pool_xml(pool: StoragePool, project: str) -> str:
    return pool_definition(pool.type, pool.meta.name, pool.path,
                           pool_uuid(project, pool.meta.name))


def pool_definition(pool_type: str, name: str, path: str, uuid: str | None = None) -> str:
    """A pool over `path`; also the transient pool through which a host file is imported."""
    return render_template("pool.xml.j2", type=pool_type, name=name, path=path, uuid=uuid)


def volume_xml(volume: VolumeSpec) -> str:
    return render_template("volume.xml.j2", volume=volume)


def disk_volume(disk: Disk, m: ManifestSet, image_path: str | None = None) -> VolumeSpec:
    """The volume of a Disk; `image_path` is where its Image's volume lives on the host."""
    image = m.find(Kind.IMAGE, disk.image) if disk.image else None
    if image is not None and not disk.clone:
        assert isinstance(image, Image)
        path = image_path or _image_path_guess(image, m)
        return VolumeSpec(disk.pool, volume_name(disk.meta.name, disk.format), disk.size_bytes,
                          "qcow2", path, image.format)
    return VolumeSpec(disk.pool, volume_name(disk.meta.name, disk.format), disk.size_bytes,
                      disk.format)


def _image_path_guess(image: Image, m: ManifestSet) -> str:
    pool = m.find(Kind.POOL, image.pool)
    base = pool.path if isinstance(pool, StoragePool) else f"<pool {image.pool}>"
    return f"{base.rstrip('/')}/{volume_name(image.meta.name, image.format)}"


def image_volume(image: Image, capacity: int = 0) -> VolumeSpec:
    return VolumeSpec(image.pool, volume_name(image.meta.name, image.format), capacity,
                      image.format)


def render_all(m: ManifestSet, project: str, domain_type: str) -> list[Rendered]:
    """The XML of every object, in apply order (what `kvmctl render` prints)."""
    return [Rendered(obj.meta.kind, obj.meta.name, _definition(obj, m, project, domain_type))
            for obj in m.all()]


def _definition(obj: Resource, m: ManifestSet, project: str, domain_type: str) -> str:
    if isinstance(obj, StoragePool):
        return pool_xml(obj, project)
    if isinstance(obj, Image):
        return volume_xml(image_volume(obj))
    if isinstance(obj, Disk):
        return volume_xml(disk_volume(obj, m))
    if isinstance(obj, Network):
        return network_xml(obj, m, project)
    if isinstance(obj, Snapshot):
        return snapshot_definition(obj, m, project).xml
    return domain_xml(obj, m, project, domain_type)


def snapshot_xml(name: str, description: str, memory: bool) -> str:
    return render_template("snapshot.xml.j2", name=name, description=description,
                           memory=memory)


def snapshot_definition(snap: Snapshot, m: ManifestSet, project: str) -> DesiredSnapshot:
    """The snapshot as kvmctl takes it: with memory when its VM is declared running (unless
    it says), marked with the project and its spec's digest."""
    vm = m.find(Kind.VM, snap.vm)
    running = isinstance(vm, VirtualMachine) and vm.state == "running"
    memory = running if snap.memory is None else snap.memory
    spec = snap.meta.spec_hash[:16]
    description = snap.description.rstrip("\n")
    marked = (description + "\n" if description else "") + snapshot_mark(
        project, SnapshotOrigin.DECLARED, spec, snap.quiesce)
    return DesiredSnapshot(snap.vm, snap.meta.name, snapshot_xml(snap.meta.name, marked, memory),
                           memory, snap.quiesce, spec)


# ---- the desired state a plan compares with the host ---------------------------------------------

def render_desired(m: ManifestSet, project: str, domain_type: str,
                   hints: HostHints | None = None) -> Desired:
    """Render every object once, carrying the identity the host gives it (see HostHints)."""
    hints = hints or HostHints()
    disks = {}
    for d in m.disks:
        spec = disk_volume(d, m, _image_path(d, m, hints))
        disks[d.meta.name] = DesiredVolume(spec, volume_xml(spec))
    seeds = {vm.meta.name: seed for vm in m.vms if (seed := seed_spec(vm, m)) is not None}
    vms = {vm.meta.name: vm for vm in m.vms}
    return Desired(
        project=project,
        pools={p.meta.name: pool_xml(p, project) for p in m.pools},
        images={i.meta.name: volume_xml(image_volume(i)) for i in m.images},
        disks=disks, seeds=seeds,
        networks={n.meta.name: network_xml(n, m, project, hints.network_uuids.get(n.meta.name))
                  for n in m.networks},
        # Rendered when the planner first asks: a VM its definition record proves unchanged
        # (host/records.py) is never rendered.
        domains=_Lazy(vms, lambda v: domain_xml(v, m, project, domain_type,
                                                hints.domain_uuids.get(v.meta.name))),
        domain_digests=_Lazy(vms, lambda v: domain_digest(v, m, project, domain_type)),
        snapshots={s.meta.name: snapshot_definition(s, m, project) for s in m.snapshots})


class _Lazy(Mapping[str, str]):
    """A value for each VM by name, computed on first use and kept."""

    def __init__(self, vms: Mapping[str, VirtualMachine],
                 compute: Callable[[VirtualMachine], str]) -> None:
        self._vms, self._compute = vms, compute
        self._values: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        value = self._values.get(name)
        if value is None:
            value = self._values[name] = self._compute(self._vms[name])
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._vms)

    def __len__(self) -> int:
        return len(self._vms)


def _image_path(disk: Disk, m: ManifestSet, hints: HostHints) -> str | None:
    image = m.find(Kind.IMAGE, disk.image) if disk.image else None
    if not isinstance(image, Image):
        return None
    return hints.volume_paths.get((image.pool, image.volume))
