"""`kvmctl backup VM --to DIR` and `kvmctl restore DIR [--host H] [--name NEW] [--start]`.

Progress goes to standard error: a live line per file (bytes, rate, time left) on a terminal;
plain lines in CI (each file started and finished, with its size and rate, and at most one line
per tenth of it between). Results go to standard output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .commands import project_config
from .exits import ExitStatus
from .options import CommandOptions
from .report import Env

if TYPE_CHECKING:
    from ..backup import BackupManifest, ProgressEvent
    from ..backup.restore import RestorePlan
    from ..manifest.documents import Document
    from ..manifest.project import ProjectConfig

_PHASES = {"job": "backup job", "download": "download", "verify": "verify",
           "upload": "upload"}


def human(size: float) -> str:
    """A size for people: 1.5 GiB, 300.0 MiB, 12 B."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{int(size)} B"


@dataclass
class _Item:
    started: float
    total: int
    shown_tenth: int = 0
    task: Any = None


@dataclass
class TransferView:
    """Renders the core's ProgressEvents on standard error."""

    env: Env
    live: bool = False
    progress: Any = None
    items: dict[tuple[str, str], _Item] = field(default_factory=dict)

    def __enter__(self) -> TransferView:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     DownloadColumn(binary_units=True), TransferSpeedColumn(),
                                     TimeRemainingColumn(),
                                     console=Console(file=self.env.stderr), transient=False)
            self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def event(self, e: ProgressEvent) -> None:
        key = (e.phase, e.item)
        now = time.monotonic()
        item = self.items.get(key)
        label = f"{_PHASES.get(e.phase, e.phase)} {e.item}"
        if item is None:
            item = self.items[key] = _Item(now, e.total)
            if self.progress is not None:
                item.task = self.progress.add_task(label, total=max(e.total, 1))
            elif e.phase == "job":
                self._line(f"{label}: libvirt copies {human(e.total)} of disks, at one "
                           "moment, while the guest runs")
            else:
                self._line(f"{label}: {human(e.total)}")
        if self.progress is not None:
            self.progress.update(item.task, completed=e.done, total=max(e.total, e.done, 1))
            return
        elapsed = max(now - item.started, 1e-6)
        if e.finished:
            if e.phase == "job":
                self._line(f"{label}: done in {elapsed:.1f} s")
            else:
                self._line(f"{label}: done, {human(e.done)} in {elapsed:.1f} s, "
                           f"{e.done / elapsed / 1e6:.1f} MB/s")
            return
        tenth = e.done * 10 // e.total if e.total > 0 else 0
        if 0 < tenth < 10 and tenth > item.shown_tenth:
            item.shown_tenth = tenth
            rate = e.done / elapsed
            left = (e.total - e.done) / rate if rate > 0 else 0
            self._line(f"{label}: {tenth * 10}% ({human(e.done)} of {human(e.total)}, "
                       f"{rate / 1e6:.1f} MB/s, {left:.0f} s left)")

    def _line(self, text: str) -> None:
        self.env.stderr.write(text + "\n")
        self.env.stderr.flush()


def _view(env: Env) -> TransferView:
    isatty = getattr(env.stderr, "isatty", None)
    return TransferView(env, live=bool(callable(isatty) and isatty()))


def _host(opts: CommandOptions, config: ProjectConfig, placed: str | None = None) -> str:
    if len(opts.hosts) > 1:
        raise UsageError(f"{opts.command} works on one host: give --host once")
    host = opts.hosts[0] if opts.hosts else (placed or config.default_host)
    if host not in config.host_names:
        raise UsageError(f"--host {host}: not a host of the project (hosts: "
                         f"{', '.join(config.host_names)})")
    return host


def _documents(opts: CommandOptions, env: Env, config: ProjectConfig) -> list[Document]:
    """The loaded manifests (-f), the project file left out; [] without -f."""
    if not opts.filenames:
        return []
    from ..manifest import documents
    from ..manifest.project import split_project
    loaded = documents.load(list(opts.filenames), recursive=opts.recursive, stdin=env.stdin)
    return split_project(loaded, config.source)[1]


# ---- backup -------------------------------------------------------------------------------------

