"""Ownership records without a daemon: the format (two slots, digest, format 1), which slot a
reader believes, and a write killed at each of its steps (libvirt's test driver; volume content
in memory, see testdriver.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from manifest_docs import disk, pool
from testdriver import DriverHypervisor, install, node_uri, write_manifests

from kvmctl.host.ownership import (
    NEXT_SUFFIX,
    Owner,
    OwnershipRecord,
    choose_record,
    owner_from_xml,
    parse_record_name,
    parsed_owner,
    record_names,
    slot_capacity,
)
from kvmctl.kinds import RECORD_PREFIX, Kind

PROJECT = "unit"
POOL = "rec-pool"


def record(*volumes: str, owns_pool: bool = True, protect: bool = False,
           project: str = PROJECT) -> OwnershipRecord:
    return OwnershipRecord(project, owns_pool, {
        v: Owner(project, Kind.DISK, v.split(".")[0], "hash-" + v, "", protect) for v in volumes})


def format1(rec: OwnershipRecord) -> bytes:
    """A record exactly as kvmctl wrote it before records had two slots (format 1)."""
    return json.dumps({"version": 1, "project": rec.project, "owns_pool": rec.owns_pool,
                       "volumes": {name: [o.kind, o.name, o.spec_hash, o.protect]
                                   for name, o in sorted(rec.volumes.items())}},
                      indent=1).encode()


# ---- the format ---------------------------------------------------------------------------------

def test_a_record_round_trips_with_its_padding() -> None:
    rec = record("a.qcow2", "b.raw", protect=True)
    data = rec.to_json()
    assert json.loads(data)["version"] == 2 and len(json.loads(data)["digest"]) == 64
    assert OwnershipRecord.from_json(data) == rec
    assert OwnershipRecord.from_json(data + b"\0" * (slot_capacity(len(data)) - len(data))) == rec
    assert OwnershipRecord.from_json(data, PROJECT) == rec
    assert OwnershipRecord.from_json(data, "other") is None  # a slot names its project


def test_every_cut_short_record_is_refused() -> None:
    for data in (record("a.qcow2", "b.raw").to_json(), format1(record("a.qcow2"))):
        size = slot_capacity(len(data))
        for cut in range(len(data)):
            # what a killed upload leaves: a prefix, then the zeros of a new volume
            assert OwnershipRecord.from_json(data[:cut] + b"\0" * (size - cut)) is None, cut


def test_a_record_torn_by_a_rewrite_in_place_is_refused() -> None:
    first, second = record("a.qcow2", "b.raw", protect=True), record("a.qcow2", "c.raw")
    for old_rec, new_rec in ((first, second), (second, first)):
        old, new = (r.to_json().ljust(4096, b"\0") for r in (old_rec, new_rec))
        for cut in range(len(new.rstrip(b"\0"))):
            torn = new[:cut] + old[cut:]
            assert OwnershipRecord.from_json(torn) in (None, old_rec), cut
        assert OwnershipRecord.from_json(new) == new_rec
    # over a format-1 record (no digest) too: a torn one reads as neither
    old = format1(first).ljust(4096, b"\0")
    new = second.to_json().ljust(4096, b"\0")
    for cut in range(1, len(new.rstrip(b"\0"))):
        assert OwnershipRecord.from_json(new[:cut] + old[cut:]) in (None, first), cut


def test_a_changed_byte_is_refused() -> None:
    data = bytearray(record("a.qcow2", protect=True).to_json())
    data[data.index(b"true")] = ord("T")  # "True": no longer JSON
    assert OwnershipRecord.from_json(bytes(data)) is None
    edited = json.loads(record("a.qcow2", protect=True).to_json())
    edited["volumes"]["a.qcow2"][3] = False  # valid JSON, wrong digest
    assert OwnershipRecord.from_json(json.dumps(edited).encode()) is None


def test_format_1_is_still_read() -> None:
    rec = record("a.qcow2", "b.raw", protect=True)
    assert OwnershipRecord.from_json(format1(rec)) == rec
    assert OwnershipRecord.from_json(format1(rec) + b"\0" * 100, PROJECT) == rec
    no_version = json.loads(format1(rec))
    del no_version["version"]
    assert OwnershipRecord.from_json(json.dumps(no_version).encode()) == rec


@pytest.mark.parametrize("data", [b"", b"\0" * 4096, b"null", b"[]", b'"x"', b"{}",
                                  b'{"version": 3, "project": "unit"}',
                                  b'{"version": 1, "project": 7}',
                                  b'{"version": 1, "project": "unit", "volumes": []}',
                                  b'{"version": 1, "project": "unit", "volumes": {"a": [1]}}',
                                  b"\xff\xfe{", b'{"project": "unit"'])
def test_what_is_not_a_record(data: bytes) -> None:
    assert OwnershipRecord.from_json(data) is None


@pytest.mark.parametrize("project", ["unit", "a.json", "a.json.next", "x.next", "", "a.b.c",
                                     "kvmctl-owner-x", "p.json.json"])
def test_slot_names_are_unambiguous(project: str) -> None:
    current, pending = record_names(project)
    assert current.startswith(RECORD_PREFIX) and pending.startswith(RECORD_PREFIX)
    assert parse_record_name(current) == (project, False)
    assert parse_record_name(pending) == (project, True)
    others = ["unit", "a.json", "a.json.next", "x.next", "", "a.b.c", "kvmctl-owner-x",
              "p.json.json", "p", "p.json.next.json"]
    names = [n for p in {project, *others} for n in record_names(p)]
    assert len(names) == len(set(names))


def test_names_that_are_not_slots() -> None:
    assert parse_record_name("disk.qcow2") is None
    assert parse_record_name(RECORD_PREFIX + "x.txt") is None
    assert parse_record_name(RECORD_PREFIX + "x" + NEXT_SUFFIX + ".old") is None


def test_slot_capacity_leaves_room() -> None:
    assert slot_capacity(1) == 4096 and slot_capacity(2048) == 4096
    assert slot_capacity(2049) == 8192 and slot_capacity(5000) == 12288


# ---- which slot a reader believes -------------------------------------------------------------

OLD, NEW = record("a.qcow2", protect=True), record("a.qcow2", "b.qcow2", protect=True)


def half(rec: OwnershipRecord) -> bytes:
    data = rec.to_json()
    return data[:len(data) // 2] + b"\0" * 4096


@pytest.mark.parametrize(("current", "pending", "expected"), [
    (OLD.to_json(), None, OLD),                    # at rest
    (format1(OLD), None, OLD),                     # format 1 at rest
    (OLD.to_json(), half(NEW), OLD),               # next record cut short: never replaced it
    (OLD.to_json(), b"", OLD),                     # next record created, nothing written yet
    (format1(OLD), half(NEW), OLD),
    (OLD.to_json(), NEW.to_json(), NEW),           # next record complete: it is in force
    (half(NEW), NEW.to_json(), NEW),               # record slot being rewritten
    (None, NEW.to_json(), NEW),                    # record slot being made again (too small)
    (NEW.to_json(), NEW.to_json(), NEW),           # rewritten, next record not yet removed
    (half(OLD), None, None),                       # a first record cut short: no record yet
    (b"", None, None),
    (None, half(NEW), None),
    (None, None, None),
    (record("a.qcow2", project="other").to_json(), None, None),  # not this project's
])
def test_choose_record(current: bytes | None, pending: bytes | None,
                       expected: OwnershipRecord | None) -> None:
    assert choose_record(PROJECT, current, pending) == expected


# ---- on the test driver ------------------------------------------------------------------------

class Killed(BaseException):
    """What a SIGKILL is to the writer: nothing after it runs (not even `except Exception`)."""


class SlotHypervisor(DriverHypervisor):
    """A test-driver host whose volumes read as zeros until written (as a new libvirt volume
    does), and which can 'kill' the writer right before or after its n-th host change, or in
    the middle of the n-th upload (half of it written)."""

    CHANGES = ("create_volume", "upload", "delete_volume")

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.kill_at: tuple[int, str] | None = None
        self.changes: list[tuple[str, str]] = []

    def _change(self, what: str, name: str, when: str) -> None:
        if when == "before":
            self.changes.append((what, name))
        if self.kill_at == (len(self.changes), when):
            self.kill_at = None
            raise Killed(f"{when} {what} {name}")

    def create_volume(self, pool: str, name: str, xml: str,
                      clone_from: tuple[str, str] | None = None) -> None:
        self._change("create_volume", name, "before")
        super().create_volume(pool, name, xml, clone_from)
        self.contents[(pool, name)] = b""
        self._change("create_volume", name, "after")

    def delete_volume(self, pool: str, name: str) -> None:
        self._change("delete_volume", name, "before")
        super().delete_volume(pool, name)
        self.contents.pop((pool, name), None)
        self._change("delete_volume", name, "after")

    def upload(self, pool: str, name: str, chunks: Iterator[bytes], length: int) -> None:
        self._change("upload", name, "before")
        data = b"".join(chunks)
        if self.kill_at == (len(self.changes), "half"):
            old = self.contents.get((pool, name), b"")
            self.contents[(pool, name)] = data[:len(data) // 2] + old[len(data) // 2:]
            self.kill_at = None
            raise Killed(f"half of upload {name}")
        super().upload(pool, name, iter([data]), length)
        self._change("upload", name, "after")

    def slots(self) -> set[str]:
        vols = self.conn.storagePoolLookupByName(POOL).listAllVolumes(0)
        return {v.name() for v in vols if v.name().startswith(RECORD_PREFIX)}

    def put_raw(self, name: str, data: bytes) -> None:
        """A slot with exactly these bytes, made behind kvmctl's back."""
        pool_obj = self.conn.storagePoolLookupByName(POOL)
        pool_obj.createXML(f"<volume><name>{name}</name><capacity>{max(len(data), 1)}"
                           "</capacity><target><format type='raw'/></target></volume>", 0)
        self.contents[(POOL, name)] = data

    def recorded(self, project: str = PROJECT) -> OwnershipRecord | None:
        live = self.read().pools[POOL]
        owners = {v.name: v.owner for v in live.volumes if v.owner is not None}
        owns = live.owner is not None and live.owner.project == project
        if not owns and not owners:
            return None
        return OwnershipRecord(project, owns, {n: o for n, o in owners.items()
                                               if o.project == project})


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[SlotHypervisor]:
    host = SlotHypervisor(node_uri(tmp_path))
    host.conn.storagePoolDefineXML(f"<pool type='dir'><name>{POOL}</name><target><path>"
                                   f"{tmp_path / 'pool'}</path></target></pool>", 0).create(0)
    for name in ("a.qcow2", "b.qcow2", "c.qcow2"):  # records only own volumes that exist
        host.conn.storagePoolLookupByName(POOL).createXML(
            f"<volume><name>{name}</name><capacity>1048576</capacity>"
            "<target><format type='qcow2'/></target></volume>", 0)
    yield host
    host.close()


