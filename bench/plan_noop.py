#!/usr/bin/env python3
"""Benchmark: a no-op `kvmctl plan` over N stopped VMs against a bare libvirt read.

Defines N stopped VMs (default 1000: `kb-<runid>-vm-0001`...; 1 vCPU, 64MiB, direct kernel boot
of /var/cache/kvmctl/test-guest/vmlinuz, one NIC on the NAT network `kb-<runid>-net`, in
project `kb-<runid>`) through `kvmctl apply`, then measures side by side, best of --repeat:

  (a) the whole `kvmctl plan -f DIR --project kb-<runid> --domain-type qemu
      --detailed-exitcode` process (it must exit 0: no changes);
  (b) a bare `python -c` process that opens the connection, lists all domains and reads each
      one's inactive XML with libvirt-python: the floor any tool reading this host pays;

and prints both, their ratio, and the start time of `kvmctl --help`. Then it removes everything
it created (`kvmctl destroy -y`, then a check by name through libvirt-python that removes what is
left), also when a step fails or it is interrupted.

Prints figures only; it never fails on a slow result.

    .venv/bin/python bench/plan_noop.py [-n 1000] [--repeat 5] [--no-ip] [--profile FILE]
        [--compare-python PYTHON]

--profile runs `python -m cProfile -o FILE -m kvmctl plan ...` once more after the timings and
prints the top of it (read it again with `python -m pstats FILE`). --compare-python times
`PYTHON -m kvmctl plan ...` in the same rounds (another kvmctl: a before/after figure).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import pstats
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "/var/cache/kvmctl/test-guest/vmlinuz"
VMS_PER_FILE = 100
# Subnets never to use: the host's own and the examples' (10.213.0.0/16).
RESERVED = (ipaddress.IPv4Network("10.213.0.0/16"), ipaddress.IPv4Network("192.0.2.0/24"))
# The CLI defaults that the environment can change: cleared so runs do not depend on the shell.
_ENV_DROP = ("KVMCTL_PROJECT", "KVMCTL_DOMAIN_TYPE", "KVMCTL_CONNECT", "LIBVIRT_DEFAULT_URI")


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


def timed(argv: Sequence[str], expect: int = 0, tries: int = 3, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> float:
    """Wall time of one whole process in `env` (default: child_env()), which must exit with
    `expect`."""
    start = time.perf_counter()
    proc = subprocess.run(list(argv), capture_output=True, text=True,
                          env=child_env() if env is None else env, stdin=subprocess.DEVNULL,
                          cwd=cwd)
    elapsed = time.perf_counter() - start
    if proc.returncode != expect and tries > 1 and any(m in proc.stderr for m in _VANISHED):
        print(f"  (an object vanished while it was read, running again: "
              f"{proc.stderr.strip().splitlines()[-1][:120]})", flush=True)
        return timed(argv, expect, tries - 1, cwd, env)
    if proc.returncode != expect:
        raise BenchError(f"{' '.join(argv[:4])} ... exited {proc.returncode} (expected "
                         f"{expect}):\n{_tail(proc.stdout)}{_tail(proc.stderr)}")
    return elapsed


def best_of(repeat: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    times = [fn() for _ in range(repeat)]
    return min(times), times


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


def free_subnet(uri: str, prefixlen: int) -> ipaddress.IPv4Network:
    """A subnet of 10.128.0.0/9 with this prefix that overlaps nothing on the host."""
    used = used_subnets(uri)
    candidates = list(ipaddress.IPv4Network("10.128.0.0/9").subnets(new_prefix=prefixlen))
    start = random.randrange(len(candidates))  # concurrent runs rarely pick the same one
    for net in candidates[start:] + candidates[:start]:
        if not any(net.overlaps(u) for u in used):
            return net
    raise BenchError(f"no free /{prefixlen} in 10.128.0.0/9 on this host")


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

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.id = secrets.token_hex(3)
        self.project = f"kb-{self.id}"
        self.prefix = f"kb-{self.id}-"
        self.network = f"{self.prefix}net"
        self.dir = Path(tempfile.mkdtemp(prefix=f"kvmctl-{self.project}-"))
        self.applied_dirs: list[Path] = []

    def vm_name(self, i: int, kind: str = "vm") -> str:
        return f"{self.prefix}{kind}-{i:04d}"

    def env(self) -> dict[str, str]:
        """The environment of this run's kvmctl commands."""
        return child_env()

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
              ips: Sequence[str | None]) -> None:
    write_docs(directory, [vm_yaml(name, network, ip) for name, ip in zip(names, ips,
                                                                         strict=True)])


