"""Several hosts without a daemon: one project file, libvirt's test driver as every host.

Each host is its own test-driver node (testdriver.install_hosts); the CLI runs in-process and
finds the project file (kvmctl.yaml beside the manifests). The test driver has no storage
streams, so a move's volume copy and digest are replaced by small fakes that carry
DriverHypervisor.contents from one host to the other and hash it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_support import CliResult, run_cli
from manifest_docs import disk, doc, pool
from testdriver import DriverHypervisor, install_hosts, write_manifests

from kvmctl.engine import Deployment, PlanRequest
from kvmctl.errors import HypervisorError
from kvmctl.host.hypervisor import Hypervisor
from kvmctl.host.transfer import VolumeDigest
from kvmctl.manifest.project import Overrides, load_project_file, resolve
from kvmctl.plan import steps as s
from kvmctl.plan.types import ChangeClass, ProjectPlan

PROJECT = "multi"
KERNEL = "/var/cache/kvmctl/test-guest/vmlinuz"
DATA = b"kvmctl data that must travel\n" * 300


def vm(name: str, host: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"host": host, "cpus": {"count": 1, "max": 2},
                            "memory": {"size": "128MiB", "max": "256MiB"},
                            "boot": {"kernel": KERNEL, "cmdline": "console=ttyS0"},
                            "shutdownTimeout": 1}
    return doc("VirtualMachine", name, {**body, **spec})


def network(name: str, **spec: Any) -> dict[str, Any]:
    return doc("Network", name, {"mode": "nat", "ipv4": {
        "cidr": "10.251.1.0/24", "dhcp": {"start": "10.251.1.100", "end": "10.251.1.199"}},
        **spec})


# ---- fakes for the volume streams the test driver lacks --------------------------------------

def fake_digest(hv: Hypervisor, pool: str, name: str) -> VolumeDigest:
    assert isinstance(hv, DriverHypervisor)
    capacity = int(hv._vol(pool, name).info()[1])  # HypervisorError if the volume is not there
    data = hv.contents.get((pool, name), b"")
    return VolumeDigest(capacity, len(data), hashlib.sha256(data).hexdigest())


def fake_copy(src: Hypervisor, src_pool: str, name: str, dst: Hypervisor, dst_pool: str,
              volume_xml: str, progress: Any = None) -> VolumeDigest:
    assert isinstance(src, DriverHypervisor) and isinstance(dst, DriverHypervisor)
    if src is dst:
        raise HypervisorError(f"copy of {name}: source and destination are the same volume")
    source = fake_digest(src, src_pool, name)
    if not dst.volume_exists(dst_pool, name):
        dst.create_volume(dst_pool, name, volume_xml)
    dst.contents[(dst_pool, name)] = src.contents.get((src_pool, name), b"")
    dst.calls.append(("copy_volume", src.uri, src_pool, name, dst_pool))
    copied = fake_digest(dst, dst_pool, name)
    if (copied.length_bytes, copied.sha256) != (source.length_bytes, source.sha256):
        raise HypervisorError(f"copy of {name} did not verify")
    return copied


# ---- the bed ----------------------------------------------------------------------------------

class Bed:
    """A project over test-driver hosts: its project file and manifests in one folder."""

    def __init__(self, folder: Path, hosts: dict[str, tuple[DriverHypervisor, str]]) -> None:
        self.folder, self.hosts = folder, hosts
        self.extra_hosts: list[dict[str, str]] = []
        self.path = folder / "m.yaml"
        self.project_file = folder / "kvmctl.yaml"

    def hv(self, host: str) -> DriverHypervisor:
        return self.hosts[host][0]

    def uri(self, host: str) -> str:
        return self.hosts[host][1]

    def write(self, docs: list[dict[str, Any]]) -> Path:
        hosts = [{"name": n, "uri": uri, "domainType": "qemu"}
                 for n, (_, uri) in self.hosts.items()]
        project = {"apiVersion": "kvmctl/v1", "kind": "Project", "metadata": {"name": PROJECT},
                   "spec": {"hosts": hosts + self.extra_hosts, "defaultHost": "h1"}}
        self.project_file.write_text(yaml.safe_dump(project), encoding="utf-8")
        return write_manifests(self.path, docs)

    def cli(self, *argv: Any) -> CliResult:
        return run_cli(argv)

    def plan(self, *extra: Any) -> dict[str, Any]:
        result = self.cli("plan", "-o", "json", "-f", self.path, *extra)
        assert result.code == 0, result
        return result.json()  # type: ignore[no-any-return]

    def apply(self, *extra: Any) -> CliResult:
        result = self.cli("apply", "-y", "-f", self.path, *extra)
        assert result.code == 0, result
        return result

    def converged(self) -> None:
        plan = self.plan()
        assert not plan["changes_present"], plan["changes"]

    def deployment(self, only: tuple[str, ...] = ()) -> Deployment:
        config = resolve(load_project_file(str(self.project_file)), Overrides())
        return Deployment(config, [str(self.path)], only=only)

    def project_plan(self, request: PlanRequest | None = None) -> ProjectPlan:
        d = self.deployment()
        try:
            return d.plan(request or PlanRequest())
        finally:
            d.close()

    def domains(self, host: str) -> dict[str, bool]:
        """The host's domains: name -> running."""
        return {d.name(): bool(d.isActive()) for d in self.hv(host).conn.listAllDomains()}

    def volumes(self, host: str, pool_name: str = "p") -> set[str]:
        p = self.hv(host).conn.storagePoolLookupByName(pool_name)
        p.refresh(0)
        return {v.name() for v in p.listAllVolumes()}


