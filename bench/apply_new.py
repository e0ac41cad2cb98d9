#!/usr/bin/env python3
"""Benchmark: `kvmctl apply` of N new stopped VMs against a bare defineXML loop.

Sets up one NAT network `kb-<runid>-net` (project `kb-<runid>`), then, in --repeat paired rounds
(every other round in reverse order):

  (a) times the whole `kvmctl apply -y -f DIR --project kb-<runid> --domain-type qemu`
      process that defines N new stopped VMs (default 100; the network is already there and
      unchanged), cold (KVMCTL_NO_CACHE=1, an empty cache folder), then removes the VMs again
      (`kvmctl destroy -y`, not timed);
  (b) times a bare `python -c` process that opens the connection and defines the same XML
      (`kvmctl render` output, the VMs renamed `kb-<runid>-raw-NNNN`) with
      virDomainDefineXMLFlags(VALIDATE), as kvmctl does, then undefines them (not timed);

and prints the median of each with the min beside, and their ratio. Then it removes everything
it created, also when a step fails or it is interrupted (see plan_noop.py, whose helpers it
shares).

Prints figures only; it never fails on a slow result.

    .venv/bin/python bench/apply_new.py [-n 100] [--repeat 3] [--profile FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_noop import (  # noqa: E402
    BenchError,
    Run,
    Sample,
    Step,
    Summary,
    free_subnet,
    kvmctl_command,
    leftovers,
    measured,
    network_yaml,
    paired_ratio,
    paired_rounds,
    row,
    run,
    run_id_arg,
    terminate_as_exit,
    write_json,
    write_vms,
)

TARGET_RATIO = 1.1

BARE_DEFINE = """
import json, sys, libvirt
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
with open(sys.argv[2], encoding="utf-8") as f:
    xmls = json.load(f)
conn = libvirt.open(sys.argv[1])
for xml in xmls:
    conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
conn.close()
"""


def rendered_vms(r: Run, directory: Path, vms_option: str = "-n") -> dict[str, str]:
    """name -> domain XML, as `kvmctl render` prints it for these manifests; `vms_option`
    names the caller's option for the number of VMs."""
    out = run(kvmctl_command() + ["render", "-f", str(directory), "--kind", "VirtualMachine",
                                  "--project", r.project, "--domain-type", "qemu"],
              env=r.env()).stdout
    parts = re.split(r"^<!-- VirtualMachine/(\S+) -->\n", out, flags=re.M)
    if len(parts) == 1:  # a single VM is printed without the comment
        raise BenchError(f"kvmctl render printed a single document; use {vms_option} 2 or "
                         "more")
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def undefine_all(uri: str, prefix: str) -> int:
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(uri)
    try:
        gone = 0
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(prefix):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                gone += 1
        return gone
    finally:
        conn.close()


