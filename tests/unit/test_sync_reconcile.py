"""One reconcile from git, without a daemon: real git repositories made in tmp_path, the real
GitCache and Reconciler, and libvirt's in-process test driver as the project's host.

Each `test:///node.xml` connection of the test driver is a fresh, empty host (its state lives
in the connection, not in the node file), so testdriver.install() gives every connection of a
test the one DriverHypervisor: the reconciles of a test, and `kvmctl sync` runs of the CLI
in-process, all see the same host, and a test can look at it (and change it by hand, as drift)
through `bed.hv.conn`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_support import CliResult, run_cli
from manifest_docs import disk, doc, pool
from testdriver import DriverHypervisor, install

from kvmctl.source import GitCache, SourceSpec
from kvmctl.sync.reconcile import Outcome, ProjectSource, Reconciler
from kvmctl.sync.status import (
    FieldChange,
    Health,
    ProjectState,
    SyncResult,
    SyncStatus,
)

PROJECT = "gitops"
KERNEL = "/var/cache/kvmctl/test-guest/vmlinuz"
NET = "h1:Network/g-net"
VM = "h1:VirtualMachine/g-vm"


def network(name: str = "g-net", third: int = 1) -> dict[str, Any]:
    return doc("Network", name, {"mode": "nat", "ipv4": {
        "cidr": f"10.252.{third}.0/24",
        "dhcp": {"start": f"10.252.{third}.100", "end": f"10.252.{third}.199"}}})


def vm(name: str = "g-vm", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"cpus": {"count": 1, "max": 2},
                            "memory": {"size": "128MiB", "max": "256MiB"},
                            "boot": {"kernel": KERNEL, "cmdline": "console=ttyS0"},
                            "interfaces": [{"network": "g-net"}], "shutdownTimeout": 1}
    return doc("VirtualMachine", name, {**body, **spec})


def dump(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


class Bed:
    """A git repository of manifests (under `m/`, with its project file there) whose project's
    one host is the test's test-driver host; reconcilers over it share one GitCache."""

    def __init__(self, folder: Path, hv: DriverHypervisor, uri: str) -> None:
        self.folder, self.hv, self.uri = folder, hv, uri
        self.work = folder / "repo"
        self.work.mkdir()
        self.state = folder / "state"
        self.cache = GitCache(str(self.state / "git"))
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        done = subprocess.run(["git", "-c", "user.name=Ada Lovelace",
                               "-c", "user.email=ada@example.org", "-C", str(self.work), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    @property
    def url(self) -> str:
        return self.work.as_uri()

    def project(self, **sync: Any) -> str:
        body: dict[str, Any] = {"apiVersion": "kvmctl/v1", "kind": "Project",
                                "metadata": {"name": PROJECT},
                                "spec": {"hosts": [{"name": "h1", "uri": self.uri,
                                                    "domainType": "qemu"}]}}
        if sync:
            body["spec"]["sync"] = sync
        return yaml.safe_dump(body, sort_keys=False)

    def commit(self, files: dict[str, str | None], message: str) -> str:
        """Write (or, for None, delete) files of the working tree and commit them all."""
        for name, text in files.items():
            path = self.work / name
            if text is None:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")

    def reconciler(self, path: str = "m", ref: str = "main", **kw: Any) -> Reconciler:
        spec = SourceSpec.of(self.url, ref, path)
        return Reconciler(ProjectSource(spec), self.cache, lock_timeout=5, **kw)

    # what the host has
    def networks(self) -> set[str]:
        return {n.name() for n in self.hv.conn.listAllNetworks()}

    def domains(self) -> set[str]:
        return {d.name() for d in self.hv.conn.listAllDomains()}

    def lease(self, domain: str = "g-vm", network: str = "g-net") -> None:
        """A DHCP lease for the VM's NIC: its address, which the test driver never gives."""
        found = re.search(r"<mac address='([^']+)'",
                          self.hv.conn.lookupByName(domain).XMLDesc(0))
        assert found is not None
        self.hv.leases = {network: [{"mac": found.group(1), "ipaddr": "10.252.1.10"}]}

    def cli(self, *argv: Any) -> CliResult:
        return run_cli(["sync", *argv])


@pytest.fixture
def bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bed]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # neither the developer's nor the system's git config
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("KVMCTL_STATE_DIR", raising=False)
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_CONFIG_PARAMETERS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "host").mkdir()
    hv, uri = install(monkeypatch, tmp_path / "host")
    yield Bed(tmp_path, hv, uri)
    hv.conn.close()


def objects(outcome: Outcome) -> dict[str, tuple[SyncStatus, Health]]:
    return {o.id: (o.sync, o.health) for o in outcome.status.objects}


def the_object(outcome: Outcome, oid: str) -> Any:
    return next(o for o in outcome.status.objects if o.id == oid)


def good(bed: Bed, **sync: Any) -> tuple[Reconciler, str]:
    """A network and a VM on it, synced; the reconciler and the commit."""
    sha = bed.commit({"m/kvmctl.yaml": bed.project(**sync), "m/net.yaml": dump(network()),
                      "m/vm.yaml": dump(vm())}, "a network and a VM")
    r = bed.reconciler()
    assert r.reconcile("test").record.result is SyncResult.APPLIED
    bed.lease()
    assert r.reconcile("test").record.result is SyncResult.SYNCED
    return r, sha


