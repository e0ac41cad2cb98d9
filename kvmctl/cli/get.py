"""`kvmctl get`: managed objects with their state, addresses, pending restarts and drift, on
every host of the project (a HOST column when there are several)."""

from __future__ import annotations

import json
from typing import Any

from .exits import ExitStatus
from .options import CommandOptions
from .report import Env, print_table


def cmd_get(opts: CommandOptions, env: Env) -> int:
    from ..engine import INVENTORY_KINDS, inventory, open_project_hosts
    from .commands import open_deployment, project_config
    config = project_config(opts, connect=True)
    failed: list[tuple[str, str, str]] = []
    drift: dict[str, dict[str, str]] = {}
    deployment = None
    if opts.filenames:  # with manifests: show how each object differs from them (drift)
        deployment = open_deployment(opts, env, config)
        opened = {n: (s.hv, s.live) for n, s in deployment.sessions.items()}
        plan = deployment.plan()
        for h in plan.hosts:
            drift[h.host] = {c.name: str(c.change_class) for c in h.plan.changes
                             if c.kind == INVENTORY_KINDS.get(opts.what)}
        for c in plan.moves:
            drift.setdefault(c.from_host, {})[c.name] = f"moving to {c.host}"
    else:
        opened, failed = open_project_hosts(config, opts.hosts)
    rows: list[dict[str, Any]] = []
    try:
        for name, (hv, live) in opened.items():
            for row in inventory(opts.what, live, hv, config.name):
                if drift and opts.what != "snapshots":  # a snapshot is not in manifests yet
                    state = drift.get(name, {}).get(row["name"], "not in manifests")
                    row["drift"] = None if state == "no-op" else state
                rows.append({"host": name, **row} if config.multi_host else row)
    finally:
        if deployment is not None:
            deployment.close()
        else:
            for hv, _ in opened.values():
                hv.close()
    for name, uri, why in failed:
        env.stderr.write(f"error: host {name} ({uri}) is unreachable: {why}\n")
    status = ExitStatus.ERROR if failed else ExitStatus.OK
    if opts.output == "json":
        json.dump(rows, env.stdout, indent=2)
        env.stdout.write("\n")
        return status
    if not rows:
        where = ", ".join(f"{h.name} ({h.uri})" if config.multi_host else h.uri
                          for h in config.hosts if not opts.hosts or h.name in opts.hosts)
        env.stdout.write(f"No {opts.what} of project {config.name!r} on {where}.\n")
        return status
    print_table(rows, env.stdout)
    return status
