"""Run the real kvmctl CLI in-process with captured streams: one runner for every test suite."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CliResult:
    argv: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (f"kvmctl {' '.join(self.argv)} -> exit {self.code}\n--- stdout\n{self.stdout}"
                f"--- stderr\n{self.stderr}")


class _Stdin(io.StringIO):
    """Standard input as a test gives it: text, never a terminal."""

    def isatty(self) -> bool:
        return False


def run_cli(argv: Sequence[Any], stdin: str = "") -> CliResult:
    from kvmctl.cli.main import run
    from kvmctl.cli.report import Env
    args = tuple(str(a) for a in argv)
    out, err = io.StringIO(), io.StringIO()
    code = run(list(args), Env(_Stdin(stdin), out, err))
    return CliResult(args, int(code), out.getvalue(), err.getvalue())
