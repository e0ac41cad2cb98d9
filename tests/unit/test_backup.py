"""`kvmctl backup` and `kvmctl restore` without a daemon: backup.json read back as hostile input,
checksums, the definition edits of a restore, the streams into and out of files (fake libvirt
streams), the restore's checks against libvirt's test driver, progress lines, and the CLI's
refusals (never a traceback).

Against the real libvirtd (the backup API, two hosts): tests/integration/test_backup.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lxml import etree
from test_transfer_streams import FakeStream

from kvmctl import backup as b
from kvmctl.backup import restore as r
from kvmctl.backup import write as w
from kvmctl.cli.backups import TransferView
from kvmctl.cli.report import Env
from kvmctl.errors import HypervisorError, PlanError, UsageError
from kvmctl.host import backupio, transfer
from kvmctl.host.ownership import owner_from_xml
from kvmctl.kinds import NAMESPACE

SHA_A = "a" * 64


def _disk(target: str = "vda", **over: Any) -> b.BackupFile:
    role = b.DiskRole(target, "disk", "pool1", f"web-{target}.qcow2", "qcow2", 1 << 20,
                      b.READ_BACKUP_API, owner=b.VolumeOwner("Disk", f"web-{target}", "h", False))
    return b.BackupFile(f"disk-{target}.qcow2", b.ROLE_DISK, 10, SHA_A,
                        dataclasses.replace(role, **over))


def _manifest(*files: b.BackupFile, **over: Any) -> b.BackupManifest:
    m = b.BackupManifest(1, "0.1.0", "web", "proj", "h1", "qemu:///system",
                         "2025-01-01T00:00:00Z", "running", b.CONSISTENCY_BACKUP_API, False,
                         (b.BackupFile(b.DOMAIN_FILE, b.ROLE_DOMAIN, 5, SHA_A),
                          *(files or (_disk(),))))
    return dataclasses.replace(m, **over)


def _raw(m: b.BackupManifest | None = None) -> dict[str, Any]:
    return json.loads((m or _manifest()).to_json())


def _parse(raw: Any) -> b.BackupManifest:
    return b.parse_manifest(json.dumps(raw).encode(), "/x/backup.json")


# ---- backup.json --------------------------------------------------------------------------------

def test_the_manifest_round_trips() -> None:
    m = _manifest(_disk("vda"), _disk("sda", device="cdrom", readonly=True, owner=None,
                                      read=b.READ_DIRECT, backing_path="/base.qcow2"),
                  notes=("a note",))
    assert b.parse_manifest(m.to_json().encode(), "backup.json") == m


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".", ".hidden", "",
                                  "x\0y", "x\ny", "dir/../../etc/shadow", "a" * 300, "é.raw",
                                  "backup.json", "SHA256SUMS"])
def test_a_file_name_that_is_not_a_plain_name_is_refused(name: str) -> None:
    raw = _raw()
    raw["files"][1]["name"] = name
    with pytest.raises(UsageError) as err:
        _parse(raw)
    assert "/x/backup.json" in str(err.value)


@pytest.mark.parametrize("path, value, field", [
    (("version",), "1", "version"),
    (("version",), True, "version"),
    (("vm",), 3, "vm"),
    (("vm",), "a/b", "vm"),
    (("vm",), "x\u0001", "vm"),
    (("state",), "exploded", "state"),
    (("consistency",), "magic", "consistency"),
    (("files",), {}, "files"),
    (("files",), [], "files"),
    (("files", 1, "length"), -1, "length"),
    (("files", 1, "length"), 1.5, "length"),
    (("files", 1, "length"), "10", "length"),
    (("files", 1, "sha256"), "A" * 64, "sha256"),
    (("files", 1, "sha256"), "abc", "sha256"),
    (("files", 1, "role"), "binary", "role"),
    (("files", 1, "disk"), None, "disk"),
    (("files", 1, "disk", "target"), "../vda", "target"),
    (("files", 1, "disk", "pool"), "../../p", "pool"),
    (("files", 1, "disk", "volume"), "..", "volume"),
    (("files", 1, "disk", "volume"), "/etc/passwd", "volume"),
    (("files", 1, "disk", "format"), "qcow2\"/><x", "format"),
    (("files", 1, "disk", "capacity_bytes"), 0, "capacity_bytes"),
    (("files", 1, "disk", "readonly"), "yes", "readonly"),
    (("files", 1, "disk", "backing_path"), "relative.qcow2", "backing_path"),
    (("files", 1, "disk", "owner"), [], "owner"),
    (("files", 1, "disk", "read"), "guess", "read"),
    (("source",), "h1", "source"),
    (("in_manifests",), True, "in_manifests"),
    (("notes",), [1], "notes"),
])
def test_a_wrong_field_is_refused_naming_it(path: tuple[Any, ...], value: Any,
                                            field: str) -> None:
    raw = _raw()
    here = raw
    for key in path[:-1]:
        here = here[key]
    here[path[-1]] = value
    with pytest.raises(UsageError) as err:
        _parse(raw)
    assert "/x/backup.json" in str(err.value) and field in str(err.value)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100000,
                                  b'{"format": "something-else"}'])
def test_broken_json_is_refused(data: bytes) -> None:
    with pytest.raises(UsageError, match="backup.json"):
        b.parse_manifest(data, "backup.json")


def test_a_newer_format_asks_for_a_newer_kvmctl() -> None:
    raw = _raw()
    raw["version"] = 99
    with pytest.raises(UsageError, match="newer kvmctl"):
        _parse(raw)


def test_duplicates_and_missing_roles_are_refused() -> None:
    raw = _raw()
    raw["files"].append(dict(raw["files"][1]))
    with pytest.raises(UsageError, match="listed twice"):
        _parse(raw)
    raw = _raw()
    raw["files"] = raw["files"][1:]
    with pytest.raises(UsageError, match="exactly one domain file"):
        _parse(raw)
    raw = _raw(_manifest(_disk("vda"), dataclasses.replace(_disk("vda"), name="other.qcow2")))
    with pytest.raises(UsageError, match="same disk target"):
        _parse(raw)


# ---- the files ----------------------------------------------------------------------------------

def _backup_dir(tmp_path: Path, content: bytes = b"disk bytes" * 1000, pool: str = "pool1"
                ) -> tuple[Path, Any]:
    (tmp_path / "domain.xml").write_bytes(b"<domain/>")
    (tmp_path / "disk-vda.qcow2").write_bytes(content)
    files = (b.BackupFile("domain.xml", b.ROLE_DOMAIN, 9,
                          hashlib.sha256(b"<domain/>").hexdigest()),
             dataclasses.replace(_disk(pool=pool), length=len(content),
                                 sha256=hashlib.sha256(content).hexdigest()))
    m = dataclasses.replace(_manifest(), files=files)
    (tmp_path / "backup.json").write_text(m.to_json())
    return tmp_path, m


def test_a_backup_directory_reads_and_verifies(tmp_path: Path) -> None:
    folder, m = _backup_dir(tmp_path)
    assert r.read_backup(str(folder)) == m
    seen: list[b.ProgressEvent] = []
    r.verify(str(folder), m, seen.append)
    assert [e.item for e in seen if e.finished] == ["domain.xml", "disk-vda.qcow2"]


def test_one_changed_byte_is_found_and_named(tmp_path: Path) -> None:
    folder, m = _backup_dir(tmp_path)
    path = folder / "disk-vda.qcow2"
    data = bytearray(path.read_bytes())
    data[1234] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"disk-vda\.qcow2: its SHA-256 .* nothing was restored"):
        r.verify(str(folder), m)


def test_a_truncated_file_is_found_and_named(tmp_path: Path) -> None:
    folder, m = _backup_dir(tmp_path)
    path = folder / "disk-vda.qcow2"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UsageError, match=r"disk-vda\.qcow2: 9999 bytes.*cut short"):
        r.verify(str(folder), m)


def test_a_missing_file_and_a_symbolic_link_are_refused(tmp_path: Path) -> None:
    folder, m = _backup_dir(tmp_path)
    (folder / "disk-vda.qcow2").unlink()
    with pytest.raises(UsageError, match=r"disk-vda\.qcow2: cannot open it"):
        r.verify(str(folder), m)
    (folder / "disk-vda.qcow2").symlink_to("/etc/passwd")
    with pytest.raises(UsageError, match=r"disk-vda\.qcow2: cannot open it"):
        r.verify(str(folder), m)


def test_a_directory_that_is_no_backup_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such directory"):
        r.read_backup(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="backup.json: missing"):
        r.read_backup(str(tmp_path))
    (tmp_path / "backup.json").symlink_to("/etc/passwd")
    with pytest.raises(UsageError, match="backup.json: cannot open it"):
        r.read_backup(str(tmp_path))


def test_a_sparse_file_hashes_as_its_logical_content(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(8 << 20)
        f.write(b"tail")
        f.truncate(16 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        length, digest = b.file_digest(fd)
        pieces = list(backupio.read_pieces(fd, os.fstat(fd).st_size, str(path)))
    finally:
        os.close(fd)
    assert length == 16 << 20
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert any(isinstance(p, int) for p in pieces)  # the holes are holes, not read
    assert sum(p if isinstance(p, int) else len(p) for p in pieces) == 16 << 20


# ---- the definition -----------------------------------------------------------------------------

DOMAIN = f"""<domain type="qemu">
  <name>web</name>
  <uuid>0b5a3a3e-1111-2222-3333-444444444444</uuid>
  <title>web (kvmctl project old)</title>
  <metadata>
    <kvmctl:resource xmlns:kvmctl="{NAMESPACE}">
      <kvmctl:project>old</kvmctl:project>
      <kvmctl:kind>VirtualMachine</kvmctl:kind>
      <kvmctl:name>web</kvmctl:name>
      <kvmctl:spec-hash>abc</kvmctl:spec-hash>
    </kvmctl:resource>
    <kvmctl-def:definition xmlns:kvmctl-def="https://kvmctl.dev/xmlns/definition/v1"
      desired="{'1' * 64}" rendered="{'2' * 64}" defined="{'3' * 64}"/>
  </metadata>
  <memory unit="KiB">131072</memory>
  <devices>
    <disk type="volume" device="disk">
      <driver name="qemu" type="qcow2"/>
      <source pool="pool1" volume="web-vda.qcow2"/>
      <backingStore type="file"><source file="/base.qcow2"/></backingStore>
      <target dev="vda" bus="virtio"/>
    </disk>
    <disk type="file" device="disk">
      <driver name="qemu" type="raw"/>
      <source file="/old/place/data.raw"/>
      <target dev="vdb" bus="virtio"/>
    </disk>
    <disk type="file" device="cdrom">
      <source file="/isos/install.iso"/>
      <target dev="sda" bus="scsi"/>
      <readonly/>
    </disk>
    <interface type="network">
      <mac address="52:54:00:12:34:56"/>
      <source network="default"/>
    </interface>
  </devices>
