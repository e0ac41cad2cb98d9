"""Planning networks: DHCP reservations, DNS hosts and the DHCP range change live (libvirt's
network update call, no restart); anything else replaces the network."""

from __future__ import annotations

from ..host import facts
from ..host.state import LiveNetwork, fingerprint
from ..kinds import Kind
from ..manifest.model import Network
from .context import Context
from .describe import created, describe
from .steps import (
    DefineNetwork,
    DeleteNetwork,
    NetworkCommand,
    NetworkSection,
    ReplugNic,
    RestartNetwork,
    SetNetworkAutostart,
    StartNetwork,
    Step,
    UpdateNetwork,
)
from .types import Change, ChangeClass, FieldDiff
from .xmledit import device_element, network_entry, plug_again

LIVE_FIELDS = ("dhcp.hosts", "dns.hosts", "dhcp.range", "metadata", "labels")


def plan_network(ctx: Context, net: Network) -> Change:
    name = net.meta.name
    live = ctx.live.networks.get(name)
    xml = ctx.desired.networks[name]  # with the live network's uuid (render.HostHints)
    create = (DefineNetwork(name, xml), StartNetwork(name),
              SetNetworkAutostart(name, net.autostart))
    if live is None:
        return Change(Kind.NETWORK, name, ChangeClass.CREATE, (f"new {net.mode} network",),
                      created(facts.network_facts(xml)), create)
    if not ctx.check_owner(net.meta, live.owner):
        return Change(Kind.NETWORK, name, ChangeClass.NOOP)
    fp = fingerprint(live.xml, live.active, live.autostart)
    changes = facts.network_diff(xml, live.xml)
    fields = tuple(FieldDiff(c.field, describe(c.field, c.old), describe(c.field, c.new))
                   for c in changes)
    hard = [c for c in changes if c.field not in LIVE_FIELDS]
    if hard:
        users = _running_nics(ctx, name)
        blocked = "the network is protected (protect: true)" if net.protect or (
            live.owner and live.owner.protect) else None
        reasons = ["libvirt cannot change " + ", ".join(c.field for c in hard) +
                   " of an existing network: it is deleted and created again"]
        if users and not blocked:
            reasons.append("running guests on it lose their link with the old network; their "
                           "NICs are unplugged and plugged again (same MAC, same slot) so they "
                           "join the new one: " + ", ".join(sorted({u.domain for u in users})))
        steps: tuple[Step, ...] = (DeleteNetwork(name),) + create + tuple(users)
        return Change(Kind.NETWORK, name, ChangeClass.REPLACE, tuple(reasons), fields,
                      () if blocked else steps, blocked=blocked, fingerprint=fp)
    live_steps = _network_live_steps(name, changes, xml, live.xml)
    if changes:
        live_steps.append(DefineNetwork(name, xml))
    reasons = ["changed live, without restarting the network"] if live_steps else []
    repair, why, repaired = _repair(ctx, name, live)
    live_steps += repair
    reasons += why
    fields += repaired
    if live.autostart != net.autostart:
        live_steps.append(SetNetworkAutostart(name, net.autostart))
        fields += (FieldDiff("autostart", live.autostart, net.autostart),)
        reasons = reasons or ["changed live, without restarting the network"]
    if not live_steps:
        return Change(Kind.NETWORK, name, ChangeClass.NOOP, fingerprint=fp)
    return Change(Kind.NETWORK, name, ChangeClass.UPDATE_LIVE, tuple(reasons), fields,
                  tuple(live_steps), fingerprint=fp)


def _repair(ctx: Context, name: str, live: LiveNetwork
            ) -> tuple[list[Step], list[str], tuple[FieldDiff, ...]]:
    """Steps, reasons and fields that bring back a network stopped, or whose bridge was deleted,
    outside kvmctl: libvirt then still calls it active, but its guests are cut off. Either way
    the running guests' NICs on it are plugged in again, as a replace does."""
    bridge = live.bridge if live.active else None
    if live.active and not (bridge and ctx.live.interfaces_listed
                            and bridge not in ctx.live.host_bridges):
        return [], [], ()
    users = _running_nics(ctx, name)
    guests = ", ".join(sorted({u.domain for u in users}))
    replug = (f"; the NICs of the running guests on it are plugged in again: {guests}"
              if users else "")
    if not live.active:
        return ([StartNetwork(name), *users],
                [f"the network is not running (stopped outside kvmctl): it is started{replug}"],
                (FieldDiff("active", False, True),))
    return ([RestartNetwork(name), *users],
            [f"its bridge {bridge} is gone from the host (deleted outside libvirt), which cuts "
             f"its guests off: the network is restarted{replug}"],
            (FieldDiff("bridge", f"{bridge} (missing on the host)", bridge),))


def _running_nics(ctx: Context, network: str) -> list[ReplugNic]:
    """A replug of every running guest's NIC on `network`."""
    found = []
    for dom in ctx.live.domains.values():
        if not dom.running:
            continue
        for key, value in facts.domain_facts(dom.live_xml or "").items():
            if isinstance(value, facts.NicFact) and (value.type, value.source) == (
                    "network", network):
                nic = device_element(dom.live_xml or "", key) or ""
                found.append(ReplugNic(dom.name, facts.key_id(key), nic, plug_again(nic)))
    return found


def _network_live_steps(name: str, changes: list[facts.FactChange], desired: str,
                        actual: str) -> list[Step]:
    steps: list[Step] = []

    def entry(command: NetworkCommand, section: NetworkSection, key: str) -> None:
        element = network_entry(desired if command is NetworkCommand.ADD else actual, section,
                                key)
        if element is not None:
            steps.append(UpdateNetwork(name, command, section, element))

    for change in changes:
        if change.field in ("dhcp.hosts", "dns.hosts"):
            section = NetworkSection.DHCP_HOST if change.field == "dhcp.hosts" else \
                NetworkSection.DNS_HOST
            for host in sorted(set(change.old or ()) - set(change.new or ())):
                entry(NetworkCommand.DELETE, section, host[0])
            for host in sorted(set(change.new or ()) - set(change.old or ())):
                entry(NetworkCommand.ADD, section, host[0])
        elif change.field == "dhcp.range":
            entry(NetworkCommand.DELETE, NetworkSection.DHCP_RANGE, "")
            entry(NetworkCommand.ADD, NetworkSection.DHCP_RANGE, "")
    return steps
