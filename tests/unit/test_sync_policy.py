"""The sync policy: what a project file's `spec.sync` and an object's `metadata.sync` say
(read_policy), and the one decision it makes (waiting_reasons: which changes of a plan may be
made now, and why the others wait). Changes are built directly; windows are 6-field cron
expressions with seconds near a fixed `now`, so nothing depends on the clock."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmctl.errors import ManifestError
from kvmctl.kinds import Kind
from kvmctl.manifest.documents import Document, parse_text
from kvmctl.manifest.project import load_project_file
from kvmctl.plan.types import Change, ChangeClass
from kvmctl.schedule import Window
from kvmctl.sync.policy import (
    DEFAULT_INTERVAL,
    DEFAULT_UNATTENDED,
    DEFAULT_WINDOW_CLASSES,
    MaintenanceWindow,
    ObjectPolicy,
    SourceDefaults,
    SyncPolicy,
    read_policy,
    read_source,
    waiting_reasons,
)

NOW = dt.datetime(2030, 1, 15, 12, 0, 0, tzinfo=dt.UTC)  # a Tuesday, noon UTC (13:00 Berlin)
C = ChangeClass


def project_file(tmp_path: Path, sync: dict[str, Any] | None, name: str = "kvmctl.yaml"
                 ) -> Document:
    """A project file written to disk and read as the CLI reads it (schema-checked)."""
    spec: dict[str, Any] = {"hosts": [{"name": "h1", "uri": "test:///default"}]}
    if sync is not None:
        spec["sync"] = sync
    body = {"apiVersion": "kvmctl/v1", "kind": "Project", "metadata": {"name": "p"},
            "spec": spec}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return load_project_file(str(path))


def change(kind: Kind, name: str, cls: ChangeClass, *depends: str, host: str = "h1",
           blocked: str | None = None) -> Change:
    return Change(kind, name, cls, depends=depends, host=host, blocked=blocked)


def window(schedule: str, duration: float = 60, timezone: str = "UTC",
           classes: frozenset[ChangeClass] = DEFAULT_WINDOW_CLASSES) -> MaintenanceWindow:
    return MaintenanceWindow(Window.parse(schedule, duration, timezone), classes)


def waits(changes: list[Change], policy: SyncPolicy, from_git: bool = True,
          now: dt.datetime = NOW) -> dict[str, str]:
    return waiting_reasons(changes, policy, now, from_git)


# ---- read_policy ----------------------------------------------------------------------------

def test_defaults_without_a_project_file() -> None:
    policy = read_policy(None)
    assert policy == SyncPolicy()
    assert (policy.apply, policy.prune, policy.prune_disks, policy.allow_empty,
            policy.self_heal, policy.suspend) == ("auto", False, False, False, False, False)
    assert policy.unattended == frozenset({C.CREATE, C.UPDATE_LIVE}) == DEFAULT_UNATTENDED
    assert DEFAULT_WINDOW_CLASSES == frozenset({C.UPDATE_RESTART, C.REPLACE, C.MOVE})
    assert policy.windows == () and policy.interval == DEFAULT_INTERVAL == 60.0
    assert dict(policy.objects) == {}
    assert read_source(None) is None


def test_defaults_of_a_project_file_without_sync(tmp_path: Path) -> None:
    doc = project_file(tmp_path, None)
    assert read_policy(doc) == SyncPolicy()
    assert read_source(doc) is None
    assert read_policy(project_file(tmp_path, {})) == SyncPolicy()


def test_every_field(tmp_path: Path) -> None:
    doc = project_file(tmp_path, {
        "source": {"repo": "https://git.example.org/infra/vms.git", "ref": "v2",
                   "path": "envs/prod"},
        "interval": "1h30m", "apply": "manual", "prune": True, "pruneDisks": True,
        "allowEmpty": True, "selfHeal": True, "suspend": True,
        "unattended": ["create", "update-live", "update-restart"],
        "windows": [{"schedule": "0 2 * * SAT", "duration": "4h", "timezone": "Europe/Berlin",
                     "classes": ["replace"]},
                    {"schedule": "@daily", "duration": 90}]})
    policy = read_policy(doc)
    assert (policy.apply, policy.prune, policy.prune_disks, policy.allow_empty,
            policy.self_heal, policy.suspend) == ("manual", True, True, True, True, True)
    assert policy.interval == 5400.0
    assert policy.unattended == frozenset({C.CREATE, C.UPDATE_LIVE, C.UPDATE_RESTART})
    first, second = policy.windows
    assert (first.window.text, first.window.duration, first.window.timezone, first.classes) \
        == ("0 2 * * SAT", 4 * 3600.0, "Europe/Berlin", frozenset({C.REPLACE}))
    assert (second.window.text, second.window.duration, second.window.timezone,
            second.classes) == ("@daily", 90.0, "UTC", DEFAULT_WINDOW_CLASSES)
    assert read_source(doc) == SourceDefaults("https://git.example.org/infra/vms.git", "v2",
                                              "envs/prod")
    assert read_source(project_file(tmp_path, {"source": {"repo": "/srv/git/vms"}})) \
        == SourceDefaults("/srv/git/vms", "HEAD", ".")
    summary = policy.summary()
    assert summary["windows"] == [
        {"schedule": "0 2 * * SAT", "duration": 14400.0, "timezone": "Europe/Berlin",
         "classes": ["replace"]},
        {"schedule": "@daily", "duration": 90.0, "timezone": "UTC",
         "classes": ["move", "replace", "update-restart"]}]
    assert summary["unattended"] == ["create", "update-live", "update-restart"]
    assert (summary["apply"], summary["pruneDisks"], summary["interval"]) == \
        ("manual", True, 5400.0)


def line_of(doc: Document, needle: str) -> int:
    text = Path(doc.source.file).read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(text, 1) if needle in line)


@pytest.mark.parametrize(("entry", "needle", "message", "at"), [
    ({"schedule": "61 2 * * *", "duration": "1h"}, "61 2",
     "minute field: 61 is out of range 0-59", "spec.sync.windows[0].schedule"),
    ({"schedule": "0 2 * *", "duration": "1h"}, "0 2 * *", "has 4 fields",
     "spec.sync.windows[0].schedule"),
    ({"schedule": "@fortnightly", "duration": "1h"}, "@fortnightly", "unknown macro",
     "spec.sync.windows[0].schedule"),
    ({"schedule": "0 2 * * *", "duration": "0s"}, "0s",
     "a window must stay open for more than 0 seconds", "spec.sync.windows[0].duration"),
    ({"schedule": "0 2 * * *", "duration": "1h", "timezone": "Mars/Olympus"}, "Mars",
     "unknown timezone 'Mars/Olympus'", "spec.sync.windows[0].timezone"),
])
def test_a_bad_window_is_a_located_error(tmp_path: Path, entry: dict[str, Any], needle: str,
                                         message: str, at: str) -> None:
    doc = project_file(tmp_path, {"prune": True, "windows": [entry]})
    with pytest.raises(ManifestError) as caught:
        read_policy(doc)
    [problem] = caught.value.problems
    assert problem.location.file == doc.source.file
    assert problem.location.line == line_of(doc, needle), problem
    assert message in problem.message and problem.path == at
    assert problem.hint
    assert str(problem).startswith(f"{doc.source.file}:{line_of(doc, needle)}:")


def test_every_bad_window_is_reported_at_once(tmp_path: Path) -> None:
    doc = project_file(tmp_path, {"windows": [
        {"schedule": "0 2 * * *", "duration": "1h"},
        {"schedule": "0 99 * * *", "duration": "1h"},
        {"schedule": "0 2 * * *", "duration": "1h", "timezone": "Nowhere/Town"}]})
    with pytest.raises(ManifestError) as caught:
        read_policy(doc)
    assert [p.path for p in caught.value.problems] == [
        "spec.sync.windows[1].schedule", "spec.sync.windows[2].timezone"]


@pytest.mark.parametrize("interval", ["0s", "00m"])
def test_an_interval_of_zero_is_a_located_error(tmp_path: Path, interval: str) -> None:
    """The schema's pattern lets "0s" through (its number form says minimum 1); a zero interval
    would make the controller poll, and retry failures, in a busy loop."""
    doc = project_file(tmp_path, {"interval": interval})
    with pytest.raises(ManifestError) as caught:
        read_policy(doc)
    [problem] = caught.value.problems
    assert problem.path == "spec.sync.interval"
    assert problem.location.line == line_of(doc, "interval:")
    assert read_policy(project_file(tmp_path, {"interval": "1s"})).interval == 1.0
    assert read_policy(project_file(tmp_path, {"interval": 30})).interval == 30.0


def manifests(text: str) -> list[Document]:
    return parse_text(text, "m.yaml")


OBJECTS = """\
apiVersion: kvmctl/v1
kind: VirtualMachine
metadata:
  name: db
  sync:
    apply: manual
