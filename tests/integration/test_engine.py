"""The engine against a real libvirt: create, converge, drift, identity, prune, protect, saved
plans, conflicts, the project lock and an apply killed half-way.

No guest boots here (every VM is `state: stopped`): the tests that need a running guest are in
test_engine_live.py. Every object is named with the test's prefix, and `--project <prefix>`.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from engine_support import (
    URI,
    Kvmctl,
    assert_clean,
    change,
    disk,
    domain_xml,
    fields,
    host_ip,
    macs,
    network,
    pool,
    vm,
)

from kvmctl.host import records

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def kv(prefix: str, tmp_path: Path, cleanup) -> Kvmctl:
    return Kvmctl(prefix, tmp_path)


def _net_xml(conn, name: str) -> ET.Element:
    return ET.fromstring(conn.networkLookupByName(name).XMLDesc(
        libvirt.VIR_NETWORK_XML_INACTIVE))


# ---- create from empty, converge ---------------------------------------------------------------

def test_quickstart_like_set_converges(kv, prefix, free_subnet, test_guest, scratch_dir, conn):
    """The examples/quickstart shape (a NAT network, a VM with a reserved address) from empty."""
    subnet = free_subnet()
    net, name = f"{prefix}qs-net", f"{prefix}qs-vm"
    manifest = kv.write("qs.yaml", [
        network(net, subnet),
        vm(name, test_guest, log=scratch_dir / "qs-vm.log", cpus=1,
           interfaces=[{"network": net, "ip": host_ip(subnet, 10)}]),
    ])
    first = kv.plan(manifest)
    assert first.code == 2, str(first)
    assert f"Network/{net}" in first.stdout and f"VirtualMachine/{name}" in first.stdout
    applied = kv.converge(manifest)
    assert "Apply complete: 2 change(s) made." in applied.stdout
    mac = macs(domain_xml(conn, name))[0]
    hosts = _net_xml(conn, net).findall("ip/dhcp/host")
    assert [(h.get("mac"), h.get("ip")) for h in hosts] == [(mac, host_ip(subnet, 10))]
    assert conn.networkLookupByName(net).isActive()
    assert conn.lookupByName(name).isActive() == 0  # state: stopped


def test_rich_set_converges(kv, prefix, free_subnet, test_guest, scratch_dir, conn):
    """Pool, disk, two networks (DNS records, reservations), a VM with a disk and two NICs,
    autostart: apply from empty, then the plan is empty; libvirt has what was asked."""
    lan, iso = free_subnet(), free_subnet()
    p, d, n1, n2, name = (f"{prefix}{s}" for s in ("pool", "data", "lan", "iso", "app"))
    manifest = kv.write("rich.yaml", [
        pool(p, scratch_dir / "pool"),
        disk(d, p, "16MiB"),
        network(n1, lan, dns={"domain": "rich.test", "hosts": [
            {"ip": host_ip(lan, 5), "hostnames": ["files", "files.rich.test"]}]}),
        network(n2, iso, mode="isolated", autostart=False),
        vm(name, test_guest, log=scratch_dir / "app.log", autostart=True,
           cpus={"count": 1, "max": 2}, memory={"size": "128MiB", "max": "256MiB"},
           disks=[{"disk": d}],
           interfaces=[{"network": n1, "ip": host_ip(lan, 10)},
                       {"network": n2, "ip": host_ip(iso, 20), "mac": "52:54:00:0a:0b:0c"}]),
    ])
    applied = kv.converge(manifest)
    assert "Apply complete: 5 change(s) made." in applied.stdout, str(applied)

    dom = conn.lookupByName(name)
    assert dom.autostart() == 1
    mac1, mac2 = macs(domain_xml(conn, name))
    assert mac2 == "52:54:00:0a:0b:0c"
    lan_xml = _net_xml(conn, n1)
    assert [(h.get("mac"), h.get("ip")) for h in lan_xml.findall("ip/dhcp/host")] == \
        [(mac1, host_ip(lan, 10))]
    dns = lan_xml.find("dns/host")
    assert dns.get("ip") == host_ip(lan, 5)
    assert [h.text for h in dns.findall("hostname")] == ["files", "files.rich.test"]
    assert conn.networkLookupByName(n1).autostart() == 1
    assert conn.networkLookupByName(n2).autostart() == 0
    assert [(h.get("mac"), h.get("ip")) for h in _net_xml(conn, n2).findall("ip/dhcp/host")] \
        == [(mac2, host_ip(iso, 20))]
    vol = conn.storagePoolLookupByName(p).storageVolLookupByName(f"{d}.qcow2")
    assert vol.info()[1] == 16 * 1024 * 1024
    # get: the VM is listed for this project, with no pending restart
    rows = {r["name"]: r for r in kv.get("vms")}
    assert rows[name]["state"] == "shutoff" and rows[name]["autostart"] is True
    assert {r["name"] for r in kv.get("disks")} == {d}


# ---- drift ---------------------------------------------------------------------------------------

def test_drift_is_shown_and_repaired(kv, prefix, free_subnet, test_guest, scratch_dir, conn):
    subnet = free_subnet()
    net, name = f"{prefix}net", f"{prefix}vm"
    manifest = kv.write("drift.yaml", [
        network(net, subnet),
        vm(name, test_guest, memory="128MiB", interfaces=[{"network": net}]),
    ])
    kv.converge(manifest)

    # Drift made by hand with libvirt: autostart of both, and the VM's memory redefined.
    conn.lookupByName(name).setAutostart(1)
    conn.networkLookupByName(net).setAutostart(0)
    xml = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    xml = re.sub(r"<memory unit='KiB'>\d+</memory>", "<memory unit='KiB'>262144</memory>", xml)
    xml = re.sub(r"<currentMemory unit='KiB'>\d+</currentMemory>",
                 "<currentMemory unit='KiB'>262144</currentMemory>", xml)
    conn.defineXML(xml)
    assert conn.lookupByName(name).maxMemory() == 262144

    shown = kv.plan(manifest)
    assert shown.code == 2, str(shown)
    plan = kv.plan_json(manifest)
    vm_change = change(plan, f"VirtualMachine/{name}")
    assert {"autostart", "memory", "memory.max"} <= fields(vm_change), vm_change
    assert "autostart" in fields(change(plan, f"Network/{net}"))

    kv.converge(manifest)
    dom = conn.lookupByName(name)
    assert dom.autostart() == 0 and dom.maxMemory() == 131072
    assert conn.networkLookupByName(net).autostart() == 1


def test_definition_records_prove_unchanged_vms_and_never_hide_drift(kv, prefix, test_guest,
                                                                     conn):
    """A stopped VM kvmctl defined carries a definition record (host/records.py) that lets a
    plan skip it; every kind of edit behind kvmctl's back is still found."""
    names = [f"{prefix}rec{i}" for i in range(3)]
    manifest = kv.write("records.yaml", [vm(n, test_guest) for n in names])
    kv.converge(manifest)
    for name in names:
        xml = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        record = records.find_record(xml)
        assert record is not None and record.defined == records.config_digest(xml), xml

    # 0: vCPUs redefined with the record kept, as `virsh edit` keeps every metadata element.
    dom = conn.lookupByName(names[0])
    conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(
        "<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>2</vcpu>"))
    assert records.find_record(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) is not None
    # 1: memory changed through libvirt's own call, which rewrites the definition.
    conn.lookupByName(names[1]).setMaxMemory(262144)
    # 2: the record's digests forged to match nothing: compared in full, found equal.
    two = conn.lookupByName(names[2])
    two.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    f'<definition desired="{"0" * 64}" rendered="{"0" * 64}" '
                    f'defined="{"0" * 64}"/>', records.DEFINITION_KEY, records.DEFINITION_NS,
                    libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    plan = kv.plan_json(manifest)
    assert {"vcpus", "vcpus.max"} <= fields(change(plan, f"VirtualMachine/{names[0]}"))
    assert "memory.max" in fields(change(plan, f"VirtualMachine/{names[1]}"))
    assert change(plan, f"VirtualMachine/{names[2]}") is None  # no change: not listed
    kv.converge(manifest)
    # Redefined (0, 1) or found unchanged in full (2, whose forged record the apply replaced):
    # every record is new and holds.
    for name in names:
        xml = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        record = records.find_record(xml)
        assert record is not None and record.defined == records.config_digest(xml), name