def make_bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...] = ("h1", "h2"),
             kinds: dict[str, type[DriverHypervisor]] | None = None) -> Bed:
    hosts = install_hosts(monkeypatch, tmp_path, names, kinds)
    monkeypatch.setattr("kvmctl.apply.moves.copy_volume", fake_copy)
    monkeypatch.setattr("kvmctl.apply.moves.volume_digest", fake_digest)
    return Bed(tmp_path, hosts)


@pytest.fixture
def bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bed]:
    yield make_bed(tmp_path, monkeypatch)


def lab(folder: Path, a_host: str = "h1", b_host: str = "h2", **a_spec: Any
        ) -> list[dict[str, Any]]:
    """A pool and a network on every host, VM a (with Disk da) and VM b (no disk)."""
    return [pool("p", folder / "pool", hosts="all"), network("n", hosts="all"),
            disk("da", "p", "8MiB"),
            vm("a", a_host, disks=[{"disk": "da"}], interfaces=[{"network": "n"}], **a_spec),
            vm("b", b_host, interfaces=[{"network": "n"}])]


def ids(plan: dict[str, Any]) -> set[str]:
    return {c["id"] for c in plan["changes"]}


# ---- placement ----------------------------------------------------------------------------------

def test_placement_plan_apply_and_get(bed: Bed) -> None:
    bed.write(lab(bed.folder))
    plan = bed.plan()
    assert plan["format_version"] == 2
    assert [h["name"] for h in plan["hosts"]] == ["h1", "h2"]
    assert ids(plan) == {"h1:StoragePool/p", "h2:StoragePool/p", "h1:Network/n", "h2:Network/n",
                         "h1:Disk/da", "h1:VirtualMachine/a", "h2:VirtualMachine/b"}
    assert all(c["host"] == c["id"].split(":")[0] for c in plan["changes"])
    text = bed.cli("plan", "-f", bed.path).stdout
    assert f"Host h1 ({bed.uri('h1')}): 4 change(s)" in text
    assert f"Host h2 ({bed.uri('h2')}): 3 change(s)" in text
    assert text.index("h1:VirtualMachine/a") < text.index("Host h2") \
        < text.index("h2:VirtualMachine/b")

    applied = bed.apply()
    assert "Host h1: 4 done, 0 failed, 0 skipped." in applied.stdout
    assert "Host h2: 3 done, 0 failed, 0 skipped." in applied.stdout
    assert bed.domains("h1") == {"a": True} and bed.domains("h2") == {"b": True}
    bed.converged()
    assert "No changes: the hosts match the manifests." in bed.cli("plan", "-f", bed.path).stdout

    rows = bed.cli("get", "vms", "-o", "json", "--project-file", bed.project_file).json()
    assert {(r["host"], r["name"]) for r in rows} == {("h1", "a"), ("h2", "b")}
    table = bed.cli("get", "vms", "--project-file", bed.project_file)
    assert table.code == 0 and "HOST" in table.stdout
    networks = bed.cli("get", "networks", "-o", "json", "-f", bed.path).json()
    assert {(r["host"], r["name"], r["drift"]) for r in networks} == {
        ("h1", "n", None), ("h2", "n", None)}


