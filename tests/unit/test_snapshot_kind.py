"""The Snapshot kind and snapshot policies in manifests and plans: located refusals of what
libvirt 9.0 cannot snapshot, declared snapshots planned from data (create, no-op, immutable,
never taken over), prune, deletes and disk replaces blocked by the snapshots they would lose,
the rendered XML and its mark read back. No daemon: plans are made from a LiveState built here,
and the CLI runs offline (validate, render) or on libvirt's test driver."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_support import CliResult
from lxml import etree
from manifest_docs import disk, doc, pool

from kvmctl.errors import PlanError
from kvmctl.host.ownership import Owner, owner_from_xml
from kvmctl.host.snapshots import MARK, mark, parse
from kvmctl.host.state import LiveDomain, LivePool, LiveSnapshot, LiveState, LiveVolume
from kvmctl.kinds import Kind, SnapshotOrigin, snapshot_mark
from kvmctl.manifest import documents, validate
from kvmctl.manifest.model import ManifestSet
from kvmctl.plan import Options, make_plan
from kvmctl.plan.steps import CreateSnapshot, DefineDomain, DeleteDomain, DeleteSnapshot
from kvmctl.plan.types import Change, ChangeClass, Plan
from kvmctl.render.definitions import render_desired

P = "lab"
POOL_PATH = "/var/tmp/kvmctl-unit/snap-pool"
Cli = Callable[..., CliResult]


# ---- documents -----------------------------------------------------------------------------------

def vm_doc(name: str = "v", state: str = "stopped", disks: tuple[str, ...] = ("d",),
           **spec: Any) -> dict[str, Any]:
    return doc("VirtualMachine", name, {"memory": "128MiB", "state": state,
                                        "boot": {"kernel": "/k", "cmdline": "x"},
                                        "disks": [{"disk": d} for d in disks], **spec})


def snapshot_doc(name: str = "s", vm: str = "v", **spec: Any) -> dict[str, Any]:
    return doc("Snapshot", name, {"vm": vm, **spec})


def base(state: str = "stopped", fmt: str = "qcow2", **vm: Any) -> list[dict[str, Any]]:
    return [pool("p", POOL_PATH), disk("d", "p", "16MiB", format=fmt), vm_doc(state=state, **vm)]


def model(docs: list[dict[str, Any]]) -> ManifestSet:
    return validate.validate(documents.parse_text(yaml.safe_dump_all(docs, sort_keys=False),
                                                  "m.yaml"))


# ---- live state from data ------------------------------------------------------------------------

def taken(name: str, project: str | None = P,
          origin: SnapshotOrigin | None = SnapshotOrigin.DECLARED, spec: str = "",
          created: int = 1_780_000_000, vm: str = "v") -> LiveSnapshot:
    return LiveSnapshot(vm, name, created, "shutoff", None, "", project, origin, spec, False,
                        False, False)


def live_for(docs: list[dict[str, Any]], running: bool = False,
             snaps: tuple[LiveSnapshot, ...] = (), checkpoints: int = 0,
             vm: str = "v") -> LiveState:
    """The host as kvmctl left it after applying `docs` (pool, qcow2 volume of Disk d, the VM
    `vm` as rendered), with `snaps` taken of the VM."""
    m = model(docs)
    desired = render_desired(m, P, "qemu")
    xml = desired.domains[vm]
    vol = LiveVolume("p", "d.qcow2", f"{POOL_PATH}/d.qcow2", 16 << 20, "qcow2", None,
                     Owner(P, Kind.DISK, "d"))
    live_pool = LivePool("p", "pool-uuid", desired.pools["p"], POOL_PATH, True, True,
                         Owner(P, Kind.POOL, "p"), (vol,))
    dom = LiveDomain(vm, "dom-uuid", xml, xml if running else None,
                     "running" if running else "shutoff", False, owner_from_xml(xml),
                     snapshots=len(snaps), taken=snaps, checkpoints=checkpoints)
    return LiveState(domains={vm: dom}, pools={"p": live_pool})


def plan(docs: list[dict[str, Any]], live: LiveState, **opts: Any) -> Plan:
    m = model(docs)
    return make_plan(m, render_desired(m, P, "qemu", live.hints()), live, Options(P, **opts))


def by_ref(p: Plan) -> dict[str, Change]:
    return {c.ref: c for c in p.changes}


def spec_of(docs: list[dict[str, Any]], name: str = "s") -> str:
    """The spec digest kvmctl marks the declared snapshot `name` of `docs` with."""
    return render_desired(model(docs), P, "qemu").snapshots[name].spec


# ---- validate: located refusals ------------------------------------------------------------------

def _validate(cli: Cli, write: Callable[[str, str], Path], docs: list[dict[str, Any]]
              ) -> tuple[str, list[dict[str, Any]]]:
    text = yaml.safe_dump_all(docs, sort_keys=False)
    path = write("m.yaml", text)
    result = cli(["validate", "-f", path, "-o", "json"])
    assert result.code == 1, result
    assert "Traceback" not in result.output
    problems = result.json()
    assert all(p["file"] == str(path) for p in problems), problems
    return text, problems


def _line(text: str, doc_name: str, key: str) -> int:
    """The 1-based line of `key:` in the document whose metadata.name is `doc_name`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"name: {doc_name}")
    for i in range(start + 1, len(lines)):
        stripped = lines[i].strip().removeprefix("- ")
        if stripped.startswith(f"{key}:"):
            return i + 1
    raise AssertionError(f"no {key} after name: {doc_name}")


