"""A commit as a sync names it: which one, by whom, when, saying what."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Commit:
    sha: str
    author: str = ""
    email: str = ""
    time: float = 0.0  # commit time, seconds since the epoch
    message: str = ""  # the subject line

    @property
    def short(self) -> str:
        return self.sha[:12]