# ---- the first syncs and new commits ---------------------------------------------------------

def test_the_first_sync_creates_the_objects_then_reports_them_synced(bed: Bed) -> None:
    sha = bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network()),
                      "m/vm.yaml": dump(vm()), "README.md": "not a manifest: outside m/\n"},
                     "a network and a VM")
    r = bed.reconciler()
    first = r.reconcile("test")
    record = first.record
    assert record.result is SyncResult.APPLIED, record
    assert record.changed == (NET, VM) and record.waiting == () and record.errors == ()
    assert record.commit is not None and record.commit.sha == sha
    assert (record.commit.author, record.commit.email, record.commit.message) == (
        "Ada Lovelace", "ada@example.org", "a network and a VM")
    assert record.project == PROJECT and record.trigger == "test" and record.drift == 0
    assert first.changed and first.status.state is ProjectState.PROGRESSING
    assert first.status.commit == record.commit and first.status.last_sync == record
    assert objects(first) == {NET: (SyncStatus.PROGRESSING, Health.PROGRESSING),
                              VM: (SyncStatus.PROGRESSING, Health.PROGRESSING)}
    assert the_object(first, VM).change_class == "create"
    assert bed.networks() == {"g-net"} and bed.domains() == {"g-vm"}
    assert bed.hv.conn.lookupByName("g-vm").isActive()
    assert r.synced_commit == sha

    second = r.reconcile("poll")
    assert second.record.result is SyncResult.SYNCED, second.record
    assert second.record.summary == "in sync" and not second.changed
    assert second.record.commit == record.commit
    assert objects(second) == {NET: (SyncStatus.SYNCED, Health.HEALTHY),
                               VM: (SyncStatus.SYNCED, Health.PROGRESSING)}
    assert the_object(second, VM).health_reason == "running, no address yet"
    assert second.status.state is ProjectState.PROGRESSING

    bed.lease()
    third = r.reconcile("poll")
    assert third.record.result is SyncResult.SYNCED
    assert objects(third) == {NET: (SyncStatus.SYNCED, Health.HEALTHY),
                              VM: (SyncStatus.SYNCED, Health.HEALTHY)}
    assert third.status.state is ProjectState.HEALTHY and third.status.state_reason == ""
    assert third.status.last_success == third.record.finished
    assert third.status.hosts[0].reachable and third.status.hosts[0].uri == bed.uri


def test_a_new_commit_is_applied(bed: Bed) -> None:
    r, first = good(bed)
    second = bed.commit({"m/vm.yaml": dump(vm(autostart=True)),
                         "m/more.yaml": dump(network("g-two", 2))}, "autostart, a network")
    out = r.reconcile("webhook")
    assert out.record.result is SyncResult.APPLIED, out.record
    assert out.record.commit is not None and out.record.commit.sha == second != first
    assert out.record.changed == ("h1:Network/g-two", VM)
    assert the_object(out, VM).change_class == "update-live"
    assert the_object(out, NET).sync is SyncStatus.SYNCED
    assert bed.hv.conn.lookupByName("g-vm").autostart()
    assert bed.networks() == {"g-net", "g-two"}
    assert r.reconcile("poll").record.result is SyncResult.SYNCED


# ---- commits that do not load: nothing changes, the last good commit stays in force ----------

def host_snapshot(bed: Bed) -> tuple[set[str], set[str], str]:
    return bed.networks(), bed.domains(), bed.hv.conn.lookupByName("g-vm").XMLDesc(0)


def assert_failed_at(out: Outcome, sha: str, good_sha: str) -> None:
    record = out.record
    assert record.result is SyncResult.FAILED, record
    assert record.commit is not None and record.commit.sha == sha
    assert record.errors and record.summary == record.errors[0].splitlines()[0]
    assert out.status.commit is not None and out.status.commit.sha == good_sha
    assert out.status.state is ProjectState.DEGRADED
    assert not out.changed and record.changed == ()


def test_broken_yaml_fails_located_in_the_repository(bed: Bed) -> None:
    r, good_sha = good(bed)
    before = host_snapshot(bed)
    bad = bed.commit({"m/vm.yaml": "apiVersion: kvmctl/v1\nkind: VirtualMachine\n"
                                   "metadata: {name: g-vm\nspec: [\n"}, "broken")
    out = r.reconcile("poll")
    assert_failed_at(out, bad, good_sha)
    [error] = out.record.errors
    assert error.startswith("m/vm.yaml:4:"), error
    assert "invalid YAML" in error
    assert str(bed.state) not in error and "trees/" not in error
    assert out.status.state_reason == f"commit {bad[:12]} is invalid; {good_sha[:12]} stays " \
                                      "in force"
    assert host_snapshot(bed) == before
    assert r.last_good is not None and r.last_good.checkout.commit.sha == good_sha
    # the next round meets the same commit: it fails again, and still changes nothing
    assert_failed_at(r.reconcile("poll"), bad, good_sha)
    assert host_snapshot(bed) == before
    # its status keeps what the last good round saw
    assert objects(out) == {NET: (SyncStatus.SYNCED, Health.HEALTHY),
                            VM: (SyncStatus.SYNCED, Health.HEALTHY)}


