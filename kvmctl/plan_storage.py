"""Planning storage: pools, images, disks and cloud-init seeds."""

from __future__ import annotations

from . import render
from .model import Disk, Image, StoragePool, VirtualMachine
from .plan_context import SEED_KIND, Context, attached_to, owned_volume
from .plan_types import CREATE, LIVE, NOOP, REPLACE, Change, FieldDiff, Step
from .state import LiveVolume, fingerprint
from .units import format_size

# ---- storage pools ------------------------------------------------------------------------------

def plan_pool(ctx: Context, pool: StoragePool) -> Change:
    name = pool.meta.name
    live = ctx.live.pools.get(name)
    xml = render.pool_xml(pool)
    if live is None:
        return Change("StoragePool", name, CREATE, ("new storage pool at " + pool.path,),
                      steps=(Step("create_pool", (name, xml)),
                             Step("pool_autostart", (name, pool.autostart))))
    if not ctx.check_owner(pool.meta, live.owner):
        return Change("StoragePool", name, NOOP)
    fp = fingerprint(live.xml, live.active, live.autostart)
    fields, steps, reasons = [], [], []
    if live.path.rstrip("/") != pool.path.rstrip("/"):
        ctx.error(pool.meta, f"changing the path of a pool ({live.path} -> {pool.path}) is "
                             "not supported; define a new pool instead")
    if live.owner is None:
        steps.append(Step("claim_pool", (name,)))
        reasons.append("adopted: kvmctl takes ownership")
    if not live.active:
        steps.append(Step("start_pool", (name,)))
        fields.append(FieldDiff("active", False, True))
    if live.autostart != pool.autostart:
        steps.append(Step("pool_autostart", (name, pool.autostart)))
        fields.append(FieldDiff("autostart", live.autostart, pool.autostart))
    if not steps:
        return Change("StoragePool", name, NOOP, fingerprint=fp)
    return Change("StoragePool", name, LIVE, tuple(reasons) or ("changed live",), tuple(fields),
                  tuple(steps), fingerprint=fp)


# ---- images ---------------------------------------------------------------------------------------

def plan_image(ctx: Context, image: Image) -> Change:
    name, vol_name = image.meta.name, render.volume_name(image.meta.name, image.format)
    live = ctx.live.volume(image.pool, vol_name)
    create = (Step("import_image", (image.pool, vol_name, image.format, image.url, image.sha256,
                                    image.path, name, image.meta.spec_hash)),)
    deps = (f"StoragePool/{image.pool}",)
    if live is None:
        return Change("Image", name, CREATE, (f"import from {image.source}",), steps=create,
                      depends=deps)
    if not ctx.check_owner(image.meta, live.owner):
        return Change("Image", name, NOOP)
    fp = fingerprint(live)
    if live.owner and live.owner.spec_hash and live.owner.spec_hash != image.meta.spec_hash:
        users = [v.name for p in ctx.live.pools.values() for v in p.volumes
                 if v.backing_path == live.path]
        blocked = (f"disks still use it as their base: {', '.join(users)}" if users else None)
        return Change("Image", name, REPLACE, ("images are immutable: the source changed",),
                      (FieldDiff("source", "(previous)", image.source),), () if blocked else
                      (Step("delete_volume", (image.pool, vol_name, "Image", name)),) + create,
                      blocked=blocked, fingerprint=fp, depends=deps)
    return Change("Image", name, NOOP, fingerprint=fp, depends=deps)

# ---- disks ------------------------------------------------------------------------------------------

def _image_path(ctx: Context, disk: Disk) -> str | None:
    image = ctx.m.find("Image", disk.image) if disk.image else None
    if not isinstance(image, Image):
        return None
    live = ctx.live.volume(image.pool, render.volume_name(image.meta.name, image.format))
    return live.path if live else None


