#!/usr/bin/env python3
"""Benchmark: load + validate + render of a large generated manifest set, in-process.

Generates N VirtualMachine documents (default 1000), each with one Disk and one NIC holding a
DHCP reservation on one of 10 NAT networks, the Disks spread over 2 StoragePools; writes them
into a temporary directory (one file per kind, VMs in files of 100 documents) and times
`documents.load` + `validate.validate` + `render.render_all`:

  - cold: the first run in a new process (--cold-runs processes, the median is reported),
    with KVMCTL_NO_CACHE=1 and an empty cache folder: the schema compile (and the jsonschema
    import it needs) and the template compile are included; the import of kvmctl's modules
    and the interpreter's start are not (both are printed apart);
  - best of --repeat runs in this process, after the schemas and the template environment
    are compiled.

Prints timings only; it never fails on a slow result (tests must not assert timings).

    .venv/bin/python bench/validate_render.py [-n 1000] [--repeat 3] [--cold-runs 3]
        [--cloud-init] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

_STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvmctl.manifest import cloudinit, documents, validate  # noqa: E402
from kvmctl.render import definitions as render  # noqa: E402

_IMPORTED = time.perf_counter()
sys.path.insert(0, str(ROOT / "bench"))

from plan_noop import Summary, child_env, fresh_cache_env, measured, row, write_json  # noqa: E402

TARGET = 0.25  # seconds, at 1000 VMs
NETWORKS = 10
POOLS = 2
VMS_PER_FILE = 100


def _pool(i: int) -> str:
    return f"""apiVersion: kvmctl/v1
kind: StoragePool
metadata:
  name: pool-{i}
spec:
  path: /var/lib/kvmctl/pools/bench-{i}
"""


def _network(k: int) -> str:
    return f"""apiVersion: kvmctl/v1
kind: Network
metadata:
  name: net-{k}
  labels:
    bench: "true"
spec:
  mode: nat
  ipv4:
    cidr: 10.{100 + k}.0.0/16
    dhcp:
      start: 10.{100 + k}.200.1
      end: 10.{100 + k}.200.254
  dns:
    domain: net{k}.bench.test
"""


def _ip(i: int) -> str:
    k = i % NETWORKS
    n = i // NETWORKS  # position of the VM on its network
    return f"10.{100 + k}.{n // 250 + 1}.{n % 250 + 1}"


def _disk(i: int) -> str:
    return f"""apiVersion: kvmctl/v1
kind: Disk
metadata:
  name: vm-{i:05d}-root
spec:
  pool: pool-{i % POOLS}
  size: 8GiB
"""


def _vm(i: int, cloud_init: bool) -> str:
    text = f"""apiVersion: kvmctl/v1
kind: VirtualMachine
metadata:
  name: vm-{i:05d}
  labels:
    env: bench
    shard: "{i % 7}"
spec:
  cpus:
    count: 1
    max: 2
  memory:
    size: 256MiB
    max: 512MiB
  boot:
    kernel: /var/cache/kvmctl/test-guest/vmlinuz
    initrd: /var/cache/kvmctl/test-guest/initrd.img
    cmdline: console=ttyS0
  disks:
    - disk: vm-{i:05d}-root
  interfaces:
    - network: net-{i % NETWORKS}
      ip: {_ip(i)}
  console:
    log: /var/log/kvmctl/vm-{i:05d}.log
  guestAgent: true
"""
    if cloud_init:
        text += f"""  cloudInit:
    hostname: vm-{i:05d}
    sshAuthorizedKeys:
      - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchKeyOnly{i:05d} bench@kvmctl
    userData:
      packages: [qemu-guest-agent]