def test_a_schema_error_fails_located_in_the_repository(bed: Bed) -> None:
    r, good_sha = good(bed)
    before = host_snapshot(bed)
    text = dump(vm(cpus={"count": "many", "max": 2}), network())
    bad = bed.commit({"m/vm.yaml": text}, "a schema error")
    out = r.reconcile("poll")
    assert_failed_at(out, bad, good_sha)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "many" in t)
    assert any(e.startswith(f"m/vm.yaml:{line}:") and "'many'" in e
               for e in out.record.errors), out.record.errors
    assert all(str(bed.state) not in e for e in out.record.errors)
    assert host_snapshot(bed) == before
    fixed = bed.commit({"m/vm.yaml": dump(vm(autostart=True))}, "fixed")
    again = r.reconcile("poll")
    assert again.record.result is SyncResult.APPLIED and again.record.commit is not None
    assert again.record.commit.sha == fixed and again.status.commit == again.record.commit


def test_a_first_commit_that_does_not_load_is_recorded_under_the_projects_name(bed: Bed
                                                                            ) -> None:
    bad = bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": "kind: [\n"}, "broken")
    r = bed.reconciler()
    out = r.reconcile("start")
    assert out.record.result is SyncResult.FAILED and out.record.project == PROJECT
    assert out.status.name == PROJECT and r.name == PROJECT
    assert out.record.commit is not None and out.record.commit.sha == bad
    assert out.status.commit is None
    assert out.status.state_reason == f"commit {bad[:12]} is invalid; nothing is in force yet"
    # a project file that does not load either: the source names it
    bed.commit({"m/kvmctl.yaml": "kind: Project\n"}, "no project")
    assert bed.reconciler().reconcile("start").record.project == f"{bed.url}@main:m"


def test_a_bad_policy_fails_located_in_the_project_file(bed: Bed) -> None:
    r, good_sha = good(bed)
    text = bed.project(windows=[{"schedule": "0 25 * * *", "duration": "1h"}])
    bad = bed.commit({"m/kvmctl.yaml": text}, "a bad window")
    out = r.reconcile("poll")
    assert_failed_at(out, bad, good_sha)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "0 25" in t)
    [error] = out.record.errors
    assert error.startswith(f"m/kvmctl.yaml:{line}:") and "hour field: 25" in error, error


def test_an_empty_commit_prunes_nothing(bed: Bed) -> None:
    r, good_sha = good(bed, prune=True)
    before = host_snapshot(bed)
    empty = bed.commit({"m/net.yaml": None, "m/vm.yaml": None}, "everything gone")
    out = r.reconcile("poll")
    assert_failed_at(out, empty, good_sha)
    assert out.record.errors == (f"commit {empty[:12]} has no manifests under 'm': nothing is "
                                 "pruned (spec.sync.allowEmpty is false)",)
    assert out.status.state_reason == "empty commit refused"
    assert host_snapshot(bed) == before


def test_a_commit_that_loses_its_project_file_changes_nothing(bed: Bed) -> None:
    """Without kvmctl.yaml the commit would be project 'default': another owner, so the objects
    of the project in force would be left unmanaged, or another project's touched."""
    r, good_sha = good(bed, prune=True)
    before = host_snapshot(bed)
    lost = bed.commit({"m/kvmctl.yaml": None}, "no project file")
    out = r.reconcile("poll")
    assert_failed_at(out, lost, good_sha)
    assert "the commit's project is 'default', the one this source syncs is" \
        in out.record.errors[0]
    assert host_snapshot(bed) == before


def test_an_empty_commit_prunes_everything_with_allow_empty(bed: Bed) -> None:
    r, _ = good(bed, prune=True, allowEmpty=True)
    empty = bed.commit({"m/net.yaml": None, "m/vm.yaml": None}, "everything gone")
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.APPLIED, out.record
    assert out.record.commit is not None and out.record.commit.sha == empty
    assert set(out.record.changed) == {NET, VM}
    assert {o.change_class for o in out.status.objects} == {"delete"}
    assert bed.networks() == set() and bed.domains() == set()


def test_a_local_project_file_stands_in_for_a_missing_one(bed: Bed) -> None:
    """Without m/kvmctl.yaml at the commit, this machine's project file is the project's; a
    directory left with no YAML at all is an empty set of manifests, as allowEmpty decides."""
    local = bed.folder / "local.yaml"
    local.write_text(bed.project(prune=True), encoding="utf-8")
    bed.commit({"m/net.yaml": dump(network())}, "a network, no project file")
    spec = SourceSpec.of(bed.url, "main", "m")
    r = Reconciler(ProjectSource(spec, str(local)), bed.cache, lock_timeout=5)
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.APPLIED and out.record.project == PROJECT
    emptied = bed.commit({"m/net.yaml": None, "m/README": "nothing here\n"}, "no YAML left")
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.FAILED
    assert out.record.errors == (f"commit {emptied[:12]} has no manifests under 'm': nothing "
                                 "is pruned (spec.sync.allowEmpty is false)",)
    assert bed.networks() == {"g-net"}
    local.write_text(bed.project(prune=True, allowEmpty=True), encoding="utf-8")
    r = Reconciler(ProjectSource(spec, str(local)), bed.cache, lock_timeout=5)
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.APPLIED, out.record
    assert out.record.changed == (NET,) and bed.networks() == set()


