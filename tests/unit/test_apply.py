"""apply without a daemon: the real CLI and executor against libvirt's test driver.

Each test gets its own empty test-driver host (see testdriver.py); the CLI reaches it through
`--connect`, and every Session of the test shares the one connection (a new test-driver
connection would be a new, empty host).
"""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cli_support import CliResult, run_cli
from manifest_docs import disk, doc, pool
from testdriver import DriverHypervisor, install, write_manifests

from kvmctl.apply import ChangeResult, Outcome, levels, run, run_change
from kvmctl.apply.executor import Executor
from kvmctl.errors import ApplyError, HypervisorError
from kvmctl.host.state import LiveState
from kvmctl.kinds import Kind
from kvmctl.manifest.cloudinit import seed_content
from kvmctl.plan import steps as s
from kvmctl.plan.types import Change, ChangeClass, Plan

PROJECT = "unit"
KERNEL = "/var/cache/kvmctl/test-guest/vmlinuz"


def network(name: str, third: int, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"mode": "nat", "ipv4": {
        "cidr": f"10.250.{third}.0/24",
        "dhcp": {"start": f"10.250.{third}.100", "end": f"10.250.{third}.199"}}}
    return doc("Network", name, {**body, **spec})


def vm(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"cpus": {"count": 1, "max": 2},
                            "memory": {"size": "128MiB", "max": "256MiB"},
                            "boot": {"kernel": KERNEL, "cmdline": "console=ttyS0"}}
    return doc("VirtualMachine", name, {**body, **spec})


class Host:
    """One test-driver host and the CLI pointed at it."""

    def __init__(self, folder: Path, hv: DriverHypervisor, uri: str) -> None:
        self.folder, self.hv, self.uri = folder, hv, uri

    def manifests(self, docs: list[dict[str, Any]], name: str = "m.yaml") -> Path:
        return write_manifests(self.folder / name, docs)

    def cli(self, *argv: Any) -> CliResult:
        return run_cli([argv[0], "--connect", self.uri, "--project", PROJECT,
                        "--domain-type", "qemu", *argv[1:]])

    def apply(self, path: Path, *extra: str) -> CliResult:
        result = self.cli("apply", "-y", "-f", path, *extra)
        assert result.code == 0, result
        return result

    def plan(self, path: Path, *extra: str) -> dict[str, Any]:
        result = self.cli("plan", "-o", "json", "-f", path, *extra)
        assert result.code == 0, result
        return result.json()  # type: ignore[no-any-return]

    def converged(self, path: Path) -> None:
        plan = self.plan(path)
        assert not plan["changes_present"], plan["changes"]


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    hv, uri = install(monkeypatch, tmp_path)
    yield Host(tmp_path, hv, uri)
    hv.close()


def lab(folder: Path, **vm_spec: Any) -> list[dict[str, Any]]:
    return [pool("u-pool", folder / "pool"), disk("u-data", "u-pool", "16MiB"),
            network("u-net", 1, dns={"hosts": [{"ip": "10.250.1.5", "hostnames": ["files"]}]}),
            vm("u-vm", disks=[{"disk": "u-data"}],
               interfaces=[{"network": "u-net", "ip": "10.250.1.10"}], **vm_spec)]


# ---- whole applies ------------------------------------------------------------------------------

def test_apply_creates_everything_and_converges(host: Host) -> None:
    path = host.manifests(lab(host.folder))
    result = host.apply(path)
    assert "Apply complete: 4 change(s) made." in result.stdout
    conn = host.hv.conn
    assert conn.lookupByName("u-vm").isActive()
    assert conn.networkLookupByName("u-net").isActive()
    assert conn.networkLookupByName("u-net").autostart()
    volumes = {v.name() for v in conn.storagePoolLookupByName("u-pool").listAllVolumes()}
    assert volumes == {"u-data.qcow2", f"kvmctl-owner-{PROJECT}.json"}
    host.converged(path)