def write_docs(directory: Path, docs: Sequence[str]) -> None:
    """Manifest documents in `directory`, VMS_PER_FILE a file (vms-000.yaml, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(docs), VMS_PER_FILE):
        (directory / f"vms-{start // VMS_PER_FILE:03d}.yaml").write_text(
            "---\n".join(docs[start:start + VMS_PER_FILE]), encoding="utf-8")


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
    proc = subprocess.run(argv, capture_output=True, text=True, env=child_env(),
                          stdin=subprocess.DEVNULL, cwd=ROOT)
    if proc.returncode != 0:
        raise BenchError(f"profiled plan exited {proc.returncode}:\n{_tail(proc.stderr)}")
    print(f"\nprofile of one `kvmctl plan` (saved in {out}):")
    stats = pstats.Stats(out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(20)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--vms", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5, help="runs of each measurement (best is "
                    "reported)")
    ap.add_argument("--no-ip", action="store_true",
                    help="no DHCP reservations (default: each VM reserves an address)")
    ap.add_argument("--connect", default="qemu:///system", metavar="URI")
    ap.add_argument("--profile", metavar="FILE", help="also profile one plan into FILE")
    ap.add_argument("--compare-python", metavar="PYTHON",
                    help="also time `PYTHON -m kvmctl plan ...` in the same rounds: another "
                         "kvmctl (say, a venv with an older version) for a before/after figure")
    args = ap.parse_args(argv)

    with terminate_as_exit():
        r = Run(args.connect)
        clean = False
        try:
            measure(r, args)
        finally:
            clean = r.cleanup()
    return 0 if clean else 1


def measure(r: Run, args: argparse.Namespace) -> None:
    n = args.vms
    subnet = free_subnet(r.uri, 20 if n < 2000 else 16)
    print(f"run {r.id}: project {r.project}, {n} stopped VMs on network {r.network} "
          f"({subnet}{', no reservations' if args.no_ip else ', one reservation each'}), "
          f"manifests in {r.dir}", flush=True)
    (r.dir / "network.yaml").write_text(network_yaml(r.network, subnet), encoding="utf-8")
    names = [r.vm_name(i) for i in range(1, n + 1)]
    write_vms(r.dir, names, r.network, vm_ips(subnet, n, not args.no_ip))

    print("defining them: kvmctl apply -y ...", flush=True)
    elapsed = r.apply(r.dir)
    print(f"  apply of {n} VMs and 1 network: {elapsed:.2f} s", flush=True)

    plan = r.kvmctl("plan", "-f", str(r.dir), "--detailed-exitcode")
    bare = [sys.executable, "-c", BARE_READ, r.uri]
    count = int(run(bare).stdout.strip())
    help_cmd = kvmctl_command() + ["--help"]
    bare_start = [sys.executable, "-c", "pass"]

    # Interleaved, so a change in host load hits both sides alike.
    other = [args.compare_python, "-m", "kvmctl"] + plan[len(kvmctl_command()):] \
        if args.compare_python else None
    plan_times: list[float] = []
    bare_times: list[float] = []
    other_times: list[float] = []
    for i in range(args.repeat):
        plan_times.append(timed(plan))
        bare_times.append(timed(bare))
        if other:  # run elsewhere: `-m kvmctl` in the checkout would import the checkout's
            other_times.append(timed(other, cwd=r.dir))
        print(f"  round {i + 1}/{args.repeat}: plan {plan_times[-1]:.3f} s, bare read "
              f"{bare_times[-1]:.3f} s"
              + (f", {args.compare_python} plan {other_times[-1]:.3f} s" if other else ""),
              flush=True)
    help_best, _ = best_of(args.repeat, lambda: timed(help_cmd))
    python_best, _ = best_of(args.repeat, lambda: timed(bare_start))

    plan_best, bare_best = min(plan_times), min(bare_times)
    ratio = plan_best / bare_best
    print(f"\nno-op plan of {n} stopped VMs ({count} domains on the host), best of "
          f"{args.repeat}:")
    print(f"  (a) kvmctl plan --detailed-exitcode (exit 0): {plan_best:8.3f} s")
    print(f"  (b) bare libvirt-python list + inactive XML:  {bare_best:8.3f} s")
    print(f"  ratio a/b: {ratio:.2f} (target <= 3, aim 1.5): "
          f"{'meets the target' if ratio <= 3 else 'MISSES the target'}")
    if other_times:
        print(f"  {args.compare_python} -m kvmctl plan: {min(other_times):.3f} s, ratio to (b) "
              f"{min(other_times) / bare_best:.2f}")
    print(f"  kvmctl --help: {help_best:.3f} s   (python -c pass: {python_best:.3f} s)")
    if args.profile:
        profile(r, args.profile)


if __name__ == "__main__":
    sys.exit(main())
