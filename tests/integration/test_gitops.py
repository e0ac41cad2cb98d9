"""GitOps end to end: a real git server, the real controller process, real libvirt, one booted
guest, and the page in a real browser.

A bare repository is served by `git daemon` on 127.0.0.1 (git://) and read over file:// by
`kvmctl sync`. The tests run in order over one module-wide lab (one guest boots once, and must
not boot again unless a test says so):

1. a commit of a network and a running VM: the controller creates them; Synced and Healthy;
2. a committed memory change lands live, without a reboot;
3. drift by hand (autostart turned off with virsh) is reported OutOfSync and left alone without
   selfHeal; a commit turning selfHeal on reverts it, and a new drift is reverted within one
   interval;
4. a commit with a broken manifest fails with located errors and its sha, changes nothing, and
   the last good commit stays in force; the fix syncs;
5. an update-restart change waits outside its maintenance window and is applied when the window
   (computed to open seconds later) opens;
6. git down: degraded, nothing changes; git back: healthy;
7. the empty-commit guard holds: a commit without manifests prunes nothing;
8. SIGTERM in the middle of an apply: the change in progress finishes, the process exits 0, a
   new controller converges; a webhook push applies at once (interval 600 s);
9. SIGKILL in the middle of an apply: the next start converges, no lock left behind;
10. `kvmctl sync` over file:// from cron: exit codes, located errors.

Screenshots of the page after a commit, after drift and after a failed sync are saved under the
lab's scratch directory (and kept in $KVMCTL_SCREENSHOT_DIR when it is set).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from browser import chromium, screenshot  # noqa: E402
from conftest import PREFIX_STEM, SCRATCH_ROOT, Cleanup  # noqa: E402
from engine_support import virsh, wait_until  # noqa: E402
from guestlog import SerialLog  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PYTHON = sys.executable
INTERVAL = 2  # seconds: the controller's poll and drift interval in these tests
BOOT_TIMEOUT = 300
BOOT = r"^KVMCTL-BOOT ok$"
GIT_ENV = {"GIT_AUTHOR_NAME": "Ada Tester", "GIT_AUTHOR_EMAIL": "ada@example.test",
           "GIT_COMMITTER_NAME": "Ada Tester", "GIT_COMMITTER_EMAIL": "ada@example.test"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    for leak in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(leak, None)
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()


class GitServer:
    """`git daemon` serving one bare repository on 127.0.0.1, stoppable and restartable."""

    def __init__(self, base: Path, port: int) -> None:
        self.base, self.port = base, port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"git://127.0.0.1:{self.port}/repo.git"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={self.base}",
             "--listen=127.0.0.1", f"--port={self.port}", str(self.base)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        wait_until(answers, 15, "git daemon to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Controller:
    """One `kvmctl controller` process of the lab's, with its API."""

    def __init__(self, lab: Lab, interval: float) -> None:
        self.lab = lab
        self.port = _free_port()
        self.log_path = lab.scratch / f"controller-{self.port}.log"
        argv = [PYTHON, "-m", "kvmctl", "controller", "--repo", lab.git.url, "--ref", "main",
                "--path", "m", "--state-dir", str(lab.state), "--interval", str(interval),
                "--listen", f"127.0.0.1:{self.port}", "--token-file", str(lab.token_file),
                "--webhook-secret-file", str(lab.webhook_file),
                "--log-format", "json", "--lock-timeout", "60"]
        env = {**os.environ, "KVMCTL_DOMAIN_TYPE": "qemu"}
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log_file,
                                     env=env, cwd=lab.scratch)
        wait_until(self._answers, 30, f"the controller's API (log: {self.log_path})")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the controller exited {self.proc.returncode}:\n{self.log()}")
        try:
            self.get("/healthz")
            return True
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()

    def project(self) -> dict[str, Any]:
        """The lab project's status ({} until its first round has read its project file)."""
        try:
            return dict(self.get(f"/api/v1/projects/{self.lab.project}"))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return {}
            raise

    def post(self, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()
        return self.proc.returncode


class Lab:
    def __init__(self, conn: Any, prefix: str, scratch: Path, subnet: Any, guest: Any) -> None:
        self.conn, self.prefix, self.scratch, self.subnet, self.guest = (
            conn, prefix, scratch, subnet, guest)
        self.project = prefix + "gitops"
        self.state = scratch / "state"
        self.bare = scratch / "git" / "repo.git"
        self.work = scratch / "work"
        self.token = secrets.token_hex(16)
        self.token_file = scratch / "token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        self.webhook_secret = secrets.token_hex(16)  # never the token: forges show theirs
        self.webhook_file = scratch / "webhook-secret"
        self.webhook_file.write_text(self.webhook_secret + "\n")
        self.webhook_file.chmod(0o600)
        self.git = GitServer(self.bare.parent, _free_port())
        self.console = scratch / "vm.log"
        self.controller: Controller | None = None
        self.shots = Path(os.environ.get("KVMCTL_SCREENSHOT_DIR") or scratch / "screenshots")
        self.policy: dict[str, Any] = {"prune": True}
        self.vm_spec: dict[str, Any] = {}

    @property
    def vm(self) -> str:
        return self.prefix + "vm"

    @property
    def net(self) -> str:
        return self.prefix + "net"

    def project_file(self) -> dict[str, Any]:
        return {"apiVersion": "kvmctl/v1", "kind": "Project",
                "metadata": {"name": self.project},
                "spec": {"hosts": [{"name": "local", "uri": "qemu:///system",
                                    "domainType": "qemu"}],
                         "sync": self.policy}}

    def manifests(self) -> list[dict[str, Any]]:
        hosts = list(self.subnet.hosts())
        net = {"apiVersion": "kvmctl/v1", "kind": "Network", "metadata": {"name": self.net},
               "spec": {"mode": "nat", "ipv4": {"cidr": str(self.subnet), "dhcp": {
                   "start": str(hosts[99]), "end": str(hosts[198])}}}}
        spec = {"memory": {"size": "128MiB", "max": "256MiB"},
                "boot": {"kernel": str(self.guest.kernel), "initrd": str(self.guest.initrd),
                         "cmdline": "console=ttyS0"},
                "console": {"log": str(self.console)},
                "interfaces": [{"network": self.net}],
                "state": "running", "autostart": True, "shutdownTimeout": 20}
        spec.update(self.vm_spec)
        vm = {"apiVersion": "kvmctl/v1", "kind": "VirtualMachine",
              "metadata": {"name": self.vm}, "spec": spec}
        return [net, vm]

    def commit(self, message: str, *, files: dict[str, str] | None = None) -> str:
        """Write the project file and manifests (or `files`), commit, push; the new sha."""
        m = self.work / "m"
        if m.exists():
            shutil.rmtree(m)
        m.mkdir(parents=True)
        if files is None:
            files = {"kvmctl.yaml": yaml.safe_dump(self.project_file(), sort_keys=False),
                     "net.yaml": yaml.safe_dump(self.manifests()[0], sort_keys=False),
                     "vm.yaml": yaml.safe_dump(self.manifests()[1], sort_keys=False)}
        for name, text in files.items():
            (m / name).write_text(text)
        _git(self.work, "add", "-A")
        _git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        _git(self.work, "push", "-q", "origin", "main")
        return _git(self.work, "rev-parse", "HEAD")

    def boots(self) -> int:
        return len(SerialLog(self.console).findall(BOOT)) if self.console.exists() else 0

    def objects(self) -> dict[str, dict[str, Any]]:
        assert self.controller is not None
        return {o["id"]: o for o in self.controller.project().get("objects") or []}

    def vm_status(self) -> dict[str, Any]:
        return self.objects().get(f"local:VirtualMachine/{self.vm}", {})

    def last_sync(self, sha: str | None = None) -> dict[str, Any] | None:
        assert self.controller is not None
        last = self.controller.project().get("last_sync")
        if last and (sha is None or (last.get("commit") or {}).get("sha") == sha):
            return dict(last)
        return None

    def wait_synced(self, sha: str, timeout: float = 120) -> dict[str, Any]:
        """The first sync of `sha` that left nothing to do."""
        def done() -> dict[str, Any] | None:
            last = self.last_sync(sha)
            if last and last["result"] == "failed":
                raise AssertionError(f"the sync of {sha[:12]} failed: {last}")
            return last if last and last["result"] == "synced" else None
        return wait_until(done, timeout, f"commit {sha[:12]} synced")

    def shot(self, name: str, expect: list[str]) -> Path:
        """The project's page in Chromium: every text of `expect` visible; a screenshot."""
        assert self.controller is not None
        self.shots.mkdir(parents=True, exist_ok=True)
        with chromium(self.scratch / f"browser-{name}") as driver:
            driver.get(f"{self.controller.url}/projects/{self.project}")
            text = driver.find_element("tag name", "body").text
            missing = [e for e in expect if e not in text]
            assert not missing, f"not on the page: {missing}\n{text}"
            return screenshot(driver, self.shots / f"{name}.png")


@pytest.fixture(scope="module")
def lab(conn, free_subnet, test_guest):
    prefix = f"{PREFIX_STEM}{secrets.token_hex(4)}-"
    cleanup = Cleanup(conn, prefix)
    scratch = SCRATCH_ROOT / f"{prefix}gitops"
    scratch.mkdir(parents=True, exist_ok=True)
    scratch.chmod(0o755)
    lab = Lab(conn, prefix, scratch, free_subnet(), test_guest)
    lab.bare.parent.mkdir(parents=True)
    _git(lab.bare.parent, "init", "-q", "--bare", "-b", "main", str(lab.bare))
    _git(scratch, "clone", "-q", str(lab.bare), str(lab.work))
    _git(lab.work, "checkout", "-q", "-b", "main")
    lab.git.start()
    try:
        yield lab
    finally:
        if lab.controller is not None:
            lab.controller.stop()
        lab.git.stop()
        errors = cleanup.run()
        shutil.rmtree(scratch, ignore_errors=True)
        assert not errors, errors


def _webhook(lab: Lab, controller: Controller) -> int:
    body = json.dumps({"ref": "refs/heads/main",
                       "repository": {"clone_url": lab.git.url}}).encode()
    signature = hmac.new(lab.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    return controller.post("/api/v1/webhook", body, {
        "Content-Type": "application/json", "X-GitHub-Event": "push",
        "X-Hub-Signature-256": f"sha256={signature}"})


def _applying(controller: Controller, after: int) -> bool:
    """Whether the controller logged the start of an apply after its first `after` lines."""
    return any("applying" in line.get("message", "") for line in controller.log_lines()[after:])


def _memory_kib(lab: Lab) -> int:
    return int(lab.conn.lookupByName(lab.vm).info()[2])


def _autostart(lab: Lab) -> bool:
    return bool(lab.conn.lookupByName(lab.vm).autostart())


# ---- 1. a commit is created ---------------------------------------------------------------------

def test_a_commit_is_created_by_the_controller(lab: Lab) -> None:
    sha = lab.commit("a network and a VM")
    lab.controller = Controller(lab, INTERVAL)
    wait_until(lambda: lab.last_sync(sha), 120, "the first sync")
    assert lab.conn.lookupByName(lab.vm).isActive()
    SerialLog(lab.console).wait_for(BOOT, BOOT_TIMEOUT)
    wait_until(lambda: lab.vm_status().get("health") == "Healthy", BOOT_TIMEOUT,
               "the VM healthy (running, with its DHCP address)")
    status = lab.controller.project()
    assert status["commit"]["sha"] == sha
    assert status["commit"]["author"] == "Ada Tester"
    assert status["commit"]["message"] == "a network and a VM"
    objects = lab.objects()
    assert objects[f"local:Network/{lab.net}"]["health"] == "Healthy"
    assert {o["sync"] for o in objects.values()} == {"Synced"}
    history = lab.controller.get(f"/api/v1/projects/{lab.project}/history")
    assert any(r["result"] == "applied" and r["commit"]["sha"] == sha for r in history)
    metrics = lab.controller.get("/metrics")
    assert f'kvmctl_syncs_total{{project="{lab.project}",result="applied"}} 1.0' in metrics
    lab.shot("after-commit", [lab.project, lab.vm, "Synced", "Healthy", sha[:12],
                              "a network and a VM"])
    assert lab.boots() == 1


# ---- 2. a live update ---------------------------------------------------------------------------

def test_a_committed_change_lands_live_without_a_reboot(lab: Lab) -> None:
    lab.vm_spec["memory"] = {"size": "192MiB", "max": "256MiB"}
    sha = lab.commit("more memory")
    wait_until(lambda: _memory_kib(lab) == 192 * 1024, 60, "the running guest's memory")
    lab.wait_synced(sha)
    applied = [r for r in lab.controller.get(f"/api/v1/projects/{lab.project}/history")
               if r["commit"] and r["commit"]["sha"] == sha and r["result"] == "applied"]
    assert applied and f"local:VirtualMachine/{lab.vm}" in applied[-1]["changed"]
    assert lab.boots() == 1, "a live change rebooted the guest"
    # kvmctl status reads the same from the controller's API
    shown = subprocess.run([PYTHON, "-m", "kvmctl", "status", "--controller",
                            lab.controller.url, "-o", "json"], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["source"] == f"the controller at {lab.controller.url}"
    mine = next(p for p in data["projects"] if p["name"] == lab.project)
    assert mine["commit"]["sha"] == sha
    assert {o["id"]: o["sync"] for o in mine["objects"]}[
        f"local:VirtualMachine/{lab.vm}"] == "Synced"


# ---- 3. drift -----------------------------------------------------------------------------------

def test_drift_is_reported_and_left_alone_without_self_heal(lab: Lab) -> None:
    assert _autostart(lab)
    virsh("autostart", "--disable", lab.vm)
    wait_until(lambda: lab.vm_status().get("sync") == "OutOfSync", 30, "drift reported")
    status = lab.vm_status()
    assert {"field": "autostart", "old": "False", "new": "True"} in status["fields"]
    assert "selfHeal is off" in status["waiting"]
    time.sleep(INTERVAL * 3)  # three more rounds: still not reverted
    assert not _autostart(lab)
    assert lab.vm_status()["sync"] == "OutOfSync"
    metrics = lab.controller.get("/metrics")
    assert f'kvmctl_drift_objects{{project="{lab.project}"}} 1.0' in metrics
    lab.shot("after-drift", ["OutOfSync", "autostart", "selfHeal is off"])


def test_drift_is_reverted_within_one_interval_with_self_heal(lab: Lab) -> None:
    lab.policy["selfHeal"] = True
    sha = lab.commit("selfHeal on")
    lab.wait_synced(sha)
    assert _autostart(lab)  # the commit's sync reverted the drift
    virsh("autostart", "--disable", lab.vm)
    wait_until(lambda: _autostart(lab), INTERVAL * 2 + 10, "drift reverted within an interval")
    assert lab.boots() == 1


# ---- 4. a broken commit -------------------------------------------------------------------------

def test_a_broken_commit_fails_with_located_errors_and_changes_nothing(lab: Lab) -> None:
    good = lab.controller.project()["commit"]["sha"]
    before = lab.conn.lookupByName(lab.vm).XMLDesc(0)
    files = {"kvmctl.yaml": yaml.safe_dump(lab.project_file(), sort_keys=False),
             "net.yaml": yaml.safe_dump(lab.manifests()[0], sort_keys=False),
             "vm.yaml": "apiVersion: kvmctl/v1\nkind: VirtualMachine\nmetadata:\n"
                        f"  name: {lab.vm}\nspec:\n  memory: [unclosed\n"}
    bad = lab.commit("a broken manifest", files=files)
    failed = wait_until(lambda: lab.last_sync(bad), 60, "the broken commit's sync")
    assert failed["result"] == "failed"
    assert failed["commit"]["sha"] == bad
    assert any(e.startswith("m/vm.yaml:") for e in failed["errors"]), failed["errors"]
    status = lab.controller.project()
    assert status["commit"]["sha"] == good, "the last good commit must stay in force"
    assert status["state"] == "Degraded"
    assert lab.conn.lookupByName(lab.vm).XMLDesc(0) == before
    time.sleep(INTERVAL * 2)
    assert lab.conn.lookupByName(lab.vm).XMLDesc(0) == before
    lab.shot("after-failed-sync", ["failed", "m/vm.yaml:", bad[:12]])
    fixed = lab.commit("fix the manifest")
    lab.wait_synced(fixed)
    assert lab.boots() == 1


# ---- 5. a maintenance window --------------------------------------------------------------------

def test_a_restart_change_waits_for_its_window(lab: Lab) -> None:
    opens = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=25)
    schedule = f"{opens.second} {opens.minute} {opens.hour} * * *"
    lab.policy["windows"] = [{"schedule": schedule, "duration": "2m"}]
    lab.vm_spec["cpus"] = {"count": 1, "max": 2}  # a new maximum needs a restart
    sha = lab.commit("two vCPUs at most, in the window")
    waiting = wait_until(lambda: lab.last_sync(sha), 30, "the sync of the restart change")
    assert waiting["result"] == "out-of-sync", waiting
    status = lab.vm_status()
    assert status["change_class"] == "update-restart"
    assert "waits for a maintenance window" in status["waiting"]
    assert opens.strftime("%H:%M:%S") in status["waiting"]
    vcpus = lab.conn.lookupByName(lab.vm).vcpusFlags(2 | 4)  # VIR_DOMAIN_VCPU_CONFIG | MAXIMUM
    assert vcpus == 1
    wait_until(lambda: dt.datetime.now(dt.UTC) >= opens, 40, "the window to open")
    wait_until(lambda: lab.conn.lookupByName(lab.vm).vcpusFlags(2 | 4) == 2, INTERVAL * 3 + 20,
               "the change applied in the window")
    wait_until(lambda: lab.controller.project().get("pending_restarts"), 20,
               "the pending restart reported")
    assert lab.boots() == 1  # onRestartNeeded: defer
    lab.policy.pop("windows")
    lab.wait_synced(lab.commit("no window"))


# ---- 6. git down --------------------------------------------------------------------------------

def test_git_down_is_degraded_and_changes_nothing(lab: Lab) -> None:
    before = lab.conn.lookupByName(lab.vm).XMLDesc(0)
    commit = lab.controller.project()["commit"]["sha"]
    lab.git.stop()
    try:
        wait_until(lambda: lab.controller.project()["state"] == "Degraded", 60, "degraded")
        status = lab.controller.project()
        assert "git" in status["state_reason"]
        assert status["commit"]["sha"] == commit
        assert lab.conn.lookupByName(lab.vm).XMLDesc(0) == before
    finally:
        lab.git.start()
    wait_until(lambda: lab.controller.project()["state"] == "Healthy", 120, "healthy again")


# ---- 7. the empty-commit guard ------------------------------------------------------------------

def test_a_commit_without_manifests_prunes_nothing(lab: Lab) -> None:
    assert lab.policy["prune"] is True
    empty = lab.commit("everything gone?", files={
        "kvmctl.yaml": yaml.safe_dump(lab.project_file(), sort_keys=False)})
    failed = wait_until(lambda: lab.last_sync(empty), 60, "the empty commit's sync")
    assert failed["result"] == "failed"
    assert "nothing is pruned" in " ".join(failed["errors"])
    time.sleep(INTERVAL * 2)
    assert lab.conn.lookupByName(lab.vm).isActive()
    assert lab.conn.networkLookupByName(lab.net).isActive()
    lab.wait_synced(lab.commit("everything back"))
    assert lab.boots() == 1


# ---- 8. SIGTERM mid-apply, a new controller, the webhook ----------------------------------------

def test_sigterm_mid_apply_finishes_the_change_and_a_restart_converges(lab: Lab) -> None:
    # A paused guest answers no ACPI request: its shutdown takes the whole shutdownTimeout
    # (20 s) before the power-off, which is when SIGTERM comes.
    virsh("suspend", lab.vm)
    lab.vm_spec["state"] = "stopped"
    seen = len(lab.controller.log_lines())
    sha = lab.commit("stop the VM")
    wait_until(lambda: _applying(lab.controller, seen), 60, "the apply to start")
    time.sleep(1)
    assert lab.conn.lookupByName(lab.vm).isActive(), "the shutdown ended before SIGTERM"
    code = lab.controller.stop(signal.SIGTERM, timeout=60)
    assert code == 0, lab.controller.log()
    assert not lab.conn.lookupByName(lab.vm).isActive(), "the change in progress must finish"
    assert "stopped" in lab.controller.log_lines()[-1]["message"]
    # A new controller, with an interval far beyond the test: only the webhook triggers it.
    lab.controller = Controller(lab, 600)
    lab.wait_synced(sha, 60)
    lab.vm_spec["state"] = "running"
    pushed_sha = lab.commit("start it again")
    assert _webhook(lab, lab.controller) == 202
    # the interval is 600 s: only the webhook's round can start it
    wait_until(lambda: lab.conn.lookupByName(lab.vm).isActive(), 30, "started by the webhook")
    wait_until(lambda: lab.last_sync(pushed_sha), 30, "the webhook's sync recorded")
    bad = lab.controller.post("/api/v1/webhook", b"{}", {"X-Hub-Signature-256": "sha256=00"})
    assert bad == 401
    assert lab.controller.post(f"/api/v1/projects/{lab.project}/sync") == 401


# ---- 9. SIGKILL mid-apply -----------------------------------------------------------------------

def test_sigkill_mid_apply_then_the_next_start_converges(lab: Lab) -> None:
    virsh("suspend", lab.vm)  # as above: a shutdown of 20 s
    lab.vm_spec["state"] = "stopped"
    seen = len(lab.controller.log_lines())
    sha = lab.commit("stop it, then be killed")
    assert _webhook(lab, lab.controller) == 202
    wait_until(lambda: _applying(lab.controller, seen), 60, "the apply to start")
    time.sleep(1)
    lab.controller.stop(signal.SIGKILL)
    lab.controller = Controller(lab, INTERVAL)
    lab.wait_synced(sha, 120)
    assert not lab.conn.lookupByName(lab.vm).isActive()
    lines = lab.controller.log_lines()
    assert not any("lock" in line.get("message", "") and line.get("level") == "error"
                   for line in lines), lines


# ---- 10. kvmctl sync over file:// ---------------------------------------------------------------

def test_sync_over_file_url_for_cron(lab: Lab, free_subnet) -> None:
    project = lab.prefix + "cron"
    subnet = free_subnet()
    hosts = list(subnet.hosts())
    repo = lab.scratch / "cron-work"
    _git(lab.scratch, "init", "-q", "-b", "main", str(repo))
    (repo / "m").mkdir()
    (repo / "m" / "kvmctl.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kvmctl/v1", "kind": "Project", "metadata": {"name": project},
        "spec": {"hosts": [{"name": "local", "uri": "qemu:///system"}]}}))
    net = {"apiVersion": "kvmctl/v1", "kind": "Network", "metadata": {"name": project + "n"},
           "spec": {"mode": "nat", "ipv4": {"cidr": str(subnet), "dhcp": {
               "start": str(hosts[99]), "end": str(hosts[198])}}}}
    (repo / "m" / "net.yaml").write_text(yaml.safe_dump(net))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "a network")
    argv = [PYTHON, "-m", "kvmctl", "sync", "--repo", f"file://{repo}", "--ref", "main",
            "--path", "m", "--state-dir", str(lab.scratch / "cron-state")]

    def sync(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120)

    before = subprocess.run([PYTHON, "-m", "kvmctl", "status", "--controller",
                             f"http://127.0.0.1:{_free_port()}", *argv[4:], "-o", "json"],
                            capture_output=True, text=True, timeout=120)
    assert before.returncode == 0, before.stderr
    fresh = json.loads(before.stdout)
    assert fresh["source"].startswith("a fresh plan (no controller answers")
    assert {o["id"]: o["sync"] for o in fresh["projects"][0]["objects"]} == {
        f"local:Network/{project}n": "OutOfSync"}
    first = sync()
    assert first.returncode == 0, first
    assert "applied" in first.stdout
    assert lab.conn.networkLookupByName(project + "n").isActive()
    again = sync("--detailed-exitcode")
    assert again.returncode == 0 and "synced" in again.stdout, again
    (repo / "m" / "net.yaml").write_text("kind: Network\nmetadata: {name: [oops\n")
    _git(repo, "commit", "-qam", "broken")
    sha = _git(repo, "rev-parse", "HEAD")
    broken = sync()
    assert broken.returncode == 1, broken
    assert sha in broken.stderr and "m/net.yaml:" in broken.stderr, broken.stderr
    assert "Traceback" not in broken.stderr
    assert lab.conn.networkLookupByName(project + "n").isActive()
    virsh("net-autostart", "--disable", project + "n")
    manual = sync("--dry-run", "--detailed-exitcode")
    assert manual.returncode in (1, 2)  # the broken commit still fails: nothing changes
    assert not lab.conn.networkLookupByName(project + "n").autostart()