def test_live_changes_reach_the_running_guest(host: Host) -> None:
    path = host.manifests(lab(host.folder))
    host.apply(path)
    changed = lab(host.folder, cpus={"count": 2, "max": 2},
                  memory={"size": "192MiB", "max": "256MiB"}, autostart=True)
    changed[2]["spec"]["dns"]["hosts"].append({"ip": "10.250.1.6", "hostnames": ["more"]})
    plan = host.plan(host.manifests(changed))
    classes = {f"{c['kind']}/{c['name']}": c["class"] for c in plan["changes"]}
    assert classes == {"VirtualMachine/u-vm": "update-live", "Network/u-net": "update-live"}
    host.apply(host.manifests(changed))
    dom = host.hv.conn.lookupByName("u-vm")
    assert dom.vcpusFlags(1) == 2  # VIR_DOMAIN_AFFECT_LIVE
    assert dom.info()[2] == 192 * 1024
    assert dom.autostart()
    assert "10.250.1.6" in host.hv.conn.networkLookupByName("u-net").XMLDesc(0)
    # The test driver cannot show a running network's persistent definition, so the new
    # metadata kvmctl defined is not what it reads back (real libvirt: tests/integration).
    left = host.plan(host.manifests(changed))["changes"]
    assert [(c["name"], [f["field"] for f in c["fields"]]) for c in left] == [
        ("u-net", ["metadata"])]


def test_stop_then_start_and_prune(host: Host) -> None:
    host.apply(host.manifests(lab(host.folder, state="stopped", shutdownTimeout=1)))
    assert not host.hv.conn.lookupByName("u-vm").isActive()
    host.apply(host.manifests(lab(host.folder)))
    assert host.hv.conn.lookupByName("u-vm").isActive()
    only_pool = host.manifests(lab(host.folder)[:1])
    blocked = host.plan(only_pool, "--prune")
    disk_change = next(c for c in blocked["changes"] if c["kind"] == "Disk")
    assert "--prune-disks" in disk_change["blocked"]
    host.apply(only_pool, "--prune", "--prune-disks")
    names = {d.name() for d in host.hv.conn.listAllDomains()}
    assert names == set()
    assert {n.name() for n in host.hv.conn.listAllNetworks()} == set()
    assert {v.name() for v in host.hv.conn.storagePoolLookupByName("u-pool").listAllVolumes()} \
        == {f"kvmctl-owner-{PROJECT}.json"}


def test_destroy_keeps_disks_unless_asked(host: Host) -> None:
    path = host.manifests(lab(host.folder))
    host.apply(path)
    result = host.cli("destroy", "-y", "-f", path)
    assert result.code == 0, result
    assert "kept:" in result.stderr and "Disk/u-data" in result.stderr
    assert host.hv.conn.listAllDomains() == []
    assert "u-data.qcow2" in {v.name() for v in
                              host.hv.conn.storagePoolLookupByName("u-pool").listAllVolumes()}


def test_saved_plan_applies_and_refuses_when_the_host_moved(host: Host) -> None:
    path = host.manifests(lab(host.folder))
    saved = host.folder / "plan.json"
    assert host.cli("plan", "-f", path, "--out", saved).code == 0
    assert host.cli("apply", "-y", saved).code == 0
    host.converged(path)
    changed = host.manifests(lab(host.folder, cpus={"count": 2, "max": 2}))
    assert host.cli("plan", "-f", changed, "--out", saved).code == 0
    host.hv.conn.lookupByName("u-vm").setAutostart(1)  # somebody else changes the VM
    refused = host.cli("apply", "-y", saved)
    assert refused.code == 1 and "the host changed since the plan was saved" in refused.stderr


def first_mac(host: Host, domain: str) -> str:
    """The MAC of a domain's first NIC (derived: read from its definition)."""
    found = re.search(r"<mac address='([^']+)'", host.hv.conn.lookupByName(domain).XMLDesc(0))
    assert found is not None
    return found.group(1)


