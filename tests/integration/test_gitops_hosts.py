"""The controller over two hosts when one goes away: the main libvirtd and test host h1 (a
libvirtd of its own in a namespace, see scripts/test-hosts). h1's libvirtd is killed by its pid
while the controller runs: h1 is reported unreachable and the project Degraded, a commit still
lands on the main host, and when h1's libvirtd is started again the next round reconnects and
everything is Synced. No guest boots here: networks only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import libvirt  # noqa: E402
from conftest import PREFIX_STEM, SCRATCH_ROOT, Cleanup  # noqa: E402
from engine_support import wait_until  # noqa: E402
from test_gitops import _free_port, _git  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = HERE.parents[1]


def _network(name: str, subnet: Any, host: str) -> dict[str, Any]:
    hosts = list(subnet.hosts())
    return {"apiVersion": "kvmctl/v1", "kind": "Network", "metadata": {"name": name},
            "spec": {"mode": "nat", "hosts": [host], "ipv4": {"cidr": str(subnet), "dhcp": {
                "start": str(hosts[99]), "end": str(hosts[198])}}}}


def _libvirtd_pid(host: str) -> int:
    out = subprocess.run([str(ROOT / "scripts" / "test-hosts"), "status"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        match = re.match(rf"^{host}\s+\S+\s+libvirtd=(\d+)", line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"no libvirtd pid for {host} in:\n{out}")


def test_a_host_going_away_is_reported_and_the_others_go_on(
        conn, session_hosts, free_subnet) -> None:
    h1 = session_hosts[0]
    prefix = f"{PREFIX_STEM}{secrets.token_hex(4)}-"
    far = libvirt.open(h1.uri)
    cleanups = [Cleanup(conn, prefix)]
    scratch = SCRATCH_ROOT / f"{prefix}hosts"
    scratch.mkdir(parents=True)
    project = prefix + "two"
    work = scratch / "work"
    _git(scratch, "init", "-q", "-b", "main", str(work))
    (work / "m").mkdir()
    token = scratch / "token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    config = {"apiVersion": "kvmctl/v1", "kind": "Project", "metadata": {"name": project},
              "spec": {"hosts": [{"name": "local", "uri": "qemu:///system"},
                                 {"name": "h1", "uri": h1.uri}]}}
    (work / "m" / "kvmctl.yaml").write_text(yaml.safe_dump(config))
    docs = [_network(prefix + "a", free_subnet(), "local"),
            _network(prefix + "b", free_subnet(), "h1")]

    def commit(message: str) -> str:
        (work / "m" / "nets.yaml").write_text(yaml.safe_dump_all(docs))
        _git(work, "add", "-A")
        _git(work, "commit", "-qm", message)
        return _git(work, "rev-parse", "HEAD")

    sha = commit("a network on each host")
    port = _free_port()
    log_path = scratch / "controller.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmctl", "controller", "--repo", f"file://{work}", "--ref",
         "main", "--path", "m", "--state-dir", str(scratch / "state"), "--interval", "2",
         "--listen", f"127.0.0.1:{port}", "--token-file", str(token), "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=log_file, env={**os.environ,
                                                         "KVMCTL_DOMAIN_TYPE": "qemu"})

    def status() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/projects/{project}", timeout=5) as r:
                return dict(json.load(r))
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def objects() -> dict[str, dict[str, Any]]:
        return {o["id"]: o for o in status().get("objects") or []}

    def all_synced(sha: str) -> bool:
        s = status()
        last = s.get("last_sync") or {}
        return (last.get("commit") or {}).get("sha") == sha and last.get("result") == "synced" \
            and bool(s.get("objects")) and all(o["sync"] == "Synced"
                                                for o in s["objects"])

    try:
        wait_until(lambda: all_synced(sha), 90, "both networks synced")
        assert far.networkLookupByName(prefix + "b").isActive()
        os.kill(_libvirtd_pid(h1.name), signal.SIGKILL)  # h1's libvirtd goes away
        wait_until(lambda: any(not h["reachable"] for h in status().get("hosts", [])), 30,
                   "h1 reported unreachable")
        s = status()
        assert s["state"] == "Degraded" and "h1" in s["state_reason"], s
        assert objects()[f"h1:Network/{prefix}b"]["health"] == "Unknown"
        docs.append(_network(prefix + "c", free_subnet(), "local"))
        sha = commit("a second network on the host that answers")
        wait_until(lambda: _active(conn, prefix + "c"), 60, "the local host goes on")
        s = status()
        assert s["last_sync"]["result"] in ("partial", "out-of-sync"), s["last_sync"]
        subprocess.run([str(ROOT / "scripts" / "test-hosts"), "up", str(len(session_hosts))],
                       check=True, capture_output=True, timeout=300)
        wait_until(lambda: all_synced(sha), 90, "h1 back: everything synced")
        assert status()["state"] == "Healthy"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log_file.close()
        log = log_path.read_text(errors="replace")
        # h1 is the session's: whatever happened above, it answers again for the next module.
        subprocess.run([str(ROOT / "scripts" / "test-hosts"), "up", str(len(session_hosts))],
                       check=True, capture_output=True, timeout=300)
        far.close()
        far = libvirt.open(h1.uri)
        cleanups.append(Cleanup(far, prefix))
        errors = [e for c in cleanups for e in c.run()]
        far.close()
        shutil.rmtree(scratch, ignore_errors=True)
    assert code == 0, log
    assert not errors, errors


def _active(conn: Any, name: str) -> bool:
    try:
        return bool(conn.networkLookupByName(name).isActive())
    except libvirt.libvirtError:
        return False
