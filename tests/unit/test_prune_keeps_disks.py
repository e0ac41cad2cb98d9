"""A VM whose delete is blocked keeps its disks: `destroy --with-disks` (or a prune with
--prune-disks) of a protected, stopped VM used to keep the VM and delete the disk under it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_support import run_cli
from manifest_docs import disk, doc, pool
from testdriver import install, write_manifests


def test_a_protected_vm_keeps_its_disks_and_their_pool(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hv, uri = install(monkeypatch, tmp_path)
    try:
        docs = [pool("k-pool", tmp_path / "pool"), disk("k-data", "k-pool", "16MiB"),
                doc("VirtualMachine", "k-vm", {"memory": "128MiB", "state": "stopped",
                                               "protect": True,
                                               "boot": {"kernel": "/k", "cmdline": "x"},
                                               "disks": [{"disk": "k-data"}]})]
        path = write_manifests(tmp_path / "m.yaml", docs)

        def cli(*argv: object) -> Any:
            return run_cli([str(argv[0]), "--connect", uri, "--project", "unit",
                            "--domain-type", "qemu", *[str(a) for a in argv[1:]]])

        assert cli("apply", "-y", "-f", path).code == 0
        kept = cli("destroy", "-y", "--with-disks", "-f", path)
        assert "VirtualMachine/k-vm (protected (protect: true))" in kept.stderr, kept
        assert "Disk/k-data (used by VM k-vm, which is not deleted)" in kept.stderr, kept
        pools = {p.name(): p for p in hv.conn.listAllStoragePools()}
        assert {d.name() for d in hv.conn.listAllDomains()} == {"k-vm"}
        assert "k-pool" in pools
        assert "k-data.qcow2" in pools["k-pool"].listVolumes()
    finally:
        hv.close()
