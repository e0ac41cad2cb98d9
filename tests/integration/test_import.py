"""`kvmctl import` on a real libvirtd: objects kvmctl did not make (defined by hand through
libvirt-python, or by virt-install) are imported, the manifests validate, `plan --adopt` shows
only the ownership marks, `apply --adopt` does not reboot the guest, and a later change applies
live. Elements the manifests cannot express are refused, or kept byte for byte."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml
from engine_support import URI, Kvmctl, assert_clean
from guestlog import SerialLog
from lxml import etree

from kvmctl.plan import xmledit

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GOLDEN = sorted(p.parent.name for p in (REPO / "tests/golden/render").glob("*/manifest.yaml"))
# cloud-image downloads a cloud image: not here.
EXAMPLES = sorted(p.name for p in (REPO / "examples").iterdir()
                  if p.is_dir() and p.name != "cloud-image")
CASES = [f"golden/{g}" for g in GOLDEN] + [
    "golden/disks-image-unshared"] + [f"examples/{e}" for e in EXAMPLES]
INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE
WATCHDOG = "<watchdog model='i6300esb'/>"
CHANNEL = "<channel type='unix'><target type='virtio' name='org.example.0'/></channel>"


def _cli(k: Kvmctl, *argv: Any) -> Any:
    return k.run(argv[0], *k.engine_args(), *argv[1:])


def _import(k: Kvmctl, out: Path, refs: list[str], *extra: str) -> Any:
    return _cli(k, "import", *refs, "--out", out, *extra)


def _plan_only_ownership(k: Kvmctl, out: Path) -> dict[str, Any]:
    """validate, then plan --adopt: every change is update-live or no-op, with no field but
    the ownership marks (metadata)."""
    valid = k.run("validate", "-f", out)
    assert valid.code == 0, str(valid)
    plan = _cli(k, "plan", "--adopt", "-f", out, "-o", "json")
    assert plan.code in (0, 2), str(plan)
    data = plan.json()
    for c in data["changes"]:
        ref = f"{c['kind']}/{c['name']}"
        assert c["class"] in ("update-live", "no-op"), (ref, c)
        assert not c.get("pending_restart"), (ref, c)
        assert {f["field"] for f in c["fields"]} <= {"metadata"}, (ref, c["fields"])
    return data


def _exact(xml: str) -> list[bytes]:
    """The unmanaged elements of a definition, as bytes (exclusive C14N)."""
    return [etree.tostring(el, method="c14n", exclusive=True)
            for _, _, el, _ in xmledit.unmanaged(xml)]


def _vcpus(dom: Any, flags: int = 0) -> int:
    vcpu = etree.fromstring(dom.XMLDesc(flags).encode()).find("vcpu")
    assert vcpu is not None
    return int(vcpu.get("current", vcpu.text))


# ---- a. round trip of every rendering golden case and every example -------------------------

def _case_docs(case: str) -> list[dict[str, Any]]:
    """The case's documents; `-unshared`: without its Disks that several VMs share."""
    if case.endswith("-unshared"):
        docs = _case_docs(case.removesuffix("-unshared"))
        shared = {d["metadata"]["name"] for d in docs
                  if d["kind"] == "Disk" and d["spec"].get("shareable")}
        for d in docs:
            if d["kind"] == "VirtualMachine":
                d["spec"]["disks"] = [a for a in d["spec"].get("disks", [])
                                      if a["disk"] not in shared]
        return [d for d in docs if d["metadata"]["name"] not in shared]
    kind, name = case.split("/")
    folder = REPO / "tests/golden/render" / name if kind == "golden" else REPO / "examples" / name
    files = [folder / "manifest.yaml"] if kind == "golden" else sorted(folder.glob("*.yaml"))
    return [d for f in files for d in yaml.safe_load_all(f.read_text(encoding="utf-8"))
            if d and d.get("kind") != "Project"]


