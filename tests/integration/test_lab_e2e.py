"""The end-to-end proof: a whole lab through the real CLI, with guests that boot and report.

One test, in steps (each a function below, run in order, sharing a ``Lab``):

1. apply a lab: a dir pool, an Image from the test guest's image.raw, a root overlay Disk, a
   64MiB data Disk, a NAT and an isolated network, a host bridge made here, four VMs booting the
   test guest kernel directly (web and db on NAT with reserved IPs and cloud-init, probe on the
   isolated network, bridged on the host bridge);
2. web and db get exactly their reserved IPs (``get vms``, DHCP leases, the guest's own
   KVMCTL-LEASE) and read their cloud-init seeds (KVMCTL-SEED);
3. a second plan is empty;
4. db's data disk grows 64MiB -> 96MiB and its vCPUs 1 -> 2, live, without a reboot;
5. db writes a marker on its data disk, then a change that needs a restart (machine pc -> q35)
   restarts it (onRestartNeeded: restart) and the marker is still there;
6. a userData change plans as a seed rebuild only (masked), disks untouched;
7. db leaves the manifests: --prune deletes the domain and keeps its data disk;
8. destroy (without, then with --with-disks) leaves nothing of the lab on the host.

Guests are slow here (TCG on 2 shared cores): waits are generous, boots are as few as possible.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guestlog import SerialLog, fields  # noqa: E402
from lab_support import (  # noqa: E402
    Kvmctl,
    add_bridge,
    boot,
    changes_by_ref,
    del_link,
    dhcp_leases,
    disk,
    dnsmasq_running,
    download,
    find,
    forget_stale_network_files,
    image,
    leftovers,
    links,
    nat_network,
    pool,
    vm,
    volume_names,
)

MiB = 1024 * 1024
BOOT_TIMEOUT = 420  # boot + DHCP of several TCG guests at once on a busy 2-core host
MASK = "(sensitive value hidden)"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]


@dataclass
class Lab:
    k: Kvmctl
    conn: object
    prefix: str
    scratch: Path
    docs: list = field(default_factory=list)
    nat: object = None
    iso: object = None

    def name(self, short: str) -> str:
        return self.prefix + short

    def doc(self, kind: str, short: str) -> dict:
        return find(self.docs, kind, self.name(short))

    def vm_spec(self, short: str) -> dict:
        return self.doc("VirtualMachine", short)["spec"]

    def write(self) -> None:
        self.k.write(self.docs)

    def log(self, short: str) -> SerialLog:
        return SerialLog(self.scratch / f"{short}.log")

    def alive(self, short: str):
        dom = self.conn.lookupByName(self.name(short))
        return dom.isActive

    def wait(self, short: str, pattern: str, since: int = 0, timeout: float = BOOT_TIMEOUT):
        return self.log(short).wait_for(pattern, timeout, since=since, alive=self.alive(short))

    def ip(self, host: int, net=None) -> str:
        return str((net or self.nat).network_address + host)


def _lab_docs(lab: Lab, guest) -> list[dict]:
    p = lab.prefix
    return [
        pool(f"{p}pool", lab.scratch / "pool"),
        image(f"{p}base", f"{p}pool", path=str(guest.image), format="raw"),
        disk(f"{p}web-root", f"{p}pool", "32MiB", image=f"{p}base"),
        disk(f"{p}db-data", f"{p}pool", "64MiB", format="qcow2"),
        nat_network(f"{p}nat", lab.nat, bridge=f"{p}vn"),
        nat_network(f"{p}iso", lab.iso, bridge=f"{p}vi", mode="isolated"),
        vm(f"{p}web", cpus=1, memory="192MiB", boot=boot(guest),
           disks=[{"disk": f"{p}web-root"}],
           interfaces=[{"network": f"{p}nat", "ip": lab.ip(10)}],
           cloudInit={"hostname": "web", "userData": {
               "write_files": [{"path": "/etc/motd", "content": "web, managed by kvmctl\n"}]}},
           console={"log": str(lab.scratch / "web.log")}),
        vm(f"{p}db", cpus={"count": 1, "max": 2}, memory="192MiB", machine="pc",
           boot=boot(guest), disks=[{"disk": f"{p}db-data"}],
           interfaces=[{"network": f"{p}nat", "ip": lab.ip(11), "mac": "52:54:00:0a:d5:0b"}],
           cloudInit={"hostname": "db", "userData": "#cloud-config\nruncmd:\n  - [true]\n"},
           console={"log": str(lab.scratch / "db.log")}),
        vm(f"{p}probe", memory="160MiB", boot=boot(guest),
           interfaces=[{"network": f"{p}iso"}],
           console={"log": str(lab.scratch / "probe.log")}),
        vm(f"{p}bridged", memory="160MiB", boot=boot(guest, "console=ttyS0 kvmctl.dhcp=0"),
           interfaces=[{"bridge": f"{p}br"}],
           console={"log": str(lab.scratch / "bridged.log")}),
    ]


def _expected_instance_id(lab: Lab, short: str) -> str:
    from kvmctl.manifest.cloudinit import seed_content
    ci = lab.vm_spec(short)["cloudInit"]
    return seed_content(lab.name(short), ci.get("hostname"), ci.get("userData"), None,
                        [], None).instance_id


# --- the steps -----------------------------------------------------------------------------------


def step1_apply_the_lab(lab: Lab) -> None:
    add_bridge(lab.name("br"))
    lab.write()
    plan = changes_by_ref(lab.k.plan_json())
    assert {c["class"] for c in plan.values()} == {"create"}, plan
    assert len(plan) == 12, sorted(plan)  # 1 pool, 1 image, 2 disks, 2 seeds, 2 networks, 4 VMs
    r = lab.k.apply("--wait", "--wait-timeout", str(BOOT_TIMEOUT))
    assert "Apply complete: 12 change(s) made." in r.stdout, str(r)
    for short in ("web", "db", "probe", "bridged"):
        dom = lab.conn.lookupByName(lab.name(short))
        assert dom.isActive(), short
        assert "<domain type='qemu'" in dom.XMLDesc(0), short


def step2_reserved_ips_and_seeds(lab: Lab) -> None:
    rows = {r["name"]: r for r in lab.k.ok("get", "vms", "-o", "json").json()}
    assert set(rows) == {lab.name(s) for s in ("web", "db", "probe", "bridged")}, rows
    leases = {lease["mac"]: lease["ipaddr"] for lease in dhcp_leases(lab.conn, lab.name("nat"))}
    for short, host in (("web", 10), ("db", 11)):
        want = lab.ip(host)
        mac = lab.vm_spec(short)["interfaces"][0].get("mac") or _mac_of(lab, short)
        assert rows[lab.name(short)]["state"] == "running"
        assert rows[lab.name(short)]["addresses"] == [want], rows[lab.name(short)]
        assert leases.get(mac) == want, leases
        m = lab.wait(short, r"^KVMCTL-LEASE iface=eth0 .*$")
        assert fields(m.group(0)) == {"iface": "eth0", "mac": mac, "ip": want}, m.group(0)
        m = lab.wait(short, r"^KVMCTL-SEED .*$")
        assert fields(m.group(0)) == {"instance-id": _expected_instance_id(lab, short),
                                      "local-hostname": short}, m.group(0)
        assert len(lab.log(short).kvmctl_lines("LEASE")) == 1, lab.log(short).tail()
    # db's data disk and the overlay root disk are seen with their sizes.
    lab.wait("db", r"^KVMCTL-DISK dev=vda bytes=67108864$")
    lab.wait("web", r"^KVMCTL-DISK dev=vda bytes=33554432$")
    # probe gets an address from the isolated network's range; bridged is on the host bridge.
    m = lab.wait("probe", r"^KVMCTL-LEASE iface=eth0 .*$")
    ip = fields(m.group(0))["ip"]
    assert ip in {lab.ip(h, lab.iso) for h in range(100, 200)}, m.group(0)
    assert rows[lab.name("probe")]["addresses"] in ([], [ip])  # read before or after the lease
    lab.wait("bridged", r"^KVMCTL-READY$")
    ports = subprocess.run(["ip", "-j", "link", "show", "master", lab.name("br")], check=True,
                           capture_output=True, text=True).stdout
    assert len(json.loads(ports or "[]")) == 1, ports
    assert not lab.log("web").kvmctl_lines("WARN") and not lab.log("db").kvmctl_lines("WARN")


def _mac_of(lab: Lab, short: str) -> str:
    xml = lab.conn.lookupByName(lab.name(short)).XMLDesc(0)
    return re.search(r"<mac address='([0-9a-f:]+)'/>", xml).group(1)


def step3_second_plan_is_empty(lab: Lab) -> None:
    r = lab.k("plan", "-f", lab.k.dir, "--detailed-exitcode")
    assert r.code == 0, str(r)
    assert "No changes" in r.stdout


def step4_grow_disk_and_cpus_live(lab: Lab) -> None:
    log = lab.log("db")
    mark = log.mark()
    lab.doc("Disk", "db-data")["spec"]["size"] = "96MiB"
    lab.vm_spec("db")["cpus"]["count"] = 2
    lab.write()
    plan = changes_by_ref(lab.k.plan_json())
    assert set(plan) == {f"Disk/{lab.name('db-data')}", f"VirtualMachine/{lab.name('db')}"}, plan
    d, v = plan[f"Disk/{lab.name('db-data')}"], plan[f"VirtualMachine/{lab.name('db')}"]
    assert d["class"] == "update-live" and [(f["field"], f["old"], f["new"])
                                            for f in d["fields"]] == [("size", "64MiB", "96MiB")]
    assert v["class"] == "update-live", v
    assert ("vcpus", 1, 2) in [(f["field"], f["old"], f["new"]) for f in v["fields"]], v
    lab.k.apply()
    lab.wait("db", r"^KVMCTL-DISK dev=vda bytes=100663296$", since=mark, timeout=120)
    lab.wait("db", r"^KVMCTL-CPUS online=2$", since=mark, timeout=120)
    assert len(log.findall(r"^KVMCTL-BOOT ok$")) == 1, log.tail()
    assert lab.conn.lookupByName(lab.name("db")).isActive()
    assert lab.k("plan", "-f", lab.k.dir, "--detailed-exitcode").code == 0


def step5_marker_survives_a_restart(lab: Lab) -> None:
    log = lab.log("db")
    spec = lab.vm_spec("db")
    # 5a: boot once with kvmctl.write_marker: a restart-class change, applied by a restart.
    mark = log.mark()
    spec["boot"]["cmdline"] = "console=ttyS0 kvmctl.write_marker=keep-me"
    spec["onRestartNeeded"] = "restart"
    spec["shutdownTimeout"] = 3
    lab.write()
    v = changes_by_ref(lab.k.plan_json())[f"VirtualMachine/{lab.name('db')}"]
    assert v["class"] == "update-restart", v
    lab.k.apply()
    lab.wait("db", r"^KVMCTL-MARKER-WRITTEN dev=vda text=keep-me$", since=mark)
    assert len(log.findall(r"^KVMCTL-BOOT ok$")) == 2, log.tail()
    # 5b: cmdline back and machine pc -> q35: one more restart; the marker is read back.
    mark = log.mark()
    spec["boot"]["cmdline"] = "console=ttyS0"
    spec["machine"] = "q35"
    lab.write()
    v = changes_by_ref(lab.k.plan_json())[f"VirtualMachine/{lab.name('db')}"]
    assert v["class"] == "update-restart", v
    assert ("machine", "pc", "q35") in [(f["field"], f["old"], f["new"]) for f in v["fields"]]
    lab.k.apply()
    lab.wait("db", r"^KVMCTL-MARKER dev=vda text=keep-me$", since=mark)
    assert not log.findall(r"^KVMCTL-MARKER-WRITTEN", since=mark), log.tail()
    lab.wait("db", r"^KVMCTL-CPUS online=2$", since=mark)
    lab.wait("db", r"^KVMCTL-DISK dev=vda bytes=100663296$", since=mark)
    m = lab.wait("db", r"^KVMCTL-LEASE iface=eth0 .*$", since=mark)
    assert fields(m.group(0))["ip"] == lab.ip(11), m.group(0)
    assert len(log.findall(r"^KVMCTL-BOOT ok$")) == 3, log.tail()
    xml = lab.conn.lookupByName(lab.name("db")).XMLDesc(0)
    assert "machine='pc-q35" in xml, xml
    assert lab.k("plan", "-f", lab.k.dir, "--detailed-exitcode").code == 0


def step6_userdata_change_touches_only_the_seed(lab: Lab) -> None:
    secret = "s3cret-" + lab.prefix
    ci = lab.vm_spec("web")["cloudInit"]
    ci["userData"] = copy.deepcopy(ci["userData"])
    ci["userData"]["write_files"].append({"path": "/etc/token", "content": secret})
    lab.write()
    r = lab.k.ok("plan", "-f", lab.k.dir, "-o", "json")
    assert secret not in r.stdout
    plan = changes_by_ref(r.json())
    seed_ref, vm_ref = f"CloudInitSeed/{lab.name('web')}", f"VirtualMachine/{lab.name('web')}"
    assert set(plan) == {seed_ref, vm_ref}, sorted(plan)
    assert plan[seed_ref]["class"] == "update-live"
    assert plan[seed_ref]["fields"] == [{"field": "cloudInit", "old": MASK, "new": MASK,
                                        "sensitive": True}], plan[seed_ref]
    assert plan[vm_ref]["class"] == "update-live"
    assert [f["field"] for f in plan[vm_ref]["fields"]] == ["metadata"], plan[vm_ref]
    text = lab.k.ok("plan", "-f", lab.k.dir)
    assert secret not in text.stdout and MASK in text.stdout and "Disk/" not in text.stdout
    seed_volume = f"{lab.name('web')}-cidata.iso"
    before = lab.conn.storagePoolLookupByName(lab.name("pool")).storageVolLookupByName(
        f"{lab.name('web-root')}.qcow2").XMLDesc(0)
    r = lab.k.apply()
    assert secret not in r.output
    assert secret.encode() in download(lab.conn, lab.name("pool"), seed_volume)
    after = lab.conn.storagePoolLookupByName(lab.name("pool")).storageVolLookupByName(
        f"{lab.name('web-root')}.qcow2").XMLDesc(0)
    assert before == after
    assert lab.conn.lookupByName(lab.name("web")).isActive()
    assert lab.k("plan", "-f", lab.k.dir, "--detailed-exitcode").code == 0


def step7_prune_a_vm_keeps_its_disk(lab: Lab) -> None:
    lab.docs.remove(lab.doc("VirtualMachine", "db"))
    lab.write()
    plan = changes_by_ref(lab.k.plan_json("--prune"))
    net_ref = f"Network/{lab.name('nat')}"
    assert set(plan) == {f"VirtualMachine/{lab.name('db')}", f"CloudInitSeed/{lab.name('db')}",
                         net_ref}, sorted(plan)
    assert {c["class"] for r, c in plan.items() if r != net_ref} == {"delete"}
    # db's DHCP reservation goes too: live, without restarting the network under web.
    assert plan[net_ref]["class"] == "update-live", plan[net_ref]
    assert [f["field"] for f in plan[net_ref]["fields"]] == ["dhcp.hosts"], plan[net_ref]
    pidfile = Path(f"/run/libvirt/network/{lab.name('nat')}.pid")
    dnsmasq_pid = pidfile.read_text().strip()
    lab.k.apply("--prune")
    assert pidfile.read_text().strip() == dnsmasq_pid
    assert lab.conn.lookupByName(lab.name("web")).isActive()
    hosts = lab.conn.networkLookupByName(lab.name("nat")).XMLDesc(0)
    assert lab.ip(10) in hosts and lab.ip(11) not in hosts, hosts
    assert lab.name("db") not in {d.name() for d in lab.conn.listAllDomains(0)}
    names = volume_names(lab.conn, lab.name("pool"))
    assert f"{lab.name('db-data')}.qcow2" in names
    assert f"{lab.name('db')}-cidata.iso" not in names
    assert lab.k("plan", "-f", lab.k.dir, "--prune", "--detailed-exitcode").code == 0


def step8_destroy_leaves_nothing(lab: Lab) -> None:
    pool_name, pool_dir = lab.name("pool"), lab.scratch / "pool"
    disks = {f"{lab.name('web-root')}.qcow2", f"{lab.name('db-data')}.qcow2"}
    r = lab.k.ok("destroy", "-f", lab.k.dir, "-y")
    assert [d.name() for d in lab.conn.listAllDomains(0) if d.name().startswith(lab.prefix)] == []
    assert [n.name() for n in lab.conn.listAllNetworks(0) if n.name().startswith(lab.prefix)] == []
    assert volume_names(lab.conn, pool_name) & {f"{lab.name(s)}-cidata.iso"
                                                 for s in ("web", "db")} == set()
    assert disks <= volume_names(lab.conn, pool_name), "destroy without --with-disks kept disks"
    assert f"{lab.name('base')}.raw" in volume_names(lab.conn, pool_name)
    assert "kept:" in r.stderr
    r = lab.k.ok("destroy", "-f", lab.k.dir, "-y", "--with-disks")
    # Nothing owned by the project is left to prune either.
    lab.k.write([pool(lab.name("anchor"), lab.scratch / "anchor")])
    plan = lab.k.plan_json("--prune", "--prune-disks")
    assert [c for c in plan["changes"] if c["class"] == "delete"] == [], plan
    assert lab.k.ok("get", "vms", "-o", "json").json() == []
    for what in ("networks", "pools", "disks", "images"):
        assert lab.k.ok("get", what, "-o", "json").json() == [], what

    del_link(lab.name("br"))
    assert leftovers(lab.conn, lab.prefix) == []
    assert not {lab.name("vn"), lab.name("vi"), lab.name("br")} & links()
    for net in ("nat", "iso"):
        assert dnsmasq_running(lab.name(net)) == [], net
        forget_stale_network_files(lab.conn, lab.name(net))  # libvirt's, see dnsmasq_running
        assert not Path(f"/run/libvirt/network/{lab.name(net)}.pid").exists()
    assert not pool_dir.exists(), f"{pool_dir} remains: {list(pool_dir.iterdir())}"


def _drop_network(conn, name: str) -> None:
    for net in conn.listAllNetworks(0):
        if net.name() == name:
            if net.isActive():
                net.destroy()
            net.undefine()
    forget_stale_network_files(conn, name)


# --- the test ------------------------------------------------------------------------------------


def test_lab_end_to_end(conn, prefix, cleanup, scratch_dir, free_subnet, test_guest,
                        domain_type):
    lab = Lab(Kvmctl(prefix.rstrip("-"), scratch_dir / "manifests", domain_type), conn, prefix,
              scratch_dir, nat=free_subnet(), iso=free_subnet())
    lab.docs = _lab_docs(lab, test_guest)
    cleanup.add(del_link, lab.name("br"))
    for net in ("nat", "iso"):  # if the test fails before step 8 removed them
        cleanup.add(_drop_network, conn, lab.name(net))
    step1_apply_the_lab(lab)
    step2_reserved_ips_and_seeds(lab)
    step3_second_plan_is_empty(lab)
    step4_grow_disk_and_cpus_live(lab)
    step5_marker_survives_a_restart(lab)
    step6_userdata_change_touches_only_the_seed(lab)
    step7_prune_a_vm_keeps_its_disk(lab)
    step8_destroy_leaves_nothing(lab)
