#!/usr/bin/env python3
"""Run the benchmarks one after another and print one table of every target at the end.

`bench/run` runs this with the project's interpreter. Each benchmark runs as a process of its
own (its output is printed as it goes) and hands its figures over in a JSON file (--json);
the table puts each figure beside the bare libvirt (or interpreter) cost measured in the same
run. The machine's facts (cores, load average before and after, versions) come first.

Exits 0 when every benchmark ran, whether or not its targets were met (it measures, it does
not judge); 1 when one failed, was interrupted, or left something behind: each benchmark
removes what it created, and this run checks again by the run id it gave it (libvirt objects
named `kb-<runid>-*`, lock files, temporary folders).

    bench/run [--only NAMES] [--skip NAMES] [--scales 1000,3000,10000] [--repeat R] ...
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from plan_noop import leftovers, other_pytests, scales_arg  # noqa: E402

NAMES = ("plan", "validate", "apply", "hosts", "controller", "startup", "backup")
SCRIPTS = {"plan": "plan_noop.py", "validate": "validate_render.py", "apply": "apply_new.py",
           "hosts": "hosts.py", "controller": "controller.py", "startup": "startup.py",
           "backup": "backup.py"}
USES_LIBVIRT = {"plan", "apply", "hosts", "controller", "backup"}


@dataclass
class Outcome:
    name: str
    argv: list[str]
    run_id: str | None
    returncode: int | None = None
    seconds: float = 0.0
    rows: list[dict[str, object]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failures and leftovers


# ---- options ------------------------------------------------------------------------------------

def names_arg(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {', '.join(unknown)}; "
                                         f"choose from {', '.join(NAMES)}")
    return names


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/run", description=__doc__.split("\n\n")[0],
        epilog=f"benchmarks: {', '.join(f'{n} ({SCRIPTS[n]})' for n in NAMES)}")
    ap.add_argument("--only", type=names_arg, metavar="NAMES",
                    help="run only these (comma-separated)")
    ap.add_argument("--skip", type=names_arg, default=[], metavar="NAMES",
                    help="run all but these")
    ap.add_argument("--scales", type=scales_arg, default=scales_arg("1000,3000,10000"),
                    metavar="N[,N...]", help="plan: VM counts of the no-op plan, grown on one "
                    "set (default: 1000,3000,10000)")
    ap.add_argument("--no-ip", action="store_true",
                    help="plan and controller: VMs without DHCP reservations")
    ap.add_argument("--repeat", type=int, default=None, metavar="R",
                    help="rounds of every benchmark but startup (default: each one's own)")
    ap.add_argument("--plan-repeat", type=int, metavar="R", help="plan: paired rounds "
                    "at each scale (default 5)")
    ap.add_argument("--validate-vms", type=int, default=1000, metavar="N",
                    help="validate: VMs of the manifest set (default 1000)")
    ap.add_argument("--validate-repeat", type=int, metavar="R",
                    help="validate: in-process runs (default 3)")
    ap.add_argument("--cold-runs", type=int, default=3, metavar="K",
                    help="validate: new processes for the cold figure (default 3)")
    ap.add_argument("--apply-vms", type=int, default=100, metavar="N",
                    help="apply: new VMs (default 100)")
    ap.add_argument("--apply-repeat", type=int, metavar="R",
                    help="apply: paired rounds (default 3)")
    ap.add_argument("--hosts-vms", type=int, default=300, metavar="N",
                    help="hosts: VMs of the no-op plan over the test hosts (default 300)")
    ap.add_argument("--hosts-repeat", type=int, metavar="R",
                    help="hosts: paired rounds of the plan (default 5)")
    ap.add_argument("--hosts-apply-vms", type=int, default=100, metavar="N",
                    help="hosts: new VMs of the apply (default 100)")
    ap.add_argument("--hosts-apply-repeat", type=int, metavar="R",
                    help="hosts: rounds of the apply (default 3)")
    ap.add_argument("--controller-vms", type=int, default=1000, metavar="N",
                    help="controller: stopped VMs of the idle project (default 1000)")
    ap.add_argument("--controller-repeat", type=int, metavar="R",
                    help="controller: paired rounds of the in-process idle round (default 10)")
    ap.add_argument("--controller-pushes", type=int, default=5, metavar="P",
                    help="controller: pushes timed through the webhook (default 5)")
    ap.add_argument("--startup-runs", type=int, default=15, metavar="N",
                    help="startup: rounds (default 15; the target asks for 10 or more)")
    ap.add_argument("--backup-repeat", type=int, metavar="R",
                    help="backup: paired rounds of the 1 GiB backup and restore (default 3)")
    ap.add_argument("--connect", default="qemu:///system", metavar="URI",
                    help="plan, apply and controller: the libvirt URI")
    ap.add_argument("--json", metavar="FILE", help="also write the table and the facts to "
                    "FILE")
    args = ap.parse_args(argv)
    for key in ("plan_repeat", "validate_repeat", "apply_repeat", "hosts_repeat",
                "hosts_apply_repeat", "controller_repeat", "backup_repeat"):
        if getattr(args, key) is None and args.repeat is not None:
            setattr(args, key, args.repeat)
    return args


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, argv without --json and --run-id) of each benchmark to run, in order."""
    def opt(flag: str, value: object) -> list[str]:
        return [] if value is None else [flag, str(value)]

    argvs = {
        "plan": ["--scales", ",".join(map(str, args.scales)), "--connect", args.connect,
                 *opt("--repeat", args.plan_repeat), *(["--no-ip"] if args.no_ip else [])],
        "validate": ["-n", str(args.validate_vms), "--cold-runs", str(args.cold_runs),
                     *opt("--repeat", args.validate_repeat)],
        "apply": ["-n", str(args.apply_vms), "--connect", args.connect,
                  *opt("--repeat", args.apply_repeat)],
        "hosts": ["--vms", str(args.hosts_vms), "--apply-vms", str(args.hosts_apply_vms),
                  *opt("--repeat", args.hosts_repeat),
                  *opt("--apply-repeat", args.hosts_apply_repeat)],
        "controller": ["-n", str(args.controller_vms), "--connect", args.connect,
                       "--pushes", str(args.controller_pushes),
                       *opt("--repeat", args.controller_repeat),
                       *(["--no-ip"] if args.no_ip else [])],
        "startup": ["--runs", str(args.startup_runs)],
        "backup": ["--connect", args.connect, *opt("--repeat", args.backup_repeat)],
    }
    chosen = args.only or list(NAMES)
    return [(n, [sys.executable, str(BENCH / SCRIPTS[n]), *argvs[n]])
            for n in NAMES if n in chosen and n not in args.skip]