# ---- --target and --host ------------------------------------------------------------------------

def test_target_with_and_without_a_host(bed: Bed) -> None:
    bed.write(lab(bed.folder))
    on_h2 = bed.plan("--target", "h2:VirtualMachine/b")
    assert ids(on_h2) == {"h2:VirtualMachine/b", "h2:Network/n"}  # and what b needs there
    assert ids(bed.plan("--target", "VirtualMachine/b")) == ids(on_h2)
    assert ids(bed.plan("--target", "h1:VirtualMachine/a", "--target", "h2:Network/n")) == {
        "h1:VirtualMachine/a", "h1:Network/n", "h1:StoragePool/p", "h1:Disk/da", "h2:Network/n"}
    elsewhere = bed.cli("plan", "-f", bed.path, "--target", "h1:VirtualMachine/b")
    assert elsewhere.code == 1 and "host h1: --target VirtualMachine/b: no such object" \
        in elsewhere.stderr
    unknown = bed.cli("plan", "-f", bed.path, "--target", "h9:VirtualMachine/b")
    assert unknown.code == 2, unknown  # a usage error
    assert "'h9' is not a host of the project" in unknown.stderr
    missing = bed.cli("plan", "-f", bed.path, "--target", "VirtualMachine/zzz")
    assert missing.code == 1 and "no such object in the manifests" in missing.stderr


def test_host_limits_reading_and_changing(bed: Bed) -> None:
    bed.write(lab(bed.folder))
    plan = bed.plan("--host", "h1")
    assert [h["name"] for h in plan["hosts"]] == ["h1"]
    assert {c["host"] for c in plan["changes"]} == {"h1"}
    applied = bed.apply("--host", "h1")
    assert "Host h2" not in applied.stdout
    assert bed.domains("h1") == {"a": True} and bed.domains("h2") == {}
    assert bed.hv("h2").conn.listAllNetworks() == []
    bad = bed.cli("plan", "-f", bed.path, "--host", "h9")
    assert bad.code == 2 and "--host h9: not a host of the project" in bad.stderr
    d = bed.deployment(only=("h2",))
    try:
        assert list(d.sessions) == ["h2"] and [h.name for h in d.selected] == ["h2"]
    finally:
        d.close()


