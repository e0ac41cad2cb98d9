"""The project file and placement: which project owns the manifests, which libvirt hosts they
go to, and which documents live on which host.

The project file is a document of kind Project (`kvmctl.yaml`), found from the `-f` paths upward
the way git finds `.git`, or named with `--project-file`. Without one, a run has one host (the
`--connect` URI) named `default`, and the project comes from `--project`: what every command did
before projects had files. Flags and their environment variables override the file.

Placement happens on documents that passed their schemas, before the per-host model is built:
a VM names its host (`spec.host`) or takes the default; Networks, StoragePools and Images name
`hosts` (a list, or "all"); a Disk lives on the host of the VMs that use it, a VM's cloud-init
seed beside it. Every reference a VM makes must then be satisfied on its own host, which is
checked here, with the location of the reference.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Location, ManifestError, Problem, UsageError
from ..kinds import PROJECT_FILE, PROJECT_KIND, Kind
from .documents import Document, json_path
from .documents import load as load_documents

DEFAULT_HOST = "default"


@dataclass(frozen=True)
class HostConfig:
    name: str
    uri: str
    domain_type: str = "auto"  # auto | kvm | qemu
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ProjectConfig:
    """Who owns the run's objects and where they go."""

    name: str
    hosts: tuple[HostConfig, ...]
    default_host: str
    vm_defaults: Mapping[str, Any] = field(default_factory=dict, compare=False)
    source: str | None = None  # the project file, when there is one

    def host(self, name: str) -> HostConfig:
        return next(h for h in self.hosts if h.name == name)

    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hosts)

    @property
    def multi_host(self) -> bool:
        return len(self.hosts) > 1


@dataclass(frozen=True)
class Overrides:
    """What the command line (or its environment variables) says, overriding the file."""

    project: str | None = None
    connect: str | None = None
    domain_type: str | None = None


def find_project_file(targets: Iterable[str], start: str | None = None) -> str | None:
    """The `kvmctl.yaml` nearest above the `-f` paths (standard input: the working directory),
    stopping at the top of a git repository or of the file system; UsageError when the paths
    lead to two different project files."""
    found: set[str] = set()
    for target in targets or ["-"]:
        base = Path(start or os.getcwd()) if target == "-" else Path(target)
        folder = base if base.is_dir() else base.parent
        hit = _upward(folder.resolve())
        if hit is not None:
            found.add(str(hit))
    if len(found) > 1:
        raise UsageError("the -f paths lie under different project files: "
                         + ", ".join(sorted(found)) + "; give one with --project-file")
    return next(iter(found), None)