def test_a_label_change_reaches_vms_and_networks(kv, prefix, free_subnet, test_guest, conn):
    net, name = f"{prefix}lnet", f"{prefix}lvm"

    def docs(team: str) -> list[dict]:
        labelled = [network(net, free_subnet_once), vm(name, test_guest,
                                                       interfaces=[{"network": net}])]
        for d in labelled:
            d["metadata"]["labels"] = {"team": team}
        return labelled

    free_subnet_once = free_subnet()
    kv.converge(kv.write("labels.yaml", docs("red")))
    manifest = kv.write("labels.yaml", docs("blue"))
    plan = kv.plan_json(manifest)
    for ref in (f"VirtualMachine/{name}", f"Network/{net}"):
        assert "labels" in fields(change(plan, ref)), plan
    kv.converge(manifest)
    assert 'key="team">blue<' in conn.lookupByName(name).XMLDesc(
        libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert 'key="team">blue<' in conn.networkLookupByName(net).XMLDesc(
        libvirt.VIR_NETWORK_XML_INACTIVE)


# ---- identity across a redefinition --------------------------------------------------------------

def test_uuid_and_macs_survive_redefinition(kv, prefix, free_subnet, test_guest, conn):
    subnet = free_subnet()
    net, name = f"{prefix}net", f"{prefix}vm"
    docs = [network(net, subnet),
            vm(name, test_guest, memory="128MiB",
               interfaces=[{"network": net, "ip": host_ip(subnet, 10)}, {"network": net}])]
    manifest = kv.write("id.yaml", docs)
    kv.converge(manifest)
    uuid, nics = conn.lookupByName(name).UUIDString(), macs(domain_xml(conn, name))
    assert len(set(nics)) == 2

    docs[1]["spec"].update(memory="192MiB", cpus=2)  # a change that redefines the domain
    manifest = kv.write("id.yaml", docs)
    plan = kv.plan_json(manifest)
    assert {"memory", "vcpus"} <= fields(change(plan, f"VirtualMachine/{name}"))
    kv.converge(manifest)
    assert conn.lookupByName(name).UUIDString() == uuid
    assert macs(domain_xml(conn, name)) == nics
    assert conn.lookupByName(name).maxMemory() == 192 * 1024

    docs[1]["spec"]["machine"] = "pc"  # another machine type: another PCI layout
    manifest = kv.write("id.yaml", docs)
    kv.converge(manifest)
    root = domain_xml(conn, name)
    assert root.find("os/type").get("machine").startswith("pc-i440fx")
    assert conn.lookupByName(name).UUIDString() == uuid
    assert macs(root) == nics


# ---- prune and protect -------------------------------------------------------------------------

def _unmanaged_domain(conn, name: str) -> None:
    conn.defineXML(f"""<domain type="qemu"><name>{name}</name><memory unit="MiB">64</memory>
      <os><type arch="x86_64">hvm</type></os></domain>""")


def test_prune_keeps_disks_foreign_and_unmanaged(kv, prefix, test_guest, scratch_dir, conn):
    p, d = f"{prefix}pool", f"{prefix}disk-b"
    a, b = f"{prefix}vm-a", f"{prefix}vm-b"
    unmanaged, other = f"{prefix}unmanaged", f"{prefix}other-vm"
    full = kv.write("prune.yaml", [pool(p, scratch_dir / "pool"), disk(d, p),
                                   vm(a, test_guest), vm(b, test_guest, disks=[{"disk": d}])])
    kv.converge(full)
    # Another project's VM, and a VM kvmctl never made, both named with this test's prefix.
    other_manifest = kv.write("other.yaml", [vm(other, test_guest)])
    kv.apply(other_manifest, project=f"{prefix}other")
    _unmanaged_domain(conn, unmanaged)

    smaller = kv.write("prune-v2.yaml", [pool(p, scratch_dir / "pool"), vm(a, test_guest)])
    without = kv.plan(smaller)
    assert without.code == 0, f"without --prune nothing is deleted:\n{without}"
    plan = kv.plan_json(smaller, "--prune")
    refs = {f"{c['kind']}/{c['name']}": c for c in plan["changes"]}
    assert set(refs) == {f"VirtualMachine/{b}", f"Disk/{d}"}, refs
    assert refs[f"VirtualMachine/{b}"]["class"] == "delete"
    assert refs[f"VirtualMachine/{b}"]["blocked"] is None
    assert "--prune-disks" in refs[f"Disk/{d}"]["blocked"]

    kv.apply(smaller, "--prune")
    names = {dom.name() for dom in conn.listAllDomains(0)}
    assert b not in names
    assert {a, unmanaged, other} <= names
    assert conn.storagePoolLookupByName(p).storageVolLookupByName(f"{d}.qcow2") is not None
    assert conn.lookupByName(unmanaged).XMLDesc(0).find("kvmctl") == -1  # still not ours
    assert [r["name"] for r in kv.get("vms", project=f"{prefix}other")] == [other]

    # destroy (without --with-disks) keeps the disk too, and says which flag would delete it
    everything = kv.write("prune-all.yaml", [pool(p, scratch_dir / "pool"), disk(d, p),
                                             vm(a, test_guest)])
    destroyed = kv.run("destroy", "-y", "-f", everything, *kv.engine_args())
    assert destroyed.code == 0, str(destroyed)
    assert f"Disk/{d}" in destroyed.stderr and "--with-disks" in destroyed.stderr
    assert "--prune-disks" not in destroyed.output
    names = {dom.name() for dom in conn.listAllDomains(0)}
    assert a not in names and {unmanaged, other} <= names


def test_protected_vm_blocks_its_delete(kv, prefix, test_guest, conn):
    keep, guarded = f"{prefix}keep", f"{prefix}guarded"
    manifest = kv.write("protect.yaml", [vm(keep, test_guest),
                                         vm(guarded, test_guest, protect=True)])
    kv.converge(manifest)
    smaller = kv.write("protect.yaml", [vm(keep, test_guest)])
    shown = kv.plan(smaller, "--prune")
    assert f"VirtualMachine/{guarded}" in shown.stdout
    assert "blocked" in shown.stdout and "protect" in shown.stdout, str(shown)
    plan = kv.plan_json(smaller, "--prune")
    c = change(plan, f"VirtualMachine/{guarded}")
    assert c["class"] == "delete" and "protect" in c["blocked"]
    applied = kv.apply(smaller, "--prune")
    assert f"VirtualMachine/{guarded}: done" not in applied.stdout
    assert conn.lookupByName(guarded).name() == guarded
    # destroy refuses it as well
    kv.write("protect-all.yaml", [vm(keep, test_guest), vm(guarded, test_guest, protect=True)])
    destroyed = kv.run("destroy", "-y", "-f", kv.workdir / f"{prefix}protect-all.yaml",
                       *kv.engine_args())
    assert destroyed.code == 0, str(destroyed)
    assert guarded in destroyed.stderr and "protect" in destroyed.stderr
    assert {dom.name() for dom in conn.listAllDomains(0)} & {keep, guarded} == {guarded}


# ---- saved plans ---------------------------------------------------------------------------------

def test_saved_plan_refused_after_drift(kv, prefix, test_guest, conn, tmp_path):
    name = f"{prefix}vm"
    docs = [vm(name, test_guest, memory="128MiB")]
    kv.converge(kv.write("saved.yaml", docs))
    docs[0]["spec"]["memory"] = "160MiB"
    manifest = kv.write("saved.yaml", docs)

    saved = tmp_path / "plan.json"
    made = kv.plan(manifest, "--out", saved)
    assert made.code == 2 and saved.is_file(), str(made)
    conn.lookupByName(name).setAutostart(1)  # drift after the plan was saved
    refused = kv.run("apply", "-y", saved)
    assert refused.code == 1, str(refused)
    assert f"VirtualMachine/{name}" in refused.stderr and "changed since" in refused.stderr
    assert conn.lookupByName(name).maxMemory() == 128 * 1024  # nothing applied

    again = tmp_path / "plan-2.json"
    assert kv.plan(manifest, "--out", again).code == 2
    applied = kv.run("apply", "-y", again)
    assert applied.code == 0, str(applied)
    assert conn.lookupByName(name).maxMemory() == 160 * 1024
    assert conn.lookupByName(name).autostart() == 0
    assert kv.plan(manifest).code == 0


# ---- conflicts -----------------------------------------------------------------------------------

def test_unmanaged_network_needs_adopt(kv, prefix, free_subnet, conn):
    subnet = free_subnet()
    net = f"{prefix}net"
    gateway, start, end = host_ip(subnet, 1), host_ip(subnet, 100), host_ip(subnet, 199)
    conn.networkDefineXML(f"""<network><name>{net}</name><forward mode="nat"/>
      <ip address="{gateway}" prefix="24"><dhcp><range start="{start}" end="{end}"/></dhcp>
      </ip></network>""")
    manifest = kv.write("adopt.yaml", [network(net, subnet)])

    refused = kv.plan(manifest)
    assert refused.code == 1, str(refused)
    assert f"Network/{net}" in refused.stderr and "--adopt" in refused.stderr
    assert kv.apply(manifest, expect=1).stderr.count("--adopt") >= 1
    assert "kvmctl" not in conn.networkLookupByName(net).XMLDesc(0)

    adopted = kv.plan_json(manifest, "--adopt")
    assert change(adopted, f"Network/{net}")["class"] == "update-live"
    kv.apply(manifest, "--adopt")
    xml = conn.networkLookupByName(net).XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
    assert f"<kvmctl:project>{prefix}</kvmctl:project>" in xml
    assert conn.networkLookupByName(net).isActive()
    assert kv.plan(manifest).code == 0  # owned now: no --adopt needed any more


def test_other_projects_objects_are_never_taken(kv, prefix, free_subnet):
    subnet = free_subnet()
    net = f"{prefix}net"
    manifest = kv.write("mine.yaml", [network(net, subnet)])
    kv.apply(manifest, project=f"{prefix}other")
    for extra in ((), ("--adopt",)):
        refused = kv.plan(manifest, *extra)
        assert refused.code == 1, str(refused)
        assert f"{prefix}other" in refused.stderr and f"Network/{net}" in refused.stderr


# ---- the project lock --------------------------------------------------------------------------

def _read_until(fd: int, pattern: str, timeout: float) -> str:
    text, deadline = "", time.monotonic() + timeout
    while pattern not in text:
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} in:\n{text}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            text += chunk.decode(errors="replace")
    return text


