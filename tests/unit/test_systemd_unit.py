"""The systemd unit shipped for the controller: it parses, and its command line is one the
controller accepts (a unit whose ExecStart kvmctl refuses would fail only on a user's host)."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from kvmctl.cli.main import parser
from kvmctl.cli.options import CommandOptions

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "kvmctl-controller.service"


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are cased
    unit.read_string(UNIT.read_text(encoding="utf-8"))
    return unit


def test_the_unit_has_its_sections_and_stops_with_sigterm() -> None:
    unit = _unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["KillSignal"] == "SIGTERM"  # the change in progress finishes
    assert service["Restart"] == "on-failure"
    assert service["StateDirectoryMode"] == "0700"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_its_command_line_is_one_the_controller_accepts() -> None:
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    assert argv[0].endswith("/kvmctl") and argv[1] == "controller"
    opts = CommandOptions.from_namespace(parser().parse_args(argv[1:]))
    assert opts.command == "controller"
    assert opts.token_file == "/etc/kvmctl/token"  # a file: never the token on the command line
    assert opts.project_files == ("/etc/kvmctl/kvmctl.yaml",)
    assert opts.listen == "127.0.0.1:8787"
    assert opts.state_dir == "/var/lib/kvmctl"
