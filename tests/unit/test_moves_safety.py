"""Moves between hosts that must not run: what blocks them, and that applying such a plan deletes,
creates and starts nothing it should not (plan/moves.py's list of blocked moves, prune's `kept`,
the hosts --host leaves out), plus a move killed after its define, and the host lock's
judgement of dead holders.

Daemon-free: libvirt's test driver as every host, with test_hosts' bed and volume-copy fakes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from manifest_docs import disk, image
from test_hosts import DATA, Bed, applied_on_h1, lab, make_bed, shape, the_move, vm
from testdriver import DriverHypervisor

from kvmctl.apply import hostlock
from kvmctl.apply.executor import Executor
from kvmctl.engine import PlanRequest, _saved_fingerprint
from kvmctl.errors import HypervisorError, KvmctlError
from kvmctl.plan import steps as s
from kvmctl.plan.types import ChangeClass, ProjectPlan

Snapshot = dict[str, tuple[dict[str, bool], dict[str, str]]]


@pytest.fixture
def bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bed]:
    yield make_bed(tmp_path, monkeypatch)


def snapshot(bed: Bed) -> Snapshot:
    """Every host's domains (name -> running) and volumes of pool p (name -> sha256 of what
    it holds, ownership records included)."""
    out: Snapshot = {}
    for host in bed.hosts:
        hv = bed.hv(host)
        pools = {p.name(): p for p in hv.conn.listAllStoragePools()}
        volumes: dict[str, str] = {}
        if "p" in pools and pools["p"].isActive():
            volumes = {v: hashlib.sha256(hv.contents.get(("p", v), b"")).hexdigest()[:16]
                       for v in bed.volumes(host)}
        out[host] = (bed.domains(host), volumes)
    return out


def plan_of(bed: Bed, only: tuple[str, ...] = (),
            request: PlanRequest | None = None) -> ProjectPlan:
    d = bed.deployment(only=only)
    try:
        return d.plan(request or PlanRequest())
    finally:
        d.close()


def change(plan: ProjectPlan, host: str, ref: str) -> Any:
    (found,) = [c for c in plan.host_plan(host).plan.changes if c.ref == ref]
    return found


def json_change(plan: dict[str, Any], change_id: str) -> dict[str, Any]:
    (found,) = [c for c in plan["changes"] if c["id"] == change_id]
    assert isinstance(found, dict)
    return found


def apply_anyway(bed: Bed, *extra: Any) -> str:
    """Apply (a plan with blocked changes still exits 0); its output."""
    result = bed.cli("apply", "-y", "-f", bed.path, *extra)
    assert result.code == 0, result
    assert "Traceback" not in result.output and "internal error" not in result.output
    return str(result.output)


# ---- 1. --host leaves the other host of a move out ----------------------------------------------

def test_a_move_to_the_only_host_given_is_blocked(bed: Bed) -> None:
    applied_on_h1(bed)
    before = snapshot(bed)
    bed.write(lab(bed.folder, a_host="h2"))
    plan = plan_of(bed, only=("h2",))
    move = the_move(plan)
    assert (move.from_host, move.host, move.change_class) == ("h1", "h2", ChangeClass.MOVE)
    assert move.blocked is not None and "--host" in move.blocked, move.blocked
    landing = change(plan, "h2", "Disk/da")
    assert landing.steps == () and landing.blocked is not None
    assert "VirtualMachine/a" not in {c.ref for c in plan.host_plan("h2").plan.changes}
    as_json = json_change(bed.plan("--host", "h2"), "h2:VirtualMachine/a")
    assert as_json["blocked"] and "--host" in as_json["blocked"]

    out = apply_anyway(bed, "--host", "h2")
    assert "done (copied" not in out
    assert snapshot(bed) == before
    assert "a" not in bed.domains("h2") and "da.qcow2" not in bed.volumes("h2")
    assert bed.domains("h1") == {"a": True} and bed.hv("h1").contents[("p", "da.qcow2")] == DATA


def test_the_old_host_alone_keeps_the_vm_that_left(bed: Bed) -> None:
    applied_on_h1(bed)
    before = snapshot(bed)
    bed.write(lab(bed.folder, a_host="h2"))
    plan = plan_of(bed, only=("h1",), request=PlanRequest(prune=True, prune_disks=True))
    assert plan.moves == ()
    assert not [c for c in plan.host_plan("h1").plan.changes if c.is_change], \
        plan.host_plan("h1").plan.changes
    apply_anyway(bed, "--host", "h1", "--prune", "--prune-disks")
    assert snapshot(bed) == before



def test_a_move_beside_an_unreadable_left_out_host_keeps_its_disk_owned(bed: Bed) -> None:
    applied_on_h1(bed)
    bed.extra_hosts = [{"name": "h3", "uri": f"test:///{bed.folder}/h3/missing.xml"}]
    bed.write(lab(bed.folder, a_host="h2"))
    plan = plan_of(bed, only=("h1", "h2"))
    landing = change(plan, "h2", "Disk/da")
    assert landing.blocked is not None and "could not be read" in landing.blocked
    apply_anyway(bed, "--host", "h1", "--host", "h2")
    # The move waits with its landing volume: nothing was copied, the VM stays on h1.
    assert (bed.domains("h1"), "da.qcow2" in bed.volumes("h2")) == ({"a": True}, False)
    bed.extra_hosts = []
    bed.write(lab(bed.folder, a_host="h2"))
    assert bed.cli("plan", "-f", bed.path).code == 0
    bed.apply()
    assert bed.domains("h1") == {} and bed.domains("h2") == {"a": True, "b": True}
    assert bed.hv("h2").contents[("p", "da.qcow2")] == DATA
    bed.converged()


# ---- 2. the disk's pool is stopped on the old host ----------------------------------------------

def test_a_move_whose_disk_pool_is_stopped_is_blocked(bed: Bed) -> None:
    applied_on_h1(bed, state="stopped")
    bed.hv("h1").conn.storagePoolLookupByName("p").destroy()
    bed.write(lab(bed.folder, a_host="h2", state="stopped"))
    plan = plan_of(bed)
    move = the_move(plan)
    assert move.blocked is not None and "not running" in move.blocked, move.blocked
    assert "Disk/da's pool p" in move.blocked
    landing = change(plan, "h2", "Disk/da")
    assert landing.steps == () and landing.blocked is not None

    out = apply_anyway(bed)
    assert "done (copied" not in out
    # h1's own plan starts its pool again; nothing of a is deleted there, nothing made on h2.
    assert bed.domains("h1") == {"a": False}
    assert "da.qcow2" in bed.volumes("h1") and bed.hv("h1").contents[("p", "da.qcow2")] == DATA
    assert bed.domains("h2") == {"b": True} and "da.qcow2" not in bed.volumes("h2")


def test_a_running_vm_whose_disk_pool_is_stopped_is_not_shut_down(bed: Bed) -> None:
    applied_on_h1(bed)
    bed.hv("h1").conn.storagePoolLookupByName("p").destroy()
    bed.write(lab(bed.folder, a_host="h2"))
    move = the_move(plan_of(bed))
    assert move.blocked is not None and "not running" in move.blocked
    apply_anyway(bed)
    assert bed.domains("h1") == {"a": True}  # never shut down for a move that cannot run
    assert "da.qcow2" in bed.volumes("h1") and "a" not in bed.domains("h2")


# ---- 3. prune never deletes a Disk placed on another host ---------------------------------------

def test_prune_keeps_a_disk_placed_elsewhere_whose_vm_left(bed: Bed) -> None:
    applied_on_h1(bed)
    docs = [d for d in lab(bed.folder) if d["metadata"]["name"] != "a"]
    docs[-1]["spec"]["disks"] = [{"disk": "da"}]  # b, on h2, uses da now: da is placed there
    bed.write(docs)
    request = PlanRequest(prune=True, prune_disks=True)
    plan = plan_of(bed, request=request)
    assert plan.moves == ()
    h1 = {c.ref: c for c in plan.host_plan("h1").plan.changes if c.is_change}
    assert "Disk/da" not in h1, h1
    assert h1["VirtualMachine/a"].change_class is ChangeClass.DELETE  # a left the manifests
    create = change(plan, "h2", "Disk/da")
    assert create.change_class is ChangeClass.CREATE and create.steps == ()
    assert create.blocked is not None and "holds data" in create.blocked

    apply_anyway(bed, "--prune", "--prune-disks")
    assert "a" not in bed.domains("h1")
    assert "da.qcow2" in bed.volumes("h1") and bed.hv("h1").contents[("p", "da.qcow2")] == DATA
    assert "da.qcow2" not in bed.volumes("h2")
    assert "da.qcow2" not in bed.hv("h2").conn.lookupByName("b").XMLDesc(0)


def test_prune_on_the_old_host_alone_keeps_the_moved_vm_and_its_disk(bed: Bed) -> None:
    applied_on_h1(bed)
    before = snapshot(bed)
    bed.write(lab(bed.folder, a_host="h2"))
    plan = plan_of(bed, only=("h1",), request=PlanRequest(prune=True, prune_disks=True))
    assert not [c for c in plan.host_plan("h1").plan.changes
                if c.change_class is ChangeClass.DELETE]
    apply_anyway(bed, "--host", "h1", "--prune", "--prune-disks")
    assert snapshot(bed) == before
    assert "da.qcow2" in bed.volumes("h1") and bed.domains("h1") == {"a": True}


# ---- 4. a disk several VMs share -----------------------------------------------------------------

def shared(folder: Path, host: str) -> list[dict[str, Any]]:
    docs = lab(folder, a_host=host)
    (da,) = [d for d in docs if d["kind"] == "Disk"]
    da["spec"].update(format="raw", shareable=True)
    docs.append(vm("c", host, disks=[{"disk": "da"}], interfaces=[{"network": "n"}]))
    return docs


def test_a_shared_disk_does_not_move(bed: Bed) -> None:
    bed.write(shared(bed.folder, "h1"))
    bed.apply()
    assert bed.domains("h1") == {"a": True, "c": True}
    (volume,) = [v for v in bed.volumes("h1") if v.startswith("da.")]
    bed.hv("h1").contents[("p", volume)] = DATA
    before = snapshot(bed)
    bed.write(shared(bed.folder, "h2"))
    plan = plan_of(bed)
    assert {m.name for m in plan.moves} == {"a", "c"}
    for move in plan.moves:
        assert move.blocked is not None and "share" in move.blocked, move.blocked
    assert change(plan, "h2", "Disk/da").steps == ()

    out = apply_anyway(bed)
    assert "done (copied" not in out
    assert snapshot(bed) == before


# ---- 5. protect ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["vm", "disk"])
def test_a_protected_vm_or_disk_does_not_move(bed: Bed, where: str) -> None:
    def docs(host: str) -> list[dict[str, Any]]:
        protect: dict[str, Any] = {"protect": True} if where == "vm" else {}
        out = lab(bed.folder, a_host=host, **protect)
        if where == "disk":
            (da,) = [d for d in out if d["kind"] == "Disk"]
            da["spec"]["protect"] = True
        return out

    bed.write(docs("h1"))
    bed.apply()
    bed.hv("h1").contents[("p", "da.qcow2")] = DATA
    before = snapshot(bed)
    bed.write(docs("h2"))
    move = the_move(plan_of(bed, request=PlanRequest(prune=True, prune_disks=True)))
    assert move.blocked is not None and "protect: true" in move.blocked, move.blocked
    if where == "disk":
        assert "Disk/da has protect: true" in move.blocked
    apply_anyway(bed, "--prune", "--prune-disks")
    assert snapshot(bed) == before


# ---- 6. a size or format change together with the host ------------------------------------------

@pytest.mark.parametrize(("field", "value", "words"), [
    ("size", "16MiB", "resize it afterwards"),
    ("format", "raw", "change its format afterwards"),
])
def test_a_disk_changed_with_its_host_does_not_move(bed: Bed, field: str, value: str,
                                                     words: str) -> None:
    applied_on_h1(bed)
    before = snapshot(bed)
    docs = lab(bed.folder, a_host="h2")
    (da,) = [d for d in docs if d["kind"] == "Disk"]
    da["spec"][field] = value
    bed.write(docs)
    plan = plan_of(bed)
    move = the_move(plan)
    assert move.blocked is not None and words in move.blocked, move.blocked
    assert change(plan, "h2", "Disk/da").steps == ()
    out = apply_anyway(bed)
    assert "done (copied" not in out
    assert snapshot(bed) == before


# ---- 7. a move killed after the VM was defined on its new host ----------------------------------

def test_a_move_killed_after_the_define_is_finished_next_time(
        bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    applied_on_h1(bed)
    bed.write(lab(bed.folder, a_host="h2"))
    steps = [shape(st) for st in the_move(plan_of(bed)).move_steps]
    assert steps.index(("on_host", "h2", "define_domain")) \
        < steps.index(("on_host", "h1", "delete_domain")) \
        < steps.index(("on_host", "h2", "start_domain"))

    old = bed.hv("h1")
    delete_volume = Executor.delete_volume

    def killed(self: Executor, step: s.DeleteVolume) -> str:
        if self.hv is old:  # the originals go first: stopped there, both hosts have it all
            raise KvmctlError(f"delete volume {step.volume}: killed")
        return delete_volume(self, step)

    with monkeypatch.context() as m:
        m.setattr(Executor, "delete_volume", killed)
        half = bed.cli("apply", "-y", "-f", bed.path)
    assert half.code == 1 and "delete volume da.qcow2: killed" in half.output, half
    assert bed.domains("h1") == {"a": False}  # shut down for the move, still defined
    assert bed.domains("h2") == {"a": False, "b": True}  # defined, never started
    assert "da.qcow2" in bed.volumes("h1") and "da.qcow2" in bed.volumes("h2")

    move = the_move(plan_of(bed))
    assert move.blocked is None
    assert any("finish the move from 'h1'" in r for r in move.reasons), move.reasons
    steps = [shape(st) for st in move.move_steps]
    assert steps[0] == ("verify_copy", "h1", "h2", "da.qcow2")
    assert steps[-1] == ("on_host", "h2", "start_domain")
    assert ("on_host", "h2", "define_domain") not in steps
    assert "finish the move" in bed.cli("plan", "-f", bed.path).stdout

    bed.apply()
    assert bed.domains("h1") == {} and bed.domains("h2") == {"a": True, "b": True}
    assert "da.qcow2" not in bed.volumes("h1")
    assert bed.hv("h2").contents[("p", "da.qcow2")] == DATA
    bed.converged()


def test_a_stopped_vm_killed_after_the_define_stays_stopped(
        bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    applied_on_h1(bed, state="stopped")
    bed.write(lab(bed.folder, a_host="h2", state="stopped"))
    old = bed.hv("h1")
    delete_domain = Executor.delete_domain

    def killed(self: Executor, step: s.DeleteDomain) -> str:
        if self.hv is old:
            raise KvmctlError("killed")
        return delete_domain(self, step)

    with monkeypatch.context() as m:
        m.setattr(Executor, "delete_domain", killed)
        assert bed.cli("apply", "-y", "-f", bed.path).code == 1
    assert bed.domains("h1") == {"a": False} and bed.domains("h2") == {"a": False, "b": True}
    bed.apply()
    assert bed.domains("h1") == {} and bed.domains("h2") == {"a": False, "b": True}
    assert bed.hv("h2").contents[("p", "da.qcow2")] == DATA
    bed.converged()


# ---- 8. the host lock's dead holders ------------------------------------------------------------

@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_that_cannot_be_inspected_is_alive(child: subprocess.Popen[bytes],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    identity = hostlock.process_identity(child.pid)
    assert identity and not hostlock.holder_died(identity)
    readlink = os.readlink

    def refused(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc/") and not str(path).startswith(f"/proc/{os.getpid()}/"):
            raise PermissionError(13, "Permission denied", str(path))
        return readlink(path, *args, **kwargs)

    with monkeypatch.context() as m:  # another user's process: its namespace link is closed
        m.setattr(os, "readlink", refused)
        assert hostlock._identity(child.pid) is None
        assert not hostlock.holder_died(identity)
        # Even a holder whose start time differs is not judged so while it cannot be seen.
        assert not hostlock.holder_died(identity.rpartition(":")[0] + ":1")
    with monkeypatch.context() as m:
        real = hostlock._identity
        m.setattr(hostlock, "_identity",
                  lambda pid: None if pid == child.pid else real(pid))
        assert not hostlock.holder_died(identity)



def test_a_holder_hidden_by_hidepid_is_alive(child: subprocess.Popen[bytes],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    identity = hostlock.process_identity(child.pid)
    assert identity
    hidden = f"/proc/{child.pid}/"

    def open_hidden(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith(hidden):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return open(path, *args, **kwargs)

    readlink = os.readlink

    def readlink_hidden(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith(hidden):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return readlink(path, *args, **kwargs)

    monkeypatch.setattr(hostlock, "open", open_hidden, raising=False)
    monkeypatch.setattr(os, "readlink", readlink_hidden)
    assert child.poll() is None  # it runs
    assert not hostlock.holder_died(identity)


def test_a_reaped_holder_died() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    identity = hostlock.process_identity(proc.pid)
    proc.kill()
    proc.wait()
    assert identity  # read while it ran
    assert not os.path.exists(f"/proc/{proc.pid}")
    assert hostlock._identity(proc.pid) == ""
    assert hostlock.holder_died(identity)


# ---- 9. an overlay's base is verified before anything of the move runs --------------------------

BASE = b"kvmctl base image\n" * 200


def import_host_file(self: DriverHypervisor, pool_name: str, name: str, xml: str,
                     path: str) -> None:
    """The test driver cannot read a host file into a pool: made empty, filled from `path`."""
    self.create_volume(pool_name, name, xml)
    self.contents[(pool_name, name)] = Path(path).read_bytes()


def overlaid(bed: Bed, a_host: str = "h1") -> list[dict[str, Any]]:
    """lab, with Disk da an overlay of Image base (a small file, imported on every host)."""
    source = bed.folder / "src" / "base.raw"
    if not source.exists():
        source.parent.mkdir()
        source.write_bytes(BASE)
    docs = lab(bed.folder, a_host=a_host)
    docs.insert(1, image("base", "p", path=str(source), format="raw", hosts="all"))
    (da,) = [d for d in docs if d["kind"] == "Disk"]
    da["spec"]["image"] = "base"
    return docs


@pytest.fixture
def overlay_bed(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> Bed:
    """VM a on h1 with Disk da (holding DATA) over Image base, on both hosts; b on h2."""
    monkeypatch.setattr(DriverHypervisor, "import_host_file", import_host_file)
    bed.write(overlaid(bed))
    bed.apply()
    bed.hv("h1").contents[("p", "da.qcow2")] = DATA
    assert bed.hv("h2").contents[("p", "base.raw")] == BASE
    return bed


def test_an_overlay_moves_after_its_base_is_verified(overlay_bed: Bed) -> None:
    bed = overlay_bed
    bed.write(overlaid(bed, a_host="h2"))
    move = the_move(plan_of(bed))
    assert move.blocked is None, move.blocked
    steps = [shape(st) for st in move.move_steps]
    assert steps[:4] == [("verify_copy", "h1", "h2", "base.raw"),
                         ("on_host", "h1", "shutdown_domain"),
                         ("on_host", "h2", "claim_volume"),
                         ("copy_volume", "h1", "h2", "da.qcow2")]
    (verify,) = [st for st in move.move_steps if isinstance(st, s.VerifyCopy)]
    assert (verify.pool, verify.to_pool) == ("p", "p")

    out = bed.apply().stdout
    assert "done (the copy of base.raw on h2 verified; copied da.qcow2 from h1 to h2" in out, out
    assert bed.domains("h1") == {} and bed.domains("h2") == {"a": True, "b": True}
    assert "da.qcow2" not in bed.volumes("h1") and "base.raw" in bed.volumes("h1")
    assert bed.hv("h2").contents[("p", "da.qcow2")] == DATA
    bed.converged()


def test_an_overlay_whose_base_differs_on_the_new_host_stays(overlay_bed: Bed) -> None:
    bed = overlay_bed
    bed.hv("h2").contents[("p", "base.raw")] = b"another base\n"
    bed.write(overlaid(bed, a_host="h2"))
    assert the_move(plan_of(bed)).blocked is None  # the bytes are compared when it runs
    before = snapshot(bed)
    calls = {h: len(bed.hv(h).calls) for h in bed.hosts}
    result = bed.cli("apply", "-y", "-f", bed.path)
    assert result.code == 1, result
    assert "base.raw on h1 and its copy on h2 differ" in result.output, result
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert snapshot(bed) == before  # nothing shut down, copied or deleted
    assert bed.domains("h1") == {"a": True} and "a" not in bed.domains("h2")
    assert bed.hv("h1").contents[("p", "da.qcow2")] == DATA
    assert "da.qcow2" not in bed.volumes("h2")
    assert not [c for h in bed.hosts for c in bed.hv(h).calls[calls[h]:]
                if c[0] == "copy_volume"]


def test_an_overlay_whose_base_the_new_host_lacks_is_blocked(overlay_bed: Bed) -> None:
    bed = overlay_bed
    docs = overlaid(bed, a_host="h2")
    # Disk da now names base2 (another volume, another path); base stays on h1 alone: h2 has
    # nothing at the path da's copy would read its base from.
    (base,) = [d for d in docs if d["kind"] == "Image"]
    base["spec"]["hosts"] = ["h1"]
    docs.insert(2, image("base2", "p", path=base["spec"]["path"], format="raw", hosts="all"))
    (da,) = [d for d in docs if d["kind"] == "Disk"]
    da["spec"]["image"] = "base2"
    bed.hv("h2").delete_volume("p", "base.raw")
    bed.write(docs)
    plan = plan_of(bed)
    move = the_move(plan)
    assert move.blocked is not None and "does not have" in move.blocked, move.blocked
    assert not [st for st in move.move_steps if isinstance(st, s.VerifyCopy)]
    assert change(plan, "h2", "Disk/da").steps == ()
    out = apply_anyway(bed)
    assert "done (copied" not in out
    assert bed.domains("h1") == {"a": True} and "a" not in bed.domains("h2")
    assert bed.hv("h1").contents[("p", "da.qcow2")] == DATA
    assert "da.qcow2" not in bed.volumes("h2")


# ---- 10. a pool of the Disk's name stopped on a third host --------------------------------------

@pytest.fixture
def three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bed:
    """lab applied over h1, h2 and h3 (a and da on h1, b on h2), DATA in da; p stopped on h3."""
    bed = make_bed(tmp_path, monkeypatch, names=("h1", "h2", "h3"))
    applied_on_h1(bed)
    assert "p" in {p.name() for p in bed.hv("h3").conn.listAllStoragePools()}
    bed.hv("h3").conn.storagePoolLookupByName("p").destroy()
    return bed


def test_a_disk_is_not_created_while_its_pool_is_stopped_elsewhere(three: Bed) -> None:
    bed = three
    docs = lab(bed.folder)
    docs.insert(3, disk("dn", "p", "8MiB"))
    docs.append(vm("c", "h2", disks=[{"disk": "dn"}], interfaces=[{"network": "n"}]))
    bed.write(docs)
    plan = plan_of(bed)
    create = change(plan, "h2", "Disk/dn")
    assert create.change_class is ChangeClass.CREATE and create.steps == ()
    assert create.blocked is not None and "'h3'" in create.blocked
    assert "stopped" in create.blocked, create.blocked
    vm_c = change(plan, "h2", "VirtualMachine/c")
    assert vm_c.steps == () and vm_c.blocked is not None and "Disk/dn" in vm_c.blocked
    apply_anyway(bed)
    assert "dn.qcow2" not in bed.volumes("h2") and "c" not in bed.domains("h2")


def test_a_move_is_blocked_while_its_disk_pool_is_stopped_on_a_third_host(three: Bed) -> None:
    bed = three
    bed.write(lab(bed.folder, a_host="h2"))
    plan = plan_of(bed)
    move = the_move(plan)
    assert move.blocked is not None and "may also have data" in move.blocked, move.blocked
    assert "'h3' (pool p is stopped there" in move.blocked
    assert change(plan, "h2", "Disk/da").steps == ()
    out = apply_anyway(bed)
    assert "done (copied" not in out
    assert bed.domains("h1") == {"a": True} and bed.domains("h2") == {"b": True}
    assert bed.hv("h1").contents[("p", "da.qcow2")] == DATA
    assert "da.qcow2" not in bed.volumes("h2")


# ---- 11. a VM is not created on one of two copies of its Disk -----------------------------------

def test_a_vm_is_not_created_on_one_of_two_copies(bed: Bed,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    applied_on_h1(bed, state="stopped")
    bed.write(lab(bed.folder, a_host="h2", state="stopped"))

    def refused(name: str, xml: str) -> None:
        raise HypervisorError(f"define domain {name}: refused")

    with monkeypatch.context() as m:  # the move stops after ClaimVolume and CopyVolume
        m.setattr(bed.hv("h2"), "define_domain", refused)
        half = bed.cli("apply", "-y", "-f", bed.path)
    assert half.code == 1 and "define domain a: refused" in half.output, half
    assert bed.hv("h2").contents[("p", "da.qcow2")] == DATA  # the landing copy is left
    bed.hv("h1").conn.lookupByName("a").undefine()  # and a is undefined on h1 by hand
    assert "da.qcow2" in bed.volumes("h1") and bed.domains("h1") == {}

    plan = plan_of(bed)
    assert plan.moves == ()
    create = change(plan, "h2", "VirtualMachine/a")
    assert create.change_class is ChangeClass.CREATE and create.steps == ()
    assert create.blocked is not None and "one of two copies" in create.blocked, create.blocked
    assert "Disk/da" in create.blocked
    apply_anyway(bed)
    assert "a" not in bed.domains("h2") and bed.domains("h1") == {}
    assert bed.hv("h1").contents[("p", "da.qcow2")] == DATA
    assert bed.hv("h2").contents[("p", "da.qcow2")] == DATA


# ---- 12. saved plans: edits, shapes, and blocks lifted since -------------------------------------

def saved_plan(bed: Bed) -> tuple[Path, dict[str, Any]]:
    path = bed.folder / "plan.json"
    made = bed.cli("plan", "-f", bed.path, "--out", path)
    assert made.code == 0, made
    return path, json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("edit", ["uri", "domain_type", "prune", "target"])
def test_a_saved_plan_with_edited_hosts_or_options_is_refused(bed: Bed, edit: str) -> None:
    bed.write(lab(bed.folder))
    path, data = saved_plan(bed)
    if edit == "uri":
        data["hosts"][1]["uri"] = bed.uri("h1") + ".other"
    elif edit == "domain_type":
        data["hosts"][0]["domain_type"] = "kvm"
    elif edit == "prune":
        data["options"]["prune"] = True
    else:
        data["options"]["target"] = ["h1:VirtualMachine/a"]
    path.write_text(json.dumps(data), encoding="utf-8")
    refused = bed.cli("apply", "-y", path)
    assert refused.code == 1, refused
    assert f"{path} was modified after it was saved" in refused.stderr
    assert "internal error" not in refused.output and "Traceback" not in refused.output
    assert all(bed.domains(h) == {} for h in bed.hosts)


@pytest.mark.parametrize("documents", [[1, 2], ["a"], [None], 3])
def test_a_saved_plan_of_documents_that_are_not_mappings_is_a_usage_error(
        bed: Bed, documents: Any) -> None:
    bed.write(lab(bed.folder))
    path, data = saved_plan(bed)
    data["documents"] = documents
    data["manifest_fingerprint"] = _saved_fingerprint(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    refused = bed.cli("apply", "-y", path)
    assert refused.code == 2, refused
    assert str(path) in refused.stderr and "internal error" not in refused.output
    assert "Traceback" not in refused.output
    assert all(bed.domains(h) == {} for h in bed.hosts)


def test_a_saved_plan_whose_block_was_lifted_is_refused(bed: Bed) -> None:
    applied_on_h1(bed)
    docs = [d for d in lab(bed.folder) if d["metadata"]["name"] != "a"]
    docs[-1]["spec"]["disks"] = [{"disk": "da"}]  # b, on h2, uses da, which h1 holds
    bed.write(docs)
    path, data = saved_plan(bed)
    assert json_change(data["plan"], "h2:Disk/da")["blocked"]
    assert data["fingerprints"]["h2:Disk/da"].endswith("|blocked")
    b_before = bed.hv("h2").conn.lookupByName("b").XMLDesc(0)
    bed.hv("h1").conn.lookupByName("a").destroy()
    bed.hv("h1").delete_volume("p", "da.qcow2")  # the holder's volume is gone: no block now
    assert change(plan_of(bed), "h2", "Disk/da").blocked is None

    refused = bed.cli("apply", "-y", path)
    assert refused.code == 1, refused
    assert "changed since the plan was saved" in refused.stderr
    assert "h2:Disk/da" in refused.stderr
    assert "da.qcow2" not in bed.volumes("h2")
    assert bed.hv("h2").conn.lookupByName("b").XMLDesc(0) == b_before


# ---- 13. --host beside an unreadable host: a new Disk of an existing VM -------------------------

def test_a_new_disk_of_an_existing_vm_waits_for_an_unreadable_host(bed: Bed) -> None:
    bed.write(lab(bed.folder))
    bed.apply()
    b_before = bed.hv("h2").conn.lookupByName("b").XMLDesc(0)
    bed.extra_hosts = [{"name": "h3", "uri": f"test:///{bed.folder}/h3/missing.xml"}]
    docs = lab(bed.folder)
    docs.insert(3, disk("db", "p", "8MiB"))
    docs[-1]["spec"]["disks"] = [{"disk": "db"}]
    bed.write(docs)
    plan = plan_of(bed, only=("h1", "h2"))
    create = change(plan, "h2", "Disk/db")
    assert create.steps == () and create.blocked is not None
    assert "could not be read" in create.blocked, create.blocked
    update = change(plan, "h2", "VirtualMachine/b")
    assert update.change_class is not ChangeClass.CREATE
    assert update.steps == () and update.blocked is not None, update
    assert "needs Disk/db" in update.blocked, update.blocked
    apply_anyway(bed, "--host", "h1", "--host", "h2")
    assert "db.qcow2" not in bed.volumes("h2")
    assert bed.hv("h2").conn.lookupByName("b").XMLDesc(0) == b_before
