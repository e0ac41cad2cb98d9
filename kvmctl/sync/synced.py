"""What a source last synced, object by object, kept in the state directory between rounds and
across restarts (and between `kvmctl sync` runs from cron).

A difference the plan finds is git's when the object's manifest differs from the one in force
when the object was last left with nothing to do; otherwise it is drift, which only selfHeal
reverts. Per object, not per commit: a change waiting for a window must not turn every drift
elsewhere into "git's". The file also binds the source to its project's name (a commit that
would hand the objects to another owner is refused, also after a restart) and keeps a suspend
made through the API.

Losing the file costs the next round its memory: what it finds is then taken as git's (as on
a first sync). Nothing on the hypervisors depends on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..kinds import Kind
from ..manifest.documents import Document
from ..manifest.project import ProjectConfig

FORMAT = 1


@dataclass
class SourceState:
    path: str | None  # None: in memory only
    project: str | None = None
    suspended: bool = False
    known: bool = False  # a round has completed: objects below are all it has synced
    commit: str | None = None
    objects: dict[str, str] = field(default_factory=dict)  # HOST:KIND/NAME -> digest

    @staticmethod
    def load(state_dir: str | None, source: str) -> SourceState:
        if state_dir is None:
            return SourceState(None)
        key = hashlib.sha256(source.encode()).hexdigest()[:20]
        path = os.path.join(state_dir, "sources", f"{key}.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError("unknown format")
            objects = raw.get("objects") or {}
            return SourceState(path, raw.get("project"), bool(raw.get("suspended")),
                               bool(raw.get("known")), raw.get("commit"),
                               {str(k): str(v) for k, v in objects.items()})
        except (OSError, ValueError, AttributeError):
            return SourceState(path)  # none yet, or unreadable: as on a first sync

    def save(self, source: str) -> None:
        if self.path is None:
            return
        data = {"format": FORMAT, "source": source, "project": self.project,
                "suspended": self.suspended, "known": self.known, "commit": self.commit,
                "objects": dict(sorted(self.objects.items()))}
        folder = os.path.dirname(self.path)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):  # a state that cannot be kept is only memory lost
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)

    def is_git(self, key: str, digest: str | None) -> bool:
        """Whether a difference of the object `key` (now declared as `digest`, None: no longer
        declared) comes from git rather than from drift."""
        if not self.known:
            return True
        return digest != self.objects.get(key)

    def synced(self, key: str, digest: str | None) -> None:
        if digest is None:
            self.objects.pop(key, None)
        else:
            self.objects[key] = digest


def digests(config: ProjectConfig, by_host: Mapping[str, Iterable[Document]]
            ) -> dict[str, str]:
    """HOST:KIND/NAME -> a digest of what declares the object there: its document, and the
    project file's hosts and VM defaults (which every object is placed and rendered with); a
    VM's cloud-init seed has its VM's."""
    base = json.dumps([[h.name, h.uri, h.domain_type] for h in config.hosts]
                      + [dict(config.vm_defaults)], sort_keys=True, default=str)
    out: dict[str, str] = {}
    for host, docs in by_host.items():
        for d in docs:
            body: Any = d.body
            digest = hashlib.sha256((base + json.dumps(body, sort_keys=True, default=str))
                                    .encode()).hexdigest()[:32]
            out[f"{host}:{d.kind}/{d.name}"] = digest
            if d.kind == Kind.VM:
                out[f"{host}:{Kind.SEED}/{d.name}"] = digest
    return out
