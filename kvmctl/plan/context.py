"""What every planner shares: the options of a plan, the context it reads (manifests, their
rendered definitions, live state, memo) and the errors it collects, and who owns and uses what
on the host."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..host import facts
from ..host.ownership import Owner
from ..host.state import LivePool, LiveState, LiveVolume
from ..kinds import Kind, pool_uuid
from ..manifest.model import ManifestSet, Meta
from ..memo import Memo
from ..render.specs import Desired
from .steps import Attachment


@dataclass(frozen=True)
class Options:
    project: str
    prune: bool = False
    prune_disks: bool = False
    adopt: bool = False
    allow_empty: bool = False
    targets: tuple[str, ...] = ()
    # With prune: only these refs (KIND/NAME) may be deleted (destroy: what its manifests name).
    scope: tuple[str, ...] = ()
    # (VM name, shutdownTimeout) of VMs a delete shuts down (destroy: from its manifests).
    shutdown_timeouts: tuple[tuple[str, float], ...] = ()
    # Refs (KIND/NAME) of VMs and Disks the project places on another host: never pruned here,
    # for their data moves with them (plan/moves.py), or stays until it can.
    kept: tuple[str, ...] = ()
    # A VM with snapshots may be deleted (they go with it); otherwise its delete is blocked.
    allow_snapshot_loss: bool = False


class Context:
    def __init__(self, m: ManifestSet, desired: Desired, live: LiveState, opts: Options,
                 memo: Memo | None = None) -> None:
        self.m, self.desired, self.live, self.opts, self.memo = m, desired, live, opts, memo
        self.errors: list[str] = []
        # path -> (pool, volume) of the host's volumes, indexed once per plan on first use
        self.resolve_volume = facts.volume_resolver(live)
        # (pool, volume) -> who uses it, built on first use by attached_to
        self.attachments: dict[object, list[Attachment]] | None = None

    def error(self, meta: Meta | None, message: str, ref: str = "") -> None:
        """Record why the plan cannot be made, located at the object's document."""
        where = f"{meta.source}: " if meta is not None and meta.source else ""
        what = ref or (meta.ref if meta is not None else "")
        self.errors.append(f"{where}{what}: {message}" if what else f"{where}{message}")

    def check_owner(self, meta: Meta, owner: Owner | None, ref: str = "") -> bool:
        """True when kvmctl may change the object; records a conflict error otherwise."""
        if owner is not None and owner.project == self.opts.project:
            return True
        if owner is None and self.opts.adopt:
            return True
        if owner is None:
            self.error(meta, "already exists on the host and is not managed by kvmctl; rename "
                             "it in the manifest, or take it over with --adopt", ref)
        else:
            self.error(meta, f"already exists and belongs to kvmctl project {owner.project!r}; "
                             f"it is never changed from project {self.opts.project!r}", ref)
        return False


def pool_owner(ctx: Context, pool: LivePool) -> Owner | None:
    """Who owns a pool: its record says; without one (a kill before the record was written,
    or the directory holding it deleted), the pool's uuid marks a pool this project made, and a
    pool whose directory is gone is this project's when this project's VMs use it."""
    if pool.owner is not None:
        return pool.owner
    project = ctx.opts.project
    if uuid_marked(ctx, pool) or (pool.target_missing and any(
            d.owner is not None and d.owner.project == project
            and _uses_pool(d.inactive_xml, pool.name) for d in ctx.live.domains.values())):
        return Owner(project, Kind.POOL, pool.name)
    return None


def uuid_marked(ctx: Context, pool: LivePool) -> bool:
    """The pool's uuid is the one this project gives the pools it creates (kinds.pool_uuid)."""
    return pool.uuid == pool_uuid(ctx.opts.project, pool.name)


def _uses_pool(xml: str, pool: str) -> bool:
    return re.search(r"<source\s+pool=(['\"])" + re.escape(pool) + r"\1", xml) is not None


def owned_volume(ctx: Context, pool: str, kind: Kind, name: str) -> LiveVolume | None:
    live_pool = ctx.live.pools.get(pool)
    if not live_pool:
        return None
    return next((v for v in live_pool.volumes if v.owner and v.owner.project == ctx.opts.project
                 and v.owner.kind == kind and v.owner.name == name), None)


def attached_to(ctx: Context, pool: str, volume: str) -> list[Attachment]:
    """The running domains that use this volume right now, with its target dev in each (a disk
    given by its path, as virt-install writes it, uses the volume at that path)."""
    if ctx.attachments is None:  # every running domain is parsed once, not once per volume
        ctx.attachments = {}
        resolve = ctx.resolve_volume
        for dom in ctx.live.domains.values():
            if not dom.running:
                continue
            for key, value in facts.domain_facts(dom.live_xml or "", resolve).items():
                if isinstance(value, facts.DiskFact):
                    ctx.attachments.setdefault(value.source, []).append(
                        Attachment(dom.name, facts.key_id(key)))
    return list(ctx.attachments.get((pool, volume), ()))
