#!/usr/bin/env python3
"""Benchmark: the GitOps controller at rest and on a push, each next to the bare libvirt cost.

Everything is created under one run id: the projects `kb-<runid>` (N stopped VMs
`kb-<runid>-vm-NNNN` on the NAT network `kb-<runid>-net`, as plan_noop.py makes them) and
`kb-<runid>-hook` (the NAT network `kb-<runid>-hnet` and one stopped VM `kb-<runid>-hvm-0001`),
each in a git repository of its own (a bare repository and a work tree in the run's folder
under /tmp, manifests under `manifests/`), applied once with `kvmctl sync`. Then:

  1. Idle round, in this process: a `kvmctl.sync.reconcile.Reconciler` over a
     `kvmctl.source.GitCache`, as the controller holds them, reconciles the N-VM project with
     nothing changed (one untimed round first parses the commit, which is then kept, and fills
     the run's memo). --repeat paired rounds (every other round in reverse order) time it next
     to a bare libvirt-python read in the same process: open, listAllDomains, XMLDesc
     (inactive) of each domain, of each network and of each pool, close. Medians, with the
     min beside; the round's phases (ls-remote, reading the host, plan, health and status).
  2. Idle CPU share of a whole `kvmctl controller` process: started with `--interval` set
     to --cpu-interval (default 10 s) on the N-VM project, then on the small one,
     /proc/PID/stat sampled every 50 ms over --cpu-rounds rounds after the first. It prints the
     share measured at that interval, and the share at a 60 s interval computed from the same
     samples: the CPU between rounds (per second) plus the CPU of a round beyond that, spread
     over 60 s + the round's time. The CPU counts the process (utime + stime) and its reaped
     children (cutime + cstime: the git commands); the process alone is shown beside.
  3. Push -> applied with the webhook: a controller with `--interval 3600` on the small
     project; --pushes times: commit a flip of the network's autostart, `git push` it to the
     bare repository, POST the signed webhook (POST /api/v1/webhook/<project>, header
     X-Hub-Signature-256), and poll libvirt-python every 20 ms until the network's autostart
     has flipped. Beside it, the change's own cost, in as many rounds: a direct `kvmctl apply
     -y` of the same flip and of the flip back (whole processes, cold) and the bare libvirt
     call (virNetworkSetAutostart), there and back.

The N-VM project is destroyed before the small project is made, so that parts 2 (small) and 3
read a host without its VMs. The output says how many domains the host had at each step.
Then everything is removed (`kvmctl destroy -y` of both projects, then a check by name through
libvirt-python, the run's lock files and hypervisor-lock records, its folder), also when a step
fails, on Ctrl-C or on SIGTERM; every controller started is stopped by its pid first.

Prints figures only; it never fails on a slow result.

    .venv/bin/python bench/controller.py [-n 1000] [--repeat 10] [--no-ip] [--cpu-interval 10]
        [--cpu-rounds 3] [--pushes 5] [--connect URI] [--json FILE]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_noop import (  # noqa: E402
    _ENV_DROP,
    BenchError,
    Run,
    Sample,
    Step,
    Summary,
    child_env,
    free_subnet,
    kvmctl_command,
    leftovers,
    lock_records,
    measured,
    network_yaml,
    other_pytests,
    paired_ratio,
    paired_rounds,
    prefix_for,
    remove_by_prefix,
    remove_lock_files,
    row,
    run,
    run_id_arg,
    terminate_as_exit,
    vm_ips,
    vm_yaml,
    warm_cache_env,
    write_docs,
    write_json,
)

TARGET_RATIO = 1.5  # idle round / bare read
TARGET_SHARE = 1.0  # % of one core at a 60 s interval
TARGET_LATENCY = 2.0  # s beyond the change's own cost
AT_INTERVAL = 60.0
POLL = 0.02
SAMPLE_EVERY = 0.05
CLK_TCK = os.sysconf("SC_CLK_TCK")
DAEMONS = ("libvirtd", "virtqemud", "virtnetworkd", "virtstoraged", "virtproxyd")
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "kvmctl bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                "GIT_COMMITTER_NAME": "kvmctl bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}


def tail(text: str, lines: int = 15) -> str:
    return "".join(line + "\n" for line in text.splitlines()[-lines:])


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- git ----------------------------------------------------------------------------------------

def git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "-c", "commit.gpgSign=false",
                           *args], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env={**child_env(), **GIT_IDENTITY})
    if proc.returncode != 0:
        raise BenchError(f"git {' '.join(args[:3])} exited {proc.returncode}:\n"
                         f"{tail(proc.stderr)}")
    return proc.stdout


class Repo:
    """A bare repository (the "remote" the controller reads) and a work tree that pushes to it;
    the manifests live under `manifests/`."""

    def __init__(self, parent: Path, name: str) -> None:
        self.bare = parent / f"{name}.git"
        self.work = parent / f"{name}-work"
        self.manifests = self.work / "manifests"
        git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=parent)
        git("init", "-q", "-b", "main", str(self.work), cwd=parent)
        self.manifests.mkdir()

    def commit(self, message: str) -> str:
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", message, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work).strip()

    def push(self) -> None:
        git("push", "-q", str(self.bare), "main", cwd=self.work)


@dataclass
class Project:
    name: str
    repo: Repo
    network: str

    def flags(self, uri: str) -> list[str]:
        return ["--project", self.name, "--connect", uri, "--domain-type", "qemu"]


# ---- the run ------------------------------------------------------------------------------------

class ControllerRun(Run):
    """plan_noop's run (id, folder, cleanup), with two projects from git, the controllers it
    starts, and the hypervisor-lock records the applies may leave."""

    def __init__(self, uri: str, run_id: str | None = None) -> None:
        super().__init__(uri, run_id)
        self.projects: list[tuple[str, Path]] = []  # (project, manifests) to destroy
        self.controllers: list[Controller] = []

    def destroy(self, project: str, directory: Path) -> bool:
        proc = run(kvmctl_command() + ["destroy", "-y", "-f", str(directory), "--connect",
                                       self.uri, "--project", project, "--domain-type", "qemu"],
                   check=False, env=self.env())
        if proc.returncode != 0:
            print(f"  kvmctl destroy of {project} exited {proc.returncode}:\n"
                  f"{tail(proc.stderr, 5)}", end="", flush=True)
        return proc.returncode == 0

    def destroy_applied(self) -> None:
        for project, directory in reversed(self.projects):
            try:
                self.destroy(project, directory)
            except OSError as exc:
                print(f"  kvmctl destroy could not run: {exc}", flush=True)

    def lock_records(self, remove: bool = False) -> list[str]:
        """Hypervisor-lock records of this run's projects (project_key of both projects
        starts with kb-<runid>-)."""
        return lock_records(self.uri, self.prefix, remove)

    def cleanup(self) -> bool:
        for c in self.controllers:
            c.stop()
        print(f"cleanup: kvmctl destroy -y (projects "
              f"{', '.join(p for p, _ in self.projects) or '(none applied)'})...", flush=True)
        self.destroy_applied()
        left: list[str] = []
        try:
            left = leftovers(self.uri, self.prefix) + self.lock_records()
            if left:
                print(f"  {len(left)} object(s) left after destroy, removing them through "
                      f"libvirt: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}",
                      flush=True)
                remove_by_prefix(self.uri, self.prefix)
                self.lock_records(remove=True)
                left = leftovers(self.uri, self.prefix) + self.lock_records()
        except Exception as exc:  # noqa: BLE001 - report, never hide the original failure
            print(f"  cannot check for leftovers: {type(exc).__name__}: {exc}", flush=True)
            left = [f"(cannot check: {exc})"]
        remove_lock_files(self.project)  # kb-<runid>-*.lock: both projects' lock files
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            left.append(f"folder {self.dir}")
        if left:
            print(f"  NOT REMOVED: {', '.join(left)}", flush=True)
            return False
        print(f"  nothing named {self.prefix}*, no lock record, no controller and no folder of "
              "this run is left", flush=True)
        return True


def host_domains(uri: str) -> int:
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(uri)
    try:
        return len(conn.listAllDomains(0))
    finally:
        conn.close()


def sync_once(r: ControllerRun, p: Project) -> float:
    """`kvmctl sync` of the project's repository (its first apply); its wall time."""
    r.projects.append((p.name, p.repo.manifests))  # destroyed by the cleanup, also on failure
    argv = kvmctl_command() + ["sync", "--repo", str(p.repo.bare), "--path", "manifests",
                               *p.flags(r.uri), "--state-dir", str(r.dir / "sync-state")]
    started = time.perf_counter()
    proc = run(argv, check=False, env=r.env())
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or ": applied" not in proc.stdout:
        raise BenchError(f"kvmctl sync of {p.name} exited {proc.returncode}:\n"
                         f"{tail(proc.stdout)}{tail(proc.stderr)}")
    return elapsed


