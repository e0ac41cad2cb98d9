"""The pipeline end to end, for the commands that talk to a hypervisor.

documents -> validated model -> rendered definitions -> live state -> plan -> result: a
`Session` connects, reads the host while the manifests load, validates them against what the
host has, renders them with the host's identities, and plans; `execute` applies a plan. Saved
plans (`plan --out`, `apply FILE`) are written and checked here. Nothing here prints: the CLI
reports what these functions return.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import json
import re
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TextIO

from .errors import (
    HypervisorError,
    KvmctlError,
    Location,
    ManifestError,
    PlanError,
    Problem,
    UnreachableError,
    UsageError,
)
from .host import facts
from .host.hypervisor import Hypervisor
from .host.ownership import Owner
from .host.state import LiveDomain, LiveState, fingerprint
from .kinds import Kind, ref
from .manifest import checks, documents, validate
from .manifest.documents import Document
from .manifest.model import ManifestSet
from .manifest.project import (
    HostConfig,
    Placement,
    ProjectConfig,
    place,
    split_project,
    with_defaults,
)
from .memo import Memo, open_memo, open_parse_memo
from .plan import Options, make_plan
from .plan.moves import HostView, plan_moves
from .plan.types import Change, ChangeClass, HostPlan, Plan, ProjectPlan, project_plan_json
from .plan.vm import pending_restart
from .render.specs import Desired
from .units import format_size
from .xmltext import first_non_xml_char

if TYPE_CHECKING:
    # Imported where they run: jinja2, pycdlib and the apply stage load while the hosts are
    # being connected to and read, not before (see Deployment).
    from . import apply

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
    kept: tuple[str, ...] = field(default=(), repr=False)  # see plan.context.Options
    allow_snapshot_loss: bool = False


@dataclass(frozen=True)
class LockRequest:
    """Hold the project's lock on every host of the run (apply, destroy): taken on each
    hypervisor in one order before the host is read, released when the Deployment closes."""

    timeout: float
    waiting: Callable[[str], object] | None = None
    command: str = "kvmctl apply"


@dataclass
class Prepared:
    """One set of documents, schema-checked and placed (with the project's defaults filled in),
    for every Deployment over the very same documents (a controller's rounds at one commit),
    and what those Deployments made of them: each host's model while the host's facts stay the
    same, each host's plan while its live state does. It holds the documents, so the
    identities it is keyed by stay theirs."""

    documents: list[Document]
    placement: Placement
    models: dict[str, tuple[checks.HostFacts, ManifestSet]] = field(default_factory=dict)
    # A host's last plan, with what it was made from: the same model, request and live state
    # (compared in full, every definition's text) make the same plan.
    plans: dict[str, tuple[ManifestSet, PlanRequest, LiveState, Plan, Desired | None]] = field(
        default_factory=dict)

    def holds(self, docs: list[Document]) -> bool:
        return len(docs) == len(self.documents) and all(
            a is b for a, b in zip(docs, self.documents, strict=True))


class Session:
    """One host of a Deployment: its connection, live state, validated and rendered manifests."""

    def __init__(self, target: Target, hv: Hypervisor, live: LiveState, memo: Memo | None,
                 docs: list[Document], prepared: Prepared | None = None,
                 host: str = "") -> None:
        """One host of a Deployment: connected and read, its documents placed and their schemas
        checked (Deployment does both for every host at once)."""
        self.target, self.hv, self.live, self.memo = target, hv, live, memo
        self.documents = docs
        self._prepared, self._host = prepared, host
        facts_now = host_facts(self.live)
        kept = prepared.models.get(host) if prepared is not None else None
        if kept is not None and kept[0] == facts_now:
            self.manifest: ManifestSet = kept[1]
        else:
            self.manifest = validate.validate(self.documents, facts_now, self.memo,
                                              schemas_checked=True)
            if prepared is not None:
                prepared.models[host] = (facts_now, self.manifest)
        self._domain_type: str | None = None
        self.rendered: Desired | None = None  # what the last plan compared with

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
        from .render.definitions import render_desired
        return render_desired(self.manifest if m is None else m, self.target.project,
                              self.domain_type, self.live.hints())

    def plan(self, request: PlanRequest = PlanRequest()) -> Plan:
        kept = self._prepared.plans.get(self._host) if self._prepared is not None else None
        if kept is not None and kept[0] is self.manifest and kept[1] == request \
                and kept[2] == self.live:
            self.rendered = kept[4]
            return kept[3]
        plan = self._plan(request)
        if self._prepared is not None:
            self._prepared.plans[self._host] = (self.manifest, request, self.live, plan,
                                                self.rendered)
        return plan

    def _plan(self, request: PlanRequest) -> Plan:
        opts = Options(self.target.project, request.prune, request.prune_disks, request.adopt,
                       request.allow_empty, request.targets, request.scope, kept=request.kept,
                       allow_snapshot_loss=request.allow_snapshot_loss)
        self.rendered = self.desired()
        plan = make_plan(self.manifest, self.rendered, self.live, opts, self.uri, self.memo)
        if self.memo is not None:
            self.memo.save()
        return plan

    def destroy_plan(self, with_disks: bool, everywhere: ManifestSet | None = None,
                     allow_snapshot_loss: bool = False) -> Plan:
        """Deleting what the manifests name: a prune against an empty wanted set, limited to
        those objects (and their seeds). `everywhere`: the project's manifests on every host
        (a VM that moved is deleted wherever it is)."""
        whole = everywhere or self.manifest
        named = {o.meta.ref for o in whole.all()}
        named |= {ref(Kind.SEED, vm.meta.name) for vm in whole.vms if vm.cloud_init}
        opts = Options(self.target.project, prune=True, prune_disks=with_disks,
                       allow_empty=True, scope=tuple(sorted(named)),
                       shutdown_timeouts=tuple((vm.meta.name, float(vm.shutdown_timeout))
                                               for vm in whole.vms),
                       allow_snapshot_loss=allow_snapshot_loss)
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


class Deployment:
    """A project over its hosts: every selected host connected and read in parallel (while the
    manifests load), the documents placed on hosts, one Session per host, one plan over all."""

    def __init__(self, config: ProjectConfig, paths: list[str] | None = None,
                 recursive: bool = False, stdin: TextIO | None = None,
                 docs: list[Document] | None = None, only: tuple[str, ...] = (),
                 lock: LockRequest | None = None, prepared: Prepared | None = None) -> None:
        if docs is None and not paths:
            raise UsageError("no manifests given: use -f FILE, -f DIR or -f -")
        unknown = sorted(set(only) - set(config.host_names))
        if unknown:
            raise UsageError(f"--host {unknown[0]}: not a host of the project (hosts: "
                             + ", ".join(config.host_names) + ")")
        self.config = config
        self.selected = tuple(h for h in config.hosts if not only or h.name in only)
        self._locks = contextlib.ExitStack()
        with _reader_switching(), ThreadPoolExecutor(max_workers=1) as pool:
            hosts = pool.submit(_open_hosts, self.selected, config.name, lock, self._locks)
            try:
                # jinja2 and the templates load here, while the hosts answer, not after.
                import kvmctl.render.definitions  # noqa: F401
                self.memo = open_memo("verdicts")
                if prepared is not None and docs is not None and prepared.holds(docs):
                    self.documents, self.placement = prepared.documents, prepared.placement
                else:
                    loaded = docs if docs is not None else documents.load(
                        paths or [], recursive=recursive, stdin=stdin, memo=open_parse_memo())
                    _, rest = split_project(loaded, config.source)
                    self.documents = with_defaults(rest, config)
                    validate.check_schemas(self.documents, self.memo)
                    self.placement = place(self.documents, config)
            except BaseException:
                opened_anyway = hosts.result() if hosts.exception() is None else {}
                self._locks.close()  # released through the connections, before they close
                _close_all(opened_anyway)
                raise  # a manifest problem is reported first, whatever the hosts say
            if hosts.exception() is not None:  # a lock not had, or another host error
                self._locks.close()
                raise hosts.exception()  # type: ignore[misc]
            opened = hosts.result()
        # The hosts --host leaves out: read, unlocked, where they answer, only so that a move
        # from one of them is seen (and refused) and no disk they hold is created empty here.
        self.watched: dict[str, tuple[Hypervisor, LiveState]] = {}
        self.unknown: dict[str, str] = {}
        self.sessions: dict[str, Session] = {}
        self._prepared = prepared
        try:
            self._prepare(opened)
        except BaseException:  # no lock or connection outlives a failed start
            self.close(opened)
            raise

    def _prepare(self, opened: dict[str, tuple[Hypervisor, LiveState]]) -> None:
        config = self.config
        left_out = tuple(h.name for h in config.hosts if h not in self.selected)
        if left_out:
            self.watched, failed = open_project_hosts(config, left_out)
            self.unknown = {name: why for name, _, why in failed}
        problems: list[Problem] = []
        for h in self.selected:
            hv, live = opened[h.name]
            try:
                self.sessions[h.name] = Session(Target(h.uri, config.name, h.domain_type), hv,
                                                live, self.memo,
                                                list(self.placement.by_host[h.name]),
                                                self._prepared, h.name)
            except ManifestError as exc:
                problems += [replace(p, message=f"{p.message} (on host {h.name})")
                             if config.multi_host else p for p in exc.problems]
        if problems:
            raise ManifestError(sorted(problems, key=lambda p: (
                p.location.file, p.location.line, p.location.column)))

    @property
    def project(self) -> str:
        return self.config.name

    def close(self, opened: dict[str, tuple[Hypervisor, LiveState]] | None = None) -> None:
        """Release the locks and the connections (these even when a release fails)."""
        try:
            self._locks.close()
        finally:
            for hv, _ in self.watched.values():
                hv.close()
            self.watched = {}
            for hv, _ in (opened or {}).values():
                hv.close()
            for s in self.sessions.values():
                s.hv.close()

    def plan(self, request: PlanRequest = PlanRequest()) -> ProjectPlan:
        views: dict[str, HostView] = {}
        anything = bool(self.documents)
        for name, session in self.sessions.items():
            kept = tuple(sorted(f"{d.kind}/{d.name}" for other, docs in
                                self.placement.by_host.items() if other != name for d in docs
                                if d.kind in (Kind.VM, Kind.DISK)))
            host_request = replace(request, targets=self._targets_on(name, request.targets),
                                   allow_empty=request.allow_empty or anything, kept=kept)
            if request.targets and not host_request.targets:
                plan = Plan(self.project, session.uri, ())
            else:
                plan = self._on_host(name, functools.partial(session.plan, host_request))
            plan = self._unknown_holders(plan)
            disks = session.rendered.disks if session.rendered is not None else {}
            views[name] = HostView(session.manifest, session.live, plan,
                                   {d.spec.name: d.xml for d in disks.values()})
        for name, (_, live) in self.watched.items():  # read to see moves, never changed
            views[name] = HostView(ManifestSet(), live, Plan(self.project, "", ()),
                                   read_only=True)
        plans, moves = plan_moves(self.project, views)
        plans = {name: plan for name, plan in plans.items() if name in self.sessions}
        if request.targets:
            wanted = {t.split(":", 1)[-1].lower() for t in request.targets}
            moves = tuple(c for c in moves if c.ref.lower() in wanted)
        return self._project_plan(plans, moves)

    def _unknown_holders(self, plan: Plan) -> Plan:
        """With hosts left out by --host that could not be read, any of them may hold a Disk's
        data or a VM with its disks: creating those empty here is refused until they can be."""
        if not self.unknown:
            return plan
        hosts = ", ".join(f"{n} ({why})" for n, why in sorted(self.unknown.items()))
        reason = (f"the hosts this run leaves out could not be read ({hosts}): one of them may "
                  "hold its data, so it is not created empty here; run again when they answer")
        creates_disk = {c.ref for c in plan.changes if c.kind is Kind.DISK
                        and c.change_class is ChangeClass.CREATE}
        out = []
        for c in plan.changes:
            if c.ref in creates_disk and not c.blocked:
                c = replace(c, steps=(), blocked=reason)
            elif c.steps and not c.blocked and set(c.depends) & creates_disk:
                # a VM's create, or an update attaching it: not without the disk
                needs = ", ".join(sorted(set(c.depends) & creates_disk))
                c = replace(c, steps=(), blocked=f"needs {needs}: {reason}")
            out.append(c)
        return replace(plan, changes=tuple(out))

    def destroy_plan(self, with_disks: bool, allow_snapshot_loss: bool = False) -> ProjectPlan:
        whole = self._whole()
        plans = {name: self._on_host(name, functools.partial(s.destroy_plan, with_disks, whole,
                                                             allow_snapshot_loss))
                 for name, s in self.sessions.items()}
        return self._project_plan(plans, ())

    def not_destroyed(self, plan: ProjectPlan) -> list[str]:
        out = []
        for h in plan.hosts:
            gone = self.sessions[h.host].not_destroyed(h.plan)
            out += [f"{h.host}:{r}" if self.config.multi_host else r for r in gone]
        return out

    def execute(self, plan: ProjectPlan, parallelism: int = 8,
                progress: apply.Progress | None = None,
                stop: Callable[[], bool] | None = None) -> apply.ProjectResult:
        from . import apply
        hosts = {name: (s.hv, s.live) for name, s in self.sessions.items()}
        return apply.run_project(plan, hosts, parallelism, progress, stop)

    def upkeep(self, plan: ProjectPlan) -> None:
        """The plan's upkeep alone, for an apply that found nothing to change."""
        from .apply import run_upkeep
        from .apply.executor import Executor
        for host in plan.hosts:
            if any(c.upkeep for c in host.plan.changes) and host.host in self.sessions:
                session = self.sessions[host.host]
                run_upkeep(host.plan, Executor(session.hv, session.live, plan.project))

    def _whole(self) -> ManifestSet:
        """Every object of the project, once (for destroy's scope)."""
        return ManifestSet.union(s.manifest for s in self.sessions.values())

    def _targets_on(self, host: str, targets: tuple[str, ...]) -> tuple[str, ...]:
        """The --target values for one host: HOST:KIND/NAME of it, and KIND/NAME present."""
        out = []
        names = {o.meta.ref.lower() for o in self.sessions[host].manifest.all()}
        for t in targets:
            where, _, what = t.rpartition(":")
            if where and where not in self.config.host_names:
                raise UsageError(f"--target {t}: {where!r} is not a host of the project")
            if where and where not in self.sessions:
                raise UsageError(f"--target {t}: host {where!r} is not part of this run "
                                 "(--host)")
            if where == host or (not where and what.lower() in names):
                out.append(what)
        everywhere = {o.lower() for s in self.sessions.values()
                      for o in (x.meta.ref for x in s.manifest.all())}
        for t in targets:
            where, _, what = t.rpartition(":")
            if not where and what.lower() not in everywhere:
                raise PlanError(f"--target {t}: no such object in the manifests "
                                "(write KIND/NAME or HOST:KIND/NAME, e.g. VirtualMachine/web)")
        return tuple(out)

    def _on_host(self, name: str, make: Callable[[], Plan]) -> Plan:
        try:
            return make()
        except PlanError as exc:
            if not self.config.multi_host:
                raise
            raise PlanError(f"host {name}: {exc}") from None

    def _project_plan(self, plans: dict[str, Plan], moves: tuple[Change, ...]) -> ProjectPlan:
        hosts = tuple(HostPlan(name, self.sessions[name].uri, replace(
            plan, changes=tuple(replace(c, host=name) for c in plan.changes)))
            for name, plan in plans.items())
        return ProjectPlan(self.project, hosts, moves, self.config.multi_host)


READER_SWITCH_INTERVAL = 0.0002  # seconds; the rest of a run keeps Python's own


@contextlib.contextmanager
def _reader_switching() -> Iterator[None]:
    """A shorter GIL switch interval while the hosts are read beside the manifests loading:
    each of the thousands of libvirt calls the readers make waits for the GIL when it returns,
    by default up to 5 ms while the loading holds it."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, READER_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _open_hosts(hosts: tuple[HostConfig, ...], project: str, lock: LockRequest | None,
                locks: contextlib.ExitStack) -> dict[str, tuple[Hypervisor, LiveState]]:
    """Every host connected (in parallel), locked (one after another, in name order, so two
    runs over the same hosts never wait on each other crosswise), then read (in parallel).
    UnreachableError naming every host that could not be connected to, or read."""
    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        conns = {h.name: c for h, c in zip(
            hosts, pool.map(lambda h: _attempt(lambda: Hypervisor(h.uri)), hosts), strict=True)}
        failed = [(h.name, h.uri, _why(conns[h.name])) for h in hosts
                  if isinstance(conns[h.name], BaseException)]
        hvs = {n: c for n, c in conns.items() if not isinstance(c, BaseException)}
        if failed:
            _close_all({n: (hv, LiveState()) for n, hv in hvs.items()})
            raise UnreachableError(failed)
        try:
            if lock is not None:
                from .apply.hostlock import holder_line, hypervisor_lock
                for h in sorted(hosts, key=lambda h: h.name):
                    locks.enter_context(hypervisor_lock(
                        hvs[h.name].lock_store(), project, holder_line(lock.command), lock.timeout,
                        _waiting_on(h, lock.waiting)))
            reads = dict(zip(hvs, pool.map(lambda hv: _attempt(hv.read), hvs.values()),
                             strict=True))
        except BaseException:
            locks.close()
            _close_all({n: (hv, LiveState()) for n, hv in hvs.items()})
            raise
    unread = [(h.name, h.uri, reads[h.name]) for h in hosts
              if isinstance(reads[h.name], BaseException)]
    if unread:  # connected, yet a read failed: that host's error, not an unreachable host
        locks.close()
        _close_all({n: (hv, LiveState()) for n, hv in hvs.items()})
        if len(hosts) == 1:
            raise unread[0][2]
        raise HypervisorError("\n".join(f"host {name} ({uri}): {exc}" for name, uri, exc in unread))
    return {n: (hvs[n], reads[n]) for n in hvs}


def _attempt(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except KvmctlError as exc:
        return exc


def _waiting_on(host: HostConfig, waiting: Callable[[str], object] | None
                ) -> Callable[[str], object] | None:
    if waiting is None:
        return None
    return lambda message: waiting(f"host {host.name}: {message}")


def _close_all(opened: dict[str, tuple[Hypervisor, LiveState]]) -> None:
    for hv, _ in opened.values():
        hv.close()


def _why(exc: object) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(": ", 1)[1] if text.startswith("cannot connect to ") else text


def open_host(uri: str) -> tuple[Hypervisor, LiveState]:
    """A connection and everything the host has, without manifests."""
    hv = Hypervisor(uri)
    return hv, hv.read()


def open_project_hosts(config: ProjectConfig, only: tuple[str, ...] = ()
                       ) -> tuple[dict[str, tuple[Hypervisor, LiveState]],
                                  list[tuple[str, str, str]]]:
    """Each host of the project (or of `only`) connected and read in parallel, without
    manifests: (the hosts read, (name, uri, why) of those that could not be)."""
    hosts = [h for h in config.hosts if not only or h.name in only]

    def one(h: HostConfig) -> Any:
        return _attempt(lambda: open_host(h.uri))

    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        results = dict(zip([h.name for h in hosts], pool.map(one, hosts), strict=True))
    failed = [(h.name, h.uri, _why(results[h.name])) for h in hosts
              if isinstance(results[h.name], BaseException)]
    return {n: r for n, r in results.items() if not isinstance(r, BaseException)}, failed


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

def save_plan(path: str, deployment: Deployment, request: PlanRequest,
              plan: ProjectPlan) -> None:
    config = deployment.config
    bodies = [d.body for d in deployment.documents]
    data = {"kind": PLAN_FILE_KIND, "format_version": 2, "project": config.name,
            "hosts": [{"name": h.name, "uri": h.uri, "domain_type": h.domain_type}
                      for h in config.hosts],
            "default_host": config.default_host,
            "only": [h.name for h in deployment.selected] if len(deployment.selected)
            != len(config.hosts) else [],
            "options": {"prune": request.prune, "prune_disks": request.prune_disks,
                        "adopt": request.adopt, "allow_empty": request.allow_empty,
                        "target": list(request.targets),
                        "allow_snapshot_loss": request.allow_snapshot_loss},
            "documents": bodies, "plan": project_plan_json(plan),
            "fingerprints": {_saved_key(c): _saved_value(c) for c in plan.changes}}
    data["manifest_fingerprint"] = _saved_fingerprint(data)
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def _saved_fingerprint(saved: dict[str, Any]) -> str:
    """Of everything a saved plan is made again from: an edit of any of it is refused."""
    return fingerprint(saved["documents"], saved["project"], saved["hosts"],
                       saved["default_host"], saved["only"], saved["options"])


def _saved_value(c: Change) -> str:
    """What must be the same when the plan is made again: the objects it looked at, and
    whether the change was blocked (a block lifted since must not apply unseen)."""
    return c.fingerprint + ("|blocked" if c.blocked else "")


def _saved_key(c: Change) -> str:
    """A change's key among a saved plan's fingerprints: a move's names both hosts, so it never
    shares one with its new host's own change of the same object."""
    key = f"{c.host}:{c.ref}"
    return f"{key}<-{c.from_host}" if c.change_class is ChangeClass.MOVE else key


@dataclass(frozen=True)
class SavedPlan:
    """What `plan --out` saved: enough to make the same plan again and compare it."""

    config: ProjectConfig
    documents: list[Document]
    request: PlanRequest
    only: tuple[str, ...]
    fingerprints: dict[str, str]
    path: str


def load_saved(path: str, connect: str | None = None,
               only: tuple[str, ...] = ()) -> SavedPlan:
    """A saved plan, checked for edits (PlanError) and for shape (UsageError)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read saved plan {path}: {exc}") from None
    if not isinstance(saved, dict) or saved.get("kind") != PLAN_FILE_KIND:
        raise UsageError(f"{path} is not a plan saved by `kvmctl plan --out`")
    if saved.get("format_version") != 2:
        raise UsageError(f"{path} was saved by another version of kvmctl (format "
                         f"{saved.get('format_version')!r}, this one reads 2): make a new plan")
    try:
        if _saved_fingerprint(saved) != saved["manifest_fingerprint"]:
            raise PlanError(f"{path} was modified after it was saved")
        if not all(isinstance(body, dict) for body in saved["documents"]):
            raise UsageError(f"{path} holds documents that are not mappings")
        options = saved["options"]
        request = PlanRequest(bool(options["prune"]), bool(options["prune_disks"]),
                              bool(options["adopt"]), bool(options["allow_empty"]),
                              tuple(str(t) for t in options["target"]),
                              allow_snapshot_loss=bool(options.get("allow_snapshot_loss")))
        project = str(saved["project"])
        default = str(saved["default_host"])
        hosts = tuple(HostConfig(str(h["name"]), connect if connect and h["name"] == default
                                 else str(h["uri"]), str(h["domain_type"]))
                      for h in saved["hosts"])
        if first_non_xml_char(project) >= 0 or "\n" in project or any(
                h.domain_type not in ("auto", "kvm", "qemu") for h in hosts) or not hosts:
            raise UsageError(f"{path} names a project, hosts or domain types kvmctl cannot "
                             f"use: {project!r}")
        docs = [Document(body, Location(f"{path}#document{i + 1}"), {})
                for i, body in enumerate(saved["documents"])]
        expected = {str(k): str(v) for k, v in saved["fingerprints"].items()}
        was_only = tuple(str(h) for h in saved["only"])
        names = [h.name for h in hosts]
        if not project or len(set(names)) != len(names) or default not in names or len(
                {h.uri for h in hosts}) != len(hosts) or not set(was_only) <= set(names):
            raise UsageError(f"{path} names hosts kvmctl cannot use (a name or URI twice, no "
                             "default host, or an unknown one): make a new plan")
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path} is not a complete saved plan ({exc})") from None
    config = ProjectConfig(project, hosts, default, {}, None)
    return SavedPlan(config, docs, request, only or was_only, expected, path)


def check_saved(saved: SavedPlan, plan: ProjectPlan) -> None:
    """PlanError unless the plan made now is the one that was saved."""
    now = {_saved_key(c): _saved_value(c) for c in plan.changes}
    moved = sorted(r for r in set(now) | set(saved.fingerprints)
                   if now.get(r) != saved.fingerprints.get(r))
    if moved:
        raise PlanError(f"the host{'s' if plan.multi_host else ''} changed since the plan was "
                        "saved, refusing to apply it: " + ", ".join(moved) + "; make a new plan")


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
    if what == "snapshots":  # of the project's VMs: kvmctl's and anybody's, saying whose
        rows = []
        for d in live.domains.values():
            if not (mine(d.owner) and d.snapshots):
                continue
            sizes = hv.snapshot_sizes(d.name)
            rows += [{"vm": d.name, "name": s.name,
                      "date": dt.datetime.fromtimestamp(s.created, dt.UTC).strftime(
                          "%Y-%m-%d %H:%M:%S"), "created": s.created,
                      "size": format_size(sizes[s.name]) if s.name in sizes else "-",
                      "state": s.state, "parent": s.parent, "memory": s.memory,
                      "external": s.external, "owned": s.project == project,
                      "origin": str(s.origin) if s.project == project and s.origin else "-",
                      "current": s.current}
                     for s in hv.snapshots(d.name)]
        return rows
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
    from .apply.readiness import nic_addresses
    ips = [ip for _, ip in nic_addresses(nics, leases, agent)]
    pending = pending_restart(d.inactive_xml, d.live_xml, resolve) if d.live_xml else []
    return {"name": d.name, "state": d.state, "addresses": ips, "autostart": d.autostart,
            "pending_restart": pending}
