"""`kvmctl import (--all | KIND/NAME ...) --out DIR`: manifests for what a host has."""

from __future__ import annotations

import datetime as dt
import importlib
import os
from typing import Any

from ..errors import ManifestError, UsageError
from .commands import project_config
from .exits import ExitStatus
from .options import CommandOptions
from .report import Env

# One file a kind, named as the examples name theirs, with the schema each follows.
FILES = {"StoragePool": ("storage.yaml", "storagepool"), "Disk": ("disks.yaml", "disk"),
         "Network": ("networks.yaml", "network"), "VirtualMachine": ("vms.yaml",
                                                                     "virtualmachine")}
# The schemas kvmctl ships (editors resolve the modelines to them; nothing is fetched).
SCHEMAS = os.path.dirname(os.path.abspath(str(importlib.import_module("kvmctl.schemas").__file__)))
WHAT = {"StoragePool": "Storage pools", "Disk": "Disks (volumes in those pools)",
        "Network": "Networks", "VirtualMachine": "Virtual machines"}


def cmd_import(opts: CommandOptions, env: Env) -> int:
    import yaml

    from .. import importer
    from ..host.hypervisor import Hypervisor
    if not opts.import_all and not opts.refs:
        raise UsageError("import needs --all or the objects: KIND/NAME (VirtualMachine/web, "
                         "Network/lab, StoragePool/images)")
    out_dir = opts.out or ""
    if not out_dir:
        raise UsageError("import needs --out DIR (where the manifests are written)")
    config = project_config(opts)
    host = opts.hosts[0] if opts.hosts else config.default_host
    if host not in config.host_names:
        raise UsageError(f"--host {host}: not a host of the project")
    uri = config.host(host).uri
    hv = Hypervisor(uri)
    try:
        live = hv.read()
    finally:
        hv.close()
    picked, missing = importer.select(live, opts.refs, opts.import_all, not opts.no_follow)
    for text in missing:
        env.stderr.write(f"error: {text}: no such object on {uri} (KIND/NAME, KIND one of "
                         "VirtualMachine, Network, StoragePool)\n")
    picked, foreign = _not_foreign(live, picked, config.name)
    got = importer.build(live, picked, opts.keep_unmanaged)
    refused: dict[str, tuple[str, ...]] = dict(got.refused)
    named = set(opts.refs)
    for ref_text, reason in foreign.items():
        if ref_text in named:
            refused[ref_text] = (reason,)
        else:  # found by --all or by following a reference: left out, said
            env.stderr.write(f"note: {ref_text} left out: {reason}\n")
    held = {u.ref for u in got.unmanaged}
    if held and not opts.keep_unmanaged:
        for ref_text in held:
            refused.setdefault(ref_text, ("holds elements the manifests cannot express "
                                          "(listed above; --keep-unmanaged imports it and "
                                          "leaves them as they are)",))
    docs = _without(list(got.documents), refused)
    kind = config.host(host).domain_type
    domain_type = kind if kind in ("kvm", "qemu") else "qemu"
    adopting = None
    try:
        adopting = importer.adopt_plan(docs, live, config.name, domain_type) if docs else None
        proof = importer.prove(adopting) if adopting is not None else {}
    except ManifestError as exc:  # an import bug: said as such, and nothing is written
        first = str(exc).splitlines()[0] if str(exc) else "invalid"
        proof = {f"{d['kind']}/{d['metadata']['name']}": [
            f"the manifests written for it do not validate ({first}): please report it"]
            for d in docs}
    for ref_text, changes in proof.items():
        refused[ref_text] = tuple(f"an apply --adopt would change it: {w}" for w in changes)
    docs = _without(docs, refused)
    if docs and adopting is not None:
        kept = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
        for ref_text, tags in importer.added_devices(adopting, live).items():
            if ref_text in kept:
                env.stderr.write(f"note: {ref_text}: apply --adopt also gives it kvmctl's "
                                 + ", ".join(tags) + " device (the guest sees it at its next "
                                 "boot; not a field of the manifests)\n")
    for u in got.unmanaged:
        line = u.xml.splitlines()[0] if u.xml else ""
        verb = "kept as it is" if opts.keep_unmanaged else "cannot be expressed"
        env.stderr.write(f"{u.ref}: {u.path} {verb} ({u.why}): {line[:120]}\n")
    for note in got.notes:
        env.stderr.write(f"note: {note}\n")
    for ref_text, reasons in refused.items():
        env.stderr.write(f"not imported: {ref_text}: " + "; ".join(reasons) + "\n")
    written = _write(out_dir, docs, uri, config, opts.one_per_file, yaml) if docs else []
    for path in written:
        env.stdout.write(f"wrote {path}\n")
    names = ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    env.stdout.write(f"Imported {len(docs)} object(s) from {uri}" + (f": {names}" if names
                                                                      else "") + ".\n")
    if docs:
        env.stdout.write(f"Next: kvmctl plan --adopt -f {out_dir} shows only the ownership "
                         "marks being added; kvmctl apply --adopt adds them.\n")
    return ExitStatus.ERROR if refused or missing else ExitStatus.OK


