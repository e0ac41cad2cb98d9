"""The controller's web layer: a JSON API, a forge webhook, Prometheus metrics and a
server-rendered page, all over a `ControllerView`, served by waitress in a thread.

Routes (`<name>` may hold slashes and spaces: a project's name is any one line):

    GET  /healthz  /readyz  /metrics  /static/style.css
    GET  /api/v1/projects  /api/v1/projects/<name>  .../<name>/plan  .../<name>/history?limit=N
    GET  /api/v1/history?limit=N
    POST /api/v1/projects/<name>/sync | suspend | resume          (Bearer token; 202)
    POST /api/v1/webhook  /api/v1/webhook/<name>                  (forge signature; 202)
    GET  /  /projects/<name>  /login
    POST /login  /logout  /projects/<name>/sync | suspend | resume (session + CSRF; 303)

Who may do what:

- Reading (every GET) needs nothing: the page and the API show what git already says, with
  sensitive values masked before they reach a status.
- The API's POSTs need `Authorization: Bearer <token>`.
- The page's forms need a session made by pasting the token at /login, and the session's CSRF
  token in the form; the cookie is HttpOnly and SameSite=Strict, signed with a key made at
  start (a restart logs everybody out, which is the point: nothing to keep secret on disk).
- The webhook needs the forge's signature of the body, made with the webhook secret; without
  one it is off (never the token: GitLab shows its webhook secret to maintainers).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import flask
import jinja2
import waitress  # type: ignore[import-untyped]  # waitress ships no type information
import waitress.trigger  # type: ignore[import-untyped]
import waitress.wasyncore  # type: ignore[import-untyped]
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from ..sync.status import (
    Commit,
    Health,
    ObjectStatus,
    ProjectState,
    ProjectStatus,
    SyncRecord,
    SyncResult,
    SyncStatus,
    WindowState,
)
from .metrics import Metrics
from .view import ControllerView

log = logging.getLogger("kvmctl.controller")

# GET pages reload themselves this often (0: never); a meta refresh rather than a script, so the
# page stays current without JavaScript.
REFRESH_SECONDS = 5
# A push event is a few KiB; anything near this is not a forge talking.
MAX_BODY = 1024 * 1024
HISTORY_LIMIT = 50
HISTORY_LIMIT_MAX = 1000
HISTORY_ON_PAGE = 20

TEMPLATES_PACKAGE = "kvmctl.templates"
TEMPLATES_FOLDER = "web"


# ----- JSON shapes (plain functions: `kvmctl status -o json` uses them without Flask) -----


def iso(t: float | None) -> str | None:
    """Seconds since the epoch as UTC ISO 8601 (`2024-05-01T12:00:00Z`), None kept."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def commit_json(c: Commit | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {"sha": c.sha, "short": c.short, "author": c.author, "email": c.email,
            "time": iso(c.time) if c.time else None, "message": c.message}


def record_json(rec: SyncRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "project": rec.project,
        "started": iso(rec.started),
        "finished": iso(rec.finished),
        "duration": round(rec.duration, 3),
        "trigger": rec.trigger,
        "result": rec.result.value,
        "commit": commit_json(rec.commit),
        "summary": rec.summary,
        "changed": list(rec.changed),
        "waiting": list(rec.waiting),
        "failed": [{"id": oid, "error": why} for oid, why in rec.failed],
        "errors": list(rec.errors),
        "drift": rec.drift,
    }


def object_json(o: ObjectStatus) -> dict[str, Any]:
    return {
        "id": o.id,
        "host": o.host,
        "kind": o.kind,
        "name": o.name,
        "sync": o.sync.value,
        "health": o.health.value,
        "health_reason": o.health_reason,
        "change_class": o.change_class,
        "reasons": list(o.reasons),
        "fields": [{"field": f.field, "old": f.old, "new": f.new} for f in o.fields],
        "waiting": o.waiting,
        "error": o.error,
    }


def window_json(w: WindowState) -> dict[str, Any]:
    return {"defined": w.defined, "open": w.open, "closes_at": iso(w.closes_at),
            "next_open": iso(w.next_open)}


def status_json(p: ProjectStatus, with_objects: bool = False) -> dict[str, Any]:
    """A project's status; with its objects for one project, without for the list."""
    out: dict[str, Any] = {
        "name": p.name,
        "source": p.source,
        "state": p.state.value,
        "state_reason": p.state_reason,
        "suspended": p.suspended,
        "commit": commit_json(p.commit),
        "last_sync": record_json(p.last_sync) if p.last_sync is not None else None,
        "last_success": iso(p.last_success),
        "hosts": [{"name": h.name, "uri": h.uri, "reachable": h.reachable, "error": h.error}
                  for h in p.hosts],
        "counts": {"sync": {s.value: p.count(s) for s in SyncStatus},
                   "health": {h.value: p.count(h) for h in Health}},
        "pending_restarts": list(p.pending_restarts),
        "window": window_json(p.window),
        "next_sync": iso(p.next_sync),
        "policy": p.policy,
    }
    if with_objects:
        out["objects"] = [object_json(o) for o in p.objects]
    return out


