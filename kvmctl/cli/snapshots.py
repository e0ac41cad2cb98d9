"""`kvmctl snapshot create|list|revert|delete VM [NAME]`."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import TYPE_CHECKING

from ..errors import KvmctlError, UsageError
from ..kinds import Kind
from .commands import _confirm, project_config
from .exits import ExitStatus
from .options import CommandOptions
from .report import Env

if TYPE_CHECKING:
    from ..host.hypervisor import Hypervisor
    from ..manifest.project import ProjectConfig


def cmd_snapshot(opts: CommandOptions, env: Env) -> int:
    from .. import snapshot
    from ..host.hypervisor import Hypervisor
    if opts.action == "run":
        return _run_policies(opts, env)
    if not opts.vm:
        raise UsageError(f"snapshot {opts.action} needs the VM")
    config = project_config(opts)
    host = opts.hosts[0] if opts.hosts else config.default_host
    if host not in config.host_names:
        raise UsageError(f"--host {host}: not a host of the project")
    hv = Hypervisor(config.host(host).uri)
    if not opts.hosts and config.multi_host and hv.identity(Kind.VM, opts.vm) is None:
        hv.close()
        found = host_with(config, opts.vm)
        hv = found[1] if found else Hypervisor(config.host(host).uri)
    held = contextlib.ExitStack()
    try:
        if opts.action != "list":  # never beside an apply of the project on this host
            from ..apply.lock import project_lock
            held.enter_context(project_lock(hv.uri, config.name, opts.lock_timeout,
                                            lambda m: env.stderr.write(m + "\n")))
        if opts.action == "list":
            rows = snapshot.listed(hv, opts.vm)
            if opts.output == "json":
                json.dump([{"name": s.name, "created": s.created, "state": s.state,
                            "parent": s.parent, "description": s.description,
                            "owned": s.project == config.name, "project": s.project,
                            "memory": s.memory, "external": s.external, "current": s.current}
                           for s in rows], env.stdout, indent=2)
                env.stdout.write("\n")
                return ExitStatus.OK
            if not rows:
                env.stdout.write(f"VM {opts.vm} has no snapshots.\n")
            for s in rows:
                when = dt.datetime.fromtimestamp(s.created, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
                owner = "kvmctl" if s.project == config.name else (s.project or "-")
                env.stdout.write(f"{s.name:<40} {when} UTC  {s.state:<8} "
                                 f"{'memory' if s.memory else 'disks':<6}  parent "
                                 f"{s.parent or '-':<20} owner {owner}"
                                 f"{'  (current)' if s.current else ''}\n")
            return ExitStatus.OK
        if opts.action == "create":
            made = snapshot.create(hv, opts.vm, config.name, opts.name, opts.description,
                                   not opts.no_memory, opts.quiesce)
            env.stdout.write(f"Snapshot {made.name} of {opts.vm} created "
                             f"({'with' if made.memory else 'without'} memory).\n")
            return ExitStatus.OK
        if not opts.name:
            raise UsageError(f"snapshot {opts.action} needs the snapshot's NAME")
        if opts.action == "revert":
            env.stdout.write(f"Revert {opts.vm} to snapshot {opts.name}: its disks (and memory, "
                             "if the snapshot holds it) go back to that moment"
                             + ("" if opts.no_safety else
                                ", after a safety snapshot of the present") + ".\n")
            _confirm(opts, env)
            done = snapshot.revert(hv, opts.vm, config.name, opts.name, not opts.no_safety)
            if done.safety:
                env.stdout.write(f"Safety snapshot {done.safety} taken.\n")
            env.stdout.write(f"Reverted {opts.vm} to {opts.name}; it is {done.state} now, as "
                             "the snapshot recorded it. A plan compares that with the "
                             "manifests as usual.\n")
            return ExitStatus.OK
        snapshot.delete(hv, opts.vm, config.name, opts.name, opts.force)
        env.stdout.write(f"Snapshot {opts.name} of {opts.vm} deleted.\n")
        return ExitStatus.OK
    finally:
        held.close()
        hv.close()


def host_with(config: ProjectConfig, vm: str) -> tuple[str, Hypervisor] | None:
    """The project host that has the VM (the first) and a connection to it; None if none
    has."""
    from ..host.hypervisor import Hypervisor
    for h in config.hosts:
        try:
            hv = Hypervisor(h.uri)
        except KvmctlError:
            continue  # unreachable: another host may have it
        if hv.identity(Kind.VM, vm) is not None:
            return h.name, hv
        hv.close()
    return None


def _run_policies(opts: CommandOptions, env: Env) -> int:
    """`kvmctl snapshot run -f DIR [VM]`: the manifests' snapshot policies, once."""
    from ..sync.snapshots import PolicyRun, run_policies
    from .commands import _lock_request, open_deployment

    def say(r: PolicyRun) -> None:
        where = f"{r.host}/" if len(deployment.sessions) > 1 else ""
        if r.error:
            env.stderr.write(f"error: {where}{r.vm}: {r.error}\n")
            return
        verb = "would take" if opts.dry_run else "took"
        done = [f"{verb} {r.took} ({r.why})"] if r.took else [f"nothing to take ({r.why})"]
        if r.removed:
            done.append(("would remove" if opts.dry_run else "removed") + " expired "
                        + ", ".join(r.removed))
        env.stdout.write(f"{where}{r.vm}: " + "; ".join(done) + "\n")

    deployment = open_deployment(opts, env, lock=None if opts.dry_run else
                                 _lock_request(opts, env))
    try:
        only = (opts.vm,) if opts.vm else ()
        runs = run_policies(deployment.sessions, deployment.project,
                            ignore_schedule=opts.ignore_schedule, only_vms=only,
                            dry_run=opts.dry_run, progress=say)
    finally:
        deployment.close()
    if opts.vm and not runs:
        raise UsageError(f"VM {opts.vm!r} has no snapshot policy (spec.snapshots) in these "
                         "manifests")
    if not runs:
        env.stdout.write("No VM of these manifests has a snapshot policy (spec.snapshots).\n")
    return ExitStatus.ERROR if any(r.error for r in runs) else ExitStatus.OK