def _upward(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        if (candidate / PROJECT_FILE).is_file():
            return candidate / PROJECT_FILE
        if (candidate / ".git").exists():
            return None  # a project file above the repository is not this repository's
    return None


def load_project_file(path: str, memo: Any = None,
                      parsed: Callable[[Document], object] | None = None) -> Document:
    """The Project document of `path`, schema-checked (ManifestError, located, if not);
    `memo` (memo.Memo) remembers a project file that passed, as for every document; `parsed`
    sees the document before its schema check (the CLI starts connecting to its hosts)."""
    if not os.path.isfile(path):
        raise UsageError(f"project file {path} does not exist")
    docs = load_documents([path])
    projects = [d for d in docs if d.kind == PROJECT_KIND]
    if len(docs) != 1 or len(projects) != 1:
        where = docs[0].source if docs else Location(path)
        raise ManifestError([Problem(
            f"a project file holds exactly one document of kind {PROJECT_KIND}", where,
            hint="apiVersion: kvmctl/v1, kind: Project, metadata: {name: ...}")])
    if parsed is not None:
        parsed(projects[0])
    from .validate import schema_problems
    problems = schema_problems(projects[0], memo)
    if problems:
        raise ManifestError(problems)
    if memo is not None:
        memo.save()
    return projects[0]


def resolve(doc: Document | None, overrides: Overrides) -> ProjectConfig:
    """The run's configuration: the project file's, with the command line's overrides."""
    body: dict[str, Any] = doc.body if doc is not None else {}
    spec = body.get("spec") or {}
    name = overrides.project or (body.get("metadata") or {}).get("name") or "default"
    hosts = [HostConfig(h["name"], h["uri"], h.get("domainType", "auto"),
                        tuple(sorted((h.get("labels") or {}).items())))
             for h in spec.get("hosts", ())]
    if not hosts:
        hosts = [HostConfig(DEFAULT_HOST, "")]
    problems = []
    seen: set[str] = set()
    uris: dict[str, str] = {}
    for i, h in enumerate(hosts):
        if h.name in seen and doc is not None:
            problems.append(Problem(f"duplicate host {h.name!r}",
                                    doc.locate(("spec", "hosts", i, "name")),
                                    json_path(("spec", "hosts", i, "name"))))
        if h.uri and h.uri in uris and doc is not None:
            # One hypervisor under two names would plan moves from itself to itself, deleting
            # what it copies.
            problems.append(Problem(f"host {h.name!r} has the URI of host {uris[h.uri]!r}",
                                    doc.locate(("spec", "hosts", i, "uri", "<value>")),
                                    json_path(("spec", "hosts", i, "uri")),
                                    hint="one entry per hypervisor"))
        seen.add(h.name)
        uris.setdefault(h.uri, h.name)
    default = spec.get("defaultHost") or hosts[0].name
    if default not in seen and doc is not None:
        problems.append(Problem(
            f"defaultHost {default!r} is not one of the hosts", doc.locate(
                ("spec", "defaultHost", "<value>")), "spec.defaultHost",
            hint="hosts: " + ", ".join(h.name for h in hosts)))
    if problems:
        raise ManifestError(problems)
    resolved = []
    for h in hosts:
        uri = h.uri
        if h.name == default and overrides.connect:
            uri = overrides.connect  # --connect: where the default host is reached
        if not uri:
            uri = os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
        domain_type = overrides.domain_type or h.domain_type
        resolved.append(HostConfig(h.name, uri, domain_type, h.labels))
    by_uri: dict[str, str] = {}
    for h in resolved:
        if h.uri in by_uri:
            raise UsageError(f"hosts {by_uri[h.uri]!r} and {h.name!r} would both be {h.uri} "
                             "(--connect, $KVMCTL_CONNECT or the project file): one hypervisor "
                             "under two names")
        by_uri[h.uri] = h.name
    defaults = (spec.get("defaults") or {}).get("virtualMachine") or {}
    return ProjectConfig(name, tuple(resolved), default, defaults,
                         str(doc.source.file) if doc is not None else None)


def probable_uris(doc: Document | None, overrides: Overrides,
                  only: tuple[str, ...] = ()) -> list[str]:
    """The URIs a run will most likely connect to, read from a project document that has not
    been schema-checked yet (whatever does not look right is left out): only to start the
    handshakes early, never to decide anything."""
    body: dict[str, Any] = doc.body if doc is not None and isinstance(doc.body, dict) else {}
    spec: dict[str, Any] = body["spec"] if isinstance(body.get("spec"), dict) else {}
    listed = spec.get("hosts")
    hosts = [h for h in (listed if isinstance(listed, list) else []) if isinstance(h, dict)
             and isinstance(h.get("name"), str) and isinstance(h.get("uri"), str)]
    if not hosts:
        return [overrides.connect] if overrides.connect else []
    default = spec.get("defaultHost", hosts[0]["name"])
    return [overrides.connect if overrides.connect and h["name"] == default else h["uri"]
            for h in hosts if not only or h["name"] in only]


def split_project(docs: Sequence[Document], project_file: str | None
                  ) -> tuple[Document | None, list[Document]]:
    """The Project document among loaded ones (a directory given with -f may hold the project
    file) and the manifests; a Project document other than the project file in use is a
    located error, as is a second one."""
    projects = [d for d in docs if d.kind == PROJECT_KIND]
    rest = [d for d in docs if d.kind != PROJECT_KIND]
    chosen: Document | None = None
    problems = []
    for d in projects:
        same = project_file is not None and _same_file(d.source.file, project_file)
        if same and chosen is None:
            chosen = d
        else:
            problems.append(Problem(
                "a Project document that is not the project file of this run"
                + (f" ({project_file})" if project_file else ""), d.source,
                hint="one project file per run: kvmctl.yaml above the manifests, or "
                     "--project-file"))
    if problems:
        raise ManifestError(problems)
    return chosen, rest


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def with_defaults(docs: Sequence[Document], config: ProjectConfig) -> list[Document]:
    """VM documents with the project's VM defaults filled into what their spec leaves out."""
    if not config.vm_defaults:
        return list(docs)
    out = []
    for d in docs:
        spec = d.body.get("spec") if isinstance(d.body, dict) else None
        if d.kind == Kind.VM and isinstance(spec, dict):
            missing = {k: copy.deepcopy(v) for k, v in config.vm_defaults.items()
                       if k not in spec}
            if missing:
                body = dict(d.body)
                body["spec"] = {**spec, **missing}
                d = Document(body, d.source, d.positions)
        out.append(d)
    return out


# ---- placement ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Which documents live on which host (a document may live on several)."""

    by_host: Mapping[str, tuple[Document, ...]]

    def hosts_of(self, kind: str, name: str) -> tuple[str, ...]:
        return tuple(h for h, docs in self.by_host.items()
                     if any(d.kind == kind and d.name == name for d in docs))


def place(docs: Sequence[Document], config: ProjectConfig) -> Placement:
    """Each schema-valid document's hosts; ManifestError listing every placement problem."""
    known = set(config.host_names)
    problems: list[Problem] = []
    hosts_of: dict[tuple[str, str], tuple[str, ...]] = {}

    def unknown(d: Document, path: tuple[str | int, ...], host: str) -> Problem:
        where = f" in {config.source}" if config.source else " (there is no project file)"
        return Problem(f"host {host!r} is not a host of the project{where}",
                       d.locate(path + ("<value>",)), json_path(path),
                       hint="hosts: " + ", ".join(sorted(known)))

    for d in docs:
        spec = d.body.get("spec") or {}
        if d.kind == Kind.VM:
            host = spec.get("host", config.default_host)
            if host not in known:
                problems.append(unknown(d, ("spec", "host"), host))
                hosts_of[(d.kind, d.name)] = ()  # placed nowhere: no errors that follow
                continue
            hosts_of[(d.kind, d.name)] = (host,)
        elif d.kind in (Kind.NETWORK, Kind.POOL, Kind.IMAGE):
            wanted = spec.get("hosts", [config.default_host])
            if wanted == "all":
                wanted = list(config.host_names)
            for i, host in enumerate(wanted):
                if host not in known:
                    problems.append(unknown(d, ("spec", "hosts", i), host))
            hosts_of[(d.kind, d.name)] = tuple(h for h in config.host_names if h in wanted)
    by_name = {(d.kind, d.name): d for d in docs}
    # Disks live where the VMs that use them live; a Disk no VM uses, on the default host.
    disk_users: dict[str, list[tuple[str, Document, int]]] = {}
    for d in docs:
        if d.kind == Kind.VM and hosts_of[(d.kind, d.name)]:
            for i, att in enumerate((d.body.get("spec") or {}).get("disks", ())):
                disk_users.setdefault(att["disk"], []).append(
                    (hosts_of[(d.kind, d.name)][0], d, i))
    for d in docs:
        if d.kind != Kind.DISK:
            continue
        users = disk_users.get(d.name, [])
        hosts = sorted({h for h, _, _ in users}) or [config.default_host]
        if len(hosts) > 1:
            for host, vm, i in users[1:]:
                if host != users[0][0]:
                    problems.append(Problem(
                        f"Disk {d.name!r} is used by VMs on two hosts: {users[0][1].name!r} on "
                        f"{users[0][0]!r} and {vm.name!r} on {host!r}",
                        vm.locate(("spec", "disks", i, "disk", "<value>")),
                        json_path(("spec", "disks", i, "disk")),
                        hint="a Disk's data is on one host: give each VM its own Disk, or put "
                             "the VMs on one host"))
        hosts_of[(d.kind, d.name)] = (hosts[0],)
    # A Snapshot lives where its VM lives (an unknown VM: the reference checks say so).
    for d in docs:
        if d.kind == Kind.SNAPSHOT:
            vm_name = str((d.body.get("spec") or {}).get("vm", ""))
            hosts_of[(d.kind, d.name)] = hosts_of.get((Kind.VM, vm_name), ()) \
                if (Kind.VM, vm_name) in by_name else (config.default_host,)
    problems += _unsatisfied(docs, by_name, hosts_of, config)
    if problems:
        raise ManifestError(problems)
    by_host: dict[str, list[Document]] = {h: [] for h in config.host_names}
    for d in docs:
        for host in hosts_of.get((d.kind, d.name), ()):
            by_host[host].append(d)
    return Placement({h: tuple(v) for h, v in by_host.items()})


def _unsatisfied(docs: Sequence[Document], by_name: Mapping[tuple[str, str], Document],
                 hosts_of: Mapping[tuple[str, str], tuple[str, ...]],
                 config: ProjectConfig) -> list[Problem]:
    """References to objects the manifests declare, but on other hosts than the referrer's."""
    problems = []

    def check(d: Document, host: str, path: tuple[str | int, ...], kind: Kind, name: str,
              why: str) -> None:
        target = by_name.get((kind, name))
        if target is None or not isinstance(name, str):
            return  # not declared: the reference checks say so, or the host has it
        there = hosts_of.get((kind, name), ())
        if host not in there:
            problems.append(Problem(
                f"{kind} {name!r} is not on host {host!r}{why} (it is on "
                + (", ".join(repr(h) for h in there) or "no host") + ")",
                d.locate(path + ("<value>",)), json_path(path),
                hint=f"add {host!r} to the {kind}'s spec.hosts, or use \"all\""))

    for d in docs:
        spec = d.body.get("spec") or {}
        for host in hosts_of.get((d.kind, d.name), ()):
            if d.kind == Kind.VM:
                for i, nic in enumerate(spec.get("interfaces", ())):
                    if nic.get("network"):
                        check(d, host, ("spec", "interfaces", i, "network"), Kind.NETWORK,
                              nic["network"], ", where this VM runs")
            elif d.kind == Kind.DISK:
                why = ", where this Disk lives (with its VM)"
                check(d, host, ("spec", "pool"), Kind.POOL, spec.get("pool", ""), why)
                if spec.get("image"):
                    check(d, host, ("spec", "image"), Kind.IMAGE, spec["image"], why)
            elif d.kind == Kind.IMAGE:
                check(d, host, ("spec", "pool"), Kind.POOL, spec.get("pool", ""),
                      ", where this Image lives")
    return problems
