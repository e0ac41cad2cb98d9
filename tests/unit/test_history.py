"""The controller's history database: round trips, order, retention, privacy, bad files,
threads."""

from __future__ import annotations

import os
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from thread_support import run_in_threads

from kvmctl.controller.history import History, HistoryError
from kvmctl.errors import KvmctlError, UsageError
from kvmctl.sync.status import Commit, SyncRecord, SyncResult

FULL = SyncRecord(
    project="web", started=1_700_000_000.125, finished=1_700_000_003.5, trigger="webhook",
    result=SyncResult.PARTIAL,
    commit=Commit(sha="0123456789abcdef0123456789abcdef01234567", author="Ada Lovelace",
                  email="ada@example.org", time=1_699_999_999.0, message="Grow web: 4 GiB ✓"),
    summary="2 changed, 1 waiting (window closed)",
    changed=("kvm1:vm/web-1", "kvm1:network/front"), waiting=("kvm2:vm/web-2",),
    failed=(("kvm1:volume/data", "pool full"), ("kvm2:vm/x", "it said \"no\"")),
    errors=("manifests/web.yaml:3:1: error: bad", "second"), drift=3)


def sync(project: str, started: float, result: SyncResult = SyncResult.SYNCED,
         commit: str | None = "c0ffee", **more: object) -> SyncRecord:
    return SyncRecord(project=project, started=started, finished=started + 1, trigger="poll",
                      result=result, commit=None if commit is None else Commit(commit),
                      **more)  # type: ignore[arg-type]


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    with History(str(tmp_path / "history.db")) as h:
        yield h


# Round trips


def test_record_sets_id_and_round_trips_every_field(history: History) -> None:
    stored = history.record(FULL)
    assert stored.id is not None
    assert stored == SyncRecord(**{**FULL.__dict__, "id": stored.id})
    (back,) = history.syncs()
    assert back == stored
    assert type(back.result) is SyncResult
    assert type(back.changed) is tuple and type(back.failed) is tuple
    assert all(type(pair) is tuple for pair in back.failed)
    assert type(back.commit) is Commit


def test_record_without_commit_reads_back_none(history: History) -> None:
    stored = history.record(sync("web", 10.0, commit=None))
    assert history.syncs() == [stored]
    assert stored.commit is None


def test_commit_of_empty_strings_is_not_none(history: History) -> None:
    rec = history.record(sync("web", 10.0, commit=""))
    assert history.syncs()[0].commit == Commit("")
    assert history.syncs()[0] == rec


def test_text_sqlite_cannot_store_does_not_lose_the_row(history: History) -> None:
    # git output decoded with surrogateescape: not UTF-8, so not storable as it is.
    rec = sync("web", 1.0, summary="bad \udcff byte", changed=("vm/\udcff",))
    history.record(rec)
    (back,) = history.syncs()
    assert back.summary == "bad \ufffd\ufffd\ufffd byte"
    assert back.changed == ("vm/\udcff",)  # JSON escapes it: exact
    history.event("web", 1.0, "info", "x\udcff")
    assert history.events("web")[0]["message"].startswith("x\ufffd")


def test_nul_characters_round_trip(history: History) -> None:
    rec = history.record(sync("we\x00b", 1.0, summary="a\x00b", commit="c\x00"))
    assert history.syncs("we\x00b") == [rec]
    assert history.last_good_commit("we\x00b") == Commit("c\x00")


def test_given_id_is_ignored(history: History) -> None:
    first = history.record(sync("web", 1.0, id=999))
    second = history.record(sync("web", 2.0, id=999))
    assert first.id != second.id
    assert {s.id for s in history.syncs()} == {first.id, second.id}


names = st.text(max_size=30)


@settings(max_examples=60, deadline=None)
@given(rec=st.builds(
    SyncRecord,
    project=names, started=st.floats(allow_nan=False, allow_infinity=False),
    finished=st.floats(allow_nan=False, allow_infinity=False), trigger=names,
    result=st.sampled_from(SyncResult),
    commit=st.none() | st.builds(Commit, sha=names, author=names, email=names,
                                 time=st.floats(allow_nan=False, allow_infinity=False),
                                 message=names),
    summary=names, changed=st.lists(names, max_size=4).map(tuple),
    waiting=st.lists(names, max_size=4).map(tuple),
    failed=st.lists(st.tuples(names, names), max_size=3).map(tuple),
    errors=st.lists(names, max_size=3).map(tuple), drift=st.integers(0, 2**62),
    id=st.none()))
def test_any_record_round_trips(rec: SyncRecord) -> None:
    with tempfile.TemporaryDirectory() as directory, History(f"{directory}/h.db") as history:
        stored = history.record(rec)
        assert history.syncs() == [stored]
        assert history.last(rec.project) == stored