def _one(problems: list[dict[str, Any]], path: str, says: str) -> dict[str, Any]:
    found = [p for p in problems if p["path"] == path and says in p["message"]]
    assert len(found) == 1, f"no single problem at {path} saying {says!r}: {problems}"
    return found[0]


def test_a_snapshot_of_a_uefi_vm_is_refused_where_it_is_declared(cli: Cli, write: Any) -> None:
    text, problems = _validate(cli, write, base(firmware="uefi") + [snapshot_doc()])
    p = _one(problems, "spec.vm", "VM v cannot be snapshotted")
    assert "UEFI" in p["message"] and "backup" in p["message"]  # why, and what works
    assert p["line"] == _line(text, "s", "vm")


def test_a_snapshot_of_a_vm_on_a_raw_disk_is_refused(cli: Cli, write: Any) -> None:
    text, problems = _validate(cli, write, base(fmt="raw") + [snapshot_doc()])
    p = _one(problems, "spec.vm", "Disk d is raw")
    assert "qcow2 would work" in p["message"]
    assert p["line"] == _line(text, "s", "vm")


def test_a_snapshot_of_a_vm_without_disks_is_refused(cli: Cli, write: Any) -> None:
    docs = [pool("p", POOL_PATH), vm_doc(disks=()), snapshot_doc()]
    text, problems = _validate(cli, write, docs)
    p = _one(problems, "spec.vm", "no disk")
    assert "qcow2 Disk" in p["message"]
    assert p["line"] == _line(text, "s", "vm")


def test_memory_true_on_a_stopped_vm_is_refused(cli: Cli, write: Any) -> None:
    text, problems = _validate(cli, write, base("stopped") + [snapshot_doc(memory=True)])
    p = _one(problems, "spec.memory", "declared stopped")
    assert "no memory to keep" in p["message"] and "declare the VM running" in p["message"]
    assert p["line"] == _line(text, "s", "memory")


def test_memory_false_on_a_running_vm_is_refused(cli: Cli, write: Any) -> None:
    text, problems = _validate(cli, write, base("running") + [snapshot_doc(memory=False)])
    p = _one(problems, "spec.memory", "runs")
    assert "external" in p["message"] and "declare the VM stopped" in p["message"]
    assert p["line"] == _line(text, "s", "memory")


def test_quiesce_without_the_guest_agent_is_refused(cli: Cli, write: Any) -> None:
    text, problems = _validate(cli, write, base("running") + [snapshot_doc(quiesce=True)])
    p = _one(problems, "spec.quiesce", "guest agent")
    assert "guestAgent: true" in p["message"]
    assert p["line"] == _line(text, "s", "quiesce")


