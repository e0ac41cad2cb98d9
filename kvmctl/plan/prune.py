"""Planning deletes of owned objects that left the manifests (--prune, destroy)."""

from __future__ import annotations

from ..host import facts
from ..host.ownership import Owner
from ..host.state import LiveDomain, LivePool, LiveVolume, fingerprint, volume_fingerprint
from ..kinds import Kind, ref
from .context import Context, attached_to, uuid_marked
from .snapshot import prune_snapshots, snapshot_loss, snapshots_in
from .steps import DeleteDomain, DeleteNetwork, DeletePool, DeleteSnapshot, DeleteVolume, Step
from .types import Change, ChangeClass

# How long a pruned VM gets to shut down gracefully before it is powered off, when neither the
# manifests (destroy) nor its own metadata (the shutdownTimeout it was defined with) say.
DELETE_SHUTDOWN_TIMEOUT_S = 120

# ---- prune --------------------------------------------------------------------------------------

def plan_prune(ctx: Context) -> list[Change]:
    project, m = ctx.opts.project, ctx.m
    wanted = {(o.meta.kind, o.meta.name) for o in m.all()}
    wanted |= {(Kind.SEED, vm.meta.name) for vm in m.vms if vm.cloud_init}
    for kept in ctx.opts.kept:  # placed on another host of the project: moves decide
        kind, _, name = kept.partition("/")
        wanted.add((Kind(kind), name))
        if kind == Kind.VM:
            wanted.add((Kind.SEED, name))

    def in_scope(kind: str, name: str) -> bool:
        return not ctx.opts.scope or ref(kind, name) in ctx.opts.scope

    out: list[Change] = []
    kept_with: set[str] = set()  # VMs whose delete is blocked by their snapshots
    for dom in ctx.live.domains.values():
        if _mine(dom.owner, project) and (Kind.VM, dom.name) not in wanted \
                and in_scope(Kind.VM, dom.name):
            # Every snapshot counts, a declared one too: deleting the VM takes them all.
            losing = dom.snapshots and not ctx.opts.allow_snapshot_loss
            if losing:
                kept_with.add(dom.name)
            out.append(_delete(dom.owner, Kind.VM, dom.name,
                               DeleteDomain(dom.name, _shutdown_timeout(ctx, dom)),
                               fingerprint(dom.inactive_xml, dom.state,
                                           *([dom.snapshots] if dom.snapshots else [])),
                               snapshot_loss(dom.snapshots) if losing else None))
    # A VM that stays keeps its declared snapshots too, documents or not.
    out = [c for c in prune_snapshots(ctx, in_scope)
           if not (c.steps and isinstance(c.steps[0], DeleteSnapshot)
                   and c.steps[0].vm in kept_with)] + out
    for net in ctx.live.networks.values():
        if _mine(net.owner, project) and (Kind.NETWORK, net.name) not in wanted \
                and in_scope(Kind.NETWORK, net.name):
            out.append(_delete(net.owner, Kind.NETWORK, net.name, DeleteNetwork(net.name),
                               fingerprint(net.xml)))
    # VMs this plan deletes (before any volume) do not keep their disks in use.
    leaving = {c.name for c in out if c.kind is Kind.VM and c.steps}
    # VMs whose delete is blocked (protected, with snapshots) stay: so do the disks they use.
    staying = _disks_of(ctx, {c.name for c in out if c.kind is Kind.VM and c.blocked})
    doomed = [vol for pool in ctx.live.pools.values() for vol in pool.volumes
              if vol.owner is not None and vol.owner.project == project
              and isinstance(vol.owner.kind, Kind)  # a record of ours names kinds we know
              and (vol.owner.kind, vol.owner.name) not in wanted
              and in_scope(vol.owner.kind, vol.owner.name)]
    # Images last: a disk deleted by this same plan no longer keeps its base image.
    going: set[str] = set()
    decided: dict[str, Change] = {}
    for vol in sorted(doomed, key=lambda v: v.owner is not None and v.owner.kind == Kind.IMAGE):
        decided[vol.path] = _prune_volume(ctx, vol, going, leaving, staying)
        if decided[vol.path].steps:
            going.add(vol.path)
    for pool in ctx.live.pools.values():
        out += [decided[vol.path] for vol in pool.volumes if vol.path in decided]
        # A pool is pruned on its record's word, or on its uuid's when its records could be
        # read (it runs) or are gone with its directory: never on the VMs that use it, and
        # never while it is stopped (what it holds is unread).
        owner = pool.owner or (Owner(project, Kind.POOL, pool.name) if uuid_marked(ctx, pool)
                               and (pool.active or pool.target_missing) else None)
        if _mine(owner, project) and (Kind.POOL, pool.name) not in wanted \
                and in_scope(Kind.POOL, pool.name):
            out.append(_prune_pool(ctx, pool, going))
    return out