def _renamed(docs: list[dict[str, Any]], prefix: str, scratch: Path, free_subnet: Any
             ) -> tuple[list[dict[str, Any]], list[str]]:
    """The case's objects with the test's names, pools under scratch, networks on free
    subnets, bridges named after the prefix; Images left out (their Disks become blank ones)
    and cloud-init seeds left out (kvmctl's own). Returns the documents and what was left out."""
    left_out: list[str] = []
    names = {d["metadata"]["name"] for d in docs}
    p = {n: prefix + n for n in names}
    nets = [ipaddress.ip_network(d["spec"]["ipv4"]["cidr"]) for d in docs
            if d["kind"] == "Network" and d.get("spec", {}).get("ipv4")]
    subnets = {str(n.network_address).rsplit(".", 1)[0] + ".": free_subnet() for n in nets}
    bridges: dict[str, str] = {}
    out = []
    for d in docs:
        spec = dict(d.get("spec") or {})
        kind, name = d["kind"], d["metadata"]["name"]
        if kind == "Image":
            left_out.append(f"Image/{name} (an image to download or copy)")
            continue
        if kind == "StoragePool":
            spec["path"] = str(scratch / f"pool-{name}")
        if kind == "Disk":
            spec["pool"] = p[spec["pool"]]
            if "image" in spec:
                left_out.append(f"Disk/{name}: image {spec['image']} (made a blank disk)")
                spec.pop("image")
                spec.pop("clone", None)
        if kind == "VirtualMachine":
            if "cloudInit" in spec:
                left_out.append(f"VirtualMachine/{name}: cloudInit (kvmctl's own seed)")
                spec.pop("cloudInit")
            spec["disks"] = [{**a, "disk": p[a["disk"]]} for a in spec.get("disks", [])]
            if not spec["disks"]:
                spec.pop("disks")
            nics = []
            for nic in spec.get("interfaces", []):
                nic = dict(nic)
                if "network" in nic:
                    nic["network"] = p[nic["network"]]
                if "bridge" in nic:
                    nic["bridge"] = bridges.setdefault(nic["bridge"],
                                                       f"{prefix}b{len(bridges)}")
                nics.append(nic)
            if nics:
                spec["interfaces"] = nics
            if "console" in spec:
                spec["console"] = {"log": str(scratch / f"{name}.log")}
        if kind == "Network" and "bridge" in spec:
            spec["bridge"] = bridges.setdefault(spec["bridge"], f"{prefix}b{len(bridges)}")
        out.append({**d, "metadata": {**d["metadata"], "name": p[name]}, "spec": spec})
    text = yaml.safe_dump_all(out, sort_keys=False)
    for old, new in subnets.items():
        base = str(new.network_address).rsplit(".", 1)[0] + "."
        text = re.sub(r"(?<![\d.])" + re.escape(old), base, text)
    return list(yaml.safe_load_all(text)), left_out


def _rendered(k: Kvmctl, path: Path) -> dict[str, str]:
    r = k.run("render", "-f", path, "--project", k.project, "--domain-type", "qemu")
    assert r.code == 0, str(r)
    parts = re.split(r"^<!-- (\S+/\S+) -->\n", r.stdout, flags=re.M)
    if len(parts) == 1:  # one object: rendered without its header
        (d,) = yaml.safe_load_all(path.read_text(encoding="utf-8"))
        return {f"{d['kind']}/{d['metadata']['name']}": r.stdout}
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _by_hand(xml: str) -> str:
    """The rendered XML without what kvmctl adds for itself: its metadata, title, uuid."""
    root = etree.fromstring(xml.encode())
    for tag in ("metadata", "uuid", "title"):
        for el in root.findall(tag):
            root.remove(el)
    return etree.tostring(root, encoding="unicode")


def _bridges(docs: list[dict[str, Any]], prefix: str) -> set[str]:
    """The host bridges the (renamed) documents name: ours, made with the test's prefix."""
    named = {d["spec"]["bridge"] for d in docs
             if d["kind"] == "Network" and d["spec"].get("mode") == "bridge"}
    named |= {n["bridge"] for d in docs if d["kind"] == "VirtualMachine"
              for n in d["spec"].get("interfaces", []) if "bridge" in n}
    assert all(b.startswith(prefix) for b in named)
    return named