def test_get_lists_owned_objects_with_addresses_and_drift(host: Host) -> None:
    path = host.manifests(lab(host.folder))
    host.apply(path)
    assert not host.plan(path)["changes_present"]
    host.hv.leases = {"u-net": [{"mac": first_mac(host, "u-vm"), "ipaddr": "10.250.1.10"}]}
    rows = host.cli("get", "vms", "-o", "json").json()
    assert rows == [{"name": "u-vm", "state": "running", "addresses": ["10.250.1.10"],
                     "autostart": False, "pending_restart": []}]
    drift = host.cli("get", "vms", "-o", "json", "-f",
                     host.manifests(lab(host.folder, autostart=True), "drift.yaml")).json()
    assert drift[0]["drift"] == "update-live"
    table = host.cli("get", "disks")
    assert table.code == 0 and "u-data" in table.stdout
    assert "No images" in host.cli("get", "images").stdout


def test_apply_waits_for_addresses(host: Host) -> None:
    path = host.manifests(lab(host.folder))
    host.apply(path)
    not_ready = host.cli("apply", "-y", "-f", path, "--wait", "--wait-timeout", "0")
    assert not_ready.code == 1 and "u-vm: running, no address after 0 s" in not_ready.stderr
    host.hv.leases = {"u-net": [{"mac": first_mac(host, "u-vm"), "ipaddr": "10.250.1.10"}]}
    ready = host.cli("apply", "-y", "-f", path, "--wait", "--wait-timeout", "5")
    assert ready.code == 0, ready
    assert "u-vm: 10.250.1.10" in ready.stdout


def test_cloud_init_seed_is_built_and_uploaded(host: Host) -> None:
    docs = lab(host.folder, cloudInit={"hostname": "u-vm", "userData": {"runcmd": ["true"]}})
    host.apply(host.manifests(docs))
    iso = host.hv.contents[("u-pool", "u-vm-cidata.iso")]
    assert len(iso) % (1024 * 1024) == 0 and b"CD001" in iso[:64 * 1024]
    host.converged(host.manifests(docs))


# ---- the executor, one step at a time --------------------------------------------------------

@pytest.fixture
def executor(host: Host) -> Executor:
    host.hv.conn.storagePoolDefineXML(
        f"<pool type='dir'><name>p</name><target><path>{host.folder}/p</path></target></pool>",
        0).create(0)
    return Executor(host.hv, host.hv.read(), PROJECT)


OWNER = s.VolumeOwner(Kind.DISK, "d", "hash")


def volume(name: str, size: int = 1 << 20) -> str:
    return (f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
            "<target><format type='qcow2'/></target></volume>")


def test_create_grow_and_delete_a_volume(executor: Executor, host: Host) -> None:
    executor.run(s.CreateVolume("p", "d.qcow2", volume("d.qcow2"), OWNER, 1 << 20))
    live = host.hv.read()
    assert live.volume("p", "d.qcow2") is not None
    assert live.volume("p", "d.qcow2").owner.name == "d"  # type: ignore[union-attr]
    executor.run(s.GrowVolume("p", "d.qcow2", 2 << 20))
    assert ("resize_volume", "p", "d.qcow2", 2 << 20) in host.hv.calls
    with pytest.raises(HypervisorError, match="vm"):  # in use by a domain that is not there
        executor.run(s.GrowVolume("p", "d.qcow2", 3 << 20, (s.Attachment("vm", "vdb"),)))
    executor.run(s.DeleteVolume("p", "d.qcow2"))
    assert host.hv.read().volume("p", "d.qcow2") is None


def test_a_copy_smaller_than_its_source_is_refused(executor: Executor, host: Host) -> None:
    executor.run(s.CreateVolume("p", "base.qcow2", volume("base.qcow2", 4 << 20), OWNER, 4 << 20))
    with pytest.raises(ApplyError, match="smaller than the image it copies"):
        executor.run(s.CreateVolume("p", "c.qcow2", volume("c.qcow2"), OWNER, 1 << 20,
                                    s.VolumeRef("p", "base.qcow2")))
    executor.run(s.CreateVolume("p", "c.qcow2", volume("c.qcow2", 4 << 20), OWNER, 8 << 20,
                                s.VolumeRef("p", "base.qcow2")))
    # libvirt made the copy the size of its source; it is grown to what was asked.
    assert ("resize_volume", "p", "c.qcow2", 8 << 20) in host.hv.calls


def test_a_failed_creation_leaves_no_claim(executor: Executor, host: Host) -> None:
    with pytest.raises(HypervisorError):
        executor.run(s.CreateVolume("p", "bad", "<volume><name>bad</name></volume>", OWNER, 1))
    live = host.hv.read()
    assert live.volume("p", "bad") is None
    assert live.pools["p"].owner is None


