"""The controller's web layer (kvmctl.controller.web, .metrics) over a fake ControllerView:
the API and its status codes, bearer auth, the page's login and CSRF, the forges' webhook
signatures, escaping of hostile strings, the metrics, the JSON shapes, and the real server."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import re
import threading
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

import flask
import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from kvmctl.controller.metrics import Metrics
from kvmctl.controller.web import (
    REFRESH_SECONDS,
    Server,
    create_app,
    payload_urls,
    record_json,
    status_json,
    verify_webhook,
)
from kvmctl.sync.status import (
    Commit,
    FieldChange,
    Health,
    HostStatus,
    ObjectStatus,
    ProjectState,
    ProjectStatus,
    SyncRecord,
    SyncResult,
    SyncStatus,
    WindowState,
)

TOKEN = "s3cret-token"
HOOK_SECRET = "hook-secret"
NOW = 1_714_567_890.0  # 2024-05-01T12:51:30Z
HOSTILE = "<script>alert(1)</script>"
REPO_URL = "https://git.example.org/infra/web.git"
REPO_SSH = "git@git.example.org:infra/web.git"

DB_ERRORS = (
    "manifests/db.yaml:12:5: spec.memory: '4 GiB of' is not a size\n"
    "   12 |     memory: 4 GiB of\n"
    "      |     ^",
    "manifests/db.yaml:30:3: spec.disks[1].pool: no pool 'fast' on host lab1",
)


@dataclass
class FakeView:
    """A ControllerView over fixed statuses, noting every request made of it."""

    statuses: dict[str, ProjectStatus]
    records: list[SyncRecord] = field(default_factory=list)
    repos: dict[str, list[str]] = field(default_factory=dict)
    syncs: list[tuple[str, str]] = field(default_factory=list)
    suspends: list[tuple[str, bool]] = field(default_factory=list)
    webhook_urls: list[list[str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def projects(self) -> list[ProjectStatus]:
        return [self.statuses[n] for n in sorted(self.statuses)]

    def project(self, name: str) -> ProjectStatus | None:
        return self.statuses.get(name)

    def history(self, name: str | None = None, limit: int = 50) -> list[SyncRecord]:
        found = [r for r in self.records if name is None or r.project == name]
        return sorted(found, key=lambda r: r.started, reverse=True)[:limit]

    def request_sync(self, name: str, trigger: str) -> bool:
        if name not in self.statuses:
            return False
        with self.lock:
            self.syncs.append((name, trigger))
        return True

    def set_suspended(self, name: str, suspended: bool) -> bool:
        if name not in self.statuses:
            return False
        with self.lock:
            self.suspends.append((name, suspended))
        return True

    def webhook_project(self, repo_urls: list[str]) -> list[str]:
        self.webhook_urls.append(list(repo_urls))
        found: list[str] = []
        for url in repo_urls:
            for name in self.repos.get(url, []):
                if name not in found:
                    found.append(name)
        return found


def sample_view(now: float = NOW) -> FakeView:
    """Three projects: `web` with an object in every status (one named hostilely, its commit's
    message hostile too), `db` whose last sync failed on an invalid commit, `archive`
    suspended; their times around `now`."""
    hostile_commit = Commit(sha="a1b2c3d4e5f60718293a4b5c6d7e8f9012345678", author="Ann Admin",
                            email="ann@example.org", time=now - 3600,
                            message=f"Grow the web VMs {HOSTILE}")
    web_objects = (
        ObjectStatus("lab1", "network", "web-net", SyncStatus.SYNCED, Health.HEALTHY),
        ObjectStatus("lab1", "vm", "web-1", SyncStatus.OUT_OF_SYNC, Health.HEALTHY,
                     change_class="redefine-restart",
                     reasons=("memory grows from 2 GiB to 4 GiB",),
                     fields=(FieldChange("memory", "2 GiB", "4 GiB"),
                             FieldChange("vcpus", "2", "4")),
                     waiting="outside the maintenance window"),
        ObjectStatus("lab1", "vm", "web-2", SyncStatus.FAILED, Health.DEGRADED,
                     health_reason="not running", change_class="create",
                     error="cannot start: not enough memory on lab1"),
        ObjectStatus("lab2", "vm", "web-3", SyncStatus.PROGRESSING, Health.PROGRESSING,
                     health_reason="booting, no address yet", change_class="create"),
        ObjectStatus("lab2", "pool", HOSTILE, SyncStatus.SYNCED, Health.MISSING,
                     health_reason="absent on lab2"),
        ObjectStatus("lab2", "volume", "web-3-root", SyncStatus.SYNCED, Health.UNKNOWN,
                     health_reason="lab2 could not be read"),
    )
    web_last = SyncRecord(project="web", started=now - 600, finished=now - 588,
                          trigger="poll", result=SyncResult.PARTIAL, commit=hostile_commit,
                          summary="2 changes made, 1 waits for the window",
                          changed=("lab1:vm/web-2", "lab2:vm/web-3"),
                          waiting=("lab1:vm/web-1",), id=7)
    web = ProjectStatus(
        name="web", source=f"{REPO_URL}@main:clusters/web", state=ProjectState.PROGRESSING,
        state_reason="", commit=hostile_commit, last_sync=web_last, last_success=now - 588,
        hosts=(HostStatus("lab1", "qemu+ssh://root@lab1/system", True),
               HostStatus("lab2", "qemu+ssh://root@lab2/system", False,
                          error="cannot connect: timed out")),
        objects=web_objects, pending_restarts=("lab1:vm/web-1",),
        window=WindowState(defined=True, open=False, next_open=now + 7200),
        next_sync=now + 60, policy={"automated": True, "selfHeal": False},
        plan={"format": 2, "changes": [{"id": "lab1:vm/web-1", "class": "redefine-restart"}]})
    db_last = SyncRecord(project="db", started=now - 120, finished=now - 119, trigger="webhook",
                         result=SyncResult.FAILED,
                         commit=Commit(sha="ffff0000eeee1111dddd2222cccc3333bbbb4444",
                                       author="Bob", message="Bump db memory"),
                         summary="commit ffff0000eeee is invalid: 2 errors",
                         errors=DB_ERRORS, failed=(("lab1:vm/db-1", "cannot define: denied"),),
                         id=9)
    db = ProjectStatus(
        name="db", source="https://git.example.org/infra/db.git@main", state=ProjectState.DEGRADED,
        state_reason="the last sync failed: the commit is invalid",
        commit=Commit(sha="0123456789abcdef0123456789abcdef01234567", author="Bob",
                      message="Add the db VM"),
        last_sync=db_last, last_success=None,
        hosts=(HostStatus("lab1", "qemu+ssh://root@lab1/system", True),),
        objects=(ObjectStatus("lab1", "vm", "db-1", SyncStatus.SYNCED, Health.HEALTHY),),
        next_sync=now + 30)
    archive = ProjectStatus(name="archive", source="https://git.example.org/infra/archive.git",
                            state=ProjectState.SUSPENDED, suspended=True)
    records = [
        web_last,
        SyncRecord(project="web", started=now - 3000, finished=now - 2990, trigger="start",
                   result=SyncResult.APPLIED, commit=hostile_commit, summary="3 changes made",
                   changed=("lab1:network/web-net",), id=3),
        db_last,
    ]
    return FakeView(statuses={"web": web, "db": db, "archive": archive}, records=records,
                    repos={REPO_URL: ["web"], REPO_SSH: ["web"]})


def make_app(view: FakeView, webhook_secret: str | None = HOOK_SECRET,
             token: str = TOKEN) -> tuple[flask.Flask, Metrics]:
    metrics = Metrics(view.projects)
    app = create_app(view, token, webhook_secret, metrics)
    app.config["TESTING"] = True
    return app, metrics


@pytest.fixture
def view() -> FakeView:
    return sample_view()


@pytest.fixture
def client(view: FakeView) -> FlaskClient:
    app, _ = make_app(view)
    return app.test_client()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def html(client: FlaskClient, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 200, response.data
    assert response.mimetype == "text/html"
    return response.get_data(as_text=True)


def login(client: FlaskClient) -> str:
    """Log in through the form; the session's CSRF token, as the page's forms carry it."""
    response = client.post("/login", data={"token": TOKEN, "next": "/projects/web"})
    assert response.status_code == 303
    page = html(client, "/projects/web")
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "a logged-in page carries the CSRF token in its forms"
    return match.group(1)


# ----- probes -----


def test_healthz_says_the_process_lives(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_data(as_text=True).strip() == "ok"


def test_readyz_waits_for_every_project_reconciled(view: FakeView) -> None:
    app, _ = make_app(view)
    assert app.test_client().get("/readyz").status_code == 200
    view.statuses["new"] = ProjectStatus(name="new", source="x", state=ProjectState.UNKNOWN)
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert "new" in response.get_data(as_text=True)


def test_readyz_fails_when_the_view_cannot_answer(view: FakeView) -> None:
    def broken() -> list[ProjectStatus]:
        raise RuntimeError("the loop died")

    view.projects = broken  # type: ignore[method-assign]
    app, _ = make_app(view)
    assert app.test_client().get("/readyz").status_code == 503


# ----- the API: reading -----


def test_api_projects_lists_every_project_without_objects(client: FlaskClient) -> None:
    response = client.get("/api/v1/projects")
    assert response.status_code == 200
    data = response.get_json()
    assert [p["name"] for p in data] == ["archive", "db", "web"]
    web = data[2]
    assert "objects" not in web
    assert web["state"] == "Progressing"
    assert web["commit"]["short"] == "a1b2c3d4e5f6"
    assert web["counts"]["sync"] == {"Synced": 3, "OutOfSync": 1, "Failed": 1,
                                     "Progressing": 1}
    assert web["counts"]["health"] == {"Healthy": 2, "Progressing": 1, "Degraded": 1,
                                       "Missing": 1, "Unknown": 1}
    assert web["last_sync"]["result"] == "partial"
    assert web["last_success"] == "2024-05-01T12:41:42Z"
    assert web["window"] == {"defined": True, "open": False, "closes_at": None,
                             "next_open": "2024-05-01T14:51:30Z"}
    assert web["hosts"][1] == {"name": "lab2", "uri": "qemu+ssh://root@lab2/system",
                               "reachable": False, "error": "cannot connect: timed out"}


def test_api_project_has_every_object(client: FlaskClient) -> None:
    data = client.get("/api/v1/projects/web").get_json()
    assert len(data["objects"]) == 6
    web1 = next(o for o in data["objects"] if o["id"] == "lab1:vm/web-1")
    assert web1 == {
        "id": "lab1:vm/web-1", "host": "lab1", "kind": "vm", "name": "web-1",
        "sync": "OutOfSync", "health": "Healthy", "health_reason": "",
        "change_class": "redefine-restart", "reasons": ["memory grows from 2 GiB to 4 GiB"],
        "fields": [{"field": "memory", "old": "2 GiB", "new": "4 GiB"},
                   {"field": "vcpus", "old": "2", "new": "4"}],
        "waiting": "outside the maintenance window", "error": "",
    }


def test_api_unknown_project_is_404_in_json(client: FlaskClient) -> None:
    for path in ("/api/v1/projects/nope", "/api/v1/projects/nope/plan",
                 "/api/v1/projects/nope/history"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "nope" in response.get_json()["error"]


def test_api_plan_is_the_projects_plan(client: FlaskClient) -> None:
    data = client.get("/api/v1/projects/web/plan").get_json()
    assert data == {"format": 2, "changes": [{"id": "lab1:vm/web-1",
                                              "class": "redefine-restart"}]}


def test_api_history_of_a_project_and_of_all(client: FlaskClient) -> None:
    web = client.get("/api/v1/projects/web/history").get_json()
    assert [r["id"] for r in web] == [7, 3]
    assert client.get("/api/v1/projects/web/history?limit=1").get_json()[0]["id"] == 7
    every = client.get("/api/v1/history").get_json()
    assert [r["id"] for r in every] == [9, 7, 3]
    db = every[0]
    assert db["errors"] == list(DB_ERRORS)
    assert db["failed"] == [{"id": "lab1:vm/db-1", "error": "cannot define: denied"}]
    assert db["duration"] == 1.0


@pytest.mark.parametrize("limit", ["0", "-3", "x", "100000"])
def test_api_history_refuses_a_bad_limit(client: FlaskClient, limit: str) -> None:
    assert client.get(f"/api/v1/history?limit={limit}").status_code == 400


def test_api_unknown_route_is_json_404(client: FlaskClient) -> None:
    response = client.get("/api/v1/nothing")
    assert response.status_code == 404
    assert response.is_json


# ----- the API: requests need the bearer token -----

ACTIONS = [("sync", ("syncs", ("web", "manual"))),
           ("suspend", ("suspends", ("web", True))),
           ("resume", ("suspends", ("web", False)))]


@pytest.mark.parametrize("action, expected", ACTIONS)
def test_api_post_with_the_token_is_accepted(client: FlaskClient, view: FakeView, action: str,
                                             expected: tuple[str, Any]) -> None:
    response = client.post(f"/api/v1/projects/web/{action}", headers=bearer())
    assert response.status_code == 202
    assert response.get_json() == {"project": "web", "accepted": action}
    attribute, call = expected
    assert getattr(view, attribute) == [call]


@pytest.mark.parametrize("action", ["sync", "suspend", "resume"])
@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}, bearer("")])
def test_api_post_without_the_token_is_401(client: FlaskClient, view: FakeView, action: str,
                                           headers: dict[str, str]) -> None:
    response = client.post(f"/api/v1/projects/web/{action}", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert view.syncs == [] and view.suspends == []


@pytest.mark.parametrize("action", ["sync", "suspend", "resume"])
def test_api_post_for_an_unknown_project_is_404(client: FlaskClient, action: str) -> None:
    assert client.post(f"/api/v1/projects/nope/{action}", headers=bearer()).status_code == 404


def test_an_empty_token_authorises_nothing(view: FakeView) -> None:
    app, _ = make_app(view, token="")
    client = app.test_client()
    assert client.post("/api/v1/projects/web/sync", headers=bearer("")).status_code == 401
    assert client.post("/api/v1/projects/web/sync",
                       headers={"Authorization": "Bearer "}).status_code == 401
    assert client.post("/login", data={"token": ""}).status_code == 401
    assert view.syncs == []


def test_api_get_is_not_a_way_to_post(client: FlaskClient, view: FakeView) -> None:
    # A GET reads the project "web/sync" (names may hold slashes): there is none.
    assert client.get("/api/v1/projects/web/sync", headers=bearer()).status_code == 404
    assert client.put("/api/v1/projects/web/sync", headers=bearer()).status_code == 405
    assert view.syncs == []


# ----- the webhook -----

GITHUB_PUSH = {"ref": "refs/heads/main",
               "repository": {"clone_url": REPO_URL, "ssh_url": REPO_SSH,
                              "html_url": "https://git.example.org/infra/web",
                              "git_url": "git://git.example.org/infra/web.git"}}
GITLAB_PUSH = {"object_kind": "push",
               "project": {"git_http_url": REPO_URL, "git_ssh_url": REPO_SSH,
                           "web_url": "https://git.example.org/infra/web"}}


def github_headers(body: bytes, secret: str = HOOK_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "X-GitHub-Event": "push",
            "Content-Type": "application/json"}


def gitea_headers(body: bytes, secret: str = HOOK_SECRET,
                  header: str = "X-Gitea-Signature") -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {header: digest, "Content-Type": "application/json"}


def gitlab_headers(secret: str = HOOK_SECRET) -> dict[str, str]:
    return {"X-Gitlab-Token": secret, "X-Gitlab-Event": "Push Hook",
            "Content-Type": "application/json"}


def body_of(payload: Any) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize("forge", ["github", "gitea", "forgejo", "gitlab"])
def test_webhook_with_a_valid_signature_syncs_the_matching_project(
        client: FlaskClient, view: FakeView, forge: str) -> None:
    payload = GITLAB_PUSH if forge == "gitlab" else GITHUB_PUSH
    body = body_of(payload)
    headers = {"github": lambda: github_headers(body), "gitea": lambda: gitea_headers(body),
               "forgejo": lambda: gitea_headers(body, header="X-Forgejo-Signature"),
               "gitlab": lambda: gitlab_headers()}[forge]()
    response = client.post("/api/v1/webhook", data=body, headers=headers)
    assert response.status_code == 202, response.data
    assert response.get_json() == {"triggered": ["web"]}
    assert view.syncs == [("web", "webhook")]
    assert REPO_URL in view.webhook_urls[0] and REPO_SSH in view.webhook_urls[0]


@pytest.mark.parametrize("forge", ["github", "gitea", "forgejo", "gitlab"])
def test_webhook_with_a_wrong_signature_is_401(client: FlaskClient, view: FakeView,
                                               forge: str) -> None:
    body = body_of(GITHUB_PUSH)
    headers = {"github": lambda: github_headers(body, "other"),
               "gitea": lambda: gitea_headers(body, "other"),
               "forgejo": lambda: gitea_headers(body, "other", "X-Forgejo-Signature"),
               "gitlab": lambda: gitlab_headers("other")}[forge]()
    response = client.post("/api/v1/webhook", data=body, headers=headers)
    assert response.status_code == 401
    assert view.syncs == [] and view.webhook_urls == []


def test_webhook_signature_over_another_body_is_401(client: FlaskClient,
                                                    view: FakeView) -> None:
    headers = github_headers(body_of(GITHUB_PUSH))
    tampered = body_of({**GITHUB_PUSH, "ref": "refs/heads/evil"})
    assert client.post("/api/v1/webhook", data=tampered, headers=headers).status_code == 401
    assert view.syncs == []


@pytest.mark.parametrize("path", ["/api/v1/webhook", "/api/v1/webhook/web"])
def test_webhook_without_a_signature_is_401(client: FlaskClient, view: FakeView,
                                            path: str) -> None:
    response = client.post(path, data=body_of(GITHUB_PUSH),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    assert view.syncs == []


def test_webhook_github_header_without_its_scheme_is_401(client: FlaskClient) -> None:
    body = body_of(GITHUB_PUSH)
    digest = hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    response = client.post("/api/v1/webhook", data=body,
                           headers={"X-Hub-Signature-256": digest})
    assert response.status_code == 401


def test_webhook_for_a_named_project(client: FlaskClient, view: FakeView) -> None:
    body = b'{"anything": true}'
    response = client.post("/api/v1/webhook/db", data=body, headers=github_headers(body))
    assert response.status_code == 202
    assert response.get_json() == {"triggered": ["db"]}
    assert view.syncs == [("db", "webhook")]
    assert view.webhook_urls == []
    response = client.post("/api/v1/webhook/nope", data=body, headers=github_headers(body))
    assert response.status_code == 404


def test_webhook_for_an_unknown_repository_is_404(client: FlaskClient, view: FakeView) -> None:
    body = body_of({"repository": {"clone_url": "https://elsewhere.example/x.git"}})
    response = client.post("/api/v1/webhook", data=body, headers=github_headers(body))
    assert response.status_code == 404
    assert view.syncs == []


def test_webhook_payload_naming_no_repository_or_not_json_is_400(client: FlaskClient) -> None:
    for body in (b'{"zen": "hi"}', b"not json", b"[1, 2]"):
        response = client.post("/api/v1/webhook", data=body, headers=github_headers(body))
        assert response.status_code == 400, body


def test_webhook_github_form_encoded_payload(client: FlaskClient, view: FakeView) -> None:
    body = urlencode({"payload": json.dumps(GITHUB_PUSH)}).encode()
    headers = {**github_headers(body), "Content-Type": "application/x-www-form-urlencoded"}
    assert client.post("/api/v1/webhook", data=body, headers=headers).status_code == 202
    assert view.syncs == [("web", "webhook")]


def test_webhook_github_ping_triggers_nothing(client: FlaskClient, view: FakeView) -> None:
    body = body_of({"zen": "Keep it logically awesome.", **GITHUB_PUSH})
    headers = {**github_headers(body), "X-GitHub-Event": "ping"}
    response = client.post("/api/v1/webhook", data=body, headers=headers)
    assert response.status_code == 200
    assert view.syncs == []


def test_the_webhook_is_off_without_its_own_secret(view: FakeView) -> None:
    """Never the token: a forge such as GitLab shows the webhook secret to maintainers."""
    app, _ = make_app(view, webhook_secret=None)
    body = body_of(GITHUB_PUSH)
    client = app.test_client()
    for secret in (None, TOKEN):
        headers = github_headers(body) if secret is None else github_headers(body, secret)
        response = client.post("/api/v1/webhook", data=body, headers=headers)
        assert response.status_code == 404
        assert "--webhook-secret-file" in response.get_json()["error"]
    assert view.syncs == []


def test_only_loopback_names_when_it_listens_on_loopback(view: FakeView) -> None:
    """DNS rebinding: a page of another site resolved to 127.0.0.1 reads nothing."""
    app, _ = make_app(view)
    app.config["KVMCTL_ALLOWED_HOSTS"] = {"127.0.0.1:8787", "localhost:8787"}
    client = app.test_client()
    assert client.get("/api/v1/projects", headers={"Host": "127.0.0.1:8787"}).status_code == 200
    assert client.get("/api/v1/projects",
                      headers={"Host": "evil.example:8787"}).status_code == 421


def test_webhook_body_over_one_mib_is_413(client: FlaskClient, view: FakeView) -> None:
    body = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    response = client.post("/api/v1/webhook", data=body, headers=github_headers(body))
    assert response.status_code == 413
    assert view.syncs == []


def test_verify_webhook_and_payload_urls_directly() -> None:
    body = b"{}"
    assert verify_webhook(github_headers(body), body, HOOK_SECRET) == "github"
    assert verify_webhook({"x-gitlab-token": HOOK_SECRET}, body, HOOK_SECRET) == "gitlab"
    assert verify_webhook({"X-Gitlab-Token": ""}, body, "") is None  # no secret, no proof
    assert verify_webhook({}, body, HOOK_SECRET) is None
    assert verify_webhook({"X-Gitlab-Token": "sécret"}, body, HOOK_SECRET) is None
    assert payload_urls(GITLAB_PUSH) == [REPO_URL, REPO_SSH, "https://git.example.org/infra/web"]
    assert payload_urls({"repository": {"url": REPO_URL, "clone_url": REPO_URL}}) == [REPO_URL]
    assert payload_urls([]) == [] and payload_urls({"repository": "x"}) == []


# ----- the page: reading -----


def test_index_shows_every_project_and_host(client: FlaskClient) -> None:
    page = html(client, "/")
    for name in ("web", "db", "archive"):
        assert f'id="project-{name}"' in page
    assert 'data-state="Degraded"' in page and 'data-state="Suspended"' in page
    assert "a1b2c3d4e5f6" in page and "Ann Admin" in page
    assert 'data-count="OutOfSync">OutOfSync <b>1</b>' in page
    assert 'data-host="web/lab2" data-reachable="false"' in page
    assert "cannot connect: timed out" in page
    assert "2024-05-01T12:41:42Z" in page  # web's last sync, in UTC ISO form
    assert f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' in page
    assert '<link rel="stylesheet" href="/static/style.css">' in page


def test_project_page_shows_objects_diff_restarts_and_history(client: FlaskClient) -> None:
    page = html(client, "/projects/web")
    assert 'data-object="lab1:vm/web-1" data-sync="OutOfSync" data-health="Healthy"' in page
    assert 'data-object="lab1:vm/web-2" data-sync="Failed" data-health="Degraded"' in page
    assert 'data-sync="Progressing" data-health="Progressing"' in page
    assert 'id="last-sync-result" data-result="partial"' in page
    assert 'data-diff="lab1:vm/web-1"' in page
    assert 'data-diff="lab1:vm/web-2"' in page  # Failed shows with its error
    assert 'data-diff="lab1:network/web-net"' not in page  # Synced has no diff
    assert re.search(r'data-field="memory"><td><code>memory</code></td>'
                     r'<td class="old">2 GiB</td>.*<td class="new">4 GiB</td>', page)
    assert "memory grows from 2 GiB to 4 GiB" in page
    assert 'data-restart="lab1:vm/web-1"' in page
    assert 'id="history"' in page and 'data-record="7"' in page and 'data-record="3"' in page
    assert "outside the maintenance window" in page
    assert "cannot start: not enough memory on lab1" in page


def test_project_page_shows_located_errors_in_pre(client: FlaskClient) -> None:
    page = html(client, "/projects/db")
    assert 'id="errors"' in page
    first = DB_ERRORS[0].replace("'", "&#39;")
    assert f'<pre class="error" data-error>{first}</pre>' in page
    assert "cannot define: denied" in page
    assert "the last sync failed: the commit is invalid" in page


def test_hostile_strings_are_escaped(client: FlaskClient) -> None:
    for path in ("/", "/projects/web"):
        page = html(client, path)
        assert HOSTILE not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<script" not in page  # the page runs no script at all


def test_hostile_project_name_is_escaped_in_ids_and_links() -> None:
    view = sample_view()
    evil = '"><img src=x onerror=alert(1)>'
    view.statuses[evil] = ProjectStatus(name=evil, source="x", state=ProjectState.HEALTHY)
    app, _ = make_app(view)
    page = html(app.test_client(), "/")
    assert evil not in page
    assert "<img" not in page
    assert 'id="project-&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"' in page


def test_a_project_name_with_slashes_and_spaces_works_everywhere(view: FakeView) -> None:
    name = "web shop/prod"
    view.statuses[name] = replace(view.statuses["db"], name=name)
    app, _ = make_app(view)
    client = app.test_client()
    assert 'href="/projects/web%20shop/prod"' in html(client, "/")
    assert 'id="project-web shop/prod"' in html(client, "/projects/web%20shop/prod")
    assert client.get("/api/v1/projects/web shop/prod").get_json()["name"] == name
    assert client.get("/api/v1/projects/web shop/prod/history").status_code == 200
    assert client.post("/api/v1/projects/web shop/prod/sync", headers=bearer()).status_code == 202
    csrf = login(client)
    response = client.post("/projects/web shop/prod/suspend", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert response.headers["Location"] == "/projects/web%20shop/prod"
    assert view.syncs == [(name, "manual")] and view.suspends == [(name, True)]


def test_unknown_project_page_is_404(client: FlaskClient) -> None:
    assert client.get("/projects/nope").status_code == 404


def test_pages_without_login_offer_a_login_link_not_buttons(client: FlaskClient) -> None:
    page = html(client, "/projects/web")
    assert 'id="login-link"' in page and "Log in to sync or suspend" in page
    for button in ('id="sync-now"', 'id="suspend"', 'id="resume"', "csrf_token"):
        assert button not in page


def test_login_page_does_not_refresh(client: FlaskClient) -> None:
    page = html(client, "/login?next=/projects/web")
    assert 'http-equiv="refresh"' not in page
    assert 'name="next" value="/projects/web"' in page


def test_stylesheet_is_served(client: FlaskClient) -> None:
    response = client.get("/static/style.css")
    assert response.status_code == 200 and response.mimetype == "text/css"
    assert ".badge-ok" in response.get_data(as_text=True)


def test_page_forbids_scripts_and_framing(client: FlaskClient) -> None:
    csp = client.get("/").headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert client.get("/").headers["Cache-Control"] == "no-store"


# ----- the page: login and CSRF -----


def test_login_sets_a_strict_httponly_session_cookie(client: FlaskClient) -> None:
    response = client.post("/login", data={"token": TOKEN, "next": "/projects/web"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/projects/web"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("kvmctl_session=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = html(client, "/projects/web")
    assert "Logged in." in page
    assert 'id="sync-now"' in page and 'id="suspend"' in page
    assert 'id="resume"' not in page


def test_login_with_a_wrong_token_is_refused(client: FlaskClient) -> None:
    response = client.post("/login", data={"token": "guess"})
    assert response.status_code == 401
    assert "That is not the token." in response.get_data(as_text=True)
    assert "Set-Cookie" not in response.headers
    assert 'id="sync-now"' not in html(client, "/projects/web")


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/\\evil",
                                    "javascript:alert(1)"])
def test_login_redirects_only_within_the_site(client: FlaskClient, target: str) -> None:
    response = client.post("/login", data={"token": TOKEN, "next": target})
    assert response.headers["Location"] == "/"


FORMS = [("sync", ("syncs", ("web", "manual")), "Sync of web requested."),
         ("suspend", ("suspends", ("web", True)), "web suspended."),
         ("resume", ("suspends", ("web", False)), "web resumed.")]


@pytest.mark.parametrize("action, expected, message", FORMS)
def test_form_with_login_and_csrf_acts_and_redirects(client: FlaskClient, view: FakeView,
                                                     action: str, expected: tuple[str, Any],
                                                     message: str) -> None:
    csrf = login(client)
    response = client.post(f"/projects/web/{action}", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert response.headers["Location"] == "/projects/web"
    attribute, call = expected
    assert getattr(view, attribute) == [call]
    page = html(client, "/projects/web")
    assert f'data-flash="ok">{message}</p>' in page


@pytest.mark.parametrize("action", ["sync", "suspend", "resume"])
def test_form_without_csrf_token_is_403(client: FlaskClient, view: FakeView,
                                        action: str) -> None:
    login(client)
    assert client.post(f"/projects/web/{action}").status_code == 403
    assert client.post(f"/projects/web/{action}",
                       data={"csrf_token": "forged"}).status_code == 403
    assert view.syncs == [] and view.suspends == []


@pytest.mark.parametrize("action", ["sync", "suspend", "resume"])
def test_cross_site_form_without_session_is_403(client: FlaskClient, view: FakeView,
                                                action: str) -> None:
    # What a hostile page can make a browser send: a form post, no cookie (SameSite=Strict),
    # and no way to know a CSRF token.
    response = client.post(f"/projects/web/{action}", data={"csrf_token": "guess"},
                           headers={"Origin": "https://evil.example",
                                    "Referer": "https://evil.example/page"})
    assert response.status_code == 403
    assert view.syncs == [] and view.suspends == []


def test_csrf_token_of_another_session_is_403(view: FakeView) -> None:
    app, _ = make_app(view)
    alice, mallory = app.test_client(), app.test_client()
    login(alice)
    stolen = login(mallory)
    alice_csrf = login(alice)
    assert alice_csrf != stolen
    assert alice.post("/projects/web/sync", data={"csrf_token": stolen}).status_code == 403
    assert view.syncs == []


def test_a_bearer_token_does_not_pass_for_a_form_session(client: FlaskClient,
                                                         view: FakeView) -> None:
    assert client.post("/projects/web/sync", headers=bearer()).status_code == 403
    assert view.syncs == []


def test_form_for_an_unknown_project_is_404(client: FlaskClient) -> None:
    csrf = login(client)
    assert client.post("/projects/nope/sync", data={"csrf_token": csrf}).status_code == 404


def test_logout_needs_csrf_and_ends_the_session(client: FlaskClient, view: FakeView) -> None:
    csrf = login(client)
    assert client.post("/logout").status_code == 403
    response = client.post("/logout", data={"csrf_token": csrf})
    assert response.status_code == 303
    page = html(client, "/projects/web")
    assert "Logged out." in page and 'id="sync-now"' not in page
    assert client.post("/projects/web/sync", data={"csrf_token": csrf}).status_code == 403
    assert view.syncs == []


def test_suspended_project_offers_resume(client: FlaskClient) -> None:
    login(client)
    page = html(client, "/projects/archive")
    assert 'id="resume"' in page and 'id="suspend"' not in page


def test_another_app_does_not_accept_this_apps_session(view: FakeView) -> None:
    """The signing key is made at start: a cookie outlives no restart."""
    first, _ = make_app(view)
    second, _ = make_app(view)
    client = first.test_client()
    csrf = login(client)
    cookie = client.get_cookie("kvmctl_session")
    assert cookie is not None
    other = second.test_client()
    other.set_cookie("kvmctl_session", cookie.value)
    assert other.post("/projects/web/sync", data={"csrf_token": csrf}).status_code == 403
    assert view.syncs == []


# ----- metrics -----

METRIC_NAMES = ("kvmctl_syncs_total", "kvmctl_reconcile_duration_seconds",
                "kvmctl_sync_failures_total", "kvmctl_objects", "kvmctl_objects_health",
                "kvmctl_drift_objects", "kvmctl_last_successful_sync_timestamp_seconds",
                "kvmctl_project_suspended", "kvmctl_host_up", "kvmctl_pending_restarts")


def test_metrics_page_has_every_metric_and_the_fakes_values(view: FakeView) -> None:
    app, metrics = make_app(view)
    for rec in view.records:
        metrics.record(rec)
    metrics.record(SyncRecord(project="archive", started=NOW, finished=NOW, trigger="poll",
                              result=SyncResult.SUSPENDED))
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    text = response.get_data(as_text=True)
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    samples = [
        ("kvmctl_objects", {"project": "web", "sync_status": "OutOfSync"}, 1.0),
        ("kvmctl_objects", {"project": "web", "sync_status": "Synced"}, 3.0),
        ("kvmctl_objects", {"project": "db", "sync_status": "Failed"}, 0.0),
        ("kvmctl_objects", {"project": "archive", "sync_status": "Progressing"}, 0.0),
        ("kvmctl_objects_health", {"project": "web", "health": "Missing"}, 1.0),
        ("kvmctl_objects_health", {"project": "web", "health": "Unknown"}, 1.0),
        ("kvmctl_objects_health", {"project": "db", "health": "Degraded"}, 0.0),
        ("kvmctl_drift_objects", {"project": "web"}, 1.0),
        ("kvmctl_last_successful_sync_timestamp_seconds", {"project": "web"}, NOW - 588),
        ("kvmctl_project_suspended", {"project": "archive"}, 1.0),
        ("kvmctl_project_suspended", {"project": "web"}, 0.0),
        ("kvmctl_host_up", {"project": "web", "host": "lab1"}, 1.0),
        ("kvmctl_host_up", {"project": "web", "host": "lab2"}, 0.0),
        ("kvmctl_pending_restarts", {"project": "web"}, 1.0),
        ("kvmctl_syncs_total", {"project": "web", "result": "partial"}, 1.0),
        ("kvmctl_syncs_total", {"project": "web", "result": "applied"}, 1.0),
        ("kvmctl_syncs_total", {"project": "db", "result": "failed"}, 1.0),
        ("kvmctl_syncs_total", {"project": "archive", "result": "suspended"}, 1.0),
        ("kvmctl_sync_failures_total", {"project": "db"}, 1.0),
        ("kvmctl_sync_failures_total", {"project": "web"}, 0.0),
        ("kvmctl_reconcile_duration_seconds_count", {"project": "web"}, 2.0),
        ("kvmctl_reconcile_duration_seconds_sum", {"project": "web"}, 22.0),
        ("kvmctl_reconcile_duration_seconds_bucket", {"project": "web", "le": "5.0"}, 0.0),
        ("kvmctl_reconcile_duration_seconds_bucket", {"project": "web", "le": "10.0"}, 1.0),
        ("kvmctl_reconcile_duration_seconds_bucket", {"project": "web", "le": "30.0"}, 2.0),
    ]
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(text) for s in family.samples}
    for name, labels, value in samples:
        key = (name, tuple(sorted(labels.items())))
        assert found.get(key) == pytest.approx(value), key
    # db never succeeded: no timestamp rather than a zero that reads as 1970
    assert ("kvmctl_last_successful_sync_timestamp_seconds", (("project", "db"),)) not in found
    # a suspended round reconciles nothing and takes no time worth a histogram
    assert ("kvmctl_reconcile_duration_seconds_count", (("project", "archive"),)) not in found


def test_metrics_survive_a_view_that_cannot_answer() -> None:
    def broken() -> list[ProjectStatus]:
        raise RuntimeError("the loop died")

    metrics = Metrics(broken)
    app = create_app(sample_view(), TOKEN, None, metrics)
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert "# TYPE kvmctl_objects gauge" in response.get_data(as_text=True)


def test_two_metrics_do_not_share_samples(view: FakeView) -> None:
    a, b = Metrics(view.projects), Metrics(view.projects)
    a.record(view.records[0])
    assert b.registry.get_sample_value("kvmctl_syncs_total",
                                       {"project": "web", "result": "partial"}) is None
    assert a.registry.get_sample_value("kvmctl_syncs_total",
                                       {"project": "web", "result": "partial"}) == 1.0


# ----- the JSON shapes, without Flask -----


def test_status_json_shape_is_plain_json() -> None:
    view = sample_view()
    web = view.statuses["web"]
    short = status_json(web, with_objects=False)
    full = status_json(web, with_objects=True)
    assert list(short) == ["name", "source", "state", "state_reason", "suspended", "commit",
                           "last_sync", "last_success", "hosts", "counts",
                           "pending_restarts", "window", "next_sync", "policy"]
    assert list(full) == [*short, "objects"]
    assert short["commit"] == {"sha": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678",
                               "short": "a1b2c3d4e5f6", "author": "Ann Admin",
                               "email": "ann@example.org", "time": "2024-05-01T11:51:30Z",
                               "message": f"Grow the web VMs {HOSTILE}"}
    assert short["next_sync"] == "2024-05-01T12:52:30Z"
    assert short["pending_restarts"] == ["lab1:vm/web-1"]
    assert short["policy"] == {"automated": True, "selfHeal": False}
    assert json.loads(json.dumps(full)) == full
    empty = status_json(view.statuses["archive"], with_objects=True)
    assert empty["commit"] is None and empty["last_sync"] is None
    assert empty["objects"] == [] and empty["counts"]["sync"]["Synced"] == 0


def test_record_json_shape() -> None:
    rec = sample_view().records[2]
    assert record_json(rec) == {
        "id": 9, "project": "db", "started": "2024-05-01T12:49:30Z",
        "finished": "2024-05-01T12:49:31Z", "duration": 1.0, "trigger": "webhook",
        "result": "failed",
        "commit": {"sha": "ffff0000eeee1111dddd2222cccc3333bbbb4444",
                   "short": "ffff0000eeee", "author": "Bob", "email": "", "time": None,
                   "message": "Bump db memory"},
        "summary": "commit ffff0000eeee is invalid: 2 errors", "changed": [], "waiting": [],
        "failed": [{"id": "lab1:vm/db-1", "error": "cannot define: denied"}],
        "errors": list(DB_ERRORS), "drift": 0,
    }
    bare = replace(rec, commit=None, id=None)
    assert record_json(bare)["commit"] is None and record_json(bare)["id"] is None


# ----- the real server -----


def test_server_serves_on_a_free_port_and_stops_promptly(view: FakeView) -> None:
    app, _ = make_app(view)
    server = Server(app, "127.0.0.1", 0)
    try:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/"
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.status == 200
            assert 'id="project-web"' in response.read().decode()
        # A client that keeps its connection open (as a browser does) must not hold the
        # server up.
        idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        idle.request("GET", "/healthz")
        assert idle.getresponse().read() == b"ok\n"
    finally:
        server.stop()
    assert not server._thread.is_alive()  # the idle connection did not hold it up
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)
    idle.close()
    server.stop()  # idempotent