def _define_by_hand(conn: Any, docs: list[dict[str, Any]], xml: dict[str, str]) -> list[str]:
    """Everything through libvirt-python, as another tool would: the refs defined."""
    refs = []
    for d in docs:
        kind, name, spec = d["kind"], d["metadata"]["name"], d.get("spec") or {}
        ref = f"{kind}/{name}"
        if kind == "StoragePool":
            Path(spec["path"]).mkdir(parents=True, exist_ok=True)
            pool = conn.storagePoolDefineXML(_by_hand(xml[ref]))
            pool.create()
            pool.setAutostart(int(spec.get("autostart", True)))
            refs.append(ref)
    for d in docs:
        kind, name, spec = d["kind"], d["metadata"]["name"], d.get("spec") or {}
        ref = f"{kind}/{name}"
        if kind == "Disk":
            conn.storagePoolLookupByName(spec["pool"]).createXML(_by_hand(xml[ref]), 0)
        elif kind == "Network":
            net = conn.networkDefineXML(_by_hand(xml[ref]))
            net.setAutostart(int(spec.get("autostart", True)))
            net.create()
            refs.append(ref)
    for d in docs:
        kind, name, spec = d["kind"], d["metadata"]["name"], d.get("spec") or {}
        ref = f"{kind}/{name}"
        if kind == "VirtualMachine":
            dom = conn.defineXML(_by_hand(xml[ref]))
            dom.setAutostart(int(spec.get("autostart", False)))
            if spec.get("state") == "running":
                dom.create()
            refs.append(ref)
    return refs


@pytest.mark.parametrize("case", CASES)
def test_round_trip(case: str, conn: Any, prefix: str, scratch_dir: Path, cleanup: Any,
                    free_subnet: Any) -> None:
    k = Kvmctl(prefix, scratch_dir)
    docs, left_out = _renamed(_case_docs(case), prefix, scratch_dir, free_subnet)
    print(f"{case}: left out: {left_out or 'nothing'}")
    for bridge in sorted(_bridges(docs, prefix)):
        subprocess.run(["ip", "link", "add", "name", bridge, "type", "bridge"], check=True)
    xml = _rendered(k, k.write("case.yaml", docs))
    refs = _define_by_hand(conn, docs, xml)
    out = scratch_dir / "imported"
    r = _import(k, out, refs, "--no-follow")
    assert r.code == 0, str(r)
    imported = [d for f in sorted(out.glob("*.yaml")) for d in
                yaml.safe_load_all(f.read_text(encoding="utf-8")) if d]
    assert {f"{d['kind']}/{d['metadata']['name']}" for d in imported
            if d["kind"] not in ("Project", "Disk")} == set(refs)
    # A VM's volumes come as Disks (a volume no VM uses is not a Disk of any import).
    assert {d["metadata"]["name"] for d in imported if d["kind"] == "Disk"} == {
        a["disk"] for d in docs if d["kind"] == "VirtualMachine"
        for a in d["spec"].get("disks", [])}
    plan = _plan_only_ownership(k, out)
    assert {f"{c['kind']}/{c['name']}" for c in plan["changes"]} >= set(refs)


# ---- b. VMs made by virt-install --------------------------------------------------------------

def _nat_network(conn: Any, name: str, subnet: ipaddress.IPv4Network) -> None:
    hosts = list(subnet.hosts())
    net = conn.networkDefineXML(
        f"<network><name>{name}</name><forward mode='nat'/>"
        f"<ip address='{hosts[0]}' prefix='24'><dhcp>"
        f"<range start='{hosts[99]}' end='{hosts[198]}'/></dhcp></ip></network>")
    net.create()


def _dir_pool(conn: Any, name: str, path: Path) -> Any:
    path.mkdir(mode=0o755)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>")
    pool.create()
    return pool


def _volume(pool: Any, name: str, mib: int) -> None:
    pool.createXML(f"<volume><name>{name}</name><capacity unit='MiB'>{mib}</capacity>"
                   "<target><format type='qcow2'/></target></volume>", 0)


