"""`kvmctl get`: managed objects with their state, addresses, pending restarts and drift."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .cli import Env, ExitStatus, default_uri
from .cli_engine import Session


def cmd_get(args: argparse.Namespace, env: Env) -> int:
    from .hypervisor import Hypervisor
    session = Session(args, env) if args.filename else None
    hv = session.hv if session else Hypervisor(args.connect or default_uri())
    live = session.live if session else hv.read()
    rows = _rows(args.what, live, hv, args.project)
    if session:  # with manifests: show how each object differs from them (drift)
        kinds = {"vms": "VirtualMachine", "networks": "Network", "disks": "Disk",
                 "pools": "StoragePool", "images": "Image"}
        plan = session.plan()
        drift = {c.name: c.klass for c in plan.changes if c.kind == kinds[args.what]}
        for row in rows:
            row["drift"] = drift.get(row["name"], "not in manifests")
            if row["drift"] == "no-op":
                row["drift"] = None
    if args.output == "json":
        json.dump(rows, env.stdout, indent=2)
        env.stdout.write("\n")
        return ExitStatus.OK
    if not rows:
        env.stdout.write(f"No {args.what} of project {args.project!r} on "
                         f"{args.connect or default_uri()}.\n")
        return ExitStatus.OK
    from rich.console import Console
    from rich.table import Table
    table = Table(box=None, pad_edge=False)
    columns = list(rows[0]) if rows else ["name"]
    for col in columns:
        table.add_column(col.upper())
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    Console(file=env.stdout, highlight=False, width=200).print(table)
    return ExitStatus.OK


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value in (None, "") else str(value)


def _rows(what: str, live: Any, hv: Any, project: str) -> list[dict[str, Any]]:
    from . import compare
    from .readiness import nic_addresses
    mine = lambda owner: owner is not None and owner.project == project  # noqa: E731
    if what == "vms":
        leases: dict[str, list] = {}
        rows = []
        for d in live.domains.values():
            if not mine(d.owner):
                continue
            facts = compare.domain_facts(d.live_xml or d.inactive_xml)
            nics = [(key[4:], nic[1] if nic[0] == "network" else None)
                    for key, nic in facts.items() if key.startswith("nic:")]
            for _, network in nics:  # each network's leases are read once
                if network and network not in leases:
                    net = live.networks.get(network)
                    leases[network] = hv.dhcp_leases(network) if net and net.active else []
            agent = hv.agent_addresses(d.name) if d.running and facts["guestAgent"] else {}
            ips = [ip for _, ip in nic_addresses(nics, leases, agent)]
            pending = [c.field for c in compare.diff(compare.domain_facts(d.inactive_xml),
                                                     compare.domain_facts(d.live_xml))
                       if compare.domain_field_class(c) == compare.RESTART] if d.running else []
            rows.append({"name": d.name, "state": d.state, "addresses": ips,
                         "autostart": d.autostart, "pending_restart": pending})
        return rows
    if what == "networks":
        return [{"name": n.name, "active": n.active, "autostart": n.autostart}
                for n in live.networks.values() if mine(n.owner)]
    if what == "pools":
        return [{"name": p.name, "path": p.path, "active": p.active, "autostart": p.autostart}
                for p in live.pools.values() if mine(p.owner)]
    kind = {"disks": "Disk", "images": "Image"}[what]
    return [{"name": v.owner.name, "pool": v.pool, "volume": v.name, "capacity": v.capacity,
             "format": v.format, "protect": v.owner.protect}
            for p in live.pools.values() for v in p.volumes if mine(v.owner)
            and v.owner.kind == kind]