def test_a_write_at_rest_leaves_one_slot(hv: SlotHypervisor) -> None:
    current, pending = record_names(PROJECT)
    hv.write_record(POOL, OLD)
    assert hv.changes == [("create_volume", current), ("upload", current)]
    assert hv.slots() == {current} and hv.recorded() == OLD
    hv.changes.clear()
    hv.write_record(POOL, NEW)
    assert hv.changes == [("create_volume", pending), ("upload", pending), ("upload", current),
                          ("delete_volume", pending)]  # rewritten in place: it had room
    assert hv.slots() == {current} and hv.recorded() == NEW
    hv.write_record(POOL, record(owns_pool=False))
    assert hv.slots() == set() and hv.recorded() is None


def test_format_1_is_upgraded_by_the_next_write(hv: SlotHypervisor) -> None:
    current, _ = record_names(PROJECT)
    hv.put_raw(current, format1(OLD))
    assert hv.recorded() == OLD
    hv.write_record(POOL, NEW)
    assert hv.slots() == {current}
    assert json.loads(hv.contents[(POOL, current)].rstrip(b"\0"))["version"] == 2
    assert hv.recorded() == NEW
    assert ("create_volume", current) in hv.changes  # a format-1 slot is exactly full: made anew


def test_other_projects_records_are_untouched(hv: SlotHypervisor) -> None:
    theirs = record("c.qcow2", owns_pool=False, project="other")
    hv.write_record(POOL, theirs)
    hv.write_record(POOL, OLD)
    hv.write_record(POOL, NEW)
    hv.write_record(POOL, record(owns_pool=False))
    assert hv.slots() == {record_names("other")[0]}
    assert hv.recorded("other") == theirs


