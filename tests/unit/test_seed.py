"""Tests for kvmctl.seed: NoCloud seed content and the ISO image built from it."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pycdlib
import pytest
import yaml

from kvmctl.errors import KvmctlError
from kvmctl.manifest.cloudinit import SeedContent, SeedError, meta_data_text, seed_content
from kvmctl.render import iso as seed
from kvmctl.render.iso import build_seed_iso

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA1 alice@example"
KEY_B = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ2 bob@example"
NETWORK = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}
# 2000-01-01 00:00:00, offset 0, in the 7-byte directory record / 17-byte volume descriptor forms
DR_SEED_DATE = bytes([100, 1, 1, 0, 0, 0, 0])
VD_SEED_DATE = b"2000010100000000\x00"
NAMES = {"user-data": "USERDATA.;1", "meta-data": "METADATA.;1", "network-config": "NETWORKC.;1"}


def typical_content() -> SeedContent:
    return seed_content(
        "web1",
        "web1.example.org",
        {"packages": ["nginx"], "users": ["default"]},
        NETWORK,
        [KEY_A],
    )


@contextlib.contextmanager
def opened(image: bytes) -> Iterator[pycdlib.PyCdlib]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        yield iso
    finally:
        iso.close()


def read(iso: pycdlib.PyCdlib, **path: str) -> str:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue().decode("utf-8")


def expected_files(c: SeedContent) -> dict[str, str]:
    files = {"user-data": c.user_data, "meta-data": meta_data_text(c)}
    if c.network_config is not None:
        files["network-config"] = c.network_config
    return files


def rr_path_of(iso: pycdlib.PyCdlib, rec: pycdlib.dr.DirectoryRecord) -> str:
    return iso.full_path_from_dirrecord(rec, rockridge=True)


def children(iso: pycdlib.PyCdlib, **path: str) -> list[pycdlib.dr.DirectoryRecord]:
    return [r for r in iso.list_children(**path) if not (r.is_dot() or r.is_dotdot())]


# --------------------------------------------------------------------------- round trip


def test_iso_round_trip_by_rock_ridge_joliet_and_iso9660_names() -> None:
    c = typical_content()
    with opened(build_seed_iso(c)) as iso:
        assert iso.pvd.volume_identifier.decode("ascii").rstrip() == "cidata"
        assert iso.joliet_vd.volume_identifier.decode("utf-16-be").rstrip() == "cidata"
        rr_names = sorted(rr_path_of(iso, r) for r in children(iso, rr_path="/"))
        joliet_names = sorted(
            r.file_identifier().decode("utf-16-be") for r in children(iso, joliet_path="/")
        )
        assert rr_names == ["/meta-data", "/network-config", "/user-data"]
        assert joliet_names == ["meta-data", "network-config", "user-data"]
        for name, text in expected_files(c).items():
            assert read(iso, rr_path=f"/{name}") == text
            assert read(iso, joliet_path=f"/{name}") == text
            assert read(iso, iso_path=f"/{NAMES[name]}") == text


def test_iso_without_network_config_has_two_files() -> None:
    c = seed_content("vm", None, None, None, [])
    with opened(build_seed_iso(c)) as iso:
        names = sorted(rr_path_of(iso, r) for r in children(iso, rr_path="/"))
        assert names == ["/meta-data", "/user-data"]
        assert yaml.safe_load(read(iso, rr_path="/meta-data")) == {"instance-id": c.instance_id}


def test_files_are_read_only_regular_files() -> None:
    with opened(build_seed_iso(typical_content())) as iso:
        for name in NAMES:
            assert iso.get_record(rr_path=f"/{name}").rock_ridge.get_file_mode() == 0o100444


def test_meta_data_text_is_plain_yaml() -> None:
    c = seed_content("vm", "host1", None, None, [], instance_id="iid-1")
    assert meta_data_text(c) == "instance-id: iid-1\nlocal-hostname: host1\n"
    no_host = seed_content("vm", None, None, None, [], instance_id="iid-1")
    assert meta_data_text(no_host) == "instance-id: iid-1\n"


# --------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def clock_and_zone(monkeypatch: pytest.MonkeyPatch, now: float, tz: str) -> Iterator[None]:
    """Pretend the wall clock reads `now` in time zone `tz` (POSIX TZ string)."""
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: now)
        m.setenv("TZ", tz)
        time.tzset()
        try:
            yield
        finally:
            m.undo()
            time.tzset()


def test_build_is_byte_identical_across_clocks_and_time_zones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = typical_content()
    with clock_and_zone(monkeypatch, 1_700_000_000.0, "UTC0"):
        first = build_seed_iso(c)
    with clock_and_zone(monkeypatch, 1_900_000_123.5, "NPT-5:45"):
        second = build_seed_iso(c)
    assert first == second
    assert build_seed_iso(typical_content()) == first


def test_determinism_check_detects_unpinned_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: without the fixed clock, the same two builds differ (the test above has teeth)."""
    monkeypatch.setattr(seed, "_fixed_clock", contextlib.nullcontext)
    c = typical_content()
    with clock_and_zone(monkeypatch, 1_700_000_000.0, "UTC0"):
        first = build_seed_iso(c)
    with clock_and_zone(monkeypatch, 1_900_000_123.5, "NPT-5:45"):
        second = build_seed_iso(c)
    assert first != second


