"""Stage 5: validated model + rendered definitions + live state -> plan.

Pure: no libvirt, no jinja2, no printing. Each object kind has one planner (storage, network,
vm, prune) that compares the desired definition with what the host has and returns one Change
with its class, reasons, field diffs, and the typed steps (steps.py) apply will run. Anything
that cannot be done is a PlanError here, before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..errors import PlanError
from ..host.state import LiveState
from ..kinds import ORDER, Kind
from ..manifest.model import ManifestSet
from ..memo import Memo
from ..render.specs import Desired
from .context import Context, Options
from .network import plan_network
from .prune import plan_prune
from .snapshot import plan_snapshot
from .steps import DefineDomain
from .storage import plan_disk, plan_image, plan_pool, plan_seed
from .types import Change, ChangeClass, Plan
from .vm import plan_vm

__all__ = ["Options", "make_plan"]


def host_problems(ctx: Context) -> None:
    """Plan-time checks against the host: bridges that must exist there."""
    bridges = ctx.live.host_bridges
    for net in ctx.m.networks:
        if net.mode == "bridge" and net.bridge not in bridges:
            ctx.error(net.meta, f"host bridge {net.bridge!r} does not exist on the hypervisor "
                                "host")
    for vm in ctx.m.vms:
        for nic in vm.interfaces:
            if nic.bridge and nic.bridge not in bridges:
                ctx.error(vm.meta, f"host bridge {nic.bridge!r} does not exist on the "
                                   "hypervisor host")


# One planner per kind; make_plan runs them in kinds.ORDER.
PLANNERS: dict[Kind, Callable[[Context], list[Change]]] = {
    Kind.POOL: lambda ctx: [plan_pool(ctx, p) for p in ctx.m.pools],
    Kind.IMAGE: lambda ctx: [plan_image(ctx, i) for i in ctx.m.images],
    Kind.DISK: lambda ctx: [plan_disk(ctx, d) for d in ctx.m.disks],
    Kind.SEED: lambda ctx: [c for vm in ctx.m.vms if (c := plan_seed(ctx, vm)) is not None],
    Kind.NETWORK: lambda ctx: [plan_network(ctx, n) for n in ctx.m.networks],
    Kind.VM: lambda ctx: [plan_vm(ctx, vm) for vm in ctx.m.vms],
    Kind.SNAPSHOT: lambda ctx: [plan_snapshot(ctx, s) for s in ctx.m.snapshots],
}


def make_plan(m: ManifestSet, desired: Desired, live: LiveState, opts: Options, uri: str = "",
              memo: Memo | None = None) -> Plan:
    """The plan; `memo` remembers definition pairs known to be equal (see memo.py)."""
    ctx = Context(m, desired, live, opts, memo)
    host_problems(ctx)
    changes = _behind_blocked([c for kind in ORDER for c in PLANNERS[kind](ctx)], desired)
    if opts.prune:
        if not any(m.all()) and not opts.allow_empty:
            ctx.error(None, "refusing to prune with an empty manifest set: it would delete "
                            "everything this project owns (use --allow-empty if you mean it)")
        changes += plan_prune(ctx)
    if ctx.errors:
        raise PlanError("the plan cannot be made:\n  " + "\n  ".join(ctx.errors))
    if opts.targets:
        changes = _select(changes, opts.targets)
    return Plan(opts.project, uri, tuple(changes))


def _behind_blocked(changes: list[Change], desired: Desired) -> list[Change]:
    """A VM definition that names the new volume of a Disk whose replace is blocked is blocked
    too: the volume is never created, and the VM would lose its disk. Nothing else waits on a
    blocked replace (a grow, a shutdown, a memory change go on)."""
    missing = {desired.disks[c.name].spec.name: c for c in changes
               if c.kind is Kind.DISK and c.change_class is ChangeClass.REPLACE and c.blocked
               and c.name in desired.disks}
    if not missing:
        return changes
    out = []
    for c in changes:
        if c.kind is Kind.VM and not c.blocked:
            needs = next((d for st in c.steps if isinstance(st, DefineDomain)
                          for vol, d in missing.items() if f"volume='{vol}'" in st.xml
                          or f'volume="{vol}"' in st.xml), None)
            if needs is not None:
                c = replace(c, steps=(), blocked=f"its new definition names the volume of "
                                                 f"{needs.ref}, whose replace is blocked "
                                                 f"({needs.blocked})")
        out.append(c)
    return out


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
