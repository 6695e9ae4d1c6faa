"""The SQLite ledger under ``<root>/.abby/``: images, usage totals, reservations, daily counters.

Why SQLite in WAL mode: several processes (the bot, the CLI, a cron cleanup)
share one root. ``BEGIN IMMEDIATE`` takes the database's single write lock
up front, so a quota check and the row that uses the quota happen in one
transaction and two processes can never both take the last megabyte or the
last daily slot. WAL lets readers (``abby quota``) run while a writer works.

Usage totals are kept by triggers, in the same transaction as the row that
changes them, so they are exact by construction and ``abby quota`` never walks
the folders. ``synchronous=NORMAL`` is enough: image files are fsynced before
their row is committed, so a power cut can at worst forget the last rows,
leaving files that ``abby check --fix`` adopts again; it can never leave a row
without its file.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import Busy, ReadOnlyStore, StorageError

# 2: history table; 3: state table; 4: deleting table (created in place: the schema script is idempotent)
SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT    NOT NULL,
    rel_path   TEXT    NOT NULL UNIQUE,   -- 'images/users/<dir>/<file>', always with '/'
    size       INTEGER NOT NULL,
    format     TEXT,
    created_at REAL    NOT NULL,          -- Unix time
    meta       TEXT                       -- JSON, generation parameters
);
CREATE INDEX IF NOT EXISTS images_by_user ON images(user_id, created_at);
CREATE INDEX IF NOT EXISTS images_by_age ON images(created_at);

CREATE TABLE IF NOT EXISTS usage (
    user_id  TEXT PRIMARY KEY,
    bytes    INTEGER NOT NULL DEFAULT 0,
    files    INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0   -- bytes held by generations in flight
);
CREATE TABLE IF NOT EXISTS totals (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    bytes    INTEGER NOT NULL,
    files    INTEGER NOT NULL,
    reserved INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0, 0);

-- A generation that has been allowed to call a paid API but has not finished.
CREATE TABLE IF NOT EXISTS reservations (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT    NOT NULL,
    day        TEXT    NOT NULL,          -- calendar day in daily_reset_timezone
    bytes      INTEGER NOT NULL,
    pid        INTEGER NOT NULL,
    host       TEXT    NOT NULL,
    created_at REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_user ON reservations(user_id, day);

-- Every generation attempt, for `abby history` and `abby stats`.
CREATE TABLE IF NOT EXISTS history (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL    NOT NULL,          -- Unix time the attempt started
    user_id    TEXT    NOT NULL,
    operation  TEXT    NOT NULL,          -- text-to-image | image-to-image | upscale
    provider   TEXT,
    model      TEXT,
    prompt     TEXT,
    seed       INTEGER,
    duration   REAL,                      -- seconds
    bytes      INTEGER,
    outcome    TEXT    NOT NULL,          -- success | filtered | refused-limit | rejected | failed
    error_type TEXT,
    error      TEXT,
    image_id   INTEGER
);
CREATE INDEX IF NOT EXISTS history_by_time ON history(at);
CREATE INDEX IF NOT EXISTS history_by_user ON history(user_id, at);

-- Flags about the ledger itself; 'rebuild' is set when a new ledger was created
-- next to existing images (the old one was lost) and cleared once it is rebuilt.
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT);

-- Images being deleted: their rows leave `images` (no longer listed) but stay
-- counted in the usage totals until their files are really gone. A delete or
-- cleanup that dies half-way leaves them here, and the next cleanup or
-- `check --fix` finishes the job: the quota never forgets a file on disk.
CREATE TABLE IF NOT EXISTS deleting (
    id         INTEGER PRIMARY KEY,
    user_id    TEXT    NOT NULL,
    rel_path   TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    format     TEXT,
    created_at REAL    NOT NULL,
    meta       TEXT,
    since      REAL    NOT NULL          -- Unix time the delete began
);

CREATE TABLE IF NOT EXISTS daily (
    user_id TEXT NOT NULL,
    day     TEXT NOT NULL,
    used    INTEGER NOT NULL,
    PRIMARY KEY (user_id, day)
);

CREATE TRIGGER IF NOT EXISTS images_ins AFTER INSERT ON images BEGIN
    INSERT INTO usage (user_id, bytes, files) VALUES (NEW.user_id, NEW.size, 1)
        ON CONFLICT (user_id) DO UPDATE SET bytes = bytes + NEW.size, files = files + 1;
    UPDATE totals SET bytes = bytes + NEW.size, files = files + 1;
END;
-- Bulk deletes (cleanup) switch the per-row trigger off and apply the summed
-- change themselves, in the same transaction: 50,000 rows cost one UPDATE per user.
CREATE TABLE IF NOT EXISTS bulk_delete (id INTEGER PRIMARY KEY CHECK (id = 1), active INTEGER NOT NULL);
INSERT OR IGNORE INTO bulk_delete VALUES (1, 0);

CREATE TRIGGER IF NOT EXISTS images_del AFTER DELETE ON images WHEN (SELECT active FROM bulk_delete) = 0 BEGIN
    UPDATE usage SET bytes = bytes - OLD.size, files = files - 1 WHERE user_id = OLD.user_id;
    UPDATE totals SET bytes = bytes - OLD.size, files = files - 1;
END;
CREATE TRIGGER IF NOT EXISTS images_resize AFTER UPDATE OF size ON images BEGIN
    UPDATE usage SET bytes = bytes - OLD.size + NEW.size WHERE user_id = NEW.user_id;
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS reservations_ins AFTER INSERT ON reservations BEGIN
    INSERT INTO usage (user_id, reserved) VALUES (NEW.user_id, NEW.bytes)
        ON CONFLICT (user_id) DO UPDATE SET reserved = reserved + NEW.bytes;
    UPDATE totals SET reserved = reserved + NEW.bytes;
END;
CREATE TRIGGER IF NOT EXISTS reservations_del AFTER DELETE ON reservations BEGIN
    UPDATE usage SET reserved = reserved - OLD.bytes WHERE user_id = OLD.user_id;
    UPDATE totals SET reserved = reserved - OLD.bytes;
END;
"""


