"""Helpers for the engine integration tests (test_engine_*.py): run the real CLI in-process,
write manifests, look at libvirt directly.

Not fixtures (those are in conftest.py); the ``kvmctl`` fixture of the engine tests builds a
``Kvmctl`` from the ``prefix``, ``scratch_dir`` and ``cleanup`` fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from cli_support import CliResult, run_cli
from manifest_docs import changes_by_ref, disk, doc, pool  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv/bin/python").exists() \
    else sys.executable
URI = os.environ.get("KVMCTL_TEST_URI", "qemu:///system")
# Words that must never reach a user: a Python traceback, or the CLI's "this is a bug" line.
FORBIDDEN = ("Traceback (most recent call last)", "internal error: ")


Result = CliResult


def assert_clean(text: str, what: str = "output") -> None:
    for word in FORBIDDEN:
        assert word not in text, f"{what} contains {word!r}:\n{text}"


class Kvmctl:
    """kvmctl for one test: its project (the test's prefix), domain type qemu, its temp dir."""

    def __init__(self, project: str, workdir: Path, domain_type: str = "qemu") -> None:
        self.project, self.workdir, self.domain_type = project, Path(workdir), domain_type
        self.history: list[Result] = []

    # -- manifests --
    def write(self, name: str, docs: Iterable[dict[str, Any]]) -> Path:
        path = self.workdir / f"{self.project}{name}"
        path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False), encoding="utf-8")
        return path

    # -- running the CLI --
    def run(self, *argv: Any, stdin: str = "", check_clean: bool = True) -> Result:
        result = run_cli(argv, stdin)
        self.history.append(result)
        if check_clean:
            assert_clean(result.output, f"kvmctl {' '.join(result.argv)}")
        return result

    def engine_args(self, project: str | None = None) -> list[str]:
        return ["--connect", URI, "--project", project or self.project,
                "--domain-type", self.domain_type]

    @staticmethod
    def files(paths: Sequence[Path] | Path) -> list[str]:
        paths = [paths] if isinstance(paths, Path) else list(paths)
        return [a for p in paths for a in ("-f", str(p))]

    def plan(self, paths: Sequence[Path] | Path, *extra: Any, project: str | None = None
             ) -> Result:
        return self.run("plan", *self.files(paths), *self.engine_args(project),
                        "--detailed-exitcode", *extra)

    def plan_json(self, paths: Sequence[Path] | Path, *extra: Any) -> dict[str, Any]:
        result = self.plan(paths, "-o", "json", *extra)
        assert result.code in (0, 2), str(result)
        return result.json()

    def apply(self, paths: Sequence[Path] | Path, *extra: Any, project: str | None = None,
              expect: int | None = 0) -> Result:
        result = self.run("apply", "-y", *self.files(paths), *self.engine_args(project), *extra)
        if expect is not None:
            assert result.code == expect, str(result)
        return result

    def converge(self, paths: Sequence[Path] | Path, *extra: Any) -> Result:
        """apply, then a plan that must be empty (exit 0 with --detailed-exitcode)."""
        applied = self.apply(paths, *extra)
        again = self.plan(paths, *extra)
        assert again.code == 0, f"second plan is not empty after:\n{applied}\n{again}"
        return applied

    def get(self, what: str = "vms", project: str | None = None) -> list[dict[str, Any]]:
        result = self.run("get", what, "-o", "json", "--connect", URI, "--project",
                          project or self.project)
        assert result.code == 0, str(result)
        return result.json()

    def subprocess_argv(self, *argv: Any) -> list[str]:
        return [PYTHON, "-m", "kvmctl", *(str(a) for a in argv)]


def change(plan: dict[str, Any], ref: str) -> dict[str, Any] | None:
    """The change of `KIND/NAME` in a plan's JSON, or None."""
    return changes_by_ref(plan).get(ref)


def fields(c: dict[str, Any] | None) -> set[str]:
    return {f["field"] for f in (c or {}).get("fields", [])}


# ---- manifest documents -------------------------------------------------------------------------

def network(name: str, subnet: Any, *, dhcp: bool = True, **spec: Any) -> dict[str, Any]:
    """A NAT network on `subnet` (an IPv4Network /24), DHCP on .100-.199."""
    hosts = list(subnet.hosts())
    body: dict[str, Any] = {"mode": "nat", "ipv4": {"cidr": str(subnet)}}
    if dhcp:
        body["ipv4"]["dhcp"] = {"start": str(hosts[99]), "end": str(hosts[198])}
    body.update(spec)
    return doc("Network", name, body)


def host_ip(subnet: Any, n: int) -> str:
    return str(subnet.network_address + n)


def vm(name: str, guest: Any, *, log: Path | str | None = None, state: str = "stopped",
       **spec: Any) -> dict[str, Any]:
    """A VM booting the test guest by direct kernel boot; stopped unless state= says otherwise."""
    body: dict[str, Any] = {
        "memory": "128MiB",
        "boot": {"kernel": str(guest.kernel), "initrd": str(guest.initrd),
                 "cmdline": "console=ttyS0"},
        "state": state,
    }
    if log is not None:
        body["console"] = {"log": str(log)}
    body.update(spec)
    return doc("VirtualMachine", name, body)


# ---- libvirt -----------------------------------------------------------------------------------

def domain_xml(conn: Any, name: str, inactive: bool = True) -> ET.Element:
    import libvirt
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    return ET.fromstring(conn.lookupByName(name).XMLDesc(flags))


def macs(root: ET.Element) -> list[str]:
    return [m.get("address", "").lower() for m in root.iter("mac")]


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", URI, *args], check=True, capture_output=True,
                          text=True).stdout


def bridge_ifindex(name: str) -> int | None:
    """The kernel's index of a host link (a bridge recreated gets a new one), None if absent."""
    try:
        return int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    except OSError:
        return None