def test_a_file_that_left_git_is_pruned_only_with_prune(bed: Bed) -> None:
    r, _ = good(bed)
    bed.commit({"m/extra.yaml": dump(network("g-two", 2))}, "one more")
    assert r.reconcile("poll").record.result is SyncResult.APPLIED
    bed.commit({"m/extra.yaml": None}, "one less, prune off")
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.SYNCED, out.record
    assert bed.networks() == {"g-net", "g-two"}
    bed.commit({"m/kvmctl.yaml": bed.project(prune=True)}, "prune on")
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.APPLIED and out.record.changed == ("h1:Network/g-two",)
    assert bed.networks() == {"g-net"}


def test_a_path_missing_at_a_commit_fails_and_prunes_nothing(bed: Bed) -> None:
    r, good_sha = good(bed, prune=True, allowEmpty=True)
    before = host_snapshot(bed)
    gone = bed.commit({"m": None, "elsewhere/net.yaml": dump(network())}, "moved away")
    out = r.reconcile("poll")
    assert_failed_at(out, gone, good_sha)
    [error] = out.record.errors
    assert f"path 'm' does not exist at commit {gone}" in error
    assert "git unreachable" not in out.record.summary
    assert host_snapshot(bed) == before


def test_a_path_missing_at_the_first_commit_fails(bed: Bed) -> None:
    sha = bed.commit({"elsewhere/net.yaml": dump(network())}, "not under m")
    out = bed.reconciler().reconcile("start")
    assert out.record.result is SyncResult.FAILED
    assert out.record.commit is not None and out.record.commit.sha == sha
    assert out.status.commit is None and out.status.state is ProjectState.DEGRADED
    assert bed.networks() == set()


def test_an_unknown_ref_fails_before_anything_is_in_force(bed: Bed) -> None:
    bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network())}, "one")
    out = bed.reconciler(ref="no-such-branch").reconcile("start")
    assert out.record.result is SyncResult.FAILED and out.record.commit is None
    assert "ref 'no-such-branch' not found" in out.record.errors[0]
    assert out.status.state_reason.startswith("git: ")
    assert bed.networks() == set()


# ---- what the policy lets a round make --------------------------------------------------------

def test_manual_reports_out_of_sync_and_makes_nothing(bed: Bed) -> None:
    sha = bed.commit({"m/kvmctl.yaml": bed.project(apply="manual"),
                      "m/net.yaml": dump(network()), "m/vm.yaml": dump(vm())}, "manual")
    r = bed.reconciler()
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.OUT_OF_SYNC, out.record
    assert out.record.waiting == (NET, VM) and out.record.changed == ()
    assert out.record.summary == "2 waiting"
    assert bed.networks() == set() and bed.domains() == set()
    assert objects(out) == {NET: (SyncStatus.OUT_OF_SYNC, Health.MISSING),
                            VM: (SyncStatus.OUT_OF_SYNC, Health.MISSING)}
    net = the_object(out, NET)
    assert net.health_reason == "not defined on its host"
    assert net.waiting == "apply is manual: detected and reported, not made"
    assert FieldChange("dhcp.range", "(none)", "10.252.1.100-10.252.1.199") in net.fields
    assert out.status.state is ProjectState.DEGRADED  # declared, missing
    assert out.status.commit is not None and out.status.commit.sha == sha
    assert r.synced_commit is None  # never fully synced: the changes stay git's


def test_manual_shows_the_field_diffs_of_a_change(bed: Bed) -> None:
    r, _ = good(bed)
    bed.commit({"m/kvmctl.yaml": bed.project(apply="manual"),
                "m/vm.yaml": dump(vm(memory={"size": "192MiB", "max": "256MiB"}))}, "more memory")
    before = host_snapshot(bed)
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.OUT_OF_SYNC and out.record.waiting == (VM,)
    o = the_object(out, VM)
    assert (o.sync, o.health, o.change_class) == (SyncStatus.OUT_OF_SYNC, Health.HEALTHY,
                                                  "update-live")
    assert FieldChange("memory", "128MiB", "192MiB") in o.fields
    assert o.waiting.startswith("apply is manual")
    assert the_object(out, NET).sync is SyncStatus.SYNCED
    assert host_snapshot(bed) == before


def test_a_dry_run_changes_nothing(bed: Bed) -> None:
    bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network()),
                "m/vm.yaml": dump(vm())}, "auto")
    r = bed.reconciler()
    out = r.reconcile("cli", dry_run=True)
    assert out.record.result is SyncResult.OUT_OF_SYNC, out.record
    assert out.record.changed == () and out.record.waiting == (NET, VM)
    assert bed.networks() == set() and bed.domains() == set()
    assert {o.sync for o in out.status.objects} == {SyncStatus.OUT_OF_SYNC}
    assert {o.waiting for o in out.status.objects} == {"dry run: would be made"}
    assert r.synced_commit is None
    assert r.reconcile("cli").record.result is SyncResult.APPLIED  # still git's changes
    assert r.reconcile("cli", dry_run=True).record.result is SyncResult.SYNCED


def test_suspend_in_the_policy(bed: Bed) -> None:
    sha = bed.commit({"m/kvmctl.yaml": bed.project(suspend=True),
                      "m/net.yaml": dump(network())}, "suspended")
    r = bed.reconciler()
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.SUSPENDED, out.record
    assert r.last_status is out.status  # what the controller shows
    assert out.record.commit is not None and out.record.commit.sha == sha
    assert out.record.summary == "suspended (spec.sync.suspend): nothing reconciled"
    assert out.status.state is ProjectState.SUSPENDED and out.status.suspended
    assert bed.networks() == set()


