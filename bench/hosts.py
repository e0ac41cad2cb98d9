#!/usr/bin/env python3
"""Benchmark: one project over the three test hosts (scripts/test-hosts: h1 over qemu+unix, h2
and h3 over qemu+ssh), against bare libvirt-python processes.

Starts the test hosts if need be (`scripts/test-hosts up 3`; stopped again at the end if none
ran before, as the test suite does) and writes a project file `kvmctl.yaml` (project
`kb-<runid>`, hosts h1-h3, domainType qemu) with one isolated network `kb-<runid>-net` on all
hosts (`spec.hosts: all`, a free /24 of 10.0.0.0/8). Then:

  1. defines N stopped VMs (default 300, `kb-<runid>-vm-NNNN`, `spec.host` h1, h2, h3 in turn)
     and times, in --repeat paired rounds (default 5):
       (a) the whole `kvmctl plan --detailed-exitcode` process (it must exit 0), cold
           (KVMCTL_NO_CACHE=1 and an empty cache folder for each run) and warm (a memo of this
           run's own, filled by one untimed plan);
       (b) per host, a bare `python -c` process that connects to that host, lists all domains
           and reads each one's inactive XML (plan_noop.py's bare read);
       (c) one bare process that does (b) for h1, h2 and h3 one after another;
     and compares (a) with the slowest host's (b): kvmctl reads the hosts in parallel, so
     that is its floor, where (c) is what a tool reading them one by one pays.
  2. removes those VMs, then, --apply-repeat rounds (default 3), times
       (a) the whole `kvmctl apply -y` process (cold) that defines M new stopped VMs
           (default 100) spread over the hosts (the network is there and unchanged); then
           `kvmctl destroy`;
       (b) a bare `python -c` process that defines the same XML (`kvmctl render`, renamed
           `kb-<runid>-raw-NNNN`) with virDomainDefineXMLFlags(VALIDATE) on the same hosts,
           the same number per host: one thread per host, in parallel, each defining its
           host's VMs one after another on its own connection; then undefines them.

Medians are reported, with ratios. Everything it creates, on every host, is removed at the end,
also when a step fails or it is interrupted: `kvmctl destroy -y`, then a check by name on each
host that removes what is left, and the run's hypervisor-lock records in `kvmctl-locks`.

Prints figures only; it never fails on a slow result.

    .venv/bin/python bench/hosts.py [--vms 300] [--repeat 5] [--apply-vms 100]
        [--apply-repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The other benchmarks' helpers, and the test suite's handle on scripts/test-hosts.
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "integration")]

from apply_new import count_domains, rendered_vms, undefine_all  # noqa: E402
from plan_noop import (  # noqa: E402
    BARE_READ,
    BenchError,
    child_env,
    ip_subnets,
    kvmctl_command,
    leftovers,
    lock_records,
    other_pytests,
    remove_by_prefix,
    remove_lock_files,
    row,
    run,
    run_id_arg,
    terminate_as_exit,
    timed,
    used_subnets,
    vm_yaml,
    write_docs,
    write_json,
)
from plan_noop import Run as SingleHostRun  # noqa: E402
from testhosts import TestHost  # noqa: E402
from testhosts import hosts as test_hosts  # noqa: E402
from testhosts import running as running_test_hosts  # noqa: E402

TEST_HOSTS = ROOT / "scripts" / "test-hosts"
HOSTS = 3
# The integration tests' subnet registry (tests/integration/conftest.py, SubnetAllocator): the
# test suite's multi-host tests put their networks on these same hosts, so this run registers
# its subnet there too, and avoids theirs.
SUBNET_DIR = Path("/run/kvmctl-tests")
NEVER = (ipaddress.IPv4Network("10.0.0.0/16"), ipaddress.IPv4Network("10.213.0.0/16"))
TARGET_RATIO = 1.5  # no-op plan / the slowest host's bare read

# (b) of part 2: argv[1] is a JSON file {uri: [xml, ...]}; one thread per host, defines in turn.
BARE_DEFINE_PARALLEL = """
import json, sys, threading, libvirt
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
with open(sys.argv[1], encoding="utf-8") as f:
    work = json.load(f)
