"""The pipeline end to end, for the commands that talk to a hypervisor.

documents -> validated model -> rendered definitions -> live state -> plan -> result: a
`Session` connects, reads the host while the manifests load, validates them against what the
host has, renders them with the host's identities, and plans; `execute` applies a plan. Saved
plans (`plan --out`, `apply FILE`) are written and checked here. Nothing here prints: the CLI
reports what these functions return.
"""

from __future__ import annotations

import ipaddress
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from . import apply
from .apply.readiness import nic_addresses
from .errors import Location, PlanError, UsageError
from .host import facts
from .host.hypervisor import Hypervisor
from .host.ownership import Owner
from .host.state import LiveDomain, LiveState, fingerprint
from .kinds import Kind, ref
from .manifest import checks, documents, validate
from .manifest.documents import Document
from .manifest.model import ManifestSet
from .memo import open_memo, open_parse_memo
from .plan import Options, make_plan
from .plan.types import Plan, plan_json
from .plan.vm import pending_restart
from .render.definitions import render_desired
from .render.specs import Desired
from .xmltext import first_non_xml_char

PLAN_FILE_KIND = "kvmctl-saved-plan"


@dataclass(frozen=True)
class Target:
    """Which hypervisor, which owner, and the domain type for VMs that set none."""

    uri: str
    project: str
    domain_type: str = "auto"  # auto | kvm | qemu


@dataclass(frozen=True)
class PlanRequest:
    """What a plan may do besides creating and updating (the plan options of the CLI)."""

    prune: bool = False
    prune_disks: bool = False
    adopt: bool = False
    allow_empty: bool = False
    targets: tuple[str, ...] = ()
    scope: tuple[str, ...] = field(default=(), repr=False)


class Session:
    """Connection, live state, validated and rendered manifests for one command."""

    def __init__(self, target: Target, paths: list[str] | None = None, recursive: bool = False,
                 stdin: TextIO | None = None, docs: list[Document] | None = None) -> None:
        if docs is None and not paths:
            raise UsageError("no manifests given: use -f FILE, -f DIR or -f -")
        self.target = target
        self.hv = Hypervisor(target.uri)
        # Reading the host is mostly waiting for libvirtd: it overlaps with parsing manifests.
        with ThreadPoolExecutor(max_workers=1) as pool:
            reading = pool.submit(self.hv.read)
            try:
                self.documents = docs if docs is not None else documents.load(
                    paths or [], recursive=recursive, stdin=stdin, memo=open_parse_memo())
            except BaseException:
                reading.cancel()
                raise  # a manifest problem is reported first, whatever the host says
            self.live: LiveState = reading.result()
        self.memo = open_memo("verdicts")
        self.manifest: ManifestSet = validate.validate(self.documents, host_facts(self.live),
                                                       self.memo)
        self._domain_type: str | None = None

    @property
    def uri(self) -> str:
        return self.target.uri

    @property
    def domain_type(self) -> str:
        """kvm or qemu: as asked, or for auto, kvm when the host CPU can virtualise."""
        if self.target.domain_type in ("kvm", "qemu"):
            return self.target.domain_type
        if self._domain_type is None:
            self._domain_type = "kvm" if self.hv.host_has_virt() else "qemu"
        return self._domain_type

    def desired(self, m: ManifestSet | None = None) -> Desired:
        return render_desired(self.manifest if m is None else m, self.target.project,
                              self.domain_type, self.live.hints())

    def plan(self, request: PlanRequest = PlanRequest()) -> Plan:
        opts = Options(self.target.project, request.prune, request.prune_disks, request.adopt,
                       request.allow_empty, request.targets, request.scope)
        plan = make_plan(self.manifest, self.desired(), self.live, opts, self.uri, self.memo)
        self.memo.save()
        return plan

    def destroy_plan(self, with_disks: bool) -> Plan:
        """Deleting what the manifests name: a prune against an empty wanted set, limited to
        those objects (and their seeds)."""
        named = {o.meta.ref for o in self.manifest.all()}
        named |= {ref(Kind.SEED, vm.meta.name) for vm in self.manifest.vms if vm.cloud_init}
        opts = Options(self.target.project, prune=True, prune_disks=with_disks,
                       allow_empty=True, scope=tuple(sorted(named)),
                       shutdown_timeouts=tuple((vm.meta.name, float(vm.shutdown_timeout))
                                               for vm in self.manifest.vms))
        empty = ManifestSet()
        everything = make_plan(empty, self.desired(empty), self.live, opts, self.uri)
        # The planner's advice names prune's flag; destroy's own is --with-disks.
        changes = tuple(replace(c, blocked=c.blocked.replace("--prune-disks", "--with-disks"))
                        if c.blocked else c for c in everything.changes if c.ref in named)
        return replace(everything, changes=changes)

    def not_destroyed(self, plan: Plan) -> list[str]:
        """Objects the manifests name that the host has but a destroy plan leaves alone
        (another project's, or nobody's): a destroy says so instead of leaving them silently."""
        live, m = self.live, self.manifest
        present = {ref(Kind.VM, n) for n in live.domains}
        present |= {ref(Kind.NETWORK, n) for n in live.networks}
        present |= {ref(Kind.POOL, n) for n in live.pools}
        present |= {d.meta.ref for d in m.disks if live.volume(d.pool, d.volume) is not None}
        present |= {i.meta.ref for i in m.images if live.volume(i.pool, i.volume) is not None}
        planned = {c.ref for c in plan.changes}
        return sorted(o.meta.ref for o in m.all() if o.meta.ref in present - planned)

    def execute(self, plan: Plan, parallelism: int = 8,
                progress: apply.Progress | None = None) -> apply.ApplyResult:
        return apply.run(plan, self.hv, self.live, parallelism, progress)


