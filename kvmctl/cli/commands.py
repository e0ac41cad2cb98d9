"""The commands: each reads its typed options, calls the pipeline, reports, returns a status.

The engine is imported inside the commands that need it, so that `kvmctl --help` and
`kvmctl validate` never load libvirt.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..errors import ManifestError, UsageError
from .exits import ExitStatus
from .options import CommandOptions
from .report import Env, ProgressView, print_plan, print_problems

if TYPE_CHECKING:
    from ..engine import PlanRequest, Session, Target
    from ..manifest.documents import Document
    from ..manifest.model import ManifestSet
    from ..plan.types import Plan


def target(opts: CommandOptions) -> Target:
    from ..engine import Target
    return Target(opts.uri, opts.project, opts.domain_type)


def plan_request(opts: CommandOptions) -> PlanRequest:
    from ..engine import PlanRequest
    return PlanRequest(opts.prune, opts.prune_disks, opts.adopt, opts.allow_empty, opts.targets)


def open_session(opts: CommandOptions, env: Env) -> Session:
    from ..engine import Session
    return Session(target(opts), list(opts.filenames), opts.recursive, env.stdin)


def _load(opts: CommandOptions, env: Env) -> tuple[list[Document], ManifestSet]:
    from ..manifest import documents, validate
    if not opts.filenames:
        raise UsageError("no manifests given: use -f FILE, -f DIR or -f -")
    docs = documents.load(list(opts.filenames), recursive=opts.recursive, stdin=env.stdin)
    return docs, validate.validate(docs)


# ---- validate, render ---------------------------------------------------------------------------

def cmd_validate(opts: CommandOptions, env: Env) -> int:
    try:
        docs, _ = _load(opts, env)
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
    _, manifest = _load(opts, env)
    rendered = [r for r in render_all(manifest, opts.project, opts.domain_type)
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
    from ..engine import save_plan
    from ..plan.types import plan_json
    session = open_session(opts, env)
    request = plan_request(opts)
    plan = session.plan(request)
    if opts.output == "json":
        json.dump(plan_json(plan), env.stdout, indent=2)
        env.stdout.write("\n")
    else:
        print_plan(plan, env)
    if opts.out:
        save_plan(opts.out, session, request, plan)
        if opts.output == "text":
            env.stdout.write(f"plan saved to {opts.out}; run: kvmctl apply {opts.out}\n")
    if opts.detailed_exitcode and plan.changes_present:
        return ExitStatus.CHANGES
    return ExitStatus.OK


# ---- apply, destroy -----------------------------------------------------------------------------

def cmd_apply(opts: CommandOptions, env: Env) -> int:
    from ..apply.lock import project_lock
    from ..engine import load_saved
    if opts.plan_file and opts.filenames:
        raise UsageError("give either a saved plan or -f manifests, not both")
    # The lock is the command line's project and URI (for a saved plan too, as it always was).
    with project_lock(opts.uri, opts.project, opts.lock_timeout,
                      lambda m: env.stderr.write(m + "\n")):
        if opts.plan_file:
            session, plan = load_saved(opts.plan_file, opts.connect)
        else:
            session = open_session(opts, env)
            plan = session.plan(plan_request(opts))
        print_plan(plan, env)
        if not plan.changes_present:
            return _after_apply(opts, env, session, ok=True)
        _confirm(opts, env)
        ok = _execute(opts, env, session, plan)
        return _after_apply(opts, env, session, ok)


def cmd_destroy(opts: CommandOptions, env: Env) -> int:
    from ..apply.lock import project_lock
    with project_lock(opts.uri, opts.project, opts.lock_timeout,
                      lambda m: env.stderr.write(m + "\n")):
        session = open_session(opts, env)
        plan = session.destroy_plan(opts.with_disks)
        print_plan(plan, env)
        ok = True
        if plan.changes_present:
            _confirm(opts, env)
            ok = _execute(opts, env, session, plan)
        blocked = [c for c in plan.changes if c.blocked]
        if blocked:
            env.stderr.write("kept: " + ", ".join(f"{c.ref} ({c.blocked})" for c in blocked)
                             + "\n")
        foreign = session.not_destroyed(plan)
        if foreign:  # never silently: the manifests asked for these to go
            env.stderr.write(f"error: not deleted, because project {opts.project!r} does not "
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


def _execute(opts: CommandOptions, env: Env, session: Session, plan: Plan) -> bool:
    from ..apply import levels
    total = sum(len(group) for group in levels(plan))
    with ProgressView(env, total) as view:
        result = session.execute(plan, opts.parallelism, view.event)
    if result.failed:
        env.stderr.write(f"error: {len(result.failed)} change(s) failed; {len(result.done)} "
                         f"done, {len(result.skipped)} not started. Run apply again to "
                         "continue from here.\n")
        return False
    env.stdout.write(f"Apply complete: {len(result.done)} change(s) made.\n")
    return True


def _after_apply(opts: CommandOptions, env: Env, session: Session, ok: bool) -> int:
    if ok and opts.wait:
        from ..apply.readiness import wait
        env.stdout.write(f"Waiting up to {opts.wait_timeout:g} s for running VMs to have an "
                         "address...\n")
        ready, problems = wait(session.hv, session.manifest, opts.wait_timeout,
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


def cmd_get(opts: CommandOptions, env: Env) -> int:
    from .get import cmd_get as run_get
    return run_get(opts, env)