errors = []
def define(uri, xmls):
    try:
        conn = libvirt.open(uri)
        for xml in xmls:
            conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        conn.close()
    except Exception as exc:
        errors.append(f"{uri}: {exc}")
threads = [threading.Thread(target=define, args=item) for item in work.items()]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    sys.exit("\\n".join(errors))
"""


# ---- the test hosts -----------------------------------------------------------------------------

def start_test_hosts() -> tuple[list[TestHost], bool]:
    """h1..h3 of scripts/test-hosts, started if need be; and whether none ran before (then this
    run stops them at its end)."""
    before = running_test_hosts()
    try:
        hosts = test_hosts(HOSTS)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    return hosts, not before


# ---- load ---------------------------------------------------------------------------------------

class Load:
    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.samples: list[float] = []
        self.pytests = 0

    def sample(self) -> float:
        load = os.getloadavg()[0]
        self.samples.append(load)
        self.pytests = max(self.pytests, other_pytests())
        return load

    def report(self) -> str:
        lo, hi = min(self.samples), max(self.samples)
        text = f"load average (1 min) during the rounds: {lo:.2f}-{hi:.2f} on {self.cores} cores"
        if hi >= 0.5 * self.cores:
            text += ("\nNOTE: the machine was loaded (1-min load >= half the cores)"
                     + (f"; {self.pytests} process(es) with pytest in their command line"
                        if self.pytests else "")
                     + ": other work shares the CPUs and the libvirtds, so the figures are "
                       "higher and noisier than on an idle machine.")
        elif self.pytests:
            text += f"; {self.pytests} process(es) with pytest in their command line"
        return text


# ---- the subnet ---------------------------------------------------------------------------------

def host_netns_subnets(host: TestHost) -> list[ipaddress.IPv4Network]:
    """Routes and addresses in a test host's own network namespace (its libvirtd's)."""
    pid = (host.root / "pids" / "libvirtd.pid").read_text().strip()
    return ip_subnets("nsenter", "-t", pid, "-n")


@contextlib.contextmanager
def _registry() -> Iterator[tuple[dict[str, dict[str, object]], Path]]:
    SUBNET_DIR.mkdir(parents=True, exist_ok=True)
    with open(SUBNET_DIR / "subnets.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = SUBNET_DIR / "subnets.json"
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            data = {}
        yield data, path


def _save(data: dict[str, dict[str, object]], path: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def reserve_subnet(hosts: Sequence[TestHost]) -> ipaddress.IPv4Network:
    """A /24 of 10.0.0.0/8 that overlaps no route or address of this machine or of any test
    host's namespace, no libvirt network of qemu:///system or of a test host, and no subnet the
    integration tests' registry holds for a live process; registered there for this process."""
    from kvmctl.apply.lock import pid_alive
    used: list[ipaddress.IPv4Network] = list(NEVER)
    with contextlib.suppress(Exception):  # the main daemon is not needed by this benchmark
        used += used_subnets("qemu:///system")
    for host in hosts:
        used += used_subnets(host.uri) + host_netns_subnets(host)
    with _registry() as (data, path):
        used += [ipaddress.IPv4Network(k) for k, v in data.items()
                 if pid_alive(int(str(v.get("pid", 0))))]
        rng = random.Random(secrets.randbits(64))
        for _ in range(5000):
            net = ipaddress.IPv4Network((0x0A000000 + rng.randrange(1 << 16) * 256, 24))
            if not any(net.overlaps(u) for u in used):
                data[str(net)] = {"pid": os.getpid(), "time": time.time(),
                                  "by": "bench/hosts.py"}
                _save(data, path)
                return net
    raise BenchError("no free /24 in 10.0.0.0/8")


def release_subnet(net: ipaddress.IPv4Network) -> None:
    with _registry() as (data, path):
        if data.get(str(net), {}).get("pid") == os.getpid():
            del data[str(net)]
            _save(data, path)