# SQLite's primary result codes (the low byte of sqlite_errorcode).
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26


def convert_error(exc: sqlite3.Error, path: Path) -> StorageError:
    """One line for a SQLite error, chosen by its result code (not its text)."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (_BUSY, _LOCKED):
        return Busy(f"the ledger {path} stayed locked by another process; try again")
    if code == _FULL:
        return StorageError(f"the disk holding {path} is full")
    if code == _READONLY:
        return ReadOnlyStore(f"the ledger {path} is read-only for this user; run this as the store's owner")
    if code in (_CORRUPT, _NOTADB):
        return StorageError(f"the ledger {path} is damaged ({exc}); move it aside and run `abby check --fix`, "
                            "which rebuilds it from the images")
    if code == _CANTOPEN:
        return StorageError(f"cannot open the ledger {path}")
    if code == _IOERR:
        return StorageError(f"I/O error on the ledger {path}")
    return StorageError(f"ledger {path}: {exc}")


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that never writes, for stores this user may only read.

    A WAL database normally needs its -shm file, which a reader without write
    access cannot create; when no writer is active (no -wal file) the database
    is opened as immutable instead, which needs nothing but the file.
    """
    uri = path.resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if path.with_name(path.name + "-wal").exists():
            raise
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None, check_same_thread=False)