</domain>
"""

VOLUMES = {"vda": ("pool2", "copy-vda.qcow2", "/p2/copy-vda.qcow2"),
           "vdb": ("pool2", "copy-vdb.raw", "/p2/copy-vdb.raw")}


def test_a_copy_gets_its_name_new_volumes_no_uuid_and_no_macs() -> None:
    xml = r.restored_xml(DOMAIN, name="copy", project="proj", volumes=VOLUMES, keep_macs=False)
    root = etree.fromstring(xml.encode())
    assert root.findtext("name") == "copy"
    assert root.find("uuid") is None
    assert root.findtext("title") == "copy (kvmctl project proj)"
    owner = owner_from_xml(xml)
    assert owner is not None and (owner.project, owner.name, owner.spec_hash) == \
        ("proj", "copy", "abc")
    assert "kvmctl-def" not in xml and "definition/v1" not in xml  # its record proves nothing
    disks = root.findall("devices/disk")
    assert disks[0].find("source").attrib == {"pool": "pool2", "volume": "copy-vda.qcow2"}
    assert disks[0].find("backingStore") is None
    assert disks[1].find("source").attrib == {"file": "/p2/copy-vdb.raw"}
    assert disks[2].find("source").get("file") == "/isos/install.iso"  # not restored: as is
    assert root.find("devices/interface/mac") is None
    assert root.find("devices/interface/source").get("network") == "default"


def test_a_same_name_restore_keeps_the_macs() -> None:
    xml = r.restored_xml(DOMAIN, name="web", project="proj", volumes=VOLUMES, keep_macs=True)
    root = etree.fromstring(xml.encode())
    assert root.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"
    assert root.findtext("name") == "web" and root.find("uuid") is None


def test_a_definition_without_kvmctls_mark_gets_one() -> None:
    foreign = "<domain type='qemu'><name>x</name><devices/></domain>"
    xml = r.restored_xml(foreign, name="y", project="proj", volumes={}, keep_macs=True)
    owner = owner_from_xml(xml)
    assert owner is not None and (owner.project, owner.kind, owner.name) == \
        ("proj", "VirtualMachine", "y")


@pytest.mark.parametrize("xml", ["not xml", "<network/>", "<domain><devices/></domain>",
                                 '<!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                                 "<domain><name>&e;</name></domain>"])
def test_a_broken_definition_is_refused(xml: str) -> None:
    with pytest.raises(UsageError, match="domain.xml"):
        r.restored_xml(xml, name="y", project="p", volumes={}, keep_macs=True)


@pytest.mark.parametrize("volume, old, new, target, expected", [
    ("web-root.qcow2", "web", "web", "vda", "web-root.qcow2"),
    ("web-root.qcow2", "web", "db", "vda", "db-root.qcow2"),
    ("web-cidata.iso", "web", "db", "sda", "db-cidata.iso"),
    ("data.raw", "web", "db", "vdb", "db-vdb.raw"),
    ("noext", "web", "db", "vdb", "db-vdb.raw"),
    ("web", "web", "db", "vdb", "db-vdb.raw"),
])
def test_volume_names_of_a_copy(volume: str, old: str, new: str, target: str,
                                expected: str) -> None:
    assert r.restored_volume_name(volume, old, new, target, "raw") == expected


# ---- the restore's checks (libvirt's test driver) ----------------------------------------------

@pytest.fixture
def test_host() -> Any:
    from kvmctl.host.hypervisor import Hypervisor
    hv = Hypervisor("test:///default")
    yield hv
    hv.close()


def test_an_existing_vm_and_a_missing_pool_are_refused_together(test_host: Any) -> None:
    m = _manifest(_disk("vda", pool="nopool"), vm="test")
    with pytest.raises(PlanError) as err:
        r.plan_restore(test_host, m, "proj", "h2")
    text = str(err.value)
    assert "a VM 'test' exists on h2 already" in text
    assert "create StoragePool nopool on h2 first (kvmctl apply)" in text
    assert "nothing was changed" in text


def test_a_copy_under_a_new_name_is_planned_with_its_names_and_owners(test_host: Any) -> None:
    m = _manifest(_disk("vda", pool="default-pool"),
                  _disk("sda", pool="default-pool", device="cdrom", volume="web-cidata.iso",
                        owner=b.VolumeOwner("CloudInitSeed", "web")), vm="web")
    plan = r.plan_restore(test_host, m, "proj", "h2", new_name="db", start=True)
    assert plan.name == "db" and not plan.keep_macs
    assert [(v.volume, str(v.owner.kind), v.owner.name) for v in plan.volumes] == \
        [("db-vda.qcow2", "Disk", "db-vda"), ("db-cidata.iso", "CloudInitSeed", "db")]
    assert plan.start  # it ran when it was backed up
    stopped = r.plan_restore(test_host, dataclasses.replace(m, state="shutoff"), "proj", "h2",
                             new_name="db", start=True)
    assert not stopped.start and "not started" in stopped.notes[0]


def test_an_existing_volume_is_refused(test_host: Any) -> None:
    pool = test_host.conn.storagePoolLookupByName("default-pool")
    vol = pool.createXML("<volume><name>taken-vda.qcow2</name><capacity>1024</capacity>"
                         "</volume>", 0)
    try:
        m = _manifest(_disk("vda", pool="default-pool", volume="taken-vda.qcow2"), vm="taken")
        with pytest.raises(PlanError, match="volume taken-vda.qcow2 exists in pool "
                                            "default-pool"):
            r.plan_restore(test_host, m, "proj", "h2")
    finally:
        vol.delete(0)


@pytest.mark.parametrize("name", ["../x", "UPPER", "", "a b", "x" * 64])
def test_a_new_name_kvmctl_would_not_give_is_refused(test_host: Any, name: str) -> None:
    with pytest.raises(UsageError, match="--name"):
        r.plan_restore(test_host, _manifest(), "proj", "h2", new_name=name)


# ---- streams into and out of files (fake libvirt) ----------------------------------------------

class FakeVolume:
    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream

    def download(self, stream: Any, offset: int, length: int, flags: int) -> None:
        assert flags == transfer.DOWNLOAD_SPARSE

    def upload(self, stream: Any, offset: int, length: int, flags: int) -> None:
        assert flags == transfer.UPLOAD_SPARSE


class FakeHost:
    """What backupio asks of a Hypervisor: one pool, volumes whose streams are FakeStreams."""

    def __init__(self, pieces: list[bytes | int] = (), fail_after: int | None = None) -> None:
        self.uri = "fake://host"
        self.stream = FakeStream(pieces)
        self.stream.finish = lambda: None  # type: ignore[attr-defined]
        if fail_after is not None:
            real = self.stream.send

            def send(data: bytes) -> int:
                if len(self.stream.sent) >= fail_after:
                    raise HypervisorError("the host went away")
                return real(data)
            self.stream.send = send  # type: ignore[method-assign]
        self.conn = SimpleNamespace(newStream=lambda flags: self.stream)
        self.volumes: set[str] = set()
        self.deleted: list[str] = []
        pool = SimpleNamespace(isActive=lambda: True,
                               storageVolLookupByName=lambda n: FakeVolume(self.stream),
                               createXML=lambda xml, flags: self.volumes.add("new"))
        self._pool_obj = lambda name: pool
        self._vol = lambda pool_name, name: FakeVolume(self.stream)

    def volume_exists(self, pool: str, name: str) -> bool:
        return name in self.volumes

    def delete_volume(self, pool: str, name: str) -> None:
        self.deleted.append(name)


def test_a_download_writes_holes_as_seeks(tmp_path: Path) -> None:
    pieces: list[bytes | int] = [b"A" * 4096, 64 << 20, b"B" * 4096, 32 << 20]
    host: Any = FakeHost(pieces)
    out = tmp_path / "disk.raw"
    seen: list[int] = []
    got = backupio.download_to_file(host, "pool", "vol", str(out), seen.append)
    expected = b"A" * 4096 + bytes(64 << 20) + b"B" * 4096 + bytes(32 << 20)
    assert got == backupio.FileDigest(len(expected), hashlib.sha256(expected).hexdigest())
    assert out.stat().st_size == len(expected)
    assert out.stat().st_blocks * 512 < 1 << 20  # the 96 MiB of holes were not written
    assert out.read_bytes() == expected
    assert seen[-1] == len(expected)


def test_a_failed_download_leaves_no_file(tmp_path: Path) -> None:
    host: Any = FakeHost([b"x" * 10])
    host.stream.recvFlags = lambda n, f: (_ for _ in ()).throw(HypervisorError("gone"))
    out = tmp_path / "disk.raw"
    with pytest.raises(HypervisorError, match="gone"):
        backupio.download_to_file(host, "pool", "vol", str(out))
    assert not out.exists() and host.stream.aborted


def test_a_download_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "disk.raw"
    out.write_bytes(b"keep")
    with pytest.raises(HypervisorError, match="cannot create"):
        backupio.download_to_file(FakeHost([b"x"]), "pool", "vol", str(out))  # type: ignore
    assert out.read_bytes() == b"keep"


def test_an_upload_sends_holes_as_holes(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.write(b"A" * 4096)
        f.seek(16 << 20)
        f.write(b"B" * 4096)
        f.truncate(32 << 20)
    host: Any = FakeHost()
    got = backupio.upload_from_file(host, "pool", "new", "<volume/>", str(path))
    assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    kinds = [kind for kind, _ in host.stream.sent]
    assert "hole" in kinds
    data = sum(len(v) for kind, v in host.stream.sent if kind == "data")
    assert data < 1 << 20


def test_a_failed_upload_removes_the_volume_it_made(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(3 << 20))
    host: Any = FakeHost(fail_after=1)
    with pytest.raises(HypervisorError, match="went away"):
        backupio.upload_from_file(host, "pool", "new", "<volume/>", str(path))
    assert host.deleted == ["new"] and host.stream.aborted


def test_an_upload_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"x")
    host: Any = FakeHost()
    host.volumes.add("old")
    with pytest.raises(HypervisorError, match="exists already"):
        backupio.upload_from_file(host, "pool", "old", "<volume/>", str(path))
    assert host.deleted == []


# ---- backup: the directory, the manifests ------------------------------------------------------

def test_a_backup_goes_into_a_new_or_empty_directory_only(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        w._prepare(str(tmp_path / "full"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        w._prepare(str(tmp_path / "file"))
    with pytest.raises(UsageError, match="parent .* does not exist"):
        w._prepare(str(tmp_path / "a" / "b"))
    (tmp_path / "empty").mkdir()
    assert w._prepare(str(tmp_path / "empty")) is False
    assert w._prepare(str(tmp_path / "new")) is True


def test_the_vms_documents_are_its_vm_and_its_disks(tmp_path: Path) -> None:
    from kvmctl.manifest import documents
    text = """