# ----- the webhook's checks (plain functions, so the tests can sign bodies the same way) -----


def _hmac_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    # compare_digest refuses non-ASCII str; a header is latin-1 text, bytes compare any of it.
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def verify_webhook(headers: Mapping[str, str] | Headers, body: bytes, secret: str) -> str | None:
    """The forge whose proof over `body` holds ("github", "gitea", "forgejo", "gitlab"), or
    None. The first proof header present decides: Gitea and Forgejo also send GitHub's header,
    made with the same secret, so any of theirs holding is as good as another."""
    if not secret:
        # An HMAC with an empty key is one anybody can make.
        return None
    sent = {name.lower(): value for name, value in headers.items()}
    github = sent.get("x-hub-signature-256")
    if github is not None:
        scheme, _, digest = github.strip().partition("=")
        ok = scheme == "sha256" and _same(digest.lower(), _hmac_hex(secret, body))
        return "github" if ok else None
    for header, forge in (("x-gitea-signature", "gitea"), ("x-forgejo-signature", "forgejo")):
        value = sent.get(header)
        if value is not None:
            return forge if _same(value.strip().lower(), _hmac_hex(secret, body)) else None
    gitlab = sent.get("x-gitlab-token")
    if gitlab is not None:
        return "gitlab" if _same(gitlab, secret) else None
    return None


# Where a push event names its repository: GitHub, Gitea and Forgejo under "repository",
# GitLab under "project" (and, older, under "repository" too).
_URL_KEYS = ("clone_url", "ssh_url", "html_url", "git_url", "url", "git_http_url",
             "git_ssh_url", "web_url", "http_url", "homepage")


def payload_urls(payload: Any) -> list[str]:
    """Every repository URL a push event's payload names, in order, each once."""
    found: list[str] = []
    if not isinstance(payload, dict):
        return found
    for section in ("repository", "project"):
        part = payload.get(section)
        if not isinstance(part, dict):
            continue
        for key in _URL_KEYS:
            value = part.get(key)
            if isinstance(value, str) and value and value not in found:
                found.append(value)
    return found


def _payload(body: bytes, content_type: str) -> Any:
    """The event as JSON; GitHub may send it form-encoded as the field `payload`."""
    if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        fields = parse_qs(body.decode("utf-8", "replace"))
        text = fields.get("payload", [""])[0]
    else:
        text = body.decode("utf-8", "replace")
    return json.loads(text)


# ----- page helpers -----

# The colour of a status, whatever it is the status of.
_TONES = {
    SyncStatus.SYNCED.value: "ok", Health.HEALTHY.value: "ok", SyncResult.SYNCED.value: "ok",
    SyncResult.APPLIED.value: "ok",
    SyncStatus.OUT_OF_SYNC.value: "warn", SyncStatus.PROGRESSING.value: "warn",
    SyncResult.PARTIAL.value: "warn", SyncResult.OUT_OF_SYNC.value: "warn",
    SyncStatus.FAILED.value: "bad", Health.DEGRADED.value: "bad", Health.MISSING.value: "bad",
    SyncResult.FAILED.value: "bad",
    ProjectState.SUSPENDED.value: "muted", SyncResult.SUSPENDED.value: "muted",
    Health.UNKNOWN.value: "muted",
}


def tone(value: object) -> str:
    return _TONES.get(str(value), "muted")


def _utc(t: float | None) -> str:
    return iso(t) or "—"


def _ago(t: float | None) -> str:
    """A moment relative to now, to read at a glance next to its ISO form."""
    if t is None:
        return ""
    delta = t - time.time()
    span = abs(delta)
    if span < 1:
        return "now"
    if span < 90:
        text = f"{span:.0f} s"
    elif span < 90 * 60:
        text = f"{span / 60:.0f} min"
    elif span < 36 * 3600:
        text = f"{span / 3600:.0f} h"
    else:
        text = f"{span / 86400:.0f} d"
    return f"in {text}" if delta > 0 else f"{text} ago"