def count_domains(uri: str, prefix: str) -> int:
    return sum(1 for item in leftovers(uri, prefix) if item.startswith("domain "))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--vms", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="paired rounds (the median is "
                    "reported, with the min beside)")
    ap.add_argument("--connect", default="qemu:///system", metavar="URI")
    ap.add_argument("--profile", metavar="FILE",
                    help="profile one more `kvmctl apply` into FILE and print its top")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE "
                    "(for bench/run)")
    ap.add_argument("--run-id", type=run_id_arg, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vms < 2 or args.repeat < 1:
        ap.error("-n must be 2 or more, --repeat 1 or more")

    with terminate_as_exit():
        r = Run(args.connect, args.run_id)
        clean = False
        try:
            measure(r, args)
        finally:
            clean = r.cleanup()
    return 0 if clean else 1


def measure(r: Run, args: argparse.Namespace) -> None:
    n = args.vms
    subnet = free_subnet(r.uri, 24)
    net_dir, vms_dir, full_dir = r.dir / "net", r.dir / "vms", r.dir / "full"
    for d in (net_dir, full_dir):
        d.mkdir()
        (d / "network.yaml").write_text(network_yaml(r.network, subnet), encoding="utf-8")
    names = [r.vm_name(i) for i in range(1, n + 1)]
    write_vms(vms_dir, names, r.network, [None] * n)
    write_vms(full_dir, names, r.network, [None] * n)
    print(f"run {r.id}: project {r.project}, {n} new stopped VMs on network {r.network} "
          f"({subnet}), manifests in {r.dir}", flush=True)

    print("setting up the network: kvmctl apply -y ...", flush=True)
    r.apply(net_dir)
    r.applied_dirs.append(full_dir)  # cleanup destroys the VMs and the network

    xmls = rendered_vms(r, full_dir)
    raw_prefix = f"{r.prefix}raw-"
    bare_xml = [re.sub(r"<name>[^<]*</name>", f"<name>{raw_prefix}{name[-4:]}</name>", xml,
                       count=1) for name, xml in sorted(xmls.items())]
    xml_file = r.dir / "bare.json"
    xml_file.write_text(json.dumps(bare_xml), encoding="utf-8")
    bare = [sys.executable, "-c", BARE_DEFINE, r.uri, str(xml_file)]
    apply = r.kvmctl("apply", "-y", "-f", str(full_dir))
    destroy_vms = r.kvmctl("destroy", "-y", "-f", str(vms_dir))

    def kvmctl_apply() -> Sample:
        sample = measured(apply, env=r.env())
        made = count_domains(r.uri, f"{r.prefix}vm-")
        if made != n:
            raise BenchError(f"kvmctl apply made {made} VMs, not {n}")
        run(destroy_vms, env=r.env())
        return sample

    def bare_define() -> Sample:
        sample = measured(bare)
        made = undefine_all(r.uri, raw_prefix)
        if made != n:
            raise BenchError(f"the bare loop defined {made} VMs, not {n}")
        return sample

    def report(i: int, got: dict[str, list[Sample]]) -> None:
        print(f"  round {i + 1}/{args.repeat}: kvmctl apply {got['apply'][-1].wall:.3f} s, "
              f"bare defineXML loop {got['bare'][-1].wall:.3f} s", flush=True)

    steps: list[Step] = [("apply", kvmctl_apply), ("bare", bare_define)]
    got = paired_rounds(steps, args.repeat, report)
    a, b = Summary.of(got["apply"]), Summary.of(got["bare"])
    ratio = a.median / b.median
    print(f"\napply of {n} new stopped VMs, median of {args.repeat} paired rounds (min beside)")
    print("| | median s | min s | ratio | CPU s | max RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| (a) kvmctl apply -y, cold (whole process) | {a.median:.3f} | {a.min:.3f} | "
          f"{ratio:.2f} | {a.cpu:.3f} | {a.maxrss_mb:.0f} |")
    print(f"| (b) bare defineXMLFlags loop (process) | {b.median:.3f} | {b.min:.3f} | 1.00 | "
          f"{b.cpu:.3f} | {b.maxrss_mb:.0f} |")
    print(f"  ratio a/b: {ratio:.2f}, paired {paired_ratio(got['apply'], got['bare']):.2f}, "
          f"best/best {a.min / b.min:.2f} (target <= {TARGET_RATIO}): "
          f"{'met' if ratio <= TARGET_RATIO else 'MISSED'}")
    write_json(args.json, [row(f"apply of {n} new stopped VMs, cold (median of "
                               f"{args.repeat}) vs a bare defineXMLFlags loop",
                               f"{a.median:.3f} s", f"{b.median:.3f} s", ratio,
                               f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO)])
    if args.profile:
        profile(r, args.profile, full_dir, destroy_vms)


def profile(r: Run, out: str, directory: Path, destroy: list[str]) -> None:
    import pstats
    import subprocess
    argv = [sys.executable, "-m", "cProfile", "-o", out, "-m", "kvmctl", "apply", "-y", "-f",
            str(directory), "--connect", r.uri, "--project", r.project, "--domain-type", "qemu"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=r.env(),
                          stdin=subprocess.DEVNULL)
    run(destroy, env=r.env())
    if proc.returncode != 0:
        raise BenchError(f"profiled apply exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    print(f"\nprofile of one `kvmctl apply` (saved in {out}):")
    stats = pstats.Stats(out)
    stats.sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    sys.exit(main())