def test_suspended_through_the_api(bed: Bed) -> None:
    r, _ = good(bed)
    bed.commit({"m/more.yaml": dump(network("g-two", 2))}, "one more")
    r.suspended = True
    out = r.reconcile("manual")
    assert out.record.result is SyncResult.SUSPENDED
    assert out.record.summary == "suspended (suspended through the API): nothing reconciled"
    assert out.status.suspended and out.status.state is ProjectState.SUSPENDED
    assert r.last_status is out.status
    assert set(objects(out)) == {NET, VM}  # what the last round saw
    assert bed.networks() == {"g-net"}
    r.suspended = False
    assert r.reconcile("manual").record.result is SyncResult.APPLIED
    assert bed.networks() == {"g-net", "g-two"}


def test_an_update_restart_waits_for_its_window(bed: Bed) -> None:
    """`now` is the reconcile's clock: the windows are six-field cron expressions around it."""
    at = 1_900_000_000.0  # 2030-03-17 17:46:40 UTC
    closed = [{"schedule": "0 0 3 * * *", "duration": 60}]  # 03:00:00 UTC
    r, _ = good(bed, windows=closed)
    bed.commit({"m/vm.yaml": dump(vm(cpus={"count": 1, "max": 4}))}, "more vCPUs, at a restart")
    out = r.reconcile("poll", now=lambda: at)
    assert out.record.result is SyncResult.OUT_OF_SYNC, out.record
    o = the_object(out, VM)
    assert o.change_class == "update-restart"
    assert o.waiting == "update-restart waits for a maintenance window; the next opens " \
                        "2030-03-18 03:00:00 UTC"
    assert FieldChange("vcpus.max", "2", "4") in o.fields
    assert bed.hv.conn.lookupByName("g-vm").maxVcpus() == 2
    bed.commit({"m/kvmctl.yaml": bed.project(
        windows=[{"schedule": "30 46 17 * * *", "duration": 15}])}, "a window now")
    out = r.reconcile("poll", now=lambda: at)
    assert out.record.result is SyncResult.APPLIED, out.record
    assert out.record.changed == (VM,)


def test_a_round_with_changes_waits_for_the_project_lock_and_an_idle_one_takes_none(
        bed: Bed) -> None:
    from kvmctl.apply.lock import project_lock

    r, good_sha = good(bed)
    with project_lock(bed.uri, PROJECT, 1):  # an apply of the project in progress
        idle = r.reconcile("poll")
        assert idle.record.result is SyncResult.SYNCED, idle.record
        bed.commit({"m/more.yaml": dump(network("g-two", 2))}, "one more")
        r.lock_timeout = 0.2
        held = r.reconcile("poll")
        assert held.record.result is SyncResult.FAILED, held.record
        assert "another apply of this project holds the lock" in held.record.errors[0]
        assert bed.networks() == {"g-net"}
        assert held.status.commit is not None and held.status.commit.sha == good_sha
    assert r.reconcile("poll").record.result is SyncResult.APPLIED
    assert bed.networks() == {"g-net", "g-two"}


# ---- drift -------------------------------------------------------------------------------------

def stop_network_by_hand(bed: Bed) -> None:
    bed.hv.conn.networkLookupByName("g-net").destroy()


def test_drift_is_reported_without_self_heal(bed: Bed) -> None:
    r, sha = good(bed)
    stop_network_by_hand(bed)
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.OUT_OF_SYNC, out.record
    assert out.record.drift == 1 and out.record.waiting == (NET,)
    net = the_object(out, NET)
    assert (net.sync, net.health, net.health_reason) == (
        SyncStatus.OUT_OF_SYNC, Health.DEGRADED, "defined, not active")
    assert net.waiting.startswith("drift (git did not change) and selfHeal is off")
    assert not bed.hv.conn.networkLookupByName("g-net").isActive()
    assert out.status.state is ProjectState.DEGRADED and r.synced_commit == sha


def test_drift_is_reverted_with_self_heal(bed: Bed) -> None:
    r, _ = good(bed, selfHeal=True)
    stop_network_by_hand(bed)
    bed.hv.conn.lookupByName("g-vm").destroy()
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.APPLIED, out.record
    assert out.record.drift == 2 and out.record.changed == (NET, VM)
    assert bed.hv.conn.networkLookupByName("g-net").isActive()
    assert bed.hv.conn.lookupByName("g-vm").isActive()


def test_a_missing_object_is_reported_missing(bed: Bed) -> None:
    r, _ = good(bed)
    dom = bed.hv.conn.lookupByName("g-vm")
    dom.destroy()
    dom.undefine()
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.OUT_OF_SYNC
    o = the_object(out, VM)
    assert (o.sync, o.health, o.health_reason, o.change_class) == (
        SyncStatus.OUT_OF_SYNC, Health.MISSING, "not defined on its host", "create")
    assert out.status.state_reason == "1 object(s) degraded or missing"