def test_an_unreachable_host_stops_the_run_before_anything_changes(bed: Bed) -> None:
    gone = {n: f"test:///{bed.folder}/{n}/missing.xml" for n in ("h3", "h4")}
    bed.extra_hosts = [{"name": n, "uri": uri} for n, uri in gone.items()]
    bed.write(lab(bed.folder))
    for command in (("plan",), ("apply", "-y")):
        result = bed.cli(*command, "-f", bed.path)
        assert result.code == 1, result
        for n, uri in gone.items():
            lines = [line for line in result.stderr.splitlines() if f"host {n} (" in line]
            assert len(lines) == 1, result
            assert f"host {n} ({uri}) is unreachable" in lines[0]
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for h in ("h1", "h2"):
        hv = bed.hv(h)
        assert hv.conn.listAllDomains() == [] and hv.conn.listAllNetworks() == []
        assert hv.conn.listAllStoragePools() == []
    listed = bed.cli("get", "vms", "--project-file", bed.project_file)
    assert listed.code == 1 and f"host h3 ({gone['h3']}) is unreachable" in listed.stderr
    # The hosts left out cannot be read: one of them may hold Disk/da's data, so neither it
    # nor the VM that uses it is created empty; the rest is.
    result = bed.apply("--host", "h1", "--host", "h2")
    assert "could not be read" in result.stdout and "not created empty" in result.stdout
    assert bed.domains("h1") == {} and bed.domains("h2") == {"b": True}
    blocked = [c["id"] for c in bed.plan("--host", "h1", "--host", "h2")["changes"]
               if c["blocked"]]
    assert blocked == ["h1:Disk/da", "h1:VirtualMachine/a"]
    bed.extra_hosts = []
    bed.write(lab(bed.folder))
    bed.apply()
    assert bed.domains("h1") == {"a": True}
    assert not bed.plan()["changes_present"]


# ---- moves --------------------------------------------------------------------------------------

def shape(step: s.MoveStep) -> tuple[str, ...]:
    """A move step as (op, host(s)..., inner op): what the order assertions compare."""
    if isinstance(step, s.OnHost):
        return ("on_host", step.host, s.op_name(step.step))
    if isinstance(step, (s.CopyVolume, s.VerifyCopy)):
        return (s.op_name(step), step.from_host, step.to_host, step.volume)
    raise AssertionError(step)


def applied_on_h1(bed: Bed, **a_spec: Any) -> None:
    """VM a (and Disk da, holding DATA) applied on h1, VM b on h2."""
    bed.write(lab(bed.folder, **a_spec))
    bed.apply()
    bed.hv("h1").contents[("p", "da.qcow2")] = DATA


def the_move(plan: ProjectPlan) -> Any:
    (move,) = plan.moves
    return move


def test_a_stopped_vm_move_is_one_change(bed: Bed) -> None:
    applied_on_h1(bed, state="stopped")
    bed.write(lab(bed.folder, a_host="h2", state="stopped"))
    plan = bed.project_plan(PlanRequest(prune=True, prune_disks=True))
    move = the_move(plan)
    assert (move.change_class, move.id, move.from_host, move.host) == (
        ChangeClass.MOVE, "h2:VirtualMachine/a", "h1", "h2")
    assert move.blocked is None
    assert any("host changed from 'h1' to 'h2'" in r for r in move.reasons)
    assert any(r.startswith("disks travel") and "da (8MiB)" in r for r in move.reasons)
    steps = [shape(st) for st in move.move_steps]
    # The new host's create of the Disk is the move's: claimed, then made by the copy.
    assert steps[:3] == [("on_host", "h2", "claim_volume"),
                         ("copy_volume", "h1", "h2", "da.qcow2"),
                         ("on_host", "h2", "define_domain")]
    # The originals go before the definition that names them.
    assert steps[-2:] == [("on_host", "h1", "delete_volume"), ("on_host", "h1", "delete_domain")]
    assert "Disk/da" not in {c.ref for c in bed.project_plan().host_plan("h2").plan.changes}
    assert all(st[:2] == ("on_host", "h2") for st in steps[2:-2])
    # Neither host's own plan creates or prunes the VM or its Disk: the move does it all.
    h1 = {c.ref: c for c in plan.host_plan("h1").plan.changes if c.is_change}
    h2 = {c.ref: c for c in plan.host_plan("h2").plan.changes if c.is_change}
    assert "VirtualMachine/a" not in h1 and "Disk/da" not in h1
    assert "VirtualMachine/a" not in h2 and "Disk/da" not in h2
    out = bed.plan()
    (as_json,) = [c for c in out["changes"] if c["class"] == "move"]
    assert (as_json["id"], as_json["host"], as_json["from_host"]) == (
        "h2:VirtualMachine/a", "h2", "h1")
    assert out["summary"]["move"] == 1
    text = bed.cli("plan", "-f", bed.path).stdout
    assert "Moves between hosts:" in text and "VirtualMachine/a h1 -> h2 (move)" in text


