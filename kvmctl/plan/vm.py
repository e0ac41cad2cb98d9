"""Planning virtual machines: live where libvirt can, otherwise at the next restart."""

from __future__ import annotations

from enum import Enum

from ..host import facts, records
from ..host.facts import DiskFact, FactChange, Facts, NicFact
from ..host.state import LiveDomain, fingerprint
from ..kinds import Kind, ref
from ..manifest.model import VirtualMachine
from ..memo import key as memo_key
from .context import Context
from .describe import created, describe
from .steps import (
    GUEST_STEPS,
    AttachDevice,
    DefineDomain,
    DetachDevice,
    RecordDefinition,
    RestartDomain,
    SetDomainAutostart,
    SetMemoryLive,
    SetMetadataLive,
    SetVcpusLive,
    ShutdownDomain,
    StartDomain,
    Step,
    UpdateDevice,
)
from .types import Change, ChangeClass, FieldDiff
from .xmledit import (
    carry_identity,
    device_element,
    metadata_element,
    unmanaged,
    with_unmanaged,
)


class Reach(Enum):
    """How a changed domain fact reaches a running guest."""

    LIVE = "live"
    RESTART = "restart"


LIVE_FIELDS = ("vcpus", "memory", "metadata", "labels")
METADATA_FIELDS = ("metadata", "labels")  # both live in kvmctl's one metadata element


def field_reach(change: FactChange) -> Reach:
    if change.field in LIVE_FIELDS:
        return Reach.LIVE
    device = change.new if change.new is not None else change.old
    if isinstance(device, (DiskFact, NicFact)):
        if change.old is None or change.new is None:  # hot-plug or unplug
            hot = isinstance(device, NicFact) or device.bus in ("virtio", "scsi", None)
            return Reach.LIVE if hot else Reach.RESTART
        if isinstance(device, NicFact) and change.old[:3] == change.new[:3]:
            return Reach.LIVE  # only the link state differs
    return Reach.RESTART


def pending_restart(inactive_xml: str, live_xml: str,
                    resolve: facts.VolumeResolver | None = None) -> list[str]:
    """The facts a running guest will only take at its next boot: its definition differs
    from what runs, and no live call can close the gap."""
    changes = facts.diff(facts.domain_facts(inactive_xml, resolve),
                         facts.domain_facts(live_xml, resolve))
    return [c.field for c in changes if field_reach(c) is Reach.RESTART]


def _vm_deps(vm: VirtualMachine) -> tuple[str, ...]:
    deps = [ref(Kind.DISK, a.disk) for a in vm.disks]
    deps += [ref(Kind.NETWORK, i.network) for i in vm.interfaces if i.network]
    if vm.cloud_init:
        deps.append(ref(Kind.SEED, vm.meta.name))
    return tuple(deps)


def plan_vm(ctx: Context, vm: VirtualMachine) -> Change:
    name = vm.meta.name
    live = ctx.live.domains.get(name)
    deps = _vm_deps(vm)
    if live is None:
        xml = ctx.desired.domains[name]
        steps: list[Step] = [_define(ctx, name, xml), SetDomainAutostart(name, vm.autostart)]
        if vm.state == "running":
            steps.append(StartDomain(name))
        return Change(Kind.VM, name, ChangeClass.CREATE, (f"new VM ({vm.state})",),
                      _created(vm, xml), tuple(steps), depends=deps)
    if not ctx.check_owner(vm.meta, live.owner):
        return Change(Kind.VM, name, ChangeClass.NOOP)
    return _update_vm(ctx, vm, live, deps)


def _define(ctx: Context, name: str, xml: str) -> DefineDomain:
    """Defining `xml` (the rendered definition, perhaps with the current one's identity),
    with the digests its definition record takes (host/records.py)."""
    return DefineDomain(name, xml, ctx.desired.domain_digests.get(name, ""),
                        records.rendered_digest(ctx.desired.domains[name]))


def _created(vm: VirtualMachine, xml: str) -> tuple[FieldDiff, ...]:
    """What a new VM is made of; its NICs with the addresses reserved for them."""
    ips = {facts.nic_key(nic.mac): nic.ip for nic in vm.interfaces if nic.ip}
    return tuple(FieldDiff(f.field, None, f"{f.new}, address {ips[f.field]}")
                 if f.field in ips else f for f in created(facts.domain_facts(xml)))