def _shutdown_timeout(ctx: Context, dom: LiveDomain) -> float:
    given = dict(ctx.opts.shutdown_timeouts).get(dom.name)
    if given is not None:
        return given
    recorded = dom.owner.shutdown_timeout_s if dom.owner else None
    return recorded if recorded is not None else DELETE_SHUTDOWN_TIMEOUT_S


def _mine(owner: Owner | None, project: str) -> bool:
    return owner is not None and owner.project == project


def _delete(owner: Owner | None, kind: Kind, name: str, step: Step, fp: str,
            blocked: str | None = None) -> Change:
    if owner is not None and owner.protect:
        blocked = "protected (protect: true)"
    return Change(kind, name, ChangeClass.DELETE,
                  ("owned by this project and no longer in the manifests",),
                  steps=() if blocked else (step,), blocked=blocked, fingerprint=fp)


def _disks_of(ctx: Context, vms: set[str]) -> dict[tuple[str, str], str]:
    """(pool, volume) -> the VM among `vms` whose definition uses it."""
    out: dict[tuple[str, str], str] = {}
    for name in sorted(vms):
        dom = ctx.live.domains.get(name)
        if dom is None:
            continue
        for value in facts.domain_facts(dom.inactive_xml, ctx.resolve_volume).values():
            if isinstance(value, facts.DiskFact) and isinstance(value.source, tuple):
                pool, volume = value.source
                if pool is not None and volume is not None:
                    out.setdefault((pool, volume), name)
    return out


def _prune_volume(ctx: Context, vol: LiveVolume, going: set[str],
                  leaving: set[str] | frozenset[str] = frozenset(),
                  staying: dict[tuple[str, str], str] | None = None) -> Change:
    owner = vol.owner
    assert owner is not None
    step = DeleteVolume(vol.pool, vol.name)
    kind = Kind(owner.kind)
    blocked = None
    if kind is Kind.DISK and not ctx.opts.prune_disks:
        blocked = "disks hold data: deleting one also needs --prune-disks"
    if kind is Kind.IMAGE and any(v.backing_path == vol.path and v.path not in going
                                     for p in ctx.live.pools.values() for v in p.volumes):
        blocked = "disks still use it as their base"
    users = [a.domain for a in attached_to(ctx, vol.pool, vol.name) if a.domain not in leaving]
    if users and kind is not Kind.SEED:
        blocked = "attached to a running VM"
    keeper = (staying or {}).get((vol.pool, vol.name))
    if keeper is not None:
        blocked = f"used by VM {keeper}, which is not deleted"
    held = snapshots_in(ctx, vol.pool, vol.name, leaving)
    if held and not ctx.opts.allow_snapshot_loss and blocked is None:
        blocked = "holds the data of " + ", ".join(
            f"{n} snapshot{'s' if n != 1 else ''} of VM {vm}" for vm, n in held) + \
            ": deleting it loses them (--allow-snapshot-loss)"
    return _delete(owner, kind, owner.name, step, volume_fingerprint(vol), blocked)


def _prune_pool(ctx: Context, pool: LivePool, going: set[str]) -> Change:
    # Deleting the pool of volumes that stay would orphan them: only an emptied pool goes.
    staying = [v.name for v in pool.volumes if v.path not in going]
    blocked = f"not empty: {', '.join(staying[:5])}" if staying else None
    return _delete(pool.owner, Kind.POOL, pool.name, DeletePool(pool.name),
                   fingerprint(pool.xml), blocked)