def test_a_running_vm_is_shut_down_first_and_the_move_applies(bed: Bed) -> None:
    applied_on_h1(bed)
    assert bed.domains("h1") == {"a": True}
    bed.write(lab(bed.folder, a_host="h2"))
    move = the_move(bed.project_plan())
    assert move.blocked is None
    steps = [shape(st) for st in move.move_steps]
    assert steps[:3] == [("on_host", "h1", "shutdown_domain"), ("on_host", "h2", "claim_volume"),
                         ("copy_volume", "h1", "h2", "da.qcow2")]
    # Started on h2 last, after it left h1: until then the copy equals the original.
    assert steps[-3:] == [("on_host", "h1", "delete_volume"), ("on_host", "h1", "delete_domain"),
                          ("on_host", "h2", "start_domain")]
    assert steps.index(("on_host", "h2", "define_domain")) \
        < steps.index(("on_host", "h1", "delete_domain"))
    assert any("shut down gracefully, moved, then started on 'h2'" in r for r in move.reasons)

    result = bed.apply()
    assert "VirtualMachine/a h1 -> h2: done (copied da.qcow2 from h1 to h2" in result.stdout
    assert "Moves: 1 done, 0 failed, 0 skipped." in result.stdout
    assert bed.domains("h1") == {} and bed.domains("h2") == {"a": True, "b": True}
    assert "da.qcow2" not in bed.volumes("h1") and "da.qcow2" in bed.volumes("h2")
    assert bed.hv("h2").contents[("p", "da.qcow2")] == DATA
    bed.converged()
    rows = bed.cli("get", "disks", "-o", "json", "--project-file", bed.project_file).json()
    assert [(r["host"], r["name"]) for r in rows] == [("h2", "da")]


def test_a_running_vm_that_must_not_restart_is_not_moved(bed: Bed) -> None:
    applied_on_h1(bed, onRestartNeeded="fail")
    bed.write(lab(bed.folder, a_host="h2", onRestartNeeded="fail"))
    plan = bed.project_plan()
    move = the_move(plan)
    assert move.blocked is not None and "onRestartNeeded is fail" in move.blocked
    # The volume the copy would land in is not made while the move cannot run.
    (landing,) = [c for c in plan.host_plan("h2").plan.changes if c.ref == "Disk/da"]
    assert landing.steps == () and landing.blocked == (
        "waits for the move of VirtualMachine/a to 'h2', which is blocked")
    result = bed.cli("apply", "-y", "-f", bed.path)
    assert result.code == 0, result
    assert bed.domains("h1") == {"a": True} and "a" not in bed.domains("h2")
    assert "da.qcow2" not in bed.volumes("h2")
    bed.write(lab(bed.folder, onRestartNeeded="fail"))  # the move is given up: nothing left
    bed.converged()


class UndefineFails(DriverHypervisor):
    """A host that refuses, once asked to, to delete volumes: a move that stops after its
    define on the new host, before it deleted the originals (which go before the undefine)."""

    refuse = False

    def delete_volume(self, pool: str, name: str) -> None:
        if self.refuse:
            raise HypervisorError(f"delete volume {name}: refused")
        super().delete_volume(pool, name)


def half_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Bed, CliResult]:
    """A bed where the move of stopped VM a from h1 to h2 stopped after its define on h2 (h1
    refused to delete the original), and the result of that apply."""
    bed = make_bed(tmp_path, monkeypatch, kinds={"h1": UndefineFails})
    applied_on_h1(bed, state="stopped")
    bed.write(lab(bed.folder, a_host="h2", state="stopped"))
    UndefineFails.refuse = True
    try:
        return bed, bed.cli("apply", "-y", "-f", bed.path)
    finally:
        UndefineFails.refuse = False