def autostart_network(name: str, subnet: ipaddress.IPv4Network, autostart: bool) -> str:
    return network_yaml(name, subnet) + f"  autostart: {'true' if autostart else 'false'}\n"


# ---- 1. the idle round, in-process -------------------------------------------------------------

PHASES = {"ls-remote": "git ls-remote (GitCache.remote_commit)",
          "hosts": "connect, read host, validate (Deployment)",
          "read": "  of which: connect + read the host (engine._open_hosts, in a thread, "
                  "beside the placement)",
          "validate": "  of which: validate against the host (Session: validate.validate)",
          "plan": "render + compare (Deployment.plan)",
          "health": "health checks + status (_round_status)",
          "close": "close connections (Deployment.close)",
          "rest": "the rest (scheduling, records)"}


SUBPHASES = ("read", "validate")  # parts of "hosts", not added to the total


class Phases:
    def __init__(self) -> None:
        self.times = dict.fromkeys(PHASES, 0.0)

    def timed(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[key] += time.perf_counter() - started
        return inner


@contextlib.contextmanager
def phase_timers(phases: Phases, reconciler: Any, cache: Any) -> Iterator[None]:
    """Time the round's parts by wrapping the calls it makes (microseconds each)."""
    from kvmctl import engine
    from kvmctl.manifest import validate
    from kvmctl.sync import reconcile
    saved = reconcile.Deployment, engine.Deployment.plan, engine.Deployment.close
    inner = engine._open_hosts, validate.validate
    engine._open_hosts = phases.timed("read", inner[0])  # type: ignore[assignment]
    validate.validate = phases.timed("validate", inner[1])  # type: ignore[assignment]
    cache.remote_commit = phases.timed("ls-remote", cache.remote_commit)
    reconcile.Deployment = phases.timed("hosts", saved[0])  # type: ignore[misc]
    engine.Deployment.plan = phases.timed("plan", saved[1])  # type: ignore[method-assign]
    engine.Deployment.close = phases.timed("close", saved[2])  # type: ignore[method-assign]
    reconciler._round_status = phases.timed("health", reconciler._round_status)
    try:
        yield
    finally:
        reconcile.Deployment, engine.Deployment.plan, engine.Deployment.close = saved
        engine._open_hosts, validate.validate = inner
        del cache.remote_commit, reconciler._round_status


def cpu_now() -> float:
    """CPU time of this process (every thread) and of its reaped children (git)."""
    t = os.times()  # the children's in clock ticks; this process's at the clock's resolution
    return time.process_time() + t.children_user + t.children_system


def bare_read(uri: str) -> int:
    """The floor of a round: every domain's, network's and pool's XML over one connection."""
    import libvirt
    conn = libvirt.open(uri)
    try:
        n = 0
        for dom in conn.listAllDomains(0):
            try:
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            except libvirt.libvirtError:  # undefined since it was listed
                continue
            n += 1
        for net in conn.listAllNetworks(0):
            with contextlib.suppress(libvirt.libvirtError):
                net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
        for pool in conn.listAllStoragePools(0):
            with contextlib.suppress(libvirt.libvirtError):
                pool.XMLDesc(0)
        return n
    finally:
        conn.close()


def timed_bare(uri: str) -> Sample:
    cpu, started = cpu_now(), time.perf_counter()
    bare_read(uri)
    return Sample(time.perf_counter() - started, cpu_now() - cpu, 0)


def in_process_env(r: ControllerRun) -> None:
    """This process's environment as a controller's: no CLI overrides from the shell, the
    run's own memo folder (warm after the first round)."""
    for key in _ENV_DROP:
        os.environ.pop(key, None)
    os.environ.update(warm_cache_env({}, r.dir / "state" / "in-process"))


def measure_idle(r: ControllerRun, p: Project, n: int, repeat: int) -> dict[str, Any]:
    import libvirt

    from kvmctl.manifest.project import Overrides
    from kvmctl.source import GitCache, SourceSpec
    from kvmctl.sync.reconcile import ProjectSource, Reconciler
    from kvmctl.sync.status import SyncResult
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    in_process_env(r)
    cache = GitCache(str(r.dir / "in-process-state" / "git"))
    source = ProjectSource(SourceSpec.of(str(p.repo.bare), "HEAD", "manifests"), None,
                           Overrides(p.name, r.uri, "qemu"))
    reconciler = Reconciler(source, cache, command="bench/controller.py")

    def reconcile() -> Sample:
        cpu, started = cpu_now(), time.perf_counter()
        outcome = reconciler.reconcile("poll")
        wall, used = time.perf_counter() - started, cpu_now() - cpu
        rec = outcome.record
        if rec.result is not SyncResult.SYNCED or rec.changed:
            raise BenchError(f"an idle round of {p.name} was not in sync: {rec.result}: "
                             f"{rec.summary}" + "".join(f"\n  {e}" for e in rec.errors))
        return Sample(wall, used, 0)

    first = reconcile()  # fetches and parses the commit, kept from now on; fills the memo
    timed_bare(r.uri)
    domains = host_domains(r.uri)
    print(f"  first round (fetch, extract, parse and validate the commit, then the round): "
          f"{first.wall:.3f} s, CPU {first.cpu:.3f} s; the host has {domains} domains",
          flush=True)
    phases = Phases()
    per_round: list[dict[str, float]] = []

    def kvmctl_round() -> Sample:
        phases.times = dict.fromkeys(PHASES, 0.0)
        s = reconcile()
        phases.times["rest"] = s.wall - sum(v for k, v in phases.times.items()
                                            if k not in SUBPHASES)
        per_round.append(dict(phases.times))
        return s

    def report(i: int, got: dict[str, list[Sample]]) -> None:
        print(f"  round {i + 1}/{repeat}: idle round {got['kvmctl'][-1].wall:.3f} s "
              f"(CPU {got['kvmctl'][-1].cpu:.3f} s), bare read {got['bare'][-1].wall:.3f} s "
              f"(CPU {got['bare'][-1].cpu:.3f} s)", flush=True)

    steps: list[Step] = [("kvmctl", kvmctl_round), ("bare", lambda: timed_bare(r.uri))]
    with phase_timers(phases, reconciler, cache):
        samples = paired_rounds(steps, repeat, report)
    a, b = Summary.of(samples["kvmctl"]), Summary.of(samples["bare"])
    return {"vms": n, "domains": domains, "repeat": repeat,
            "first_round_s": first.wall, "first_round_cpu_s": first.cpu,
            "kvmctl": {"median_s": a.median, "min_s": a.min, "cpu_s": a.cpu},
            "bare": {"median_s": b.median, "min_s": b.min, "cpu_s": b.cpu},
            "ratio": a.median / b.median,
            "paired": paired_ratio(samples["kvmctl"], samples["bare"]),
            "phases_s": {k: med([rd[k] for rd in per_round]) for k in PHASES}}


def print_idle(f: dict[str, Any]) -> None:
    n = f["vms"]
    print(f"\n1. idle round of a project of {n} stopped VMs, in-process (Reconciler + GitCache, "
          f"warm: the commit parsed once and kept), median of {f['repeat']} paired rounds, min "
          "beside; ratio = median / median of the bare read; paired = median over the rounds of "
          "the ratio in that round; CPU = this process's CPU time (all threads) and its reaped "
          "children's (git), median")
    print("| VMs | domains | what | median s | min s | ratio | paired | ms/VM | CPU s |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, label in (("bare", "bare libvirt-python read (domains, networks, pools)"),
                       ("kvmctl", "idle round (ls-remote + read + plan + health)")):
        s = f[key]
        paired = f"{f['paired']:.2f}" if key == "kvmctl" else ""
        print(f"| {n} | {f['domains']} | {label} | {s['median_s']:.3f} | {s['min_s']:.3f} | "
              f"{s['median_s'] / f['bare']['median_s']:.2f} | {paired} | "
              f"{s['median_s'] * 1000 / n:.3f} | {s['cpu_s']:.3f} |")
    print(f"\n  phases of the idle round (median of each over the rounds; the first round, which "
          f"parsed the commit, took {f['first_round_s']:.3f} s):")
    print("| phase | median s | share of the round |")
    print("| --- | ---: | ---: |")
    total = f["kvmctl"]["median_s"]
    for key, label in PHASES.items():
        print(f"| {label} | {f['phases_s'][key]:.3f} | {f['phases_s'][key] / total:.0%} |")
    print(f"  ratio {f['ratio']:.2f} (target <= {TARGET_RATIO}): "
          f"{'met' if f['ratio'] <= TARGET_RATIO else 'MISSED'}")


# ---- the controller process ---------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One sync record the controller logged (--log-format json), when it was read here."""

    arrival: float  # time.monotonic()
    result: str
    trigger: str
    duration: float
    changed: tuple[str, ...]
    errors: tuple[str, ...]
    message: str


class Controller:
    """A whole `kvmctl controller` process of one project, its log read as it comes."""

    def __init__(self, r: ControllerRun, p: Project, interval: float, tag: str) -> None:
        self.project = p
        self.dir = r.dir / f"controller-{tag}"
        self.dir.mkdir()
        token = self.dir / "token"
        token.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
        self.secret = secrets.token_hex(20)
        secret_file = self.dir / "webhook-secret"
        secret_file.write_text(self.secret + "\n", encoding="utf-8")
        for f in (token, secret_file):
            f.chmod(0o600)
        argv = kvmctl_command() + [
            "controller", "--repo", str(p.repo.bare), "--path", "manifests", *p.flags(r.uri),
            "--state-dir", str(self.dir / "state"), "--listen", "127.0.0.1:0",
            "--token-file", str(token), "--webhook-secret-file", str(secret_file),
            "--interval", f"{interval:g}", "--log-format", "json"]
        env = warm_cache_env(child_env(), self.dir / "cache")
        self.lines: list[str] = []
        self.records: list[Record] = []
        self.url: str | None = None
        self.ended = False
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env, cwd=self.dir,
                                     process_group=0)
        r.controllers.append(self)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            arrival = time.monotonic()
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            with self._cond:
                self.lines.append(text)
                if isinstance(data, dict):
                    message = str(data.get("message", ""))
                    found = re.search(r"web: serving on (http://\S+)", message)
                    if found and self.url is None:
                        self.url = found[1].rstrip("/") + "/"
                    if "result" in data and "duration" in data:
                        self.records.append(Record(
                            arrival, str(data["result"]), str(data.get("trigger", "")),
                            float(data["duration"]), tuple(data.get("changed") or ()),
                            tuple(data.get("errors") or ()), message))
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def log_tail(self, lines: int = 12) -> str:
        with self._cond:
            return "".join(f"    {line[:300]}\n" for line in self.lines[-lines:])

    def wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done():
                if self.ended or self.proc.poll() is not None:
                    raise BenchError(f"the controller of {self.project.name} exited "
                                     f"{self.proc.poll()} while waiting for {what}:\n"
                                     f"{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"waited {timeout:g} s for {what} in vain; the "
                                     f"controller's log:\n{self.log_tail()}")
                self._cond.wait(min(left, 0.5))

    def wait_records(self, count: int, timeout: float) -> list[Record]:
        self.wait_for(lambda: len(self.records) >= count, timeout, f"sync record {count}")
        with self._cond:
            return list(self.records)

    def first_round(self, timeout: float = 600.0) -> Record:
        """The first round's record, which must find the project in sync."""
        first = self.wait_records(1, timeout)[0]
        self.wait_for(lambda: self.url is not None, 10.0, "the listening address")
        if first.result != "synced":
            raise BenchError(f"the controller's first round of {self.project.name}: "
                             f"{first.result}: {first.message}\n{self.log_tail()}")
        return first

    def max_rss_mb(self) -> float:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        """SIGTERM to its pid (it finishes the change in progress), SIGKILL to its process
        group after 60 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                print(f"  controller {self.pid} did not stop in 60 s: SIGKILL", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# ---- 2. the idle CPU share ----------------------------------------------------------------------

def proc_cpu(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of a process, in seconds."""
    data = Path(f"/proc/{pid}/stat").read_text()
    fields = data[data.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return ((int(fields[11]) + int(fields[12])) / CLK_TCK,
            (int(fields[13]) + int(fields[14])) / CLK_TCK)


def daemon_pids() -> list[int]:
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() in DAEMONS:
                found.append(int(comm.parent.name))
    return found


class CpuSampler(threading.Thread):
    """/proc/PID/stat of the controller (and of the libvirt daemons) every SAMPLE_EVERY s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.daemons = daemon_pids()
        self.times: list[float] = []
        self.values: list[tuple[float, float, float]] = []  # self, self + children, daemons
        self._stop_event = threading.Event()

    def sample(self) -> None:
        now = time.monotonic()
        own, children = proc_cpu(self.pid)
        daemons = 0.0
        for pid in self.daemons:
            with contextlib.suppress(OSError, ValueError):
                daemons += proc_cpu(pid)[0]
        self.times.append(now)
        self.values.append((own, own + children, daemons))

    def run(self) -> None:
        while not self._stop_event.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.sample()
            self._stop_event.wait(SAMPLE_EVERY)

    def finish(self) -> None:
        self._stop_event.set()
        self.join()
        with contextlib.suppress(OSError, ValueError):
            self.sample()

    def at(self, t: float, col: int) -> float:
        i = max(0, bisect.bisect_right(self.times, t) - 1)
        return self.values[i][col]


@dataclass(frozen=True)
class Share:
    """One CPU column over the window: measured, and per round and between rounds."""

    measured: float  # share of one core over the window, at the measured interval
    idle_rate: float  # CPU s per s between rounds
    round_cpu: float  # CPU s of a round beyond the idle rate (median)
    idle_time: float  # s between rounds in the window: one clock tick over it is the
    #                   resolution of idle_rate

    def at(self, interval: float, round_wall: float) -> float:
        """The share at `interval`: a round every interval + round_wall seconds (the next is
        due `interval` after one ends)."""
        return self.idle_rate + self.round_cpu / (interval + round_wall)


def shares(s: CpuSampler, recs: Sequence[Record], col: int) -> Share:
    t0, t1 = s.times[0], s.times[-1]
    total = s.at(t1, col) - s.at(t0, col)
    spans = [(max(t0, x.arrival - x.duration - 0.1), min(t1, x.arrival + 0.5)) for x in recs]
    busy = [s.at(b, col) - s.at(a, col) for a, b in spans]
    idle_time = (t1 - t0) - sum(b - a for a, b in spans)
    idle_rate = (total - sum(busy)) / idle_time if idle_time > 0 else float("nan")
    excess = [cpu - idle_rate * (b - a) for cpu, (a, b) in zip(busy, spans, strict=True)]
    return Share(total / (t1 - t0), idle_rate, med(excess), idle_time)


def measure_cpu(r: ControllerRun, p: Project, interval: float, rounds: int,
                what: str) -> dict[str, Any]:
    domains = host_domains(r.uri)
    ctl = Controller(r, p, interval, "cpu-" + re.sub(r"[^a-z0-9]+", "-", what.lower()))
    print(f"  controller pid {ctl.pid} (--interval {interval:g}) on {p.name} ({what}; the host "
          f"has {domains} domains): waiting for its first round ...", flush=True)
    first = ctl.first_round()
    sampler = CpuSampler(ctl.pid)
    sampler.start()
    print(f"  first round {first.duration:.2f} s; sampling /proc/{ctl.pid}/stat over {rounds} "
          f"more rounds (about {rounds * interval:.0f} s) ...", flush=True)
    try:
        recs = ctl.wait_records(1 + rounds, rounds * (interval + 120) + 60)[1:1 + rounds]
        time.sleep(1.0)  # the window ends after the last round's own after-work
    finally:
        sampler.finish()
    bad = [x for x in recs if x.result != "synced"]
    if bad:
        raise BenchError(f"an idle round of the controller was not in sync: {bad[0].result}: "
                         f"{bad[0].message}\n{ctl.log_tail()}")
    rss = ctl.max_rss_mb()
    ctl.stop()
    print(f"  controller stopped (exit {ctl.proc.returncode})", flush=True)
    wall = med([x.duration for x in recs])
    full, own, daemons = (shares(sampler, recs, col) for col in (1, 0, 2))
    return {"what": what, "project": p.name, "domains": domains, "interval": interval,
            "rounds": len(recs), "window_s": sampler.times[-1] - sampler.times[0],
            "round_wall_s": wall, "max_rss_mb": rss,
            **{f"{key}_{name}": value for key, sh in (("all", full), ("own", own),
                                                      ("libvirtd", daemons))
               for name, value in (("measured", sh.measured), ("idle_rate", sh.idle_rate),
                                   ("idle_time_s", sh.idle_time),
                                   ("round_cpu_s", sh.round_cpu),
                                   ("computed_at_interval", sh.at(interval, wall)),
                                   ("computed_at_60", sh.at(AT_INTERVAL, wall)))}}


def print_cpu(figs: Sequence[dict[str, Any]], bare: dict[str, float]) -> None:
    if not figs:
        return
    print(f"\n2. idle CPU share of a whole `kvmctl controller` process (% of one core). Measured: "
          f"over the window, at the interval it ran with. At {AT_INTERVAL:g} s: COMPUTED from "
          f"the same samples, as (CPU between rounds per s) + (CPU of a round beyond that) / "
          f"({AT_INTERVAL:g} s + the round's time). CPU = the process and its reaped children "
          "(git); the process alone in parentheses. libvirtd: the daemon's CPU over the same "
          "window (other work on the host included). bare read: the CPU of one bare read in "
          "this process per 60 s")
    print("| project | domains | interval s | rounds | round s | CPU a round s | between "
          "rounds ms/s | measured % | computed at the interval % | computed at 60 s % | "
          "libvirtd measured % | bare read at 60 s % | max RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: |")
    for f in figs:
        print(f"| {f['what']} | {f['domains']} | {f['interval']:g} | {f['rounds']} | "
              f"{f['round_wall_s']:.2f} | {f['all_round_cpu_s']:.3f} "
              f"({f['own_round_cpu_s']:.3f}) | {f['all_idle_rate'] * 1000:.2f} "
              f"({f['own_idle_rate'] * 1000:.2f}) | {f['all_measured']:.2%} "
              f"({f['own_measured']:.2%}) | {f['all_computed_at_interval']:.2%} | "
              f"{f['all_computed_at_60']:.2%} ({f['own_computed_at_60']:.2%}) | "
              f"{f['libvirtd_measured']:.2%} | {bare[f['what']] / AT_INTERVAL:.3%} | "
              f"{f['max_rss_mb']:.0f} |".replace("%", " %"))
    for f in figs:
        print(f"  {f['what']}: between rounds {f['all_idle_rate'] * 1000:.2f} ms/s over "
              f"{f['all_idle_time_s']:.1f} s; its resolution, one {1000 / CLK_TCK:g} ms clock "
              f"tick over that time: {1000 / CLK_TCK / f['all_idle_time_s']:.2f} ms/s")
    for f in figs:
        share = f["all_computed_at_60"] * 100
        print(f"  {f['what']}: {share:.2f} % of one core at a {AT_INTERVAL:g} s interval, "
              f"computed from --interval {f['interval']:g} (target < {TARGET_SHARE:g} %): "
              f"{'met' if share < TARGET_SHARE else 'MISSED'}")


# ---- 3. push -> applied with the webhook --------------------------------------------------------

def post_webhook(url: str, project: str, secret: str, repo: Path, sha: str) -> int:
    body = json.dumps({"ref": "refs/heads/main", "after": sha,
                       "repository": {"clone_url": str(repo)}}).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    request = urllib.request.Request(
        f"{url}api/v1/webhook/{urllib.parse.quote(project, safe='')}", data=body,
        method="POST", headers={"Content-Type": "application/json", "X-GitHub-Event": "push",
                                "X-Hub-Signature-256": signature})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        raise BenchError(f"the webhook answered {exc.code}: {exc.read()[:200]!r}") from None


def wait_autostart(net: Any, want: bool, timeout: float = 60.0) -> float:
    """Poll the network every POLL s until its autostart is `want`; when it was seen."""
    deadline = time.perf_counter() + timeout
    while True:
        if bool(net.autostart()) == want:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(f"the network's autostart did not become {want} in {timeout:g} s")
        time.sleep(POLL)


def measure_push(r: ControllerRun, p: Project, subnet: ipaddress.IPv4Network,
                 pushes: int) -> dict[str, Any]:
    import libvirt
    domains = host_domains(r.uri)
    ctl = Controller(r, p, 3600, "webhook")
    print(f"  controller pid {ctl.pid} (--interval 3600) on {p.name} (the host has {domains} "
          "domains): waiting for its first round ...", flush=True)
    first = ctl.first_round()
    print(f"  first round {first.duration:.2f} s; listening on {ctl.url}", flush=True)
    conn = libvirt.open(r.uri)
    rows: list[dict[str, float]] = []
    try:
        net = conn.networkLookupByName(p.network)
        state = bool(net.autostart())
        for i in range(pushes):
            want = not state
            (p.repo.manifests / "network.yaml").write_text(
                autostart_network(p.network, subnet, want), encoding="utf-8")
            sha = p.repo.commit(f"network autostart {want}")
            seen_before = len(ctl.records)
            started = time.perf_counter()
            p.repo.push()
            pushed = time.perf_counter()
            status = post_webhook(ctl.url or "", p.name, ctl.secret, p.repo.bare, sha)
            posted = time.perf_counter()
            if status != 202:
                raise BenchError(f"the webhook answered {status}, not 202")
            seen = wait_autostart(net, want)
            # The round's record, then the next round (5 s later: it checks what was made)
            # before the next push, so that no push lands in a round of the one before.
            recs = ctl.wait_records(seen_before + 1, 60)
            applied = recs[seen_before]
            if applied.result != "applied" or applied.trigger != "webhook":
                raise BenchError(f"the webhook round was {applied.result} ({applied.trigger}): "
                                 f"{applied.message}\n{ctl.log_tail()}")
            ctl.wait_records(seen_before + 2, 60)
            state = want
            rows.append({"push_s": pushed - started, "post_s": posted - pushed,
                         "visible_s": seen - started, "after_post_s": seen - posted,
                         "round_s": applied.duration})
            print(f"  push {i + 1}/{pushes} (autostart -> {want}): visible after "
                  f"{seen - started:.3f} s (git push {pushed - started:.3f} s, webhook POST "
                  f"{posted - pushed:.3f} s, then {seen - posted:.3f} s; the round's own time "
                  f"{applied.duration:.3f} s)", flush=True)
            time.sleep(0.3)
    finally:
        conn.close()
        ctl.stop()
    print(f"  controller stopped (exit {ctl.proc.returncode})", flush=True)
    return {"domains": domains, "pushes": rows}


def measure_direct(r: ControllerRun, p: Project, subnet: ipaddress.IPv4Network,
                   repeat: int) -> dict[str, Any]:
    """The change's own cost. Each round: `kvmctl apply -y` of the same flip and of the flip
    back (whole processes, cold: two samples), then the bare libvirt call, also there and back
    (two samples). Both end where they began, kvmctl's record of the manifest too (a libvirt
    call alone would leave the record naming the other value: drift the next sync repairs)."""
    import libvirt
    conn = libvirt.open(r.uri)
    apply_s: list[Sample] = []
    call_s: list[float] = []
    network = p.repo.manifests / "network.yaml"
    committed = network.read_text(encoding="utf-8")
    argv = kvmctl_command() + ["apply", "-y", "-f", str(p.repo.manifests), *p.flags(r.uri)]
    try:
        net = conn.networkLookupByName(p.network)
        for i in range(repeat):
            state = bool(net.autostart())
            for want in (not state, state):
                network.write_text(autostart_network(p.network, subnet, want), encoding="utf-8")
                apply_s.append(measured(argv, env=r.env()))
                if bool(net.autostart()) != want:
                    raise BenchError(f"kvmctl apply did not set the network's autostart to "
                                     f"{want}")
            for want in (not state, state):
                started = time.perf_counter()
                net.setAutostart(1 if want else 0)
                call_s.append(time.perf_counter() - started)
            print(f"  round {i + 1}/{repeat}: kvmctl apply (autostart -> {not state}, back) "
                  f"{apply_s[-2].wall:.3f} s, {apply_s[-1].wall:.3f} s (CPU {apply_s[-2].cpu:.3f}"
                  f" s, {apply_s[-1].cpu:.3f} s); libvirt setAutostart (there, back) "
                  f"{call_s[-2] * 1000:.2f} ms, {call_s[-1] * 1000:.2f} ms", flush=True)
    finally:
        network.write_text(committed, encoding="utf-8")
        conn.close()
    s = Summary.of(apply_s)
    return {"apply_median_s": s.median, "apply_min_s": s.min, "apply_cpu_s": s.cpu,
            "apply_samples": len(apply_s), "call_median_s": med(call_s),
            "call_min_s": min(call_s)}


def print_push(f: dict[str, Any], d: dict[str, Any]) -> None:
    rows = f["pushes"]
    print(f"\n3. push -> applied with the webhook, project of a network and a stopped VM (the "
          f"host has {f['domains']} domains), {len(rows)} pushes of a network autostart flip: "
          "from the start of `git push` to the poll (every 20 ms) that sees the change in "
          "libvirt; median, min, max")
    print("| what | median s | min s | max s |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in (("visible_s", "push -> visible in libvirt"),
                       ("push_s", "  git push to the bare repository"),
                       ("post_s", "  webhook POST (signed; 202)"),
                       ("after_post_s", "  POST answered -> visible"),
                       ("round_s", "  the webhook round's own time (its record)")):
        values = [x[key] for x in rows]
        print(f"| {label} | {med(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    print(f"| the change's own cost: `kvmctl apply -y` of the same flip (whole process, cold; "
          f"{d['apply_samples']} runs) | {d['apply_median_s']:.3f} | {d['apply_min_s']:.3f} | |")
    print(f"| the change's own cost: the libvirt call (virNetworkSetAutostart) | "
          f"{d['call_median_s']:.4f} | {d['call_min_s']:.4f} | |")
    latency = med([x["visible_s"] for x in rows])
    limit = TARGET_LATENCY + d["call_median_s"]
    print(f"  push -> applied {latency:.3f} s (target < {TARGET_LATENCY:g} s + the change's own "
          f"cost, the libvirt call: < {limit:.3f} s): {'met' if latency < limit else 'MISSED'}")


# ---- the whole run ------------------------------------------------------------------------------

def make_big(r: ControllerRun, n: int, reserve: bool) -> Project:
    repo = Repo(r.dir, "big")
    p = Project(r.project, repo, r.network)
    subnet = free_subnet(r.uri, prefix_for(n) if reserve else 24)
    (repo.manifests / "network.yaml").write_text(network_yaml(p.network, subnet),
                                                 encoding="utf-8")
    names = [r.vm_name(i) for i in range(1, n + 1)]
    write_docs(repo.manifests, [vm_yaml(name, p.network, ip, bench="controller") for name, ip
                                in zip(names, vm_ips(subnet, n, reserve), strict=True)])
    repo.commit(f"{n} stopped VMs")
    repo.push()
    print(f"\nproject {p.name}: {n} stopped VMs and the network {p.network} ({subnet}; "
          f"{'a DHCP reservation each' if reserve else 'no reservations'}), committed to "
          f"{repo.bare}; kvmctl sync ...", flush=True)
    print(f"  kvmctl sync (applies it): {sync_once(r, p):.1f} s", flush=True)
    return p


def make_small(r: ControllerRun) -> tuple[Project, ipaddress.IPv4Network]:
    repo = Repo(r.dir, "hook")
    p = Project(f"{r.project}-hook", repo, f"{r.prefix}hnet")
    subnet = free_subnet(r.uri, 24)
    (repo.manifests / "network.yaml").write_text(autostart_network(p.network, subnet, False),
                                                 encoding="utf-8")
    (repo.manifests / "vm.yaml").write_text(vm_yaml(r.vm_name(1, "hvm"), p.network, None,
                                                    bench="controller"), encoding="utf-8")
    repo.commit("a network and a stopped VM")
    repo.push()
    print(f"\nproject {p.name}: the network {p.network} ({subnet}, autostart false) and the "
          f"stopped VM {r.vm_name(1, 'hvm')}, committed to {repo.bare}; kvmctl sync ...",
          flush=True)
    print(f"  kvmctl sync (applies it): {sync_once(r, p):.1f} s", flush=True)
    return p, subnet


def load() -> str:
    """The 1-minute load average, and a note when it reached half the cores."""
    one, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"{one:.2f} on {cores} cores" + (
        f" (half the cores or more: other work shared the CPUs; {other_pytests()} pytest "
        "processes)" if one >= cores / 2 else "")


def measure(r: ControllerRun, args: argparse.Namespace) -> None:
    print(f"run {r.id}: projects {r.project} ({args.vms} stopped VMs) and {r.project}-hook, "
          f"folder {r.dir}; load average {load()}", flush=True)
    big = make_big(r, args.vms, not args.no_ip)
    print(f"\n1. idle round in-process, {args.repeat} paired rounds ...", flush=True)
    idle = measure_idle(r, big, args.vms, args.repeat)
    print_idle(idle)
    cpu: list[dict[str, Any]] = []
    bare_cpu = {f"{args.vms} VMs": idle["bare"]["cpu_s"]}
    print(f"\n2. idle CPU share, {args.vms}-VM project ...", flush=True)
    cpu.append(measure_cpu(r, big, args.cpu_interval, args.cpu_rounds, f"{args.vms} VMs"))
    print(f"\ndestroying {big.name} ({args.vms} VMs) before the small project ...", flush=True)
    if r.destroy(big.name, big.repo.manifests):
        r.projects.remove((big.name, big.repo.manifests))

    small, subnet = make_small(r)
    print(f"\n3. push -> applied with the webhook, {args.pushes} pushes ...", flush=True)
    push = measure_push(r, small, subnet, args.pushes)
    print(f"\n   the change's own cost, {args.pushes} rounds ...", flush=True)
    direct = measure_direct(r, small, subnet, args.pushes)
    print("\n2. idle CPU share, small project ...", flush=True)
    bare_cpu["small project"] = med([timed_bare(r.uri).cpu for _ in range(5)])
    cpu.append(measure_cpu(r, small, args.cpu_interval, args.cpu_rounds, "small project"))

    print(f"\nload average now {load()}", flush=True)
    print_idle(idle)
    print_cpu(cpu, bare_cpu)
    print_push(push, direct)
    write_json(args.json, json_rows(idle, cpu, bare_cpu, push, direct), idle=idle, cpu=cpu,
               push=push, direct=direct)


def json_rows(idle: dict[str, Any], cpu: Sequence[dict[str, Any]], bare_cpu: dict[str, float],
              push: dict[str, Any], direct: dict[str, Any]) -> list[dict[str, object]]:
    n = idle["vms"]
    rows = [row(f"controller idle round, {n} VMs, in-process, warm (median of {idle['repeat']}; "
                f"bare: libvirt-python read of domains, networks, pools)",
                f"{idle['kvmctl']['median_s']:.3f} s", f"{idle['bare']['median_s']:.3f} s",
                idle["ratio"], f"<= {TARGET_RATIO}", idle["ratio"] <= TARGET_RATIO)]
    for f in cpu:
        share = f["all_computed_at_60"] * 100
        rows.append(row(
            f"controller idle CPU at a 60 s interval, {f['what']} ({f['domains']} domains; "
            f"computed from --interval {f['interval']:g}, measured there "
            f"{f['all_measured'] * 100:.2f} %; bare: one bare read per 60 s)",
            f"{share:.3f} % of a core",
            f"{bare_cpu[f['what']] / AT_INTERVAL * 100:.3f} % of a core",
            None, f"< {TARGET_SHARE:g} %", share < TARGET_SHARE))
    latency = med([x["visible_s"] for x in push["pushes"]])
    limit = TARGET_LATENCY + direct["call_median_s"]
    rows.append(row(
        f"push -> applied with the webhook (median of {len(push['pushes'])}; bare: the libvirt "
        f"call; `kvmctl apply` of it {direct['apply_median_s']:.3f} s)",
        f"{latency:.3f} s", f"{direct['call_median_s'] * 1000:.1f} ms", None,
        f"< {TARGET_LATENCY:g} s + own cost", latency < limit))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--vms", type=int, default=1000,
                    help="stopped VMs of the idle project (default 1000)")
    ap.add_argument("--repeat", type=int, default=10,
                    help="paired rounds of the in-process idle round (default 10)")
    ap.add_argument("--no-ip", action="store_true",
                    help="no DHCP reservations (default: each VM reserves an address)")
    ap.add_argument("--cpu-interval", type=float, default=10.0, metavar="SECONDS",
                    help="--interval of the controllers whose CPU is sampled (default 10; "
                         "the share at 60 s is computed from it)")
    ap.add_argument("--cpu-rounds", type=int, default=3, metavar="K",
                    help="rounds sampled after the first (default 3)")
    ap.add_argument("--pushes", type=int, default=5,
                    help="pushes timed, and rounds of the change's own cost (default 5)")
    ap.add_argument("--connect", default="qemu:///system", metavar="URI")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE "
                    "(for bench/run)")
    ap.add_argument("--run-id", type=run_id_arg, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vms < 1 or args.repeat < 1 or args.pushes < 1 or args.cpu_rounds < 2:
        ap.error("-n, --repeat and --pushes must be 1 or more, --cpu-rounds 2 or more")
    if args.cpu_interval < 1:
        ap.error("--cpu-interval must be 1 s or more")

    started = time.perf_counter()
    with terminate_as_exit():
        r = ControllerRun(args.connect, args.run_id)
        clean = False
        try:
            measure(r, args)
        finally:
            clean = r.cleanup()
            print(f"bench/controller.py took {time.perf_counter() - started:.0f} s", flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
