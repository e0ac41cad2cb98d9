"""Every runnable example and every rendering fixture converges: apply, then a plan with no
changes (libvirt's defaults are never a diff), then destroy leaves nothing behind. Names,
subnets, bridges and paths are rewritten to this test's prefix, free subnets and scratch
directory, so nothing on the host can collide with them."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_support import run_cli
from lab_support import add_bridge

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "golden" / "render"
pytestmark = pytest.mark.integration


def kvmctl(*argv: str) -> tuple[int, str, str]:
    result = run_cli(argv)
    assert "Traceback" not in result.output and "internal error" not in result.output, result
    return result.code, result.stdout, result.stderr


class Rewriter:
    """Moves an example's objects into this test's namespace."""

    def __init__(self, prefix: str, scratch: Path, bridge: str,
                 free_subnet: Callable[[], ipaddress.IPv4Network]) -> None:
        self.prefix, self.scratch, self.bridge = prefix, scratch, bridge
        self.free_subnet = free_subnet
        self.subnets: dict[str, tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]] = {}

    def name(self, name: str) -> str:
        return self.prefix + name

    def address(self, network: str, ip: str) -> str:
        old, new = self.subnets[network]
        offset = int(ipaddress.IPv4Address(ip)) - int(old.network_address)
        return str(new.network_address + offset)

    def rewrite(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for doc in docs:  # networks first: VMs' reserved addresses depend on their subnets
            if doc["kind"] == "Network":
                self._network(doc["metadata"]["name"], doc["spec"])
        for doc in docs:
            spec, kind = doc["spec"], doc["kind"]
            original = doc["metadata"]["name"]
            doc["metadata"]["name"] = self.name(original)
            for key in ("pool", "image"):
                if key in spec and kind in ("Disk", "Image"):
                    spec[key] = self.name(spec[key])
            if kind == "StoragePool":
                spec["path"] = str(self.scratch / "pools" / original)
            if kind == "VirtualMachine":
                self._vm(original, spec)
        return docs

    def _network(self, name: str, spec: dict[str, Any]) -> None:
        if spec.get("mode") == "bridge":
            spec["bridge"] = self.bridge
            return
        spec.pop("bridge", None)
        ipv4 = spec.get("ipv4")
        if not ipv4:
            return
        old = ipaddress.IPv4Network(ipv4["cidr"])
        self.subnets[name] = (old, self.free_subnet())
        ipv4["cidr"] = str(self.subnets[name][1])
        if "gateway" in ipv4:
            ipv4["gateway"] = self.address(name, ipv4["gateway"])
        for key in ("start", "end"):
            if key in ipv4.get("dhcp", {}):
                ipv4["dhcp"][key] = self.address(name, ipv4["dhcp"][key])
        for host in spec.get("dns", {}).get("hosts", []):
            host["ip"] = self.address(name, host["ip"])

    def _vm(self, name: str, spec: dict[str, Any]) -> None:
        for disk in spec.get("disks", []):
            disk["disk"] = self.name(disk["disk"])
        for nic in spec.get("interfaces", []):
            if "bridge" in nic:
                nic["bridge"] = self.bridge
                continue
            if "ip" in nic:
                nic["ip"] = self.address(nic["network"], nic["ip"])
            nic["network"] = self.name(nic["network"])
        if "console" in spec:
            spec["console"]["log"] = str(self.scratch / f"{name}.log")


def _offline(docs: list[dict[str, Any]], image: Path) -> list[dict[str, Any]]:
    """Images from URLs come from the test guest's image instead (no internet here)."""
    for doc in docs:
        if doc["kind"] == "Image" and "url" in doc["spec"]:
            for key in ("url", "sha256"):
                doc["spec"].pop(key)
            doc["spec"].update(path=str(image), format="raw")
    return docs


def _docs(folder: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")) or [folder / "manifest.yaml"]:
        # The folder's project file (kvmctl.yaml) names the example's project and host: the
        # test gives its own (--project), and the documents are written elsewhere.
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") !=
                 "Project"]
    return docs


def _owned_left(conn: Any, prefix: str) -> list[str]:
    left = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)]
    left += [n.name() for n in conn.listAllNetworks(0) if n.name().startswith(prefix)]
    for pool in conn.listAllStoragePools(0):
        if pool.name().startswith(prefix):
            left.append(pool.name())
    return left


CASES = [(EXAMPLES / "quickstart", True), (EXAMPLES / "lab", False),
         (EXAMPLES / "bridged", False)] + [(case, False) for case in sorted(FIXTURES.iterdir())]


@pytest.mark.parametrize("folder,running", CASES,
                         ids=[f"{f.parent.name}/{f.name}" for f, _ in CASES])
def test_converges(folder: Path, running: bool, conn: Any, prefix: str, cleanup: Any,
                   scratch_dir: Path, free_subnet: Any, test_guest: Any) -> None:
    bridge = prefix + "br"
    add_bridge(bridge)  # removed by the cleanup sweep, like everything named with the prefix
    docs = _offline(_docs(folder), test_guest.image)
    docs = Rewriter(prefix, scratch_dir, bridge, free_subnet).rewrite(docs)
    if not running:  # stopped VMs: their definitions converge just the same, without TCG boots
        for doc in docs:
            if doc["kind"] == "VirtualMachine":
                doc["spec"]["state"] = "stopped"
    manifest = scratch_dir / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    common = ["-f", str(manifest), "--project", prefix, "--domain-type", "qemu"]

    code, out, err = kvmctl("apply", "-y", *common, *(["--wait", "--wait-timeout", "240"]
                                                      if running else []))
    assert code == 0, out + err
    code, out, err = kvmctl("plan", "--detailed-exitcode", *common)
    assert code == 0, "second plan is not empty:\n" + out + err
    code, out, _ = kvmctl("plan", "-o", "json", *common)
    assert json.loads(out)["changes_present"] is False

    protected = [d for d in docs if d["spec"].get("protect")]
    if protected:  # protection blocks destroy; lifting it is a change like any other
        for doc in protected:
            doc["spec"]["protect"] = False
        manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        code, out, err = kvmctl("apply", "-y", *common)
        assert code == 0, out + err
    code, out, err = kvmctl("destroy", "-y", "--with-disks", *common)
    assert code == 0, out + err
    assert _owned_left(conn, prefix) == [], out + err


def test_cloud_image_example_is_valid() -> None:
    """Documented, not run offline (it downloads a cloud image): it must at least validate."""
    code, out, err = kvmctl("validate", "-f", str(EXAMPLES / "cloud-image"))
    assert code == 0, out + err