class Ledger:
    """One connection per process, shared by threads under a lock.

    The connection is opened lazily so that building a StorageManager costs
    nothing until it is used. Where this user cannot write the store, the
    ledger is opened read-only: reads work, ``write()`` raises ReadOnlyStore.

    ``disk_has_images`` and ``rebuild`` come from the storage manager: when a
    ledger is created while image files exist, the old ledger was lost, and
    every process that opens it calls ``rebuild`` before using it, so no quota
    is ever served from an empty ledger.
    """

    def __init__(self, state_dir: Path, busy_timeout: float = 60.0, *,
                 disk_has_images: Callable[[], bool] | None = None, rebuild: Callable[[], None] | None = None):
        self.path = state_dir / "ledger.sqlite3"
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._disk_has_images = disk_has_images
        self._rebuild = rebuild
        self.read_only = False
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file the connection has open

    def _writable(self) -> bool:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            return False
        except OSError as exc:
            if exc.errno == errno.EROFS:
                return False
            raise
        return os.access(folder, os.W_OK) and (not self.path.exists() or os.access(self.path, os.W_OK))

    def _connect(self) -> sqlite3.Connection:
        try:
            if not self._writable():
                if not self.path.exists():
                    raise ReadOnlyStore(f"the store {self.path.parent.parent} has no ledger yet, and this user "
                                        "cannot create one; run abby once as the store's owner")
                conn = connect_read_only(self.path)
                if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    raise ReadOnlyStore(f"the ledger {self.path} needs an upgrade, and this user cannot write it; "
                                        "run abby once as the store's owner")
                self.read_only = True
                self._identity = _file_identity(self.path)
                return conn
            # A ledger file that is missing or empty while images exist means the
            # ledger was lost; _initialise notes that under its lock.
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous=NORMAL")
            # A store of 200,000 images has a ledger of ~50 MB. The default 2 MB page cache
            # makes a bulk cleanup re-read index pages thousands of times; these are upper
            # bounds, used only as a big operation needs them.
            conn.execute("PRAGMA cache_size=-65536")
            conn.execute("PRAGMA mmap_size=268435456")
            conn.execute("PRAGMA temp_store=MEMORY")
            if (conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
                    or conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION):
                self._initialise(conn, fresh)
            self._identity = _file_identity(self.path)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(f"ledger {self.path} was written by a newer abby (schema {version}); upgrade abby")
        except sqlite3.Error as exc:
            raise convert_error(exc, self.path) from exc
        except OSError as exc:
            raise StorageError(f"cannot open the ledger {self.path}: {exc.strerror or exc}") from exc
        return conn

    def _connection(self) -> sqlite3.Connection:
        """The open connection; on first use, rebuild a lost ledger before anything reads it."""
        if self._conn is not None and _file_identity(self.path) != self._identity:
            # The ledger file was deleted or replaced under this process (an admin's rm,
            # a restored backup). Writing on would go to a file no other process sees, and
            # the quota would be kept twice: reopen, which rebuilds a lost ledger.
            self._conn.close()
            self._conn = None
        if self._conn is None:
            conn = self._connect()
            self._conn = conn
            try:
                if self.needs_rebuild():
                    if self.read_only or self._rebuild is None:
                        raise StorageError(f"the ledger {self.path} was lost and must be rebuilt from the images: "
                                           "run `abby check --fix` as the store's owner")
                    self._rebuild()
            except BaseException:
                self._conn = None
                conn.close()
                raise
        return self._conn

    def needs_rebuild(self) -> bool:
        try:
            return self._conn.execute("SELECT 1 FROM state WHERE key = 'rebuild'").fetchone() is not None
        except sqlite3.Error as exc:
            raise convert_error(exc, self.path) from exc

    def open(self) -> None:
        """Connect now (and rebuild a lost ledger now) rather than on first use."""
        with self._lock:
            self._connection()

    @staticmethod
    def begin_delete(conn: sqlite3.Connection, where: str, args: list, limit: int) -> list[tuple]:
        """Move up to ``limit`` image rows matching ``where`` (oldest first) to ``deleting``,
        inside the caller's write transaction. The usage totals still count them.

        Returns whole rows (id, user_id, rel_path, size, format, created_at, meta), oldest
        first; once their files are dealt with, ``end_delete`` settles them.
        """
        import time

        # Copied and deleted in SQL, without a round trip through Python per row.
        conn.execute(
            "INSERT INTO deleting (id, user_id, rel_path, size, format, created_at, meta, since) "
            f"SELECT id, user_id, rel_path, size, format, created_at, meta, ? FROM images WHERE {where} "
            "ORDER BY created_at, id LIMIT ?", [time.time(), *args, limit])
        conn.execute("UPDATE bulk_delete SET active = 1")  # the per-row trigger would uncount them now
        # Rows already in `deleting` (an interrupted run's, a delete in flight) are no longer
        # in `images`: this removes exactly the rows just copied.
        rows = conn.execute("DELETE FROM images WHERE id IN (SELECT id FROM deleting) "
                            "RETURNING id, user_id, rel_path, size, format, created_at, meta").fetchall()
        conn.execute("UPDATE bulk_delete SET active = 0")
        rows.sort(key=lambda r: (r[5], r[0]))
        return rows

    @staticmethod
    def end_delete(conn: sqlite3.Connection, gone: list[tuple], kept: list[tuple]) -> None:
        """Settle rows from ``begin_delete``: those whose file is ``gone`` leave the totals;
        ``kept`` ones (the file could not be removed) go back to ``images``.

        Only rows still in ``deleting`` are settled, so settling twice (a crashed run's
        rows finished by two runs) never uncounts anything twice.
        """
        rows = {r[0]: r for r in [*gone, *kept]}
        settled: dict[int, tuple] = {}
        ids = list(rows)
        for i in range(0, len(ids), 500):  # well under SQLite's limit on bound parameters
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for (image_id,) in conn.execute(f"DELETE FROM deleting WHERE id IN ({marks}) RETURNING id", chunk):
                settled[image_id] = rows[image_id]
        per_user: dict[str, list[int]] = {}
        for _id, user, _rel, size, *_ in settled.values():
            totals = per_user.setdefault(user, [0, 0])
            totals[0] += size
            totals[1] += 1
        conn.executemany("UPDATE usage SET bytes = bytes - ?, files = files - ? WHERE user_id = ?",
                         [(b, f, u) for u, (b, f) in per_user.items()])
        conn.execute("UPDATE totals SET bytes = bytes - ?, files = files - ?",
                     (sum(b for b, _ in per_user.values()), len(settled)))
        # Back in `images`, whose insert trigger counts them again. AUTOINCREMENT never
        # hands out an id twice, so the old id is still free.
        conn.executemany(
            "INSERT INTO images (id, user_id, rel_path, size, format, created_at, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [settled[r[0]] for r in kept if r[0] in settled],
        )

    def _initialise(self, conn: sqlite3.Connection, fresh: bool) -> None:
        """Switch to WAL and create the schema, one process at a time.

        Several processes may open a new root at the same moment, and SQLite
        answers a concurrent journal-mode switch with "database is locked"
        at once instead of waiting, so the first set-up is serialised by a lock file.
        """
        from filelock import FileLock

        with FileLock(self.path.with_name("ledger.init.lock"), timeout=self._busy_timeout):
            conn.execute("PRAGMA journal_mode=WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                lost = fresh and version == 0 and self._disk_has_images is not None and self._disk_has_images()
                flag = "INSERT OR REPLACE INTO state VALUES ('rebuild', 'ledger lost');" if lost else ""
                # IF NOT EXISTS throughout, so a half-made schema is completed safely.
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} {flag} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from the start."""
        with self._lock:
            conn = self._connection()
            if self.read_only:
                raise ReadOnlyStore(f"the store {self.path.parent.parent} is read-only for this user; "
                                    "this needs write access: run it as the store's owner")
            try:
                conn.execute("BEGIN IMMEDIATE")
                if _file_identity(self.path) != self._identity:
                    # Replaced while this process waited for the lock: start again on the new file.
                    conn.execute("ROLLBACK")
                    conn = self._connection()
                    conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise convert_error(exc, self.path) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise convert_error(exc, self.path) from exc
            except BaseException:
                self._rollback(conn)
                raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        # SQLite may already have rolled back by itself (for example on a full disk).
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot, never blocks writers."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise convert_error(exc, self.path) from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
