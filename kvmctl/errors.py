"""The one error hierarchy of kvmctl.

Every failure a user can cause or meet is a KvmctlError. Library errors (yaml, jsonschema,
libvirt, OS) are wrapped at the boundary where they happen, with the source location when there
is one, so the CLI can print one readable line per problem and never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A position in a manifest file (1-based line and column)."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.column}"
        return self.file


@dataclass(frozen=True)
class Problem:
    """One finding about the manifests: located, with the JSON path of the offending value."""

    message: str
    location: Location
    path: str = ""
    hint: str = ""
    severity: str = "error"

    def __str__(self) -> str:
        text = f"{self.location}: {self.severity}: {self.message}"
        if self.path:
            text += f" ({self.path})"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class KvmctlError(Exception):
    """Base of every error kvmctl reports to a user (cli/exits.py picks the exit status)."""


class ManifestError(KvmctlError):
    """The manifests are invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RenderError(KvmctlError):
    """A template could not be rendered (a bug in a template, never in a manifest)."""


class HypervisorError(KvmctlError):
    """libvirt refused or failed an operation; the message names the object and the call."""


class UnreachableError(HypervisorError):
    """One or more hosts of the project could not be reached: nothing is applied anywhere.
    One line per host, naming it and its URI."""

    def __init__(self, hosts: list[tuple[str, str, str]]) -> None:  # (name, uri, why)
        self.hosts = hosts
        super().__init__("\n".join(f"host {name} ({uri}) is unreachable: {why}"
                                   for name, uri, why in hosts)
                         + "\nnothing was changed on any host; --host NAME limits the run to "
                           "the hosts named")


class PlanError(KvmctlError):
    """The wanted state cannot be reached (for example a shrink, or a conflict with an object
    kvmctl does not own); raised before anything changes."""


class ApplyError(KvmctlError):
    """Applying a plan failed part-way; what was done stays done."""


class LockError(KvmctlError):
    """Another apply holds the project's lock."""


class UsageError(KvmctlError):
    """The command line itself is wrong."""


class SourceError(KvmctlError):
    """A sync's git source could not be read: the repository, ref or path (the message names
    them, never a credential), and what git said."""