def cmd_backup(opts: CommandOptions, env: Env) -> int:
    from ..backup.write import backup, vm_documents
    from ..host.hypervisor import Hypervisor
    from .snapshots import host_with
    if not opts.backup_dir:
        raise UsageError("backup needs --to DIR")
    config = project_config(opts)
    docs = _documents(opts, env, config)
    mine = vm_documents(docs, opts.vm)
    spec = mine[0].body.get("spec") if mine else None
    placed = spec.get("host") if isinstance(spec, dict) else None
    host = _host(opts, config, placed if isinstance(placed, str) else None)
    found = None
    if config.multi_host and not opts.hosts and not isinstance(placed, str):
        found = host_with(config, opts.vm)  # not in the manifests: the host that has it
    if found is not None:
        host, hv = found
    else:
        hv = Hypervisor(config.host(host).uri)
    try:
        with _view(env) as view:
            manifest = backup(hv, opts.vm, opts.backup_dir, project=config.name, host=host,
                              documents=docs, progress=view.event,
                              timeout=opts.backup_timeout)
    finally:
        hv.close()
    _report_backup(manifest, opts.backup_dir, env)
    return ExitStatus.OK


def _report_backup(m: BackupManifest, directory: str, env: Env) -> None:
    how = ("read through libvirt's backup API while it ran (crash-consistent, not quiesced)"
           if m.consistency == "libvirt-backup-api" else "read while it was shut off")
    total = sum(f.length for f in m.disks)
    env.stdout.write(f"Backed up VM {m.vm} ({m.state}) from host {m.source_host} into "
                     f"{directory}: {len(m.disks)} disk(s), {human(total)}, {how}.\n")
    for f in m.disks:
        assert f.disk is not None
        env.stdout.write(f"  {f.name}: {f.disk.target} {f.disk.pool}/{f.disk.volume} "
                         f"({f.disk.format}, {human(f.length)}, sha256 {f.sha256[:12]})\n")
    for note in m.notes:
        env.stdout.write(f"  note: {note}\n")
    env.stdout.write(f"Check it with: cd {directory} && sha256sum -c SHA256SUMS\n")


# ---- restore ------------------------------------------------------------------------------------

def cmd_restore(opts: CommandOptions, env: Env) -> int:
    from ..apply.lock import project_lock
    from ..backup.restore import plan_restore, read_backup, restore, verify
    from ..backup.write import vm_documents
    from ..host.hypervisor import Hypervisor
    directory = opts.backup_dir or ""
    manifest = read_backup(directory)  # before any connection: a bad backup fails at once
    config = project_config(opts)
    host = _host(opts, config)
    uri = config.host(host).uri
    with project_lock(uri, config.name, 0, lambda m: env.stderr.write(m + "\n")):
        hv = Hypervisor(uri)
        try:
            plan = plan_restore(hv, manifest, config.name, host, opts.name, opts.start)
            _show_plan(plan, directory, host, env)
            _confirm(opts, env)
            with _view(env) as view:
                verify(directory, manifest, view.event)
                # Checked again: the host may have changed while the files were read.
                plan = plan_restore(hv, manifest, config.name, host, opts.name, opts.start)
                done = restore(hv, directory, plan, view.event)
        finally:
            hv.close()
    state = "started" if done.started else "left stopped"
    env.stdout.write(f"Restored VM {plan.name} on host {host}: {len(plan.volumes)} volume(s) "
                     f"verified, {state}.\n")
    for note in plan.notes:
        env.stdout.write(f"  note: {note}\n")
    declared = bool(opts.filenames) and bool(vm_documents(_documents(opts, env, config),
                                                          plan.name))
    if not declared:
        what = (f"a copy of {manifest.vm}" if plan.name != manifest.vm else "restored")
        env.stdout.write(f"  note: {plan.name} is {what}, owned by project {plan.project}, "
                         "and the manifests" + (" given" if opts.filenames else " (none: -f)")
                         + " do not declare it: declare it (manifests.yaml of the backup "
                         "holds its documents), or `kvmctl apply --prune` deletes it.\n")
    return ExitStatus.OK


def _show_plan(plan: RestorePlan, directory: str, host: str, env: Env) -> None:
    m = plan.manifest
    env.stdout.write(f"Restore VM {m.vm}" + (f" as {plan.name}" if plan.name != m.vm else "")
                     + f" on host {host} from {directory} (backed up {m.created} from "
                       f"{m.source_host}, {m.state} then):\n")
    for v in plan.volumes:
        env.stdout.write(f"  + volume {v.pool}/{v.volume} from {v.file.name} "
                         f"({human(v.file.length)})\n")
    env.stdout.write(f"  + VM {plan.name}" + ("" if plan.keep_macs else " (new MAC addresses)")
                     + (", started" if plan.start else ", stopped") + "\n")


def _confirm(opts: CommandOptions, env: Env) -> None:
    if opts.yes:
        return
    if not env.interactive:
        raise UsageError("not a terminal: pass -y to restore without confirmation")
    env.stdout.write("Restore? Only 'yes' is accepted: ")
    env.stdout.flush()
    if env.stdin.readline().strip() != "yes":
        raise UsageError("restore cancelled; nothing was changed")