def _kill_points(hv: SlotHypervisor, before: OwnershipRecord | bytes | None,
                 after: OwnershipRecord) -> int:
    """How many host changes the write of `after` over `before` makes (a dry run)."""
    _setup(hv, before)
    hv.changes.clear()
    hv.write_record(POOL, after)
    count = len(hv.changes)
    _setup(hv, None)
    return count


def _setup(hv: SlotHypervisor, before: OwnershipRecord | bytes | None) -> None:
    hv.kill_at = None
    for name in hv.slots():
        hv.delete_volume(POOL, name)
    if isinstance(before, OwnershipRecord):
        hv.write_record(POOL, before)
    elif isinstance(before, bytes):
        hv.put_raw(record_names(PROJECT)[0], before)
    hv.changes.clear()


@pytest.mark.parametrize("start", ["none", "format1", "format2", "format2-full"])
@pytest.mark.parametrize("target", ["grow", "empty"])
def test_a_write_killed_at_any_step_leaves_the_old_or_the_new_record(
        hv: SlotHypervisor, start: str, target: str) -> None:
    big = record(*(f"{c}.qcow2" for c in "abc"), protect=True)
    before: OwnershipRecord | bytes | None = {
        "none": None, "format1": format1(OLD), "format2": OLD,
        # a record slot too small for the new record: it is deleted and made again
        "format2-full": OLD.to_json()}[start]
    old = None if before is None else OLD
    new = big if target == "grow" else None
    after = big if target == "grow" else record(owns_pool=False)
    steps = _kill_points(hv, before, after)
    if old is None and new is None:
        assert steps == 0
        return
    seen = set()
    for n in range(1, steps + 1):
        for when in ("before", "after", "half"):
            _setup(hv, before)
            hv.kill_at = (n, when)
            try:
                hv.write_record(POOL, after)
            except Killed:
                pass
            else:
                assert when == "half", "the write was not killed"  # n-th change no upload
                continue
            found = hv.recorded()
            assert found in (old, new), (n, when, hv.changes, found)
            seen.add(found == new)
            # The next write (another record) finishes from there, and leaves one slot.
            hv.kill_at = None
            final = record("b.qcow2", protect=True)
            hv.write_record(POOL, final)
            assert hv.recorded() == final, (n, when)
            assert hv.slots() == {record_names(PROJECT)[0]}, (n, when)
    assert seen == {False, True}  # some kills left the old record, later ones the new