# Order and queries


def test_syncs_newest_first_by_start_then_row(history: History) -> None:
    late = history.record(sync("web", 30.0))
    early = history.record(sync("web", 10.0))
    tie_a = history.record(sync("web", 20.0))
    tie_b = history.record(sync("web", 20.0))
    other = history.record(sync("db", 25.0))
    assert history.syncs("web") == [late, tie_b, tie_a, early]
    assert history.syncs() == [late, other, tie_b, tie_a, early]
    assert history.syncs(None, limit=2) == [late, other]
    assert history.syncs("web", limit=0) == []
    assert history.syncs("nope") == []
    assert history.last("web") == late
    assert history.last("db") == other
    assert history.last("nope") is None


def test_last_good_commit_skips_failures_and_commitless_syncs(history: History) -> None:
    assert history.last_good_commit("web") is None
    history.record(sync("web", 1.0, SyncResult.APPLIED, commit="good1"))
    history.record(sync("web", 2.0, SyncResult.FAILED, commit="bad"))
    history.record(sync("web", 3.0, SyncResult.SUSPENDED, commit=None))
    history.record(sync("db", 4.0, SyncResult.SYNCED, commit="other"))
    assert history.last_good_commit("web") == Commit("good1")
    history.record(sync("web", 5.0, SyncResult.PARTIAL, commit="good2"))
    assert history.last_good_commit("web") == Commit("good2")
    history.record(sync("web", 6.0, SyncResult.FAILED, commit="bad2"))
    assert history.last_good_commit("web") == Commit("good2")
    assert history.last_good_commit("db") == Commit("other")
    history.record(sync("new", 1.0, SyncResult.SYNCED, commit=None))
    assert history.last_good_commit("new") is None


def test_last_good_commit_keeps_all_commit_fields(history: History) -> None:
    history.record(FULL)
    assert history.last_good_commit("web") == FULL.commit


def test_counts(history: History) -> None:
    assert history.counts() == {}
    for t, result in enumerate([SyncResult.SYNCED, SyncResult.SYNCED, SyncResult.FAILED]):
        history.record(sync("web", float(t), result))
    history.record(sync("db", 1.0, SyncResult.APPLIED))
    assert history.counts() == {("web", "synced"): 2, ("web", "failed"): 1, ("db", "applied"): 1}


def test_events_newest_first(history: History) -> None:
    history.event("web", 10.0, "info", "sync started")
    history.event("web", 12.0, "error", "apply failed", "kvm1:vm/web-1")
    history.event("db", 11.0, "warning", "host slow")
    history.event("web", 12.0, "info", "same time, later row")
    web = history.events("web")
    assert [e["message"] for e in web] == ["same time, later row", "apply failed", "sync started"]
    assert web[1] == {"id": web[1]["id"], "project": "web", "time": 12.0, "level": "error",
                      "message": "apply failed", "object_id": "kvm1:vm/web-1"}
    assert web[0]["object_id"] == ""
    assert [e["project"] for e in history.events(None)] == ["web", "web", "db", "web"]
    assert len(history.events(None, limit=2)) == 2
    assert history.events("web", limit=0) == []


# Retention


def test_retention_keeps_the_newest_syncs_per_project(tmp_path: Path) -> None:
    with History(str(tmp_path / "h.db"), retention=3) as history:
        kept = [history.record(sync("web", t)) for t in (5.0, 1.0, 4.0, 2.0, 3.0)]
        db = [history.record(sync("db", t)) for t in (1.0, 2.0)]
        assert [s.started for s in history.syncs("web")] == [5.0, 4.0, 3.0]
        assert {s.id for s in history.syncs("web")} == {kept[0].id, kept[2].id, kept[4].id}
        assert history.syncs("db") == db[::-1]
        assert history.counts() == {("web", "synced"): 3, ("db", "synced"): 2}


def test_retention_among_equal_starts_drops_the_oldest_rows(tmp_path: Path) -> None:
    with History(str(tmp_path / "h.db"), retention=2) as history:
        rows = [history.record(sync("web", 7.0)) for _ in range(4)]
        assert history.syncs("web") == [rows[3], rows[2]]


def test_retention_of_events_is_five_times_the_syncs(tmp_path: Path) -> None:
    with History(str(tmp_path / "h.db"), retention=2) as history:
        for t in range(14):
            history.event("web", float(t), "info", f"event {t}")
        history.event("db", 0.0, "info", "alone")
        assert [e["time"] for e in history.events("web")] == [float(t) for t in range(13, 3, -1)]
        assert len(history.events("db")) == 1


def test_ids_are_never_reused_after_retention_and_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    with History(path, retention=1) as history:
        ids = [history.record(sync("web", float(t))).id or 0 for t in range(3)]
    with History(path, retention=1) as history:
        again = history.record(sync("web", 9.0)).id or 0
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert again > ids[-1]


