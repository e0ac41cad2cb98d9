"""Stage 3: validated model -> libvirt XML, through the Jinja templates in templates/.

Autoescaping is on and undefined names are errors, so a manifest value can never change the
structure of the XML it lands in. No XML is built any other way.
"""

from __future__ import annotations

import string
import weakref
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Iterator

import jinja2

from .errors import RenderError
from .model import Disk, Image, ManifestSet, Network, Resource, StoragePool, VirtualMachine
from .seed import SeedContent, seed_content

NAMESPACE = "https://kvmctl.dev/xmlns/resource/v1"
SPARE_HOTPLUG_PORTS = 4


@dataclass(frozen=True)
class Rendered:
    """The desired libvirt XML of one object."""

    kind: str
    name: str
    xml: str


@dataclass(frozen=True)
class VolumeSpec:
    pool: str
    name: str
    capacity: int
    format: str
    backing_path: str | None = None
    backing_format: str | None = None
    allocation: int | None = None


@dataclass(frozen=True)
class SeedSpec:
    pool: str
    volume: str
    target: str
    content: SeedContent

    @property
    def digest(self) -> str:
        return self.content.digest()


@dataclass(frozen=True)
class _DiskDevice:
    pool: str
    volume: str
    format: str
    target: str
    bus: str
    readonly: bool
    shareable: bool


# (kind, name) -> object per live ManifestSet: ManifestSet.find is a linear scan, and rendering
# a set looks objects up once per VM disk and NIC. Keyed by id (hashing a frozen ManifestSet
# hashes every object in it); the weak reference drops the entry with the set.
_INDEXES: dict[int, tuple["weakref.ref[ManifestSet]", dict[tuple[str, str], Resource]]] = {}


def _find(m: ManifestSet, kind: str, name: str) -> Resource | None:
    key = id(m)
    entry = _INDEXES.get(key)
    if entry is None or entry[0]() is not m:
        index: dict[tuple[str, str], Resource] = {}
        for obj in m.all():
            index.setdefault((obj.meta.kind, obj.meta.name), obj)
        entry = (weakref.ref(m, lambda _, key=key: _INDEXES.pop(key, None)), index)
        _INDEXES[key] = entry
    return entry[1].get((kind, name))