def test_a_vm_on_both_hosts_finishes_its_move(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bed, half = half_moved(tmp_path, monkeypatch)
    assert half.code == 1 and "delete volume da.qcow2: refused" in half.stderr, half
    assert "a" in bed.domains("h1") and "a" in bed.domains("h2")

    move = the_move(bed.project_plan())
    assert move.blocked is None
    assert any("finish the move from 'h1'" in r for r in move.reasons)
    assert [shape(st) for st in move.move_steps] == [
        ("verify_copy", "h1", "h2", "da.qcow2"), ("on_host", "h1", "delete_volume"),
        ("on_host", "h1", "delete_domain")]

    bed.hv("h1").conn.lookupByName("a").create()  # the old one runs: kvmctl will not choose
    running = the_move(bed.project_plan())
    assert running.blocked is not None and "runs on 'h1' and is defined on 'h2'" \
        in running.blocked
    bed.hv("h1").conn.lookupByName("a").destroy()

    bed.apply()
    assert bed.domains("h1") == {} and "a" in bed.domains("h2")
    assert "da.qcow2" not in bed.volumes("h1")
    assert bed.hv("h2").contents[("p", "da.qcow2")] == DATA
    bed.converged()


def test_a_copy_that_differs_keeps_the_original(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bed, half = half_moved(tmp_path, monkeypatch)
    assert half.code == 1
    bed.hv("h2").contents[("p", "da.qcow2")] = b"written on h2 meanwhile"
    result = bed.cli("apply", "-y", "-f", bed.path)
    assert result.code == 1 and "da.qcow2 on h1 and its copy on h2 differ" in result.stderr
    assert "a" in bed.domains("h1") and "da.qcow2" in bed.volumes("h1")


def test_a_disk_whose_data_is_elsewhere_is_not_created_empty(bed: Bed) -> None:
    applied_on_h1(bed)
    # VM a leaves the manifests (its domain stays on h1, nobody prunes); b, on h2, now uses da.
    docs = lab(bed.folder)
    docs = [d for d in docs if d["metadata"]["name"] != "a"]
    docs[-1]["spec"]["disks"] = [{"disk": "da"}]
    bed.write(docs)
    plan = bed.project_plan()
    assert plan.moves == ()
    (create,) = [c for c in plan.host_plan("h2").plan.changes if c.ref == "Disk/da"]
    assert create.change_class is ChangeClass.CREATE
    assert create.blocked is not None and "holds data on 'h1'" in create.blocked
    # b's update would attach a disk that is not made: it waits for the Disk.
    (update,) = [c for c in plan.host_plan("h2").plan.changes if c.ref == "VirtualMachine/b"]
    assert update.blocked == "needs Disk/da, which is blocked" and update.steps == ()
    result = bed.cli("apply", "-y", "-f", bed.path)
    assert result.code == 0, result
    assert "da.qcow2" not in bed.volumes("h2"), result
    assert "da.qcow2" not in bed.hv("h2").conn.lookupByName("b").XMLDesc(0)


# ---- failures and saved plans -------------------------------------------------------------------

class DefineFails(DriverHypervisor):
    """A host that refuses every domain definition."""

    def define_domain(self, name: str, xml: str) -> None:
        raise HypervisorError(f"define domain {name}: refused by this host")


def test_a_failing_host_does_not_stop_the_others(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bed = make_bed(tmp_path, monkeypatch, kinds={"h1": DefineFails})
    bed.write(lab(bed.folder))
    result = bed.cli("apply", "-y", "-f", bed.path)
    assert result.code == 1, result
    assert "Host h1: 3 done, 1 failed, 0 skipped." in result.stdout
    assert "Host h2: 3 done, 0 failed, 0 skipped." in result.stdout
    assert "h1:VirtualMachine/a: define domain a: refused by this host" in result.stderr
    assert bed.domains("h1") == {} and bed.domains("h2") == {"b": True}
    assert "da.qcow2" in bed.volumes("h1")  # what was done on h1 stays done
    left = bed.plan()
    assert ids(left) == {"h1:VirtualMachine/a"}


def test_a_move_is_skipped_when_its_new_host_fails(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    class NetworkUpdateFails(DriverHypervisor):
        refuse = False

        def set_network_autostart(self, name: str, on: bool) -> None:
            if self.refuse:
                raise HypervisorError(f"set autostart of network {name}: refused")
            super().set_network_autostart(name, on)

    bed = make_bed(tmp_path, monkeypatch, kinds={"h2": NetworkUpdateFails})
    applied_on_h1(bed, state="stopped")
    docs = lab(bed.folder, a_host="h2", state="stopped")
    docs[1]["spec"]["autostart"] = False  # a change of the network on h1 and on h2
    bed.write(docs)
    NetworkUpdateFails.refuse = True
    result = bed.cli("apply", "-y", "-f", bed.path)
    assert result.code == 1, result
    assert "Host h1: 1 done, 0 failed, 0 skipped." in result.stdout
    # (the landing volume is the move's, which does not run: nothing is made on h2)
    assert "Host h2: 0 done, 1 failed, 0 skipped." in result.stdout
    assert "da.qcow2" not in bed.volumes("h2")
    assert "Moves: 0 done, 0 failed, 1 skipped." in result.stdout
    assert bed.domains("h1") == {"a": False} and "a" not in bed.domains("h2")
    NetworkUpdateFails.refuse = False
    bed.apply()
    assert bed.domains("h1") == {} and bed.domains("h2") == {"a": False, "b": True}


def test_a_saved_plan_over_two_hosts(bed: Bed) -> None:
    bed.write(lab(bed.folder))
    saved = bed.folder / "plan.json"
    made = bed.cli("plan", "-f", bed.path, "--out", saved)
    assert made.code == 0 and f"run: kvmctl apply {saved}" in made.stdout, made
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["format_version"] == 2 and [h["name"] for h in data["hosts"]] == ["h1", "h2"]
    assert {"h1:VirtualMachine/a", "h2:VirtualMachine/b"} <= set(data["fingerprints"])
    applied = bed.cli("apply", "-y", saved)
    assert applied.code == 0, applied
    assert bed.domains("h1") == {"a": True} and bed.domains("h2") == {"b": True}
    bed.converged()

    bed.write(lab(bed.folder, cpus={"count": 2, "max": 2}))  # a change of a, on h1
    assert bed.cli("plan", "-f", bed.path, "--out", saved).code == 0
    bed.hv("h2").conn.lookupByName("b").setAutostart(1)  # somebody changes b, on h2
    refused = bed.cli("apply", "-y", saved)
    assert refused.code == 1, refused
    assert "the hosts changed since the plan was saved" in refused.stderr
    assert "h2:VirtualMachine/b" in refused.stderr and "h1:VirtualMachine/a" not in \
        refused.stderr
    assert bed.hv("h1").conn.lookupByName("a").vcpusFlags(1) == 1  # nothing was applied


def test_a_saved_move_applies(bed: Bed) -> None:
    applied_on_h1(bed, state="stopped")
    bed.write(lab(bed.folder, a_host="h2", state="stopped"))
    saved = bed.folder / "move.json"
    assert bed.cli("plan", "-f", bed.path, "--out", saved).code == 0
    fingerprints = json.loads(saved.read_text(encoding="utf-8"))["fingerprints"]
    assert "h2:VirtualMachine/a<-h1" in fingerprints
    result = bed.cli("apply", "-y", saved)
    assert result.code == 0, result
    assert bed.domains("h1") == {} and bed.domains("h2") == {"a": False, "b": True}
    assert bed.hv("h2").contents[("p", "da.qcow2")] == DATA
    bed.converged()
