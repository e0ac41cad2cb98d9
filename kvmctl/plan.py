"""Stage 5: validated model + live state -> plan.

Pure: no libvirt, no printing. Each object kind has one planner function that compares the
desired definition with what the host has and returns one Change with its class, reasons, the
field diffs, and the steps apply.py will run. Anything that cannot be done is a PlanError here,
before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace as dc_replace

from . import compare, render
from .errors import PlanError
from .memo import Memo
from .memo import key as memo_key
from .model import Disk, Image, ManifestSet, Network, StoragePool, VirtualMachine
from .plan_types import (CREATE, DELETE, LIVE, NOOP, REPLACE, RESTART, Change, FieldDiff, Plan,
                         Step)
from .state import LiveDomain, LiveState, LiveVolume, Owner, fingerprint
from .units import format_size

SEED_KIND = "CloudInitSeed"


@dataclass(frozen=True)
class Options:
    project: str
    domain_type: str
    prune: bool = False
    prune_disks: bool = False
    adopt: bool = False
    allow_empty: bool = False
    targets: tuple[str, ...] = ()
    # With prune: only these refs (KIND/NAME) may be deleted (destroy: what its manifests name).
    scope: tuple[str, ...] = ()


class _Ctx:
    def __init__(self, m: ManifestSet, live: LiveState, opts: Options,
                 memo: Memo | None = None) -> None:
        self.m, self.live, self.opts, self.memo = m, live, opts, memo
        self.errors: list[str] = []
        # disk source -> (running domain, target dev), built on first use by _attached
        self.attachments: dict[object, list[tuple[str, str]]] | None = None

    def check_owner(self, ref: str, owner: Owner | None) -> bool:
        """True when kvmctl may change the object; records a conflict error otherwise."""
        if owner is not None and owner.project == self.opts.project:
            return True
        if owner is None and self.opts.adopt:
            return True
        if owner is None:
            self.errors.append(f"{ref} already exists on the host and is not managed by kvmctl; "
                               "rename it in the manifest, or take it over with --adopt")
        else:
            self.errors.append(f"{ref} already exists and belongs to kvmctl project "
                               f"{owner.project!r}; it is never changed from project "
                               f"{self.opts.project!r}")
        return False


def _owned_volume(ctx: _Ctx, pool: str, kind: str, name: str) -> LiveVolume | None:
    live_pool = ctx.live.pools.get(pool)
    if not live_pool:
        return None
    return next((v for v in live_pool.volumes if v.owner and v.owner.project == ctx.opts.project
                 and v.owner.kind == kind and v.owner.name == name), None)


# ---- storage pools ------------------------------------------------------------------------------

def plan_pool(ctx: _Ctx, pool: StoragePool) -> Change:
    name = pool.meta.name
    live = ctx.live.pools.get(name)
    xml = render.pool_xml(pool)
    if live is None:
        return Change("StoragePool", name, CREATE, ("new storage pool at " + pool.path,),
                      steps=(Step("create_pool", (name, xml)),
                             Step("pool_autostart", (name, pool.autostart))))
    if not ctx.check_owner(pool.meta.ref, live.owner):
        return Change("StoragePool", name, NOOP)
    fp = fingerprint(live.xml, live.active, live.autostart)
    fields, steps, reasons = [], [], []
    if live.path.rstrip("/") != pool.path.rstrip("/"):
        ctx.errors.append(f"{pool.meta.ref}: changing the path of a pool ({live.path} -> "
                          f"{pool.path}) is not supported; define a new pool instead")
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

def plan_image(ctx: _Ctx, image: Image) -> Change:
    name, vol_name = image.meta.name, render.volume_name(image.meta.name, image.format)
    live = ctx.live.volume(image.pool, vol_name)
    create = (Step("import_image", (image.pool, vol_name, image.format, image.url, image.sha256,
                                    image.path, name, image.meta.spec_hash)),)
    deps = (f"StoragePool/{image.pool}",)
    if live is None:
        return Change("Image", name, CREATE, (f"import from {image.source}",), steps=create,
                      depends=deps)
    if not ctx.check_owner(image.meta.ref, live.owner):
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

def _image_path(ctx: _Ctx, disk: Disk) -> str | None:
    image = ctx.m.find("Image", disk.image) if disk.image else None
    if not isinstance(image, Image):
        return None
    live = ctx.live.volume(image.pool, render.volume_name(image.meta.name, image.format))
    return live.path if live else None


def _attached(ctx: _Ctx, pool: str, volume: str) -> list[tuple[str, str]]:
    """(running domain, target dev) pairs that use this volume right now."""
    if ctx.attachments is None:  # every running domain is parsed once, not once per volume
        ctx.attachments = {}
        for dom in ctx.live.domains.values():
            if not dom.running:
                continue
            for key, value in compare.domain_facts(dom.live_xml or "").items():
                if key.startswith("disk:"):
                    ctx.attachments.setdefault(value[2], []).append((dom.name, key[5:]))
    return list(ctx.attachments.get((pool, volume), ()))


def plan_disk(ctx: _Ctx, disk: Disk) -> Change:
    name = disk.meta.name
    spec = render.disk_volume(disk, ctx.m, _image_path(ctx, disk))
    xml = render.volume_xml(spec)
    deps = (f"StoragePool/{disk.pool}",) + ((f"Image/{disk.image}",) if disk.image else ())
    live = ctx.live.volume(disk.pool, spec.name)
    owned = _owned_volume(ctx, disk.pool, "Disk", name)
    if live is None and owned is not None:  # same Disk, other format: the volume is replaced
        return _replace_disk(ctx, disk, owned, spec.name, xml, deps)
    if live is None:
        image = ctx.m.find("Image", disk.image) if disk.image else None
        base = ctx.live.volume(image.pool, render.volume_name(image.meta.name, image.format)) \
            if isinstance(image, Image) else None
        if base is not None and base.capacity > disk.size:
            ctx.errors.append(f"{disk.meta.ref}: size {format_size(disk.size)} is smaller than "
                              f"its Image {image.meta.name} ({format_size(base.capacity)})")
        clone = ((image.pool, render.volume_name(image.meta.name, image.format))
                 if disk.clone and isinstance(image, Image) else None)
        how = f"{format_size(disk.size)} {disk.format}" + (
            f", {'copy' if disk.clone else 'overlay'} of Image {disk.image}" if disk.image else "")
        return Change("Disk", name, CREATE, (f"new disk: {how}",), steps=(
            Step("create_volume", (disk.pool, spec.name, xml, clone, "Disk", name,
                                   disk.meta.spec_hash, disk.protect, disk.size)),), depends=deps)
    if not ctx.check_owner(disk.meta.ref, live.owner):
        return Change("Disk", name, NOOP)
    fp = fingerprint(live)
    steps: list[Step] = []
    if live.owner is None or live.owner.protect != disk.protect:
        steps.append(Step("claim_volume", (disk.pool, spec.name, "Disk", name,
                                           disk.meta.spec_hash, disk.protect)))
    if disk.size < live.capacity:
        ctx.errors.append(f"{disk.meta.ref}: shrinking a disk is refused ({format_size(live.capacity)}"
                          f" -> {format_size(disk.size)}): it would destroy data")
        return Change("Disk", name, NOOP, fingerprint=fp)
    if disk.size > live.capacity:
        attached = _attached(ctx, disk.pool, spec.name)
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


def _replace_disk(ctx: _Ctx, disk: Disk, old: LiveVolume, new_name: str, xml: str,
                  deps: tuple[str, ...]) -> Change:
    blocked = None
    if disk.protect or (old.owner and old.owner.protect):
        blocked = "the disk is protected (protect: true)"
    elif _attached(ctx, old.pool, old.name):
        blocked = "the disk is attached to a running VM"
    steps = (Step("delete_volume", (old.pool, old.name, "Disk", disk.meta.name)),
             Step("create_volume", (disk.pool, new_name, xml, None, "Disk", disk.meta.name,
                                    disk.meta.spec_hash, disk.protect, disk.size)))
    return Change("Disk", disk.meta.name, REPLACE,
                  ("the format changed: a new empty volume replaces the old one (its data is lost)",),
                  (FieldDiff("format", old.format, disk.format),), () if blocked else steps,
                  blocked=blocked, fingerprint=fingerprint(old), depends=deps)


# ---- cloud-init seeds ---------------------------------------------------------------------------

def plan_seed(ctx: _Ctx, vm: VirtualMachine) -> Change | None:
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
    if not ctx.check_owner(f"{SEED_KIND}/{vm.meta.name}", live.owner):
        return None
    if live.owner and live.owner.spec_hash == digest:
        return Change(SEED_KIND, vm.meta.name, NOOP, fingerprint=fingerprint(live), depends=deps)
    return Change(SEED_KIND, vm.meta.name, LIVE,
                  ("cloud-init data changed: only the seed is rebuilt; the guest reads it at its "
                   "next boot",), (FieldDiff("cloudInit", "old", "new", sensitive=True),),
                  (build,), fingerprint=fingerprint(live), depends=deps)


# ---- networks ---------------------------------------------------------------------------------

def plan_network(ctx: _Ctx, net: Network) -> Change:
    name = net.meta.name
    live = ctx.live.networks.get(name)
    xml = render.network_xml(net, ctx.m, ctx.opts.project, live.uuid if live else None)
    create = (Step("define_network", (name, xml)), Step("start_network", (name,)),
              Step("network_autostart", (name, net.autostart)))
    if live is None:
        return Change("Network", name, CREATE, (f"new {net.mode} network",), steps=create)
    if not ctx.check_owner(net.meta.ref, live.owner):
        return Change("Network", name, NOOP)
    fp = fingerprint(live.xml, live.active, live.autostart)
    changes = compare.network_diff(xml, live.xml)
    fields = tuple(FieldDiff(c.field, c.old, c.new) for c in changes)
    hard = [c for c in changes if c.field not in compare.NETWORK_LIVE_FIELDS]
    if hard:
        # libvirt writes attributes in single quotes: compare the parsed NIC sources.
        users = [d.name for d in ctx.live.domains.values() if d.running and any(
            k.startswith("nic:") and v[:2] == ("network", name)
            for k, v in compare.domain_facts(d.live_xml or "").items())]
        blocked = "the network is protected (protect: true)" if net.protect or (
            live.owner and live.owner.protect) else None
        reason = ("libvirt cannot change " + ", ".join(c.field for c in hard) +
                  " of an existing network: it is deleted and created again")
        if users:
            reason += "; running guests on it lose their link: " + ", ".join(users)
        return Change("Network", name, REPLACE, (reason,), fields, () if blocked else
                      (Step("delete_network", (name,)),) + create, blocked=blocked,
                      fingerprint=fp)
    steps = _network_live_steps(name, changes, xml, live.xml)
    if changes:
        steps.append(Step("define_network", (name, xml)))
    if not live.active:
        steps.append(Step("start_network", (name,)))
    if live.autostart != net.autostart:
        steps.append(Step("network_autostart", (name, net.autostart)))
        fields += (FieldDiff("autostart", live.autostart, net.autostart),)
    if not steps:
        return Change("Network", name, NOOP, fingerprint=fp)
    return Change("Network", name, LIVE, ("changed live, without restarting the network",),
                  fields, tuple(steps), fingerprint=fp)


def _network_live_steps(name: str, changes: list[compare.FactChange], desired: str,
                        actual: str) -> list[Step]:
    steps = []
    for change in changes:
        if change.field == "dhcp.hosts":
            for host in sorted(set(change.old or ()) - set(change.new or ())):
                steps.append(Step("network_dhcp_host", (name, "delete", actual, host[0])))
            for host in sorted(set(change.new or ()) - set(change.old or ())):
                steps.append(Step("network_dhcp_host", (name, "add", desired, host[0])))
        elif change.field == "dns.hosts":
            for host in sorted(set(change.old or ()) - set(change.new or ())):
                steps.append(Step("network_dns_host", (name, "delete", actual, host[0])))
            for host in sorted(set(change.new or ()) - set(change.old or ())):
                steps.append(Step("network_dns_host", (name, "add", desired, host[0])))
        elif change.field == "dhcp.range":
            steps.append(Step("network_dhcp_range", (name, actual, desired)))
    return steps


# ---- virtual machines ---------------------------------------------------------------------------

def _vm_deps(vm: VirtualMachine, m: ManifestSet) -> tuple[str, ...]:
    deps = [f"Disk/{a.disk}" for a in vm.disks]
    deps += [f"Network/{i.network}" for i in vm.interfaces if i.network]
    if vm.cloud_init:
        deps.append(f"{SEED_KIND}/{vm.meta.name}")
    return tuple(deps)


def plan_vm(ctx: _Ctx, vm: VirtualMachine) -> Change:
    name = vm.meta.name
    live = ctx.live.domains.get(name)
    xml = render.domain_xml(vm, ctx.m, ctx.opts.project, ctx.opts.domain_type,
                            live.uuid if live else None)
    deps = _vm_deps(vm, ctx.m)
    if live is None:
        steps = [Step("define_domain", (name, xml)), Step("domain_autostart", (name, vm.autostart))]
        if vm.state == "running":
            steps.append(Step("start_domain", (name,)))
        return Change("VirtualMachine", name, CREATE, (f"new VM ({vm.state})",),
                      steps=tuple(steps), depends=deps)
    if not ctx.check_owner(vm.meta.ref, live.owner):
        return Change("VirtualMachine", name, NOOP)
    return _update_vm(ctx, vm, live, xml, deps)


def _vm_differences(ctx: _Ctx, xml: str, live: LiveDomain
                    ) -> tuple[list[compare.FactChange], list[compare.FactChange], dict]:
    """Owned differences of the desired definition from the persistent and the running one.

    A definition pair already known to have none (ctx.memo) is not parsed again."""
    memo = ctx.memo
    config_key = memo_key("domain", xml, live.inactive_xml) if memo is not None else ""
    live_key = memo_key("domain", xml, live.live_xml or "") if memo is not None and \
        live.running else ""
    if memo is not None and config_key in memo and (not live_key or live_key in memo):
        return [], [], {}
    desired = compare.domain_facts(xml)
    config_changes = compare.diff(desired, compare.domain_facts(live.inactive_xml))
    live_facts = compare.domain_facts(live.live_xml or "") if live.running else {}
    live_changes = compare.diff(desired, live_facts) if live.running else []
    if memo is not None and not config_changes:
        memo.add(config_key)
    if memo is not None and live_key and not live_changes:
        memo.add(live_key)
    return config_changes, live_changes, live_facts


def _update_vm(ctx: _Ctx, vm: VirtualMachine, live: LiveDomain, xml: str,
               deps: tuple[str, ...]) -> Change:
    """`xml` is the rendered definition. It takes the current one's device addresses and
    controllers (compare.carry_identity) only when a step sends it to libvirt: those are not
    facts, so both have the same facts, and a no-op VM is spared the work."""
    name = vm.meta.name
    fp = fingerprint(live.inactive_xml, live.state, live.autostart)
    config_changes, live_changes, live_facts = _vm_differences(ctx, xml, live)
    if config_changes or live_changes:
        xml = compare.carry_identity(xml, live.inactive_xml)
    steps: list[Step] = [Step("define_domain", (name, xml))] if config_changes else []
    reasons: list[str] = []
    fields = [FieldDiff(c.field, describe(c.field, c.old), describe(c.field, c.new))
              for c in config_changes]
    pending: list[str] = []
    if live.running:
        changed_in_config = {c.field for c in config_changes}
        for c in live_changes:
            # A running guest's memory is what its balloon reports, which trails the target
            # for a while after boot: only a change of the definition is acted on.
            if c.field == "memory" and c.field not in changed_in_config:
                continue
            step = _live_step(name, c, xml, live.live_xml or "", live_facts)
            if step is None:
                pending.append(c.field)
            else:
                steps.append(step)
        if pending:
            reasons.append("takes effect at the next restart: " + ", ".join(pending))
    elif config_changes:
        reasons.append("the VM is stopped: its definition changes now")
    if live.autostart != vm.autostart:
        steps.append(Step("domain_autostart", (name, vm.autostart)))
        fields.append(FieldDiff("autostart", live.autostart, vm.autostart))
    steps += _state_steps(vm, live, bool(pending))
    if pending and vm.on_restart_needed == "fail":
        ctx.errors.append(f"{vm.meta.ref}: needs a restart ({', '.join(pending)}) and "
                          "onRestartNeeded is fail")
    if pending and vm.on_restart_needed == "restart":
        steps.append(Step("restart_domain", (name, vm.shutdown_timeout)))
        reasons.append(f"restarted now (onRestartNeeded: restart, graceful shutdown up to "
                       f"{vm.shutdown_timeout} s)")
    if not steps and not pending:
        return Change("VirtualMachine", name, NOOP, fingerprint=fp, depends=deps)
    if live.running and not reasons and steps:
        touches_guest = any(step.op not in ("define_domain", "domain_autostart")
                            for step in steps)
        reasons.append("applied to the running guest and to its definition, no restart"
                       if touches_guest else
                       "the definition changes; the running guest already has these values")
    deferred = bool(pending) and vm.on_restart_needed == "defer"
    # A restart that is only pending (nothing left to apply) is reported, but is not a change.
    klass = NOOP if not steps else (RESTART if pending else LIVE)
    return Change("VirtualMachine", name, klass, tuple(reasons), tuple(fields), tuple(steps),
                  pending_restart=deferred, fingerprint=fp, depends=deps)


def describe(field: str, value: object) -> object:
    """A domain fact as a person reads it in a plan."""
    if value is None or value == ():
        return None
    if field in ("memory", "memory.max") and isinstance(value, int):
        return format_size(value * 1024)
    if field == "metadata" and isinstance(value, tuple):
        return f"spec {value[0][:8]}" + (f", seed {value[1][:8]}" if value[1] else "")
    if field.startswith("disk:") and isinstance(value, tuple):
        device, bus, source, fmt, readonly, shareable = value
        where = "/".join(source) if isinstance(source, tuple) else source
        return f"{device} on {bus}: {where} ({fmt})" + (", readonly" if readonly else "") + (
            ", shareable" if shareable else "")
    if field.startswith("nic:") and isinstance(value, tuple):
        kind, source, model, link = value
        return f"{kind} {source}, model {model}, link {link}"
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return value


def _state_steps(vm: VirtualMachine, live: LiveDomain, restarting: bool) -> list[Step]:
    if vm.state == "running" and not live.running:
        return [Step("start_domain", (vm.meta.name,))]
    if vm.state == "stopped" and live.running:
        return [Step("shutdown_domain", (vm.meta.name, vm.shutdown_timeout))]
    return []


def _live_step(name: str, c: compare.FactChange, desired_xml: str, live_xml: str,
               live_facts: dict) -> Step | None:
    """The hot-plug or live call that makes this change on the running guest, if any."""
    if compare.domain_field_class(c) != compare.LIVE:
        return None
    if c.field == "vcpus":
        return Step("set_vcpus_live", (name, c.new)) if c.new <= live_facts["vcpus.max"] else None
    if c.field == "memory":
        return Step("set_memory_live", (name, c.new)) if c.new <= live_facts["memory.max"] \
            else None
    if c.field == "metadata":
        return Step("set_metadata_live", (name, compare.metadata_element(desired_xml)))
    if c.old is None:
        return Step("attach_device", (name, compare.device_element(desired_xml, c.field)))
    if c.new is None:
        return Step("detach_device", (name, compare.device_element(live_xml, c.field)))
    return Step("update_device", (name, compare.device_element(desired_xml, c.field)))


# ---- prune --------------------------------------------------------------------------------------

def plan_prune(ctx: _Ctx) -> list[Change]:
    project, m = ctx.opts.project, ctx.m
    wanted = {(o.meta.kind, o.meta.name) for o in m.all()}
    wanted |= {(SEED_KIND, vm.meta.name) for vm in m.vms if vm.cloud_init}
    out: list[Change] = []
    in_scope = lambda kind, name: not ctx.opts.scope or f"{kind}/{name}" in ctx.opts.scope  # noqa: E731
    for dom in ctx.live.domains.values():
        if _mine(dom.owner, project) and ("VirtualMachine", dom.name) not in wanted \
                and in_scope("VirtualMachine", dom.name):
            out.append(_delete(dom.owner, "VirtualMachine", dom.name,
                               Step("delete_domain", (dom.name, 60)),
                               fingerprint(dom.inactive_xml, dom.state)))
    for net in ctx.live.networks.values():
        if _mine(net.owner, project) and ("Network", net.name) not in wanted \
                and in_scope("Network", net.name):
            out.append(_delete(net.owner, "Network", net.name,
                               Step("delete_network", (net.name,)), fingerprint(net.xml)))
    # VMs this plan deletes (before any volume) do not keep their disks in use.
    leaving = {c.name for c in out if c.kind == "VirtualMachine" and c.steps}
    doomed = [vol for pool in ctx.live.pools.values() for vol in pool.volumes
              if _mine(vol.owner, project) and (vol.owner.kind, vol.owner.name) not in wanted
              and in_scope(vol.owner.kind, vol.owner.name)]
    # Images last: a disk deleted by this same plan no longer keeps its base image.
    going: set[str] = set()
    decided: dict[str, Change] = {}
    for vol in sorted(doomed, key=lambda v: v.owner.kind == "Image"):  # type: ignore[union-attr]
        decided[vol.path] = _prune_volume(ctx, vol, going, leaving)
        if decided[vol.path].steps:
            going.add(vol.path)
    for pool in ctx.live.pools.values():
        out += [decided[vol.path] for vol in pool.volumes if vol.path in decided]
        if _mine(pool.owner, project) and ("StoragePool", pool.name) not in wanted \
                and in_scope("StoragePool", pool.name):
            out.append(_prune_pool(ctx, pool, going))
    return out


def _mine(owner: Owner | None, project: str) -> bool:
    return owner is not None and owner.project == project


def _delete(owner: Owner | None, kind: str, name: str, step: Step, fp: str,
            blocked: str | None = None) -> Change:
    if owner is not None and owner.protect:
        blocked = "protected (protect: true)"
    return Change(kind, name, DELETE, ("owned by this project and no longer in the manifests",),
                  steps=() if blocked else (step,), blocked=blocked, fingerprint=fp)


def _prune_volume(ctx: _Ctx, vol: LiveVolume, going: set[str],
                  leaving: set[str] | frozenset[str] = frozenset()) -> Change:
    owner = vol.owner
    assert owner is not None
    step = Step("delete_volume", (vol.pool, vol.name, owner.kind, owner.name))
    blocked = None
    if owner.kind == "Disk" and not ctx.opts.prune_disks:
        blocked = "disks hold data: deleting one also needs --prune-disks"
    if owner.kind == "Image" and any(v.backing_path == vol.path and v.path not in going
                                     for p in ctx.live.pools.values() for v in p.volumes):
        blocked = "disks still use it as their base"
    users = [dom for dom, _ in _attached(ctx, vol.pool, vol.name) if dom not in leaving]
    if users and owner.kind != SEED_KIND:
        blocked = "attached to a running VM"
    return _delete(owner, owner.kind, owner.name, step, fingerprint(vol), blocked)


def _prune_pool(ctx: _Ctx, pool, going: set[str]) -> Change:  # type: ignore[no-untyped-def]
    # Deleting the pool of volumes that stay would orphan them: only an emptied pool goes.
    staying = [v.name for v in pool.volumes if v.path not in going]
    blocked = f"not empty: {', '.join(staying[:5])}" if staying else None
    return _delete(pool.owner, "StoragePool", pool.name, Step("delete_pool", (pool.name,)),
                   fingerprint(pool.xml), blocked)


# ---- the whole plan ---------------------------------------------------------------------------

def host_problems(m: ManifestSet, live: LiveState) -> list[str]:
    """Plan-time checks against the host: bridges that must exist there."""
    errors = []
    for net in m.networks:
        if net.mode == "bridge" and net.bridge not in live.host_bridges:
            errors.append(f"{net.meta.ref}: host bridge {net.bridge!r} does not exist on the "
                          "hypervisor host")
    for vm in m.vms:
        for nic in vm.interfaces:
            if nic.bridge and nic.bridge not in live.host_bridges:
                errors.append(f"{vm.meta.ref}: host bridge {nic.bridge!r} does not exist on the "
                              "hypervisor host")
    return errors


def make_plan(m: ManifestSet, live: LiveState, opts: Options, uri: str = "",
              memo: Memo | None = None) -> Plan:
    """The plan; `memo` remembers definition pairs known to be equal (see memo.py)."""
    ctx = _Ctx(m, live, opts, memo)
    ctx.errors.extend(host_problems(m, live))
    changes: list[Change] = [plan_pool(ctx, p) for p in m.pools]
    changes += [plan_image(ctx, i) for i in m.images]
    changes += [plan_disk(ctx, d) for d in m.disks]
    changes += [c for c in (plan_seed(ctx, vm) for vm in m.vms) if c is not None]
    changes += [plan_network(ctx, n) for n in m.networks]
    changes += [plan_vm(ctx, vm) for vm in m.vms]
    if opts.prune:
        if not any(m.all()) and not opts.allow_empty:
            ctx.errors.append("refusing to prune with an empty manifest set: it would delete "
                              "everything this project owns (use --allow-empty if you mean it)")
        changes += plan_prune(ctx)
    if ctx.errors:
        raise PlanError("the plan cannot be made:\n  " + "\n  ".join(ctx.errors))
    if opts.targets:
        changes = _select(changes, opts.targets)
    return Plan(opts.project, uri, tuple(changes))


def _select(changes: list[Change], targets: tuple[str, ...]) -> list[Change]:
    by_ref = {c.ref: c for c in changes}
    lowered = {ref.lower(): ref for ref in by_ref}
    keep: set[str] = set()
    todo = []
    for target in targets:
        ref = lowered.get(target.lower())
        if ref is None:
            raise PlanError(f"--target {target}: no such object in the manifests "
                            "(write KIND/NAME, e.g. VirtualMachine/web)")
        todo.append(ref)
    while todo:
        ref = todo.pop()
        if ref in keep or ref not in by_ref:
            continue
        keep.add(ref)
        todo.extend(by_ref[ref].depends)
    return [c for c in changes if c.ref in keep]


def with_pending_cleared(change: Change) -> Change:
    return dc_replace(change, pending_restart=False)
