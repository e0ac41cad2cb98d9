"""Helpers for test_lab_e2e.py and test_storage.py (not fixtures; conftest.py has those).

* ``Kvmctl``: runs the real CLI in-process (``kvmctl.cli.run``) with captured streams, always with
  ``--project`` and ``--domain-type``; ``Kvmctl.write`` writes a manifest set from Python dicts.
* Manifest builders: ``pool``, ``image``, ``disk``, ``network``, ``vm``.
* Host inspection: ``volume_xml``, ``ownership_record``, ``leftovers``, ``dnsmasq_running``, links.
* Volume content through libvirt streams: ``upload``, ``download``.
* ``http_server``: a throwaway HTTP server on 127.0.0.1 serving one directory.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import libvirt
import yaml
from cli_support import CliResult, run_cli
from manifest_docs import changes_by_ref, disk, doc, image, pool  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]
RECORD_PREFIX = "kvmctl-owner-"


# --- running the CLI -----------------------------------------------------------------------------


class Kvmctl:
    """The CLI of one test project: ``k("plan", "-f", d)``; ``k.ok(...)`` also asserts exit 0."""

    ENGINE = {"plan", "diff", "apply", "destroy", "get"}

    def __init__(self, project: str, manifest_dir: Path, domain_type: str = "qemu",
                 uri: str = "qemu:///system"):
        self.project, self.dir, self.domain_type, self.uri = project, Path(manifest_dir), \
            domain_type, uri
        self.dir.mkdir(parents=True, exist_ok=True)

    # manifests
    def write(self, docs: Sequence[dict], name: str = "manifests.yaml") -> Path:
        """Replace the manifest set with ``docs`` (one file); returns the manifest directory."""
        for old in self.dir.glob("*.yaml"):
            old.unlink()
        (self.dir / name).write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
        return self.dir

    def argv(self, *args: str) -> list[str]:
        args = [str(a) for a in args]
        if args and args[0] in self.ENGINE:
            args += ["--project", self.project, "--domain-type", self.domain_type,
                     "--connect", self.uri]
        return args

    def __call__(self, *args: Any) -> CliResult:
        argv = self.argv(*args)
        old = {k: os.environ.pop(k, None) for k in ("KVMCTL_PROJECT", "KVMCTL_DOMAIN_TYPE",
                                                     "KVMCTL_CONNECT")}
        try:
            return run_cli(argv)
        finally:
            for k, v in old.items():
                if v is not None:
                    os.environ[k] = v

    def ok(self, *args: Any) -> CliResult:
        r = self(*args)
        assert r.code == 0, str(r)
        assert "Traceback" not in r.output and "internal error" not in r.output, str(r)
        return r

    # shorthands
    def apply(self, *extra: Any) -> CliResult:
        return self.ok("apply", "-f", self.dir, "-y", *extra)

    def plan_json(self, *extra: Any) -> dict:
        return self.ok("plan", "-f", self.dir, "-o", "json", *extra).json()

    def subprocess_argv(self, *args: Any) -> list[str]:
        """The same command for a fresh ``python -m kvmctl`` process."""
        return [str(REPO / ".venv/bin/python"), "-m", "kvmctl", *self.argv(*args)]


# --- manifest builders ---------------------------------------------------------------------------


def network(name: str, **spec: Any) -> dict:
    return doc("Network", name, spec)


def vm(name: str, **spec: Any) -> dict:
    return doc("VirtualMachine", name, spec)


def nat_network(name: str, subnet, bridge: str | None = None, mode: str = "nat") -> dict:
    """A network on ``subnet`` (an IPv4Network /24): gateway .1, DHCP .100-.199."""
    hosts = list(subnet.hosts())
    spec: dict[str, Any] = {"mode": mode, "ipv4": {
        "cidr": str(subnet), "gateway": str(hosts[0]),
        "dhcp": {"start": str(hosts[99]), "end": str(hosts[198])}}}
    if bridge:
        spec["bridge"] = bridge
    return network(name, **spec)


def boot(guest, cmdline: str = "console=ttyS0") -> dict:
    return {"kernel": str(guest.kernel), "initrd": str(guest.initrd), "cmdline": cmdline}


def find(docs: Sequence[dict], kind: str, name: str) -> dict:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise KeyError(f"{kind}/{name}")


# --- host inspection -----------------------------------------------------------------------------


def volume_xml(conn, pool_name: str, volume: str) -> ET.Element:
    pool_obj = conn.storagePoolLookupByName(pool_name)
    pool_obj.refresh(0)
    return ET.fromstring(pool_obj.storageVolLookupByName(volume).XMLDesc(0))


def volume_names(conn, pool_name: str) -> set[str]:
    pool_obj = conn.storagePoolLookupByName(pool_name)
    if not pool_obj.isActive():
        return set()
    pool_obj.refresh(0)
    return {v.name() for v in pool_obj.listAllVolumes(0)}


def download(conn, pool_name: str, volume: str, length: int = 0, offset: int = 0) -> bytes:
    """Bytes of a volume (the file as stored, e.g. qcow2 bytes for a qcow2 volume)."""
    vol = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(volume)
    stream = conn.newStream(0)
    data = bytearray()
    vol.download(stream, offset, length, 0)
    while True:
        chunk = stream.recv(1 << 20)
        if not chunk or isinstance(chunk, int):
            break
        data += chunk
    stream.finish()
    return bytes(data)


def upload(conn, pool_name: str, volume: str, data: bytes, offset: int = 0) -> None:
    vol = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(volume)
    stream = conn.newStream(0)
    vol.upload(stream, offset, len(data), 0)
    view = memoryview(data)
    while view:
        sent = stream.send(bytes(view[:1 << 20]))
        view = view[sent:]
    stream.finish()


def ownership_record(conn, pool_name: str, project: str) -> dict | None:
    """The project's ownership record in a pool (parsed JSON), or None if there is none."""
    name = f"{RECORD_PREFIX}{project}.json"
    if name not in volume_names(conn, pool_name):
        return None
    return json.loads(download(conn, pool_name, name).rstrip(b"\0").decode())


