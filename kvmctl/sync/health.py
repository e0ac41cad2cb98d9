"""The health of each declared object, read from its host as a person would check it: a VM runs
as declared, has its address and (where enabled) a guest agent that answers; a network is
active with its bridge; a pool is active; a disk exists with its declared size.

DHCP leases are read once per network, the guest agent is pinged only for running VMs that
enable it: a round over a thousand VMs costs a few calls more than its read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import HypervisorError
from ..host import facts
from ..host.hypervisor import Hypervisor
from ..host.state import LiveState
from ..kinds import Kind
from ..manifest.model import ManifestSet, VirtualMachine
from .status import Health


@dataclass
class HostProbe:
    """One host's live state and the calls health needs, each made at most once per round."""

    hv: Hypervisor
    live: LiveState
    local: bool  # the host is this machine: its bridges can be seen in /sys/class/net
    _leases: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def leases(self, network: str) -> list[dict[str, Any]]:
        if network not in self._leases:
            try:
                self._leases[network] = self.hv.dhcp_leases(network)
            except HypervisorError:
                self._leases[network] = []
        return self._leases[network]


def object_health(kind: str, name: str, manifest: ManifestSet, probe: HostProbe
                  ) -> tuple[Health, str]:
    """(health, why it is not Healthy) of one declared object on its host."""
    live = probe.live
    if kind == Kind.VM:
        vm = next((v for v in manifest.vms if v.meta.name == name), None)
        return _vm_health(vm, name, probe) if vm is not None else (Health.UNKNOWN, "")
    if kind == Kind.NETWORK:
        net = live.networks.get(name)
        if net is None:
            return Health.MISSING, "not defined on its host"
        if not net.active:
            return Health.DEGRADED, "defined, not active"
        bridge = net.bridge
        if probe.local and bridge and not os.path.isdir(f"/sys/class/net/{bridge}"):
            return Health.DEGRADED, f"active, but its bridge {bridge} is missing"
        return Health.HEALTHY, ""
    if kind == Kind.POOL:
        pool = live.pools.get(name)
        if pool is None:
            return Health.MISSING, "not defined on its host"
        if pool.target_missing:
            return Health.DEGRADED, f"its directory {pool.path} is gone"
        return (Health.HEALTHY, "") if pool.active else (Health.DEGRADED, "defined, not active")
    if kind == Kind.DISK:
        disk = next((d for d in manifest.disks if d.meta.name == name), None)
        if disk is None:
            return Health.UNKNOWN, ""
        vol = live.volume(disk.pool, disk.volume)
        if vol is None:
            return Health.MISSING, f"no volume {disk.volume} in pool {disk.pool}"
        if vol.capacity_bytes < disk.size_bytes:
            return Health.DEGRADED, (f"{vol.capacity_bytes} bytes, declared "
                                     f"{disk.size_bytes}")
        return Health.HEALTHY, ""
    if kind == Kind.IMAGE:
        image = next((i for i in manifest.images if i.meta.name == name), None)
        if image is None:
            return Health.UNKNOWN, ""
        present = live.volume(image.pool, image.volume) is not None
        return (Health.HEALTHY, "") if present else (
            Health.MISSING, f"no volume {image.volume} in pool {image.pool}")
    return Health.HEALTHY, ""  # a seed: its VM's health says what matters


def _vm_health(vm: VirtualMachine, name: str, probe: HostProbe) -> tuple[Health, str]:
    d = probe.live.domains.get(name)
    if d is None:
        return Health.MISSING, "not defined on its host"
    if vm.state == "stopped":
        return (Health.HEALTHY, "") if not d.running else (
            Health.DEGRADED, f"{d.state}, declared stopped")
    if d.state != "running":  # shut off, paused, crashed...
        return Health.DEGRADED, f"{d.state}, declared running"
    nics = [(facts.key_id(key), nic.source if nic.type == "network" else None)
            for key, nic in facts.domain_facts(d.live_xml or d.inactive_xml).items()
            if isinstance(nic, facts.NicFact)]
    agent_ok = probe.hv.agent_answers(name) if vm.guest_agent else True
    wanted = [(mac, net) for mac, net in nics if net]
    if wanted or vm.guest_agent:
        agent = probe.hv.agent_addresses(name) if vm.guest_agent and agent_ok else {}
        leases = {net: probe.leases(net) for _, net in wanted}
        from ..apply.readiness import nic_addresses
        if not nic_addresses(wanted or nics, leases, agent):
            return Health.PROGRESSING, "running, no address yet"
    if not agent_ok:
        return Health.DEGRADED, "running, the guest agent does not answer"
    return Health.HEALTHY, ""
