#!/usr/bin/env python3
"""Benchmark: a no-op `kvmctl plan` over N stopped VMs against a bare libvirt read, at scales.

Defines stopped VMs (`kb-<runid>-vm-0001`...; 1 vCPU, 64MiB, direct kernel boot of
/var/cache/kvmctl/test-guest/vmlinuz, one NIC on the NAT network `kb-<runid>-net`, in project
`kb-<runid>`) through `kvmctl apply`, growing the set scale by scale (--scales 1000,3000,10000:
apply 1000, measure, add 2000, measure, add 7000, measure). At each scale, after one untimed
plan that fills the warm memo, --repeat paired rounds (every other round in reverse order) time:

  (a) the whole `kvmctl plan -f DIR --project kb-<runid> --domain-type qemu
      --detailed-exitcode` process (it must exit 0: no changes), cold (KVMCTL_NO_CACHE=1 and an
      empty fresh XDG_CACHE_HOME/KVMCTL_CACHE_DIR for each run) and warm (a memo of the run's
      own, KVMCTL_CACHE_DIR, filled by the untimed plan);
  (b) a bare `python -c` process that opens the connection, lists all domains and reads each
      one's inactive XML with libvirt-python: the floor any tool reading this host pays;

and prints one table: medians with the min beside, ratios to (b), CPU time and max RSS of each
process (os.wait4), and the cost per VM. Then it removes everything it created
(`kvmctl destroy -y`, then a check by name through libvirt-python that removes what is left),
also when a step fails or it is interrupted.

Prints figures only; it never fails on a slow result.

    .venv/bin/python bench/plan_noop.py [--scales 1000[,3000,...]] [--repeat 5] [--no-ip]
        [--profile FILE] [--compare-python PYTHON] [--json FILE]

--profile runs `python -m cProfile -o FILE -m kvmctl plan ...` once more at the largest scale
and prints the top of it (read it again with `python -m pstats FILE`). --compare-python times
`PYTHON -m kvmctl plan ...` (cold) in the same rounds (another kvmctl: a before/after figure).
--json writes the figures for bench/run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import os
import pstats
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "/var/cache/kvmctl/test-guest/vmlinuz"
VMS_PER_FILE = 100
# Subnets never to use: the host's own and the examples' (10.213.0.0/16).
RESERVED = (ipaddress.IPv4Network("10.213.0.0/16"), ipaddress.IPv4Network("192.0.2.0/24"))
# The CLI defaults that the environment can change: cleared so runs do not depend on the shell.
_ENV_DROP = ("KVMCTL_PROJECT", "KVMCTL_DOMAIN_TYPE", "KVMCTL_CONNECT", "LIBVIRT_DEFAULT_URI",
             "KVMCTL_NO_CACHE", "KVMCTL_CACHE_DIR", "XDG_CACHE_HOME")


# ---- processes ----------------------------------------------------------------------------------

def kvmctl_command() -> list[str]:
    """The installed `kvmctl` entry point beside this interpreter, else `python -m kvmctl`."""
    script = Path(sys.executable).with_name("kvmctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvmctl"]


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _ENV_DROP}


def run(argv: Sequence[str], check: bool = True, quiet: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`argv` in `env` (default: child_env())."""
    proc = subprocess.run(list(argv), capture_output=True, text=True,
                          env=child_env() if env is None else env, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n"
                         f"{_tail(proc.stdout)}{_tail(proc.stderr)}")
    if not quiet:
        sys.stdout.write(proc.stdout)
    return proc


def _tail(text: str, lines: int = 15) -> str:
    kept = text.splitlines()[-lines:]
    return "".join(line + "\n" for line in kept)


# Other programs may define and undefine domains while a run reads them: a domain listed and
# gone before its XML is read fails that one read. Such a round is run again.
_VANISHED = ("Domain not found", "Network not found", "no domain with matching",
             "no network with matching")


@dataclass(frozen=True)
class Sample:
    """One whole child process: wall time, CPU time (user + system) and max RSS (os.wait4)."""

    wall: float
    cpu: float
    maxrss_kib: int