def test_the_health_of_pools_and_disks(bed: Bed) -> None:
    sha = bed.commit({"m/kvmctl.yaml": bed.project(),
                      "m/disk.yaml": dump(pool("g-pool", bed.folder / "pool"),
                                          disk("g-data", "g-pool", "16MiB"))}, "storage")
    r = bed.reconciler()
    assert r.reconcile("poll").record.result is SyncResult.APPLIED
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.SYNCED, out.record
    assert objects(out) == {"h1:StoragePool/g-pool": (SyncStatus.SYNCED, Health.HEALTHY),
                            "h1:Disk/g-data": (SyncStatus.SYNCED, Health.HEALTHY)}
    storage = bed.hv.conn.storagePoolLookupByName("g-pool")
    storage.storageVolLookupByName("g-data.qcow2").delete()
    out = r.reconcile("poll")
    o = the_object(out, "h1:Disk/g-data")
    assert (o.sync, o.health, o.health_reason) == (
        SyncStatus.OUT_OF_SYNC, Health.MISSING, "no volume g-data.qcow2 in pool g-pool")
    storage.destroy()
    out = r.reconcile("poll")
    o = the_object(out, "h1:StoragePool/g-pool")
    assert (o.health, o.health_reason) == (Health.DEGRADED, "defined, not active")
    assert out.record.commit is not None and out.record.commit.sha == sha


def test_a_restart_knows_what_was_synced_from_the_state_directory(bed: Bed) -> None:
    """A new reconciler (a restarted controller, the next `kvmctl sync`) knows what each object
    was last synced as from the state directory: drift stays drift. Without the state
    directory, the first round takes what it finds as git's, as a first sync does."""
    state = str(bed.state)
    sha = bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network()),
                      "m/vm.yaml": dump(vm())}, "a network and a VM")
    assert bed.reconciler(state_dir=state).reconcile("test").record.commit.sha == sha
    bed.lease()
    bed.hv.conn.lookupByName("g-vm").destroy()
    out = bed.reconciler(state_dir=state).reconcile("start")
    assert out.record.result is SyncResult.OUT_OF_SYNC and out.record.drift == 1
    assert not bed.hv.conn.lookupByName("g-vm").isActive()
    out = bed.reconciler().reconcile("start")  # no state directory: git's
    assert out.record.result is SyncResult.APPLIED and out.record.changed == (VM,)
    assert bed.hv.conn.lookupByName("g-vm").isActive()


def test_drift_stays_drift_while_another_change_waits_for_its_window(bed: Bed) -> None:
    """Per object: a change of one object waiting for a window does not make a hand-made
    drift of another object "git's" (it used to be reverted with selfHeal off)."""
    at = 1_900_000_000.0  # 2030-03-17 17:46:40 UTC
    r, _ = good(bed, windows=[{"schedule": "0 0 3 * * *", "duration": 60}])
    bed.commit({"m/vm.yaml": dump(vm(cpus={"count": 1, "max": 4}))}, "more vCPUs, at a restart")
    first = r.reconcile("poll", now=lambda: at)
    assert the_object(first, VM).waiting.startswith("update-restart waits for a maintenance")
    stop_network_by_hand(bed)
    out = r.reconcile("poll", now=lambda: at)
    net = the_object(out, "h1:Network/g-net")
    assert net.sync is SyncStatus.OUT_OF_SYNC and "selfHeal is off" in net.waiting
    assert not bed.hv.conn.networkLookupByName("g-net").isActive()


def test_a_prune_waits_while_a_change_of_its_host_waits(bed: Bed) -> None:
    """A VM kept manual while a commit moves it to a new network and drops the old one: the old
    network is not deleted under the VM that still uses it."""
    r, _ = good(bed, prune=True)
    moved = vm(interfaces=[{"network": "g-two"}])
    moved["metadata"]["sync"] = {"apply": "manual"}
    bed.commit({"m/net.yaml": dump(network("g-two", third=2)), "m/vm.yaml": dump(moved)},
               "the VM to g-two, g-net gone")
    out = r.reconcile("poll")
    assert "g-net" in bed.networks() and "g-two" in bed.networks()
    assert "once the other changes of its host are made" in the_object(
        out, "h1:Network/g-net").waiting


# ---- git unreachable ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["moved", "deleted"])
def test_git_unreachable_keeps_the_last_good_commit(bed: Bed, how: str) -> None:
    r, sha = good(bed)
    if how == "moved":
        bed.work.rename(bed.folder / "elsewhere")
    else:
        shutil.rmtree(bed.work)
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.SYNCED, out.record
    assert out.record.commit is not None and out.record.commit.sha == sha
    assert out.record.errors == ()
    assert f"git unreachable, keeping commit {sha[:12]}" in out.record.summary
    assert out.status.commit is not None and out.status.commit.sha == sha
    assert objects(out) == {NET: (SyncStatus.SYNCED, Health.HEALTHY),
                            VM: (SyncStatus.SYNCED, Health.HEALTHY)}
    # drift is still seen while git is away
    stop_network_by_hand(bed)
    out = r.reconcile("poll")
    assert out.record.result is SyncResult.OUT_OF_SYNC and out.record.drift == 1
    assert "git unreachable" in out.record.summary


def test_git_unreachable_before_any_good_commit_fails(bed: Bed) -> None:
    r = bed.reconciler()
    out = r.reconcile("start")
    assert out.record.result is SyncResult.FAILED and out.record.commit is None
    assert out.status.state is ProjectState.DEGRADED and out.status.commit is None
    assert out.status.state_reason.startswith("git: ")


