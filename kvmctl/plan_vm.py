"""Planning virtual machines: live where libvirt can, otherwise at the next restart."""

from __future__ import annotations

from . import compare, render
from .memo import key as memo_key
from .model import ManifestSet, VirtualMachine
from .plan_context import SEED_KIND, Context
from .plan_types import CREATE, LIVE, NOOP, RESTART, Change, FieldDiff, Step
from .state import LiveDomain, fingerprint
from .units import format_size

# ---- virtual machines ---------------------------------------------------------------------------

def _vm_deps(vm: VirtualMachine, m: ManifestSet) -> tuple[str, ...]:
    deps = [f"Disk/{a.disk}" for a in vm.disks]
    deps += [f"Network/{i.network}" for i in vm.interfaces if i.network]
    if vm.cloud_init:
        deps.append(f"{SEED_KIND}/{vm.meta.name}")
    return tuple(deps)


def plan_vm(ctx: Context, vm: VirtualMachine) -> Change:
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
    if not ctx.check_owner(vm.meta, live.owner):
        return Change("VirtualMachine", name, NOOP)
    return _update_vm(ctx, vm, live, xml, deps)


def _vm_differences(ctx: Context, xml: str, live: LiveDomain
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


def _update_vm(ctx: Context, vm: VirtualMachine, live: LiveDomain, xml: str,
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
        ctx.error(vm.meta, f"needs a restart ({', '.join(pending)}) and onRestartNeeded is "
                           "fail")
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