def test_every_timestamp_is_2000_01_01_utc() -> None:
    with opened(build_seed_iso(typical_content())) as iso:
        for vd in (iso.pvd, iso.joliet_vd):
            assert vd.volume_creation_date.date_str == VD_SEED_DATE
            assert vd.volume_modification_date.date_str == VD_SEED_DATE
            assert vd.volume_effective_date.date_str == VD_SEED_DATE
            assert vd.root_directory_record().date.record() == DR_SEED_DATE
        for path in ({"rr_path": "/"}, {"joliet_path": "/"}):
            for rec in iso.list_children(**path):
                assert rec.date.record() == DR_SEED_DATE
        for name in NAMES:
            tf = iso.get_record(rr_path=f"/{name}").rock_ridge.dr_entries.tf_record
            stamps = [tf.modification_time, tf.access_time, tf.attribute_change_time]
            assert [s.record() for s in stamps if s is not None] == [DR_SEED_DATE] * 3


def test_clock_patch_is_undone() -> None:
    build_seed_iso(typical_content())
    assert pycdlib.pycdlib.time is time
    assert pycdlib.headervd.time is time
    assert pycdlib.dates.time is time
    assert seed._clock_owner is None


def test_concurrent_builds_are_identical_and_other_threads_keep_the_real_clock() -> None:
    c = typical_content()
    expected = build_seed_iso(c)
    with ThreadPoolExecutor(max_workers=8) as pool:
        images = list(pool.map(lambda _: build_seed_iso(c), range(16)))
        # a thread that is not building sees pycdlib's real clock even mid-build
        with seed._fixed_clock():
            seen = pool.submit(lambda: pycdlib.headervd.time.time()).result()
    assert all(image == expected for image in images)
    assert seen > seed.SEED_EPOCH + 10 * 365 * 86400


def test_different_user_data_changes_digest_instance_id_and_image() -> None:
    a = seed_content("vm", None, "#cloud-config\npackages: [git]\n", None, [])
    b = seed_content("vm", None, "#cloud-config\npackages: [vim]\n", None, [])
    assert a.digest() != b.digest()
    assert a.instance_id != b.instance_id
    assert build_seed_iso(a) != build_seed_iso(b)


@pytest.mark.parametrize(
    "changed",
    [
        {"hostname": "other"},
        {"network_config": "version: 2\n"},
        {"ssh_authorized_keys": [KEY_A, KEY_B]},
    ],
)
def test_content_changes_change_instance_id(changed: dict[str, object]) -> None:
    args: dict = {"vm_name": "vm", "hostname": "h", "user_data": None, "network_config": None,
                  "ssh_authorized_keys": [KEY_A]}
    base = seed_content(**args)
    other = seed_content(**{**args, **changed})
    assert other.instance_id != base.instance_id
    assert other.digest() != base.digest()


def test_default_instance_id_format_and_stability() -> None:
    c = typical_content()
    prefix, _, suffix = c.instance_id.rpartition("-")
    assert prefix == "web1"
    assert len(suffix) == 12 and all(ch in "0123456789abcdef" for ch in suffix)
    assert typical_content() == c


def test_explicit_instance_id_is_used_verbatim() -> None:
    c = seed_content("vm", None, None, None, [], instance_id="i-0123: custom")
    assert c.instance_id == "i-0123: custom"
    assert yaml.safe_load(meta_data_text(c)) == {"instance-id": "i-0123: custom"}


def test_digest_covers_every_field() -> None:
    base = SeedContent("iid", "host", "#cloud-config\n{}\n", None)
    variants = [
        SeedContent("iid2", "host", "#cloud-config\n{}\n", None),
        SeedContent("iid", None, "#cloud-config\n{}\n", None),
        SeedContent("iid", "host", "#cloud-config\n{} \n", None),
        SeedContent("iid", "host", "#cloud-config\n{}\n", ""),
    ]
    digests = {base.digest(), *(v.digest() for v in variants)}
    assert len(digests) == 5
    assert all(len(d) == 64 for d in digests)


