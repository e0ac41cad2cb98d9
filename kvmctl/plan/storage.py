"""Planning storage: pools, images, disks and cloud-init seeds."""

from __future__ import annotations

from ..host.state import LiveVolume, fingerprint, volume_fingerprint
from ..kinds import Kind, ref
from ..manifest.model import Disk, Image, StoragePool, VirtualMachine
from ..units import format_size
from .context import Context, attached_to, owned_volume, pool_owner, uuid_marked
from .snapshot import snapshot_holders, snapshot_loss
from .steps import (
    ClaimPool,
    ClaimVolume,
    CreatePool,
    CreateVolume,
    DeleteVolume,
    GrowVolume,
    ImportImage,
    SetPoolAutostart,
    StartPool,
    Step,
    VolumeOwner,
    VolumeRef,
    WriteSeed,
)
from .types import Change, ChangeClass, FieldDiff

# ---- storage pools ------------------------------------------------------------------------------

def plan_pool(ctx: Context, pool: StoragePool) -> Change:
    name = pool.meta.name
    live = ctx.live.pools.get(name)
    if live is None:
        return Change(Kind.POOL, name, ChangeClass.CREATE, ("new storage pool at " + pool.path,),
                      (FieldDiff("type", None, pool.type), FieldDiff("path", None, pool.path),
                       FieldDiff("autostart", None, pool.autostart)),
                      (CreatePool(name, ctx.desired.pools[name]),
                       SetPoolAutostart(name, pool.autostart)))
    owner = pool_owner(ctx, live)  # its record, else its uuid or its VMs (see pool_owner)
    if live.target_missing and owner is None and not ctx.opts.adopt:
        ctx.error(pool.meta, f"its directory {live.path} is gone from the host (deleted outside "
                             "libvirt), and kvmctl's ownership record with it; neither its uuid "
                             "nor a VM of this project shows it is this project's: check it, "
                             "then take it over with --adopt")
        return Change(Kind.POOL, name, ChangeClass.NOOP)
    if not ctx.check_owner(pool.meta, owner):
        return Change(Kind.POOL, name, ChangeClass.NOOP)
    fp = fingerprint(live.xml, live.active, live.autostart)
    fields: list[FieldDiff] = []
    steps: list[Step] = []
    reasons: list[str] = []
    if live.path.rstrip("/") != pool.path.rstrip("/"):
        ctx.error(pool.meta, f"changing the path of a pool ({live.path} -> {pool.path}) is "
                             "not supported; define a new pool instead")
    if live.target_missing:
        reasons.append(f"its directory {live.path} is gone from the host (deleted outside "
                       "libvirt), and the volumes in it with it: the directory is made again, "
                       "the pool started and recorded; its disks are created again, empty")
    if not live.active:  # the record is written into the pool: it must run first
        steps.append(StartPool(name))
        fields.append(FieldDiff("active", False, True))
    if live.owner is None:
        steps.append(ClaimPool(name))
        if uuid_marked(ctx, live) and not live.target_missing:
            reasons.append("created by this project (its uuid says so) but never recorded, as "
                           "an interrupted apply leaves it: kvmctl records it now")
        elif owner is None:
            reasons.append("adopted: kvmctl takes ownership")
    if live.autostart != pool.autostart:
        steps.append(SetPoolAutostart(name, pool.autostart))
        fields.append(FieldDiff("autostart", live.autostart, pool.autostart))
    if not steps:
        return Change(Kind.POOL, name, ChangeClass.NOOP, fingerprint=fp)
    return Change(Kind.POOL, name, ChangeClass.UPDATE_LIVE, tuple(reasons) or ("changed live",),
                  tuple(fields), tuple(steps), fingerprint=fp)


# ---- images --------------------------------------------------------------------------------------