def test_retention_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="retention"):
        History(str(tmp_path / "h.db"), retention=0)


# The file


def test_wal_mode_is_on(history: History) -> None:
    history.record(FULL)
    other = sqlite3.connect(history.path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        other.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_file_and_directory_are_private_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "kvmctl"
    path = directory / "history.db"
    old = os.umask(0o000)
    try:
        with History(str(path)) as history:
            history.record(FULL)
            history.event("web", 1.0, "info", "x")
            assert mode(directory) == 0o700
            assert mode(path) == 0o600
            for suffix in ("-wal", "-shm"):
                side = Path(str(path) + suffix)
                if side.exists():
                    assert mode(side) == 0o600
    finally:
        os.umask(old)


def test_directory_is_usable_under_a_strict_umask(tmp_path: Path) -> None:
    directory = tmp_path / "strict"
    old = os.umask(0o277)  # would leave makedirs a read-only directory
    try:
        with History(str(directory / "h.db")) as history:
            history.record(FULL)
    finally:
        os.umask(old)
    assert mode(directory) == 0o700
    assert mode(directory / "h.db") == 0o600


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with History(str(tmp_path / "h.db")):
        pass
    assert mode(tmp_path) == 0o755


def test_reopening_keeps_the_data(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    with History(path) as history:
        stored = history.record(FULL)
        history.event("web", 1.0, "info", "kept")
    with History(path) as history:
        assert history.syncs() == [stored]
        assert history.last_good_commit("web") == FULL.commit
        assert [e["message"] for e in history.events("web")] == ["kept"]


@pytest.mark.parametrize("content", [
    b"this is not a database, just some text\n" * 100,
    b"SQLite format 3\x00" + b"\xff" * 4000,
    bytes(range(256)) * 64,
])
def test_corrupt_file_is_a_usage_error_naming_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(content)
    with pytest.raises(UsageError) as caught:
        History(str(path))
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, HistoryError) and isinstance(caught.value, KvmctlError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 7")
    db.close()
    with pytest.raises(UsageError, match=r"schema version 7, newer than this kvmctl knows \(1\)"
                       ) as caught:
        History(str(path))
    assert str(path) in str(caught.value)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] != "wal"  # left as it was
    db.close()


def test_someone_elses_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE contacts (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(UsageError, match="contacts"):
        History(str(path))


def test_directory_that_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=str(blocker)):
        History(str(blocker / "sub" / "h.db"))


def test_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=str(tmp_path)):
        History(str(tmp_path))


def test_closed_history_refuses_politely(tmp_path: Path) -> None:
    history = History(str(tmp_path / "h.db"))
    history.close()
    history.close()
    with pytest.raises(UsageError, match="closed"):
        history.syncs()
    with pytest.raises(UsageError, match="closed"):
        history.record(FULL)


def test_unreadable_row_is_a_usage_error(history: History) -> None:
    history.record(FULL)
    other = sqlite3.connect(history.path)
    other.execute("UPDATE syncs SET result = 'exploded'")
    other.commit()
    other.close()
    with pytest.raises(UsageError, match="unreadable row"):
        history.syncs()


# Threads


def test_eight_threads_write_and_read_at_once(tmp_path: Path) -> None:
    per_thread = 40
    errors: list[BaseException] = []
    ids: list[int] = []
    ids_lock = threading.Lock()
    start = threading.Barrier(8)
    with History(str(tmp_path / "h.db"), retention=1000) as history:

        def work(n: int) -> None:
            try:
                start.wait()
                for i in range(per_thread):
                    rec = history.record(sync(f"p{n % 3}", float(i), SyncResult.APPLIED,
                                              summary=f"thread {n} #{i}"))
                    history.event(f"p{n % 3}", float(i), "info", f"thread {n} #{i}")
                    history.syncs(limit=5)
                    history.counts()
                    assert rec.id is not None
                    with ids_lock:
                        ids.append(rec.id)
            except BaseException as exc:  # reported below, from the test's own thread
                errors.append(exc)

        run_in_threads(work, 8)
        assert errors == []
        assert len(ids) == len(set(ids)) == 8 * per_thread
        assert sum(history.counts().values()) == 8 * per_thread
        assert len(history.syncs(limit=10_000)) == 8 * per_thread
        assert len(history.events(None, limit=10_000)) == 8 * per_thread
        summaries = {s.summary for s in history.syncs(limit=10_000)}
        assert summaries == {f"thread {n} #{i}" for n in range(8) for i in range(per_thread)}


def test_two_connections_to_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    with History(path) as writer, History(path) as reader:
        stored = writer.record(FULL)
        assert reader.syncs() == [stored]