def _load_template(name: str) -> str:
    try:
        return resources.files("kvmctl.templates").joinpath(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise RenderError(f"template {name} is missing from the installation: {exc}") from None


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FunctionLoader(_load_template), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_template(name: str, **values: Any) -> str:
    try:
        return environment().get_template(name).render(namespace=NAMESPACE, **values)
    except jinja2.TemplateError as exc:
        raise RenderError(f"cannot render {name}: {exc}") from None


def volume_name(name: str, fmt: str) -> str:
    return f"{name}.{fmt}"


def seed_volume_name(vm_name: str) -> str:
    return f"{vm_name}-cidata.iso"


def _targets(prefix: str) -> Iterator[str]:
    for letter in string.ascii_lowercase:
        yield prefix + letter
    for first in string.ascii_lowercase:
        for second in string.ascii_lowercase:
            yield prefix + first + second


def _disk_devices(vm: VirtualMachine, m: ManifestSet) -> list[_DiskDevice]:
    virtio, sd = _targets("vd"), _targets("sd")
    devices = []
    for att in vm.disks:
        disk = _find(m, "Disk", att.disk)
        if not isinstance(disk, Disk):
            raise RenderError(f"VirtualMachine {vm.meta.name}: Disk {att.disk} is not defined")
        target = next(virtio) if att.bus == "virtio" else next(sd)
        devices.append(_DiskDevice(disk.pool, volume_name(disk.meta.name, disk.format),
                                   disk.format, target, att.bus, att.readonly, disk.shareable))
    return devices


def seed_pool(vm: VirtualMachine, m: ManifestSet) -> str | None:
    """Where a VM's cloud-init seed lives: the pool of its first disk, else the first pool."""
    for att in vm.disks:
        disk = _find(m, "Disk", att.disk)
        if isinstance(disk, Disk):
            return disk.pool
    return m.pools[0].meta.name if m.pools else None


def seed_spec(vm: VirtualMachine, m: ManifestSet) -> SeedSpec | None:
    ci = vm.cloud_init
    if ci is None:
        return None
    pool = seed_pool(vm, m)
    if pool is None:
        raise RenderError(f"VirtualMachine {vm.meta.name}: cloudInit needs a StoragePool")
    used = sum(1 for att in vm.disks if att.bus != "virtio")
    target = list(_targets_upto("sd", used + 1))[-1]
    content = seed_content_of(vm)
    return SeedSpec(pool, seed_volume_name(vm.meta.name), target, content)


# Seed content by (VM name, repr of its cloudInit): `validate` builds it to check it and
# rendering builds it again, and serializing user-data is the slowest step of both. Equal reprs
# of plain YAML values mean equal values in the same key order, hence the same content.
_SEED_CACHE: dict[tuple[str, str], SeedContent] = {}
_SEED_CACHE_SIZE = 4096


def seed_content_of(vm: VirtualMachine) -> SeedContent:
    """The cloud-init seed content of `vm` (which must have cloudInit); raises SeedError."""
    ci = vm.cloud_init
    assert ci is not None
    key = (vm.meta.name, repr(ci))
    content = _SEED_CACHE.get(key)
    if content is None:
        content = seed_content(vm.meta.name, ci.hostname, ci.user_data, ci.network_config,
                               list(ci.ssh_authorized_keys), ci.instance_id)
        if len(_SEED_CACHE) >= _SEED_CACHE_SIZE:
            _SEED_CACHE.clear()
        _SEED_CACHE[key] = content
    return content


def _targets_upto(prefix: str, count: int) -> Iterator[str]:
    names = _targets(prefix)
    for _ in range(count):
        yield next(names)


def domain_xml(vm: VirtualMachine, m: ManifestSet, project: str, domain_type: str,
               uuid: str | None = None) -> str:
    disks = _disk_devices(vm, m)
    seed = seed_spec(vm, m)
    needs_scsi = seed is not None or any(d.bus == "scsi" for d in disks)
    pcie = vm.machine == "q35"
    spare = (len(disks) + len(vm.interfaces) + 6 + SPARE_HOTPLUG_PORTS) if pcie else 0
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


def pool_xml(pool: StoragePool) -> str:
    return render_template("pool.xml.j2", pool=pool)


def volume_xml(volume: VolumeSpec) -> str:
    return render_template("volume.xml.j2", volume=volume)


def disk_volume(disk: Disk, m: ManifestSet, image_path: str | None = None) -> VolumeSpec:
    """The volume of a Disk; `image_path` is where its Image's volume lives on the host."""
    image = _find(m, "Image", disk.image) if disk.image else None
    if image is not None and not disk.clone:
        assert isinstance(image, Image)
        path = image_path or _image_path_guess(image, m)
        return VolumeSpec(disk.pool, volume_name(disk.meta.name, disk.format), disk.size,
                          "qcow2", path, image.format)
    return VolumeSpec(disk.pool, volume_name(disk.meta.name, disk.format), disk.size, disk.format)


def _image_path_guess(image: Image, m: ManifestSet) -> str:
    pool = _find(m, "StoragePool", image.pool)
    base = pool.path if isinstance(pool, StoragePool) else f"<pool {image.pool}>"
    return f"{base.rstrip('/')}/{volume_name(image.meta.name, image.format)}"


def image_volume(image: Image, capacity: int = 0) -> VolumeSpec:
    return VolumeSpec(image.pool, volume_name(image.meta.name, image.format), capacity,
                      image.format)


def render_all(m: ManifestSet, project: str, domain_type: str) -> list[Rendered]:
    """The XML of every object, in apply order (what `kvmctl render` prints)."""
    out = [Rendered("StoragePool", p.meta.name, pool_xml(p)) for p in m.pools]
    out += [Rendered("Image", i.meta.name, volume_xml(image_volume(i))) for i in m.images]
    out += [Rendered("Disk", d.meta.name, volume_xml(disk_volume(d, m))) for d in m.disks]
    out += [Rendered("Network", n.meta.name, network_xml(n, m, project)) for n in m.networks]
    out += [Rendered("VirtualMachine", v.meta.name, domain_xml(v, m, project, domain_type))
            for v in m.vms]
    return out