def test_a_snapshot_of_an_unknown_vm_is_refused(cli: Cli, write: Any) -> None:
    text, problems = _validate(cli, write, base() + [snapshot_doc(vm="nope")])
    p = _one(problems, "spec.vm", "unknown VirtualMachine 'nope'")
    assert "v" in p["hint"]  # names the VMs that are defined
    assert p["line"] == _line(text, "s", "vm")


def test_a_policy_with_a_bad_cron_is_refused(cli: Cli, write: Any) -> None:
    text, problems = _validate(cli, write, base(snapshots={"schedule": "61 * * * *"}))
    p = _one(problems, "spec.snapshots.schedule", "61 * * * *")
    assert p["line"] == _line(text, "v", "schedule")


def test_a_policy_with_an_unknown_timezone_is_refused(cli: Cli, write: Any) -> None:
    docs = base(snapshots={"every": "1h", "timezone": "Mars/Olympus"})
    text, problems = _validate(cli, write, docs)
    p = _one(problems, "spec.snapshots.timezone", "unknown timezone 'Mars/Olympus'")
    assert "Europe/Berlin" in p["message"]  # what a valid one looks like
    assert p["line"] == _line(text, "v", "timezone")


@pytest.mark.parametrize(("pattern", "says"), [
    ("{vm}-{date}", "only {vm} may stand in braces"),
    ("{vm}-%", "a % must start a strftime field"),
    ("-{vm}-%Y", "starts with a letter or digit"),
    ("%Y" * 49 + "x", "at most 97 characters"),
])
def test_a_policy_with_a_bad_name_pattern_is_refused(pattern: str, says: str, cli: Cli,
                                                    write: Any) -> None:
    text, problems = _validate(cli, write, base(snapshots={"every": "1h", "name": pattern}))
    p = _one(problems, "spec.snapshots.name", says)
    assert p["line"] == _line(text, "v", "name")


def test_a_policy_with_every_and_schedule_is_refused_by_the_schema(cli: Cli,
                                                                   write: Any) -> None:
    docs = base(snapshots={"every": "1h", "schedule": "0 3 * * *"})
    text, problems = _validate(cli, write, docs)
    p = _one(problems, "spec.snapshots", "not both")
    assert p["line"] == _line(text, "v", "every")  # the policy's mapping


def test_a_policy_with_neither_every_nor_schedule_is_refused(cli: Cli, write: Any) -> None:
    text, problems = _validate(cli, write, base(snapshots={"keep": 3}))
    p = _one(problems, "spec.snapshots", "needs every")
    assert "schedule" in p["message"] and "0 3 * * *" in p["message"]
    assert p["line"] == _line(text, "v", "keep")


def test_a_policy_on_a_vm_that_cannot_hold_snapshots_is_refused(cli: Cli, write: Any) -> None:
    text, problems = _validate(cli, write, base(fmt="raw", snapshots={"every": "1d"}))
    p = _one(problems, "spec.snapshots", "a snapshot policy cannot run")
    assert "raw" in p["message"] and "qcow2 would work" in p["message"]


def test_valid_snapshots_and_policies_pass(cli: Cli, write: Any) -> None:
    docs = (base("running", guestAgent=True,
                 snapshots={"schedule": "0 3 * * *", "timezone": "Europe/Berlin", "keep": 7,
                            "keepFor": "30d", "name": "{vm}-nightly-%Y%m%d"})
            + [snapshot_doc(quiesce=True, description="before the upgrade")])
    path = write("ok.yaml", yaml.safe_dump_all(docs, sort_keys=False))
    result = cli(["validate", "-f", path])
    assert result.code == 0, result


# ---- plan: declared snapshots --------------------------------------------------------------------

def test_an_absent_snapshot_of_a_running_vm_is_created_with_memory() -> None:
    docs = base("running") + [snapshot_doc()]
    change = by_ref(plan(docs, live_for(docs, running=True)))["Snapshot/s"]
    assert change.change_class is ChangeClass.CREATE
    (step,) = change.steps
    assert isinstance(step, CreateSnapshot)
    assert (step.vm, step.name, step.memory, step.quiesce) == ("v", "s", True, False)
    assert "<memory snapshot='no'/>" not in step.xml
    assert change.depends == ("VirtualMachine/v",)