def _safe_next(target: str | None) -> str:
    """Only a path of this site: a login must not become a redirect to anywhere."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def _stylesheet() -> str:
    folder = resources.files(TEMPLATES_PACKAGE).joinpath(TEMPLATES_FOLDER)
    return folder.joinpath("style.css").read_text(encoding="utf-8")


def _abort(code: int, message: str) -> NoReturn:
    flask.abort(code, description=message)


# ----- the application -----


def create_app(view: ControllerView, token: str, webhook_secret: str | None, metrics: Metrics,
               *, refresh_seconds: int = REFRESH_SECONDS) -> flask.Flask:
    """The WSGI application over `view`. `token` authorises the API's POSTs and the page's
    login; `webhook_secret` verifies the forges' signatures (None: the webhook is off; never
    the token, which a forge such as GitLab shows to the repository's maintainers)."""
    app = flask.Flask(__name__, static_folder=None)
    app.secret_key = secrets.token_bytes(32)
    app.config.update(
        SESSION_COOKIE_NAME="kvmctl_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        MAX_CONTENT_LENGTH=MAX_BODY,
    )
    # Flask picks autoescaping by file name and knows no `.html.j2`: escape everything, always.
    app.jinja_options = {
        **app.jinja_options,
        "loader": jinja2.PackageLoader(TEMPLATES_PACKAGE, TEMPLATES_FOLDER),
        "autoescape": True,
        "undefined": jinja2.StrictUndefined,
    }
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False  # the order status_json gives reads better
    app.jinja_env.filters.update(utc=_utc, ago=_ago, tone=tone)
    app.jinja_env.globals.update(SYNC_STATUSES=list(SyncStatus), HEALTHS=list(Health))
    stylesheet = _stylesheet()
    secret = webhook_secret

    @app.before_request
    def only_known_hosts() -> flask.Response | None:
        # Listening on loopback, only loopback names: a page of another site that a browser
        # resolves to 127.0.0.1 (DNS rebinding) reads nothing.
        allowed = app.config.get("KVMCTL_ALLOWED_HOSTS")
        if allowed and flask.request.host.lower() not in allowed:
            response = flask.Response("unknown host name\n", status=421,
                                      mimetype="text/plain")
            return response
        return None

    def api_error(code: int, message: str) -> flask.Response:
        response = flask.jsonify({"error": message})
        response.status_code = code
        if code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="kvmctl"'
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> flask.Response | HTTPException:
        if flask.request.path.startswith("/api/"):
            return api_error(exc.code or 500, exc.description or exc.name)
        return exc

    @app.after_request
    def headers(response: flask.Response) -> flask.Response:
        # Defence in depth under the escaping: no script runs, nothing frames the page.
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if response.mimetype == "text/html":
            # The page shows live state and carries the session's CSRF token.
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.context_processor
    def page_context() -> dict[str, Any]:
        logged_in = bool(flask.session.get("login"))
        return {"logged_in": logged_in,
                "csrf_token": flask.session.get("csrf", "") if logged_in else "",
                "refresh": refresh_seconds, "now": time.time()}

    def token_ok(given: str) -> bool:
        return bool(token) and _same(given, token)

    def require_bearer() -> flask.Response | None:
        scheme, _, value = flask.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token_ok(value.strip()):
            return None
        log.warning("api: refused %s %s from %s: no valid bearer token", flask.request.method,
                    flask.request.path, flask.request.remote_addr)
        return api_error(401, "a valid 'Authorization: Bearer <token>' is required")

    def require_form_session() -> None:
        """A logged-in session and its CSRF token, or 403 before anything is done."""
        expected = flask.session.get("csrf")
        given = flask.request.form.get("csrf_token", "")
        if not flask.session.get("login") or not isinstance(expected, str) or not expected:
            log.warning("web: refused %s from %s: not logged in", flask.request.path,
                        flask.request.remote_addr)
            _abort(403, "Log in first.")
        if not _same(given, expected):
            log.warning("web: refused %s from %s: bad CSRF token", flask.request.path,
                        flask.request.remote_addr)
            _abort(403, "The form's CSRF token does not match this session.")

    def history_limit() -> int:
        raw = flask.request.args.get("limit")
        if raw is None:
            return HISTORY_LIMIT
        try:
            limit = int(raw)
        except ValueError:
            _abort(400, "limit must be a whole number")
        if not 1 <= limit <= HISTORY_LIMIT_MAX:
            _abort(400, f"limit must be from 1 to {HISTORY_LIMIT_MAX}")
        return limit

    def known(name: str) -> ProjectStatus:
        status = view.project(name)
        if status is None:
            _abort(404, f"no project {name!r}")
        return status

    # --- probes and metrics ---

    @app.get("/healthz")
    def healthz() -> flask.Response:
        return flask.Response("ok\n", mimetype="text/plain")

    @app.get("/readyz")
    def readyz() -> flask.Response:
        """Ready once the controller answers and every project has been reconciled (or
        suspended): before that its statuses say nothing yet."""
        try:
            statuses = view.projects()
        except Exception:
            log.exception("readyz: cannot read the projects")
            return flask.Response("not ready: cannot read the projects\n", status=503,
                                  mimetype="text/plain")
        waiting = [p.name for p in statuses if p.state is ProjectState.UNKNOWN]
        if waiting:
            return flask.Response(f"not ready: not reconciled yet: {', '.join(waiting)}\n",
                                  status=503, mimetype="text/plain")
        return flask.Response("ready\n", mimetype="text/plain")

    @app.get("/metrics")
    def metrics_page() -> flask.Response:
        return flask.Response(generate_latest(metrics.registry),
                              headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.get("/static/style.css")
    def stylesheet_file() -> flask.Response:
        response = flask.Response(stylesheet, mimetype="text/css")
        response.headers["Cache-Control"] = "max-age=300"
        return response

    # --- the API ---

    @app.get("/api/v1/projects")
    def api_projects() -> flask.Response:
        return flask.jsonify([status_json(p, with_objects=False) for p in view.projects()])

    @app.get("/api/v1/projects/<path:name>")
    def api_project(name: str) -> flask.Response:
        return flask.jsonify(status_json(known(name), with_objects=True))

    @app.get("/api/v1/projects/<path:name>/plan")
    def api_plan(name: str) -> flask.Response:
        return flask.jsonify(known(name).plan)

    @app.get("/api/v1/projects/<path:name>/history")
    def api_project_history(name: str) -> flask.Response:
        limit = history_limit()
        known(name)
        return flask.jsonify([record_json(r) for r in view.history(name, limit=limit)])

    @app.get("/api/v1/history")
    def api_history() -> flask.Response:
        limit = history_limit()
        return flask.jsonify([record_json(r) for r in view.history(None, limit=limit)])

    def api_action(name: str, what: str, act: Callable[[], bool]) -> flask.Response:
        refused = require_bearer()
        if refused is not None:
            return refused
        if not act():
            return api_error(404, f"no project {name!r}")
        log.info("api: %s %s requested from %s", what, name, flask.request.remote_addr)
        response = flask.jsonify({"project": name, "accepted": what})
        response.status_code = 202
        return response

    @app.post("/api/v1/projects/<path:name>/sync")
    def api_sync(name: str) -> flask.Response:
        return api_action(name, "sync", lambda: view.request_sync(name, "manual"))

    @app.post("/api/v1/projects/<path:name>/suspend")
    def api_suspend(name: str) -> flask.Response:
        return api_action(name, "suspend", lambda: view.set_suspended(name, True))

    @app.post("/api/v1/projects/<path:name>/resume")
    def api_resume(name: str) -> flask.Response:
        return api_action(name, "resume", lambda: view.set_suspended(name, False))

    # --- the webhook ---

    @app.post("/api/v1/webhook", defaults={"name": None})
    @app.post("/api/v1/webhook/<path:name>")
    def webhook(name: str | None) -> flask.Response:
        body = flask.request.get_data(cache=True)  # 413 past MAX_CONTENT_LENGTH
        if not secret:
            return api_error(404, "the webhook is off: start the controller with "
                                  "--webhook-secret-file or $KVMCTL_WEBHOOK_SECRET")
        forge = verify_webhook(flask.request.headers, body, secret)
        if forge is None:
            log.warning("webhook: refused a request from %s: no valid signature",
                        flask.request.remote_addr)
            return api_error(401, "no valid webhook signature")
        if flask.request.headers.get("X-GitHub-Event") == "ping":
            return flask.jsonify({"triggered": [], "ping": True})
        if name is not None:
            names = [name]
        else:
            try:
                payload = _payload(body, flask.request.content_type or "")
            except ValueError:
                return api_error(400, "the payload is not JSON")
            urls = payload_urls(payload)
            if not urls:
                return api_error(400, "the payload names no repository")
            names = view.webhook_project(urls)
        triggered = [n for n in names if view.request_sync(n, "webhook")]
        if not triggered:
            what = repr(name) if name is not None else "for this repository"
            return api_error(404, f"no project {what}")
        log.info("webhook (%s): sync requested for %s", forge, ", ".join(triggered))
        response = flask.jsonify({"triggered": triggered})
        response.status_code = 202
        return response

    # --- the page ---

    @app.get("/")
    def index() -> str:
        return flask.render_template("index.html.j2", projects=view.projects())

    @app.get("/projects/<path:name>")
    def project_page(name: str) -> str:
        p = known(name)
        drifted = [o for o in p.objects if o.sync is not SyncStatus.SYNCED]
        return flask.render_template("project.html.j2", p=p, drifted=drifted,
                                     history=view.history(name, limit=HISTORY_ON_PAGE))

    @app.get("/login")
    def login() -> str:
        # No refresh here: it would wipe the token being pasted.
        return flask.render_template("login.html.j2", error="", auto_refresh=False,
                                     next=_safe_next(flask.request.args.get("next")))

    @app.post("/login")
    def login_post() -> BaseResponse | tuple[str, int]:
        target = _safe_next(flask.request.form.get("next"))
        if not token_ok(flask.request.form.get("token", "").strip()):
            log.warning("web: failed login from %s", flask.request.remote_addr)
            return flask.render_template("login.html.j2", error="That is not the token.",
                                         auto_refresh=False, next=target), 401
        flask.session.clear()
        flask.session["login"] = True
        flask.session["csrf"] = secrets.token_urlsafe(32)
        log.info("web: login from %s", flask.request.remote_addr)
        flask.flash("Logged in.", "ok")
        return flask.redirect(target, 303)

    @app.post("/logout")
    def logout() -> BaseResponse:
        require_form_session()
        flask.session.clear()
        flask.flash("Logged out.", "ok")
        return flask.redirect(flask.url_for("index"), 303)

    def form_action(name: str, act: Callable[[], bool], done: str) -> BaseResponse:
        require_form_session()
        if not act():
            _abort(404, f"no project {name!r}")
        log.info("web: %s (from %s)", done, flask.request.remote_addr)
        flask.flash(done, "ok")
        return flask.redirect(flask.url_for("project_page", name=name), 303)

    @app.post("/projects/<path:name>/sync")
    def form_sync(name: str) -> BaseResponse:
        return form_action(name, lambda: view.request_sync(name, "manual"),
                           f"Sync of {name} requested.")

    @app.post("/projects/<path:name>/suspend")
    def form_suspend(name: str) -> BaseResponse:
        return form_action(name, lambda: view.set_suspended(name, True), f"{name} suspended.")

    @app.post("/projects/<path:name>/resume")
    def form_resume(name: str) -> BaseResponse:
        return form_action(name, lambda: view.set_suspended(name, False), f"{name} resumed.")

    return app


# ----- the server -----


class Server:
    """`app` served by waitress from a daemon thread, from construction until `stop()`.

    Port 0 binds a free port (`.port` says which). Waitress's own `close()` closes only the
    listening socket, and its loop then runs on for as long as any client keeps a connection
    alive (a browser does, up to its channel timeout of two minutes); so `stop()` instead has
    the loop thread close every socket it owns, which ends the loop within one poll."""

    def __init__(self, app: flask.Flask, host: str = "127.0.0.1", port: int = 0, *,
                 threads: int = 4) -> None:
        self._server: Any = waitress.create_server(app, host=host, port=port, threads=threads,
                                                   ident="kvmctl")
        if hasattr(self._server, "effective_port"):
            bound_host, bound_port = self._server.effective_host, self._server.effective_port
            self._map: dict[int, Any] = self._server._map
        else:  # a name resolving to several addresses: one socket each, all in one map
            bound_host, bound_port = self._server.effective_listen[0]
            self._map = self._server.map
        self.host: str = str(bound_host)
        self.port: int = int(bound_port)
        self._stopped = False
        self._thread = threading.Thread(target=self._server.run, name="kvmctl-web", daemon=True)
        self._thread.start()
        log.info("web: serving on %s", self.url)

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def stop(self, timeout: float = 2.0) -> None:
        """Close the listener and every connection, and wait (up to `timeout`) for the loop
        and the worker threads to end. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        triggers = [d for d in list(self._map.values())
                    if isinstance(d, waitress.trigger.trigger)]
        if triggers and self._thread.is_alive():
            # The sockets belong to the loop thread: closing them from here could close a
            # descriptor under its select(), so the loop is asked to close them itself.
            triggers[0].pull_trigger(lambda: waitress.wasyncore.close_all(self._map))
            self._thread.join(timeout)
        if self._thread.is_alive() or self._map:
            log.warning("web: the server loop did not stop in %.1f s; closing from outside",
                        timeout)
            waitress.wasyncore.close_all(self._map, ignore_all=True)
            self._thread.join(timeout)
        # The workers finish the request they are in (a browser's, a scrape) and end.
        self._server.task_dispatcher.shutdown(timeout=timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