def test_digest_is_stable_across_processes() -> None:
    code = (
        "from kvmctl.manifest.cloudinit import SeedContent;"
        "print(SeedContent('iid', 'h\\u00e9', 'ud: \"x\"\\n', 'nc').digest())"
    )
    local = SeedContent("iid", "h\u00e9", 'ud: "x"\n', "nc").digest()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert out == local


# --------------------------------------------------------------------------- user-data merging


def test_dict_user_data_gets_header_and_merged_keys_and_hostname() -> None:
    user = {"packages": ["nginx"], "ssh_authorized_keys": [KEY_B, KEY_A]}
    c = seed_content("vm", "web1", user, None, [KEY_A, KEY_B, "  " + KEY_A + "\n", "ssh-new key3"])
    assert c.user_data.startswith("#cloud-config\n")
    parsed = yaml.safe_load(c.user_data)
    assert parsed == {
        "packages": ["nginx"],
        "ssh_authorized_keys": [KEY_B, KEY_A, "ssh-new key3"],
        "hostname": "web1",
    }
    assert list(parsed) == ["packages", "ssh_authorized_keys", "hostname"]  # order kept
    assert user == {"packages": ["nginx"], "ssh_authorized_keys": [KEY_B, KEY_A]}  # not mutated


def test_existing_hostname_in_cloud_config_is_kept() -> None:
    c = seed_content("vm", "from-manifest", {"hostname": "from-user-data"}, None, [])
    assert yaml.safe_load(c.user_data)["hostname"] == "from-user-data"
    assert c.hostname == "from-manifest"


def test_cloud_config_string_is_parsed_merged_and_redumped() -> None:
    text = (
        "#cloud-config\n# a comment\nruncmd:\n  - [echo, hi]\n"
        f"ssh_authorized_keys:\n  - {KEY_A}\n"
    )
    c = seed_content("vm", "h1", text, None, [KEY_A, KEY_B])
    assert c.user_data.startswith("#cloud-config\n")
    assert yaml.safe_load(c.user_data) == {
        "runcmd": [["echo", "hi"]],
        "ssh_authorized_keys": [KEY_A, KEY_B],
        "hostname": "h1",
    }


def test_string_user_data_is_used_verbatim_without_merges() -> None:
    text = "#cloud-config\n# keep me\npackages: [git]   \n"
    assert seed_content("vm", None, text, None, []).user_data == text
    script = "#!/bin/sh\necho hello\n"
    assert seed_content("vm", None, script, None, []).user_data == script


def test_none_user_data_is_minimal_cloud_config() -> None:
    c = seed_content("vm", None, None, None, [])
    assert c.user_data.startswith("#cloud-config\n")
    assert yaml.safe_load(c.user_data) == {}
    merged = seed_content("vm", "h", None, None, [KEY_A])
    assert yaml.safe_load(merged.user_data) == {"ssh_authorized_keys": [KEY_A], "hostname": "h"}


def test_empty_cloud_config_string_accepts_merges() -> None:
    c = seed_content("vm", None, "#cloud-config\n", None, [KEY_A])
    assert yaml.safe_load(c.user_data) == {"ssh_authorized_keys": [KEY_A]}


@pytest.mark.parametrize(
    ("hostname", "keys"), [("h", []), (None, [KEY_A]), ("h", [KEY_A])]
)
def test_merging_into_shell_script_is_an_error(hostname: str | None, keys: list[str]) -> None:
    with pytest.raises(SeedError, match="can only be merged into #cloud-config user data"):
        seed_content("vm", hostname, "#!/bin/sh\necho hi\n", None, keys)


@pytest.mark.parametrize(
    ("user_data", "message"),
    [
        ("#cloud-config\n- a list\n", "must be a YAML mapping"),
        ("#cloud-config\nkey: [unclosed\n", "not valid #cloud-config YAML"),
        ({"ssh_authorized_keys": {"not": "a list"}}, "must be a list"),
    ],
)
def test_bad_cloud_config_is_an_error(user_data: str | dict, message: str) -> None:
    with pytest.raises(SeedError, match=message):
        seed_content("vm", None, user_data, None, [KEY_A])


def test_empty_inputs_are_errors() -> None:
    with pytest.raises(SeedError):
        seed_content("vm", None, None, None, ["   "])
    with pytest.raises(SeedError):
        seed_content("vm", "", None, None, [])
    with pytest.raises(SeedError):
        seed_content("", None, None, None, [])
    with pytest.raises(SeedError):
        seed_content("vm", None, None, None, [], instance_id="")