def test_an_absent_snapshot_of_a_stopped_vm_is_created_without_memory() -> None:
    docs = base("stopped") + [snapshot_doc()]
    change = by_ref(plan(docs, live_for(docs)))["Snapshot/s"]
    assert change.change_class is ChangeClass.CREATE
    (step,) = change.steps
    assert isinstance(step, CreateSnapshot) and step.memory is False
    assert "<memory snapshot='no'/>" in step.xml


def test_a_snapshot_of_a_vm_not_created_yet_follows_the_vms_declared_state() -> None:
    docs = base("running") + [snapshot_doc(quiesce=True)]
    docs[2]["spec"]["guestAgent"] = True
    changes = by_ref(plan(docs, LiveState()))
    assert changes["VirtualMachine/v"].change_class is ChangeClass.CREATE
    (step,) = changes["Snapshot/s"].steps
    assert isinstance(step, CreateSnapshot) and step.memory is True and step.quiesce is True


def test_a_taken_snapshot_with_the_same_spec_is_a_noop() -> None:
    docs = base() + [snapshot_doc(description="before")]
    live = live_for(docs, snaps=(taken("s", spec=spec_of(docs)),))
    change = by_ref(plan(docs, live))["Snapshot/s"]
    assert change.change_class is ChangeClass.NOOP and change.steps == ()


def test_a_changed_spec_is_an_error_saying_snapshots_are_immutable() -> None:
    old = base() + [snapshot_doc(description="before")]
    new = base() + [snapshot_doc(description="after")]
    assert spec_of(old) != spec_of(new)
    live = live_for(new, snaps=(taken("s", spec=spec_of(old)),))
    with pytest.raises(PlanError) as err:
        plan(new, live)
    message = str(err.value)
    assert "m.yaml" in message and "Snapshot/s" in message
    assert "immutable" in message and "new name" in message


@pytest.mark.parametrize(("project", "origin", "who"), [
    (P, SnapshotOrigin.MANUAL, "this project, not from a Snapshot document"),
    (P, SnapshotOrigin.POLICY, "this project, not from a Snapshot document"),
    ("other", SnapshotOrigin.DECLARED, "project 'other'"),
    (None, None, "not kvmctl"),
])
def test_a_snapshot_of_that_name_kvmctl_did_not_declare_is_never_taken_over(
        project: str | None, origin: SnapshotOrigin | None, who: str) -> None:
    docs = base() + [snapshot_doc()]
    live = live_for(docs, snaps=(taken("s", project, origin, spec=spec_of(docs)),))
    with pytest.raises(PlanError) as err:
        plan(docs, live)
    message = str(err.value)
    assert "never takes it over" in message and who in message
    assert "another name" in message


def test_a_vm_with_checkpoints_cannot_be_snapshotted() -> None:
    docs = base() + [snapshot_doc()]
    with pytest.raises(PlanError) as err:
        plan(docs, live_for(docs, checkpoints=2))
    assert "2 checkpoints" in str(err.value) and "Snapshot/s" in str(err.value)


# ---- prune and deletes ---------------------------------------------------------------------------

FOREIGN = (taken("by-policy", origin=SnapshotOrigin.POLICY, created=1_780_000_100),
           taken("by-hand", origin=SnapshotOrigin.MANUAL, created=1_780_000_200),
           taken("theirs", project="other", created=1_780_000_300),
           taken("unmarked", project=None, origin=None, created=1_780_000_400))


def test_a_declared_snapshot_whose_document_is_gone_is_deleted_only_with_prune() -> None:
    docs = base()
    live = live_for(docs, snaps=(taken("gone"),) + FOREIGN)
    assert "Snapshot/gone" not in by_ref(plan(docs, live))
    change = by_ref(plan(docs, live, prune=True))["Snapshot/gone"]
    assert change.change_class is ChangeClass.DELETE
    assert change.steps == (DeleteSnapshot("v", "gone"),)
    assert "no longer in the manifests" in change.reasons[0]


