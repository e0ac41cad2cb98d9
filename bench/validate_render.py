#!/usr/bin/env python3
"""Benchmark: load + validate + render of a large generated manifest set, in-process.

Generates N VirtualMachine documents (default 1000), each with one Disk and one NIC holding a
DHCP reservation on one of 10 NAT networks, the Disks spread over 2 StoragePools; writes them
into a temporary directory (one file per kind, VMs in files of 100 documents) and times
`documents.load` + `validate.validate` + `render.render_all`, best of --repeat runs.

Prints timings only; it never fails on a slow result (tests must not assert timings).

    .venv/bin/python bench/validate_render.py [-n 1000] [--repeat 3] [--cloud-init] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvmctl.manifest import documents, validate  # noqa: E402
from kvmctl.render import definitions as render  # noqa: E402

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
    getattr(render, "_SEED_CACHE", {}).clear()
    docs = documents.load([str(folder)])
    manifest = validate.validate(docs)
    return len(render.render_all(manifest, "bench", "kvm"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--vms", type=int, default=1000, help="VirtualMachine documents")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best one is reported")
    parser.add_argument("--cloud-init", action="store_true", help="give every VM a cloudInit")
    parser.add_argument("--profile", action="store_true",
                        help="also run once under cProfile and print the top functions")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kvmctl-bench-") as tmp:
        folder = Path(tmp)
        total_docs = generate(folder, args.vms, args.cloud_init)
        validate.validators()  # schema compilation is a one-time cost, reported apart
        render.environment()
        times = []
        for _ in range(max(1, args.repeat)):
            started = time.perf_counter()
            rendered = pipeline(folder)
            times.append(time.perf_counter() - started)
        best = min(times)
        print(f"{args.vms} VMs, {total_docs} documents, {rendered} objects rendered"
              f"{' (with cloudInit)' if args.cloud_init else ''}")
        print(f"load+validate+render: best {best:.3f} s of {len(times)} "
              f"(all: {', '.join(f'{t:.3f}' for t in times)})")
        print(f"{best * 1000 / max(1, args.vms):.3f} ms per VM document")
        print(f"{total_docs / best:.0f} documents/second")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(pipeline, folder)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
    return 0


if __name__ == "__main__":
    sys.exit(main())
