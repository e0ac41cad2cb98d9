"""`kvmctl import` without a daemon: importer.select/build/prove on the live state of libvirt's
test driver (tests/unit/testdriver.py) and the CLI run against it, and xmledit's unmanaged
elements read from data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
import yaml
from lxml import etree

from kvmctl import importer
from kvmctl.kinds import Kind
from kvmctl.plan import xmledit

PROJECT = "unit"

POOL = "<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
VOLUME = ("<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
          "<target><format type='{fmt}'/></target></volume>")
NETWORK = ("<network><name>{name}</name><forward mode='nat'/>"
           "<ip address='10.77.{n}.1' prefix='24'><dhcp>"
           "<range start='10.77.{n}.100' end='10.77.{n}.199'/></dhcp></ip></network>")
# The machine is written out as libvirt's qemu driver always does (the test driver leaves it
# out, and an import would then rightly refuse the VM: its manifest would add one).
DOMAIN = """<domain type='qemu'><name>{name}</name>
<memory unit='KiB'>{max_kib}</memory><currentMemory unit='KiB'>{kib}</currentMemory>
<vcpu placement='static' current='1'>2</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>/boot/k</kernel>
<cmdline>console=ttyS0</cmdline></os>
<devices>{devices}</devices></domain>"""
VOL_DISK = ("<disk type='volume' device='disk'><driver name='qemu' type='{fmt}'/>"
            "<source pool='{pool}' volume='{vol}'/><target dev='{dev}' bus='virtio'/></disk>")
FILE_DISK = ("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
             "<source file='{path}'/><target dev='{dev}' bus='virtio'/></disk>")
NIC = "<interface type='network'><source network='{net}'/><model type='virtio'/></interface>"
WATCHDOG = "<watchdog model='i6300esb' action='reset'/>"
CHANNEL = "<channel type='unix'><target type='virtio' name='org.example.0'/></channel>"


class Host:
    """A test-driver host the CLI's `import` (and every other command) reads."""

    def __init__(self, hv: Any, uri: str, folder: Path) -> None:
        self.hv, self.uri, self.folder = hv, uri, folder
        self.conn = hv.conn

    def pool(self, name: str, autostart: bool = False) -> Path:
        path = self.folder / f"pool-{name}"
        path.mkdir()
        p = self.conn.storagePoolDefineXML(POOL.format(name=name, path=path))
        p.create()
        p.setAutostart(int(autostart))
        return path

    def volume(self, pool: str, name: str, size: int, fmt: str = "qcow2") -> None:
        self.conn.storagePoolLookupByName(pool).createXML(
            VOLUME.format(name=name, size=size, fmt=fmt))

    def network(self, name: str, n: int = 1, autostart: bool = False) -> None:
        net = self.conn.networkDefineXML(NETWORK.format(name=name, n=n))
        net.create()
        net.setAutostart(int(autostart))

    def domain(self, name: str, devices: str = "", kib: int = 131072,
               max_kib: int = 262144) -> None:
        self.conn.defineXML(DOMAIN.format(name=escape(name), devices=devices, kib=kib,
                                          max_kib=max_kib))

    def xml(self, name: str) -> str:
        return str(self.conn.lookupByName(name).XMLDesc(2))  # VIR_DOMAIN_XML_INACTIVE

    def cli(self, *argv: object) -> Any:
        from cli_support import run_cli
        if argv[0] == "validate":
            return run_cli([str(a) for a in argv])
        return run_cli([str(argv[0]), "--connect", self.uri, "--project", PROJECT,
                        "--domain-type", "qemu", *[str(a) for a in argv[1:]]])

    def import_(self, out: Path, *argv: object) -> Any:
        return self.cli("import", "--out", out, *argv)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    from testdriver import install
    hv, uri = install(monkeypatch, tmp_path)
    # `import` opens its Hypervisor itself: it must be this test's host too.
    monkeypatch.setattr("kvmctl.host.hypervisor.Hypervisor", lambda _uri: hv)
    yield Host(hv, uri, tmp_path)


