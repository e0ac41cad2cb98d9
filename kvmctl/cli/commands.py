"""The commands: each reads its typed options, calls the pipeline, reports, returns a status.

The engine is imported inside the commands that need it, so that `kvmctl --help` and
`kvmctl validate` never load libvirt.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

from ..errors import ManifestError, UsageError
from .exits import ExitStatus
from .options import CommandOptions
from .report import Env, ProgressView, print_plan, print_problems

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..engine import Deployment, LockRequest, PlanRequest
    from ..manifest.documents import Document
    from ..manifest.model import ManifestSet
    from ..manifest.project import ProjectConfig
    from ..plan.types import ProjectPlan


def project_config(opts: CommandOptions, connect: bool = False, read: bool = False
                   ) -> ProjectConfig:
    """The run's project and hosts: the project file (--project-file, or kvmctl.yaml found from
    the -f paths upward), overridden by --project, --connect and --domain-type. `connect`: the
    command will talk to the hosts, whose handshakes (ssh, TLS) then start at once, while the
    rest of the pipeline imports; `read`: it will read them, unlocked, which starts too."""
    from ..manifest.project import (
        Overrides,
        find_project_file,
        load_project_file,
        probable_uris,
        resolve,
    )
    overrides = Overrides(opts.project, opts.connect, opts.domain_type)

    def start(doc: Document | None) -> None:
        if connect:
            from ..host.early import connect_soon
            connect_soon(probable_uris(doc, overrides, opts.hosts) or [opts.uri], read)

    path = opts.project_file or find_project_file(list(opts.filenames))
    if opts.project_file and not os.path.isfile(opts.project_file):
        raise UsageError(f"--project-file {opts.project_file}: no such file")
    if not path:
        start(None)
    from ..memo import open_memo
    doc = load_project_file(path, open_memo("projects"), start) if path else None
    return resolve(doc, overrides)


def plan_request(opts: CommandOptions) -> PlanRequest:
    from ..engine import PlanRequest
    return PlanRequest(opts.prune, opts.prune_disks, opts.adopt, opts.allow_empty, opts.targets,
                       allow_snapshot_loss=opts.allow_snapshot_loss)


def open_deployment(opts: CommandOptions, env: Env, config: ProjectConfig | None = None,
                    lock: LockRequest | None = None) -> Deployment:
    config = config or project_config(opts, connect=True, read=lock is None)
    from ..engine import Deployment
    return Deployment(config, list(opts.filenames), opts.recursive, env.stdin,
                      only=opts.hosts, lock=lock)


def _load(opts: CommandOptions, env: Env
          ) -> tuple[list[Document], ManifestSet, ProjectConfig]:
    """Documents and model, offline: schemas, placement on the project's hosts, and each host's
    share checked as a plan would check it (without what the hosts have)."""
    from ..manifest import documents, validate
    from ..manifest.model import ManifestSet
    from ..manifest.project import place, split_project, with_defaults
    if not opts.filenames:
        raise UsageError("no manifests given: use -f FILE, -f DIR or -f -")
    config = project_config(opts)
    loaded = documents.load(list(opts.filenames), recursive=opts.recursive, stdin=env.stdin)
    if config.source:
        _check_sync_policy(config.source)
    _, rest = split_project(loaded, config.source)
    docs = with_defaults(rest, config)
    validate.check_schemas(docs)
    placement = place(docs, config)
    if not config.multi_host:
        return loaded, validate.validate(docs, schemas_checked=True), config
    problems = []
    models = []
    for placed in placement.by_host.values():
        try:
            models.append(validate.validate(list(placed), schemas_checked=True))
        except ManifestError as exc:
            problems += exc.problems
    if problems:
        raise ManifestError(problems)
    return loaded, ManifestSet.union(models), config


def _check_sync_policy(path: str) -> None:
    """The project file's spec.sync beyond its schema (schedules, time zones, durations), so
    that `validate` finds what a sync would refuse; located ManifestError."""
    from ..manifest.project import load_project_file
    doc = load_project_file(path)
    if isinstance(doc.body.get("spec"), dict) and "sync" in doc.body["spec"]:
        from ..sync.policy import read_policy
        read_policy(doc)


# ---- validate, render ---------------------------------------------------------------------------

def cmd_validate(opts: CommandOptions, env: Env) -> int:
    try:
        docs, _, _ = _load(opts, env)
    except ManifestError as exc:
        print_problems(exc.problems, opts.output, env.stdout)
        return ExitStatus.ERROR
    if opts.output == "json":
        env.stdout.write("[]\n")
    elif opts.output == "text":
        env.stdout.write(f"{len(docs)} document{'s' if len(docs) != 1 else ''} valid\n")
    return ExitStatus.OK


def cmd_render(opts: CommandOptions, env: Env) -> int:
    from ..render.definitions import render_all
    _, manifest, config = _load(opts, env)
    rendered = [r for r in render_all(manifest, config.name, opts.domain_type or "kvm")
                if (not opts.kind or r.kind.lower() == opts.kind.lower())
                and (not opts.name or r.name == opts.name)]
    if not rendered:
        raise UsageError("no object matches --kind/--name")
    for r in rendered:
        if len(rendered) > 1:
            env.stdout.write(f"<!-- {r.kind}/{r.name} -->\n")
        env.stdout.write(r.xml if r.xml.endswith("\n") else r.xml + "\n")
    return ExitStatus.OK


# ---- plan, diff ---------------------------------------------------------------------------------

def cmd_plan(opts: CommandOptions, env: Env) -> int:
    deployment = open_deployment(opts, env)  # first: it starts the hosts' handshakes
    from ..engine import save_plan
    from ..plan.types import project_plan_json
    request = plan_request(opts)
    plan = deployment.plan(request)
    if opts.output == "json":
        json.dump(project_plan_json(plan), env.stdout, indent=2)
        env.stdout.write("\n")
    else:
        print_plan(plan, env)
    if opts.out:
        save_plan(opts.out, deployment, request, plan)
        if opts.output == "text":
            env.stdout.write(f"plan saved to {opts.out}; run: kvmctl apply {opts.out}\n")
    if opts.detailed_exitcode and plan.changes_present:
        return ExitStatus.CHANGES
    return ExitStatus.OK


# ---- apply, destroy -----------------------------------------------------------------------------

def _lock_request(opts: CommandOptions, env: Env) -> LockRequest:
    from ..engine import LockRequest
    return LockRequest(opts.lock_timeout, lambda m: env.stderr.write(m + "\n"),
                       f"kvmctl {opts.command}")


@contextlib.contextmanager
def _local_locks(config: ProjectConfig, opts: CommandOptions, env: Env) -> Iterator[None]:
    """This machine's lock for each host the run touches, in one order (no two runs wait on
    each other crosswise); the hypervisor-side lock is taken by the engine, per host."""
    from ..apply.lock import project_lock
    with contextlib.ExitStack() as stack:
        for h in sorted(config.hosts, key=lambda h: h.uri):
            if not opts.hosts or h.name in opts.hosts:
                stack.enter_context(project_lock(h.uri, config.name, opts.lock_timeout,
                                                 lambda m: env.stderr.write(m + "\n")))
        yield


def cmd_apply(opts: CommandOptions, env: Env) -> int:
    if opts.plan_file and opts.filenames:
        raise UsageError("give either a saved plan or -f manifests, not both")
    # Both locks (this machine's, then each hypervisor's) are held from before the hosts are
    # read until the apply is done: the plan it shows is the plan it applies.
    with contextlib.ExitStack() as held:
        if opts.plan_file:
            from ..engine import Deployment, check_saved, load_saved
            saved = load_saved(opts.plan_file, opts.connect, opts.hosts)
            held.enter_context(_local_locks(saved.config, opts, env))
            deployment = Deployment(saved.config, docs=saved.documents, only=saved.only,
                                    lock=_lock_request(opts, env))
            held.callback(deployment.close)
            plan = deployment.plan(saved.request)
            check_saved(saved, plan)
        else:
            config = project_config(opts, connect=True)
            held.enter_context(_local_locks(config, opts, env))
            deployment = open_deployment(opts, env, config, _lock_request(opts, env))
            held.callback(deployment.close)
            plan = deployment.plan(plan_request(opts))
        print_plan(plan, env)
        if not plan.changes_present:
            deployment.upkeep(plan)
            return _after_apply(opts, env, deployment, ok=True)
        _confirm(opts, env)
        ok = _execute(opts, env, deployment, plan)
        return _after_apply(opts, env, deployment, ok)


def cmd_destroy(opts: CommandOptions, env: Env) -> int:
    config = project_config(opts, connect=True)
    with contextlib.ExitStack() as held:
        held.enter_context(_local_locks(config, opts, env))
        deployment = open_deployment(opts, env, config, _lock_request(opts, env))
        held.callback(deployment.close)
        plan = deployment.destroy_plan(opts.with_disks, opts.allow_snapshot_loss)
        print_plan(plan, env)
        ok = True
        if plan.changes_present:
            _confirm(opts, env)
            ok = _execute(opts, env, deployment, plan)
        blocked = [c for c in plan.changes if c.blocked]
        if blocked:
            env.stderr.write("kept: " + ", ".join(
                f"{c.id if plan.multi_host else c.ref} ({c.blocked})" for c in blocked) + "\n")
        foreign = deployment.not_destroyed(plan)
        if foreign:  # never silently: the manifests asked for these to go
            env.stderr.write(f"error: not deleted, because project {config.name!r} does not "
                             "own them (another project's, or made outside kvmctl; --adopt "
                             "with apply takes them over): " + ", ".join(foreign) + "\n")
            return ExitStatus.ERROR
        return ExitStatus.OK if ok else ExitStatus.ERROR


def _confirm(opts: CommandOptions, env: Env) -> None:
    if opts.yes:
        return
    if not env.interactive:
        raise UsageError("not a terminal: pass -y to apply without confirmation")
    env.stdout.write("Apply these changes? Only 'yes' is accepted: ")
    env.stdout.flush()
    if env.stdin.readline().strip() != "yes":
        raise UsageError("apply cancelled; nothing was changed")


def _execute(opts: CommandOptions, env: Env, deployment: Deployment,
             plan: ProjectPlan) -> bool:
    from ..apply import levels
    total = sum(len(group) for h in plan.hosts for group in levels(h.plan))
    total += sum(1 for c in plan.moves if c.move_steps and not c.blocked)
    with ProgressView(env, total, plan.multi_host) as view:
        result = deployment.execute(plan, opts.parallelism, view.event)
    if plan.multi_host:  # per host: what was done, what failed, what was skipped
        for name, res in result.hosts:
            if res.results:
                env.stdout.write(f"Host {name}: {len(res.done)} done, {len(res.failed)} "
                                 f"failed, {len(res.skipped)} skipped.\n")
        if result.moves.results:
            res = result.moves
            env.stdout.write(f"Moves: {len(res.done)} done, {len(res.failed)} failed, "
                             f"{len(res.skipped)} skipped.\n")
    if result.failed:
        env.stderr.write(f"error: {len(result.failed)} change(s) failed; {len(result.done)} "
                         f"done, {len(result.skipped)} not started. Run apply again to "
                         "continue from here.\n")
        for what, why in result.failed:
            env.stderr.write(f"  {what}: {why}\n")
        return False
    env.stdout.write(f"Apply complete: {len(result.done)} change(s) made.\n")
    return True


def _after_apply(opts: CommandOptions, env: Env, deployment: Deployment, ok: bool) -> int:
    if ok and opts.wait:
        from ..apply.readiness import wait
        env.stdout.write(f"Waiting up to {opts.wait_timeout:g} s for running VMs to have an "
                         "address...\n")
        ready, problems = [], []
        for session in deployment.sessions.values():
            r, p = wait(session.hv, session.manifest, opts.wait_timeout,
                        lambda line: env.stdout.write(f"  {line}\n"))
            ready += r
            problems += p
        if ready:
            env.stdout.write("Addresses:\n")
        for vm in ready:
            env.stdout.write(f"  {vm.name}: " + (", ".join(ip for _, ip in vm.addresses)
                                                 or "running, no address needed") + "\n")
        if problems:
            env.stderr.write("error: not ready:\n  " + "\n  ".join(problems) + "\n")
            return ExitStatus.ERROR
    return ExitStatus.OK if ok else ExitStatus.ERROR


def cmd_get(opts: CommandOptions, env: Env) -> int:
    from .get import cmd_get as run_get
    return run_get(opts, env)


def cmd_sync(opts: CommandOptions, env: Env) -> int:
    from .gitops import cmd_sync as run_sync
    return run_sync(opts, env)


def cmd_controller(opts: CommandOptions, env: Env) -> int:
    from .gitops import cmd_controller as run_controller
    return run_controller(opts, env)


def cmd_status(opts: CommandOptions, env: Env) -> int:
    from .gitops import cmd_status as run_status
    return run_status(opts, env)


def cmd_snapshot(opts: CommandOptions, env: Env) -> int:
    from .snapshots import cmd_snapshot as run_snapshot
    return run_snapshot(opts, env)


def cmd_backup(opts: CommandOptions, env: Env) -> int:
    from .backups import cmd_backup as run_backup
    return run_backup(opts, env)


def cmd_restore(opts: CommandOptions, env: Env) -> int:
    from .backups import cmd_restore as run_restore
    return run_restore(opts, env)


def cmd_import(opts: CommandOptions, env: Env) -> int:
    from .importing import cmd_import as run_import
    return run_import(opts, env)