def test_prune_never_deletes_policy_manual_or_foreign_snapshots() -> None:
    docs = base()
    changes = by_ref(plan(docs, live_for(docs, snaps=FOREIGN), prune=True, prune_disks=True))
    assert not [ref for ref in changes if ref.startswith("Snapshot/")]


def test_a_declared_snapshot_still_declared_is_not_pruned() -> None:
    docs = base() + [snapshot_doc()]
    live = live_for(docs, snaps=(taken("s", spec=spec_of(docs)),))
    change = by_ref(plan(docs, live, prune=True))["Snapshot/s"]
    assert change.change_class is ChangeClass.NOOP


def test_deleting_a_vm_with_snapshots_is_blocked_with_the_count_it_would_lose() -> None:
    docs = base()
    live = live_for(docs, snaps=(taken("gone"),) + FOREIGN)
    left = [pool("p", POOL_PATH)]
    changes = by_ref(plan(left, live, prune=True, prune_disks=True))
    vm = changes["VirtualMachine/v"]
    assert vm.change_class is ChangeClass.DELETE and vm.steps == ()
    # every snapshot counts, the declared one too: deleting the VM takes them all
    assert vm.blocked == "has 5 snapshots: deleting it loses them (--allow-snapshot-loss)"
    # a VM that stays keeps its declared snapshots, documents or not
    assert "Snapshot/gone" not in changes
    # and its disk stays with it
    kept = changes["Disk/d"]
    assert kept.steps == () and kept.blocked == "used by VM v, which is not deleted"


def test_one_snapshot_is_counted_in_the_singular() -> None:
    live = live_for(base(), snaps=(FOREIGN[1],))
    vm = by_ref(plan([pool("p", POOL_PATH)], live, prune=True))["VirtualMachine/v"]
    assert vm.blocked is not None and vm.blocked.startswith("has 1 snapshot:")


def test_a_vm_with_only_declared_snapshots_left_is_still_blocked() -> None:
    live = live_for(base(), snaps=(taken("a"), taken("b", created=1_780_000_001)))
    changes = by_ref(plan([pool("p", POOL_PATH)], live, prune=True))
    assert changes["VirtualMachine/v"].blocked is not None
    assert changes["VirtualMachine/v"].blocked.startswith("has 2 snapshots")
    assert "Snapshot/a" not in changes and "Snapshot/b" not in changes


def test_allow_snapshot_loss_unblocks_the_vm_delete_and_its_disks() -> None:
    live = live_for(base(), snaps=FOREIGN)
    changes = by_ref(plan([pool("p", POOL_PATH)], live, prune=True, prune_disks=True,
                          allow_snapshot_loss=True))
    vm = changes["VirtualMachine/v"]
    assert vm.blocked is None and any(isinstance(s, DeleteDomain) for s in vm.steps)
    assert changes["Disk/d"].blocked is None and changes["Disk/d"].steps
    assert not [ref for ref in changes if ref.startswith("Snapshot/")]


def test_with_allow_snapshot_loss_the_declared_snapshots_go_before_their_vm() -> None:
    live = live_for(base(), snaps=(taken("gone"),) + FOREIGN)
    p = plan([pool("p", POOL_PATH)], live, prune=True, allow_snapshot_loss=True)
    changes = by_ref(p)
    assert changes["Snapshot/gone"].steps == (DeleteSnapshot("v", "gone"),)
    assert changes["VirtualMachine/v"].blocked is None
    assert not {"Snapshot/by-policy", "Snapshot/by-hand", "Snapshot/theirs",
                "Snapshot/unmarked"} & set(changes)


def test_a_snapshot_count_without_the_list_still_blocks() -> None:
    """libvirt's count alone (snapshots read without their XML) is enough to block."""
    live = live_for(base())
    dom = live.domains["v"]
    live = LiveState(domains={"v": LiveDomain(dom.name, dom.uuid, dom.inactive_xml, None,
                                              dom.state, False, dom.owner, snapshots=3)},
                     pools=live.pools)
    vm = by_ref(plan([pool("p", POOL_PATH)], live, prune=True))["VirtualMachine/v"]
    assert vm.blocked is not None and vm.blocked.startswith("has 3 snapshots")