def links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link"], check=True, capture_output=True, text=True).stdout
    return {link["ifname"] for link in json.loads(out or "[]")}


def add_bridge(name: str) -> None:
    assert len(name) <= 15, name
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


def del_link(name: str) -> None:
    if name in links():
        subprocess.run(["ip", "link", "del", "dev", name], check=True)


NETWORK_RUN_DIR = Path("/run/libvirt/network")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def dnsmasq_running(network_name: str) -> list[str]:
    """Evidence of a dnsmasq still serving ``network_name`` (empty list: none).

    libvirt (9.0) leaves the pid file of a stopped network's dnsmasq behind: the file alone is
    no evidence, a live dnsmasq with that pid is.
    """
    found = []
    pidfile = NETWORK_RUN_DIR / f"{network_name}.pid"
    if pidfile.exists():
        try:
            pid = int(pidfile.read_text().strip())
        except ValueError:
            pid = 0
        if pid and "dnsmasq" in _cmdline(pid):
            found.append(f"{pidfile} -> live dnsmasq {pid}: {_cmdline(pid)}")
    r = subprocess.run(["pgrep", "-af", f"/{network_name}.conf"], capture_output=True, text=True)
    found += [line for line in r.stdout.splitlines() if "dnsmasq" in line]
    return found


def forget_stale_network_files(conn, network_name: str) -> None:
    """Remove what libvirt leaves in /run/libvirt/network of a network that no longer exists:
    the dead dnsmasq's pid file and the empty ``ports`` directory."""
    if network_name in {n.name() for n in conn.listAllNetworks(0)}:
        return
    deadline = time.monotonic() + 10  # a stopped network's dnsmasq may take a moment to exit
    while dnsmasq_running(network_name):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    (NETWORK_RUN_DIR / f"{network_name}.pid").unlink(missing_ok=True)
    ports = NETWORK_RUN_DIR / network_name / "ports"
    if ports.is_dir() and not any(ports.iterdir()):
        ports.rmdir()
    with contextlib.suppress(OSError):
        (NETWORK_RUN_DIR / network_name).rmdir()


def leftovers(conn, prefix: str) -> list[str]:
    """Every libvirt object, volume, host link or dnsmasq whose name starts with ``prefix``."""
    found = [f"domain {d.name()}" for d in conn.listAllDomains(0) if d.name().startswith(prefix)]
    for net in conn.listAllNetworks(0):
        if net.name().startswith(prefix):
            found.append(f"network {net.name()}")
    for p in conn.listAllStoragePools(0):
        if p.name().startswith(prefix):
            found.append(f"pool {p.name()}")
        # Other tests' pools may vanish while this looks at them.
        with contextlib.suppress(libvirt.libvirtError):
            if p.isActive():
                with contextlib.suppress(libvirt.libvirtError):
                    p.refresh(0)
                found += [f"volume {p.name()}/{v.name()}" for v in p.listAllVolumes(0)
                          if v.name().startswith(prefix)]
    found += [f"link {name}" for name in links() if name.startswith(prefix)]
    r = subprocess.run(["pgrep", "-af", f"{prefix}"], capture_output=True, text=True)
    found += [f"process {line}" for line in r.stdout.splitlines()
              if "dnsmasq" in line or "qemu" in line]
    return found


def dhcp_leases(conn, network_name: str) -> list[dict]:
    net = conn.networkLookupByName(network_name)
    return net.DHCPLeases() if net.isActive() else []


# --- a local HTTP server -------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (random port) from a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
