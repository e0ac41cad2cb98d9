"""Golden plans: manifests + a recorded live state -> the plan JSON, without libvirt.

Each folder of ``tests/golden/plan/`` is one case:

``manifest.yaml``
    The manifests (any number of documents).
``live.json``
    A serialized ``kvmctl.host.state.LiveState`` (see ``live_from_json``): domains with their
    inactive (and, when running, live) XML, networks, pools with their volumes and the owners
    kvmctl's ownership records give them. Recorded from a real libvirt (``virsh dumpxml
    --inactive`` output, with every default libvirt adds) by ``live_to_json`` -- see
    ``tests/golden/plan/README.md``.
``options.json`` (optional)
    ``kvmctl.plan.Options`` fields other than the default project ``golden``, e.g.
    ``{"prune": true}``; ``domain_type`` (default ``qemu``) is the rendering's.
``expected.json``
    ``kvmctl.plan.types.plan_json`` of the plan, or ``{"error": "<PlanError message>"}``.
``steps.json``
    Every change's typed steps, by ref (``kvmctl.plan.types.steps_json``): each step's
    operation and every argument by name, units in the names (``size_bytes``, ``kib``). A
    change to what apply would execute fails the case even when the plan JSON is the same.

``KVMCTL_UPDATE_GOLDEN=1 pytest tests/unit/test_plan_golden.py`` rewrites every expected.json
from the current planner (review the diff before committing it).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kvmctl.engine import host_facts
from kvmctl.errors import PlanError
from kvmctl.host.ownership import Owner, owner_from_xml
from kvmctl.host.state import LiveDomain, LiveNetwork, LivePool, LiveState, LiveVolume
from kvmctl.kinds import known_kind
from kvmctl.manifest import documents, validate
from kvmctl.plan import Options, make_plan
from kvmctl.plan.types import plan_json, steps_json
from kvmctl.render.definitions import render_desired

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "plan"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "manifest.yaml").is_file()) \
    if GOLDEN.is_dir() else []
UPDATE = os.environ.get("KVMCTL_UPDATE_GOLDEN") == "1"
URI = "qemu:///system"


# ---- LiveState <-> JSON --------------------------------------------------------------------------

def _owner_json(owner: Owner | None) -> dict[str, Any] | None:
    if owner is None:
        return None
    return {"project": owner.project, "kind": owner.kind, "name": owner.name,
            "spec_hash": owner.spec_hash, "seed_hash": owner.seed_hash,
            "protect": owner.protect}


def _owner(data: dict[str, Any] | None) -> Owner | None:
    return Owner(**{**data, "kind": known_kind(data["kind"])}) if data else None


def live_to_json(live: LiveState, keep: Any = lambda name: True) -> dict[str, Any]:
    """The JSON form of a LiveState, limited to objects whose name ``keep`` accepts.

    Domain and network owners are not stored: they are read back from the XML's metadata, as
    kvmctl.hypervisor does. Pool and volume owners come from ownership records (volumes that
    are not in the XML), so they are stored.
    """
    return {
        "domains": [{"name": d.name, "uuid": d.uuid, "state": d.state, "autostart": d.autostart,
                     "inactive_xml": d.inactive_xml, "live_xml": d.live_xml}
                    for d in live.domains.values() if keep(d.name)],
        "networks": [{"name": n.name, "uuid": n.uuid, "active": n.active,
                      "autostart": n.autostart, "xml": n.xml}
                     for n in live.networks.values() if keep(n.name)],
        "pools": [{"name": p.name, "uuid": p.uuid, "xml": p.xml, "path": p.path,
                   "active": p.active, "autostart": p.autostart, "owner": _owner_json(p.owner),
                   "volumes": [{"name": v.name, "path": v.path, "capacity": v.capacity_bytes,
                                "format": v.format, "backing_path": v.backing_path,
                                "owner": _owner_json(v.owner)} for v in p.volumes]}
                  for p in live.pools.values() if keep(p.name)],
        "host_bridges": sorted(b for b in live.host_bridges if keep(b)),
    }


def live_from_json(data: dict[str, Any]) -> LiveState:
    domains = {d["name"]: LiveDomain(d["name"], d["uuid"], d["inactive_xml"], d.get("live_xml"),
                                     d["state"], d["autostart"], owner_from_xml(d["inactive_xml"]))
               for d in data.get("domains", [])}
    networks = {n["name"]: LiveNetwork(n["name"], n["uuid"], n["xml"], n["active"],
                                       n["autostart"], owner_from_xml(n["xml"]))
                for n in data.get("networks", [])}
    pools = {p["name"]: LivePool(p["name"], p["uuid"], p["xml"], p["path"], p["active"],
                                 p["autostart"], _owner(p.get("owner")),
                                 tuple(LiveVolume(p["name"], v["name"], v["path"], v["capacity"],
                                                  v["format"], v.get("backing_path"),
                                                  _owner(v.get("owner")))
                                       for v in p.get("volumes", [])))
             for p in data.get("pools", [])}
    return LiveState(domains, networks, pools, frozenset(data.get("host_bridges", [])))


# ---- running a case ------------------------------------------------------------------------------

def plan_case(case: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plan JSON, steps by ref) of a case; an error is the plan JSON {"error": ...}."""
    live = live_from_json(json.loads((case / "live.json").read_text()))
    # Parsed under a fixed name, so that located errors read the same from any directory.
    docs = documents.parse_text((case / "manifest.yaml").read_text(), "manifest.yaml")
    manifest = validate.validate(docs, host_facts(live))
    extra = json.loads((case / "options.json").read_text()) \
        if (case / "options.json").is_file() else {}
    domain_type = extra.pop("domain_type", "qemu")
    opts = Options(**{"project": "golden", **extra})
    desired = render_desired(manifest, opts.project, domain_type, live.hints())
    try:
        plan = make_plan(manifest, desired, live, opts, URI)
    except PlanError as exc:
        return {"error": str(exc)}, {}
    return plan_json(plan), steps_json(plan)