# The launcher of every measured process: `python -S -I -c SPAWN REPORT ARGV...` forks, execs
# ARGV in the child, reaps it with os.wait4 and writes its wall time, CPU time and max RSS to
# the file REPORT; it exits with the child's exit code. A child forked straight from this
# benchmark would start as a copy of it (libvirt, lxml, and at 10k VMs a lot of data), and
# Linux counts the memory a process had before its exec in its ru_maxrss. Forked from this
# small process, a child starts from about 8 MB, less than any Python program uses.
SPAWN = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        print(f"cannot run {sys.argv[2]}: {exc}", file=sys.stderr)
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    f.write(f"{wall!r} {usage.ru_utime + usage.ru_stime!r} {usage.ru_maxrss}")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a launcher and its child (their own process group): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def measured(argv: Sequence[str], expect: int = 0, tries: int = 3, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> Sample:
    """One whole process in `env` (default: child_env()), which must exit with `expect`: its
    wall time, and its CPU time and max RSS as os.wait4 reports them for it (see SPAWN)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", prefix="kvmctl-bench-", suffix=".usage") as usage:
        proc = subprocess.Popen([sys.executable, "-S", "-I", "-c", SPAWN, usage.name, *argv],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=child_env() if env is None else env, cwd=cwd,
                                process_group=0)
        try:
            returncode = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: the child goes too, before the cleanup
            _stop(proc)
            raise
        report = usage.read().split()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if len(report) != 3:
        raise BenchError(f"the launcher of {' '.join(argv[:4])} ... exited {returncode} "
                         f"without a report:\n{_tail(stderr)}")
    if returncode != expect and tries > 1 and any(m in stderr for m in _VANISHED):
        print(f"  (an object vanished while it was read, running again: "
              f"{stderr.strip().splitlines()[-1][:120]})", flush=True)
        return measured(argv, expect, tries - 1, cwd, env)
    if returncode != expect:
        raise BenchError(f"{' '.join(argv[:4])} ... exited {returncode} (expected "
                         f"{expect}):\n{_tail(stdout)}{_tail(stderr)}")
    return Sample(float(report[0]), float(report[1]), int(report[2]))


def timed(argv: Sequence[str], expect: int = 0, tries: int = 3, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> float:
    """Wall time of one whole process (see measured)."""
    return measured(argv, expect, tries, cwd, env).wall


# A step of paired rounds: its key, and what runs it once (a fresh environment each time).
Step = tuple[str, Callable[[], Sample]]


def paired_rounds(steps: Sequence[Step], repeat: int,
                  report: Callable[[int, dict[str, list[Sample]]], None] | None = None,
                  ) -> dict[str, list[Sample]]:
    """`repeat` rounds that run every step once, every other round in reverse order, so that a
    change in the host's load hits all steps alike. key -> one Sample per round."""
    samples: dict[str, list[Sample]] = {key: [] for key, _ in steps}
    for i in range(repeat):
        for key, step in (steps if i % 2 == 0 else steps[::-1]):
            samples[key].append(step())
        if report is not None:
            report(i, samples)
    return samples


@dataclass(frozen=True)
class Summary:
    """Samples of one step: median and min wall time, median CPU time, peak max RSS."""

    median: float
    min: float
    cpu: float
    maxrss_mb: float

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Summary:
        return cls(statistics.median(s.wall for s in samples), min(s.wall for s in samples),
                   statistics.median(s.cpu for s in samples),
                   max(s.maxrss_kib for s in samples) * 1024 / 1e6)


def paired_ratio(a: Sequence[Sample], b: Sequence[Sample]) -> float:
    """The median over the rounds of a / b of the same round."""
    return statistics.median(x.wall / y.wall for x, y in zip(a, b, strict=True))


def row(what: str, kvmctl: str, bare: str, ratio: float | None, target: str,
        met: bool | None) -> dict[str, object]:
    """One line of bench/run's table."""
    return {"what": what, "kvmctl": kvmctl, "bare": bare, "ratio": ratio, "target": target,
            "met": met}


def write_json(path: str | None, rows: Sequence[dict[str, object]], **extra: object) -> None:
    """The figures for bench/run (--json FILE)."""
    if path:
        Path(path).write_text(json.dumps({"rows": list(rows), **extra}, indent=1),
                              encoding="utf-8")


def fresh_cache_env(env: dict[str, str], parent: Path) -> dict[str, str]:
    """`env` for a cold kvmctl: no memo (KVMCTL_NO_CACHE=1), and an empty new folder below
    `parent` as its XDG_CACHE_HOME and KVMCTL_CACHE_DIR."""
    parent.mkdir(parents=True, exist_ok=True)
    empty = tempfile.mkdtemp(prefix="cold-", dir=parent)
    return {**env, "KVMCTL_NO_CACHE": "1", "XDG_CACHE_HOME": empty, "KVMCTL_CACHE_DIR": empty}


def warm_cache_env(env: dict[str, str], cache_dir: Path) -> dict[str, str]:
    """`env` for a warm kvmctl: the memo in `cache_dir` (XDG_CACHE_HOME beside it)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    xdg = cache_dir.with_name(cache_dir.name + "-xdg")
    xdg.mkdir(exist_ok=True)
    return {k: v for k, v in env.items() if k != "KVMCTL_NO_CACHE"} | {
        "KVMCTL_CACHE_DIR": str(cache_dir), "XDG_CACHE_HOME": str(xdg)}


class BenchError(Exception):
    pass


# ---- the host -----------------------------------------------------------------------------------

def ip_subnets(*wrapper: str) -> list[ipaddress.IPv4Network]:
    """The IPv4 subnets of this machine's routes and addresses; `wrapper` runs `ip` elsewhere
    (`nsenter -t PID -n`: in a network namespace)."""
    used: list[ipaddress.IPv4Network] = []
    for args in (["route", "show", "table", "all"], ["-4", "addr"]):
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            out = subprocess.run([*wrapper, "ip", "-j", *args], capture_output=True, text=True,
                                 check=True).stdout
            for entry in json.loads(out or "[]"):
                dst = entry.get("dst")
                if dst and dst != "default" and ":" not in dst:
                    with contextlib.suppress(ValueError):
                        used.append(ipaddress.IPv4Network(dst, strict=False))
                for addr in entry.get("addr_info", ()):
                    if addr.get("family") == "inet":
                        used.append(ipaddress.IPv4Network(
                            f"{addr['local']}/{addr.get('prefixlen', 32)}", strict=False))
    return used


def used_subnets(uri: str) -> list[ipaddress.IPv4Network]:
    """Every IPv4 subnet the host routes or has addresses in, and every libvirt network's."""
    used: list[ipaddress.IPv4Network] = list(RESERVED) + ip_subnets()
    import libvirt
    from lxml import etree
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(uri)
    try:
        for net in conn.listAllNetworks(0):
            for ip in etree.fromstring(net.XMLDesc(0).encode()).iterfind("ip"):
                if ip.get("family", "ipv4") != "ipv4" or not ip.get("address"):
                    continue
                mask = ip.get("prefix") or ip.get("netmask") or "24"
                used.append(ipaddress.IPv4Network(f"{ip.get('address')}/{mask}", strict=False))
    finally:
        conn.close()
    return used


def free_subnet(uri: str, prefixlen: int,
                exclude: Sequence[ipaddress.IPv4Network] = ()) -> ipaddress.IPv4Network:
    """A subnet of 10.128.0.0/9 with this prefix that overlaps nothing on the host, nor
    `exclude`."""
    used = used_subnets(uri) + list(exclude)
    candidates = list(ipaddress.IPv4Network("10.128.0.0/9").subnets(new_prefix=prefixlen))
    start = random.randrange(len(candidates))  # concurrent runs rarely pick the same one
    for net in candidates[start:] + candidates[:start]:
        if not any(net.overlaps(u) for u in used):
            return net
    raise BenchError(f"no free /{prefixlen} in 10.128.0.0/9 on this host")


def lock_records(uri: str, prefix: str, remove: bool = False) -> list[str]:
    """Hypervisor-lock records (volumes of kvmctl's pool kvmctl-locks) whose name starts with
    `prefix`; with `remove`, deleted too."""
    import libvirt

    from kvmctl.host.leases import POOL_NAME
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(uri)
    try:
        try:
            pool = conn.storagePoolLookupByName(POOL_NAME)
        except libvirt.libvirtError:
            return []
        if not pool.isActive():
            return []
        pool.refresh(0)
        found = []
        for vol in pool.listAllVolumes(0):
            if vol.name().startswith(prefix):
                found.append(f"lock record {vol.name()}")
                if remove:
                    with contextlib.suppress(libvirt.libvirtError):
                        vol.delete(0)
        return found
    finally:
        conn.close()


def leftovers(uri: str, prefix: str) -> list[str]:
    """libvirt objects whose name starts with `prefix` (domains, networks, pools)."""
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(uri)
    try:
        found = [f"domain {d.name()}" for d in conn.listAllDomains(0)
                 if d.name().startswith(prefix)]
        found += [f"network {n.name()}" for n in conn.listAllNetworks(0)
                  if n.name().startswith(prefix)]
        found += [f"pool {p.name()}" for p in conn.listAllStoragePools(0)
                  if p.name().startswith(prefix)]
        return found
    finally:
        conn.close()


def remove_by_prefix(uri: str, prefix: str) -> list[str]:
    """Power off and undefine domains, stop and undefine networks named `prefix`*; the fallback
    when `kvmctl destroy` did not remove everything. Returns what it removed."""
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(uri)
    removed = []
    try:
        for dom in conn.listAllDomains(0):
            if not dom.name().startswith(prefix):
                continue
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                                  | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                removed.append(f"domain {dom.name()}")
        for net in conn.listAllNetworks(0):
            if not net.name().startswith(prefix):
                continue
            with contextlib.suppress(libvirt.libvirtError):
                if net.isActive():
                    net.destroy()
                net.undefine()
                removed.append(f"network {net.name()}")
    finally:
        conn.close()
    return removed


def remove_lock_files(project: str) -> None:
    """The project lock files `kvmctl apply/destroy` leave in the lock directory."""
    lock_dir = Path(os.environ.get("KVMCTL_LOCK_DIR", "/run/lock/kvmctl"))
    for path in lock_dir.glob(f"{project}-*.lock"):
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit, so `finally` blocks (the cleanup) still run."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Run:
    """One benchmark run: its id, project, network, manifest directory and cleanup."""

    def __init__(self, uri: str, run_id: str | None = None) -> None:
        self.uri = uri
        self.id = run_id or secrets.token_hex(3)
        self.project = f"kb-{self.id}"
        self.prefix = f"kb-{self.id}-"
        self.network = f"{self.prefix}net"
        self.dir = Path(tempfile.mkdtemp(prefix=f"kvmctl-{self.project}-"))
        self.applied_dirs: list[Path] = []

    def vm_name(self, i: int, kind: str = "vm") -> str:
        return f"{self.prefix}{kind}-{i:04d}"

    def base_env(self) -> dict[str, str]:
        """The environment of this run's kvmctl commands, before the cache settings."""
        return child_env()

    def env(self) -> dict[str, str]:
        """A cold kvmctl's environment (see fresh_cache_env): every kvmctl command of a run,
        unless it is timed warm, so that none reads or fills a memo outside the run."""
        return fresh_cache_env(self.base_env(), self.dir / "state" / "cold")

    def warm_env(self, name: str) -> dict[str, str]:
        """A warm kvmctl's environment: the run's own memo folder `name`."""
        return warm_cache_env(self.base_env(), self.dir / "state" / name)

    def kvmctl(self, *args: str) -> list[str]:
        return kvmctl_command() + list(args) + ["--connect", self.uri, "--project",
                                                self.project, "--domain-type", "qemu"]

    def apply(self, directory: Path) -> float:
        self.applied_dirs.append(directory)
        return timed(self.kvmctl("apply", "-y", "-f", str(directory)), env=self.env())

    def destroy_applied(self) -> None:
        """`kvmctl destroy -y` of each applied directory, the last first; failures are printed
        (what is left is looked for by name afterwards)."""
        for directory in reversed(self.applied_dirs):
            try:
                proc = run(self.kvmctl("destroy", "-y", "-f", str(directory)), check=False,
                           env=self.env())
                if proc.returncode != 0:
                    print(f"  kvmctl destroy exited {proc.returncode}:\n"
                          f"{_tail(proc.stderr, 5)}", end="", flush=True)
            except OSError as exc:
                print(f"  kvmctl destroy could not run: {exc}", flush=True)

    def cleanup(self) -> bool:
        """Remove everything of this run; True when nothing named kb-<runid>-* is left."""
        print(f"cleanup: kvmctl destroy -y (project {self.project})...", flush=True)
        self.destroy_applied()
        try:
            left = leftovers(self.uri, self.prefix)
            if left:
                print(f"  {len(left)} object(s) left after destroy, removing them through "
                      f"libvirt: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}",
                      flush=True)
                remove_by_prefix(self.uri, self.prefix)
                left = leftovers(self.uri, self.prefix)
        except Exception as exc:  # noqa: BLE001 - report, never hide the original failure
            print(f"  cannot check for leftovers: {type(exc).__name__}: {exc}", flush=True)
            return False
        remove_lock_files(self.project)
        shutil.rmtree(self.dir, ignore_errors=True)
        if left:
            print(f"  NOT REMOVED: {', '.join(left)}", flush=True)
            return False
        print(f"  nothing named {self.prefix}* is left", flush=True)
        return True


def other_pytests() -> int:
    """Running pytest processes on this machine (a test suite sharing CPUs and libvirtds)."""
    found = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"pytest" in cmdline.read_bytes():
                found += 1
    return found


# ---- manifests ----------------------------------------------------------------------------------

def network_yaml(name: str, subnet: ipaddress.IPv4Network) -> str:
    hosts = list(subnet.hosts())
    # DHCP range in the top half; reserved addresses (if any) come from the bottom half.
    return f"""apiVersion: kvmctl/v1
kind: Network
metadata:
  name: {name}
spec:
  mode: nat
  ipv4:
    cidr: {subnet}
    dhcp:
      start: {hosts[len(hosts) // 2]}
      end: {hosts[-1]}
"""


def vm_yaml(name: str, network: str, ip: str | None, host: str | None = None,
            bench: str = "plan-noop") -> str:
    """A stopped VM's manifest: `ip` is its DHCP reservation, `host` its spec.host, `bench` the
    value of its label `bench` (which benchmark made it)."""
    return f"""apiVersion: kvmctl/v1
kind: VirtualMachine
metadata:
  name: {name}
  labels:
    bench: {bench}
spec:{f'''
  host: {host}''' if host else ''}
  cpus: 1
  memory: 64MiB
  boot:
    kernel: {KERNEL}
    cmdline: console=ttyS0
  interfaces:
    - network: {network}{f'''
      ip: {ip}''' if ip else ''}
  state: stopped
"""


def write_vms(directory: Path, names: Sequence[str], network: str,
              ips: Sequence[str | None], stem: str = "vms") -> None:
    write_docs(directory, [vm_yaml(name, network, ip) for name, ip in zip(names, ips,
                                                                         strict=True)], stem)


def write_docs(directory: Path, docs: Sequence[str], stem: str = "vms") -> None:
    """Manifest documents in `directory`, VMS_PER_FILE a file (STEM-000.yaml, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(docs), VMS_PER_FILE):
        (directory / f"{stem}-{start // VMS_PER_FILE:03d}.yaml").write_text(
            "---\n".join(docs[start:start + VMS_PER_FILE]), encoding="utf-8")


def reservations(prefixlen: int) -> int:
    """How many reservations a network of this prefix holds here (vm_ips: the bottom half of
    its addresses, without the gateway)."""
    return int((2 ** (32 - prefixlen) - 2) // 2 - 1)


def prefix_for(count: int) -> int:
    """The longest prefix, /24 to /16, whose network holds `count` reservations."""
    return next((p for p in range(24, 16, -1) if reservations(p) >= count), 16)


def vm_ips(subnet: ipaddress.IPv4Network, count: int, reserve: bool) -> list[str | None]:
    if not reserve:
        return [None] * count
    hosts = list(subnet.hosts())
    usable = hosts[1:len(hosts) // 2]  # hosts[0] is the gateway; the top half is DHCP's
    if count > len(usable):
        raise BenchError(f"{count} reservations do not fit in {subnet}; use --no-ip")
    return [str(ip) for ip in usable[:count]]


# ---- the measurements ---------------------------------------------------------------------------

# argv[1:]: URIs, read one after another, each on its own connection; prints a count for each.
BARE_READ = """
import sys, libvirt
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
counts = []
for uri in sys.argv[1:]:
    conn = libvirt.open(uri)
    n = 0
    for dom in conn.listAllDomains(0):
        try:
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        except libvirt.libvirtError:  # undefined since it was listed
            continue
        n += 1
    conn.close()
    counts.append(n)
print(*counts)
"""


def profile(r: Run, out: str, top: int = 35) -> None:
    argv = [sys.executable, "-m", "cProfile", "-o", out, "-m", "kvmctl", "plan", "-f",
            str(r.dir), "--connect", r.uri, "--project", r.project, "--domain-type", "qemu",
            "--detailed-exitcode"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=r.env(),
                          stdin=subprocess.DEVNULL, cwd=ROOT)
    if proc.returncode != 0:
        raise BenchError(f"profiled plan exited {proc.returncode}:\n{_tail(proc.stderr)}")
    print(f"\nprofile of one cold `kvmctl plan` (saved in {out}):")
    stats = pstats.Stats(out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(20)


def scales_arg(text: str) -> list[int]:
    """--scales 1000,3000,10000: VM counts, ascending, each above 1."""
    try:
        scales = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not scales or scales[0] < 2:
        raise argparse.ArgumentTypeError("each scale must be 2 or more")
    return scales


def run_id_arg(text: str) -> str:
    """--run-id: bench/run's run id, 6 hex digits, as a run picks its own."""
    if not re.fullmatch(r"[0-9a-f]{6}", text):
        raise argparse.ArgumentTypeError("a run id is 6 lower-case hex digits")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=scales_arg, default=None, metavar="N[,N...]",
                    help="VM counts, measured one after another on one growing set "
                         "(default: 1000)")
    ap.add_argument("-n", "--vms", type=int, default=None,
                    help="one scale: the same as --scales N")
    ap.add_argument("--repeat", type=int, default=5, help="paired rounds at each scale "
                    "(medians are reported, with the min beside)")
    ap.add_argument("--no-ip", action="store_true",
                    help="no DHCP reservations (default: each VM reserves an address)")
    ap.add_argument("--connect", default="qemu:///system", metavar="URI")
    ap.add_argument("--profile", metavar="FILE",
                    help="also profile one cold plan at the largest scale into FILE")
    ap.add_argument("--compare-python", metavar="PYTHON",
                    help="also time `PYTHON -m kvmctl plan ...` (cold) in the same rounds: "
                         "another kvmctl (say, a venv with an older version) for a "
                         "before/after figure")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE "
                    "(for bench/run)")
    ap.add_argument("--run-id", type=run_id_arg, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.scales is None:
        args.scales = scales_arg(str(args.vms or 1000))
    elif args.vms is not None:
        ap.error("give --scales or -n, not both")
    if args.repeat < 1:
        ap.error("--repeat must be 1 or more")

    with terminate_as_exit():
        r = Run(args.connect, args.run_id)
        clean = False
        try:
            measure(r, args)
        finally:
            clean = r.cleanup()
    return 0 if clean else 1


TARGET_RATIO = 1.5
TARGET_RSS_MB = 400.0  # at TARGET_RSS_AT VMs
TARGET_RSS_AT = 10_000


def measure(r: Run, args: argparse.Namespace) -> None:
    scales: list[int] = args.scales
    reserve = not args.no_ip
    steps_vms = [n - m for n, m in zip(scales, [0, *scales[:-1]], strict=True)]
    addressing = ((f"one DHCP reservation each, on {len(scales)} network(s), one per growth "
                   f"step ({' + '.join(map(str, steps_vms))} VMs)") if reserve
                  else f"no DHCP reservations, {len(scales)} network(s), one per growth step")
    print(f"run {r.id}: project {r.project}, up to {scales[-1]} stopped VMs (scales "
          f"{', '.join(map(str, scales))}; {addressing}), manifests in {r.dir}", flush=True)
    r.applied_dirs.append(r.dir)  # the cleanup destroys it, also when the first apply fails

    plan = r.kvmctl("plan", "-f", str(r.dir), "--detailed-exitcode")
    bare = [sys.executable, "-c", BARE_READ, r.uri]
    other = [args.compare_python, "-m", "kvmctl"] + plan[len(kvmctl_command()):] \
        if args.compare_python else None
    results: list[tuple[int, int, dict[str, list[Sample]]]] = []
    subnets: list[ipaddress.IPv4Network] = []
    defined = 0
    for step, n in enumerate(scales, 1):
        # Each growth step has a network of its own, defined with its VMs' reservations in
        # one go: adding them to a running network instead costs libvirt a dnsmasq restart,
        # about 0.65 s, per reservation.
        network = r.network if step == 1 else f"{r.network}{step}"
        subnet = free_subnet(r.uri, prefix_for(n - defined) if reserve else 24, subnets)
        subnets.append(subnet)
        (r.dir / ("network.yaml" if step == 1 else f"network-{step}.yaml")).write_text(
            network_yaml(network, subnet), encoding="utf-8")
        write_vms(r.dir, [r.vm_name(i) for i in range(defined + 1, n + 1)], network,
                  vm_ips(subnet, n - defined, reserve), stem=f"vms-{step}")
        print(f"\nscale {n}: kvmctl apply -y of {n - defined} more VMs and the network "
              f"{network} ({subnet}) ...", flush=True)
        elapsed = timed(r.kvmctl("apply", "-y", "-f", str(r.dir)), env=r.env())
        print(f"  apply: {elapsed:.2f} s ({n} VMs defined now)", flush=True)
        defined = n
        count = int(run(bare).stdout.strip())
        cache = f"cache-{n}"
        # Untimed: fills the warm memo (its own for each scale), and makes sure the first
        # timed round pays no first-use cost of the host.
        timed(plan, env=r.warm_env(cache))

        steps: list[Step] = [
            ("cold", lambda: measured(plan, env=r.env())),  # a fresh empty folder each run
            ("warm", functools.partial(measured, plan, env=r.warm_env(cache))),
            ("bare", lambda: measured(bare))]
        if other:  # run elsewhere: `-m kvmctl` in the checkout would import the checkout's
            steps.append(("other", lambda: measured(other, env=r.env(), cwd=r.dir)))

        def report(i: int, got: dict[str, list[Sample]]) -> None:
            print(f"  round {i + 1}/{args.repeat}: plan cold {got['cold'][-1].wall:.3f} s, "
                  f"warm {got['warm'][-1].wall:.3f} s, bare read {got['bare'][-1].wall:.3f} s"
                  + (f", {args.compare_python} plan {got['other'][-1].wall:.3f} s"
                     if other else ""), flush=True)

        results.append((n, count, paired_rounds(steps, args.repeat, report)))

    print_table(results, args, addressing)
    write_json(args.json, json_rows(results, reserve), addressing=addressing,
               scales=scales, repeat=args.repeat)
    if args.profile:
        profile(r, args.profile)


LABELS = {"bare": "(b) bare read", "cold": "(a) plan, cold", "warm": "(a) plan, warm",
          "other": "--compare-python plan, cold"}


def print_table(results: Sequence[tuple[int, int, dict[str, list[Sample]]]],
                args: argparse.Namespace, addressing: str) -> None:
    print(f"\nno-op plan of N stopped VMs ({addressing}), median of {args.repeat} paired "
          "rounds, min beside; ratio = median / median of (b); paired = median over the "
          "rounds of (a) / (b) of the same round; CPU = user + system (median); RSS = the "
          "highest max RSS of the process over the rounds")
    print("| VMs | domains | what | median s | min s | ratio | paired | ms/VM | CPU s "
          "| max RSS MB |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, count, samples in results:
        floor = Summary.of(samples["bare"]).median
        for key in ("bare", "cold", "warm", "other"):
            if key not in samples:
                continue
            s = Summary.of(samples[key])
            paired = "" if key == "bare" else f"{paired_ratio(samples[key], samples['bare']):.2f}"
            print(f"| {n} | {count} | {LABELS[key]} | {s.median:.3f} | {s.min:.3f} | "
                  f"{s.median / floor:.2f} | {paired} | {s.median * 1000 / n:.3f} | "
                  f"{s.cpu:.3f} | {s.maxrss_mb:.0f} |")
    for n, _, samples in results:
        for key in ("cold", "warm"):
            ratio = Summary.of(samples[key]).median / Summary.of(samples["bare"]).median
            print(f"  {n} VMs, {key}: ratio {ratio:.2f} (target <= {TARGET_RATIO}): "
                  f"{'met' if ratio <= TARGET_RATIO else 'MISSED'}")
    n, _, samples = results[-1]
    rss = max(Summary.of(samples[k]).maxrss_mb for k in ("cold", "warm"))
    if n == TARGET_RSS_AT:
        print(f"  peak memory of kvmctl plan at {n} VMs: {rss:.0f} MB (target <= "
              f"{TARGET_RSS_MB:.0f} MB): {'met' if rss <= TARGET_RSS_MB else 'MISSED'}")
    else:
        print(f"  peak memory of kvmctl plan at {n} VMs: {rss:.0f} MB (the target, <= "
              f"{TARGET_RSS_MB:.0f} MB, is for {TARGET_RSS_AT} VMs)")


def json_rows(results: Sequence[tuple[int, int, dict[str, list[Sample]]]],
              reserve: bool) -> list[dict[str, object]]:
    rows = []
    for n, count, samples in results:
        b = Summary.of(samples["bare"])
        for key in ("cold", "warm"):
            a = Summary.of(samples[key])
            ratio = a.median / b.median
            rows.append(row(f"no-op plan, {n} VMs, {key} (median; {a.median * 1000 / n:.2f} "
                            f"ms/VM)", f"{a.median:.3f} s", f"{b.median:.3f} s", ratio,
                            f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO))
        rss = max(Summary.of(samples[k]).maxrss_mb for k in ("cold", "warm"))
        at_target = n == TARGET_RSS_AT
        kind = "a DHCP reservation each" if reserve else "no reservations"
        rows.append(row(f"peak memory (max RSS) of kvmctl plan, {n} VMs ({count} domains; "
                        f"{kind})", f"{rss:.0f} MB", f"{b.maxrss_mb:.0f} MB",
                        rss / b.maxrss_mb,
                        f"<= {TARGET_RSS_MB:.0f} MB" if at_target else
                        f"(<= {TARGET_RSS_MB:.0f} MB at {TARGET_RSS_AT})",
                        rss <= TARGET_RSS_MB if at_target else None))
    return rows


if __name__ == "__main__":
    sys.exit(main())
