"""`kvmctl snapshot create|list|revert|delete VM [NAME]`."""

from __future__ import annotations

import datetime as dt
import json

from ..errors import UsageError
from .commands import _confirm, project_config
from .exits import ExitStatus
from .options import CommandOptions
from .report import Env


def cmd_snapshot(opts: CommandOptions, env: Env) -> int:
    from .. import snapshot
    from ..host.hypervisor import Hypervisor
    config = project_config(opts)
    host = opts.hosts[0] if opts.hosts else config.default_host
    if host not in config.host_names:
        raise UsageError(f"--host {host}: not a host of the project")
    hv = Hypervisor(config.host(host).uri)
    try:
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
        hv.close()
