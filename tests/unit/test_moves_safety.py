"""Moves between hosts that must not run: what blocks them, and that applying such a plan deletes,
creates and starts nothing it should not (plan/moves.py's list of blocked moves, prune's `kept`,
the hosts --host leaves out), plus a move killed after its define, and the host lock's
judgement of dead holders.

Daemon-free: libvirt's test driver as every host, with test_hosts' bed and volume-copy fakes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_hosts import DATA, Bed, applied_on_h1, lab, make_bed, shape, the_move, vm

from kvmctl.apply import hostlock
from kvmctl.apply.executor import Executor
from kvmctl.engine import PlanRequest
from kvmctl.errors import KvmctlError
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
    # Either the move waited with its landing volume, or it ran and the copy is the project's.
    assert (bed.domains("h1"), "da.qcow2" in bed.volumes("h2")) in (
        ({"a": True}, False), ({}, True))
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
