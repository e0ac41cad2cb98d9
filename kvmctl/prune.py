"""Planning deletes of owned objects that left the manifests (--prune, destroy)."""

from __future__ import annotations

from .plan_context import SEED_KIND, Context, attached_to
from .plan_types import DELETE, Change, Step
from .state import LiveVolume, Owner, fingerprint

# ---- prune --------------------------------------------------------------------------------------

def plan_prune(ctx: Context) -> list[Change]:
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


def _prune_volume(ctx: Context, vol: LiveVolume, going: set[str],
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
    users = [dom for dom, _ in attached_to(ctx, vol.pool, vol.name) if dom not in leaving]
    if users and owner.kind != SEED_KIND:
        blocked = "attached to a running VM"
    return _delete(owner, owner.kind, owner.name, step, fingerprint(vol), blocked)


def _prune_pool(ctx: Context, pool, going: set[str]) -> Change:  # type: ignore[no-untyped-def]
    # Deleting the pool of volumes that stay would orphan them: only an emptied pool goes.
    staying = [v.name for v in pool.volumes if v.path not in going]
    blocked = f"not empty: {', '.join(staying[:5])}" if staying else None
    return _delete(pool.owner, "StoragePool", pool.name, Step("delete_pool", (pool.name,)),
                   fingerprint(pool.xml), blocked)