apiVersion: kvmctl/v1
kind: Disk
metadata: {name: web-root}
spec: {pool: p, size: 1GiB}
---
apiVersion: kvmctl/v1
kind: Disk
metadata: {name: other}
spec: {pool: p, size: 1GiB}
---
apiVersion: kvmctl/v1
kind: VirtualMachine
metadata: {name: web}
spec: {memory: 1GiB, disks: [{disk: web-root}]}
"""
    (tmp_path / "m.yaml").write_text(text)
    docs = documents.load([str(tmp_path / "m.yaml")])
    chosen = w.vm_documents(docs, "web")
    assert [(d.kind, d.name) for d in chosen] == [("VirtualMachine", "web"), ("Disk", "web-root")]
    assert w.vm_documents(docs, "nope") == []
    import yaml
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(w.manifests_yaml(chosen))] == \
        ["web", "web-root"]


def test_sha256sums_is_what_sha256sum_reads() -> None:
    m = _manifest()
    lines = b.sums_text(m.files, "b" * 64).splitlines()
    assert lines[0] == f"{SHA_A}  domain.xml" and lines[-1] == f"{'b' * 64}  backup.json"


# ---- progress -----------------------------------------------------------------------------------

def test_plain_progress_is_a_line_per_tenth_at_most() -> None:
    err = io.StringIO()
    view = TransferView(Env(io.StringIO(), io.StringIO(), err))
    total = 1000
    for done in range(0, total + 1, 7):
        view.event(b.ProgressEvent("download", "disk-vda.raw", done, total))
    view.event(b.ProgressEvent("download", "disk-vda.raw", total, total, finished=True))
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("download disk-vda.raw: ")
    assert "done" in lines[-1] and "MB/s" in lines[-1]
    assert len(lines) <= 11
    assert all("% (" in line for line in lines[1:-1])


# ---- the CLI: refusals without a traceback ------------------------------------------------------

def _cli(*argv: str) -> tuple[int, str, str]:
    from kvmctl.cli.main import run
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), Env(io.StringIO(), out, err))
    return code, out.getvalue(), err.getvalue()


def test_restore_of_a_damaged_backup_names_the_file(tmp_path: Path) -> None:
    code, _, err = _cli("restore", str(tmp_path / "nope"), "--connect", "test:///default")
    assert code != 0 and "nope: no such directory" in err and "Traceback" not in err
    (tmp_path / "backup.json").write_text('{"format": "kvmctl-backup", "version": 1, "files": ')
    code, _, err = _cli("restore", str(tmp_path), "--connect", "test:///default", "-y")
    assert code != 0 and f"{tmp_path}/backup.json: not valid JSON" in err
    assert "internal error" not in err


def test_restore_refuses_a_tampered_file_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmctl.apply import lock
    monkeypatch.setattr(lock, "LOCK_DIR", str(tmp_path / "locks"))
    (tmp_path / "b").mkdir()
    folder, _ = _backup_dir(tmp_path / "b", pool="default-pool")
    data = bytearray((folder / "disk-vda.qcow2").read_bytes())
    data[7] ^= 0x20
    (folder / "disk-vda.qcow2").write_bytes(bytes(data))
    code, out, err = _cli("restore", str(folder), "--connect", "test:///default", "-y")
    assert code != 0 and "disk-vda.qcow2: its SHA-256" in err, err
    assert "nothing was restored" in err and "Traceback" not in err
    assert "Restored" not in out


def test_backup_refusals(tmp_path: Path) -> None:
    code, _, err = _cli("backup", "nope", "--to", str(tmp_path / "b"), "--connect",
                        "test:///default")
    assert code != 0 and "no VM 'nope'" in err
    assert not (tmp_path / "b").exists()  # what it made is gone again
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    code, _, err = _cli("backup", "test", "--to", str(tmp_path / "full"), "--connect",
                        "test:///default")
    assert code != 0 and "not empty" in err
    code, _, _ = _cli("backup", "test", "--connect", "test:///default")
    assert code == 2  # argparse: --to is required


def test_a_restored_copy_never_shares_the_originals_nvram_or_an_unrestored_disk() -> None:
    uefi = DOMAIN.replace("<devices>", "<devices>", 1).replace(
        "</name>", "</name><os firmware='efi'><type>hvm</type>"
        "<nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>", 1)
    xml = r.restored_xml(uefi, name="copy", project="proj", volumes=VOLUMES, keep_macs=False)
    assert "web_VARS.fd" not in xml and "<nvram" not in xml
    lv = DOMAIN.replace("</devices>", "<disk type='block' device='disk'><source "
                        "dev='/dev/vg0/data'/><target dev='vdc' bus='virtio'/></disk>"
                        "</devices>")
    with pytest.raises(PlanError, match="vdc is not in the backup"):
        r.restored_xml(lv, name="copy", project="proj", volumes=VOLUMES, keep_macs=False)