def _lab(host: Host, devices: str = "") -> None:
    """A pool (autostart on) with a qcow2 and a raw volume, a network (autostart off), a VM."""
    host.pool("imgs", autostart=True)
    host.volume("imgs", "root.qcow2", 64 * 1024 * 1024)
    host.volume("imgs", "data.raw", 3 * 1024 * 1024 * 1024 // 2, fmt="raw")
    host.network("lan")
    host.domain("vm1", VOL_DISK.format(fmt="qcow2", pool="imgs", vol="root.qcow2", dev="vda")
                + VOL_DISK.format(fmt="raw", pool="imgs", vol="data.raw", dev="vdb")
                + NIC.format(net="lan") + devices)


def _build(host: Host, wanted: list[str], everything: bool = False, follow: bool = True,
           keep: bool = False) -> importer.Imported:
    live = host.hv.read()
    picked, missing = importer.select(live, wanted, everything, follow)
    assert missing == []
    return importer.build(live, picked, keep)


def _by_ref(docs: Any) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _read(folder: Path) -> dict[str, dict[str, Any]]:
    docs = [d for f in sorted(folder.glob("*.yaml")) for d in
            yaml.safe_load_all(f.read_text(encoding="utf-8")) if d]
    return _by_ref(d for d in docs if d["kind"] != "Project")


# ---- build: values in the manifest's own terms ----------------------------------------------

def test_a_vm_brings_its_pool_disks_and_network_in_apply_order(host: Host) -> None:
    _lab(host)
    got = _build(host, ["VirtualMachine/vm1"])
    assert got.refs == ["StoragePool/imgs", "Disk/data", "Disk/root", "Network/lan",
                        "VirtualMachine/vm1"] or got.refs == [
        "StoragePool/imgs", "Disk/root", "Disk/data", "Network/lan", "VirtualMachine/vm1"]
    assert not got.unmanaged and not got.notes and not got.refused
    alone = _build(host, ["VirtualMachine/vm1"], follow=False)
    assert [r for r in alone.refs if not r.startswith("Disk/")] == ["VirtualMachine/vm1"]


def test_sizes_with_units_macs_written_and_autostart_explicit(host: Host) -> None:
    _lab(host)
    docs = _by_ref(_build(host, [], everything=True).documents)
    assert docs["Disk/root"]["spec"] == {"pool": "imgs", "size": "64MiB", "format": "qcow2"}
    assert docs["Disk/data"]["spec"]["size"] in ("1.5GiB", "1536MiB")
    assert docs["Disk/data"]["spec"]["format"] == "raw"
    vm = docs["VirtualMachine/vm1"]["spec"]
    assert vm["memory"] == {"size": "128MiB", "max": "256MiB"}
    assert vm["cpus"] == {"count": 1, "max": 2}
    assert vm["machine"] == "q35"
    mac = etree.fromstring(host.xml("vm1").encode()).find("devices/interface/mac")
    assert mac is not None and vm["interfaces"] == [{"network": "lan",
                                                     "mac": mac.get("address").lower()}]
    assert vm["disks"] == [{"disk": "root"}, {"disk": "data"}]
    # Both written out, also the network's false (kvmctl's default is true) and the pool's true.
    assert docs["StoragePool/imgs"]["spec"]["autostart"] is True
    assert docs["Network/lan"]["spec"]["autostart"] is False
    assert docs["Network/lan"]["spec"]["ipv4"] == {
        "cidr": "10.77.1.0/24", "dhcp": {"start": "10.77.1.100", "end": "10.77.1.199"}}


def test_the_documents_are_proven_to_change_nothing(host: Host) -> None:
    _lab(host)
    live = host.hv.read()
    got = _build(host, [], everything=True)
    assert importer.prove(importer.adopt_plan(list(got.documents), live, PROJECT, "qemu")) == {}


def test_the_proof_names_a_field_the_documents_would_change(host: Host) -> None:
    _lab(host)
    live = host.hv.read()
    docs = [dict(d) for d in _build(host, [], everything=True).documents]
    vm = next(d for d in docs if d["kind"] == "VirtualMachine")
    vm["spec"] = {**vm["spec"], "memory": {"size": "192MiB", "max": "256MiB"}}
    pool = next(d for d in docs if d["kind"] == "StoragePool")
    pool["spec"] = {**pool["spec"], "autostart": False}
    proof = importer.prove(importer.adopt_plan(docs, live, PROJECT, "qemu"))
    assert set(proof) == {"VirtualMachine/vm1", "StoragePool/imgs"}, proof
    assert any(w.startswith("memory") for w in proof["VirtualMachine/vm1"]), proof
    assert any("autostart" in w for w in proof["StoragePool/imgs"]), proof


def test_a_disk_outside_any_pool_is_reported_with_the_pool_that_would_cover_it(
        host: Host) -> None:
    host.domain("loose", FILE_DISK.format(path="/srv/vm images/loose.raw", dev="vda"))
    got = _build(host, ["VirtualMachine/loose"])
    assert any("/srv/vm images/loose.raw is in no pool" in n
               and "spec: {type: dir, path: /srv/vm images}" in n for n in got.notes), got.notes
    assert "VirtualMachine/loose" in got.refused
    assert "VirtualMachine/loose" not in got.refs


def test_a_volume_not_named_name_format_is_reported(host: Host) -> None:
    host.pool("imgs")
    host.volume("imgs", "disk0.img", 8 * 1024 * 1024, fmt="raw")
    host.domain("odd", VOL_DISK.format(fmt="raw", pool="imgs", vol="disk0.img", dev="vda"))
    got = _build(host, ["VirtualMachine/odd"])
    assert any("imgs/disk0.img" in n and "NAME.FORMAT" in n and "vol-clone disk0.img "
               "NAME.raw --pool imgs" in n for n in got.notes), got.notes
    assert "VirtualMachine/odd" in got.refused
    assert not [r for r in got.refs if r.startswith("Disk/")]


# ---- what the manifests cannot express ------------------------------------------------------

UNMODELLED = f"""<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
<name>odd</name><memory unit='KiB'>131072</memory>
<os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
<devices>
  <hostdev mode='subsystem' type='pci' managed='yes'><source>
    <address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>
  {WATCHDOG}
  <filesystem type='mount' accessmode='passthrough'><source dir='/srv/share'/>
    <target dir='share'/></filesystem>
  <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  {CHANNEL}
  <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
</devices>
<qemu:commandline><qemu:arg value='-no-hpet'/></qemu:commandline>
</domain>"""


def test_every_unmodelled_element_is_listed_with_its_path() -> None:
    found = importer.unmanaged_elements("VirtualMachine/odd", UNMODELLED)
    paths = [u.path for u in found]
    assert paths == ["/domain/devices/hostdev[1]", "/domain/devices/watchdog[1]",
                     "/domain/devices/filesystem[1]", "/domain/devices/channel[2]",
                     "/domain/devices/channel[3]", "/domain/qemu:commandline[1]"], paths
    assert all(u.ref == "VirtualMachine/odd" for u in found)
    by_path = {u.path: u for u in found}
    assert "org.example.0" in by_path["/domain/devices/channel[2]"].xml
    assert "guest agent" in by_path["/domain/devices/channel[2]"].why
    assert "-no-hpet" in by_path["/domain/qemu:commandline[1]"].xml


def _exact(xml: str) -> dict[str, bytes]:
    """Each unmanaged element by path, as bytes (exclusive C14N: the namespaces a parent
    declares for the others are not part of it)."""
    return {path: etree.tostring(el, method="c14n", exclusive=True)
            for path, _, el, _ in xmledit.unmanaged(xml)}


def test_what_kvmctl_renders_is_not_unmanaged() -> None:
    from kvmctl.cli.main import run  # noqa: F401  (the CLI's modules, as render uses them)
    here = Path(__file__).resolve().parents[1] / "golden" / "render"
    for xml_file in sorted(here.glob("*/expected/VirtualMachine-*.xml")):
        assert xmledit.unmanaged(xml_file.read_text(encoding="utf-8")) == [], xml_file


def test_with_unmanaged_keeps_the_elements_byte_for_byte() -> None:
    desired = ("<domain type='kvm'><name>odd</name><devices><disk type='file'/></devices>"
               "</domain>")
    merged = xmledit.with_unmanaged(desired, UNMODELLED)
    # The same elements in the same order (the agent channel, modelled, is not copied in, so
    # the other channels' indexes are one less).
    assert list(_exact(merged).values()) == list(_exact(UNMODELLED).values())
    # ... and again over itself: nothing doubled.
    plain = DOMAIN.format(name="odd", kib=1024, max_kib=1024, devices=WATCHDOG + CHANNEL)
    once = xmledit.with_unmanaged(desired, plain)
    assert xmledit.with_unmanaged(once, plain) == once
    assert list(_exact(once).values()) == list(_exact(plain).values())
    assert "<disk type=\"file\"/>" in merged or "<disk type='file'/>" in merged


def test_an_object_with_unmanaged_elements_is_refused_by_default(host: Host) -> None:
    _lab(host, WATCHDOG + CHANNEL)
    out = host.folder / "out"
    r = host.import_(out, "VirtualMachine/vm1")
    assert r.code == 1, r
    assert "VirtualMachine/vm1: /domain/devices/watchdog[1] cannot be expressed" in r.stderr
    assert "VirtualMachine/vm1: /domain/devices/channel[1] cannot be expressed" in r.stderr
    assert "not imported: VirtualMachine/vm1: holds elements the manifests cannot express" \
        in r.stderr
    docs = _read(out)
    assert "VirtualMachine/vm1" not in docs
    assert not [ref for ref in docs if ref.startswith("Disk/")]  # only the VM used them


def test_keep_unmanaged_imports_it_and_applies_keep_the_elements(host: Host) -> None:
    _lab(host, WATCHDOG + CHANNEL)
    before = _exact(host.xml("vm1"))
    out = host.folder / "out"
    r = host.import_(out, "VirtualMachine/vm1", "--keep-unmanaged")
    assert r.code == 0, r
    assert "/domain/devices/watchdog[1] kept as it is" in r.stderr
    docs = _read(out)
    assert docs["VirtualMachine/vm1"]["spec"]["keepUnmanaged"] is True
    assert host.cli("validate", "-f", out).code == 0
    plan = host.cli("plan", "--adopt", "-f", out, "-o", "json")
    assert plan.code == 0, plan
    for c in plan.json()["changes"]:
        assert c["class"] in ("update-live", "no-op"), c
        assert {f["field"] for f in c["fields"]} <= {"metadata"}, c
    assert host.cli("apply", "-y", "--adopt", "-f", out).code == 0
    vms = out / "vms.yaml"
    vms.write_text(vms.read_text(encoding="utf-8").replace("count: 1", "count: 2"),
                   encoding="utf-8")
    applied = host.cli("apply", "-y", "--adopt", "-f", out)
    assert applied.code == 0, applied
    after_xml = host.xml("vm1")
    vcpu = etree.fromstring(after_xml.encode()).find("vcpu")
    assert vcpu is not None and vcpu.get("current", vcpu.text) == "2", after_xml
    assert _exact(after_xml) == before


def test_without_keep_unmanaged_a_plan_names_the_elements_it_would_drop(host: Host) -> None:
    _lab(host, WATCHDOG)
    out = host.folder / "out"
    assert host.import_(out, "VirtualMachine/vm1", "--keep-unmanaged").code == 0
    vms = out / "vms.yaml"
    vms.write_text(vms.read_text(encoding="utf-8").replace("keepUnmanaged: true\n", ""),
                   encoding="utf-8")
    plan = host.cli("plan", "--adopt", "-f", out, "-o", "json")
    vm = next(c for c in plan.json()["changes"] if c["name"] == "vm1")
    dropped = {f["field"]: f["old"] for f in vm["fields"]}
    assert "/domain/devices/watchdog[1]" in dropped.get("unmanaged", ""), vm


# ---- the CLI: ownership, files ---------------------------------------------------------------

def test_objects_of_another_kvmctl_project_are_refused(host: Host, tmp_path: Path) -> None:
    from manifest_docs import doc
    from testdriver import write_manifests
    theirs = write_manifests(tmp_path / "theirs.yaml", [
        doc("VirtualMachine", "theirs", {"memory": "128MiB", "machine": "q35",
                                         "boot": {"kernel": "/k"}, "state": "stopped"})])
    from cli_support import run_cli
    made = run_cli(["apply", "-y", "-f", theirs, "--connect", host.uri, "--project", "other",
                    "--domain-type", "qemu"])
    assert made.code == 0, made
    host.domain("mine")
    out = tmp_path / "out"
    r = host.import_(out, "--all")
    assert r.code == 0, r  # found by --all: left out, and said
    assert "note: VirtualMachine/theirs left out: it belongs to kvmctl project 'other'" \
        in r.stderr
    assert set(_read(out)) == {"VirtualMachine/mine"}
    named = host.import_(tmp_path / "out2", "VirtualMachine/theirs")
    assert named.code == 1, named  # asked for by name: refused
    assert "not imported: VirtualMachine/theirs: it belongs to kvmctl project 'other'" \
        in named.stderr


def test_an_unknown_object_is_an_error_and_the_rest_is_imported(host: Host) -> None:
    _lab(host)
    out = host.folder / "out"
    r = host.import_(out, "Network/lan", "VirtualMachine/nope")
    assert r.code == 1, r
    assert "error: VirtualMachine/nope: no such object" in r.stderr
    assert set(_read(out)) == {"Network/lan"}


def test_files_one_kind_a_file_with_the_schema_and_a_project_file(host: Host) -> None:
    _lab(host)
    out = host.folder / "out"
    r = host.import_(out, "--all")
    assert r.code == 0, r
    assert sorted(p.name for p in out.iterdir()) == [
        "disks.yaml", "kvmctl.yaml", "networks.yaml", "storage.yaml", "vms.yaml"]
    head = (out / "vms.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert head.startswith("# yaml-language-server: $schema=")
    assert head.endswith("virtualmachine.schema.json")
    project = yaml.safe_load((out / "kvmctl.yaml").read_text(encoding="utf-8"))
    assert project["kind"] == "Project" and project["metadata"]["name"] == PROJECT
    assert project["spec"]["hosts"][0]["uri"] == host.uri
    # The folder validates and plans on its own (its project file names the host).
    assert host.cli("validate", "-f", out).code == 0


def test_one_per_file(host: Host) -> None:
    _lab(host)
    out = host.folder / "out"
    assert host.import_(out, "--all", "--one-per-file").code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "disk-data.yaml", "disk-root.yaml", "kvmctl.yaml", "network-lan.yaml",
        "storagepool-imgs.yaml", "virtualmachine-vm1.yaml"]
    for p in out.glob("*-*.yaml"):
        assert len([d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d]) == 1


def test_no_project_file_is_written_into_a_folder_that_has_one(host: Host) -> None:
    _lab(host)
    out = host.folder / "out"
    out.mkdir()
    (out / "kvmctl.yaml").write_text("# mine\n", encoding="utf-8")
    assert host.import_(out, "Network/lan").code == 0
    assert (out / "kvmctl.yaml").read_text(encoding="utf-8") == "# mine\n"


def test_import_never_overwrites_a_file(host: Host) -> None:
    _lab(host)
    out = host.folder / "out"
    out.mkdir()
    (out / "vms.yaml").write_text("# my own\n", encoding="utf-8")
    r = host.import_(out, "--all")
    assert r.code == 2, r
    assert "vms.yaml exist already: import never overwrites" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["vms.yaml"]
    assert (out / "vms.yaml").read_text(encoding="utf-8") == "# my own\n"
    again = host.import_(host.folder / "out2", "--all")
    assert again.code == 0
    assert host.import_(host.folder / "out2", "--all").code == 2


def test_a_symlink_in_the_way_is_not_written_through(host: Host) -> None:
    _lab(host)
    out = host.folder / "out"
    out.mkdir()
    target = host.folder / "elsewhere.yaml"
    (out / "networks.yaml").symlink_to(target)  # dangling: nothing there yet
    assert host.import_(out, "Network/lan").code == 2
    assert not target.exists()


def test_import_needs_objects_and_a_folder(host: Host) -> None:
    assert host.cli("import", "--out", host.folder / "o").code == 2
    assert host.cli("import", "--all").code == 2


# ---- hostile names -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["null", "yes", "on", "123", "1e3", "0x1f", "a.b_c"])
def test_names_yaml_would_read_as_other_values_stay_strings(host: Host, name: str) -> None:
    host.domain(name)
    out = host.folder / "out"
    r = host.import_(out, f"VirtualMachine/{name}")
    assert r.code == 0, r
    assert set(_read(out)) == {f"VirtualMachine/{name}"}
    plan = host.cli("plan", "--adopt", "-f", out, "-o", "json")
    assert plan.code == 0, plan
    assert [c["name"] for c in plan.json()["changes"]] == [name]


@pytest.mark.parametrize("hostile", ["a b", "we'b\"<x>", "~"])
def test_a_name_kvmctl_cannot_use_is_refused_alone(host: Host, hostile: str) -> None:
    host.domain("fine")
    host.domain(hostile)
    out = host.folder / "out"
    r = host.import_(out, "--all")
    assert r.code == 1, r
    assert f"not imported: VirtualMachine/{hostile}" in r.stderr, r
    assert "import.yaml" not in r.stderr
    assert set(_read(out)) == {"VirtualMachine/fine"}


def test_select_orders_and_dedups(host: Host) -> None:
    _lab(host)
    live = host.hv.read()
    picked, missing = importer.select(live, ["vm/vm1", "Network/lan", "pool/imgs",
                                             "Disk/root", "VirtualMachine/ghost"], True, True)
    assert picked == [(Kind.POOL, "imgs"), (Kind.NETWORK, "lan"), (Kind.VM, "vm1")]
    assert missing == ["Disk/root", "VirtualMachine/ghost"]


def test_settings_virt_install_writes_survive_apply_adopt_or_are_listed(host: Host) -> None:
    host.conn.defineXML("""<domain type='qemu'><name>vi</name>
<memory unit='KiB'>131072</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>/boot/k</kernel></os>
<features><acpi/><apic/></features>
<clock offset='utc'><timer name='rtc' tickpolicy='catchup'/>
<timer name='hpet' present='no'/></clock>
<pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>
<devices/></domain>""")
    wanted = ("<timer name='hpet' present='no'/>", "<suspend-to-mem enabled='no'/>")
    assert all(w in host.xml("vi") for w in wanted)
    out = host.folder / "out"
    r = host.import_(out, "VirtualMachine/vi")
    if r.code == 1:  # listed: refused, never lost silently
        assert "/domain/clock" in r.stderr and "/domain/pm" in r.stderr, r
        return
    assert r.code == 0, r
    assert host.cli("apply", "-y", "--adopt", "-f", out).code == 0
    after = host.xml("vi")
    assert all(w in after for w in wanted), after


def test_a_device_apply_adopt_would_add_is_said(host: Host, tmp_path: Path) -> None:
    host.domain("bare")  # no RNG: kvmctl's VMs have one
    r = host.import_(tmp_path / "out", "VirtualMachine/bare")
    assert r.code == 0, r
    assert "note: VirtualMachine/bare: apply --adopt also gives it kvmctl's" in r.stderr, r
    assert "rng" in r.stderr