def _vm_differences(ctx: Context, vm: VirtualMachine, live: LiveDomain
                    ) -> tuple[list[FactChange], list[FactChange], Facts, bool]:
    """Owned differences of the desired definition from the persistent and the running one.

    A persistent definition its record proves unchanged (host/records.py) has none and is not
    parsed; a stopped VM's desired definition is then not even rendered. Disks the live
    definitions give by a path are the pool volumes at that path (the host's volumes,
    ctx.live). A definition pair already known to have none (ctx.memo) is not parsed again; a
    verdict that took a path lookup depends on the host's volumes, not only on the pair, so it
    is not remembered. The last value: the persistent definition was found unchanged, though
    not proven so by a record (one may be written: RecordDefinition)."""
    name = vm.meta.name
    config_proven = records.proven(live.record, ctx.desired.domain_digests.get(name, ""),
                                   lambda: ctx.desired.domains[name], live.inactive_xml)
    if config_proven and not live.running:
        return [], [], {}, False
    xml = ctx.desired.domains[name]  # with the live domain's uuid (render.HostHints)
    if vm.keep_unmanaged:  # what it keeps is part of what it wants (a CD-ROM's disk fact)
        xml = with_unmanaged(xml, live.inactive_xml)
    memo = ctx.memo
    config_key = memo_key("domain", xml, live.inactive_xml) if memo is not None else ""
    live_key = memo_key("domain", xml, live.live_xml or "") if memo is not None and \
        live.running else ""
    if memo is not None and config_key in memo and (not live_key or live_key in memo):
        return [], [], {}, not config_proven
    volumes = ctx.resolve_volume
    lookups: list[str] = []  # the disk paths looked up, of both definitions

    def resolve(path: str) -> tuple[str, str] | None:
        lookups.append(path)
        return volumes(path)

    # Kept elements are the host's: a CD-ROM given by its path is the volume at that path.
    desired = facts.domain_facts(xml, resolve if vm.keep_unmanaged else None)
    config_changes = [] if config_proven else facts.diff(
        desired, facts.domain_facts(live.inactive_xml, resolve))
    config_lookups = len(lookups)
    live_facts = facts.domain_facts(live.live_xml or "", resolve) if live.running else {}
    live_changes = facts.diff(desired, live_facts) if live.running else []
    if memo is not None and not config_changes and not config_lookups:
        memo.add(config_key)
    if memo is not None and live_key and not live_changes and len(lookups) == config_lookups:
        memo.add(live_key)
    return config_changes, live_changes, live_facts, \
        not config_proven and not config_changes and not config_lookups