# ---- a disk format change of a disk that holds snapshots -----------------------------------------

def test_a_format_change_of_a_disk_holding_snapshots_is_blocked_with_the_count() -> None:
    live = live_for(base(), snaps=FOREIGN[:2])
    change = by_ref(plan(base(fmt="raw"), live))["Disk/d"]
    assert change.change_class is ChangeClass.REPLACE and change.steps == ()
    assert change.blocked == ("VM v has 2 snapshots: replacing the volume that holds them "
                              "loses them (--allow-snapshot-loss)")


def test_a_format_change_is_allowed_with_allow_snapshot_loss() -> None:
    live = live_for(base(), snaps=FOREIGN[:2])
    change = by_ref(plan(base(fmt="raw"), live, allow_snapshot_loss=True))["Disk/d"]
    assert change.blocked is None and change.steps


def test_a_format_change_without_snapshots_is_not_blocked() -> None:
    change = by_ref(plan(base(fmt="raw"), live_for(base())))["Disk/d"]
    assert change.change_class is ChangeClass.REPLACE and change.blocked is None


def test_a_blocked_format_change_does_not_redefine_the_vm_onto_the_missing_volume() -> None:
    live = live_for(base(), snaps=FOREIGN[:2])
    changes = by_ref(plan(base(fmt="raw"), live))
    assert changes["Disk/d"].blocked is not None
    for step in changes["VirtualMachine/v"].steps:
        assert not (isinstance(step, DefineDomain) and "d.raw" in step.xml), \
            "VM v is redefined onto p/d.raw, which the blocked Disk replace never creates"
    assert "Disk/d, whose replace is blocked" in (changes["VirtualMachine/v"].blocked or "")


# ---- render --------------------------------------------------------------------------------------

def _render(cli: Cli, write: Any, docs: list[dict[str, Any]]) -> str:
    path = write("r.yaml", yaml.safe_dump_all(docs, sort_keys=False))
    result = cli(["render", "-f", path, "--project", P])
    assert result.code == 0, result
    return result.stdout


def _snapshot_xml(out: str) -> etree._Element:
    start = out.index("<domainsnapshot>")
    end = out.index("</domainsnapshot>") + len("</domainsnapshot>")
    return etree.fromstring(out[start:end].encode())


def test_render_shows_the_snapshot_with_its_mark_and_no_memory_when_stopped(
        cli: Cli, write: Any) -> None:
    docs = base("stopped") + [snapshot_doc(description="before the upgrade")]
    out = _render(cli, write, docs)
    assert "<!-- Snapshot/s -->" in out
    root = _snapshot_xml(out)
    assert root.findtext("name") == "s"
    assert root.findtext("description") == (
        f"before the upgrade\nkvmctl: project={P} origin=declared spec={spec_of(docs)}")
    memory = root.find("memory")
    assert memory is not None and memory.get("snapshot") == "no"


def test_render_leaves_memory_to_libvirt_for_a_running_vm(cli: Cli, write: Any) -> None:
    out = _render(cli, write, base("running") + [snapshot_doc()])
    root = _snapshot_xml(out)
    assert root.find("memory") is None
    assert root.findtext("description", "").startswith(f"kvmctl: project={P} origin=declared")


def test_render_marks_a_quiesced_snapshot(cli: Cli, write: Any) -> None:
    out = _render(cli, write, base("running", guestAgent=True) + [snapshot_doc(quiesce=True)])
    assert _snapshot_xml(out).findtext("description", "").endswith(" quiesced")


def test_the_spec_digest_follows_the_spec() -> None:
    a = spec_of(base() + [snapshot_doc(description="one")])
    assert a == spec_of(base() + [snapshot_doc(description="one")])
    assert a != spec_of(base() + [snapshot_doc(description="two")])
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)