# ---- machine facts ------------------------------------------------------------------------------

def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _first(path: str, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "unknown"


def libvirt_facts(uri: str) -> dict[str, str]:
    try:
        import libvirt
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        conn = libvirt.open(uri)
        try:
            return {"libvirt (daemon)": _version(conn.getLibVersion()),
                    "libvirt (client library)": _version(libvirt.getVersion()),
                    "hypervisor": f"{conn.getType()} {_version(conn.getVersion())}",
                    f"domains on {uri}": str(len(conn.listAllDomains(0)))}
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - a fact we cannot get is printed as such
        return {"libvirt": f"unknown ({type(exc).__name__}: {exc})"}


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def facts(uri: str) -> dict[str, str]:
    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    memory = _first("/proc/meminfo", "MemTotal")
    return {
        "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable by this process)",
        "CPU": _first("/proc/cpuinfo", "model name"),
        "memory": f"{int(memory.split()[0]) / 1024 ** 2:.1f} GiB" if memory[:1].isdigit()
        else memory,
        "/dev/kvm": "present" if os.path.exists("/dev/kvm") else "absent",
        "kernel": platform.release(),
        "Python": f"{platform.python_version()} ({sys.executable})",
        **libvirt_facts(uri),
        "libvirt-python": dist("libvirt-python"),
        "jsonschema / Jinja2 / lxml / PyYAML": " / ".join(
            dist(n) for n in ("jsonschema", "Jinja2", "lxml", "PyYAML")),
        "kvmctl": f"{dist('kvmctl')}, checkout {commit or 'unknown'} (plus any uncommitted "
                  "edits of the working tree)",
        "load average before (1, 5, 15 min)": load_text(),
        "pytest processes before": str(other_pytests()),
    }


# ---- running ------------------------------------------------------------------------------------

class Interrupted:
    """SIGINT, SIGTERM and SIGHUP while a benchmark runs: it gets one SIGTERM (it then cleans
    up), no further benchmark starts, and this run waits for it."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.signum: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            if first:
                print(f"\nbench/run: {signal.Signals(signum).name}: stopping the running "
                      "benchmark (SIGTERM); it cleans up, wait for it ...", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    self.child.send_signal(signal.SIGTERM)
            else:
                print("\nbench/run: still waiting for the benchmark's cleanup ...", flush=True)


def lock_dir() -> Path:
    return Path(os.environ.get("KVMCTL_LOCK_DIR", "/run/lock/kvmctl"))


def test_host_uris() -> list[tuple[str, str]] | None:
    """(name, uri) of the test hosts that run now; None when none does."""
    script = ROOT / "scripts" / "test-hosts"
    if not script.exists():
        return None
    proc = subprocess.run([str(script), "env"], capture_output=True, text=True, check=False)
    hosts = [tuple(line.split()[:2]) for line in proc.stdout.splitlines() if line.strip()]
    return [(h[0], h[1]) for h in hosts if len(h) == 2] or None


def check_left(outcome: Outcome, uri: str, pid: int) -> list[str]:
    """What of this benchmark's run id is still there: libvirt objects (main daemon, or the
    test hosts for hosts.py), lock files, temporary folders, subnet registry entries."""
    if outcome.run_id is None:
        return []
    prefix = f"kb-{outcome.run_id}-"
    left: list[str] = []
    targets = [("", uri)]
    if outcome.name == "hosts":
        running = test_host_uris()
        targets = [(f"{name}: ", u) for name, u in running] if running else []
    for label, target in targets:
        try:
            left += [label + item for item in leftovers(target, prefix)]
        except Exception as exc:  # noqa: BLE001 - cannot check counts as left behind
            left.append(f"{label}cannot check {target}: {type(exc).__name__}: {exc}")
    left += [f"lock file {p}" for p in lock_dir().glob(f"{prefix}*.lock")]
    left += [f"folder {p}" for p in Path(tempfile.gettempdir()).glob(f"kvmctl-{prefix}*")]
    registry = Path("/run/kvmctl-tests/subnets.json")
    if outcome.name == "hosts" and registry.exists():
        with contextlib.suppress(OSError, ValueError):
            held = json.loads(registry.read_text())
            left += [f"subnet registry entry {net}" for net, entry in held.items()
                     if isinstance(entry, dict) and entry.get("pid") == pid]
    return left


def run_one(name: str, argv: list[str], uri: str, work: Path,
            interrupted: Interrupted) -> Outcome:
    run_id = secrets.token_hex(3) if name in USES_LIBVIRT else None
    report = work / f"{name}.json"
    full = argv + ["--json", str(report)] + (["--run-id", run_id] if run_id else [])
    outcome = Outcome(name, argv, run_id)
    shown = " ".join([f"bench/{SCRIPTS[name]}", *argv[2:]])
    print(f"\n{'=' * 100}\n== {name}: {shown}{f'   (run id {run_id})' if run_id else ''}\n"
          f"{'=' * 100}", flush=True)
    started = time.perf_counter()
    # A process group of its own: a Ctrl-C reaches this run only, which passes on one SIGTERM.
    proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, cwd=ROOT, process_group=0)
    interrupted.child = proc
    outcome.returncode = proc.wait()
    interrupted.child = None
    outcome.seconds = time.perf_counter() - started
    if outcome.returncode != 0:
        outcome.problems.append(f"{SCRIPTS[name]} exited {outcome.returncode}")
    try:
        outcome.rows = list(json.loads(report.read_text(encoding="utf-8"))["rows"])
    except (OSError, ValueError, KeyError) as exc:
        if outcome.returncode == 0:
            outcome.problems.append(f"{SCRIPTS[name]} wrote no figures ({exc})")
    left = check_left(outcome, uri, proc.pid)
    if left:
        outcome.problems.append("left behind: " + ", ".join(left))
    print(f"== {name}: exit {outcome.returncode}, {outcome.seconds:.0f} s"
          + (f"; PROBLEM: {'; '.join(outcome.problems)}" if outcome.problems else ""),
          flush=True)
    return outcome


# ---- the table ----------------------------------------------------------------------------------

def cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(outcomes: Sequence[Outcome]) -> list[str]:
    lines = ["| what | kvmctl | bare | ratio | target | met |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for o in outcomes:
        for r in o.rows:
            ratio = r.get("ratio")
            met = r.get("met")
            lines.append(
                f"| {cell(r['what'])} | {cell(r['kvmctl'])} | {cell(r['bare'])} | "
                f"{f'{ratio:.2f}' if isinstance(ratio, (int, float)) else '—'} | "
                f"{cell(r['target'])} | {'—' if met is None else 'yes' if met else 'NO'} |")
        if o.problems:
            lines.append(f"| {o.name} ({SCRIPTS[o.name]}) | FAILED | | | | "
                         f"{cell('; '.join(o.problems))} |")
    return lines


def compile_bytecode() -> None:
    """Byte-compile kvmctl first, as installing it does: where PYTHONDONTWRITEBYTECODE is set
    (or the bytecode is stale), every measured process would otherwise compile it again."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "kvmctl")],
                   check=False, stdout=subprocess.DEVNULL)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    todo = commands(args)
    if not todo:
        print("bench/run: nothing to run", file=sys.stderr)
        return 1
    compile_bytecode()
    before = facts(args.connect)
    print("machine:")
    for key, value in before.items():
        print(f"  {key}: {value}")
    sys.stdout.flush()

    interrupted = Interrupted()
    old = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM,
                                                       signal.SIGHUP)}
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="kvmctl-bench-run-") as tmp:
            for name, cmd in todo:
                if interrupted.signum is not None:
                    break
                outcomes.append(run_one(name, cmd, args.connect, Path(tmp), interrupted))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    after = {"load average after (1, 5, 15 min)": load_text(),
             "pytest processes after": str(other_pytests()),
             **{k: v for k, v in libvirt_facts(args.connect).items() if k.startswith("domains")}}

    print(f"\n{'=' * 100}\nbench/run: {len(outcomes)} benchmark(s) in "
          f"{time.perf_counter() - started:.0f} s\n")
    lines = table(outcomes)
    print("\n".join(lines))
    print()
    judged = [r for o in outcomes for r in o.rows if r.get("met") is not None]
    print(f"targets met: {sum(1 for r in judged if r['met'])} of {len(judged)}")
    print("\nmachine:")
    for key, value in {**before, **after}.items():
        if key.startswith("domains on") and key in after:
            value = f"{before.get(key, '?')} before, {after[key]} after"
        print(f"- {key}: {value}")
    one = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if max(float(before["load average before (1, 5, 15 min)"].split()[0]), one) >= cores / 2:
        print(f"- NOTE: the 1-min load average reached half the cores ({cores}) or more: "
              "other work shared the CPUs, so the figures are higher and noisier than on an "
              "idle machine")
    failed = [o for o in outcomes if o.problems]
    if interrupted.signum is not None:
        print(f"\nbench/run: interrupted ({signal.Signals(interrupted.signum).name}); "
              f"{len(todo) - len(outcomes)} benchmark(s) not run")
    for o in failed:
        print(f"bench/run: {o.name}: {'; '.join(o.problems)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "facts": {**before, **after},
            "benchmarks": [{"name": o.name, "argv": o.argv, "run_id": o.run_id,
                            "returncode": o.returncode, "seconds": o.seconds, "rows": o.rows,
                            "problems": o.problems} for o in outcomes]}, indent=1),
            encoding="utf-8")
    return 1 if failed or interrupted.signum is not None else 0


if __name__ == "__main__":
    sys.exit(main())
