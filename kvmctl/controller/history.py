"""The controller's history of syncs and events, in an embedded SQLite database.

History is for people (the page, `kvmctl status`): the controller never decides anything from
it except which commit was last good, and even that it can do without. So every failure here
is reported as one HistoryError naming the file, and the controller goes on saying "history
unavailable" instead of stopping.

The file holds commit messages, author addresses and error texts: it and the directory made
for it are private to the controller's user, whatever its umask.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

from ..errors import UsageError
from ..sync.status import Commit, SyncRecord, SyncResult

SCHEMA_VERSION = 1
EVENTS_PER_SYNC = 5  # events kept per project: this many times the syncs kept

_SCHEMA = """
CREATE TABLE IF NOT EXISTS syncs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    trigger TEXT NOT NULL,
    result TEXT NOT NULL,
    commit_sha TEXT,
    commit_author TEXT,
    commit_email TEXT,
    commit_time REAL,
    commit_message TEXT,
    summary TEXT NOT NULL,
    changed TEXT NOT NULL,
    waiting TEXT NOT NULL,
    failed TEXT NOT NULL,
    errors TEXT NOT NULL,
    drift INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS syncs_by_project ON syncs (project, started, id);
CREATE INDEX IF NOT EXISTS syncs_by_time ON syncs (started, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    time REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    object_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_project ON events (project, time, id);
CREATE INDEX IF NOT EXISTS events_by_time ON events (time, id);
"""

_SYNC_COLUMNS = ("id, project, started, finished, trigger, result, commit_sha, commit_author, "
                 "commit_email, commit_time, commit_message, summary, changed, waiting, failed, "
                 "errors, drift")

T = TypeVar("T")


class HistoryError(UsageError):
    """The history database cannot be opened, read or written; the message names the file."""


class History:
    """Syncs and events of every project, newest `retention` syncs per project.

    One connection shared by the controller's threads and the web server's, each use under one
    lock: SQLite serialises writers anyway, and the lock keeps a transaction of one thread from
    taking in another thread's statements.
    """

    def __init__(self, path: str, retention: int = 1000) -> None:
        if retention < 1:
            raise HistoryError(f"history retention must be at least 1, not {retention}")
        self.path = path
        self.retention = retention
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            _create_private(path)
        except OSError as exc:
            raise HistoryError(f"history database {path}: {exc.strerror or exc}") from None
        try:
            self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                       check_same_thread=False)
            self._setup(self._db)
        except sqlite3.Error as exc:
            self._close_quietly()
            raise HistoryError(f"history database {path} cannot be used: {exc}") from None
        except HistoryError:
            self._close_quietly()
            raise
        _tighten(path)

    def _setup(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        self._check_version(version)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last syncs, no more
        if version == 0:
            db.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have created it since the first look.
                version = db.execute("PRAGMA user_version").fetchone()[0]
                self._check_version(version)
                if version == 0:
                    tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                        "AND name NOT LIKE 'sqlite_%'").fetchall()
                    if tables:
                        raise HistoryError(f"history database {self.path} holds tables of "
                                           f"something else ({tables[0][0]}, ...) and no "
                                           f"kvmctl schema version; move it away")
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise HistoryError(f"history database {self.path} has schema version {version}, "
                               f"newer than this kvmctl knows ({SCHEMA_VERSION}): written by "
                               f"a newer kvmctl; upgrade, or move the file away")
        if version < 0:
            raise HistoryError(f"history database {self.path} has schema version {version}, "
                               f"not one of kvmctl's")

    # Writing

    def record(self, rec: SyncRecord) -> SyncRecord:
        """Store a sync as a new row (its `id`, if any, is ignored) and return it with the id of
        the row; then forget the project's syncs beyond the newest `retention`. Every value
        reads back exactly, except lone surrogates outside the tuples (see _text)."""
        commit = rec.commit
        row = (_text(rec.project), rec.started, rec.finished, _text(rec.trigger),
               rec.result.value,
               None if commit is None else _text(commit.sha),
               None if commit is None else _text(commit.author),
               None if commit is None else _text(commit.email),
               None if commit is None else commit.time,
               None if commit is None else _text(commit.message),
               _text(rec.summary), json.dumps(list(rec.changed)), json.dumps(list(rec.waiting)),
               json.dumps([list(pair) for pair in rec.failed]), json.dumps(list(rec.errors)),
               rec.drift)

        def insert(db: sqlite3.Connection) -> int:
            with _transaction(db):
                cursor = db.execute(
                    "INSERT INTO syncs (project, started, finished, trigger, result, commit_sha, "
                    "commit_author, commit_email, commit_time, commit_message, summary, changed, "
                    "waiting, failed, errors, drift) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                row_id = cursor.lastrowid
                _keep_newest(db, "syncs", "started", row[0], self.retention)
            assert row_id is not None
            return row_id

        return replace(rec, id=self._use(insert))

    def event(self, project: str, time: float, level: str, message: str,
              object_id: str = "") -> None:
        """Store an event; the project keeps its newest `retention` × 5 events."""

        def insert(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute("INSERT INTO events (project, time, level, message, object_id) "
                           "VALUES (?, ?, ?, ?, ?)", (_text(project), time, _text(level),
                                                    _text(message), _text(object_id)))
                _keep_newest(db, "events", "time", _text(project),
                             self.retention * EVENTS_PER_SYNC)

        self._use(insert)

    # Reading

    def syncs(self, project: str | None = None, limit: int = 50) -> list[SyncRecord]:
        """Newest first (by start, then by row): of one project, or of all with None."""
        if limit <= 0:
            return []
        where, args = _project_filter(project)
        return self._use(lambda db: [_sync(row) for row in db.execute(
            f"SELECT {_SYNC_COLUMNS} FROM syncs {where} ORDER BY started DESC, id DESC LIMIT ?",
            (*args, limit))])

    def last(self, project: str) -> SyncRecord | None:
        found = self.syncs(project, 1)
        return found[0] if found else None

    def last_good_commit(self, project: str) -> Commit | None:
        """The commit of the newest sync that had one and did not fail (while it is kept)."""
        row = self._use(lambda db: db.execute(
            "SELECT commit_sha, commit_author, commit_email, commit_time, commit_message "
            "FROM syncs WHERE project = ? AND result != ? AND commit_sha IS NOT NULL "
            "ORDER BY started DESC, id DESC LIMIT 1",
            (_text(project), SyncResult.FAILED.value)).fetchone())
        return None if row is None else Commit(*row)

    def counts(self) -> dict[tuple[str, str], int]:
        """(project, result) -> syncs kept: what the page shows, after retention (the metrics
        count every sync since the controller started, apart from this)."""
        rows = self._use(lambda db: db.execute(
            "SELECT project, result, COUNT(*) FROM syncs GROUP BY project, result").fetchall())
        return {(project, result): count for project, result, count in rows}

    def events(self, project: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first: dicts with id, project, time, level, message, object_id."""
        if limit <= 0:
            return []
        where, args = _project_filter(project)
        rows = self._use(lambda db: db.execute(
            f"SELECT id, project, time, level, message, object_id FROM events {where} "
            "ORDER BY time DESC, id DESC LIMIT ?", (*args, limit)).fetchall())
        keys = ("id", "project", "time", "level", "message", "object_id")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Plumbing

    def _use(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._db is None:
                raise HistoryError(f"history database {self.path} is closed")
            try:
                return work(self._db)
            except sqlite3.Error as exc:
                raise HistoryError(f"history database {self.path}: {exc}") from None
            except (ValueError, TypeError) as exc:  # a row this kvmctl cannot read back
                raise HistoryError(f"history database {self.path} holds an unreadable row: "
                                   f"{exc}") from None

    def _close_quietly(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:  # some errors (a full disk) end the transaction themselves
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _keep_newest(db: sqlite3.Connection, table: str, order: str, project: str,
                 keep: int) -> None:
    """Delete the project's rows older than its newest `keep` (by `order`, then id)."""
    cut = db.execute(f"SELECT {order}, id FROM {table} WHERE project = ? "
                     f"ORDER BY {order} DESC, id DESC LIMIT 1 OFFSET ?",
                     (project, keep)).fetchone()
    if cut is not None:
        db.execute(f"DELETE FROM {table} WHERE project = ? AND ({order} < ? OR "
                   f"({order} = ? AND id <= ?))", (project, cut[0], cut[0], cut[1]))


def _text(value: str) -> str:
    """Text SQLite can store: git output decoded with surrogateescape may hold lone
    surrogates, which are not UTF-8; they become U+FFFD rather than lose the whole row. (The
    JSON columns escape them and keep them exactly.)"""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


def _project_filter(project: str | None) -> tuple[str, tuple[str, ...]]:
    return ("", ()) if project is None else ("WHERE project = ?", (_text(project),))


def _sync(row: tuple[Any, ...]) -> SyncRecord:
    (row_id, project, started, finished, trigger, result, sha, author, email, commit_time,
     message, summary, changed, waiting, failed, errors, drift) = row
    return SyncRecord(
        project=project, started=started, finished=finished, trigger=trigger,
        result=SyncResult(result),
        commit=None if sha is None else Commit(sha, author, email, commit_time, message),
        summary=summary,
        changed=tuple(json.loads(changed)), waiting=tuple(json.loads(waiting)),
        failed=tuple((str(what), str(why)) for what, why in json.loads(failed)),
        errors=tuple(json.loads(errors)), drift=drift, id=row_id)


def _create_private(path: str) -> None:
    """Create the directory (0700) and the file (0600) when missing, before SQLite opens the
    file with its own permissions. Existing ones are left as they are: an administrator may
    have chosen them."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _tighten(path: str) -> None:
    """SQLite gives the -wal and -shm files the main file's permissions filtered by the umask;
    make sure, should that change, that they are no wider than the main file."""
    try:
        allowed = os.stat(path).st_mode & 0o777
    except OSError:
        return
    for suffix in ("-wal", "-shm"):
        try:
            mode = os.stat(path + suffix).st_mode & 0o777
            if mode & ~allowed:
                os.chmod(path + suffix, mode & allowed)
        except OSError:
            pass
