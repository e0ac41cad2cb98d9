"""Wait until VMs that should run are running and have an address.

Addresses come from the DHCP leases of libvirt networks and, where the guest agent is enabled,
from the agent; both are matched to the VM's NICs by MAC.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import HypervisorError
from ..host.hypervisor import Hypervisor
from ..manifest.model import ManifestSet, VirtualMachine

Leases = dict[str, list[dict[str, Any]]]  # network name -> libvirt's DHCP lease records


@dataclass(frozen=True)
class VmAddresses:
    name: str
    state: str
    addresses: tuple[tuple[str, str], ...]  # (mac, ip)


def nic_addresses(nics: Iterable[tuple[str, str | None]], leases: Leases,
                  agent: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(mac, IPv4) of each NIC given as (mac, network): DHCP leases of that NIC's own network
    only (the same MAC may hold a lease elsewhere), then what the guest agent reports."""
    found: list[tuple[str, str]] = []
    for mac, network in nics:
        for lease in leases.get(network or "", []):
            if (lease.get("mac") or "").lower() == mac:
                found.append((mac, lease["ipaddr"]))
        for ip in agent.get(mac, []):
            if (mac, ip) not in found and ":" not in ip:
                found.append((mac, ip))
    return found


def addresses(hv: Hypervisor, vm: VirtualMachine, leases: Leases) -> VmAddresses:
    try:
        state = hv.domain_state(vm.meta.name)
    except HypervisorError:
        return VmAddresses(vm.meta.name, "absent", ())
    agent = hv.agent_addresses(vm.meta.name) if vm.guest_agent and state == "running" else {}
    nics = [(nic.mac, nic.network) for nic in vm.interfaces]
    return VmAddresses(vm.meta.name, state, tuple(nic_addresses(nics, leases, agent)))


def read_leases(hv: Hypervisor, m: ManifestSet) -> Leases:
    leases: Leases = {}
    for net in m.networks:
        try:
            leases[net.meta.name] = hv.dhcp_leases(net.meta.name)
        except HypervisorError:
            leases[net.meta.name] = []
    return leases


def wait(hv: Hypervisor, m: ManifestSet, timeout: float,
         progress: Callable[[str], object] | None = None) -> tuple[list[VmAddresses], list[str]]:
    """(ready VMs, problems of those that did not come up in time)."""
    wanted = [vm for vm in m.vms if vm.state == "running"]
    start = time.monotonic()
    deadline, next_note = start + timeout, start + 15
    ready: dict[str, VmAddresses] = {}
    while True:
        leases = read_leases(hv, m)
        for vm in wanted:
            if vm.meta.name in ready:
                continue
            seen = addresses(hv, vm, leases)
            needs_ip = any(n.network for n in vm.interfaces) or vm.guest_agent
            if seen.state == "running" and (seen.addresses or not needs_ip):
                ready[vm.meta.name] = seen
                if progress:
                    ips = ", ".join(ip for _, ip in seen.addresses) or "no address needed"
                    progress(f"{vm.meta.name}: running, {ips} "
                             f"({time.monotonic() - start:.0f} s)")
        now = time.monotonic()
        if len(ready) == len(wanted) or now >= deadline:
            break
        if progress and now >= next_note:
            waiting = ", ".join(vm.meta.name for vm in wanted if vm.meta.name not in ready)
            progress(f"still waiting for {waiting} ({now - start:.0f} s)")
            next_note = now + 15
        time.sleep(1)
    problems = []
    for vm in wanted:
        if vm.meta.name not in ready:
            seen = addresses(hv, vm, read_leases(hv, m))
            problems.append(f"{vm.meta.name}: {seen.state}, no address after {timeout:g} s "
                            "(no DHCP lease for its MACs" +
                            (" and no answer from the guest agent)" if vm.guest_agent else ")"))
    return list(ready.values()), problems
