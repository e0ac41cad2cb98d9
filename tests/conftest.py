"""Shared helpers for the unit tests: run the real CLI in-process with captured streams."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import CliResult, run_cli

REPO = Path(__file__).resolve().parents[1]


CliRunner = Callable[..., CliResult]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """`cli(["validate", "-f", path], stdin="...")` runs kvmctl.cli.run and captures its output.

    The environment variables that change CLI defaults are cleared so results do not depend on
    the shell the tests run from.
    """
    for name in ("KVMCTL_PROJECT", "KVMCTL_DOMAIN_TYPE", "KVMCTL_CONNECT"):
        monkeypatch.delenv(name, raising=False)

    return run_cli


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """`write("name.yaml", text)`: a manifest file in the test's temporary directory."""

    def writer(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return writer