def test_concurrent_applies_are_serialised(kv, prefix, free_subnet, test_guest):
    """Apply A stops at its confirmation prompt on a terminal, holding the project's lock;
    apply B fails at once with --lock-timeout 0, naming the holder, and with a timeout waits
    for A and then succeeds."""
    subnet = free_subnet()
    net = f"{prefix}net"
    manifest = kv.write("lock.yaml", [network(net, subnet),
                                      vm(f"{prefix}vm", test_guest,
                                         interfaces=[{"network": net}])])
    args = ["apply", "-f", manifest, *kv.engine_args()]
    master, slave = pty.openpty()
    holder = subprocess.Popen(kv.subprocess_argv(*args), stdin=slave, stdout=slave,
                              stderr=slave, close_fds=True)
    os.close(slave)
    try:
        shown = _read_until(master, "Only 'yes' is accepted", 60)
        assert "to create" in shown

        failing = subprocess.run(kv.subprocess_argv(*args, "-y", "--lock-timeout", "0"),
                                 capture_output=True, text=True, timeout=60)
        assert failing.returncode == 1, failing
        assert_clean(failing.stdout + failing.stderr)
        assert "holds the lock" in failing.stderr and f"pid {holder.pid}" in failing.stderr, \
            failing.stderr

        waiting = subprocess.Popen(kv.subprocess_argv(*args, "-y", "--lock-timeout", "120"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        assert waiting.poll() is None, "the second apply did not wait for the lock"
        os.write(master, b"yes\n")
        tail = _read_until(master, "Apply complete", 60)
        assert holder.wait(60) == 0, tail
        out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, out + err
        assert_clean(out + err)
        assert f"waiting for the lock held by pid {holder.pid}" in err, err
        assert "No changes" in out, out  # A made everything; B found nothing left to do
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        os.close(master)
    assert kv.plan(manifest).code == 0


# ---- an apply killed half-way --------------------------------------------------------------------

def test_killed_apply_converges_when_run_again(kv, prefix, free_subnet, test_guest, conn):
    subnet = free_subnet()
    net = f"{prefix}net"
    names = [f"{prefix}vm{i:02d}" for i in range(10)]
    manifest = kv.write("kill.yaml", [network(net, subnet)] + [
        vm(n, test_guest, autostart=True,
           interfaces=[{"network": net, "ip": host_ip(subnet, 10 + i)}])
        for i, n in enumerate(names)])
    child = subprocess.Popen(
        kv.subprocess_argv("apply", "-y", "-f", manifest, *kv.engine_args(),
                           "--parallelism", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen = []
    try:
        for line in child.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if re.match(r"^VirtualMachine/\S+: done$", line.strip()):
                child.send_signal(signal.SIGKILL)
                break
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
        seen.append(child.stdout.read())  # type: ignore[union-attr]
    output = "".join(seen)
    assert_clean(output)
    assert child.returncode == -signal.SIGKILL, output
    assert "Apply complete" not in output, f"the apply finished before it was killed:\n{output}"
    defined = [n for n in names if n in {d.name() for d in conn.listAllDomains(0)}]
    assert 0 < len(defined) < len(names), output

    again = kv.apply(manifest)
    assert "already exists" not in again.output
    assert kv.plan(manifest).code == 0
    assert {d.name() for d in conn.listAllDomains(0)} >= set(names)
    assert all(conn.lookupByName(n).autostart() == 1 for n in names)
    hosts = _net_xml(conn, net).findall("ip/dhcp/host")
    assert sorted(h.get("ip") for h in hosts) == sorted(host_ip(subnet, 10 + i)
                                                       for i in range(10))


def test_create_that_finds_its_own_object_defined_meanwhile(kv, prefix, free_subnet,
                                                            test_guest, conn):
    """A killed apply's define can land in libvirtd after the next run read the host: that run
    then creates what already exists. It takes over the project's own object (its uuid), and
    still refuses anybody else's."""
    from kvmctl.apply.executor import Executor
    from kvmctl.errors import KvmctlError
    from kvmctl.host.hypervisor import Hypervisor
    from kvmctl.host.state import LiveState
    from kvmctl.manifest import documents, validate
    from kvmctl.plan.steps import DefineDomain
    from kvmctl.render import definitions as render

    subnet, net, name = free_subnet(), f"{prefix}net", f"{prefix}vm"
    manifest = kv.write("race.yaml", [network(net, subnet), vm(name, test_guest)])
    kv.converge(manifest)
    uuid = conn.lookupByName(name).UUIDString()
    model = validate.validate(documents.load([str(manifest)]))
    xml = render.domain_xml(model.vms[0], model, prefix, "qemu")  # as a create renders it
    hv = Hypervisor(URI)
    try:
        Executor(hv, LiveState(), prefix).run(DefineDomain(name, xml))
        assert conn.lookupByName(name).UUIDString() == uuid
        with pytest.raises(KvmctlError, match="already exists"):
            Executor(hv, LiveState(), prefix + "other").run(DefineDomain(name, xml))
    finally:
        hv.close()
    assert kv.plan(manifest).code == 0