def test_network_config_dict_is_yaml_and_string_is_verbatim() -> None:
    as_dict = seed_content("vm", None, None, NETWORK, [])
    assert as_dict.network_config == "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"
    text = "network:\n  version: 1\n  # comment\n"
    assert seed_content("vm", None, None, text, []).network_config == text


# --------------------------------------------------------------------------- hostile strings

HOSTILE = [
    "plain",
    'quo"te\'s',
    "colon: value",
    "a: b: c",
    "multi\nline\n",
    "trailing newline\n",
    "\nleading newline",
    "<xml attr='1'>",
    "]]>",
    "<![CDATA[ x ]]>",
    "- dash",
    "? question",
    "# not a comment",
    "value # not a comment",
    "&anchor",
    "*alias",
    "!tag",
    "%directive",
    "@at",
    "`backtick`",
    "{flow: map}",
    "[flow, seq]",
    "yes",
    "No",
    "null",
    "~",
    "123",
    "0x1F",
    "1e3",
    "2000-01-01",
    "  padded  ",
    "tab\there",
    "cr\rlf\r\n",
    "back\\slash",
    "uni\u00e9\u4e2d\U0001f600",
    "nul\x00byte",
    "bell\x07",
    "\u2028line separator",
    "---",
    "...",
    "x" * 300,
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_strings_round_trip_through_meta_data(value: str) -> None:
    c = seed_content("vm", value, None, None, [], instance_id=value)
    assert yaml.safe_load(meta_data_text(c)) == {"instance-id": value, "local-hostname": value}
    with opened(build_seed_iso(c)) as iso:
        parsed = yaml.safe_load(read(iso, rr_path="/meta-data"))
    assert parsed == {"instance-id": value, "local-hostname": value}
    assert yaml.safe_load(c.user_data)["hostname"] == value


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_keys_round_trip_through_user_data(value: str) -> None:
    key = f"ssh-ed25519 AAAA {value}"
    c = seed_content("vm", None, None, None, [key])
    assert yaml.safe_load(c.user_data) == {"ssh_authorized_keys": [key.strip()]}


def test_default_instance_id_from_hostile_vm_name() -> None:
    c = seed_content('vm: "x"\n]]>', None, None, None, [])
    assert yaml.safe_load(meta_data_text(c))["instance-id"] == c.instance_id
    assert c.instance_id.startswith('vm: "x"\n]]>-')


def test_unencodable_text_is_a_seed_error() -> None:
    c = SeedContent("iid", None, "#cloud-config\nbad: \ud800\n", None)
    with pytest.raises(SeedError, match="user-data"):
        build_seed_iso(c)


def test_seed_error_is_a_kvmctl_error() -> None:
    assert issubclass(SeedError, KvmctlError)


# Linux's own isofs reading the seed is proven in the integration tests: the test guest mounts
# it from a virtio-scsi CD-ROM and prints its instance-id and hostname (test_lab_e2e.py). The
# host kernel here has no iso9660 module, so a loop mount on the host proves nothing more.


# --------------------------------------------------------------------------- other readers


def _require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:  # scripts/host-setup installs it: missing means the host is not set up
        pytest.fail(f"{name} not installed (Debian package {package}): run scripts/host-setup")
    return path


def test_blkid_sees_cidata_label(tmp_path: Path) -> None:
    """cloud-init finds a NoCloud seed by this label, via blkid."""
    blkid = _require_tool("blkid", "util-linux")
    image = tmp_path / "seed.iso"
    image.write_bytes(build_seed_iso(typical_content()))
    out = subprocess.run([blkid, "-p", "-o", "export", str(image)], check=True,
                         capture_output=True, text=True).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert fields["TYPE"] == "iso9660"
    assert fields["LABEL"] == "cidata"


def test_isoinfo_reads_rock_ridge_and_joliet_names(tmp_path: Path) -> None:
    isoinfo = _require_tool("isoinfo", "genisoimage")
    c = typical_content()
    image = tmp_path / "seed.iso"
    image.write_bytes(build_seed_iso(c))

    def run(*args: str) -> str:
        return subprocess.run([isoinfo, "-i", str(image), *args], check=True,
                              capture_output=True).stdout.decode("utf-8")

    for extension in ("-R", "-J"):
        listing = sorted(run(extension, "-f").split())
        assert listing == ["/meta-data", "/network-config", "/user-data"]
        for name, text in expected_files(c).items():
            assert run(extension, "-x", f"/{name}") == text
    assert "Volume id: cidata" in run("-d").splitlines()