---
apiVersion: kvmctl/v1
kind: Network
metadata:
  name: lan
  sync:
    selfHeal: true
    unattended: [create, update-restart]
---
apiVersion: kvmctl/v1
kind: Network
metadata:
  name: plain
---
apiVersion: kvmctl/v1
kind: StoragePool
metadata:
  name: empty
  sync: {}
"""


def test_object_overrides_are_read_by_kind_and_name() -> None:
    policy = read_policy(None, manifests(OBJECTS))
    assert dict(policy.objects) == {
        "VirtualMachine/db": ObjectPolicy(apply="manual"),
        "Network/lan": ObjectPolicy(self_heal=True,
                                    unattended=frozenset({C.CREATE, C.UPDATE_RESTART}))}
    assert policy.summary()["objects"] == {
        "Network/lan": {"selfHeal": True, "unattended": ["create", "update-restart"]},
        "VirtualMachine/db": {"apply": "manual"}}


# ---- waiting_reasons ------------------------------------------------------------------------

def test_auto_runs_what_is_unattended_and_skips_no_ops() -> None:
    changes = [change(Kind.NETWORK, "n", C.CREATE), change(Kind.VM, "v", C.UPDATE_LIVE),
               change(Kind.POOL, "p", C.NOOP)]
    assert waits(changes, SyncPolicy()) == {}


def test_manual_waits_everything() -> None:
    changes = [change(Kind.NETWORK, "n", C.CREATE), change(Kind.VM, "v", C.UPDATE_LIVE),
               change(Kind.VM, "old", C.DELETE), change(Kind.POOL, "p", C.NOOP)]
    got = waits(changes, SyncPolicy(apply="manual", prune=True))
    assert set(got) == {"h1:Network/n", "h1:VirtualMachine/v", "h1:VirtualMachine/old"}
    assert all(why.startswith("apply is manual") for why in got.values())


def test_drift_waits_without_self_heal_and_runs_with_it() -> None:
    changes = [change(Kind.VM, "v", C.UPDATE_LIVE), change(Kind.NETWORK, "n", C.CREATE)]
    got = waits(changes, SyncPolicy(), from_git=False)
    assert set(got) == {"h1:VirtualMachine/v", "h1:Network/n"}
    assert got["h1:VirtualMachine/v"] == \
        "drift (git did not change) and selfHeal is off: reported, not reverted"
    assert waits(changes, SyncPolicy(self_heal=True), from_git=False) == {}
    assert waits(changes, SyncPolicy(), from_git=True) == {}


def test_an_object_overrides_self_heal_either_way() -> None:
    changes = [change(Kind.VM, "healed", C.UPDATE_LIVE), change(Kind.VM, "kept", C.UPDATE_LIVE)]
    objects = {"VirtualMachine/healed": ObjectPolicy(self_heal=True),
               "VirtualMachine/kept": ObjectPolicy(self_heal=False)}
    assert set(waits(changes, SyncPolicy(objects=objects), from_git=False)) == \
        {"h1:VirtualMachine/kept"}
    assert set(waits(changes, SyncPolicy(self_heal=True, objects=objects), from_git=False)) == \
        {"h1:VirtualMachine/kept"}


def test_an_object_overrides_apply_either_way() -> None:
    changes = [change(Kind.VM, "db", C.UPDATE_LIVE), change(Kind.VM, "web", C.UPDATE_LIVE)]
    got = waits(changes, SyncPolicy(objects={"VirtualMachine/db": ObjectPolicy(apply="manual")}))
    assert list(got) == ["h1:VirtualMachine/db"] and "manual" in got["h1:VirtualMachine/db"]
    # an object's own "auto" is an exception to a manual project
    got = waits(changes, SyncPolicy(apply="manual",
                                    objects={"VirtualMachine/web": ObjectPolicy(apply="auto")}))
    assert list(got) == ["h1:VirtualMachine/db"]


def test_an_object_overrides_unattended_either_way() -> None:
    changes = [change(Kind.VM, "a", C.UPDATE_RESTART), change(Kind.VM, "b", C.UPDATE_LIVE),
               change(Kind.VM, "c", C.UPDATE_LIVE)]
    objects = {"VirtualMachine/a": ObjectPolicy(unattended=frozenset({C.UPDATE_RESTART})),
               "VirtualMachine/b": ObjectPolicy(unattended=frozenset())}
    got = waits(changes, SyncPolicy(objects=objects))
    assert set(got) == {"h1:VirtualMachine/b"}
    assert got["h1:VirtualMachine/b"].startswith("update-live is not unattended")


def test_object_overrides_read_from_manifests_decide() -> None:
    policy = read_policy(None, manifests(OBJECTS))
    changes = [change(Kind.VM, "db", C.CREATE), change(Kind.NETWORK, "lan", C.UPDATE_RESTART),
               change(Kind.NETWORK, "plain", C.UPDATE_RESTART)]
    got = waits(changes, policy)
    assert set(got) == {"h1:VirtualMachine/db", "h1:Network/plain"}
    drift = waits([change(Kind.NETWORK, "lan", C.UPDATE_RESTART),
                   change(Kind.NETWORK, "plain", C.UPDATE_LIVE)], policy, from_git=False)
    assert set(drift) == {"h1:Network/plain"} and "drift" in drift["h1:Network/plain"]
    # lan's own unattended leaves update-live out: it waits, in git's changes too
    assert set(waits([change(Kind.NETWORK, "lan", C.UPDATE_LIVE)], policy)) == {"h1:Network/lan"}


def test_not_unattended_without_any_window() -> None:
    changes = [change(Kind.VM, "v", C.UPDATE_RESTART), change(Kind.VM, "w", C.REPLACE),
               change(Kind.VM, "m", C.MOVE)]
    got = waits(changes, SyncPolicy())
    assert got == {
        "h1:VirtualMachine/v": "update-restart is not unattended and no maintenance window "
                               "allows it (spec.sync.unattended, spec.sync.windows)",
        "h1:VirtualMachine/w": "replace is not unattended and no maintenance window allows it "
                               "(spec.sync.unattended, spec.sync.windows)",
        "h1:VirtualMachine/m": "move is not unattended and no maintenance window allows it "
                               "(spec.sync.unattended, spec.sync.windows)"}


def test_update_restart_waits_outside_a_window_naming_its_next_opening_in_utc() -> None:
    restart = [change(Kind.VM, "v", C.UPDATE_RESTART)]
    closed = SyncPolicy(windows=(window("30 0 12 * * *"),))  # 12:00:30 UTC, for a minute
    assert waits(restart, closed) == {"h1:VirtualMachine/v": (
        "update-restart waits for a maintenance window; the next opens 2030-01-15 12:00:30 UTC")}
    # a window in another zone: 13:00:45 in Berlin (UTC+1 in January) is 12:00:45 UTC
    berlin = SyncPolicy(windows=(window("45 0 13 * * *", timezone="Europe/Berlin"),
                                 window("0 0 3 * * *")))
    assert waits(restart, berlin)["h1:VirtualMachine/v"].endswith(
        "the next opens 2030-01-15 12:00:45 UTC")
    # the window just closed: the next opening is tomorrow's
    after = SyncPolicy(windows=(window("0 59 11 * * *", duration=60),))
    assert waits(restart, after)["h1:VirtualMachine/v"].endswith(
        "the next opens 2030-01-16 11:59:00 UTC")


def test_update_restart_runs_inside_an_open_window() -> None:
    restart = [change(Kind.VM, "v", C.UPDATE_RESTART)]
    assert waits(restart, SyncPolicy(windows=(window("0 0 12 * * *", duration=1),))) == {}
    assert waits(restart, SyncPolicy(windows=(window("50 59 11 * * *", duration=11),))) == {}
    assert waits(restart, SyncPolicy(windows=(window("0 0 13 * * *", duration=5,
                                                     timezone="Europe/Berlin"),))) == {}
    # the last second is not part of it
    assert waits(restart, SyncPolicy(windows=(window("50 59 11 * * *", duration=10),)))


def test_an_open_window_runs_only_its_classes() -> None:
    changes = [change(Kind.VM, "r", C.UPDATE_RESTART), change(Kind.VM, "x", C.REPLACE)]
    policy = SyncPolicy(windows=(window("0 0 12 * * *", classes=frozenset({C.REPLACE})),
                                 window("0 0 20 * * *", classes=frozenset({C.UPDATE_RESTART}))))
    assert waits(changes, policy) == {"h1:VirtualMachine/r": (
        "update-restart waits for a maintenance window; the next opens 2030-01-15 20:00:00 UTC")}
    only_replace = SyncPolicy(windows=(window("0 0 12 * * *", classes=frozenset({C.REPLACE})),))
    assert waits(changes, only_replace)["h1:VirtualMachine/r"].startswith(
        "update-restart is not unattended and no maintenance window allows it")


def test_a_window_never_overrides_manual_nor_drift() -> None:
    restart = [change(Kind.VM, "v", C.UPDATE_RESTART)]
    open_now = (window("0 0 12 * * *"),)
    assert "manual" in waits(restart, SyncPolicy(apply="manual", windows=open_now))[
        "h1:VirtualMachine/v"]
    assert "drift" in waits(restart, SyncPolicy(windows=open_now), from_git=False)[
        "h1:VirtualMachine/v"]


def test_deletes_run_prune_is_their_consent() -> None:
    changes = [change(Kind.VM, "gone", C.DELETE), change(Kind.NETWORK, "old", C.DELETE)]
    assert waits(changes, SyncPolicy(prune=True, unattended=frozenset())) == {}
    assert waits(changes, SyncPolicy(prune=True, windows=(window("0 0 3 * * *"),))) == {}


def test_blocked_changes_are_neither_runnable_nor_waiting() -> None:
    """A blocked change is the plan's refusal (a Disk without pruneDisks): it is not the
    policy's to hold, and the reconciler never runs it."""
    from kvmctl.plan.types import HostPlan, Plan, ProjectPlan
    from kvmctl.sync.reconcile import _runnable

    blocked = change(Kind.DISK, "data", C.DELETE, blocked="a Disk is deleted with --prune-disks")
    free = change(Kind.NETWORK, "n", C.CREATE)
    got = waits([blocked, free], SyncPolicy(prune=True))
    assert got == {}
    plan = ProjectPlan("p", (HostPlan("h1", "test:///default", Plan("p", "test:///default", (
        replace_steps(blocked), replace_steps(free)))),))
    assert [c.id for c in _runnable(plan, got)] == ["h1:Network/n"]
    assert _runnable(plan, {"h1:Network/n": "waits"}) == []