def test_import_from_a_missing_host_file_fails_cleanly(executor: Executor, host: Host) -> None:
    owner = s.VolumeOwner(Kind.IMAGE, "img", "h")
    with pytest.raises(HypervisorError, match="find"):
        executor.run(s.ImportImage("p", "img.raw", "raw", owner, volume("img.raw"),
                                   path=str(host.folder / "nowhere" / "img.raw")))
    assert host.hv.read().volume("p", "img.raw") is None


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[bytes], str]]:
    folder = tmp_path / "www"
    folder.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None  # type: ignore[method-assign,assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(data: bytes) -> str:
        (folder / "image.raw").write_bytes(data)
        return f"http://127.0.0.1:{server.server_port}/image.raw"

    yield serve
    server.shutdown()
    server.server_close()


def test_import_from_a_url_checks_its_sha256(executor: Executor, host: Host,
                                             served: Callable[[bytes], str]) -> None:
    data = b"\x01" * 4096
    url = served(data)
    owner = s.VolumeOwner(Kind.IMAGE, "img", "h")
    with pytest.raises(ApplyError, match="checksum mismatch"):
        executor.run(s.ImportImage("p", "img.raw", "raw", owner, "", url=url, sha256="0" * 64))
    assert host.hv.read().volume("p", "img.raw") is None
    executor.run(s.ImportImage("p", "img.raw", "raw", owner, "", url=url,
                               sha256=hashlib.sha256(data).hexdigest()))
    assert host.hv.contents[("p", "img.raw")] == data
    with pytest.raises(ApplyError, match="cannot download"):
        executor.run(s.ImportImage("p", "x.raw", "raw", owner, "", url=url + ".missing",
                                   sha256="0" * 64))


def test_a_seed_is_rebuilt_in_place(executor: Executor, host: Host) -> None:
    owner = s.VolumeOwner(Kind.SEED, "vm", "digest")
    for text in ("one", "two"):
        content = seed_content("vm", "vm", {"runcmd": [text]}, None, [])
        executor.run(s.WriteSeed("p", "vm-cidata.iso", owner, content))
        assert text.encode() in host.hv.contents[("p", "vm-cidata.iso")]


def test_pool_steps(executor: Executor, host: Host) -> None:
    xml = f"<pool type='dir'><name>q</name><target><path>{host.folder}/q</path></target></pool>"
    executor.run(s.CreatePool("q", xml))
    executor.run(s.SetPoolAutostart("q", True))
    live = host.hv.read()
    assert live.pools["q"].active and live.pools["q"].autostart
    assert live.pools["q"].owner is not None and live.pools["q"].owner.project == PROJECT
    host.hv.conn.storagePoolLookupByName("q").destroy()
    executor.run(s.StartPool("q"))
    executor.run(s.DeletePool("q"))
    assert "q" not in host.hv.read().pools