def test_the_gitcache_is_not_asked_again_for_a_commit_in_force(bed: Bed,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    r, _ = good(bed)
    checkouts: list[str | None] = []
    real = GitCache.checkout

    def counted(self: GitCache, spec: SourceSpec, sha: str | None = None) -> Any:
        checkouts.append(sha)
        return real(self, spec, sha)

    monkeypatch.setattr(GitCache, "checkout", counted)
    for _ in range(3):
        assert r.reconcile("poll").record.result is SyncResult.SYNCED
    assert checkouts == []


# ---- the CLI: kvmctl sync ----------------------------------------------------------------------

def sync_cli(bed: Bed, *extra: Any) -> CliResult:
    return bed.cli("--repo", bed.url, "--path", "m", "--state-dir", bed.state, *extra)


def no_traceback(result: CliResult) -> None:
    assert "Traceback" not in result.output and "internal error" not in result.output, result
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")], result
    assert len([line for line in result.stderr.splitlines()
                if line.startswith("error:")]) == 1, result


def test_cli_sync_applies_then_is_synced(bed: Bed) -> None:
    sha = bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network())}, "one")
    first = sync_cli(bed)
    assert first.code == 0, first
    assert f"at {sha[:12]} ('one', Ada Lovelace): applied" in first.stdout, first
    assert f"made: {NET}" in first.stdout and first.stderr == ""
    assert bed.networks() == {"g-net"}
    second = sync_cli(bed, "--detailed-exitcode")
    assert second.code == 0 and ": synced" in second.stdout, second
    assert os.path.isfile(bed.state / "history.db")


def test_cli_sync_json(bed: Bed) -> None:
    sha = bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network())}, "one")
    result = sync_cli(bed, "-o", "json")
    assert result.code == 0, result
    [entry] = result.json()
    assert set(entry) == {"sync", "status"}
    assert entry["sync"]["result"] == "applied" and entry["sync"]["changed"] == [NET]
    assert entry["sync"]["commit"]["sha"] == sha and entry["sync"]["project"] == PROJECT
    assert entry["sync"]["id"] is not None  # recorded in the history
    status = entry["status"]
    assert status["name"] == PROJECT and status["commit"]["sha"] == sha
    assert status["source"] == f"{bed.url}@HEAD:m"
    assert [o["id"] for o in status["objects"]] == [NET]
    assert status["policy"]["apply"] == "auto"
    json.dumps(entry)  # nothing but JSON


def test_cli_sync_dry_run_changes_nothing_and_records_nothing(bed: Bed) -> None:
    bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network())}, "one")
    result = sync_cli(bed, "--dry-run", "-o", "json")
    assert result.code == 0, result
    assert result.json()[0]["sync"]["result"] == "out-of-sync"
    assert result.json()[0]["sync"]["id"] is None
    assert bed.networks() == set()
    assert sync_cli(bed, "--dry-run", "--detailed-exitcode").code == 2


def test_cli_sync_exits_2_with_detailed_exitcode_when_changes_wait(bed: Bed) -> None:
    bed.commit({"m/kvmctl.yaml": bed.project(apply="manual"), "m/net.yaml": dump(network())},
               "manual")
    plain = sync_cli(bed)
    assert plain.code == 0, plain
    assert ": out-of-sync" in plain.stdout
    assert f"waiting: {NET}: apply is manual" in plain.stdout
    assert "dhcp.range: (none) -> 10.252.1.100-10.252.1.199" in plain.stdout
    detailed = sync_cli(bed, "--detailed-exitcode")
    assert detailed.code == 2, detailed
    assert bed.networks() == set()


def test_cli_sync_fails_with_the_errors_and_the_commit(bed: Bed) -> None:
    good_sha = bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network())},
                          "one")
    assert sync_cli(bed).code == 0
    bad = bed.commit({"m/net.yaml": "kind: Network\nmetadata: [\n"}, "broken")
    for extra in ((), ("--detailed-exitcode",)):
        result = sync_cli(bed, *extra)
        assert result.code == 1, result
        no_traceback(result)
        # named as the project (the history keeps its failures with its successes); one run
        # of the command knows no commit in force, so it names none
        assert f"error: the sync of {PROJECT} failed at commit {bad}; nothing was changed" \
            in result.stderr, result
        assert "  m/net.yaml:3:" in result.stderr, result
        assert f"Project {PROJECT} from {bed.url}@HEAD:m at {bad[:12]} ('broken', " \
               "Ada Lovelace): failed" in result.stdout, result
    assert bed.networks() == {"g-net"}
    assert good_sha != bad


@pytest.mark.parametrize(("args", "message"), [
    (("--repo", "/nonexistent/repository"), "is neither a URL"),
    (("--repo", "ftp://example.org/r.git"), "scheme 'ftp' is not supported"),
    (("--ref", "my branch"), "space, control characters"),
    (("--ref", "no-such-branch"), "ref 'no-such-branch' not found"),
    (("--ref", "-x"), "must not begin with '-'"),
    (("--path", "not/here"), "path 'not/here' does not exist at commit"),
    (("--path", "../up"), "must not leave the repository"),
])
def test_cli_sync_refuses_bad_input_in_one_line(bed: Bed, args: tuple[str, ...],
                                                message: str) -> None:
    bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network())}, "one")
    defaults = {"--repo": bed.url, "--path": "m"}
    given = dict(zip(args[::2], args[1::2], strict=True))
    argv: list[Any] = []
    for flag, value in {**defaults, **given}.items():
        argv += [flag + "=" + value] if value.startswith("-") else [flag, value]
    for extra in ((), ("--detailed-exitcode",)):
        result = bed.cli(*argv, "--state-dir", bed.state, *extra)
        assert result.code in (1, 2), result
        if extra:
            assert result.code == 1, result  # 2 would read as "changes wait"
        no_traceback(result)
        assert message in result.stderr, result
    assert bed.networks() == set()


