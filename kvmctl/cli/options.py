"""The command line, parsed once into a typed value (`CommandOptions`) that commands read.

Light on purpose: `kvmctl --help` imports this and argparse, nothing of the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..xmltext import describe_char, first_non_xml_char

DOMAIN_TYPES = ("auto", "kvm", "qemu")
GET_WHAT = ("vms", "networks", "disks", "pools", "images", "snapshots")


def default_uri() -> str:
    return (os.environ.get("KVMCTL_CONNECT") or os.environ.get("LIBVIRT_DEFAULT_URI")
            or "qemu:///system")


def project_override() -> str | None:
    """--project's default: $KVMCTL_PROJECT, which overrides the project file like the flag
    (argparse passes it through project_name, as it does the flag)."""
    return os.environ.get("KVMCTL_PROJECT") or None


def domain_type_override() -> str | None:
    value = os.environ.get("KVMCTL_DOMAIN_TYPE")
    return value if value in DOMAIN_TYPES else None


@dataclass(frozen=True)
class CommandOptions:
    """Everything one invocation asked for; fields a command does not take keep defaults."""

    command: str
    debug: bool = False
    filenames: tuple[str, ...] = ()
    recursive: bool = False
    output: str = "text"
    connect: str | None = None
    project: str | None = None  # None: the project file's, else "default"
    domain_type: str | None = None  # None: each host's in the project file, else auto
    project_file: str | None = None
    hosts: tuple[str, ...] = ()  # --host: only these hosts of the project
    # plan, diff, apply
    prune: bool = False
    prune_disks: bool = False
    allow_empty: bool = False
    adopt: bool = False
    targets: tuple[str, ...] = ()
    out: str | None = None
    detailed_exitcode: bool = False
    # apply, destroy
    plan_file: str | None = None
    yes: bool = False
    parallelism: int = 8
    lock_timeout: float = 0
    wait: bool = False
    wait_timeout: float = 300
    with_disks: bool = False
    allow_snapshot_loss: bool = False
    # render
    kind: str | None = None
    name: str | None = None
    # get
    what: str = "vms"
    # sync, controller, status
    repo: str | None = None
    ref: str | None = None
    path: str | None = None
    state_dir: str | None = None
    dry_run: bool = False
    project_files: tuple[str, ...] = ()
    listen: str | None = None
    token_file: str | None = None
    webhook_secret_file: str | None = None
    interval: float | None = None
    log_format: str = "plain"
    controller_url: str | None = None
    # snapshot
    action: str = ""
    vm: str = ""
    description: str = ""
    no_memory: bool = False
    quiesce: bool = False
    no_safety: bool = False
    force: bool = False
    ignore_schedule: bool = False
    # backup, restore
    backup_dir: str | None = None
    start: bool = False
    backup_timeout: float = 3600
    # import
    refs: tuple[str, ...] = ()
    import_all: bool = False
    no_follow: bool = False
    one_per_file: bool = False
    keep_unmanaged: bool = False

    @property
    def uri(self) -> str:
        return self.connect or default_uri()

    @property
    def two_means_changes(self) -> bool:
        """Exit status 2 reads as "changes present" (plan --detailed-exitcode, diff)."""
        return self.detailed_exitcode

    @staticmethod
    def from_namespace(ns: argparse.Namespace) -> CommandOptions:
        raw = {k: v for k, v in vars(ns).items() if k != "run"}
        raw["filenames"] = tuple(raw.pop("filename", ()) or ())
        raw["targets"] = tuple(raw.pop("target", ()) or ())
        raw["hosts"] = tuple(raw.pop("host", ()) or ())
        raw["project_files"] = tuple(raw.pop("project_files", ()) or ())
        known = {f.name for f in dataclasses.fields(CommandOptions)}
        return CommandOptions(**{k: v for k, v in raw.items() if k in known})


Command = Callable[[CommandOptions, Any], int]


def _manifest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", action="append", default=[], metavar="PATH",
                   help="manifest file, directory, or - for standard input (repeatable)")
    p.add_argument("-R", "--recursive", action="store_true",
                   help="read directories given with -f recursively")


def _project_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project-file", metavar="FILE",
                   help="the project file (default: kvmctl.yaml in the -f paths' directories "
                        "or above them, up to the top of the git repository)")
    p.add_argument("--project", default=project_override(), type=project_name,
                   help="the project that owns what these manifests create (default: "
                        "$KVMCTL_PROJECT, the project file's name, or 'default')")


def _engine_options(p: argparse.ArgumentParser) -> None:
    _project_options(p)
    p.add_argument("--connect", "-c", default=os.environ.get("KVMCTL_CONNECT") or None,
                   metavar="URI",
                   help="libvirt URI of the default host (default: $KVMCTL_CONNECT, the project "
                        "file's, $LIBVIRT_DEFAULT_URI, qemu:///system)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="only this host of the project file (repeatable); the others are "
                        "neither read nor changed")
    p.add_argument("--domain-type", choices=DOMAIN_TYPES, default=domain_type_override(),
                   help="libvirt domain type for VMs that do not set one: kvm, qemu (TCG "
                        "emulation), or auto (kvm when the host CPU has VT-x/AMD-V); "
                        "default: $KVMCTL_DOMAIN_TYPE, the project file's per host, or auto")


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune", action="store_true",
                   help="delete owned objects that are no longer in the manifests")
    p.add_argument("--prune-disks", action="store_true",
                   help="with --prune, also delete Disks (their data is lost)")
    p.add_argument("--allow-empty", action="store_true",
                   help="allow --prune with no manifests (deletes everything of the project)")
    p.add_argument("--adopt", action="store_true",
                   help="take over existing unmanaged objects with the manifests' names")
    p.add_argument("--target", action="append", default=[], metavar="KIND/NAME",
                   help="limit the plan to this object and what it depends on (repeatable)")
    _snapshot_loss_option(p)


def _snapshot_loss_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-snapshot-loss", action="store_true",
                   help="delete VMs that have snapshots (they are lost with them); without it "
                        "such a delete is blocked, with the count")


def _apply_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--parallelism", type=_positive_int, default=8, metavar="N")
    p.add_argument("--lock-timeout", type=_seconds, default=0, metavar="SECONDS",
                   help="wait this long for another apply of the project (default: fail at once)")


def project_name(text: str) -> str:
    """A --project value (or $KVMCTL_PROJECT, which argparse passes through here too): it is
    written into every definition's XML metadata, so it must be text XML 1.0 can carry, and
    into each VM's <title>, which libvirt keeps to one line."""
    at = first_non_xml_char(text)
    if at >= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} holds {describe_char(text[at])} at character {at + 1}, which XML cannot "
            "carry (the project name is written into libvirt definitions; from --project or "
            "$KVMCTL_PROJECT)")
    if "\n" in text or "\r" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than one line (the project name is written into each VM's "
            "title, which libvirt keeps to one line; from --project or $KVMCTL_PROJECT)")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 256")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400 or value != value:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400 seconds")
    return value


