"""`kvmctl sync` (one reconciliation from git), `kvmctl controller` (the loop, its API and page)
and `kvmctl status` (the controller's view, or one fresh plan without a controller)."""

from __future__ import annotations

import gc
import json
import logging
import os
import secrets
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import UsageError
from .exits import ExitStatus
from .options import CommandOptions
from .report import Env

if TYPE_CHECKING:
    from ..sync.reconcile import ProjectSource
    from ..sync.status import ProjectStatus, SyncRecord

DEFAULT_LISTEN = "127.0.0.1:8787"
TOKEN_ENV = "KVMCTL_CONTROLLER_TOKEN"
WEBHOOK_ENV = "KVMCTL_WEBHOOK_SECRET"


def default_state_dir() -> str:
    if os.environ.get("KVMCTL_STATE_DIR"):
        return os.environ["KVMCTL_STATE_DIR"]
    if os.geteuid() == 0:
        return "/var/lib/kvmctl"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "kvmctl")


def _state_dir(opts: CommandOptions) -> str:
    """The state directory, made private (0700) if it is new; UsageError if it cannot be."""
    path = os.path.abspath(opts.state_dir or default_state_dir())
    try:
        existed = os.path.isdir(path)
        os.makedirs(path, mode=0o700, exist_ok=True)
        if not existed:
            os.chmod(path, 0o700)  # makedirs obeys the umask
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise UsageError(f"state directory {path}: {exc.strerror} (--state-dir or "
                         "$KVMCTL_STATE_DIR names another)") from None
    return path


def sources(opts: CommandOptions) -> list[ProjectSource]:
    """The projects of the command line: --repo (with --ref, --path) for one, or each
    --project-file's spec.sync.source; --repo with one --project-file: that file's project
    from that repository."""
    from ..manifest.project import Overrides, load_project_file
    from ..source import SourceSpec
    from ..sync.policy import read_source
    from ..sync.reconcile import ProjectSource
    overrides = Overrides(opts.project, opts.connect, opts.domain_type)
    files = list(opts.project_files) or ([opts.project_file] if opts.project_file else [])
    if not files and not opts.repo:
        found = os.path.join(os.getcwd(), "kvmctl.yaml")
        if os.path.isfile(found):
            files = [found]
    out: list[ProjectSource] = []
    if opts.repo:
        if len(files) > 1:
            raise UsageError("--repo names one project: give at most one --project-file")
        spec = SourceSpec.of(opts.repo, opts.ref or "HEAD", opts.path or ".")
        out.append(ProjectSource(spec, files[0] if files else None, overrides))
        return out
    for path in files:
        if not os.path.isfile(path):
            raise UsageError(f"--project-file {path}: no such file")
        src = read_source(load_project_file(path))
        if src is None:
            raise UsageError(f"{path} has no spec.sync.source: give --repo (and --ref, --path)")
        spec = SourceSpec.of(src.repo if "://" in src.repo or src.repo.startswith("/")
                             or "@" in src.repo.split("/")[0]
                             else os.path.join(os.path.dirname(os.path.abspath(path)),
                                               src.repo),
                             opts.ref or src.ref, opts.path or src.path)
        out.append(ProjectSource(spec, os.path.abspath(path), overrides, label=path))
    if not out:
        raise UsageError("nothing to sync: give --repo URL (with --ref, --path), or "
                         "--project-file FILE with a spec.sync.source")
    return out


def _history(state_dir: str) -> Any:
    from ..controller.history import History
    try:
        return History(os.path.join(state_dir, "history.db"))
    except UsageError as exc:
        logging.getLogger("kvmctl.controller").warning("history unavailable: %s", exc)
        return None


# ---- kvmctl sync --------------------------------------------------------------------------------