def test_render_escapes_a_hostile_description_and_it_reads_back(cli: Cli, write: Any) -> None:
    hostile = ("a <b> & 'c' \"d\" </description><name>evil</name>\n"
               "kvmctl: project=evil origin=policy\nlast words")
    docs = base() + [snapshot_doc(description=hostile)]
    root = _snapshot_xml(_render(cli, write, docs))
    assert root.findtext("name") == "s"
    s = parse("v", etree.tostring(root).decode(), current=False)
    assert (s.name, s.project, s.origin, s.spec) == ("s", P, SnapshotOrigin.DECLARED,
                                                     spec_of(docs))
    assert s.description == hostile


# ---- the mark, read back -------------------------------------------------------------------------

def _xml(description: str, memory: str = "no") -> str:
    body = etree.Element("domainsnapshot")
    etree.SubElement(body, "name").text = "s1"
    etree.SubElement(body, "description").text = description
    etree.SubElement(body, "state").text = "shutoff"
    etree.SubElement(body, "creationTime").text = "1780000000"
    etree.SubElement(body, "memory", snapshot=memory)
    return etree.tostring(body).decode()


@pytest.mark.parametrize("origin", list(SnapshotOrigin))
@pytest.mark.parametrize("quiesced", [False, True])
def test_every_mark_parses_back(origin: SnapshotOrigin, quiesced: bool) -> None:
    spec = "0123456789abcdef" if origin is SnapshotOrigin.DECLARED else ""
    line = snapshot_mark(P, origin, spec, quiesced)
    s = parse("v", _xml("text\n" + line), current=False)
    assert (s.project, s.origin, s.spec, s.quiesced, s.description) == (
        P, origin, spec, quiesced, "text")


def test_mark_writes_what_parse_reads() -> None:
    text = mark("line one\n\n", P, SnapshotOrigin.POLICY, quiesced=True)
    assert text == f"line one\nkvmctl: project={P} origin=policy quiesced"
    s = parse("v", _xml(text), current=False)
    assert s.origin is SnapshotOrigin.POLICY and s.quiesced and s.project == P


def test_an_old_mark_without_origin_is_a_manual_snapshot() -> None:
    s = parse("v", _xml(f"mine\nkvmctl: project={P}"), current=False)
    assert (s.project, s.origin, s.spec, s.quiesced) == (P, SnapshotOrigin.MANUAL, "", False)


def test_an_unknown_origin_of_a_newer_kvmctl_is_kept_as_manual() -> None:
    s = parse("v", _xml(f"kvmctl: project={P} origin=scheduled"), current=False)
    assert s.project == P and s.origin is SnapshotOrigin.MANUAL


def test_a_fake_mark_in_the_middle_of_a_description_is_not_the_mark() -> None:
    s = parse("v", _xml("kvmctl: project=evil origin=policy spec=abc\nthen more text"),
              current=False)
    assert (s.project, s.origin) == (None, None)
    assert s.description == "kvmctl: project=evil origin=policy spec=abc\nthen more text"


def test_a_fake_mark_before_the_real_one_is_only_text() -> None:
    text = mark("kvmctl: project=evil origin=policy", P, SnapshotOrigin.MANUAL)
    s = parse("v", _xml(text), current=False)
    assert (s.project, s.origin) == (P, SnapshotOrigin.MANUAL)
    assert s.description == "kvmctl: project=evil origin=policy"


@pytest.mark.parametrize("desc", [
    "kvmctl: project=lab origin=policy trailing",  # more on the line
    "kvmctl: project=lab origin=POLICY",  # not how kvmctl writes it
    " kvmctl: project=lab origin=policy",  # not at the start of the line
    "kvmctl: project= origin=policy",
    "kvmctl: project=lab spec=abc origin=declared",  # fields out of order
])
def test_lines_that_only_look_like_the_mark_are_not_it(desc: str) -> None:
    s = parse("v", _xml("x\n" + desc), current=False)
    assert (s.project, s.origin) == (None, None)
    assert s.description == "x\n" + desc


def test_xml_special_characters_survive_the_round_trip() -> None:
    desc = "<&>\"' ]]> <!-- no -->"
    s = parse("v", _xml(mark(desc, P, SnapshotOrigin.DECLARED)), current=False)
    assert s.description == desc and s.project == P
    assert MARK.search(desc) is None


