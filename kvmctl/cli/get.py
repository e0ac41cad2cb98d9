"""`kvmctl get`: managed objects with their state, addresses, pending restarts and drift."""

from __future__ import annotations

import json

from .exits import ExitStatus
from .options import CommandOptions
from .report import Env, print_table


def cmd_get(opts: CommandOptions, env: Env) -> int:
    from ..engine import INVENTORY_KINDS, inventory, open_host
    from .commands import open_session
    session = open_session(opts, env) if opts.filenames else None
    hv, live = (session.hv, session.live) if session else open_host(opts.uri)
    rows = inventory(opts.what, live, hv, opts.project)
    if session:  # with manifests: show how each object differs from them (drift)
        plan = session.plan()
        drift = {c.name: str(c.change_class) for c in plan.changes
                 if c.kind == INVENTORY_KINDS[opts.what]}
        for row in rows:
            row["drift"] = drift.get(row["name"], "not in manifests")
            if row["drift"] == "no-op":
                row["drift"] = None
    if opts.output == "json":
        json.dump(rows, env.stdout, indent=2)
        env.stdout.write("\n")
        return ExitStatus.OK
    if not rows:
        env.stdout.write(f"No {opts.what} of project {opts.project!r} on {opts.uri}.\n")
        return ExitStatus.OK
    print_table(rows, env.stdout)
    return ExitStatus.OK