def cmd_sync(opts: CommandOptions, env: Env) -> int:
    from ..source import GitCache
    from ..sync.reconcile import Reconciler
    from ..sync.status import SyncResult
    todo = sources(opts)
    state_dir = _state_dir(opts)
    history = _history(state_dir)
    cache = GitCache(os.path.join(state_dir, "git"))
    worst = ExitStatus.OK
    results = []
    for source in todo:
        reconciler = Reconciler(source, cache, opts.lock_timeout, opts.parallelism,
                                command="kvmctl sync", state_dir=state_dir)
        outcome = reconciler.reconcile("cli", dry_run=opts.dry_run)
        record = outcome.record
        in_force = None
        try:  # history is a convenience: a damaged database never hides what was applied
            if history is not None and not opts.dry_run:
                record = history.record(record)
            if history is not None and record.result is SyncResult.FAILED \
                    and outcome.status.commit is None:
                in_force = history.last_good_commit(record.project)
        except UsageError as exc:
            env.stderr.write(f"warning: history unavailable: {exc}\n")
        status = replace(outcome.status, commit=in_force) if in_force else outcome.status
        results.append((record, status))
        if record.result is SyncResult.FAILED or any(not h.reachable
                                                      for h in status.hosts):
            worst = ExitStatus.ERROR  # a host not reached: a cron job must hear of it
        elif record.result in (SyncResult.OUT_OF_SYNC, SyncResult.PARTIAL) and \
                opts.detailed_exitcode and worst is ExitStatus.OK:
            worst = ExitStatus.CHANGES
    if history is not None:
        history.close()
    if opts.output == "json":
        from ..controller.web import record_json, status_json
        json.dump([{"sync": record_json(r), "status": status_json(s, True)}
                   for r, s in results], env.stdout, indent=2)
        env.stdout.write("\n")
    else:
        for record, status in results:
            _print_sync(record, status, env.stdout, env.stderr, opts.dry_run)
    return worst


def _print_sync(record: SyncRecord, status: ProjectStatus, out: TextIO, err: TextIO,
                dry_run: bool) -> None:
    commit = record.commit
    where = f"{commit.short} ({commit.message!r}, {commit.author})" if commit else "no commit"
    out.write(f"Project {record.project} from {status.source} at {where}: {record.result}"
              f"{' (dry run: nothing changed)' if dry_run else ''}\n")
    if record.summary:
        out.write(f"  {record.summary}\n")
    for change in record.changed:
        out.write(f"  made: {change}\n")
    reasons = {o.id: o for o in status.objects}
    for change in record.waiting:
        o = reasons.get(change)
        out.write(f"  waiting: {change}" + (f": {o.waiting}" if o and o.waiting else "") + "\n")
        if o is not None:
            for f in o.fields:
                out.write(f"      {f.field}: {f.old} -> {f.new}\n")
    for change, why in record.failed:
        err.write(f"  failed: {change}: {why}\n")
    if record.errors:
        err.write(f"error: the sync of {record.project} failed"
                  + (f" at commit {commit.sha}" if commit else "") + "; nothing was changed"
                  + (f", {status.commit.short if status.commit else ''} stays in force"
                     if status.commit and commit and status.commit.sha != commit.sha else "")
                  + ":\n")
        for e in record.errors:
            err.write(f"  {e}\n")


# ---- kvmctl controller --------------------------------------------------------------------------

def _secret(path: str | None, env_name: str, what: str) -> str | None:
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from None
        if not value:
            raise UsageError(f"the {what} file {path} is empty")
        return value
    return os.environ.get(env_name) or None


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"--listen {text}: write HOST:PORT, e.g. 127.0.0.1:8787") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"--listen {text}: port out of range")
    return host.strip("[]") or "127.0.0.1", number