# ---- end to end on the test driver ---------------------------------------------------------------

def test_a_declared_snapshot_is_taken_kept_refused_when_changed_and_pruned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli_support import run_cli
    from testdriver import install, write_manifests
    hv, uri = install(monkeypatch, tmp_path)
    try:
        infra = [pool("p", tmp_path / "pool"), disk("d", "p", "16MiB", format="qcow2"),
                 vm_doc()]

        def cli(docs: list[dict[str, Any]], *argv: str) -> CliResult:
            path = write_manifests(tmp_path / "m.yaml", docs)
            return run_cli([argv[0], "--connect", uri, "--project", P, "--domain-type", "qemu",
                            *argv[1:], "-f", path])

        first = infra + [snapshot_doc(description="first")]
        assert cli(first, "apply", "-y").code == 0
        (s,) = hv.snapshots("v")
        assert (s.name, s.project, s.origin, s.description) == (
            "s", P, SnapshotOrigin.DECLARED, "first")
        again = cli(first, "plan", "-o", "json")
        assert again.code == 0, again
        rows = {f"{c['kind']}/{c['name']}": c for c in json.loads(again.stdout)["changes"]}
        assert "Snapshot/s" not in rows or rows["Snapshot/s"]["class"] == "no-op"

        changed = cli(infra + [snapshot_doc(description="second")], "plan")
        assert changed.code != 0 and "immutable" in changed.output, changed

        kept = cli(infra, "apply", "-y")
        assert kept.code == 0 and [x.name for x in hv.snapshots("v")] == ["s"]
        pruned = cli(infra, "apply", "-y", "--prune")
        assert pruned.code == 0, pruned
        assert hv.snapshots("v") == []
    finally:
        hv.close()


# ---- what a review found -------------------------------------------------------------------------

def test_a_declared_mark_on_a_vm_this_project_does_not_own_is_never_pruned() -> None:
    docs = base()
    live = live_for(docs, snaps=(taken("gone"),))
    dom = live.domains["v"]
    theirs = replace(dom, owner=Owner("other", Kind.VM, "v"))
    live = replace(live, domains={"v": theirs})
    changes = by_ref(plan([pool("p", POOL_PATH), disk("d", "p", "16MiB")], live, prune=True))
    assert "Snapshot/gone" not in changes


def test_a_snapshot_whose_document_names_another_vm_now_is_pruned_from_the_old_one() -> None:
    docs = base() + [disk("e", "p", "16MiB"), vm_doc("w", disks=("e",)),
                     snapshot_doc("s", vm="w")]
    live = live_for(docs, snaps=(taken("s", spec=spec_of(docs)),))
    steps = [st for c in plan(docs, live, prune=True).changes for st in c.steps]
    assert DeleteSnapshot("v", "s") in steps, steps


def test_a_volume_the_vm_left_but_its_snapshots_hold_is_not_pruned() -> None:
    docs = base()
    inner = render_desired(model(docs), P, "qemu").domains["v"]
    held = replace(taken("by-hand", origin=SnapshotOrigin.MANUAL), domain_xml=inner)
    without_disk = [pool("p", POOL_PATH), vm_doc(disks=())]
    live = live_for(docs, snaps=(held,))
    change = by_ref(plan(without_disk, live, prune=True, prune_disks=True))["Disk/d"]
    assert change.change_class is ChangeClass.DELETE and not change.steps
    assert "holds the data of 1 snapshot of VM v" in (change.blocked or ""), change.blocked
    allowed = by_ref(plan(without_disk, live, prune=True, prune_disks=True,
                          allow_snapshot_loss=True))["Disk/d"]
    assert allowed.steps and not allowed.blocked


@pytest.mark.parametrize("field", ["every", "keepFor"])
def test_a_zero_duration_in_a_policy_is_refused(field: str, cli: Cli, write: Any) -> None:
    _, problems = _validate(cli, write, base(snapshots={field: "0s", **(
        {"every": "1h"} if field == "keepFor" else {})}))
    _one(problems, f"spec.snapshots.{field}", "at least 1s")