def _seed_iso(folder: Path, instance: str) -> Path:
    """A NoCloud cloud-init seed (ISO9660 labelled cidata), as cloud-localds makes one."""
    # Its files are made outside `folder`: virt-install turns the ISO's folder into a pool,
    # whose every entry the cleanup deletes as a volume.
    src = Path(tempfile.mkdtemp(prefix=f"{instance}-seed-"))
    (src / "meta-data").write_text(f"instance-id: {instance}\nlocal-hostname: {instance}\n")
    (src / "user-data").write_text("#cloud-config\n{}\n")
    iso = folder / f"{instance}-seed.iso"
    done = subprocess.run(["genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata",
                           "-joliet", "-rock", str(src / "user-data"), str(src / "meta-data")],
                          capture_output=True, text=True, timeout=60)
    shutil.rmtree(src)
    assert done.returncode == 0, done.stderr
    iso.chmod(0o644)
    return iso


def _virt_install(name: str, pool: str, net: str, guest: Any, log: Path,
                  seed: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["virt-install", "--connect", URI, "--name", name, "--memory", "128",
            "--vcpus", "1,maxvcpus=2", "--virt-type", "qemu", "--import",
            "--disk", f"vol={pool}/{name}-root.qcow2,bus=virtio",
            "--disk", f"vol={pool}/{name}-data.qcow2,bus=virtio",
            "--boot", f"kernel={guest.kernel},initrd={guest.initrd},"
                      "kernel_args=console=ttyS0 kvmctl.dhcp=0",
            "--osinfo", "detect=on,require=off", "--network", f"network={net}",
            "--graphics", "none", "--console", f"pty,target_type=serial,log.file={log}",
            "--noautoconsole"]
    if seed is not None:  # a cloud-init seed on a CD-ROM, as cloud images are started
        argv += ["--disk", f"path={seed},device=cdrom,readonly=on"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done


def _unmanaged_lines(stderr: str, name: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"VirtualMachine/{name}: ")]


def test_virt_install_vms_running_and_stopped(conn: Any, prefix: str, scratch_dir: Path,
                                              cleanup: Any, free_subnet: Any,
                                              test_guest: Any) -> None:
    k = Kvmctl(prefix, scratch_dir)
    pool_name, net = f"{prefix}pool", f"{prefix}nat"
    pool = _dir_pool(conn, pool_name, scratch_dir / "pool")
    _nat_network(conn, net, free_subnet())
    logs: dict[str, SerialLog] = {}
    for state in ("run", "stop"):
        name = f"{prefix}{state}"
        _volume(pool, f"{name}-root.qcow2", 32)
        _volume(pool, f"{name}-data.qcow2", 16)
        log = scratch_dir / f"{state}.log"
        seed = _seed_iso(scratch_dir, name) if state == "run" else None
        _virt_install(name, pool_name, net, test_guest, log, seed)
        logs[name] = SerialLog(log)
    run, stop = f"{prefix}run", f"{prefix}stop"
    for name, log in logs.items():
        log.wait_for(r"^KVMCTL-READY$", timeout=120, alive=conn.lookupByName(name).isActive)
    # The running one booted with its cloud-init seed (the guest reads its meta-data).
    logs[run].wait_for(rf"^KVMCTL-SEED instance-id={run} local-hostname={run}$", timeout=5)
    conn.lookupByName(stop).destroy()
    produced = {n: conn.lookupByName(n).XMLDesc(INACTIVE) for n in (run, stop)}
    print("virt-install produced:\n" + produced[run])

    out = scratch_dir / "imported"
    refused = _import(k, out, [f"VirtualMachine/{run}", f"VirtualMachine/{stop}"])
    print("import without --keep-unmanaged:\n" + refused.stderr)
    flags: list[str] = []
    if refused.code != 0:
        # virt-install adds what kvmctl does not model: every element listed with its path.
        for name in (run, stop):
            paths = [p for p, _, _, _ in xmledit.unmanaged(produced[name])]
            listed = _unmanaged_lines(refused.stderr, name)
            for p in paths:
                assert any(f" {p} cannot be expressed" in line for line in listed), (p, listed)
        shutil.rmtree(out)
        flags = ["--keep-unmanaged"]
        r = _import(k, out, [f"VirtualMachine/{run}", f"VirtualMachine/{stop}"], *flags)
        assert r.code == 0, str(r)
    before = {n: _exact(x) for n, x in produced.items()}
    vms = out / "vms.yaml"
    print("imported vms.yaml:\n" + vms.read_text(encoding="utf-8"))
    _plan_only_ownership(k, out)

    applied = _cli(k, "apply", "-y", "--adopt", "-f", out)
    assert applied.code == 0, str(applied)
    time.sleep(2)
    assert len(logs[run].findall(r"^KVMCTL-BOOT ok$")) == 1, logs[run].tail()
    assert not conn.lookupByName(stop).isActive()
    again = _cli(k, "plan", "--detailed-exitcode", "-f", out)
    assert again.code == 0, str(again)

    docs = list(yaml.safe_load_all(vms.read_text(encoding="utf-8")))
    for d in docs:
        if d and d["kind"] == "VirtualMachine":
            d["spec"]["cpus"] = {"count": 2, "max": 2}
    vms.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    mark = logs[run].mark()
    changed = _cli(k, "apply", "-y", "-f", out)
    assert changed.code == 0, str(changed)
    logs[run].wait_for(r"^KVMCTL-CPUS online=2$", since=mark, timeout=60)
    assert len(logs[run].findall(r"^KVMCTL-BOOT ok$")) == 1, logs[run].tail()
    dom_run, dom_stop = conn.lookupByName(run), conn.lookupByName(stop)
    assert _vcpus(dom_run) == 2 and _vcpus(dom_run, INACTIVE) == 2
    assert not dom_stop.isActive() and _vcpus(dom_stop, INACTIVE) == 2
    for name, dom in ((run, dom_run), (stop, dom_stop)):
        assert _exact(dom.XMLDesc(INACTIVE)) == before[name], name
    import difflib
    print("".join(difflib.unified_diff(produced[run].splitlines(True),
                                       dom_run.XMLDesc(INACTIVE).splitlines(True))))
    final = _cli(k, "plan", "--detailed-exitcode", "-f", out)
    assert final.code == 0, str(final)


# ---- c. an element kvmctl does not model ------------------------------------------------------

def test_unmodelled_elements_are_refused_or_kept_byte_for_byte(
        conn: Any, prefix: str, scratch_dir: Path, cleanup: Any, test_guest: Any) -> None:
    k = Kvmctl(prefix, scratch_dir)
    name = f"{prefix}odd"
    log = scratch_dir / "odd.log"
    conn.defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
        "<vcpu current='1'>2</vcpu>"
        f"<os><type arch='x86_64' machine='q35'>hvm</type><kernel>{test_guest.kernel}</kernel>"
        f"<initrd>{test_guest.initrd}</initrd><cmdline>console=ttyS0 kvmctl.dhcp=0</cmdline>"
        "</os><features><acpi/><apic/></features><devices>"
        f"<serial type='pty'><log file='{log}' append='on'/><target port='0'/></serial>"
        "<console type='pty'><target type='serial' port='0'/></console>"
        f"{WATCHDOG}{CHANNEL}</devices></domain>")
    before = _exact(conn.lookupByName(name).XMLDesc(INACTIVE))
    assert len(before) == 2
    out = scratch_dir / "refused"
    r = _import(k, out, [f"VirtualMachine/{name}"])
    assert r.code == 1, str(r)
    assert f"VirtualMachine/{name}: /domain/devices/watchdog[1] cannot be expressed" in r.stderr
    assert f"VirtualMachine/{name}: /domain/devices/channel[1] cannot be expressed" in r.stderr
    assert f"not imported: VirtualMachine/{name}" in r.stderr
    assert not (out / "vms.yaml").exists()

    out = scratch_dir / "kept"
    r = _import(k, out, [f"VirtualMachine/{name}"], "--keep-unmanaged")
    assert r.code == 0, str(r)
    _plan_only_ownership(k, out)
    applied = _cli(k, "apply", "-y", "--adopt", "-f", out)
    assert applied.code == 0, str(applied)
    dom = conn.lookupByName(name)
    assert _exact(dom.XMLDesc(INACTIVE)) == before
    vms = out / "vms.yaml"
    vms.write_text(vms.read_text(encoding="utf-8").replace("count: 1", "count: 2"),
                   encoding="utf-8")
    changed = _cli(k, "apply", "-y", "-f", out)
    assert changed.code == 0, str(changed)
    assert _vcpus(dom, INACTIVE) == 2
    assert _exact(dom.XMLDesc(INACTIVE)) == before
    assert_clean(changed.output)