def cmd_controller(opts: CommandOptions, env: Env) -> int:
    gc.enable()  # a long-running process: main() turned the cycle collector off for one command
    stop = threading.Event()
    # SIGTERM from the first moment: one that comes while the controller starts ends it, 0.
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _controller(opts, env, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _controller(opts: CommandOptions, env: Env, stop: threading.Event) -> int:
    _setup_logging(opts.log_format, env.stderr)
    log = logging.getLogger("kvmctl.controller")
    from ..controller.loop import Controller, ControllerSettings, ControllerViewAdapter
    from ..controller.web import Server, create_app
    todo = sources(opts)
    state_dir = _state_dir(opts)
    host, port = _listen(opts.listen or DEFAULT_LISTEN)
    token = _secret(opts.token_file, TOKEN_ENV, "token")
    if token is None:
        token = _generated_token(state_dir)
        log.info("no --token-file or $%s: the API token is in %s", TOKEN_ENV,
                 os.path.join(state_dir, "token"))
    webhook = _secret(opts.webhook_secret_file, WEBHOOK_ENV, "webhook secret")
    settings = ControllerSettings(state_dir, opts.interval, opts.lock_timeout, opts.parallelism)
    controller = Controller(todo, settings, _history(state_dir))
    app = create_app(ControllerViewAdapter(controller), token, webhook, controller.metrics)
    try:
        server = Server(app, host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if host in ("127.0.0.1", "::1", "localhost"):
        app.config["KVMCTL_ALLOWED_HOSTS"] = {f"{name}:{server.port}" for name in (
            "127.0.0.1", "localhost", "[::1]")}
    if webhook is None:
        log.info("no --webhook-secret-file or $%s: the webhook is off", WEBHOOK_ENV)
    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: finishing the change in progress, starting no other",
                 signal.Signals(signum).name)
        stop.set()
        controller.stopping.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    if stop.is_set():  # asked to stop while starting
        server.stop()
        return ExitStatus.OK
    log.info("controller: %d project(s), %s on http://%s:%d/", len(todo),
             ", ".join(s.key for s in todo), host, server.port)
    controller.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        controller.stop()
        server.stop()
        if controller.history is not None:
            controller.history.close()
    log.info("controller: stopped")
    return ExitStatus.OK


def _generated_token(state_dir: str) -> str:
    """A token made once and kept private in the state directory, so that the state-changing
    routes are never open even when none was given."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "token")
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    os.chmod(path, 0o600)
    return value


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        return f"{when} {record.levelname.lower()} {record.getMessage()}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(), "message": record.getMessage()}
        data.update(getattr(record, "kv", {}))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _setup_logging(fmt: str, stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _PlainFormatter())
    root = logging.getLogger("kvmctl")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    for noisy in ("waitress", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- kvmctl status ------------------------------------------------------------------------------

def cmd_status(opts: CommandOptions, env: Env) -> int:
    url = (opts.controller_url or os.environ.get("KVMCTL_CONTROLLER")
           or f"http://{DEFAULT_LISTEN}").rstrip("/")
    data = _from_controller(url)
    if data is None:  # no controller answers: one fresh plan, changing nothing
        from ..controller.web import status_json
        from ..source import GitCache
        from ..sync.reconcile import Reconciler
        state_dir = _state_dir(opts)
        cache = GitCache(os.path.join(state_dir, "git"))
        data = []
        for source in sources(opts):
            outcome = Reconciler(source, cache, command="kvmctl status",
                                 state_dir=state_dir).reconcile("status", dry_run=True)
            data.append(status_json(outcome.status, True))
        origin = "a fresh plan (no controller answers at " + url + ")"
    else:
        origin = f"the controller at {url}"
    if opts.output == "json":
        json.dump({"source": origin, "projects": data}, env.stdout, indent=2)
        env.stdout.write("\n")
        return ExitStatus.OK
    env.stdout.write(f"From {origin}:\n")
    for p in data:
        commit = p.get("commit") or {}
        last = p.get("last_sync") or {}
        env.stdout.write(f"\nProject {p['name']}: {p['state']}"
                         + (f" ({p['state_reason']})" if p.get("state_reason") else "") + "\n")
        env.stdout.write(f"  source: {p['source']}\n")
        if commit:
            env.stdout.write(f"  commit: {commit.get('short')} {commit.get('message', '')!r} "
                             f"by {commit.get('author', '')}\n")
        if last:
            env.stdout.write(f"  last sync: {last.get('result')} {last.get('summary', '')}\n")
            for e in last.get("errors") or []:
                env.stdout.write(f"    {e}\n")
        for h in p.get("hosts") or []:
            if not h.get("reachable", True):
                env.stdout.write(f"  host {h['name']} unreachable: {h.get('error', '')}\n")
        for o in p.get("objects") or []:
            env.stdout.write(f"  {o['id']:<44} {o['sync']:<12} {o['health']:<12}"
                             f"{o.get('health_reason') or ''}\n")
            for f in o.get("fields") or []:
                env.stdout.write(f"      {f['field']}: {f['old']} -> {f['new']}\n")
            if o.get("waiting"):
                env.stdout.write(f"      waiting: {o['waiting']}\n")
            if o.get("error"):
                env.stdout.write(f"      error: {o['error']}\n")
        for vm in p.get("pending_restarts") or []:
            env.stdout.write(f"  pending restart: {vm}\n")
    return ExitStatus.OK


def _from_controller(url: str) -> list[dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/projects", timeout=5) as r:
            listed = json.load(r)
        out = []
        for p in listed:
            with urllib.request.urlopen(
                    f"{url}/api/v1/projects/{urllib.parse.quote(p['name'], safe='')}",
                    timeout=5) as r:
                out.append(json.load(r))
        return out
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None  # nothing, or not a kvmctl controller, answers there