# ---- manifests ----------------------------------------------------------------------------------

def project_yaml(project: str, hosts: Sequence[TestHost]) -> str:
    lines = ["apiVersion: kvmctl/v1", "kind: Project", "metadata:", f"  name: {project}",
             "spec:", "  hosts:"]
    for h in hosts:
        lines += [f"    - name: {h.name}", f"      uri: {json.dumps(h.uri)}",
                  "      domainType: qemu"]
    lines.append(f"  defaultHost: {hosts[0].name}")
    return "\n".join(lines) + "\n"


def network_yaml(name: str, subnet: ipaddress.IPv4Network, hosts: bool = True) -> str:
    return f"""apiVersion: kvmctl/v1
kind: Network
metadata:
  name: {name}
spec:
  mode: isolated{'''
  hosts: all''' if hosts else ''}
  ipv4:
    cidr: {subnet}
"""


def write_set(directory: Path, names: Sequence[str], network: str,
              placement: Sequence[str | None], subnet: ipaddress.IPv4Network | None,
              multi_host: bool = True) -> None:
    """VMs (and the network, with `subnet`) in `directory`, VMS_PER_FILE VMs a file."""
    write_docs(directory, [vm_yaml(name, network, None, host=host, bench="hosts")
                           for name, host in zip(names, placement, strict=True)])
    if subnet is not None:
        (directory / "network.yaml").write_text(
            network_yaml(network, subnet, hosts=multi_host), encoding="utf-8")


# ---- one run ------------------------------------------------------------------------------------

class Run(SingleHostRun):
    """One run over the test hosts: plan_noop's run (id, project, files), with a project file
    naming all the hosts, and the cleanup on every host."""

    def __init__(self, hosts: Sequence[TestHost], run_id: str | None = None) -> None:
        super().__init__(hosts[0].uri, run_id)  # the defaultHost; kvmctl() names them all
        self.hosts = list(hosts)
        self.render_dir = Path(tempfile.mkdtemp(prefix=f"kvmctl-{self.project}-render-"))
        self.project_file = self.dir / "kvmctl.yaml"
        self.project_file.write_text(project_yaml(self.project, hosts), encoding="utf-8")
        self.lock_dir = self.dir / "locks"
        self.subnet: ipaddress.IPv4Network | None = None
        self.rows: list[dict[str, object]] = []  # for --json

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in child_env().items() if k != "KVMCTL_LOCK_DIR"}
        env.update(KVMCTL_DOMAIN_TYPE="qemu", KVMCTL_LOCK_DIR=str(self.lock_dir))
        return env

    def kvmctl(self, *args: str) -> list[str]:
        return kvmctl_command() + list(args) + ["--project-file", str(self.project_file)]

    def lease_records(self, host: TestHost, remove: bool = False) -> list[str]:
        """This project's hypervisor-lock records (volumes of the pool kvmctl-locks)."""
        from kvmctl.apply.hostlock import project_key
        return lock_records(host.uri, project_key(self.project), remove)

    def cleanup(self) -> bool:
        """Remove everything of this run on every host; True when nothing is left."""
        print(f"cleanup: kvmctl destroy -y (project {self.project}, hosts "
              f"{', '.join(h.name for h in self.hosts)})...", flush=True)
        self.destroy_applied()
        all_left: list[str] = []
        for host in self.hosts:
            try:
                left = leftovers(host.uri, self.prefix) + self.lease_records(host)
                if left:
                    print(f"  {host.name}: {len(left)} object(s) left after destroy, removing "
                          f"them through libvirt: {', '.join(left[:4])}"
                          f"{' ...' if len(left) > 4 else ''}", flush=True)
                    remove_by_prefix(host.uri, self.prefix)
                    self.lease_records(host, remove=True)
                    left = leftovers(host.uri, self.prefix) + self.lease_records(host)
            except Exception as exc:  # noqa: BLE001 - report, never hide the original failure
                left = [f"(cannot check: {type(exc).__name__}: {exc})"]
            all_left += [f"{host.name}: {item}" for item in left]
        if self.subnet is not None:
            with contextlib.suppress(OSError):
                release_subnet(self.subnet)
        remove_lock_files(self.project)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.render_dir, ignore_errors=True)
        if all_left:
            print(f"  NOT REMOVED: {', '.join(all_left)}", flush=True)
            return False
        print(f"  nothing named {self.prefix}* and no lock record of {self.project} is left on "
              f"{', '.join(h.name for h in self.hosts)}", flush=True)
        return True