def test_cli_sync_without_anything_to_sync(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(bed.folder)
    result = bed.cli("--state-dir", bed.state)
    assert result.code in (1, 2), result
    no_traceback(result)
    assert "nothing to sync" in result.stderr


def test_rounds_at_one_commit_validate_again_only_when_the_host_changes(
        bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller keeps each host's model between rounds while the host's facts (names,
    subnets, MACs) stay the same: an idle round costs the read, not a validation."""
    from kvmctl.manifest import validate as validate_module
    r, _ = good(bed)
    calls: list[int] = []
    real = validate_module.validate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(validate_module, "validate", counting)
    assert r.reconcile("poll").record.result is SyncResult.SYNCED
    assert r.reconcile("poll").record.result is SyncResult.SYNCED
    assert calls == []
    bed.hv.conn.networkDefineXML(  # a network made by hand: the host's facts change
        "<network><name>other</name><ip address='10.251.9.1' prefix='24'/></network>")
    assert r.reconcile("poll").record.result is SyncResult.SYNCED
    assert calls == [1]


def test_rounds_at_one_commit_plan_again_only_when_the_host_changes(
        bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same model, same request, same live state (every definition compared in full): the
    same plan, kept from the round before; any drift is a different live state."""
    import kvmctl.engine as engine
    r, _ = good(bed)
    calls: list[int] = []
    real = engine.make_plan

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "make_plan", counting)
    assert r.reconcile("poll").record.result is SyncResult.SYNCED
    assert calls == []
    stop_network_by_hand(bed)
    out = r.reconcile("poll")
    assert calls == [1]
    assert the_object(out, "h1:Network/g-net").sync is SyncStatus.OUT_OF_SYNC


def test_a_project_another_source_syncs_is_refused(bed: Bed) -> None:
    bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network())}, "a network")
    out = bed.reconciler(claim=lambda name, _r: False).reconcile("start")
    assert out.record.result is SyncResult.FAILED
    assert "already synced from another source" in out.record.errors[0]
    assert bed.networks() == set()


def test_a_suspend_and_the_project_binding_outlive_a_restart(bed: Bed) -> None:
    state = str(bed.state)
    bed.commit({"m/kvmctl.yaml": bed.project(), "m/net.yaml": dump(network())}, "a network")
    first = bed.reconciler(state_dir=state)
    assert first.reconcile("start").record.result is SyncResult.APPLIED
    first.suspended = True
    again = bed.reconciler(state_dir=state)
    assert again.suspended
    assert again.reconcile("start").record.result is SyncResult.SUSPENDED
    again.suspended = False
    lost = bed.commit({"m/kvmctl.yaml": None}, "no project file")
    out = bed.reconciler(state_dir=state).reconcile("start")  # a restart: nothing in memory
    assert out.record.result is SyncResult.FAILED and out.record.commit.sha == lost
    assert "the one this source syncs is 'gitops'" in out.record.errors[0]
    mode = os.stat(next((bed.state / "sources").iterdir())).st_mode & 0o777
    assert mode == 0o600


# ---- snapshot policies -------------------------------------------------------------------------

def test_a_round_runs_the_snapshot_policies_after_it_and_only_when_one_is_due(
        bed: Bed, tmp_path: Path) -> None:
    pool_dir = tmp_path / "pool"
    policy = {"every": "1h", "keep": 2, "whenStopped": True}
    bed.commit({"m/kvmctl.yaml": bed.project(),
                "m/vm.yaml": dump(pool("g-pool", pool_dir), disk("g-d", "g-pool"),
                                  vm(interfaces=[], disks=[{"disk": "g-d"}], state="stopped",
                                     snapshots=policy))}, "a VM with a snapshot policy")
    r = bed.reconciler()
    assert r.reconcile("test").record.result is SyncResult.APPLIED
    [run] = r.snapshot_runs
    assert run.vm == "g-vm" and run.took and run.removed == () and run.error is None, run
    dom = bed.hv.conn.lookupByName("g-vm")
    assert [s.getName() for s in dom.listAllSnapshots(0)] == [run.took]
    # Not due yet; due once the round's clock is an hour on, twice: keep: 2 holds.
    assert r.reconcile("poll").record.result is SyncResult.SYNCED
    assert r.snapshot_runs == [] and dom.snapshotNum(0) == 1
    first = run.took
    names = []
    for hours in (1, 2):
        later = time.time() + hours * 3600 + 60
        r.reconcile("poll", now=lambda later=later: later)
        [run] = r.snapshot_runs
        assert run.took, run
        names.append(run.took)
    assert run.removed == (first,), run
    assert {s.getName() for s in dom.listAllSnapshots(0)} == set(names)
    # A dry run takes none, whatever is due.
    r.reconcile("poll", dry_run=True, now=lambda: time.time() + 4 * 3600)
    assert r.snapshot_runs == []
    assert dom.snapshotNum(0) == 2