def test_a_pool_that_cannot_start_is_undone(executor: Executor, host: Host,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        raise HypervisorError(f"start pool {name}: refused")

    monkeypatch.setattr(host.hv, "start_pool", refuse)
    xml = f"<pool type='dir'><name>r</name><target><path>{host.folder}/r</path></target></pool>"
    with pytest.raises(HypervisorError, match="refused"):
        executor.run(s.CreatePool("r", xml))
    assert "r" not in host.hv.read().pools


def test_claims_and_adoption(executor: Executor, host: Host) -> None:
    executor.run(s.ClaimPool("p"))
    host.hv.conn.storagePoolLookupByName("p").createXML(volume("mine.qcow2"), 0)
    executor.run(s.ClaimVolume("p", "mine.qcow2", s.VolumeOwner(Kind.DISK, "m", "h", True)))
    live = host.hv.read()
    assert live.pools["p"].owner is not None
    owner = live.volume("p", "mine.qcow2").owner  # type: ignore[union-attr]
    assert owner is not None and owner.protect and owner.kind is Kind.DISK


def test_network_and_domain_steps(executor: Executor, host: Host) -> None:
    net = ("<network><name>n</name><forward mode='nat'/><ip address='10.250.9.1' prefix='24'>"
           "<dhcp><range start='10.250.9.100' end='10.250.9.199'/></dhcp></ip></network>")
    for step in (s.DefineNetwork("n", net), s.StartNetwork("n"), s.SetNetworkAutostart("n", True),
                 s.UpdateNetwork("n", s.NetworkCommand.ADD, s.NetworkSection.DHCP_HOST,
                                 "<host mac='52:54:00:00:00:01' name='a' ip='10.250.9.10'/>"),
                 s.UpdateNetwork("n", s.NetworkCommand.ADD, s.NetworkSection.DNS_HOST,
                                 "<host ip='10.250.9.5'><hostname>f</hostname></host>")):
        executor.run(step)
    assert "10.250.9.10" in host.hv.conn.networkLookupByName("n").XMLDesc(0)
    dom = ("<domain type='qemu'><name>d</name><memory unit='KiB'>262144</memory>"
           "<currentMemory unit='KiB'>131072</currentMemory><vcpu current='1'>2</vcpu>"
           "<os><type arch='x86_64'>hvm</type></os></domain>")
    for step in (s.DefineDomain("d", dom), s.SetDomainAutostart("d", True), s.StartDomain("d"),
                 s.StartDomain("d"), s.SetVcpusLive("d", 2), s.SetMemoryLive("d", 196608),
                 s.SetMetadataLive("d", "<resource><project>x</project></resource>"),
                 s.AttachDevice("d", "<x/>"), s.DetachDevice("d", "<x/>"),
                 s.UpdateDevice("d", "<x/>"), s.RestartDomain("d", 1), s.ShutdownDomain("d", 1)):
        executor.run(step)
    d = host.hv.conn.lookupByName("d")
    assert not d.isActive() and d.autostart()
    executor.run(s.DeleteDomain("d", 1))
    executor.run(s.DeleteNetwork("n"))
    assert host.hv.conn.listAllDomains() == [] and host.hv.conn.listAllNetworks() == []


def test_a_define_that_collides_with_the_projects_own_object_takes_its_uuid(
        executor: Executor, host: Host) -> None:
    mine = ("<domain type='qemu'><name>d</name><memory>131072</memory>"
            "<os><type arch='x86_64'>hvm</type></os><metadata>"
            "<kvmctl:resource xmlns:kvmctl='https://kvmctl.dev/xmlns/resource/v1'>"
            f"<kvmctl:project>{PROJECT}</kvmctl:project><kvmctl:kind>VirtualMachine</kvmctl:kind>"
            "<kvmctl:name>d</kvmctl:name></kvmctl:resource></metadata></domain>")
    host.hv.conn.defineXML(mine)
    uuid = host.hv.conn.lookupByName("d").UUIDString()
    host.hv.conn.lookupByName("d").create()  # a running domain cannot be redefined under a new uuid
    executor.run(s.DefineDomain("d", mine))
    assert host.hv.conn.lookupByName("d").UUIDString() == uuid
    other = Executor(host.hv, LiveState(), "someone-else")
    with pytest.raises(HypervisorError):
        other.run(s.DefineDomain("d", mine))


def test_replug_waits_for_the_guest_to_let_go(executor: Executor, host: Host,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    dom = ("<domain type='qemu'><name>d</name><memory>131072</memory>"
           "<os><type arch='x86_64'>hvm</type></os><devices><interface type='network'>"
           "<mac address='52:54:00:00:00:07'/><source network='default'/></interface>"
           "</devices></domain>")
    net = ("<network><name>default</name><ip address='10.250.8.1' prefix='24'/></network>")
    host.hv.conn.networkDefineXML(net).create()
    host.hv.conn.defineXML(dom).create()
    monkeypatch.setattr("kvmctl.apply.executor.NIC_RELEASE_TIMEOUT_S", 0.3)
    step = s.ReplugNic("d", "52:54:00:00:00:07", "<interface/>", "<interface/>")
    with pytest.raises(ApplyError, match="did not release its NIC"):  # never unplugged here
        executor.run(step)
    executor.run(s.ReplugNic("d", "52:54:00:00:00:99", "<interface/>", "<interface/>"))
    assert ("attach_device_live", "d", "<interface/>") in host.hv.calls


def test_every_step_type_has_a_handler(executor: Executor) -> None:
    assert set(s.STEP_TYPES) <= set(executor._handlers)


# ---- levels and failures ------------------------------------------------------------------------

def change(kind: Kind, name: str, *steps: s.Step,
           change_class: ChangeClass = ChangeClass.CREATE) -> Change:
    return Change(kind, name, change_class, steps=steps)


def test_levels_follow_the_kind_order_and_deletes_go_backwards() -> None:
    plan = Plan(PROJECT, "", (
        change(Kind.VM, "v", s.StartDomain("v")), change(Kind.POOL, "p", s.StartPool("p")),
        change(Kind.DISK, "d", s.DeleteVolume("p", "d"), change_class=ChangeClass.DELETE),
        change(Kind.SEED, "v", s.StartPool("p")), change(Kind.DISK, "e", s.StartPool("p")),
        change(Kind.VM, "w", s.DeleteDomain("w", 1), change_class=ChangeClass.DELETE),
        change(Kind.NETWORK, "n"),  # nothing to do: not run at all
    ))
    assert [[c.ref for c in g] for g in levels(plan)] == [
        ["StoragePool/p"], ["CloudInitSeed/v", "Disk/e"], ["VirtualMachine/v"],
        ["VirtualMachine/w"], ["Disk/d"]]


class Boom:
    """An executor whose steps fail the way a bug would (not as a KvmctlError)."""

    def run(self, step: s.Step) -> str:
        if isinstance(step, s.StartDomain) and step.name == "bad":
            raise KeyError("no such thing")
        if isinstance(step, s.StartDomain) and step.name == "refused":
            raise HypervisorError("start domain refused: no")
        return "powered off" if isinstance(step, s.ShutdownDomain) else ""


def test_any_exception_is_only_its_own_changes_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    plan = Plan(PROJECT, "", (
        change(Kind.NETWORK, "n", s.StartNetwork("n")),
        change(Kind.VM, "bad", s.StartDomain("bad")),
        change(Kind.VM, "refused", s.StartDomain("refused")),
        change(Kind.VM, "good", s.StartDomain("good")),
        change(Kind.VM, "gone", s.DeleteDomain("gone", 1), change_class=ChangeClass.DELETE),
    ))
    monkeypatch.setattr("kvmctl.apply.Executor", lambda *a: Boom())
    result = run(plan, None, LiveState(),  # type: ignore[arg-type]
                 progress=lambda c, e, d: events.append((c.ref, str(e))))
    assert result.done == ("Network/n", "VirtualMachine/good")
    failed = dict(result.failed)
    assert failed["VirtualMachine/bad"].startswith(
        "internal error in step start_domain: KeyError")
    assert failed["VirtualMachine/refused"] == "start domain refused: no"
    assert result.skipped == ("VirtualMachine/gone",)
    assert not result.ok
    assert ("VirtualMachine/bad", "failed") in events and ("VirtualMachine/good", "done") in events


def test_run_change_reports_success_and_what_the_user_should_know() -> None:
    done = run_change(Boom(), change(Kind.VM, "x", s.StartDomain("x")), None)  # type: ignore[arg-type]
    assert done == ChangeResult("VirtualMachine/x", Outcome.DONE)
    forced = run_change(Boom(), change(Kind.VM, "x", s.ShutdownDomain("x", 1),  # type: ignore[arg-type]
                                       s.StartDomain("x")), None)
    assert forced == ChangeResult("VirtualMachine/x", Outcome.DONE, "powered off")


def test_a_guest_that_ignores_acpi_is_powered_off_and_the_apply_says_so(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    host.apply(host.manifests(lab(host.folder)))
    monkeypatch.setattr(host.hv, "shutdown_domain", lambda name, timeout: False)
    result = host.apply(host.manifests(lab(host.folder, state="stopped", shutdownTimeout=3)))
    assert ("VirtualMachine/u-vm: done (u-vm did not shut down within 3 s of the ACPI request "
            "and was powered off)") in result.stdout


def test_destroy_and_prune_wait_the_vms_own_shutdown_timeout(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    waited: list[tuple[str, float]] = []
    real = host.hv.shutdown_domain

    def shutdown(name: str, timeout: float) -> bool:
        waited.append((name, timeout))
        return real(name, timeout)

    monkeypatch.setattr(host.hv, "shutdown_domain", shutdown)
    path = host.manifests(lab(host.folder, shutdownTimeout=7))
    host.apply(path)
    assert host.cli("destroy", "-y", "-f", path).code == 0
    host.apply(path)
    # prune: the VM left the manifests; its metadata says how long it may take
    host.apply(host.manifests(lab(host.folder)[:3]), "--prune")
    assert waited == [("u-vm", 7.0), ("u-vm", 7.0)]


def test_the_text_plan_shows_what_a_create_makes_and_no_digests(host: Host) -> None:
    path = host.manifests(lab(host.folder))
    text = host.cli("plan", "-f", path).stdout
    assert "memory: 128MiB" in text and "size: 16MiB" in text and "ipv4: 10.250.1.1/24" in text
    assert re.search(r"nic:52:54:00:[0-9a-f:]{8}: network u-net, .*address 10\.250\.1\.10", text)
    host.apply(path)
    policy_only = lab(host.folder, onRestartNeeded="restart")  # not part of the definition
    text = host.cli("plan", "-f", host.manifests(policy_only)).stdout
    assert "metadata" not in text and "spec " not in text
    assert "only kvmctl's record of the manifest changes" in text


def test_a_refused_vcpu_unplug_ends_as_a_pending_restart(host: Host,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    host.apply(host.manifests(lab(host.folder, cpus={"count": 2, "max": 2})))

    def refuse(name: str, count: int) -> None:
        raise HypervisorError(f"set vCPUs of running domain {name} to {count}: vcpu unplug "
                              "request timed out")

    monkeypatch.setattr(host.hv, "set_vcpus_live", refuse)
    fewer = host.manifests(lab(host.folder, cpus={"count": 1, "max": 2}))
    result = host.apply(fewer)
    assert "the guest did not release vCPUs" in result.stdout and "keeps 2" in result.stdout
    again = host.plan(fewer)
    assert not again["changes_present"]  # nothing left to apply: no retry on every apply
    (vm_change,) = [c for c in again["changes"] if c["kind"] == "VirtualMachine"]
    assert vm_change["pending_restart"] and vm_change["class"] == "no-op"
    assert [(f["field"], f["old"], f["new"]) for f in vm_change["fields"]] == [
        ("vcpus (running guest)", 2, 1)]


def test_a_stopped_pool_is_never_planned_from_an_empty_listing(host: Host) -> None:
    """Another project's disk in our pool while the pool is stopped: the apply refuses to claim
    a volume it cannot see, keeps every record, and a prune deletes nothing of theirs."""
    ours = lab(host.folder)
    host.apply(host.manifests(ours))
    theirs = [pool("u-pool", host.folder / "pool"), disk("shared", "u-pool", "8MiB")]
    other = run_cli(["apply", "-y", "--adopt", "--connect", host.uri, "--project", "other",
                     "--domain-type", "qemu", "-f",
                     write_manifests(host.folder / "theirs.yaml", theirs[1:])])
    assert other.code == 0, other
    host.hv.conn.storagePoolLookupByName("u-pool").destroy()
    both = host.manifests(ours + theirs[1:], "both.yaml")
    refused = host.cli("apply", "-y", "-f", both)
    assert "already exists in pool u-pool; it was not created and not claimed" in refused.stderr
    live = host.hv.read()
    shared = live.volume("u-pool", "shared.qcow2")
    assert shared is not None and shared.owner is not None and shared.owner.project == "other"
    data = live.volume("u-pool", "u-data.qcow2")
    assert data is not None and data.owner is not None and data.owner.project == PROJECT
    pruned = host.cli("apply", "-y", "-f", host.manifests(ours, "ours.yaml"), "--prune",
                      "--prune-disks")
    assert pruned.code == 0, pruned
    assert host.hv.read().volume("u-pool", "shared.qcow2") is not None
