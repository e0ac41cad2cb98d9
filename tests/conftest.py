"""Shared helpers for the unit tests: run the real CLI in-process with captured streams."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)


class _Stdin(io.StringIO):
    """Standard input as a test gives it: text, never a terminal."""

    def isatty(self) -> bool:
        return False


CliRunner = Callable[..., CliResult]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """`cli(["validate", "-f", path], stdin="...")` runs kvmctl.cli.run and captures its output.

    The environment variables that change CLI defaults are cleared so results do not depend on
    the shell the tests run from.
    """
    from kvmctl.cli import Env, run

    for name in ("KVMCTL_PROJECT", "KVMCTL_DOMAIN_TYPE", "KVMCTL_CONNECT"):
        monkeypatch.delenv(name, raising=False)

    def invoke(argv: Sequence[str], stdin: str = "") -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        code = run([str(a) for a in argv], Env(_Stdin(stdin), out, err))
        return CliResult(int(code), out.getvalue(), err.getvalue())

    return invoke


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """`write("name.yaml", text)`: a manifest file in the test's temporary directory."""

    def writer(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return writer