def _check(case: str, name: str, got: dict[str, Any]) -> None:
    expected_file = GOLDEN / case / name
    if UPDATE:
        expected_file.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert expected_file.is_file(), \
        f"{expected_file} is missing: run with KVMCTL_UPDATE_GOLDEN=1 to create it"
    expected = json.loads(expected_file.read_text())
    if got != expected:
        diff = difflib.unified_diff(
            json.dumps(expected, indent=2, sort_keys=True).splitlines(),
            json.dumps(got, indent=2, sort_keys=True).splitlines(),
            f"{case}/{name} (expected)", "planned now", lineterm="", n=2)
        pytest.fail(f"{name} of golden case {case!r} changed; if that is intended, regenerate "
                    "with KVMCTL_UPDATE_GOLDEN=1 and review the diff:\n" + "\n".join(diff),
                    pytrace=False)


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 6, f"expected at least 6 cases in {GOLDEN}, found {CASES}"


@pytest.mark.parametrize("case", CASES)
def test_plan_golden(case: str) -> None:
    plan, _ = plan_case(GOLDEN / case)
    _check(case, "expected.json", plan)


@pytest.mark.parametrize("case", CASES)
def test_plan_golden_steps(case: str) -> None:
    _, steps = plan_case(GOLDEN / case)
    _check(case, "steps.json", steps)


def test_live_json_round_trip() -> None:
    """The serialization used by the cases loses nothing the planner reads."""
    for case in CASES:
        data = json.loads((GOLDEN / case / "live.json").read_text())
        assert live_to_json(live_from_json(data)) == {
            "domains": data.get("domains", []), "networks": data.get("networks", []),
            "pools": data.get("pools", []), "host_bridges": sorted(data.get("host_bridges", []))}
