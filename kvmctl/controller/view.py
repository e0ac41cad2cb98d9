"""What the web layer (API, page, metrics, webhook) may ask of a running controller: read its
statuses and history, and request the few state changes a person or a forge may make."""

from __future__ import annotations

from typing import Protocol

from ..sync.status import ProjectStatus, SyncRecord


class ControllerView(Protocol):
    def projects(self) -> list[ProjectStatus]:
        """Every project the controller runs, as of its last round (in name order)."""
        ...

    def project(self, name: str) -> ProjectStatus | None:
        ...

    def history(self, name: str | None = None, limit: int = 50) -> list[SyncRecord]:
        """Syncs, newest first: of one project, or of all with name None."""
        ...

    def request_sync(self, name: str, trigger: str) -> bool:
        """Reconcile the project as soon as it is not reconciling (trigger: manual | webhook);
        False for an unknown project."""
        ...

    def set_suspended(self, name: str, suspended: bool) -> bool:
        """Suspend (no reconcile at all) or resume; False for an unknown project."""
        ...

    def webhook_project(self, repo_urls: list[str]) -> list[str]:
        """The projects whose source is one of these repository URLs (a forge's push event
        names its repository several ways: clone URL, SSH URL, HTML URL)."""
        ...