def replace_steps(c: Change) -> Change:
    """The change with a step, as the planner gives it (a blocked one keeps one here, to show
    that `blocked` alone keeps it from running)."""
    from dataclasses import replace

    from kvmctl.plan import steps as s
    return replace(c, steps=(s.DefineNetwork(c.name, "<network/>"),))


def test_a_change_needing_one_that_waits_waits_too() -> None:
    changes = [change(Kind.VM, "v", C.CREATE, "Network/x", "Disk/d"),
               change(Kind.NETWORK, "x", C.UPDATE_RESTART),
               change(Kind.DISK, "d", C.CREATE)]
    got = waits(changes, SyncPolicy())
    assert got["h1:VirtualMachine/v"] == "needs Network/x, which waits"
    assert "h1:Disk/d" not in got


def test_waiting_spreads_along_a_chain_in_any_order() -> None:
    changes = [change(Kind.VM, "v", C.CREATE, "Disk/d"),
               change(Kind.DISK, "d", C.CREATE, "StoragePool/p"),
               change(Kind.POOL, "p", C.CREATE)]
    policy = SyncPolicy(objects={"StoragePool/p": ObjectPolicy(apply="manual")})
    assert waits(changes, policy) == {"h1:StoragePool/p": "apply is manual: detected and "
                                                          "reported, not made",
                                      "h1:Disk/d": "needs StoragePool/p, which waits",
                                      "h1:VirtualMachine/v": "needs Disk/d, which waits"}


def test_a_dependency_waits_only_on_its_own_host() -> None:
    changes = [change(Kind.NETWORK, "x", C.UPDATE_RESTART, host="h1"),
               change(Kind.NETWORK, "x", C.CREATE, host="h2"),
               change(Kind.VM, "v", C.CREATE, "Network/x", host="h2")]
    assert set(waits(changes, SyncPolicy())) == {"h1:Network/x"}


def test_a_dependency_without_a_change_does_not_hold() -> None:
    changes = [change(Kind.VM, "v", C.CREATE, "Network/x"), change(Kind.NETWORK, "x", C.NOOP)]
    assert waits(changes, SyncPolicy()) == {}


def test_the_window_state_of_the_policy() -> None:
    closed = SyncPolicy(windows=(window("30 0 12 * * *"),)).window_state(NOW)
    assert closed.defined and not closed.open
    assert closed.next_open == dt.datetime(2030, 1, 15, 12, 0, 30, tzinfo=dt.UTC).timestamp()
    opened = SyncPolicy(windows=(window("0 0 12 * * *", 120),)).window_state(NOW)
    assert opened.open and opened.closes_at == NOW.timestamp() + 120
    assert not SyncPolicy().window_state(NOW).defined
