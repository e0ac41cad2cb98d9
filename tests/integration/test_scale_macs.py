"""10,000 VMs with no MAC written: they validate, apply and converge on the real libvirt with a
unique MAC each, and adding VMs in front of them moves none of their MACs.

Stopped VMs only (nothing boots): the cost is libvirt's defines, one read of the host and the
deletes. Names are of the form that makes 24-bit derived MACs collide (`...-vm-N`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from engine_support import Kvmctl, doc, vm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

COUNT = 10_000
_MAC = re.compile(r"<mac address='([0-9a-f:]{17})'")


@pytest.fixture
def kv(prefix: str, tmp_path: Path, cleanup) -> Kvmctl:
    return Kvmctl(prefix, tmp_path)


def _macs(conn, prefix: str) -> dict[str, list[str]]:
    return {d.name(): _MAC.findall(d.XMLDesc(0)) for d in conn.listAllDomains()
            if d.name().startswith(prefix)}


def test_ten_thousand_vms_without_macs_get_unique_stable_macs(kv, prefix, test_guest, conn):
    net = f"{prefix}net"
    docs = [doc("Network", net, {"mode": "isolated"})]
    docs += [vm(f"{prefix}vm-{n}", test_guest, interfaces=[{"network": net}])
             for n in range(COUNT)]
    manifest = kv.write("many.yaml", docs)
    kv.converge(manifest)
    before = _macs(conn, prefix)
    assert len(before) == COUNT
    every = [mac for macs in before.values() for mac in macs]
    assert len(every) == COUNT and len(set(every)) == COUNT

    # New VMs listed first take their MACs around the defined ones; nobody else moves.
    extra = [vm(f"{prefix}new-{n}", test_guest, interfaces=[{"network": net}])
             for n in range(200)]
    kv.write("many.yaml", docs[:1] + extra + docs[1:])
    kv.converge(manifest)
    after = _macs(conn, prefix)
    assert {name: after[name] for name in before} == before
    every = [mac for macs in after.values() for mac in macs]
    assert len(set(every)) == len(every) == COUNT + 200
    assert kv.run("destroy", "-y", "-f", manifest, *kv.engine_args()).code == 0