def plan_image(ctx: Context, image: Image) -> Change:
    name, volume = image.meta.name, image.volume
    live = ctx.live.volume(image.pool, volume)
    owner = VolumeOwner(Kind.IMAGE, name, image.meta.spec_hash)
    create = ImportImage(image.pool, volume, image.format, owner, ctx.desired.images[name],
                         path=image.path, url=image.url, sha256=image.sha256)
    deps = (ref(Kind.POOL, image.pool),)
    if live is None:
        return Change(Kind.IMAGE, name, ChangeClass.CREATE, (f"import from {image.source}",),
                      (FieldDiff("source", None, image.source),
                       FieldDiff("format", None, image.format),
                       FieldDiff("volume", None, f"{image.pool}/{volume}")),
                      (create,), depends=deps)
    if not ctx.check_owner(image.meta, live.owner):
        return Change(Kind.IMAGE, name, ChangeClass.NOOP)
    fp = volume_fingerprint(live)
    if live.owner and live.owner.spec_hash and live.owner.spec_hash != image.meta.spec_hash:
        users = [v.name for p in ctx.live.pools.values() for v in p.volumes
                 if v.backing_path == live.path]
        blocked = (f"disks still use it as their base: {', '.join(users)}" if users else None)
        return Change(Kind.IMAGE, name, ChangeClass.REPLACE,
                      ("images are immutable: the source changed",),
                      (FieldDiff("source", "(previous)", image.source),), () if blocked else
                      (DeleteVolume(image.pool, volume), create),
                      blocked=blocked, fingerprint=fp, depends=deps)
    return Change(Kind.IMAGE, name, ChangeClass.NOOP, fingerprint=fp, depends=deps)

# ---- disks ---------------------------------------------------------------------------------------

def plan_disk(ctx: Context, disk: Disk) -> Change:
    name = disk.meta.name
    wanted = ctx.desired.disks[name]
    volume, xml = wanted.spec.name, wanted.xml
    deps = (ref(Kind.POOL, disk.pool),) + ((ref(Kind.IMAGE, disk.image),) if disk.image else ())
    live = ctx.live.volume(disk.pool, volume)
    owned = owned_volume(ctx, disk.pool, Kind.DISK, name)
    owner = VolumeOwner(Kind.DISK, name, disk.meta.spec_hash, disk.protect)
    if live is None and owned is not None:  # same Disk, other format: the volume is replaced
        return _replace_disk(ctx, disk, owned, CreateVolume(disk.pool, volume, xml, owner,
                                                            disk.size_bytes), deps)
    if live is None:
        return _create_disk(ctx, disk, CreateVolume(disk.pool, volume, xml, owner,
                                                    disk.size_bytes), deps)
    if not ctx.check_owner(disk.meta, live.owner):
        return Change(Kind.DISK, name, ChangeClass.NOOP)
    fp = volume_fingerprint(live)
    steps: list[Step] = []
    if live.owner is None or live.owner.protect != disk.protect:
        steps.append(ClaimVolume(disk.pool, volume, owner))
    if disk.size_bytes < live.capacity_bytes:
        ctx.error(disk.meta, f"shrinking a disk is refused ({format_size(live.capacity_bytes)} "
                             f"-> {format_size(disk.size_bytes)}): it would destroy data")
        return Change(Kind.DISK, name, ChangeClass.NOOP, fingerprint=fp)
    if disk.size_bytes > live.capacity_bytes:
        attached = attached_to(ctx, disk.pool, volume)
        steps.append(GrowVolume(disk.pool, volume, disk.size_bytes, tuple(attached)))
        reason = "grown in place" + (
            " and live in " + ", ".join(f"{a.domain} ({a.target})" for a in attached)
            if attached else "")
        return Change(Kind.DISK, name, ChangeClass.UPDATE_LIVE, (reason,), (FieldDiff(
            "size", format_size(live.capacity_bytes), format_size(disk.size_bytes)),),
            tuple(steps), fingerprint=fp, depends=deps)
    if steps:
        return Change(Kind.DISK, name, ChangeClass.UPDATE_LIVE, ("ownership record updated",),
                      (), tuple(steps), fingerprint=fp, depends=deps)
    return Change(Kind.DISK, name, ChangeClass.NOOP, fingerprint=fp, depends=deps)