def _not_foreign(live: Any, picked: list[Any], project: str) -> tuple[list[Any], dict[str, str]]:
    """Objects another kvmctl project owns are never imported into this one."""
    from ..kinds import Kind, ref
    keep, foreign = [], {}
    for kind, name in picked:
        obj = {Kind.VM: live.domains, Kind.NETWORK: live.networks,
               Kind.POOL: live.pools}[kind].get(name)
        owner = getattr(obj, "owner", None)
        if owner is not None and owner.project != project:
            foreign[ref(kind, name)] = (f"it belongs to kvmctl project {owner.project!r}: "
                                        "never taken over by another")
            continue
        keep.append((kind, name))
    return keep, foreign


def _without(docs: list[dict[str, Any]], refused: dict[str, Any]) -> list[dict[str, Any]]:
    """The documents less the refused objects and the Disks only they used."""
    from ..kinds import ref
    kept = [d for d in docs if ref(d["kind"], d["metadata"]["name"]) not in refused]
    used = {a["disk"] for d in kept if d["kind"] == "VirtualMachine"
            for a in d["spec"].get("disks", ())}
    return [d for d in kept if d["kind"] != "Disk" or d["metadata"]["name"] in used]


def _write(out_dir: str, docs: list[dict[str, Any]], uri: str, config: Any,
           one_per_file: bool, yaml: Any) -> list[str]:
    """The files, never over an existing one; a project file when the folder has none."""
    groups: dict[str, list[dict[str, Any]]] = {}
    schema_of: dict[str, str] = {}
    for d in docs:
        file, schema = FILES[d["kind"]]
        if one_per_file:
            file = f"{schema}-{d['metadata']['name']}.yaml"
        groups.setdefault(file, []).append(d)
        schema_of[file] = schema
    from ..manifest.project import find_project_file
    targets = list(groups)
    project_file = None
    if not (os.path.isdir(out_dir) and find_project_file([out_dir])):
        project_file = "kvmctl.yaml"
        targets.append(project_file)
    clash = [f for f in targets if os.path.lexists(os.path.join(out_dir, f))]
    if clash:
        raise UsageError(f"--out {out_dir}: {', '.join(clash)} exist already: import never "
                         "overwrites (use an empty folder)")
    os.makedirs(out_dir, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    written = []
    for file, items in groups.items():
        kind = items[0]["kind"]
        head = (f"# yaml-language-server: $schema={SCHEMAS}/{schema_of[file]}.schema.json\n"
                f"# {WHAT[kind]} imported by `kvmctl import` from {uri} on {stamp}.\n"
                "# Every value is the host's, written out (MAC addresses too): kvmctl plan "
                "--adopt\n# on these files changes nothing but the ownership marks.\n")
        body = yaml.safe_dump_all(items, sort_keys=False, default_flow_style=False)
        written.append(_put(out_dir, file, head + body))
    if project_file:
        body = yaml.safe_dump({"apiVersion": "kvmctl/v1", "kind": "Project",
                               "metadata": {"name": config.name},
                               "spec": {"hosts": [{"name": config.default_host, "uri": uri}]}},
                              sort_keys=False)
        written.append(_put(out_dir, project_file,
                            f"# yaml-language-server: $schema={SCHEMAS}/project.schema.json\n"
                            "# The project these imported objects "
                            "join, and the host they are on.\n" + body))
    return written


def _put(out_dir: str, name: str, text: str) -> str:
    path = os.path.join(out_dir, name)
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write it: {exc.strerror}") from None
    return path