def open_host(uri: str) -> tuple[Hypervisor, LiveState]:
    """A connection and everything the host has, without manifests."""
    hv = Hypervisor(uri)
    return hv, hv.read()


def host_facts(live: LiveState) -> checks.HostFacts:
    """What validation needs to know of the host: names that exist there, and its subnets."""
    subnets = []
    for net in live.networks.values():
        ipv4 = facts.network_facts(net.xml)["ipv4"]
        if ipv4 is not None and ipv4.address and ipv4.prefix:
            try:
                subnets.append((net.name, ipaddress.IPv4Network(
                    f"{ipv4.address}/{ipv4.prefix}", strict=False)))
            except ValueError:
                continue  # not IPv4 (libvirt also has IPv6 networks): no overlap check
    macs = {d.name: tuple(m.lower() for m in _MAC.findall(d.inactive_xml))
            for d in live.domains.values()}
    return checks.HostFacts(frozenset(live.networks), frozenset(live.pools), tuple(subnets),
                            macs)


# A domain's MACs, without parsing its whole definition (this runs over every domain per plan).
_MAC = re.compile(r"<mac\s+address=['\"]([0-9A-Fa-f:]{17})['\"]")


# ---- saved plans --------------------------------------------------------------------------------

def save_plan(path: str, session: Session, request: PlanRequest, plan: Plan) -> None:
    bodies = [d.body for d in session.documents]
    data = {"kind": PLAN_FILE_KIND, "format_version": 1, "uri": session.uri,
            "project": session.target.project, "domain_type": session.domain_type,
            "options": {"prune": request.prune, "prune_disks": request.prune_disks,
                        "adopt": request.adopt, "allow_empty": request.allow_empty,
                        "target": list(request.targets)},
            "manifest_fingerprint": fingerprint(bodies), "documents": bodies,
            "plan": plan_json(plan),
            "fingerprints": {c.ref: c.fingerprint for c in plan.changes}}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def load_saved(path: str, uri: str | None) -> tuple[Session, Plan]:
    """The session and plan of a saved plan, made again against the host now; PlanError if
    the file was edited or anything the plan looked at changed since."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read saved plan {path}: {exc}") from None
    if not isinstance(saved, dict) or saved.get("kind") != PLAN_FILE_KIND:
        raise UsageError(f"{path} is not a plan saved by `kvmctl plan --out`")
    try:
        if fingerprint(saved["documents"]) != saved["manifest_fingerprint"]:
            raise PlanError(f"{path} was modified after it was saved")
        options = saved["options"]
        request = PlanRequest(bool(options["prune"]), bool(options["prune_disks"]),
                              bool(options["adopt"]), bool(options["allow_empty"]),
                              tuple(str(t) for t in options["target"]))
        target = Target(uri or str(saved["uri"]), str(saved["project"]),
                        str(saved["domain_type"]))
        if first_non_xml_char(target.project) >= 0 or "\n" in target.project \
                or target.domain_type not in ("auto", "kvm", "qemu"):
            raise UsageError(f"{path} names a project or domain type kvmctl cannot use: "
                             f"{target.project!r}, {target.domain_type!r}")
        docs = [Document(body, Location(f"{path}#document{i + 1}"), {})
                for i, body in enumerate(saved["documents"])]
        expected = {str(k): str(v) for k, v in saved["fingerprints"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path} is not a complete saved plan ({exc})") from None
    session = Session(target, docs=docs)
    plan = session.plan(request)
    now = {c.ref: c.fingerprint for c in plan.changes}
    moved = sorted(r for r in set(now) | set(expected) if now.get(r) != expected.get(r))
    if moved:
        raise PlanError("the host changed since the plan was saved, refusing to apply it: "
                        + ", ".join(moved) + "; make a new plan")
    return session, plan



# ---- inventory (kvmctl get) ---------------------------------------------------------------------

INVENTORY_KINDS = {"vms": Kind.VM, "networks": Kind.NETWORK, "disks": Kind.DISK,
                   "pools": Kind.POOL, "images": Kind.IMAGE}


def inventory(what: str, live: LiveState, hv: Hypervisor, project: str) -> list[dict[str, Any]]:
    """The project's objects of one kind as rows: state, addresses, pending restarts."""
    def mine(owner: Owner | None) -> bool:
        return owner is not None and owner.project == project

    if what == "vms":
        resolve = facts.volume_resolver(live)
        return [_vm_row(d, live, hv, resolve) for d in live.domains.values() if mine(d.owner)]
    if what == "networks":
        return [{"name": n.name, "active": n.active, "autostart": n.autostart}
                for n in live.networks.values() if mine(n.owner)]
    if what == "pools":
        return [{"name": p.name, "path": p.path, "active": p.active, "autostart": p.autostart}
                for p in live.pools.values() if mine(p.owner)]
    kind = INVENTORY_KINDS[what]
    return [{"name": v.owner.name, "pool": v.pool, "volume": v.name,
             "capacity": v.capacity_bytes, "format": v.format, "protect": v.owner.protect}
            for p in live.pools.values() for v in p.volumes
            if v.owner is not None and mine(v.owner) and v.owner.kind == kind]


def _vm_row(d: LiveDomain, live: LiveState, hv: Hypervisor,
            resolve: facts.VolumeResolver) -> dict[str, Any]:
    domain_facts = facts.domain_facts(d.live_xml or d.inactive_xml)
    nics = [(facts.key_id(key), nic.source if nic.type == "network" else None)
            for key, nic in domain_facts.items() if isinstance(nic, facts.NicFact)]
    leases: dict[str, list[dict[str, Any]]] = {}
    for _, network in nics:  # each network's leases are read once
        if network and network not in leases:
            net = live.networks.get(network)
            leases[network] = hv.dhcp_leases(network) if net and net.active else []
    agent = hv.agent_addresses(d.name) if d.running and domain_facts["guestAgent"] else {}
    ips = [ip for _, ip in nic_addresses(nics, leases, agent)]
    pending = pending_restart(d.inactive_xml, d.live_xml, resolve) if d.live_xml else []
    return {"name": d.name, "state": d.state, "addresses": ips, "autostart": d.autostart,
            "pending_restart": pending}