# ---- the measurements ---------------------------------------------------------------------------

def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(n: int, hosts: Sequence[TestHost]) -> list[str]:
    return [hosts[i % len(hosts)].name for i in range(n)]


def measure_plan(r: Run, args: argparse.Namespace, load: Load) -> None:
    n, hosts = args.vms, r.hosts
    assert r.subnet is not None
    names = [r.vm_name(i) for i in range(1, n + 1)]
    placement = spread(n, hosts)
    plan_dir, plan_vms = r.dir / "plan", r.dir / "plan-vms"
    write_set(plan_dir, names, r.network, placement, r.subnet)
    write_set(plan_vms, names, r.network, placement, None)
    per_host = {h.name: placement.count(h.name) for h in hosts}
    print(f"\n1. no-op plan: defining {n} stopped VMs "
          f"({', '.join(f'{k}: {v}' for k, v in per_host.items())}) and the network on all "
          f"hosts: kvmctl apply -y ...", flush=True)
    print(f"  apply: {r.apply(plan_dir):.2f} s", flush=True)

    plan = r.kvmctl("plan", "-f", str(plan_dir), "--detailed-exitcode")
    bare = {h.name: [sys.executable, "-c", BARE_READ, h.uri] for h in hosts}
    sequential = [sys.executable, "-c", BARE_READ] + [h.uri for h in hosts]
    # Untimed: fills the warm memo, and makes sure the first timed round pays no first-use cost.
    timed(plan, env=r.warm_env("cache"))
    counts = dict(zip([h.name for h in hosts],
                      run(sequential).stdout.split(), strict=True))

    # key, argv, its environment (cold: a new empty cache folder for each run)
    steps: list[tuple[str, list[str], Callable[[], dict[str, str]]]] = [
        ("cold", plan, r.env), ("warm", plan, functools.partial(r.warm_env, "cache"))]
    steps += [(h.name, bare[h.name], child_env) for h in hosts]
    steps += [("seq", sequential, child_env)]
    times: dict[str, list[float]] = {key: [] for key, _, _ in steps}
    for i in range(args.repeat):
        load.sample()
        order = steps if i % 2 == 0 else steps[::-1]  # paired, alternating which goes first
        for key, argv, env in order:
            times[key].append(timed(argv, env=env()))
        print(f"  round {i + 1}/{args.repeat}: plan cold {times['cold'][-1]:.3f} s, warm "
              f"{times['warm'][-1]:.3f} s; bare "
              + ", ".join(f"{h.name} {times[h.name][-1]:.3f}" for h in hosts)
              + f", one after another {times['seq'][-1]:.3f} s", flush=True)

    slowest = max(hosts, key=lambda h: med(times[h.name]))
    floor = med(times[slowest.name])
    # Paired: each round's plan against the slowest bare read of that same round.
    paired = {k: med([p / max(times[h.name][i] for h in hosts)
                      for i, p in enumerate(times[k])]) for k in ("cold", "warm")}

    def line(label: str, key: str, note: str = "") -> str:
        m = med(times[key])
        return (f"| {label:<58} | {m:8.3f} | {min(times[key]):7.3f} | {m / floor:7.2f} |"
                f" {note}")

    print(f"\nno-op plan of {n} stopped VMs over {len(hosts)} hosts, median of {args.repeat} "
          f"paired rounds (domains on the hosts: "
          f"{', '.join(f'{k} {v}' for k, v in counts.items())})")
    print(f"| {'':<58} | {'median s':>8} | {'min s':>7} | {'ratio':>7} |")
    print(f"| {'-' * 58} | {'-' * 8}:| {'-' * 6}:| {'-' * 6}:|")
    for key, label in (("cold", "(a) kvmctl plan, cold (KVMCTL_NO_CACHE=1)"),
                       ("warm", "(a) kvmctl plan, warm memo")):
        ratio = med(times[key]) / floor
        print(line(label, key, f"paired {paired[key]:.2f}; target <= {TARGET_RATIO}: "
                   f"{'met' if ratio <= TARGET_RATIO else 'MISSED'}"))
        r.rows.append(row(f"no-op plan over {len(hosts)} test hosts, {n} VMs, {key} (median "
                          f"of {args.repeat}) vs the slowest host's bare read "
                          f"({slowest.name}, {slowest.transport})",
                          f"{med(times[key]):.3f} s", f"{floor:.3f} s", ratio,
                          f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO))
    for h in hosts:
        print(line(f"(b) bare read {h.name} ({h.transport}, {counts[h.name]} domains)", h.name,
                   "<- slowest host: the floor" if h is slowest else ""))
    print(line("(c) bare read h1, h2, h3 one after another (one process)", "seq",
               f"sum of the (b) medians: {sum(med(times[h.name]) for h in hosts):.3f} s"))

    print("removing the VMs: kvmctl destroy -y ...", flush=True)
    run(r.kvmctl("destroy", "-y", "-f", str(plan_vms)), env=r.env())
    for h in hosts:
        if count_domains(h.uri, f"{r.prefix}vm-"):
            raise BenchError(f"kvmctl destroy left VMs of {r.prefix}vm- on {h.name}")


