"""The command line: help, start-up cost, `render` filters, exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from kvmctl.cli.exits import USAGE, ExitStatus

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "examples" / "lab"
HEAVY = ("libvirt", "jsonschema", "jinja2", "rich")


def test_help(capsys: pytest.CaptureFixture[str], cli: Any) -> None:
    result = cli(["--help"])
    assert result.code == 0
    shown = capsys.readouterr().out  # argparse prints help itself
    assert shown.startswith("usage: kvmctl")
    for command in ("validate", "render"):
        assert command in shown


@pytest.mark.parametrize("command", ["validate", "render"])
def test_command_help(command: str, capsys: pytest.CaptureFixture[str], cli: Any) -> None:
    assert cli([command, "--help"]).code == 0
    shown = capsys.readouterr().out
    assert f"usage: kvmctl {command}" in shown
    assert "--filename" in shown


def test_help_of_the_installed_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "kvmctl", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: kvmctl")
    assert "Traceback" not in done.stderr


def test_no_command_prints_help_and_exits_2(cli: Any) -> None:
    result = cli([])
    assert result.code == 2
    assert result.stdout.startswith("usage: kvmctl")


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str], cli: Any) -> None:
    assert cli(["validate", "--no-such-option"]).code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str], cli: Any) -> None:
    assert cli(["--version"]).code == 0
    assert capsys.readouterr().out.startswith("kvmctl ")


def test_importing_the_cli_imports_no_heavy_module() -> None:
    code = ("import json, sys\nimport kvmctl.cli\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert "kvmctl.cli" in loaded
    for name in HEAVY:
        assert name not in loaded, f"import kvmctl.cli imports {name}"
        assert not any(m.startswith(name + ".") for m in loaded), name
    # -X importtime lists every module imported, one per line: "import time: ... | name"
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "kvmctl.cli" in imported
    for name in HEAVY:
        assert name not in imported, f"import kvmctl.cli imports {name} (-X importtime)"


# ----------------------------------------------------------------------------- render


def _objects(stdout: str) -> list[str]:
    """The `<!-- Kind/name -->` headers of a multi-object render."""
    return [line[5:-4] for line in stdout.splitlines() if line.startswith("<!-- ")]


def test_render_everything_in_apply_order(cli: Any) -> None:
    result = cli(["render", "-f", LAB])
    assert result.code == 0, result.output
    assert _objects(result.stdout) == [
        "StoragePool/lab-pool", "Image/lab-base", "Disk/lab-web-root", "Disk/lab-data",
        "Network/lab-nat", "Network/lab-iso",
        "VirtualMachine/lab-web", "VirtualMachine/lab-db", "VirtualMachine/lab-probe"]


@pytest.mark.parametrize(("kind", "expected"), [
    ("Network", ["Network/lab-nat", "Network/lab-iso"]),
    ("network", ["Network/lab-nat", "Network/lab-iso"]),
    ("VIRTUALMACHINE", ["VirtualMachine/lab-web", "VirtualMachine/lab-db",
                        "VirtualMachine/lab-probe"]),
    ("Disk", ["Disk/lab-web-root", "Disk/lab-data"]),
])
def test_render_kind_filter(kind: str, expected: list[str], cli: Any) -> None:
    result = cli(["render", "-f", LAB, "--kind", kind])
    assert result.code == 0, result.output
    assert _objects(result.stdout) == expected


def test_render_single_object_is_plain_xml(cli: Any) -> None:
    result = cli(["render", "-f", LAB, "--kind", "VirtualMachine", "--name", "lab-db"])
    assert result.code == 0, result.output
    assert "<!--" not in result.stdout
    root = etree.fromstring(result.stdout.encode())
    assert root.tag == "domain" and root.findtext("name") == "lab-db"
    assert result.stdout.endswith("</domain>\n")


def test_render_name_filter_across_kinds(cli: Any, write: Any) -> None:
    path = write("same-name.yaml", """\
apiVersion: kvmctl/v1
kind: Network
metadata:
  name: web
spec:
  mode: isolated
---
apiVersion: kvmctl/v1
kind: VirtualMachine
metadata:
  name: web
spec:
  interfaces: [{network: web}]
""")
    result = cli(["render", "-f", path, "--name", "web"])
    assert result.code == 0, result.output
    assert _objects(result.stdout) == ["Network/web", "VirtualMachine/web"]
    only = cli(["render", "-f", path, "--name", "web", "--kind", "network"])
    assert etree.fromstring(only.stdout.encode()).tag == "network"


@pytest.mark.parametrize("argv", [["--kind", "Pod"], ["--name", "nope"],
                                  ["--kind", "Network", "--name", "lab-web"]])
def test_render_filter_matching_nothing(argv: list[str], cli: Any) -> None:
    result = cli(["render", "-f", LAB, *argv])
    assert result.code == 2
    assert "no object matches --kind/--name" in result.stderr
    assert result.stdout == ""


def test_render_project_and_domain_type(cli: Any) -> None:
    result = cli(["render", "-f", REPO / "examples" / "quickstart", "--kind", "VirtualMachine",
                  "--project", "team-a", "--domain-type", "qemu"])
    assert result.code == 0, result.output
    root = etree.fromstring(result.stdout.encode())
    assert root.get("type") == "qemu"
    ns = {"k": "https://kvmctl.dev/xmlns/resource/v1"}
    assert root.findtext("metadata/k:resource/k:project", namespaces=ns) == "team-a"


def test_render_domain_type_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                  cli: Any) -> None:
    monkeypatch.setenv("KVMCTL_DOMAIN_TYPE", "qemu")
    result = cli(["render", "-f", REPO / "examples" / "quickstart", "--kind", "VirtualMachine"])
    assert etree.fromstring(result.stdout.encode()).get("type") == "qemu"


def test_render_of_invalid_manifests_reports_problems(cli: Any) -> None:
    result = cli(["render", "-f", REPO / "tests" / "fixtures" / "invalid" / "cpus-zero.yaml"])
    assert result.code == 1
    assert "0 is less than the minimum of 1" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output


def test_render_from_stdin(cli: Any) -> None:
    text = (REPO / "examples" / "quickstart" / "network.yaml").read_text()
    result = cli(["render", "-f", "-"], stdin=text)
    assert result.code == 0, result.output
    assert etree.fromstring(result.stdout.encode()).findtext("name") == "qs-net"


def test_render_needs_manifests(cli: Any) -> None:
    result = cli(["render"])
    assert result.code == 2
    assert "no manifests given" in result.stderr


def test_exit_status_values() -> None:
    assert (ExitStatus.OK, ExitStatus.ERROR, USAGE, ExitStatus.CHANGES) == (0, 1, 2, 2)


@pytest.mark.parametrize("argv", [["diff", "--no-such-option"], ["diff"],
                                  ["plan", "--detailed-exitcode"],
                                  ["plan", "--detailed-exitcode", "--no-such-option"]])
def test_errors_never_exit_2_where_2_means_changes(argv: list[str], cli: Any) -> None:
    assert cli(argv).code == 1
