"""Planning networks: DHCP reservations and DNS hosts change live, the rest replaces."""

from __future__ import annotations

from . import compare, render
from .model import Network
from .plan_context import Context
from .plan_types import CREATE, LIVE, NOOP, REPLACE, Change, FieldDiff, Step
from .state import fingerprint

# ---- networks ---------------------------------------------------------------------------------

def plan_network(ctx: Context, net: Network) -> Change:
    name = net.meta.name
    live = ctx.live.networks.get(name)
    xml = render.network_xml(net, ctx.m, ctx.opts.project, live.uuid if live else None)
    create = (Step("define_network", (name, xml)), Step("start_network", (name,)),
              Step("network_autostart", (name, net.autostart)))
    if live is None:
        return Change("Network", name, CREATE, (f"new {net.mode} network",), steps=create)
    if not ctx.check_owner(net.meta, live.owner):
        return Change("Network", name, NOOP)
    fp = fingerprint(live.xml, live.active, live.autostart)
    changes = compare.network_diff(xml, live.xml)
    fields = tuple(FieldDiff(c.field, describe(c.field, c.old), describe(c.field, c.new))
                   for c in changes)
    hard = [c for c in changes if c.field not in compare.NETWORK_LIVE_FIELDS]
    if hard:
        users = _running_nics(ctx, name)
        blocked = "the network is protected (protect: true)" if net.protect or (
            live.owner and live.owner.protect) else None
        reasons = ["libvirt cannot change " + ", ".join(c.field for c in hard) +
                   " of an existing network: it is deleted and created again"]
        if users:
            reasons.append("running guests on it lose their link with the old network; their "
                           "NICs are unplugged and plugged again (same MAC, same slot) so they "
                           "join the new one: " + ", ".join(sorted({d for d, _ in users})))
        replug = tuple(Step("replug_nic", (domain, nic)) for domain, nic in users)
        return Change("Network", name, REPLACE, tuple(reasons), fields, () if blocked else
                      (Step("delete_network", (name,)),) + create + replug, blocked=blocked,
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


def describe(field: str, value: object) -> object:
    """A network fact as a person reads it in a plan."""
    if not value:
        return None
    if field == "dhcp.hosts":
        return ", ".join(f"{name or mac} {ip}" for mac, name, ip in value)  # type: ignore[union-attr]
    if field == "dns.hosts":
        return ", ".join(f"{ip} {' '.join(names)}" for ip, names in value)  # type: ignore[union-attr]
    if field in ("ipv4", "dhcp.range") and isinstance(value, tuple):
        return f"{value[0]}/{value[1]}" if field == "ipv4" else f"{value[0]}-{value[1]}"
    if field == "metadata" and isinstance(value, tuple):
        return f"spec {value[0][:8]}"
    return value


def _running_nics(ctx: Context, network: str) -> list[tuple[str, str]]:
    """(running domain, its live NIC XML) for every NIC attached to `network`."""
    found = []
    for dom in ctx.live.domains.values():
        if not dom.running:
            continue
        for key, value in compare.domain_facts(dom.live_xml or "").items():
            if key.startswith("nic:") and value[:2] == ("network", network):
                found.append((dom.name, compare.device_element(dom.live_xml or "", key) or ""))
    return found


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
