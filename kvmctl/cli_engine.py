"""The commands that talk to a hypervisor: plan, diff, apply, destroy, get.

Part of the CLI (it prints and picks exit codes); the work itself is done by plan.py, apply.py
and readiness.py.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any, Callable

from .cli import Env, ExitStatus, default_uri
from .errors import UsageError

PLAN_FILE_KIND = "kvmctl-saved-plan"


def register(sub: Any, manifest_options: Callable, engine_options: Callable) -> None:
    for name, helptext in (("plan", "show what apply would change"),
                           ("diff", "plan, exiting 0 with no changes and 2 with changes")):
        p = sub.add_parser(name, help=helptext)
        manifest_options(p)
        engine_options(p)
        _plan_options(p)
        p.add_argument("-o", "--output", choices=("text", "json"), default="text")
        p.add_argument("--out", metavar="FILE", help="save the plan for `kvmctl apply FILE`")
        p.add_argument("--detailed-exitcode", action="store_true", default=name == "diff",
                       help="exit 0 with no changes, 2 with changes, 1 on error")
        p.set_defaults(run=cmd_plan)

    p = sub.add_parser("apply", help="make the host match the manifests (or a saved plan)")
    p.add_argument("plan_file", nargs="?", metavar="PLANFILE", help="a plan saved with --out")
    manifest_options(p)
    engine_options(p)
    _plan_options(p)
    _apply_options(p)
    p.add_argument("--wait", action="store_true",
                   help="wait until running VMs have an address")
    p.add_argument("--wait-timeout", type=float, default=300, metavar="SECONDS")
    p.set_defaults(run=cmd_apply)

    p = sub.add_parser("destroy", help="shut down and delete what the manifests created")
    manifest_options(p)
    engine_options(p)
    _apply_options(p)
    p.add_argument("--with-disks", action="store_true",
                   help="also delete Disks (their data is lost); protected ones are refused")
    p.set_defaults(run=cmd_destroy)

    p = sub.add_parser("get", help="list managed objects with state and addresses")
    p.add_argument("what", nargs="?", default="vms",
                   choices=("vms", "networks", "disks", "pools", "images"))
    engine_options(p)
    manifest_options(p)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=_cmd_get)


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


def _apply_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--parallelism", type=int, default=8, metavar="N")
    p.add_argument("--lock-timeout", type=float, default=0, metavar="SECONDS",
                   help="wait this long for another apply of the project (default: fail at once)")


# ---- shared pipeline ----------------------------------------------------------------------------

class Session:
    """Connection, live state and validated manifests for one command."""

    def __init__(self, args: argparse.Namespace, env: Env, documents: list | None = None) -> None:
        from . import documents as docs_mod
        from .hypervisor import Hypervisor
        self.args, self.env = args, env
        self.uri = args.connect or default_uri()
        if documents is None and not getattr(args, "filename", None):
            raise UsageError("no manifests given: use -f FILE, -f DIR or -f -")
        from concurrent.futures import ThreadPoolExecutor
        from .memo import open_memo, open_parse_memo
        self.hv = Hypervisor(self.uri)
        # Reading the host is mostly waiting for libvirtd: it overlaps with parsing manifests.
        with ThreadPoolExecutor(max_workers=1) as pool:
            reading = pool.submit(self.hv.read)
            try:
                self.documents = documents if documents is not None else docs_mod.load(
                    args.filename, recursive=args.recursive, stdin=env.stdin,
                    memo=open_parse_memo())
            except BaseException:
                reading.cancel()
                raise  # a manifest problem is reported first, whatever the host says
            self.live = reading.result()
        self.memo = open_memo("verdicts")
        self.manifest = self._validate()

    def _validate(self) -> Any:
        import ipaddress
        from . import checks, compare, validate
        subnets = []
        for net in self.live.networks.values():
            address, prefix = compare.network_facts(net.xml)["ipv4"] or (None, None)
            if address and prefix:
                subnets.append((net.name, ipaddress.IPv4Network(f"{address}/{prefix}",
                                                                strict=False)))
        facts = checks.HostFacts(frozenset(self.live.networks), frozenset(self.live.pools),
                                 tuple(subnets))
        return validate.validate(self.documents, facts, self.memo)

    @property
    def domain_type(self) -> str:
        chosen = getattr(self.args, "domain_type", "auto")
        if chosen in ("kvm", "qemu"):
            return chosen
        if not hasattr(self, "_detected"):
            self._detected = "kvm" if self.hv.host_has_virt() else "qemu"
        return self._detected

    def options(self, **overrides: Any) -> Any:
        from .plan import Options
        a = self.args
        opts = Options(a.project, self.domain_type, getattr(a, "prune", False),
                       getattr(a, "prune_disks", False), getattr(a, "adopt", False),
                       getattr(a, "allow_empty", False), tuple(getattr(a, "target", ())))
        return replace(opts, **overrides)

    def plan(self, **overrides: Any) -> Any:
        from .plan import make_plan
        plan = make_plan(self.manifest, self.live, self.options(**overrides), self.uri,
                         self.memo)
        self.memo.save()
        return plan


# ---- plan ---------------------------------------------------------------------------------------

def cmd_plan(args: argparse.Namespace, env: Env) -> int:
    from .plan_types import plan_json
    session = Session(args, env)
    plan = session.plan()
    if args.output == "json":
        json.dump(plan_json(plan), env.stdout, indent=2)
        env.stdout.write("\n")
    else:
        print_plan(plan, env)
    if args.out:
        save_plan(args.out, session, plan)
        if args.output == "text":
            env.stdout.write(f"plan saved to {args.out}; run: kvmctl apply {args.out}\n")
    if args.detailed_exitcode and plan.changes_present:
        return ExitStatus.CHANGES
    return ExitStatus.OK


def print_plan(plan: Any, env: Env) -> None:
    from .plan_types import MASK, SYMBOLS
    colors = {"create": "green", "update-live": "yellow", "update-restart": "yellow",
              "replace": "magenta", "delete": "red", "no-op": "cyan"}
    shown = [c for c in plan.changes if c.is_change]
    if shown:  # rich is imported only when there is something to print in colour
        from rich.console import Console
        console = Console(file=env.stdout, highlight=False, soft_wrap=True)
    for c in shown:
        tag = "pending restart" if c.klass == "no-op" else c.klass
        console.print(f"[{colors[c.klass]}]{SYMBOLS[c.klass]:>3} {c.ref}[/] [dim]({tag})[/]",
                      markup=True)
        for reason in c.reasons:
            console.print(f"      {reason}", markup=False)
        if c.blocked:
            console.print(f"      [bold red]blocked:[/] {c.blocked}", markup=True)
        for f in c.fields:
            old, new = (MASK, MASK) if f.sensitive else (_fmt(f.old), _fmt(f.new))
            console.print(f"      {f.field}: {old} → {new}", markup=False)
    s = plan.summary()
    env.stdout.write(
        f"Plan: {s['create']} to create, {s['update-live']} to update live, "
        f"{s['update-restart']} needing a restart, {s['replace']} to replace, "
        f"{s['delete']} to delete, {s['no-op']} unchanged"
        + (f", {s['blocked']} blocked" if s["blocked"] else "")
        + (f", {s['pending_restart']} pending restart" if s["pending_restart"] else "") + ".\n")
    if not plan.changes_present:
        env.stdout.write("No changes: the host matches the manifests.\n")


def _fmt(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def save_plan(path: str, session: Session, plan: Any) -> None:
    from .plan_types import plan_json
    from .state import fingerprint
    bodies = [d.body for d in session.documents]
    data = {"kind": PLAN_FILE_KIND, "format_version": 1, "uri": session.uri,
            "project": session.args.project, "domain_type": session.domain_type,
            "options": {"prune": session.args.prune, "prune_disks": session.args.prune_disks,
                        "adopt": session.args.adopt, "allow_empty": session.args.allow_empty,
                        "target": session.args.target},
            "manifest_fingerprint": fingerprint(bodies), "documents": bodies,
            "plan": plan_json(plan),
            "fingerprints": {c.ref: c.fingerprint for c in plan.changes}}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def _load_saved(args: argparse.Namespace, env: Env) -> tuple[Session, Any]:
    from .documents import Document
    from .errors import Location, PlanError
    from .state import fingerprint
    try:
        with open(args.plan_file, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read saved plan {args.plan_file}: {exc}") from None
    if not isinstance(saved, dict) or saved.get("kind") != PLAN_FILE_KIND:
        raise UsageError(f"{args.plan_file} is not a plan saved by `kvmctl plan --out`")
    if fingerprint(saved["documents"]) != saved["manifest_fingerprint"]:
        raise PlanError(f"{args.plan_file} was modified after it was saved")
    for key, value in saved["options"].items():
        setattr(args, key, value)
    args.project, args.domain_type = saved["project"], saved["domain_type"]
    args.connect = args.connect or saved["uri"]
    docs = [Document(body, Location(f"{args.plan_file}#document{i + 1}"), {})
            for i, body in enumerate(saved["documents"])]
    session = Session(args, env, docs)
    plan = session.plan()
    now = {c.ref: c.fingerprint for c in plan.changes}
    moved = sorted(ref for ref in set(now) | set(saved["fingerprints"])
                   if now.get(ref) != saved["fingerprints"].get(ref))
    if moved:
        raise PlanError("the host changed since the plan was saved, refusing to apply it: "
                        + ", ".join(moved) + "; make a new plan")
    return session, plan


# ---- apply --------------------------------------------------------------------------------------

def cmd_apply(args: argparse.Namespace, env: Env) -> int:
    from .lock import project_lock
    if args.plan_file and args.filename:
        raise UsageError("give either a saved plan or -f manifests, not both")
    uri = args.connect or default_uri()
    with project_lock(uri, args.project, args.lock_timeout, lambda m: env.stderr.write(m + "\n")):
        session, plan = _load_saved(args, env) if args.plan_file else _fresh(args, env)
        print_plan(plan, env)
        if not plan.changes_present:
            return _after_apply(args, env, session, ok=True)
        _confirm(args, env)
        ok = _execute(args, env, session, plan)
        return _after_apply(args, env, session, ok)


def _fresh(args: argparse.Namespace, env: Env) -> tuple[Session, Any]:
    session = Session(args, env)
    return session, session.plan()


def _confirm(args: argparse.Namespace, env: Env) -> None:
    if args.yes:
        return
    if not env.interactive:
        raise UsageError("not a terminal: pass -y to apply without confirmation")
    env.stdout.write("Apply these changes? Only 'yes' is accepted: ")
    env.stdout.flush()
    if env.stdin.readline().strip() != "yes":
        raise UsageError("apply cancelled; nothing was changed")


def _execute(args: argparse.Namespace, env: Env, session: Session, plan: Any) -> bool:
    from . import apply as apply_mod
    total = sum(1 for group in apply_mod.levels(plan) for _ in group)
    with _ProgressView(env, total) as view:
        result = apply_mod.run(plan, session.hv, session.manifest, session.live,
                               args.parallelism, view.event)
    if result.failed:
        env.stderr.write(f"error: {len(result.failed)} change(s) failed; {len(result.done)} "
                         f"done, {len(result.skipped)} not started. Run apply again to "
                         "continue from here.\n")
        return False
    env.stdout.write(f"Apply complete: {len(result.done)} change(s) made.\n")
    return True


class _ProgressView:
    """A rich progress bar on a terminal; one plain line per event otherwise (CI logs)."""

    def __init__(self, env: Env, total: int) -> None:
        self.env, self.total = env, total
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> "_ProgressView":
        if self.env.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
            console = Console(file=self.env.stdout)
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                     BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     console=console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("applying", total=self.total)
        return self

    def __exit__(self, *_: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def event(self, change: Any, status: str, detail: str) -> None:
        line = {"start": f"{change.ref}: {change.klass}...",
                "done": f"{change.ref}: done",
                "failed": f"{change.ref}: FAILED: {detail}"}[status]
        if self.progress is None:
            (self.env.stderr if status == "failed" else self.env.stdout).write(line + "\n")
            self.env.stdout.flush()
            return
        if status == "start":
            self.progress.update(self.task, description=f"{change.ref}")
            return
        self.progress.console.print(line, markup=False, highlight=False)
        self.progress.advance(self.task)


def _after_apply(args: argparse.Namespace, env: Env, session: Session, ok: bool) -> int:
    if ok and getattr(args, "wait", False):
        from .readiness import wait
        env.stdout.write(f"Waiting up to {args.wait_timeout:g} s for running VMs to have an "
                         "address...\n")
        ready, problems = wait(session.hv, session.manifest, args.wait_timeout,
                               lambda line: env.stdout.write(f"  {line}\n"))
        if ready:
            env.stdout.write("Addresses:\n")
        for vm in ready:
            env.stdout.write(f"  {vm.name}: " + (", ".join(ip for _, ip in vm.addresses)
                                                 or "running, no address needed") + "\n")
        if problems:
            env.stderr.write("error: not ready:\n  " + "\n  ".join(problems) + "\n")
            return ExitStatus.ERROR
    return ExitStatus.OK if ok else ExitStatus.ERROR


# ---- destroy ------------------------------------------------------------------------------------

def cmd_destroy(args: argparse.Namespace, env: Env) -> int:
    from .lock import project_lock
    from .model import ManifestSet
    from .plan import make_plan
    uri = args.connect or default_uri()
    with project_lock(uri, args.project, args.lock_timeout, lambda m: env.stderr.write(m + "\n")):
        session = Session(args, env)
        # Destroy = prune against an empty wanted set, limited to objects named in the manifests.
        named = {o.meta.ref for o in session.manifest.all()}
        named |= {f"CloudInitSeed/{vm.meta.name}" for vm in session.manifest.vms if vm.cloud_init}
        opts = session.options(prune=True, allow_empty=True, prune_disks=args.with_disks,
                               targets=(), scope=tuple(sorted(named)))
        everything = make_plan(ManifestSet(), session.live, opts, session.uri)
        # The planner's advice names prune's flag; destroy's own is --with-disks.
        changes = tuple(replace(c, blocked=c.blocked.replace("--prune-disks", "--with-disks"))
                        if c.blocked else c for c in everything.changes if c.ref in named)
        plan = replace(everything, changes=changes)
        print_plan(plan, env)
        if not plan.changes_present:
            return ExitStatus.OK
        _confirm(args, env)
        ok = _execute(args, env, session, plan)
        blocked = [c for c in changes if c.blocked]
        if blocked:
            env.stderr.write("kept: " + ", ".join(f"{c.ref} ({c.blocked})" for c in blocked)
                             + "\n")
        return ExitStatus.OK if ok else ExitStatus.ERROR


def _cmd_get(args: argparse.Namespace, env: Env) -> int:
    from .cli_get import cmd_get
    return cmd_get(args, env)