def _create_disk(ctx: Context, disk: Disk, create: CreateVolume, deps: tuple[str, ...]) -> Change:
    image = ctx.m.find(Kind.IMAGE, disk.image) if disk.image else None
    base = ctx.live.volume(image.pool, image.volume) if isinstance(image, Image) else None
    if isinstance(image, Image) and base is not None and base.capacity_bytes > disk.size_bytes:
        ctx.error(disk.meta, f"size {format_size(disk.size_bytes)} is smaller than its Image "
                             f"{image.meta.name} ({format_size(base.capacity_bytes)})")
    if disk.clone and isinstance(image, Image):
        create = CreateVolume(create.pool, create.volume, create.xml, create.owner,
                              create.size_bytes, VolumeRef(image.pool, image.volume))
    how = f"{format_size(disk.size_bytes)} {disk.format}" + (
        f", {'copy' if disk.clone else 'overlay'} of Image {disk.image}" if disk.image else "")
    fields = [FieldDiff("size", None, format_size(disk.size_bytes)),
              FieldDiff("format", None, disk.format),
              FieldDiff("volume", None, f"{disk.pool}/{create.volume}")]
    if disk.image:
        how_made = "copy" if disk.clone else "overlay"
        fields.append(FieldDiff("image", None, f"{disk.image} ({how_made})"))
    return Change(Kind.DISK, disk.meta.name, ChangeClass.CREATE, (f"new disk: {how}",),
                  tuple(fields), (create,), depends=deps)


def _replace_disk(ctx: Context, disk: Disk, old: LiveVolume, create: CreateVolume,
                  deps: tuple[str, ...]) -> Change:
    blocked = None
    if disk.protect or (old.owner and old.owner.protect):
        blocked = "the disk is protected (protect: true)"
    elif attached_to(ctx, old.pool, old.name):
        blocked = "the disk is attached to a running VM"
    elif not ctx.opts.allow_snapshot_loss and (holders := snapshot_holders(ctx, old.pool,
                                                                          old.name)):
        blocked = "VM " + ", ".join(vm for vm, _ in holders) + " " + snapshot_loss(
            sum(n for _, n in holders), "replacing the volume that holds them")
    steps = (DeleteVolume(old.pool, old.name), create)
    return Change(Kind.DISK, disk.meta.name, ChangeClass.REPLACE,
                  ("the format changed: a new empty volume replaces the old one (its data is "
                   "lost)",),
                  (FieldDiff("format", old.format, disk.format),), () if blocked else steps,
                  blocked=blocked, fingerprint=volume_fingerprint(old), depends=deps)

# ---- cloud-init seeds ---------------------------------------------------------------------------

def plan_seed(ctx: Context, vm: VirtualMachine) -> Change | None:
    name = vm.meta.name
    seed = ctx.desired.seeds.get(name)
    if seed is None:
        return None
    live = ctx.live.volume(seed.pool, seed.volume)
    digest = seed.digest
    build = WriteSeed(seed.pool, seed.volume, VolumeOwner(Kind.SEED, name, digest), seed.content)
    deps = (ref(Kind.POOL, seed.pool),)
    if live is None:
        return Change(Kind.SEED, name, ChangeClass.CREATE, ("new cloud-init seed",),
                      steps=(build,), depends=deps)
    if not ctx.check_owner(vm.meta, live.owner, ref(Kind.SEED, name)):
        return None
    if live.owner and live.owner.spec_hash == digest:
        return Change(Kind.SEED, name, ChangeClass.NOOP, fingerprint=volume_fingerprint(live),
                      depends=deps)
    return Change(Kind.SEED, name, ChangeClass.UPDATE_LIVE,
                  ("cloud-init data changed: only the seed is rebuilt; the guest reads it at its "
                   "next boot",), (FieldDiff("cloudInit", "old", "new", sensitive=True),),
                  (build,), fingerprint=volume_fingerprint(live), depends=deps)
