"""An apply SIGKILLed at every step boundary, then applied again, converges.

kvmctl runs in a subprocess through ``killwrap.py``, which counts every call of a
``Hypervisor`` method that changes the host (write_record's inner calls included) and SIGKILLs
the process right after the K-th one returned (or right before the first). A dry run of the
same apply counts the N changes; then the apply is killed at each point in turn and the next
plain ``kvmctl apply -y`` (no ``--adopt``) must succeed, after which:

* a plan is empty;
* the world's objects are exactly those of an apply that was never killed: no orphan volume,
  domain or network;
* the pool and every volume are owned, and exactly the protected disks are protected, by the
  record as kvmctl reads it and by the raw record slots;
* the cloud-init seed and the imported image hold the right bytes (a record must not say a
  content is there before it is).

Right before change K+1 and right after change K are the same state of the host (only kvmctl's
own bookkeeping runs between two calls), so killing after each change and before the first
covers both sides of every boundary. A change that failed (a seed's delete of a volume that is
not there yet) changed nothing: no kill after it.

Two applies: **create** (from nothing: a pool, an image imported from a host file, a disk, a
protected disk, an overlay disk, a network, a stopped VM with a cloud-init seed) and **update**
(from the created set: a disk grows and becomes protected, a disk goes with ``--prune
--prune-disks``, the seed is rebuilt, the VM is redefined). Each kill point gets its own world:
a sub-prefix of the test's prefix (the ``cleanup`` fixture sweeps whatever a failure leaves) and
its own pool directory; the one subnet is reused, each world being removed before the next.
No guest boots (the VM is ``state: stopped``). ``KNOWN_GAPS`` lists what does not converge yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from engine_support import PYTHON, REPO, URI, Kvmctl, assert_clean, disk, doc, network, pool, vm

from kvmctl.apply.executor import SEED_CAPACITY
from kvmctl.host.hypervisor import Hypervisor
from kvmctl.host.ownership import choose_record, parse_record_name, record_names
from kvmctl.kinds import RECORD_PREFIX
from kvmctl.manifest import documents, validate
from kvmctl.render.definitions import render_desired
from kvmctl.render.iso import build_seed_iso

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

WRAPPER = Path(__file__).with_name("killwrap.py")
IMAGE_BYTES = 1024 * 1024


# ---- one world: a project, its manifests, its objects --------------------------------------------

@dataclass
class World:
    project: str  # also the prefix of every name
    folder: Path
    subnet: Any
    guest: Any
    base: Path  # the host file the Image is imported from
    kv: Kvmctl = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(mode=0o755)
        os.chmod(self.folder, 0o755)
        self.kv = Kvmctl(self.project, self.folder)

    def n(self, name: str) -> str:
        return self.project + name

    @property
    def pool(self) -> str:
        return self.n("pool")

    def docs(self, stage: str) -> list[dict[str, Any]]:
        created = stage == "create"
        docs = [
            pool(self.pool, self.folder / "pool"),
            doc("Image", self.n("img"), {"pool": self.pool, "path": str(self.base),
                                         "format": "raw"}),
            # grown, and protected from then on (a claim that changes the record)
            disk(self.n("d1"), self.pool, "8MiB", protect=False) if created else
            disk(self.n("d1"), self.pool, "16MiB", protect=True),
            disk(self.n("d2"), self.pool, "8MiB", protect=True),
            network(self.n("net"), self.subnet),
            vm(self.n("vm"), self.guest, disks=[{"disk": self.n("d1")}, {"disk": self.n("d2")}],
               interfaces=[{"network": self.n("net")}],
               cloudInit={"hostname": "first" if created else "second"}),
        ]
        if created:
            docs.insert(4, disk(self.n("d3"), self.pool, "8MiB", image=self.n("img")))
        return docs

    def manifest(self, stage: str) -> Path:
        return self.kv.write(f"{stage}.yaml", self.docs(stage))


STAGES = {"create": (), "update": ("--prune", "--prune-disks")}
PROTECTED = {"create": ("d2",), "update": ("d1", "d2")}


def apply_killed(world: World, stage: str, kill: str, log: Path) -> subprocess.CompletedProcess:
    argv = [PYTHON, str(WRAPPER), str(log), kill, "apply", "-y", "-f",
            str(world.manifest(stage)), *world.kv.engine_args(), "--parallelism", "1",
            *STAGES[stage]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def changes(log: Path) -> list[list[Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ---- what is on the host -------------------------------------------------------------------------

def host_objects(conn: Any, world: World) -> dict[str, set[str]]:
    """The world's objects on the host, by kind, named without the world's prefix."""
    mine = world.project

    def short(names: Any) -> set[str]:
        return {n[len(mine):] for n in names if n.startswith(mine)}
    found = {"domains": short(d.name() for d in conn.listAllDomains(0)),
             "networks": short(n.name() for n in conn.listAllNetworks(0)),
             "pools": short(p.name() for p in conn.listAllStoragePools(0)),
             "volumes": set(), "records": set()}
    for p in conn.listAllStoragePools(0):
        with contextlib.suppress(libvirt.libvirtError):
            if not p.isActive():
                continue
            if p.name().startswith(mine):
                p.refresh(0)
            for v in p.listAllVolumes(0):
                parsed = parse_record_name(v.name())
                where = p.name()[len(mine):] if p.name().startswith(mine) else p.name()
                if parsed and parsed[0] == mine:  # named without RECORD_PREFIX and project
                    slot = v.name()[len(RECORD_PREFIX) + len(mine):]
                    found["records"].add(f"{where}/{slot}")
                elif v.name().startswith(mine):
                    found["volumes"].add(f"{where}/{v.name()[len(mine):]}")
    return found


def download(conn: Any, pool_name: str, volume: str) -> bytes:
    vol = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(volume)
    stream = conn.newStream(0)
    data = bytearray()
    vol.download(stream, 0, 0, 0)
    while (chunk := stream.recv(1 << 20)) and not isinstance(chunk, int):
        data += chunk
    stream.finish()
    return bytes(data)


def raw_record(conn: Any, world: World) -> Any:
    """The world's record in its pool from the raw slots, as ownership.choose_record reads
    them."""
    pool_obj = conn.storagePoolLookupByName(world.pool)
    names = {v.name() for v in pool_obj.listAllVolumes(0)}
    current, pending = record_names(world.project)
    return choose_record(world.project,
                         download(conn, world.pool, current) if current in names else None,
                         download(conn, world.pool, pending) if pending in names else None)


def expected_seed(world: World, stage: str) -> bytes:
    m = validate.validate(documents.load([str(world.manifest(stage))]))
    seed = render_desired(m, world.project, "qemu").seeds[world.n("vm")]
    data = build_seed_iso(seed.content)
    capacity = max(SEED_CAPACITY, -(-len(data) // SEED_CAPACITY) * SEED_CAPACITY)
    return data + b"\0" * (capacity - len(data))


def check_converged(conn: Any, world: World, stage: str, reference: dict[str, set[str]],
                    what: str) -> None:
    kv, path, extra = world.kv, world.manifest(stage), STAGES[stage]
    again = kv.apply(path, *extra, expect=None)
    assert again.code == 0, f"{what}: the next apply failed:\n{again}"
    plan = kv.plan(path, *extra)
    assert plan.code == 0, f"{what}: the plan after it is not empty:\n{plan}"
    found = host_objects(conn, world)
    assert {k: v for k, v in found.items() if k != "records"} == reference, \
        f"{what}: objects differ from an apply never killed"
    assert found["records"] <= {"pool/.json", "pool/.json.next"}, what
    hv = Hypervisor(URI)
    try:
        live = hv.read().pools[world.pool]
    finally:
        hv.close()
    assert live.owner is not None and live.owner.project == world.project, what
    owners = {v.name: v.owner for v in live.volumes}
    assert all(o is not None and o.project == world.project for o in owners.values()), \
        f"{what}: unowned volumes: {owners}"
    record = raw_record(conn, world)
    assert record is not None and record.owns_pool, f"{what}: no record in the raw slots"
    for name in PROTECTED[stage]:
        volume = world.n(name) + ".qcow2"
        owner = owners[volume]
        assert owner is not None and owner.protect, \
            f"{what}: Disk {name} is not protected: {owner}"
        assert record.volumes[volume].protect, f"{what}: the raw record does not protect {name}"
    assert not any(o.protect for v, o in record.volumes.items()
                   if v not in {world.n(n) + ".qcow2" for n in PROTECTED[stage]}), what
    assert download(conn, world.pool, world.n("vm") + "-cidata.iso") == \
        expected_seed(world, stage), f"{what}: the seed does not hold the manifests' content"
    assert download(conn, world.pool, world.n("img") + ".raw") == world.base.read_bytes(), what


def sweep(conn: Any, world: World) -> None:
    """Remove the world's objects (all named with its prefix) and its pool directory."""
    mine = world.project
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(mine):
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    for net in conn.listAllNetworks(0):
        if net.name().startswith(mine):
            if net.isActive():
                net.destroy()
            net.undefine()
    for p in conn.listAllStoragePools(0):
        if p.name().startswith(mine):
            if p.isActive():
                p.refresh(0)
                for v in p.listAllVolumes(0):
                    v.delete(0)
                p.destroy()
            p.undefine()
    shutil.rmtree(world.folder, ignore_errors=True)


