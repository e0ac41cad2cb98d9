"""scripts/test-hosts: three independent libvirt hosts, over qemu+unix and qemu+ssh."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from testhosts import TestHost, hosts, parse_env


@pytest.fixture(scope="module")
def host_conns(session_hosts) -> Iterator[list[libvirt.virConnect]]:
    conns = [libvirt.open(h.uri) for h in session_hosts]
    yield conns
    for c in conns:
        c.close()


def _sweep(conns, prefix: str) -> None:
    """Remove this test's networks and pools (named with ``prefix``) from every connection."""
    for c in conns:
        for net in c.listAllNetworks(0):
            if net.name().startswith(prefix):
                if net.isActive():
                    net.destroy()
                if net.isPersistent():
                    net.undefine()
        for pool in c.listAllStoragePools(0):
            if pool.name().startswith(prefix):
                if pool.isActive():
                    pool.destroy()
                pool.delete(0)
                pool.undefine()


def _main_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link"], check=True, capture_output=True, text=True).stdout
    return {link["ifname"] for link in json.loads(out or "[]")}


def test_transports_and_idempotent_up(session_hosts: list[TestHost]):
    assert [h.name for h in session_hosts] == ["h1", "h2", "h3"]
    assert session_hosts[0].uri.startswith("qemu+unix:///system?socket=")
    assert any(h.uri.startswith("qemu+ssh://") for h in session_hosts)
    assert len({h.uri for h in session_hosts}) == 3
    assert len({h.root for h in session_hosts}) == 3
    # up again while running: the same hosts, nothing restarted
    pids = [(h.root / "pids" / "libvirtd.pid").read_text().strip() for h in session_hosts]
    assert hosts(3) == session_hosts
    assert [(h.root / "pids" / "libvirtd.pid").read_text().strip() for h in session_hosts] == pids
    assert parse_env((Path(session_hosts[0].root).parent / "hosts.env").read_text())[:3] == \
        session_hosts


def test_hosts_are_distinct_daemons(session_hosts, host_conns, conn, prefix):
    everyone = [*host_conns, conn]
    try:
        for i, c in enumerate(host_conns, 1):
            c.networkDefineXML(f"<network><name>{prefix}n{i}</name>"
                               f"<bridge name='{prefix}b{i}'/></network>")
        for i, c in enumerate(host_conns, 1):
            mine = sorted(n for n in c.listNetworks() + c.listDefinedNetworks()
                          if n.startswith(prefix))
            assert mine == [f"{prefix}n{i}"], f"{session_hosts[i - 1].name} sees {mine}"
        on_main = [n for n in conn.listNetworks() + conn.listDefinedNetworks()
                   if n.startswith(prefix)]
        assert on_main == []
    finally:
        _sweep(everyone, prefix)


def test_pool_paths_are_private(session_hosts, host_conns, prefix):
    h1, h2, h3 = session_hosts
    target = f"/var/lib/libvirt/images/{prefix}pool"
    try:
        pool = host_conns[1].storagePoolDefineXML(
            f"<pool type='dir'><name>{prefix}p</name><target><path>{target}</path></target></pool>")
        pool.build(0)
        pool.create(0)
        assert h2.outside(target) == h2.root / "lib" / "images" / f"{prefix}pool"
        assert h2.outside(target).is_dir()
        assert not Path(target).exists()  # not in the main daemon's /var/lib/libvirt
        assert not h1.outside(target).exists()
        assert not h3.outside(target).exists()
    finally:
        _sweep(host_conns, prefix)
    assert not h2.outside(target).exists()


def test_nat_network_stays_in_its_namespace(session_hosts, host_conns, conn, prefix, free_subnet):
    h2 = session_hosts[1]
    c2 = host_conns[1]
    subnet = free_subnet()
    gw, first, last = subnet[1], subnet[10], subnet[50]
    bridge = f"{prefix}br"
    try:
        net = c2.networkDefineXML(
            f"<network><name>{prefix}nat</name><forward mode='nat'/><bridge name='{bridge}'/>"
            f"<ip address='{gw}' prefix='24'><dhcp><range start='{first}' end='{last}'/></dhcp>"
            "</ip></network>")
        net.create()
        assert net.isActive()
        assert bridge not in _main_links()
        lpid = (h2.root / "pids" / "libvirtd.pid").read_text().strip()
        inside = subprocess.run(["nsenter", "-t", lpid, "-n", "ip", "-j", "link"], check=True,
                                capture_output=True, text=True).stdout
        assert bridge in {link["ifname"] for link in json.loads(inside)}
        assert f"{prefix}nat" not in conn.listNetworks() + conn.listDefinedNetworks()
    finally:
        _sweep(host_conns, prefix)
    assert bridge not in _main_links()
