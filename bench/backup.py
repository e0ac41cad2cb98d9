#!/usr/bin/env python3
"""Benchmark: `kvmctl backup` and `kvmctl restore` of a 1 GiB disk against bare libvirt
storage streams of the same volume, in the same run.

Sets up, under one run id, a transient dir pool `kb-<runid>-pool` over a new folder
/var/tmp/kvmctl-kb-<runid>-bench/pool, a 1 GiB raw volume filled with non-zero data (uploaded
once: every byte is data, nothing is sparse, so no side gains from holes) and a stopped VM
`kb-<runid>-vm` whose one disk it is. Then, --repeat paired rounds (default 3), the first pair
in the order given, the next reversed, and so on:

  (a) bare download: virStorageVolDownload of the volume, a recv() loop writing a file;
  (b) kvmctl backup of the stopped VM (kvmctl.backup.write.backup, in this process): the
      volume streamed (sparse-capable) into a backup directory, hashed on the way, with its
      definition, backup.json and SHA256SUMS;
  (c) bare upload: a new 1 GiB volume, virStorageVolUpload of (a)'s file, a send() loop;
  (d) kvmctl restore of (b)'s backup under a new name (kvmctl.backup.restore, in this
      process): every file verified (SHA-256) before anything is created, a new volume
      uploaded and hashed as it is sent (it must equal the backup), the VM defined.

It prints MB/s (1 MB = 10^6 bytes of the volume) of each, median and min, and the ratios
backup / bare download and restore / bare upload (target >= 0.8), with the parts of the
restore (verify, upload, as the progress events time them). Everything it creates
is removed at the end, also when a step fails or it is interrupted.

    .venv/bin/python bench/backup.py [--repeat 3] [--size-mib 1024] [--connect URI] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

from plan_noop import leftovers, row, run_id_arg, terminate_as_exit, write_json  # noqa: E402

TARGET = 0.8
CHUNK = 1 << 20


class Run:
    def __init__(self, uri: str, size: int, run_id: str | None) -> None:
        import libvirt
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.libvirt = libvirt
        self.uri, self.size = uri, size
        self.id = run_id or secrets.token_hex(3)
        self.project = f"kb-{self.id}"
        self.prefix = f"kb-{self.id}-"
        self.dir = Path(f"/var/tmp/kvmctl-{self.prefix}bench")
        self.pool_dir = self.dir / "pool"
        self.pool_name = f"{self.prefix}pool"
        self.vm = f"{self.prefix}vm"
        self.volume = f"{self.prefix}src.raw"
        self.conn = libvirt.open(uri)
        self.rows: list[dict[str, object]] = []

    # ---- setup and cleanup ----
    def setup(self) -> None:
        self.dir.mkdir(mode=0o755)
        self.pool_dir.mkdir(mode=0o755)
        self.pool = self.conn.storagePoolCreateXML(
            f"<pool type='dir'><name>{self.pool_name}</name><target><path>{self.pool_dir}"
            "</path></target></pool>", 0)
        vol = self.create_volume(self.volume)
        print(f"filling {self.volume} with {self.size >> 20} MiB of non-zero data ...",
              flush=True)
        started = time.perf_counter()
        block = bytearray(os.urandom(CHUNK))
        stream = self.conn.newStream(0)
        vol.upload(stream, 0, self.size, 0)
        for i in range(self.size // CHUNK):
            block[:8] = (i + 1).to_bytes(8, "little")  # every MiB a different one
            send_all(stream, bytes(block))
        stream.finish()
        print(f"  {time.perf_counter() - started:.1f} s", flush=True)
        self.conn.defineXML(
            f"<domain type='qemu'><name>{self.vm}</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64'>hvm</type></os><devices>"
            f"<disk type='volume' device='disk'><driver name='qemu' type='raw'/>"
            f"<source pool='{self.pool_name}' volume='{self.volume}'/>"
            "<target dev='vda' bus='virtio'/></disk></devices></domain>")

    def create_volume(self, name: str) -> Any:
        return self.pool.createXML(
            f"<volume><name>{name}</name><capacity unit='bytes'>{self.size}</capacity>"
            "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target>"
            "</volume>", 0)

    def delete_volume(self, name: str) -> None:
        with contextlib.suppress(self.libvirt.libvirtError):
            self.pool.refresh(0)
            self.pool.storageVolLookupByName(name).delete(0)

    def undefine(self, name: str) -> None:
        with contextlib.suppress(self.libvirt.libvirtError):
            self.conn.lookupByName(name).undefine()

    def cleanup(self) -> bool:
        print(f"cleanup: domains, volumes and pool of {self.prefix}*, {self.dir} ...",
              flush=True)
        libvirt = self.libvirt
        for dom in self.conn.listAllDomains(0):
            if dom.name().startswith(self.prefix):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
        with contextlib.suppress(libvirt.libvirtError):
            pool = self.conn.storagePoolLookupByName(self.pool_name)
            pool.refresh(0)
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
            pool.destroy()
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        left = leftovers(self.uri, self.prefix)
        left += [str(self.dir)] if self.dir.exists() else []
        if left:
            print(f"  NOT REMOVED: {', '.join(left)}", flush=True)
            return False
        print(f"  nothing named {self.prefix}* is left", flush=True)
        return True

    # ---- the four sides ----
    def bare_download(self, path: Path) -> float:
        started = time.perf_counter()
        vol = self.pool.storageVolLookupByName(self.volume)
        stream = self.conn.newStream(0)
        vol.download(stream, 0, 0, 0)
        with open(path, "wb") as f:
            while True:
                data = stream.recv(CHUNK)
                if not data:
                    break
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        stream.finish()
        return time.perf_counter() - started

    def bare_upload(self, path: Path, name: str) -> float:
        started = time.perf_counter()
        vol = self.create_volume(name)
        stream = self.conn.newStream(0)
        vol.upload(stream, 0, 0, 0)
        with open(path, "rb") as f:
            while data := f.read(CHUNK):
                send_all(stream, data)
        stream.finish()
        return time.perf_counter() - started

    def kvmctl_backup(self, directory: Path) -> float:
        from kvmctl.backup.write import backup
        from kvmctl.host.hypervisor import Hypervisor
        started = time.perf_counter()
        hv = Hypervisor(self.uri)
        try:
            backup(hv, self.vm, str(directory), project=self.project, host="bench")
        finally:
            hv.close()
        return time.perf_counter() - started

    def kvmctl_restore(self, directory: Path, name: str) -> tuple[float, dict[str, float]]:
        from kvmctl.backup.restore import plan_restore, read_backup, restore, verify
        from kvmctl.host.hypervisor import Hypervisor
        phases = Phases()
        started = time.perf_counter()
        hv = Hypervisor(self.uri)
        try:
            manifest = read_backup(str(directory))
            verify(str(directory), manifest, phases.event)
            plan = plan_restore(hv, manifest, self.project, "bench", name)
            restore(hv, str(directory), plan, phases.event)
        finally:
            hv.close()
        return time.perf_counter() - started, phases.seconds


class Phases:
    """Seconds of each phase of a restore, from its progress events."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def event(self, e: Any) -> None:
        now = time.perf_counter()
        self.first.setdefault(e.phase + e.item, now)
        if e.finished:
            self.seconds[e.phase] = self.seconds.get(e.phase, 0.0) + now - self.first.pop(
                e.phase + e.item)