def rendered_without_hosts(r: Run, names: Sequence[str]) -> dict[str, str]:
    """name -> domain XML, as `kvmctl render` prints it (render is single-host: the VMs are
    rendered without `spec.host` and without the project file, with the run's project)."""
    assert r.subnet is not None
    directory = r.render_dir  # outside r.dir, whose project file would make it multi-host
    write_set(directory, names, r.network, [None] * len(names), r.subnet, multi_host=False)
    return rendered_vms(r, directory, vms_option="--apply-vms")


def measure_apply(r: Run, args: argparse.Namespace, load: Load) -> None:
    n, hosts = args.apply_vms, r.hosts
    names = [r.vm_name(i) for i in range(1, n + 1)]
    placement = spread(n, hosts)
    full_dir, vms_dir = r.dir / "new", r.dir / "new-vms"
    write_set(full_dir, names, r.network, placement, r.subnet)
    write_set(vms_dir, names, r.network, placement, None)
    r.applied_dirs.append(full_dir)
    per_host = {h.name: placement.count(h.name) for h in hosts}
    print(f"\n2. apply of {n} new stopped VMs "
          f"({', '.join(f'{k}: {v}' for k, v in per_host.items())}); the network is there",
          flush=True)

    xmls = rendered_without_hosts(r, names)
    raw_prefix = f"{r.prefix}raw-"
    uri = {h.name: h.uri for h in hosts}
    work: dict[str, list[str]] = {h.uri: [] for h in hosts}
    for name, host in zip(names, placement, strict=True):
        work[uri[host]].append(re.sub(r"<name>[^<]*</name>",
                                      f"<name>{raw_prefix}{name[-4:]}</name>", xmls[name],
                                      count=1))
    xml_file = r.dir / "bare.json"
    xml_file.write_text(json.dumps(work), encoding="utf-8")
    bare = [sys.executable, "-c", BARE_DEFINE_PARALLEL, str(xml_file)]
    apply = r.kvmctl("apply", "-y", "-f", str(full_dir))
    destroy = r.kvmctl("destroy", "-y", "-f", str(vms_dir))

    def check(prefix: str, what: str) -> None:
        made = {h.name: count_domains(h.uri, prefix) for h in hosts}
        if made != per_host:
            raise BenchError(f"{what} defined {made}, not {per_host}")

    apply_times: list[float] = []
    bare_times: list[float] = []
    for i in range(args.apply_repeat):
        load.sample()
        apply_times.append(timed(apply, env=r.env()))
        check(f"{r.prefix}vm-", "kvmctl apply")
        run(destroy, env=r.env())
        bare_times.append(timed(bare))
        check(raw_prefix, "the bare define")
        for h in hosts:
            undefine_all(h.uri, raw_prefix)
        print(f"  round {i + 1}/{args.apply_repeat}: kvmctl apply {apply_times[-1]:.3f} s, "
              f"bare define {bare_times[-1]:.3f} s", flush=True)

    a, b = med(apply_times), med(bare_times)
    paired = med([x / y for x, y in zip(apply_times, bare_times, strict=True)])
    print(f"\napply of {n} new stopped VMs over {len(hosts)} hosts, median of "
          f"{args.apply_repeat}")
    print(f"| {'':<58} | {'median s':>8} | {'min s':>7} | {'ratio':>7} |")
    print(f"| {'-' * 58} | {'-' * 8}:| {'-' * 6}:| {'-' * 6}:|")
    print(f"| {'(a) kvmctl apply -y, cold (whole process)':<58} | {a:8.3f} | "
          f"{min(apply_times):7.3f} | {a / b:7.2f} | paired {paired:.2f}")
    print(f"| {'(b) bare defineXMLFlags: a thread per host, in parallel':<58} | {b:8.3f} | "
          f"{min(bare_times):7.3f} | {1:7.2f} | each thread defines its host's VMs in turn")
    r.rows.append(row(f"apply of {n} new VMs over {len(hosts)} test hosts, cold (median of "
                      f"{args.apply_repeat}) vs bare defines, a thread per host",
                      f"{a:.3f} s", f"{b:.3f} s", a / b, "—", None))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--vms", type=int, default=300, help="VMs of the no-op plan")
    ap.add_argument("--repeat", type=int, default=5, help="paired rounds of the plan")
    ap.add_argument("--apply-vms", type=int, default=100, help="new VMs of the apply")
    ap.add_argument("--apply-repeat", type=int, default=3, help="rounds of the apply")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE "
                    "(for bench/run)")
    ap.add_argument("--run-id", type=run_id_arg, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vms < 1 or args.apply_vms < 2 or args.repeat < 1 or args.apply_repeat < 1:
        ap.error("--vms must be 1 or more, --apply-vms 2 or more, the repeats 1 or more")

    load = Load()
    hosts, started = start_test_hosts()
    try:
        with terminate_as_exit():
            r = Run(hosts, args.run_id)
            clean = False
            try:
                measure(r, args, load)
            finally:
                clean = r.cleanup()
    finally:
        if started:  # none ran before this run: it stops what it started, also on failure
            subprocess.run([str(TEST_HOSTS), "down"], capture_output=True, check=False)
    return 0 if clean else 1


def measure(r: Run, args: argparse.Namespace, load: Load) -> None:
    hosts = r.hosts
    r.subnet = reserve_subnet(hosts)
    print(f"run {r.id}: project {r.project}, network {r.network} ({r.subnet}, isolated, on "
          f"all hosts), hosts " + ", ".join(f"{h.name} ({h.transport})" for h in hosts)
          + f"; files in {r.dir}", flush=True)
    print(f"load average at the start: {load.sample():.2f} on {load.cores} cores", flush=True)
    print("setting up the network: kvmctl apply -y ...", flush=True)
    net_dir = r.dir / "net"
    write_set(net_dir, [], r.network, [], r.subnet)
    r.apply(net_dir)
    measure_plan(r, args, load)
    measure_apply(r, args, load)
    load.sample()
    print("\n" + load.report())
    write_json(args.json, r.rows, hosts=[f"{h.name} {h.uri}" for h in hosts])


if __name__ == "__main__":
    sys.exit(main())
