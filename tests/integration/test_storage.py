"""Storage against the real libvirtd: Images, Disks, pools, prune safety, ownership records.

No guest boots here: every VM is stopped. Every object is named with the test's ``prefix`` and
every pool directory lives in ``scratch_dir``; ``cleanup`` sweeps whatever a failure leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab_support import (  # noqa: E402
    Kvmctl,
    add_bridge,
    changes_by_ref,
    disk,
    download,
    http_server,
    image,
    leftovers,
    links,
    nat_network,
    ownership_record,
    pool,
    upload,
    vm,
    volume_names,
    volume_xml,
)

MiB = 1024 * 1024
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def k(prefix, scratch_dir, conn) -> Kvmctl:
    return Kvmctl(prefix.rstrip("-"), scratch_dir / "manifests")


def _pattern(size: int, seed: bytes = b"kvmctl") -> bytes:
    block = hashlib.sha256(seed).digest() * (4096 // 32)
    return (block * (size // len(block) + 1))[:size]


def _record_volumes(conn, pool_name: str, project: str) -> dict:
    record = ownership_record(conn, pool_name, project)
    return (record or {}).get("volumes", {})


def _qemu_img_info(path: str) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output", "json", path], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


# --- Images --------------------------------------------------------------------------------------


def test_image_from_url_checksum(k, conn, prefix, scratch_dir, tmp_path):
    payload = _pattern(3 * MiB + 512, b"url-image")
    served = tmp_path / "srv"
    served.mkdir()
    (served / "disk.raw").write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    bad = hashlib.sha256(b"something else").hexdigest()
    pname, iname = f"{prefix}pool", f"{prefix}img"
    vol = f"{iname}.raw"

    with http_server(served) as base:
        docs = [pool(pname, scratch_dir / "pool"),
                image(iname, pname, url=f"{base}/disk.raw", sha256=bad, format="raw")]
        k.write(docs)
        r = k("apply", "-f", k.dir, "-y")
        assert r.code == 1, str(r)
        assert "checksum mismatch" in r.stderr and good in r.stderr and bad in r.stderr, str(r)
        assert "Traceback" not in r.output
        assert vol not in volume_names(conn, pname)
        assert vol not in _record_volumes(conn, pname, k.project), "failed import left a claim"
        # The failed import changes nothing about what the next plan proposes.
        plan = k.plan_json()
        assert changes_by_ref(plan)[f"Image/{iname}"]["class"] == "create"

        # An URL that does not answer is a clear error too, and leaves nothing behind.
        docs[1]["spec"].update(url=f"{base}/missing.raw", sha256=good)
        k.write(docs)
        r = k("apply", "-f", k.dir, "-y")
        assert r.code == 1 and "cannot download" in r.stderr, str(r)
        assert vol not in volume_names(conn, pname)
        assert vol not in _record_volumes(conn, pname, k.project)

        docs[1]["spec"].update(url=f"{base}/disk.raw", sha256=good)
        k.write(docs)
        k.apply()

    assert vol in volume_names(conn, pname)
    assert download(conn, pname, vol) == payload
    assert _record_volumes(conn, pname, k.project)[vol][:2] == ["Image", iname]
    rows = k.ok("get", "images", "-o", "json").json()
    assert [(r["name"], r["volume"], r["capacity"]) for r in rows] == [(iname, vol, len(payload))]
    # The server is gone: a second plan must not need it.
    assert k("plan", "-f", k.dir, "--detailed-exitcode").code == 0


def test_qcow2_image_from_url_keeps_its_format(k, conn, prefix, scratch_dir, tmp_path):
    raw = tmp_path / "content.raw"
    raw.write_bytes(_pattern(2 * MiB, b"qcow2-url"))
    served = tmp_path / "srv"
    served.mkdir()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw),
                    str(served / "disk.qcow2")], check=True, capture_output=True)
    sha = hashlib.sha256((served / "disk.qcow2").read_bytes()).hexdigest()
    pname, iname = f"{prefix}pool", f"{prefix}img"
    with http_server(served) as base:
        k.write([pool(pname, scratch_dir / "pool"),
                 image(iname, pname, url=f"{base}/disk.qcow2", sha256=sha, format="qcow2"),
                 disk(f"{prefix}ovl", pname, "4MiB", image=iname),
                 disk(f"{prefix}cln", pname, "4MiB", image=iname, clone=True)])
        k.apply()
    img = volume_xml(conn, pname, f"{iname}.qcow2")
    assert img.find("target/format").get("type") == "qcow2"
    ovl = volume_xml(conn, pname, f"{prefix}ovl.qcow2")
    assert ovl.find("backingStore/format").get("type") == "qcow2"
    # What a guest reads from either disk is the image's content, not its qcow2 bytes.
    for name in ("ovl", "cln"):
        path = volume_xml(conn, pname, f"{prefix}{name}.qcow2").findtext("target/path")
        cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(raw),
                              path], capture_output=True, text=True)
        assert cmp.returncode == 0, f"{name}: {cmp.stdout}{cmp.stderr}"
    assert k("plan", "-f", k.dir, "--detailed-exitcode").code == 0


def test_overlay_and_clone(k, conn, prefix, scratch_dir):
    base = scratch_dir / "base.raw"
    payload = _pattern(2 * MiB, b"base")
    base.write_bytes(payload)
    os.chmod(base, 0o644)
    pname, iname = f"{prefix}pool", f"{prefix}base"
    k.write([pool(pname, scratch_dir / "pool"),
             image(iname, pname, path=str(base), format="raw"),
             disk(f"{prefix}ovl", pname, "8MiB", image=iname),
             disk(f"{prefix}cln", pname, "8MiB", image=iname, clone=True)])
    k.apply()

    image_path = conn.storagePoolLookupByName(pname).storageVolLookupByName(
        f"{iname}.raw").path()
    assert download(conn, pname, f"{iname}.raw") == payload

    ovl = volume_xml(conn, pname, f"{prefix}ovl.qcow2")
    assert ovl.find("target/format").get("type") == "qcow2"
    assert ovl.findtext("target/compat") == "1.1"
    assert ovl.findtext("backingStore/path") == image_path
    assert ovl.find("backingStore/format").get("type") == "raw"
    assert int(ovl.findtext("capacity")) == 8 * MiB

    cln = volume_xml(conn, pname, f"{prefix}cln.qcow2")
    assert cln.find("target/format").get("type") == "qcow2"
    assert cln.findtext("target/compat") == "1.1"
    assert cln.find("backingStore") is None or cln.findtext("backingStore/path") is None
    assert int(cln.findtext("capacity")) == 8 * MiB
    cln_path = cln.findtext("target/path")
    info = _qemu_img_info(cln_path)
    assert "backing-filename" not in info and info["format"] == "qcow2", info
    # A full copy: the guest-visible content is the image's (the rest reads as zeros).
    cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(base),
                          cln_path], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # ...and independent of it: writing the copy leaves the image alone.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 64k", cln_path],
                   check=True, capture_output=True)
    assert download(conn, pname, f"{iname}.raw") == payload

    assert k("plan", "-f", k.dir, "--detailed-exitcode").code == 0


def test_image_from_a_directory_that_is_already_a_pool(k, conn, prefix, scratch_dir):
    # libvirt allows one pool per directory: importing from a folder that already is a pool
    # (say /var/lib/libvirt/images) must use that pool, and leave it alone.
    host_dir = scratch_dir / "host"
    host_dir.mkdir()
    payload = _pattern(MiB, b"in-a-pool")
    (host_dir / "base.raw").write_bytes(payload)
    theirs = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{prefix}theirs</name><target><path>{host_dir}</path></target>"
        "</pool>", 0)
    theirs.create(0)
    pname, iname = f"{prefix}pool", f"{prefix}base"
    k.write([pool(pname, scratch_dir / "pool"),
             image(iname, pname, path=str(host_dir / "base.raw"), format="raw")])
    k.apply()
    assert download(conn, pname, f"{iname}.raw") == payload
    assert theirs.isActive() and volume_names(conn, f"{prefix}theirs") == {"base.raw"}
    assert not [p.name() for p in conn.listAllStoragePools(0)
                if p.name().startswith("kvmctl-import-")]
    assert k("plan", "-f", k.dir, "--detailed-exitcode").code == 0


# --- Disks ---------------------------------------------------------------------------------------


def test_disk_grows_in_place_and_never_shrinks(k, conn, prefix, scratch_dir):
    pname, raw, q = f"{prefix}pool", f"{prefix}raw", f"{prefix}q"
    docs = [pool(pname, scratch_dir / "pool"),
            disk(raw, pname, "4MiB", format="raw"),
            disk(q, pname, "4MiB", format="qcow2")]
    k.write(docs)
    k.apply()
    p = conn.storagePoolLookupByName(pname)
    raw_path = p.storageVolLookupByName(f"{raw}.raw").path()
    q_path = p.storageVolLookupByName(f"{q}.qcow2").path()
    data = _pattern(MiB + 4096, b"data")
    upload(conn, pname, f"{raw}.raw", data)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", q_path], check=True,
                   capture_output=True)

    for d in docs[1:]:
        d["spec"]["size"] = "8MiB"
    k.write(docs)
    plan = changes_by_ref(k.plan_json())
    for name in (raw, q):
        c = plan[f"Disk/{name}"]
        assert c["class"] == "update-live", c
        assert [(f["field"], f["old"], f["new"]) for f in c["fields"]] == \
            [("size", "4MiB", "8MiB")], c
    k.apply()

    p.refresh(0)
    assert p.storageVolLookupByName(f"{raw}.raw").path() == raw_path
    assert p.storageVolLookupByName(f"{q}.qcow2").path() == q_path
    assert int(volume_xml(conn, pname, f"{raw}.raw").findtext("capacity")) == 8 * MiB
    assert int(volume_xml(conn, pname, f"{q}.qcow2").findtext("capacity")) == 8 * MiB
    assert _qemu_img_info(q_path)["virtual-size"] == 8 * MiB
    assert download(conn, pname, f"{raw}.raw", len(data)) == data
    check = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", q_path],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "Pattern verification failed" not in check.stdout, \
        check.stdout + check.stderr
    assert k("plan", "-f", k.dir, "--detailed-exitcode").code == 0

    # Shrinking is refused at plan time, and apply changes nothing.
    docs[1]["spec"]["size"] = "6MiB"
    k.write(docs)
    for command in (("plan", "-f", k.dir), ("apply", "-f", k.dir, "-y")):
        r = k(*command)
        assert r.code == 1, str(r)
        assert f"Disk/{raw}: shrinking a disk is refused (8MiB -> 6MiB)" in r.stderr, str(r)
        assert "Traceback" not in r.output
    assert int(volume_xml(conn, pname, f"{raw}.raw").findtext("capacity")) == 8 * MiB
    assert download(conn, pname, f"{raw}.raw", len(data)) == data


def test_image_backing_a_disk_is_never_deleted(k, conn, prefix, scratch_dir):
    base = scratch_dir / "base.raw"
    base.write_bytes(_pattern(MiB, b"img"))
    os.chmod(base, 0o644)
    pname, iname = f"{prefix}pool", f"{prefix}base"
    kept, loose = f"{prefix}kept", f"{prefix}loose"
    the_pool = pool(pname, scratch_dir / "pool")
    the_image = image(iname, pname, path=str(base), format="raw")
    protected = disk(kept, pname, "4MiB", image=iname, protect=True)
    k.write([the_pool, the_image, protected, disk(loose, pname, "4MiB", image=iname)])
    k.apply()
    expected = {f"{iname}.raw", f"{kept}.qcow2", f"{loose}.qcow2"}
    assert expected <= volume_names(conn, pname)

    # Image and disks gone from the manifests: prune without --prune-disks deletes nothing.
    k.write([the_pool])
    plan = changes_by_ref(k.plan_json("--prune"))
    assert plan[f"Image/{iname}"]["blocked"] == "disks still use it as their base"
    assert "--prune-disks" in plan[f"Disk/{loose}"]["blocked"]
    assert plan[f"Disk/{kept}"]["blocked"]
    k.apply("--prune")
    assert expected <= volume_names(conn, pname)

    # With --prune-disks: the unprotected overlay goes, the protected one and its image stay.
    plan = changes_by_ref(k.plan_json("--prune", "--prune-disks"))
    assert plan[f"Disk/{loose}"]["class"] == "delete" and not plan[f"Disk/{loose}"]["blocked"]
    assert "protect" in plan[f"Disk/{kept}"]["blocked"]
    assert plan[f"Image/{iname}"]["blocked"] == "disks still use it as their base"
    k.apply("--prune", "--prune-disks")
    names = volume_names(conn, pname)
    assert f"{loose}.qcow2" not in names
    assert {f"{iname}.raw", f"{kept}.qcow2"} <= names
    record = _record_volumes(conn, pname, k.project)
    assert f"{loose}.qcow2" not in record and f"{kept}.qcow2" in record
    # destroy --with-disks refuses the protected disk as well, so the image stays.
    k.write([the_pool, the_image, protected])
    r = k.ok("destroy", "-f", k.dir, "-y", "--with-disks")
    assert f"Disk/{kept}" in r.stderr and "protect" in r.stderr, str(r)
    assert {f"{iname}.raw", f"{kept}.qcow2"} <= volume_names(conn, pname)

    # Unprotected again, then pruned with its image in one apply: disks first, then the image.
    k.write([the_pool, the_image, dict(protected, spec={**protected["spec"], "protect": False})])
    k.apply()
    k.write([the_pool])
    k.apply("--prune", "--prune-disks")
    assert volume_names(conn, pname) & expected == set()
    assert k("plan", "-f", k.dir, "--prune", "--detailed-exitcode").code == 0


# --- pools ---------------------------------------------------------------------------------------


def test_pool_deleted_only_when_empty_and_owned(k, conn, prefix, scratch_dir):
    anchor = pool(f"{prefix}anchor", scratch_dir / "anchor")
    p1, p2 = f"{prefix}p1", f"{prefix}p2"
    d1 = disk(f"{prefix}d1", p1, "2MiB")
    k.write([anchor, pool(p1, scratch_dir / "p1"), pool(p2, scratch_dir / "p2"), d1])
    k.apply()
    # A volume kvmctl does not own, in p2.
    conn.storagePoolLookupByName(p2).createXML(
        f"<volume><name>{prefix}foreign.raw</name><capacity>1048576</capacity>"
        "<target><format type='raw'/></target></volume>", 0)
    # A pool kvmctl does not own at all.
    p3 = f"{prefix}p3"
    (scratch_dir / "p3").mkdir()
    p3_obj = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{p3}</name><target><path>{scratch_dir / 'p3'}</path></target>"
        "</pool>", 0)
    p3_obj.create(0)

    k.write([anchor])
    plan = changes_by_ref(k.plan_json("--prune"))
    assert "--prune-disks" in plan[f"Disk/{d1['metadata']['name']}"]["blocked"]
    assert plan[f"StoragePool/{p1}"]["blocked"], "a pool holding a kept disk must stay"
    assert f"{prefix}foreign.raw" in plan[f"StoragePool/{p2}"]["blocked"]
    assert f"StoragePool/{p3}" not in plan, "a pool kvmctl does not own is never pruned"
    k.apply("--prune")
    pools = {p.name() for p in conn.listAllStoragePools(0)}
    assert {p1, p2, p3} <= pools
    assert f"{d1['metadata']['name']}.qcow2" in volume_names(conn, p1)
    assert ownership_record(conn, p1, k.project)["owns_pool"] is True

    # With --prune-disks p1 empties and goes (with its directory); p2 keeps its foreign volume.
    k.apply("--prune", "--prune-disks")
    pools = {p.name() for p in conn.listAllStoragePools(0)}
    assert p1 not in pools and not (scratch_dir / "p1").exists()
    assert {p2, p3} <= pools
    assert volume_names(conn, p2) >= {f"{prefix}foreign.raw"}
    assert ownership_record(conn, p3, k.project) is None
    # Taking over p3 needs --adopt; without it the plan is an error naming it.
    k.write([anchor, pool(p3, scratch_dir / "p3")])
    r = k("plan", "-f", k.dir)
    assert r.code == 1 and f"StoragePool/{p3}: already exists" in r.stderr, str(r)
    assert "--adopt" in r.stderr


# --- host bridges --------------------------------------------------------------------------------


def test_missing_host_bridge_is_a_plan_error(k, conn, prefix, scratch_dir):
    pname, nb, vb = f"{prefix}pool", f"{prefix}nb", f"{prefix}vb"
    docs = [pool(pname, scratch_dir / "pool"),
            {"apiVersion": "kvmctl/v1", "kind": "Network", "metadata": {"name": f"{prefix}up"},
             "spec": {"mode": "bridge", "bridge": nb}},
            vm(f"{prefix}vm", memory="64MiB", state="stopped",
               interfaces=[{"network": f"{prefix}up"}, {"bridge": vb}])]
    k.write(docs)
    for command in (("plan", "-f", k.dir), ("apply", "-f", k.dir, "-y")):
        r = k(*command)
        assert r.code == 1, str(r)
        assert f"Network/{prefix}up: host bridge '{nb}' does not exist" in r.stderr, str(r)
        assert f"VirtualMachine/{prefix}vm: host bridge '{vb}' does not exist" in r.stderr
        assert "Traceback" not in r.output
    assert leftovers(conn, prefix) == []

    # Positive control: once the bridges exist the same manifests apply.
    add_bridge(nb)
    add_bridge(vb)
    assert {nb, vb} <= links()
    k.apply()
    xml = conn.lookupByName(f"{prefix}vm").XMLDesc(0)
    assert f"<source bridge='{vb}'/>" in xml and f"<source network='{prefix}up'/>" in xml
    assert k("plan", "-f", k.dir, "--detailed-exitcode").code == 0


# --- ownership lives on the hypervisor -----------------------------------------------------------


def test_plan_from_a_fresh_process_is_identical(k, conn, prefix, scratch_dir, free_subnet,
                                                tmp_path):
    base = scratch_dir / "base.raw"
    base.write_bytes(_pattern(MiB, b"fresh"))
    os.chmod(base, 0o644)
    pname, iname = f"{prefix}pool", f"{prefix}base"
    docs = [pool(pname, scratch_dir / "pool"),
            image(iname, pname, path=str(base), format="raw"),
            disk(f"{prefix}root", pname, "4MiB", image=iname),
            disk(f"{prefix}data", pname, "4MiB"),
            nat_network(f"{prefix}net", free_subnet(), mode="isolated"),
            vm(f"{prefix}vm", memory="64MiB", state="stopped",
               disks=[{"disk": f"{prefix}root"}, {"disk": f"{prefix}data"}],
               interfaces=[{"network": f"{prefix}net"}],
               cloudInit={"hostname": "fresh", "userData": {"runcmd": ["true"]}})]
    k.write(docs)
    k.apply()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(elsewhere),
           "LANG": "C.UTF-8"}

    def fresh(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(k.subprocess_argv(*args), cwd=elsewhere, env={**env, **extra_env},
                              capture_output=True, text=True, timeout=120)

    r = fresh("plan", "-f", str(k.dir), "--detailed-exitcode")
    assert r.returncode == 0, r.stdout + r.stderr
    # With something to do, both processes make the same plan, byte for byte.
    docs[3]["spec"]["size"] = "8MiB"
    docs[5]["spec"]["memory"] = "96MiB"
    k.write(docs)
    here = k.ok("plan", "-f", k.dir, "-o", "json", "--prune").stdout
    assert {c["kind"] for c in json.loads(here)["changes"]} == {"Disk", "VirtualMachine"}
    # A HOME nothing was ever written to, and no local cache at all: the same plan.
    for extra in ({}, {"KVMCTL_NO_CACHE": "1", "HOME": str(tmp_path / "nowhere")}):
        there = fresh("plan", "-f", str(k.dir), "-o", "json", "--prune", **extra)
        assert there.returncode == 0, there.stderr
        assert json.loads(there.stdout) == json.loads(here), extra
    # Another project, in another fresh process, sees the objects as someone else's.
    other = Kvmctl(k.project + "-other", k.dir)
    r = subprocess.run(other.subprocess_argv("plan", "-f", str(k.dir)), cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"belongs to kvmctl project '{k.project}'" in r.stderr, r.stderr
