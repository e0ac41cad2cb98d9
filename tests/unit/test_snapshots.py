"""Snapshots read back from libvirt's XML: kvmctl's mark, memory and external kinds, and the
combinations libvirt 9.0 cannot snapshot internally, refused with why and what would work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvmctl.errors import UsageError
from kvmctl.host.facts import internal_refusal
from kvmctl.host.snapshots import mark, parse
from kvmctl.snapshot import check_name, default_name

SNAP = """<domainsnapshot><name>s1</name><description>{desc}</description>
<state>{state}</state><creationTime>1796163754</creationTime>
<parent><name>s0</name></parent><memory snapshot='{memory}'/>
<disks><disk name='vda' snapshot='{disk}'/></disks></domainsnapshot>"""


def test_the_mark_is_the_last_line_and_read_back() -> None:
    text = mark("first\nsecond", "lab")
    assert text == "first\nsecond\nkvmctl: project=lab origin=manual"
    s = parse("vm", SNAP.format(desc=text, state="running", memory="internal",
                                disk="internal"), current=True)
    assert (s.name, s.project, s.description, s.parent, s.state) == (
        "s1", "lab", "first\nsecond", "s0", "running")
    assert s.memory and not s.external and s.revertible and s.current
    assert s.created == 1796163754


@pytest.mark.parametrize("desc", ["someone's snapshot", "kvmctl: project=lab\nmore", ""])
def test_a_snapshot_without_the_mark_at_its_end_is_nobodys(desc: str) -> None:
    s = parse("vm", SNAP.format(desc=desc, state="shutoff", memory="no", disk="internal"),
              current=False)
    assert s.project is None and not s.memory


def test_an_external_snapshot_is_not_revertible_here() -> None:
    s = parse("vm", SNAP.format(desc="", state="shutoff", memory="no", disk="external"),
              current=False)
    assert s.external and not s.revertible


def _domain(disks: str, os: str = "<os><type>hvm</type></os>") -> str:
    return f"<domain type='qemu'><name>vm</name>{os}<devices>{disks}</devices></domain>"


QCOW2 = ("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
         "<target dev='vda'/></disk>")
RAW = "<disk type='file' device='disk'><driver name='qemu' type='raw'/><target dev='vdb'/></disk>"
CDROM = ("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
         "<target dev='sda'/></disk>")


def test_qcow2_disks_hold_internal_snapshots() -> None:
    assert internal_refusal(_domain(QCOW2 + CDROM)) is None


def test_a_raw_disk_is_refused_with_its_name_and_what_would_work() -> None:
    why = internal_refusal(_domain(QCOW2 + RAW))
    assert why is not None and "vdb" in why and "qcow2 would work" in why


def test_uefi_is_refused() -> None:
    uefi = "<os><type>hvm</type><loader readonly='yes' type='pflash'>/x.fd</loader></os>"
    why = internal_refusal(_domain(QCOW2, uefi))
    assert why is not None and "UEFI" in why


def test_a_diskless_vm_is_refused() -> None:
    why = internal_refusal(_domain(""))
    assert why is not None and "no disk" in why


def test_names() -> None:
    assert check_name(default_name()).startswith("kvmctl-")
    for bad in ("", "a b", "-x", "x" * 101, "a/b", "<x>"):
        with pytest.raises(UsageError):
            check_name(bad)


# ---- the plan knows about snapshots (the test driver keeps real snapshot metadata) ------------

def test_a_vm_with_snapshots_is_not_deleted_without_the_flag_nor_its_disks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli_support import run_cli
    from manifest_docs import disk, doc, pool
    from testdriver import install, write_manifests
    hv, uri = install(monkeypatch, tmp_path)
    try:
        docs = [pool("s-pool", tmp_path / "pool"),
                disk("s-data", "s-pool", "16MiB", format="qcow2"),
                doc("VirtualMachine", "s-vm", {"memory": "128MiB", "state": "stopped",
                                               "boot": {"kernel": "/k", "cmdline": "x"},
                                               "disks": [{"disk": "s-data"}]})]
        path = write_manifests(tmp_path / "m.yaml", docs)

        def cli(*argv: object) -> Any:
            return run_cli([str(argv[0]), "--connect", uri, "--project", "unit",
                            "--domain-type", "qemu", *[str(a) for a in argv[1:]]])

        assert cli("apply", "-y", "-f", path).code == 0
        dom = hv.conn.lookupByName("s-vm")
        for name in ("a", "b"):
            dom.snapshotCreateXML(f"<domainsnapshot><name>{name}</name></domainsnapshot>", 0)
        listed = cli("get", "snapshots", "-o", "json")
        assert listed.code == 0, listed
        assert [(r["vm"], r["name"], r["owned"]) for r in json.loads(listed.stdout)] == [
            ("s-vm", "a", False), ("s-vm", "b", False)]
        kept = cli("destroy", "-y", "--with-disks", "-f", path)
        assert "has 2 snapshots: deleting it loses them (--allow-snapshot-loss)" in kept.stderr
        assert "used by VM s-vm, which is not deleted" in kept.stderr
        assert {d.name() for d in hv.conn.listAllDomains()} == {"s-vm"}
        gone = cli("destroy", "-y", "--with-disks", "--allow-snapshot-loss", "-f", path)
        assert gone.code == 0, gone
        assert hv.conn.listAllDomains() == []
    finally:
        hv.close()