@pytest.fixture
def worlds(prefix: str, scratch_dir: Path, free_subnet: Any, test_guest: Any, conn: Any
           ) -> Iterator[Any]:
    subnet = free_subnet()
    base = scratch_dir / "base.raw"
    base.write_bytes(bytes(range(256)) * (IMAGE_BYTES // 256))
    made: list[World] = []

    def new(label: str) -> World:
        world = World(f"{prefix}{label}-", scratch_dir / label, subnet, test_guest, base)
        made.append(world)
        return world
    yield new
    for world in made:
        with contextlib.suppress(libvirt.libvirtError):
            sweep(conn, world)


# ---- kill points ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    kill: str    # killwrap's KILL argument
    label: str   # what was done last, for messages
    done: int    # how many changes had been made
    gap: str | None = None  # a KNOWN_GAPS entry this point falls in


# Kill points that do not converge yet, outside the ownership records (each with the words its
# failure must contain). A point in a gap must fail so: one that converges fails the test, so a
# fix shows until its entry goes. KVMCTL_KILL_STRICT=1 counts them as failures instead.
KNOWN_GAPS: dict[str, str] = {
    # None today. The two this test found are fixed: a pool between its define and its first
    # record ("pool-unmarked": now marked by a uuid derived from project and name, see
    # kinds.pool_uuid) and a seed claimed with its new digest before its content was written
    # ("seed-claimed-early": now claimed without a digest until the upload is done).
}


def _record_op(change: list[Any], project: str) -> bool:
    found = parse_record_name(change[2].rpartition("/")[2])
    return found is not None and found[0] == project


def _gaps(log: list[list[Any]], project: str, stage: str) -> dict[int, str]:
    """The KNOWN_GAPS each state of the dry run (after `done` changes) falls in."""
    pool, current = f"{project}pool", record_names(project)[0]
    seed = f"{pool}/{project}vm-cidata.iso"
    gaps: dict[int, str] = {}
    defined = recorded = False
    seed_exists, claim_in_force, seed_written = stage != "create", False, False
    for i, (done, name, arg, outcome) in enumerate(log):
        ok = outcome == "ok"
        defined |= name == "define_pool" and arg == pool and ok
        recorded |= name == "upload" and arg == f"{pool}/{current}" and ok
        if arg == seed and ok:
            seed_exists = name != "delete_volume"
            seed_written = name == "upload"
        # The seed's claim: the record write right before the first call on the seed; it is in
        # force from its first complete upload (see Hypervisor.write_record).
        if name == "upload" and ok and _record_op(log[i], project) and not claim_in_force:
            after = next((c for c in log[i + 1:] if not _record_op(c, project)), None)
            claim_in_force = after is not None and after[2] == seed
        if defined and not recorded:
            gaps[done] = "pool-unmarked"
        elif claim_in_force and seed_exists and not seed_written:
            gaps[done] = "seed-claimed-early"
    return {done: gap for done, gap in gaps.items() if gap in KNOWN_GAPS}


def _points(log: list[list[Any]], project: str, stage: str) -> list[Point]:
    """Before the first change, and after each change that did not fail (a failed one changed
    nothing: its state is the one before it)."""
    gaps = _gaps(log, project, stage)

    def short(text: str) -> str:
        return text.replace(project, "")
    points = [Point("before:1", f"before #1 {log[0][1]}({short(log[0][2])})", 0)]
    points += [Point(f"after:{done}", f"after #{done} {name}({short(arg)})", done,
                     gaps.get(done))
               for done, name, arg, outcome in log if outcome == "ok"]
    return points


# ---- the test ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["create", "update"])
def test_killed_at_every_boundary_converges(stage: str, worlds: Any, conn: Any,
                                            tmp_path: Path) -> None:
    started = time.monotonic()
    dry = worlds("dry")
    if stage == "update":
        dry.kv.apply(dry.manifest("create"))
    log = tmp_path / "dry.jsonl"
    result = apply_killed(dry, stage, "none", log)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_clean(result.stdout + result.stderr)
    counted = changes(log)
    assert counted, "the dry run made no change"
    reference = {k: v for k, v in host_objects(conn, dry).items() if k != "records"}
    assert dry.kv.plan(dry.manifest(stage), *STAGES[stage]).code == 0
    sweep(conn, dry)
    points = _points(counted, dry.project, stage)
    if only := os.environ.get("KVMCTL_KILL_POINTS"):  # debugging: "3,7" runs those points only
        points = [points[int(i)] for i in only.split(",") if i]
    strict = os.environ.get("KVMCTL_KILL_STRICT") == "1"
    print(f"\n{stage}: {len(counted)} changes, {len(points)} kill points: " + ", ".join(
        f"{name}({arg.replace(dry.project, '')}){'' if ok == 'ok' else ' failed'}"
        for _, name, arg, ok in counted))
    failures: list[str] = []
    gap_failed: dict[str, list[str]] = {}
    next_left = 0
    for i, point in enumerate(points):
        world = worlds(f"{stage[0]}{i:02d}")
        if stage == "update":
            world.kv.apply(world.manifest("create"))
        killed = apply_killed(world, stage, point.kill, tmp_path / f"{i}.jsonl")
        assert killed.returncode == -9, \
            f"{point.label}: not killed:\n{killed.stdout}{killed.stderr}"
        assert len(changes(tmp_path / f"{i}.jsonl")) == point.done, point.label
        what = f"killed {point.label}"
        try:
            check_converged(conn, world, stage, reference, what)
            if point.gap and not strict:
                failures.append(f"{what}: converged, though in known gap {point.gap}: if it "
                                "is fixed, remove it from KNOWN_GAPS")
        except AssertionError as exc:
            text = str(exc)
            if point.gap and not strict and KNOWN_GAPS[point.gap] in text:
                gap_failed.setdefault(point.gap, []).append(point.label)
            else:
                failures.append(text if len(failures) < 3 else text.splitlines()[0])
        with contextlib.suppress(libvirt.libvirtError):  # a failed point's pool may be off
            next_left += record_names(world.project)[1] in {
                v.name() for v in conn.storagePoolLookupByName(world.pool).listAllVolumes(0)}
        sweep(conn, world)
    for gap, labels in sorted(gap_failed.items()):
        print(f"{stage}: known gap {gap} at {len(labels)} point(s): {', '.join(labels)}")
    print(f"{stage}: {len(points)} kill points in {time.monotonic() - started:.0f} s; "
          f"{next_left} left a complete next record slot (read, and folded in by the next "
          "write)")
    assert not failures, f"{len(failures)} of {len(points)} kill points failed:\n" + \
        "\n".join(failures)