def send_all(stream: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[stream.send(bytes(view)):]


def one_round(r: Run, i: int, times: dict[str, list[float]],
              parts: dict[str, list[float]]) -> None:
    """(a) and (b), then (c) and (d), in this order in even rounds, each pair reversed in odd
    ones; what the round made is removed after it."""
    work = r.dir / f"round-{i}"
    work.mkdir()
    bare_file, backup_dir = work / "bare.raw", work / "backup"
    up_name, restored = f"{r.prefix}up-{i}.raw", f"{r.prefix}r{i}"

    def restore_side() -> float:
        seconds, phases = r.kvmctl_restore(backup_dir, restored)
        for key, value in phases.items():
            parts.setdefault(key, []).append(value)
        return seconds

    firsts: list[tuple[str, Callable[[], float]]] = [
        ("down", lambda: r.bare_download(bare_file)),
        ("backup", lambda: r.kvmctl_backup(backup_dir))]
    seconds: list[tuple[str, Callable[[], float]]] = [
        ("up", lambda: r.bare_upload(bare_file, up_name)), ("restore", restore_side)]
    try:
        for key, side in (firsts + seconds if i % 2 == 0 else firsts[::-1] + seconds[::-1]):
            times[key].append(side())
    finally:
        r.delete_volume(up_name)
        r.undefine(restored)
        r.delete_volume(f"{restored}-vda.raw")
        shutil.rmtree(work, ignore_errors=True)


def measure(r: Run, repeat: int) -> None:
    mb = r.size / 1e6
    times: dict[str, list[float]] = {k: [] for k in ("down", "backup", "up", "restore")}
    parts: dict[str, list[float]] = {}
    for i in range(repeat):
        one_round(r, i, times, parts)
        print(f"  round {i + 1}/{repeat}: "
              + ", ".join(f"{k} {mb / times[k][-1]:.0f} MB/s" for k in times), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: mb / v for k, v in med.items()}
    best = {k: mb / min(v) for k, v in times.items()}
    print(f"\n{r.size >> 20} MiB raw volume of non-zero data, median of {repeat} paired rounds "
          f"({r.uri})")
    print(f"| {'':<56} | {'median MB/s':>11} | {'best MB/s':>9} | {'ratio':>5} |")
    print(f"| {'-' * 56} | {'-' * 10}:| {'-' * 8}:| {'-' * 4}:|")
    for key, label, ratio in (
            ("down", "(a) bare stream download to a file", None),
            ("backup", "(b) kvmctl backup (stopped VM)", rate["backup"] / rate["down"]),
            ("up", "(c) bare stream upload of the file to a new volume", None),
            ("restore", "(d) kvmctl restore (verify, upload, define)",
             rate["restore"] / rate["up"])):
        print(f"| {label:<56} | {rate[key]:11.0f} | {best[key]:9.0f} | "
              f"{'' if ratio is None else f'{ratio:5.2f}':>5} |")
    for phase, values in parts.items():
        print(f"|   of which {phase:<44} | {mb / statistics.median(values):11.0f} | "
              f"{mb / min(values):9.0f} |       | ({statistics.median(values):.2f} s)")
    for key, bare, what in (("backup", "down", "backup"), ("restore", "up", "restore")):
        ratio = rate[key] / rate[bare]
        paired = statistics.median(b / k for k, b in zip(times[key], times[bare], strict=True))
        print(f"{what} / bare: {ratio:.2f}, paired (median of the rounds' ratios) "
              f"{paired:.2f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'MISSED'})")
        r.rows.append(row(f"kvmctl {what} of a {r.size >> 20} MiB disk vs a bare stream "
                          f"{'download' if bare == 'down' else 'upload'} (MB/s, median of "
                          f"{repeat})", f"{rate[key]:.0f} MB/s", f"{rate[bare]:.0f} MB/s",
                          ratio, f">= {TARGET}", ratio >= TARGET))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="paired rounds (default 3)")
    ap.add_argument("--size-mib", type=int, default=1024, help="the volume (default 1024)")
    ap.add_argument("--connect", default="qemu:///system", metavar="URI")
    ap.add_argument("--json", metavar="FILE", help="the figures, for bench/run")
    ap.add_argument("--run-id", type=run_id_arg, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.size_mib < 1:
        ap.error("--repeat and --size-mib must be 1 or more")
    with terminate_as_exit():
        r = Run(args.connect, args.size_mib << 20, args.run_id)
        print(f"run {r.id}: pool {r.pool_name} in {r.pool_dir}, VM {r.vm}; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
        clean = False
        try:
            r.setup()
            measure(r, args.repeat)
            write_json(args.json, r.rows)
        finally:
            clean = r.cleanup()
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