def _killed_write(hv: SlotHypervisor, rec: OwnershipRecord, at: tuple[int, str]) -> bool:
    """Write `rec`, killed at `at`; False if the write ended before it got there."""
    hv.changes.clear()
    hv.kill_at = at
    try:
        hv.write_record(POOL, rec)
    except Killed:
        return True
    finally:
        hv.kill_at = None
    return False


def test_a_write_killed_after_a_killed_write_still_leaves_a_record(hv: SlotHypervisor) -> None:
    """The write after a kill finishes or drops what the killed one left (its first steps
    differ): killed at any of those steps too, it leaves the record it found or its own."""
    first, second, third = OLD, NEW, record("c.qcow2", protect=True)
    whens = ("before", "after", "half")
    steps = _kill_points(hv, first, second)
    checked = 0
    for at in ((n, w) for n in range(1, steps + 1) for w in whens):
        _setup(hv, first)
        if not _killed_write(hv, second, at):
            continue
        left = hv.recorded()
        assert left in (first, second), at
        hv.changes.clear()
        hv.write_record(POOL, third)  # a dry run of the next write from there
        then = len(hv.changes)
        for at2 in ((n, w) for n in range(1, then + 1) for w in whens):
            _setup(hv, first)
            assert _killed_write(hv, second, at)
            if not _killed_write(hv, third, at2):
                continue
            assert hv.recorded() in (left, third), (at, at2, hv.changes)
            hv.write_record(POOL, record("a.qcow2", "b.qcow2", "c.qcow2"))
            assert hv.recorded() == record("a.qcow2", "b.qcow2", "c.qcow2"), (at, at2)
            assert hv.slots() == {record_names(PROJECT)[0]}, (at, at2)
            checked += 1
    assert checked > 50


