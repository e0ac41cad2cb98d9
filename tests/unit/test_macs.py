"""Derived MACs: unique in the manifest set and on the host, stable across runs, and a defined
VM's MACs never move when other VMs come or go."""

from __future__ import annotations

from itertools import count

import yaml

from kvmctl.manifest import checks, documents, validate
from kvmctl.manifest.model import ManifestSet, derived_mac

KERNEL = "/var/cache/kvmctl/test-guest/vmlinuz"


def manifest(names: list[str], macs: dict[str, str] | None = None) -> str:
    docs = [{"apiVersion": "kvmctl/v1", "kind": "Network", "metadata": {"name": "n"},
             "spec": {"mode": "isolated"}}]
    for name in names:
        nic = {"network": "n", **({"mac": macs[name]} if macs and name in macs else {})}
        docs.append({"apiVersion": "kvmctl/v1", "kind": "VirtualMachine",
                     "metadata": {"name": name},
                     "spec": {"boot": {"kernel": KERNEL}, "interfaces": [nic]}})
    return yaml.safe_dump_all(docs)


def model(names: list[str], host: dict[str, tuple[str, ...]] | None = None,
          macs: dict[str, str] | None = None) -> ManifestSet:
    docs = documents.parse_text(manifest(names, macs), "m.yaml")
    return validate.validate(docs, checks.HostFacts(domain_macs=host or {}))


def mac_of(m: ManifestSet, name: str) -> str:
    return next(vm.interfaces[0].mac for vm in m.vms if vm.meta.name == name)


def colliding_pair() -> tuple[str, str]:
    """Two names `x-vm-N` whose first derived MACs are the same (24 bits: found quickly)."""
    seen: dict[str, str] = {}
    for n in count():
        name = f"x-vm-{n}"
        mac = derived_mac(name, 0)
        if mac in seen:
            return seen[mac], name
        seen[mac] = name
    raise AssertionError("unreachable")


def test_ten_thousand_vms_without_macs_validate_with_unique_macs() -> None:
    m = model([f"x-vm-{n}" for n in range(10_000)])
    macs = [nic.mac for vm in m.vms for nic in vm.interfaces]
    assert len(set(macs)) == 10_000


def test_a_collision_takes_the_next_candidate_and_the_first_name_keeps_its_mac() -> None:
    first, second = colliding_pair()
    m = model([first, second])
    assert mac_of(m, first) == derived_mac(first, 0)
    assert mac_of(m, second) == derived_mac(second, 0, 1)


def test_a_defined_vm_keeps_its_mac_when_the_vm_it_collided_with_goes() -> None:
    first, second = colliding_pair()
    before = model([first, second])
    host = {first: (mac_of(before, first),), second: (mac_of(before, second),)}
    after = model([second], {second: host[second]})
    assert mac_of(after, second) == derived_mac(second, 0, 1)  # did not move back to attempt 0


def test_a_defined_vm_keeps_its_mac_when_a_vm_listed_before_it_is_added() -> None:
    first, second = colliding_pair()
    alone = model([second])
    assert mac_of(alone, second) == derived_mac(second, 0)
    both = model([first, second], {second: (mac_of(alone, second),)})
    assert mac_of(both, second) == derived_mac(second, 0)  # the defined VM keeps it
    assert mac_of(both, first) == derived_mac(first, 0, 1)  # the new one moves on


def test_derived_macs_avoid_every_mac_on_the_host_and_every_written_one() -> None:
    taken = derived_mac("web", 0)
    on_host = model(["web"], {"someone-elses-vm": (taken,)})
    assert mac_of(on_host, "web") == derived_mac("web", 0, 1)
    written = model(["web", "db"], macs={"db": taken})
    assert mac_of(written, "db") == taken
    assert mac_of(written, "web") == derived_mac("web", 0, 1)


def test_derived_macs_are_the_same_on_every_run() -> None:
    assert model(["web"]).vms[0].interfaces[0].mac == model(["web"]).vms[0].interfaces[0].mac
    # Pinned: a change of the derivation would move the MAC (and the DHCP lease) of every
    # VM defined before it.
    assert (derived_mac("web", 0), derived_mac("web", 0, 1)) == (
        "52:54:00:64:32:bd", "52:54:00:d5:27:2b")