def plan_disk(ctx: Context, disk: Disk) -> Change:
    name = disk.meta.name
    spec = render.disk_volume(disk, ctx.m, _image_path(ctx, disk))
    xml = render.volume_xml(spec)
    deps = (f"StoragePool/{disk.pool}",) + ((f"Image/{disk.image}",) if disk.image else ())
    live = ctx.live.volume(disk.pool, spec.name)
    owned = owned_volume(ctx, disk.pool, "Disk", name)
    if live is None and owned is not None:  # same Disk, other format: the volume is replaced
        return _replace_disk(ctx, disk, owned, spec.name, xml, deps)
    if live is None:
        image = ctx.m.find("Image", disk.image) if disk.image else None
        base = ctx.live.volume(image.pool, render.volume_name(image.meta.name, image.format)) \
            if isinstance(image, Image) else None
        if base is not None and base.capacity > disk.size:
            ctx.error(disk.meta, f"size {format_size(disk.size)} is smaller than its Image "
                                 f"{image.meta.name} ({format_size(base.capacity)})")
        clone = ((image.pool, render.volume_name(image.meta.name, image.format))
                 if disk.clone and isinstance(image, Image) else None)
        how = f"{format_size(disk.size)} {disk.format}" + (
            f", {'copy' if disk.clone else 'overlay'} of Image {disk.image}" if disk.image else "")
        return Change("Disk", name, CREATE, (f"new disk: {how}",), steps=(
            Step("create_volume", (disk.pool, spec.name, xml, clone, "Disk", name,
                                   disk.meta.spec_hash, disk.protect, disk.size)),), depends=deps)
    if not ctx.check_owner(disk.meta, live.owner):
        return Change("Disk", name, NOOP)
    fp = fingerprint(live)
    steps: list[Step] = []
    if live.owner is None or live.owner.protect != disk.protect:
        steps.append(Step("claim_volume", (disk.pool, spec.name, "Disk", name,
                                           disk.meta.spec_hash, disk.protect)))
    if disk.size < live.capacity:
        ctx.error(disk.meta, f"shrinking a disk is refused ({format_size(live.capacity)} -> "
                             f"{format_size(disk.size)}): it would destroy data")
        return Change("Disk", name, NOOP, fingerprint=fp)
    if disk.size > live.capacity:
        attached = attached_to(ctx, disk.pool, spec.name)
        steps.append(Step("grow_volume", (disk.pool, spec.name, disk.size, tuple(attached))))
        reason = "grown in place" + (
            " and live in " + ", ".join(f"{d} ({t})" for d, t in attached) if attached else "")
        return Change("Disk", name, LIVE, (reason,), (FieldDiff(
            "size", format_size(live.capacity), format_size(disk.size)),), tuple(steps),
            fingerprint=fp, depends=deps)
    if steps:
        return Change("Disk", name, LIVE, ("ownership record updated",), (), tuple(steps),
                      fingerprint=fp, depends=deps)
    return Change("Disk", name, NOOP, fingerprint=fp, depends=deps)


def _replace_disk(ctx: Context, disk: Disk, old: LiveVolume, new_name: str, xml: str,
                  deps: tuple[str, ...]) -> Change:
    blocked = None
    if disk.protect or (old.owner and old.owner.protect):
        blocked = "the disk is protected (protect: true)"
    elif attached_to(ctx, old.pool, old.name):
        blocked = "the disk is attached to a running VM"
    steps = (Step("delete_volume", (old.pool, old.name, "Disk", disk.meta.name)),
             Step("create_volume", (disk.pool, new_name, xml, None, "Disk", disk.meta.name,
                                    disk.meta.spec_hash, disk.protect, disk.size)))
    return Change("Disk", disk.meta.name, REPLACE,
                  ("the format changed: a new empty volume replaces the old one (its data is lost)",),
                  (FieldDiff("format", old.format, disk.format),), () if blocked else steps,
                  blocked=blocked, fingerprint=fingerprint(old), depends=deps)

# ---- cloud-init seeds ---------------------------------------------------------------------------

def plan_seed(ctx: Context, vm: VirtualMachine) -> Change | None:
    seed = render.seed_spec(vm, ctx.m)
    if seed is None:
        return None
    live = ctx.live.volume(seed.pool, seed.volume)
    digest = seed.digest
    build = Step("write_seed", (seed.pool, seed.volume, vm.meta.name, digest))
    deps = (f"StoragePool/{seed.pool}",)
    if live is None:
        return Change(SEED_KIND, vm.meta.name, CREATE, ("new cloud-init seed",), steps=(build,),
                      depends=deps)
    if not ctx.check_owner(vm.meta, live.owner, f"{SEED_KIND}/{vm.meta.name}"):
        return None
    if live.owner and live.owner.spec_hash == digest:
        return Change(SEED_KIND, vm.meta.name, NOOP, fingerprint=fingerprint(live), depends=deps)
    return Change(SEED_KIND, vm.meta.name, LIVE,
                  ("cloud-init data changed: only the seed is rebuilt; the guest reads it at its "
                   "next boot",), (FieldDiff("cloudInit", "old", "new", sensitive=True),),
                  (build,), fingerprint=fingerprint(live), depends=deps)