def test_a_lone_half_record_claims_and_disowns_nothing(hv: SlotHypervisor) -> None:
    current, pending = record_names(PROJECT)
    hv.put_raw(current, half(NEW))
    live = hv.read().pools[POOL]
    assert live.owner is None and all(v.owner is None for v in live.volumes)
    hv.delete_volume(POOL, current)
    hv.put_raw(pending, half(NEW))
    live = hv.read().pools[POOL]
    assert live.owner is None and all(v.owner is None for v in live.volumes)
    # Writing over it keeps nothing of it and needs no other record first.
    hv.write_record(POOL, OLD)
    assert hv.recorded() == OLD and hv.slots() == {current}


def test_a_record_slot_rewritten_after_the_listing_is_read_from_the_next_record(
        hv: SlotHypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that listed the pool before a writer began sees the record slot torn: it looks
    for the next record, which is complete by then."""
    current, pending = record_names(PROJECT)
    hv.write_record(POOL, OLD)
    listed = hv.conn.storagePoolLookupByName(POOL).listAllVolumes(0)
    hv.put_raw(pending, NEW.to_json())
    hv.contents[(POOL, current)] = half(NEW)
    pool_obj = hv.conn.storagePoolLookupByName(POOL)

    class Listed:
        def __getattr__(self, name: str) -> Any:
            return getattr(pool_obj, name)

        def listAllVolumes(self, flags: int) -> list[Any]:  # noqa: N802 (libvirt's name)
            return [v for v in listed]

    live = hv._pool(Listed())
    assert live.owner is not None
    assert {v.name: v.owner for v in live.volumes}["b.qcow2"] == NEW.volumes["b.qcow2"]


# ---- through the CLI ---------------------------------------------------------------------------

def test_a_lone_half_record_makes_the_plan_refuse(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool whose only record is cut short is not this project's to change, to prune or to
    take over silently: the plan says so, and --adopt takes it over."""
    from cli_support import run_cli

    host, uri = install(monkeypatch, tmp_path, SlotHypervisor)

    def cli(*argv: Any) -> Any:
        return run_cli([argv[0], "--connect", uri, "--project", PROJECT, "--domain-type",
                        "qemu", *argv[1:]])
    try:
        docs = [pool("u-pool", tmp_path / "pool"), disk("u-data", "u-pool", "16MiB",
                                                        protect=True)]
        path = write_manifests(tmp_path / "m.yaml", docs)
        assert cli("apply", "-y", "-f", path).code == 0
        current, _ = record_names(PROJECT)
        data = host.contents[("u-pool", current)]
        host.contents[("u-pool", current)] = data[:len(data.rstrip(b"\0")) // 2]
        refused = cli("plan", "-f", path)
        assert refused.code == 1 and "not managed by kvmctl" in refused.stderr, refused
        empty = write_manifests(tmp_path / "none.yaml", [docs[0]])
        pruned = cli("plan", "-f", empty, "--prune", "--prune-disks", "-o", "json")
        # The pool's uuid says this project made it, so it is recorded again; the disk, whose
        # claim went with the record, is nobody's to delete.
        assert pruned.code == 0 and "Disk/u-data" not in pruned.stdout, pruned
        (pool_change,) = pruned.json()["changes"]
        assert "created by this project (its uuid says so)" in pool_change["reasons"][0]
        assert cli("apply", "-y", "-f", path, "--adopt").code == 0
        assert cli("plan", "-f", path, "--detailed-exitcode").code == 0
        rec = OwnershipRecord.from_json(host.contents[("u-pool", current)], PROJECT)
        assert rec is not None and rec.owns_pool and rec.volumes["u-data.qcow2"].protect
    finally:
        host.close()


# ---- the mark read as text and parsed as XML agree ---------------------------------------------

_MARK = ('<metadata>\n    <kvmctl:resource xmlns:kvmctl="https://kvmctl.dev/xmlns/resource/v1">\n'
         '{fields}    </kvmctl:resource>\n{after}  </metadata>')
_PLAIN = ("      <kvmctl:project>p1</kvmctl:project>\n"
          "      <kvmctl:kind>VirtualMachine</kvmctl:kind>\n"
          "      <kvmctl:name>vm-1</kvmctl:name>\n"
          "      <kvmctl:spec-hash>0123456789abcdef</kvmctl:spec-hash>\n"
          "      <kvmctl:shutdown-timeout>30</kvmctl:shutdown-timeout>\n")


@pytest.mark.parametrize("fields, after", [
    (_PLAIN, ""),
    (_PLAIN + "      <kvmctl:protect>true</kvmctl:protect>\n"
     "      <kvmctl:seed-hash>abc</kvmctl:seed-hash>\n", ""),
    (_PLAIN + '      <kvmctl:label key="team">a &amp; b</kvmctl:label>\n', ""),
    (_PLAIN + '      <kvmctl:label key="team">ops</kvmctl:label>\n', ""),
    (_PLAIN.replace("p1", "p&amp;1"), ""),
    (_PLAIN.replace("<kvmctl:name>", '<kvmctl:name x="1">'), ""),
    (_PLAIN.replace("<kvmctl:kind>VirtualMachine</kvmctl:kind>", "<kvmctl:kind/>"), ""),
    (_PLAIN.replace("vm-1", "<b>vm-1</b>"), ""),
    (_PLAIN.replace("vm-1", " vm-1 \n "), ""),
    (_PLAIN + "      <!-- a comment -->\n", ""),
    (_PLAIN.replace("30", "<![CDATA[30]]>"), ""),
    (_PLAIN + "      <kvmctl:name>vm-2</kvmctl:name>\n", ""),
    (_PLAIN, '    <kvmctl-def:definition xmlns:kvmctl-def="https://kvmctl.dev/xmlns/definition/v1" '
             f'desired="{"a" * 64}" rendered="{"b" * 64}" defined="{"c" * 64}"/>\n'),
    (_PLAIN, '    <kvmctl:resource xmlns:kvmctl="https://kvmctl.dev/xmlns/resource/v1">'
             '<kvmctl:project>p2</kvmctl:project></kvmctl:resource>\n'),
])
def test_the_mark_read_as_text_is_the_mark_parsed(fields: str, after: str) -> None:
    metadata = _MARK.format(fields=fields, after=after)
    xml = f"<domain type='qemu'>\n  <name>vm-1</name>\n  {metadata}\n</domain>"
    assert owner_from_xml(xml) == parsed_owner(metadata)