def _update_vm(ctx: Context, vm: VirtualMachine, live: LiveDomain,
               deps: tuple[str, ...]) -> Change:
    """The rendered definition takes the current one's device addresses and controllers
    (carry_identity) only when a step sends it to libvirt: those are not facts, so both have
    the same facts, and a no-op VM is spared the work."""
    name = vm.meta.name
    fp = fingerprint(records.text_digest(live.inactive_xml), live.state, live.autostart)
    config_changes, live_changes, live_facts, record_due = _vm_differences(ctx, vm, live)
    upkeep = (RecordDefinition(name, ctx.desired.domains[name],
                               ctx.desired.domain_digests.get(name, ""),
                               records.rendered_digest(ctx.desired.domains[name])),) \
        if record_due else ()
    xml = ""
    if config_changes or live_changes:
        xml = carry_identity(ctx.desired.domains[name], live.inactive_xml)
    dropped: list[str] = []
    if config_changes:
        if vm.keep_unmanaged:
            xml = with_unmanaged(xml, live.inactive_xml)
        else:
            dropped = [path for path, _, _, _ in unmanaged(live.inactive_xml)]
    steps: list[Step] = [_define(ctx, name, xml)] if config_changes else []
    reasons: list[str] = []
    fields = [FieldDiff(c.field, describe(c.field, c.old), describe(c.field, c.new))
              for c in config_changes]
    if dropped:  # never silently: the plan names what the redefinition leaves out
        fields.append(FieldDiff("unmanaged", ", ".join(dropped), None))
    pending: list[str] = []
    if live.running:
        changed_in_config = {c.field for c in config_changes}
        for c in live_changes:
            # A running guest's memory is what its balloon reports, which trails the target
            # for a while after boot: only a change of the definition is acted on.
            if c.field == "memory" and c.field not in changed_in_config:
                continue
            if c.field not in changed_in_config:  # only the running guest differs: say so
                fields.append(FieldDiff(f"{c.field} (running guest)",
                                        describe(c.field, c.old), describe(c.field, c.new)))
            # A vCPU unplug the guest refused once (the definition has the new count already)
            # is not asked again on every apply: it waits for the next restart.
            if c.field == "vcpus" and c.field not in changed_in_config and c.new < c.old:
                pending.append(c.field)
                continue
            step = _live_step(name, c, xml, live.live_xml or "", live_facts)
            if step is None:
                pending.append(c.field)
            elif step not in steps:  # labels and the rest of the mark: one element, one call
                steps.append(step)
        if pending:
            reasons.append("takes effect at the next restart: " + ", ".join(pending))
    elif config_changes:
        reasons.append("the VM is stopped: its definition changes now")
    if live.autostart != vm.autostart:
        steps.append(SetDomainAutostart(name, vm.autostart))
        fields.append(FieldDiff("autostart", live.autostart, vm.autostart))
    power = _state_steps(vm, live)
    if power:
        steps += power
        fields.append(FieldDiff("state", live.state, vm.state))
        reasons.append("started (state: running)" if isinstance(power[0], StartDomain) else
                       "shut down (state: stopped): ACPI shutdown, powered off after "
                       f"{vm.shutdown_timeout} s")
    if pending and vm.on_restart_needed == "fail":
        ctx.error(vm.meta, f"needs a restart ({', '.join(pending)}) and onRestartNeeded is "
                           "fail")
    if pending and vm.on_restart_needed == "restart":
        steps.append(RestartDomain(name, vm.shutdown_timeout))
        reasons.append(f"restarted now (onRestartNeeded: restart, graceful shutdown up to "
                       f"{vm.shutdown_timeout} s)")
    if not steps and not pending:
        return Change(Kind.VM, name, ChangeClass.NOOP, fingerprint=fp, depends=deps,
                      upkeep=upkeep)
    if live.running and not reasons and steps:
        touches_guest = any(isinstance(step, GUEST_STEPS) for step in steps)
        reasons.append("applied to the running guest and to its definition, no restart"
                       if touches_guest else
                       "the definition changes; the running guest already has these values")
    if dropped:
        reasons.append("the redefinition drops elements the manifests do not model: "
                       + ", ".join(dropped) + " (keepUnmanaged: true keeps them)")
    deferred = bool(pending) and vm.on_restart_needed == "defer"
    # A restart that is only pending (nothing left to apply) is reported, but is not a change;
    # nor does it make another change (a start, a live resize) one that needs a restart: only
    # what this change itself sends to the definition for the next restart does.
    newly_pending = bool(set(pending) & {c.field for c in config_changes})
    restarts = any(isinstance(step, RestartDomain) for step in steps)
    change_class = ChangeClass.NOOP if not steps else (
        ChangeClass.UPDATE_RESTART if newly_pending or restarts else ChangeClass.UPDATE_LIVE)
    return Change(Kind.VM, name, change_class, tuple(reasons), tuple(fields), tuple(steps),
                  pending_restart=deferred, fingerprint=fp, depends=deps, upkeep=upkeep)


def _state_steps(vm: VirtualMachine, live: LiveDomain) -> list[Step]:
    if vm.state == "running" and not live.running:
        return [StartDomain(vm.meta.name)]
    if vm.state == "stopped" and live.running:
        return [ShutdownDomain(vm.meta.name, vm.shutdown_timeout)]
    return []


def _live_step(name: str, c: FactChange, desired_xml: str, live_xml: str,
               live_facts: Facts) -> Step | None:
    """The hot-plug or live call that makes this change on the running guest, if any."""
    if field_reach(c) is not Reach.LIVE:
        return None
    if c.field == "vcpus":
        return SetVcpusLive(name, c.new) if c.new <= live_facts["vcpus.max"] else None
    if c.field == "memory":
        return SetMemoryLive(name, c.new) if c.new <= live_facts["memory.max"] else None
    if c.field in METADATA_FIELDS:
        element = metadata_element(desired_xml)
        return SetMetadataLive(name, element) if element is not None else None
    if c.old is None:
        return _device_step(AttachDevice, name, desired_xml, c.field)
    if c.new is None:
        return _device_step(DetachDevice, name, live_xml, c.field)
    return _device_step(UpdateDevice, name, desired_xml, c.field)


def _device_step(step: type[AttachDevice] | type[DetachDevice] | type[UpdateDevice], name: str,
                 xml: str, key: str) -> Step | None:
    element = device_element(xml, key)
    return step(name, element) if element is not None else None