"""
    return text


def generate(folder: Path, count: int, cloud_init: bool) -> int:
    """Write the manifests; return the number of documents written."""
    (folder / "pools.yaml").write_text("---\n".join(_pool(i) for i in range(POOLS)))
    (folder / "networks.yaml").write_text("---\n".join(_network(k) for k in range(NETWORKS)))
    (folder / "disks.yaml").write_text("---\n".join(_disk(i) for i in range(count)))
    for start in range(0, count, VMS_PER_FILE):
        chunk = range(start, min(start + VMS_PER_FILE, count))
        (folder / f"vms-{start // VMS_PER_FILE:04d}.yaml").write_text(
            "---\n".join(_vm(i, cloud_init) for i in chunk))
    return POOLS + NETWORKS + 2 * count


def pipeline(folder: Path) -> int:
    # Each run costs what one `kvmctl` process pays: forget seed contents of the previous run.
    getattr(cloudinit, "_SEED_CACHE", {}).clear()
    docs = documents.load([str(folder)])
    manifest = validate.validate(docs)
    return len(render.render_all(manifest, "bench", "kvm"))


def cold_child(folder: Path, report: Path) -> int:
    """--cold-child: the first run and a second one in this new process, into `report`."""
    started = time.perf_counter()
    rendered = pipeline(folder)
    first = time.perf_counter() - started
    started = time.perf_counter()
    pipeline(folder)
    second = time.perf_counter() - started
    report.write_text(json.dumps({"imports": _IMPORTED - _STARTED, "first": first,
                                  "second": second, "rendered": rendered}), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--vms", type=int, default=1000, help="VirtualMachine documents")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs in this process; the best one is reported")
    parser.add_argument("--cold-runs", type=int, default=3,
                        help="new processes for the cold figure; the median is reported")
    parser.add_argument("--cloud-init", action="store_true", help="give every VM a cloudInit")
    parser.add_argument("--profile", action="store_true",
                        help="also run once under cProfile and print the top functions")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE "
                        "(for bench/run)")
    parser.add_argument("--cold-child", nargs=2, metavar=("DIR", "REPORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cold_child:
        return cold_child(Path(args.cold_child[0]), Path(args.cold_child[1]))

    with tempfile.TemporaryDirectory(prefix="kvmctl-bench-") as tmp:
        folder = Path(tmp) / "manifests"
        folder.mkdir()
        total_docs = generate(folder, args.vms, args.cloud_init)

        cold: list[dict[str, float]] = []
        processes = []
        for i in range(max(1, args.cold_runs)):
            report = Path(tmp) / f"cold-{i}.json"
            processes.append(measured(
                [sys.executable, __file__, "--cold-child", str(folder), str(report)],
                env=fresh_cache_env(child_env(), Path(tmp) / "cache")))
            cold.append(json.loads(report.read_text(encoding="utf-8")))
        first = statistics.median(c["first"] for c in cold)
        second = statistics.median(c["second"] for c in cold)
        imports = statistics.median(c["imports"] for c in cold)
        whole = Summary.of(processes)

        started = time.perf_counter()
        validate.predicates()  # schema compilation is a one-time cost, reported apart
        render.environment()
        compile_time = time.perf_counter() - started
        times = []
        for _ in range(max(1, args.repeat)):
            started = time.perf_counter()
            rendered = pipeline(folder)
            times.append(time.perf_counter() - started)
        best = min(times)
        print(f"{args.vms} VMs, {total_docs} documents, {rendered} objects rendered"
              f"{' (with cloudInit)' if args.cloud_init else ''}")
        firsts = ", ".join(f"{c['first']:.3f}" for c in cold)
        print(f"cold, first run in a new process (KVMCTL_NO_CACHE=1), median of {len(cold)} "
              f"processes: {first:.3f} s (all: {firsts}); schema and template compile "
              "included")
        print(f"  not included: importing kvmctl's modules {imports:.3f} s, and the "
              f"interpreter's start; the whole process took {whole.median:.3f} s "
              f"(max RSS {whole.maxrss_mb:.0f} MB)")
        print(f"  the second run in the same process: {second:.3f} s (first minus second, "
              f"about the one-time costs: {first - second:.3f} s)")
        print(f"load+validate+render in this process, compiled ({compile_time:.3f} s for "
              f"predicates() and environment()): best {best:.3f} s of {len(times)} "
              f"(all: {', '.join(f'{t:.3f}' for t in times)})")
        print(f"{best * 1000 / max(1, args.vms):.3f} ms per VM document")
        print(f"{total_docs / best:.0f} documents/second")
        goal = f"<= {TARGET} s" if args.vms == 1000 else f"(<= {TARGET} s at 1000 VMs)"
        for label, value in (("cold", first), ("best", best)):
            if args.vms == 1000:
                print(f"  {label}: {value:.3f} s (target <= {TARGET} s): "
                      f"{'met' if value <= TARGET else 'MISSED'}")
        write_json(args.json, [
            row(f"validate + render of {args.vms} VMs, cold (first run in a new process, "
                f"median of {len(cold)}; schema + template compile included, kvmctl imports "
                f"{imports:.3f} s not)", f"{first:.3f} s", "—", None, goal,
                first <= TARGET if args.vms == 1000 else None),
            row(f"validate + render of {args.vms} VMs, best of {len(times)} in-process "
                f"(compiled)", f"{best:.3f} s", "—", None, goal,
                best <= TARGET if args.vms == 1000 else None)])
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(pipeline, folder)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
    return 0


if __name__ == "__main__":
    sys.exit(main())