def build_parser(commands: dict[str, Command], version: str) -> argparse.ArgumentParser:
    """The parser; `commands` maps each command name to the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="kvmctl", description="Declarative VMs, networks and disks for KVM/libvirt.")
    parser.add_argument("--version", action="version", version=f"kvmctl {version}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check manifests against the schemas and each other")
    _manifest_options(p)
    p.add_argument("--project-file", metavar="FILE",
                   help="the project file (default: kvmctl.yaml found from the -f paths up)")
    p.add_argument("-o", "--output", choices=("text", "json", "github"), default="text")
    p.set_defaults(run=commands["validate"])

    p = sub.add_parser("render", help="print the libvirt XML the manifests produce")
    _manifest_options(p)
    p.add_argument("--kind", help="only objects of this kind")
    p.add_argument("--name", help="only the object with this name")
    _project_options(p)
    env_type = os.environ.get("KVMCTL_DOMAIN_TYPE")
    p.add_argument("--domain-type", choices=("kvm", "qemu"),
                   default=env_type if env_type in ("kvm", "qemu") else "kvm")
    p.set_defaults(run=commands["render"])

    for name, helptext in (("plan", "show what apply would change"),
                           ("diff", "plan, exiting 0 with no changes and 2 with changes")):
        p = sub.add_parser(name, help=helptext)
        _manifest_options(p)
        _engine_options(p)
        _plan_options(p)
        p.add_argument("-o", "--output", choices=("text", "json"), default="text")
        p.add_argument("--out", metavar="FILE", help="save the plan for `kvmctl apply FILE`")
        p.add_argument("--detailed-exitcode", action="store_true", default=name == "diff",
                       help="exit 0 with no changes, 2 with changes, 1 on error")
        p.set_defaults(run=commands["plan"])

    p = sub.add_parser("apply", help="make the host match the manifests (or a saved plan)")
    p.add_argument("plan_file", nargs="?", metavar="PLANFILE", help="a plan saved with --out")
    _manifest_options(p)
    _engine_options(p)
    _plan_options(p)
    _apply_options(p)
    p.add_argument("--wait", action="store_true",
                   help="wait until running VMs have an address")
    p.add_argument("--wait-timeout", type=_seconds, default=300, metavar="SECONDS")
    p.set_defaults(run=commands["apply"])

    p = sub.add_parser("destroy", help="shut down and delete what the manifests created")
    _manifest_options(p)
    _engine_options(p)
    _apply_options(p)
    p.add_argument("--with-disks", action="store_true",
                   help="also delete Disks (their data is lost); protected ones are refused")
    _snapshot_loss_option(p)
    p.set_defaults(run=commands["destroy"])

    p = sub.add_parser("get", help="list managed objects with state and addresses")
    p.add_argument("what", nargs="?", default="vms", choices=GET_WHAT)
    _engine_options(p)
    _manifest_options(p)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=commands["get"])

    _gitops_parsers(sub, commands)

    p = sub.add_parser("snapshot", help="create, list, revert or delete a VM's snapshots; "
                                        "run the manifests' snapshot policies")
    p.add_argument("action", choices=("create", "list", "revert", "delete", "run"))
    p.add_argument("vm", nargs="?", default="", metavar="VM",
                   help="the VM (run: only this VM's policy; default all of the manifests')")
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="the snapshot (create: default kvmctl-YYYYmmdd-HHMMSS)")
    _engine_options(p)
    _manifest_options(p)
    p.add_argument("--ignore-schedule", action="store_true",
                   help="run: take a snapshot for every policy now, due or not (retention "
                        "still applies)")
    p.add_argument("--dry-run", action="store_true",
                   help="run: say what is due and what expires, change nothing")
    p.add_argument("--lock-timeout", type=_seconds, default=0, metavar="SECONDS",
                   help="create, revert, delete, run: wait this long for another kvmctl's "
                        "lock of the project on the host (default: do not wait)")
    p.add_argument("--description", default="", help="create: a description")
    p.add_argument("--no-memory", action="store_true",
                   help="create: without the guest's memory (a stopped VM's never has it)")
    p.add_argument("--quiesce", action="store_true",
                   help="create: freeze the guest's file systems through its agent first")
    p.add_argument("-y", "--yes", action="store_true", help="revert: do not ask")
    p.add_argument("--no-safety", action="store_true",
                   help="revert: no safety snapshot of the present first")
    p.add_argument("--force", action="store_true",
                   help="delete: also a snapshot kvmctl did not make for this project")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(run=commands["snapshot"])
    _backup_parsers(sub, commands)

    p = sub.add_parser("import", help="write manifests for VMs, networks and pools a host has "
                                      "(proven: a plan --adopt of them changes nothing else)")
    p.add_argument("refs", nargs="*", metavar="KIND/NAME",
                   help="VirtualMachine/NAME, Network/NAME, StoragePool/NAME (repeatable)")
    p.add_argument("--all", dest="import_all", action="store_true",
                   help="every VM, network and pool of the host")
    p.add_argument("--out", metavar="DIR", help="the folder the manifests go to (created; "
                                                "no file in it is overwritten)")
    p.add_argument("--no-follow", action="store_true",
                   help="only the objects named: not a VM's networks, disks and pools")
    p.add_argument("--one-per-file", action="store_true",
                   help="one file a object (KIND-NAME.yaml) instead of one a kind")
    p.add_argument("--keep-unmanaged", action="store_true",
                   help="import VMs with elements the manifests cannot express, and leave "
                        "those elements as they are on every later apply")
    _engine_options(p)
    p.set_defaults(run=commands["import"])
    return parser


def _backup_parsers(sub: Any, commands: dict[str, Command]) -> None:
    p = sub.add_parser("backup", help="copy a VM (definition, manifests, disks) into a new "
                                      "directory, consistent while it runs")
    p.add_argument("vm", metavar="VM")
    p.add_argument("--to", dest="backup_dir", required=True, metavar="DIR",
                   help="the backup's directory: new, or empty")
    _manifest_options(p)
    _engine_options(p)
    p.add_argument("--timeout", dest="backup_timeout", type=_seconds, default=3600,
                   metavar="SECONDS",
                   help="how long libvirt's backup job of a running VM may take (default 3600)")
    p.set_defaults(run=commands["backup"])

    p = sub.add_parser("restore", help="recreate a VM and its disks from a backup directory, "
                                       "on this or another host of the project")
    p.add_argument("backup_dir", metavar="DIR")
    _manifest_options(p)
    _engine_options(p)
    p.add_argument("--name", metavar="NEW",
                   help="restore a copy under this name (its volumes renamed, new MAC "
                        "addresses); default: the VM's own name")
    p.add_argument("--start", action="store_true",
                   help="start it afterwards, if it ran when it was backed up")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(run=commands["restore"])


def _source_options(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("--repo", metavar="URL",
                   help="git repository of the manifests: file://, https://, ssh://, git://, "
                        "user@host:path or a local path (default: the project file's "
                        "spec.sync.source)")
    p.add_argument("--ref", metavar="REF", help="branch, tag or commit (default: the project "
                                                "file's spec.sync.source.ref; with --repo, "
                                                "the repository's HEAD)")
    p.add_argument("--path", metavar="PATH", help="the manifests' directory in the repository "
                                                  "(default: the project file's; with --repo, "
                                                  "its top)")
    if many:
        p.add_argument("--project-file", dest="project_files", action="append", default=[],
                       metavar="FILE",
                       help="a project file with spec.sync.source: one project each "
                            "(repeatable; default: ./kvmctl.yaml)")
    else:
        p.add_argument("--project-file", metavar="FILE",
                       help="a project file with spec.sync.source (default: ./kvmctl.yaml); "
                            "also the project of a repository that has none")
    p.add_argument("--project", default=project_override(), type=project_name,
                   help="override the project's name")
    p.add_argument("--connect", "-c", default=os.environ.get("KVMCTL_CONNECT") or None,
                   metavar="URI", help="libvirt URI of the default host")
    p.add_argument("--domain-type", choices=DOMAIN_TYPES, default=domain_type_override())
    p.add_argument("--state-dir", metavar="DIR",
                   help="git cache and history (default: $KVMCTL_STATE_DIR, /var/lib/kvmctl "
                        "as root, else $XDG_STATE_HOME/kvmctl or ~/.local/state/kvmctl)")


def _gitops_parsers(sub: Any, commands: dict[str, Command]) -> None:
    p = sub.add_parser("sync", help="one reconciliation from git: fetch, plan, apply per the "
                                    "project's sync policy")
    _source_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="detect and report only (as apply: manual)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.add_argument("--detailed-exitcode", action="store_true",
                   help="exit 2 when changes remain (waiting for a window, manual)")
    p.add_argument("--parallelism", type=_positive_int, default=8, metavar="N")
    p.add_argument("--lock-timeout", type=_seconds, default=30, metavar="SECONDS",
                   help="wait this long for an apply of the project in progress (default 30)")
    p.set_defaults(run=commands["sync"])

    p = sub.add_parser("controller", help="reconcile projects from git continuously, with a "
                                          "JSON API, metrics and a web page")
    _source_options(p, many=True)
    p.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help="where the API and page listen (default 127.0.0.1:8787)")
    p.add_argument("--token-file", metavar="FILE",
                   help="the token that sync-now, suspend and resume need (default: "
                        "$KVMCTL_CONTROLLER_TOKEN, else one made in the state directory)")
    p.add_argument("--webhook-secret-file", metavar="FILE",
                   help="the forge's webhook secret (default: $KVMCTL_WEBHOOK_SECRET, else the "
                        "token)")
    p.add_argument("--interval", type=_interval, default=None, metavar="SECONDS",
                   help="poll and drift interval of every project (default: each project's "
                        "spec.sync.interval, else 60)")
    p.add_argument("--log-format", choices=("plain", "json"), default="plain")
    p.add_argument("--parallelism", type=_positive_int, default=8, metavar="N")
    p.add_argument("--lock-timeout", type=_seconds, default=30, metavar="SECONDS")
    p.set_defaults(run=commands["controller"])

    p = sub.add_parser("status", help="sync status and health of each object: from the "
                                      "controller, or from one fresh plan")
    _source_options(p)
    p.add_argument("--controller", dest="controller_url", metavar="URL",
                   help="the controller's address (default: $KVMCTL_CONTROLLER, "
                        "http://127.0.0.1:8787)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(run=commands["status"])


def _interval(text: str) -> float:
    value = _seconds(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is less than 1 second")
    return value
