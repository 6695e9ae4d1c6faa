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

The schema grows by migrations: an ordered list of small steps, each recorded
in ``schema_migrations`` when it runs; ``PRAGMA user_version`` mirrors the
last one, so opening a current ledger costs one pragma and an older abby
refuses a newer ledger by itself.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ..errors import Busy, ReadOnlyStore, StorageError
from .backend import (HISTORY_COLUMNS, ImageRow, Ledger, LedgerReader, LedgerWriter, ReservationRow,
                      TotalsAudit, Usage, UserUsage)

# --- migrations ---------------------------------------------------------------------

MIGRATIONS: list[tuple[int, str, Callable[[sqlite3.Connection], None]]] = []


def _migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    """Register the next schema step. Steps are never edited once released: a change is a new step."""
    MIGRATIONS.append((len(MIGRATIONS) + 1, fn.__name__, fn))
    return fn


def _run(conn: sqlite3.Connection, script: str) -> None:
    """Run a script statement by statement inside the caller's transaction
    (executescript would commit it first). Trigger bodies hold semicolons of their
    own, so statements are cut where SQLite says one is complete."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                conn.execute(pending)
            pending = ""


# IF NOT EXISTS in the first four steps: ledgers of versions 1-3 were made by one
# idempotent script, which these steps complete safely whatever it had made.
@_migration
def images_usage_reservations_daily(conn: sqlite3.Connection) -> None:
    _run(conn, """
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
""")


@_migration
def history(conn: sqlite3.Connection) -> None:
    """Every generation attempt, for `abby history` and `abby stats`."""
    _run(conn, """
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
    outcome    TEXT    NOT NULL,          -- success | filtered | refused-limit | rejected | failed | interrupted
    error_type TEXT,
    error      TEXT,
    image_id   INTEGER
);
CREATE INDEX IF NOT EXISTS history_by_time ON history(at);
CREATE INDEX IF NOT EXISTS history_by_user ON history(user_id, at);
""")


@_migration
def state(conn: sqlite3.Connection) -> None:
    """Flags about the ledger itself; 'rebuild' is set when a new ledger was created
    next to existing images (the old one was lost) and cleared once it is rebuilt."""
    conn.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT)")


@_migration
def deleting(conn: sqlite3.Connection) -> None:
    """Images being deleted: their rows leave `images` (no longer listed) but stay
    counted in the usage totals until their files are really gone. A delete or
    cleanup that dies half-way leaves them here, and the next cleanup or
    `check --fix` finishes the job: the quota never forgets a file on disk."""
    conn.execute("""
CREATE TABLE IF NOT EXISTS deleting (
    id         INTEGER PRIMARY KEY,
    user_id    TEXT    NOT NULL,
    rel_path   TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    format     TEXT,
    created_at REAL    NOT NULL,
    meta       TEXT,
    since      REAL    NOT NULL          -- Unix time the delete began
)""")


@_migration
def blob_keys(conn: sqlite3.Connection) -> None:
    """Rows name blob keys ('users/<dir>/<file>'), which any blob store maps under its
    own root, instead of paths under the local root ('images/users/...')."""
    for table in ("images", "deleting"):
        conn.execute(f"ALTER TABLE {table} RENAME COLUMN rel_path TO key")
        conn.execute(f"UPDATE {table} SET key = substr(key, 8) WHERE key LIKE 'images/%'")


SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, *, lost: Callable[[], bool] | None = None) -> list[str]:
    """Apply the steps this ledger lacks, all in one write transaction; returns their names.

    Ledgers from before the migrations table (versions 1-4) say how far they got in
    ``user_version``. ``lost`` is asked, for a brand-new ledger only, whether images
    exist without it (the old ledger was lost): then it is flagged for a rebuild.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                     "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
        done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
        now = time.time()
        if not done and version:
            conn.executemany("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                             [(v, name, now) for v, name, _ in MIGRATIONS if v <= version])
            done = set(range(1, version + 1))
        applied = []
        for number, name, step in MIGRATIONS:
            if number not in done:
                step(conn)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (number, name, now))
                applied.append(name)
        if version == 0 and lost is not None and lost():
            conn.execute("INSERT OR REPLACE INTO state VALUES ('rebuild', 'ledger lost')")
        conn.execute(f"PRAGMA user_version={max(SCHEMA_VERSION, version)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return applied


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


_IMAGE = "id, user_id, key, size, format, created_at, meta"


def _image(row: tuple | None) -> ImageRow | None:
    return None if row is None else ImageRow(*row)


class _Reader(LedgerReader):
    """Domain reads on a connection inside a transaction the ledger opened."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def usage(self, user_id: str) -> Usage:
        row = self._conn.execute("SELECT bytes, files, reserved FROM usage WHERE user_id = ?", (user_id,)).fetchone()
        return Usage(*row) if row else Usage(0, 0, 0)

    def totals(self) -> Usage:
        return Usage(*self._conn.execute("SELECT bytes, files, reserved FROM totals").fetchone())

    def daily_taken(self, user_id: str, day: str) -> tuple[int, int]:
        used = self._conn.execute("SELECT used FROM daily WHERE user_id = ? AND day = ?", (user_id, day)).fetchone()
        held = self._conn.execute("SELECT COUNT(*) FROM reservations WHERE user_id = ? AND day = ?",
                                  (user_id, day)).fetchone()[0]
        return (used[0] if used else 0), held

    def users_usage(self, day: str) -> list[UserUsage]:
        return [UserUsage(*r) for r in self._conn.execute(
            "SELECT u.user_id, u.bytes, u.files, u.reserved, COALESCE(d.used, 0) FROM usage u "
            "LEFT JOIN daily d ON d.user_id = u.user_id AND d.day = ? "
            "WHERE u.files > 0 OR u.reserved > 0 OR d.used > 0 ORDER BY u.bytes DESC, u.user_id", (day,))]

    def reservations(self, user_id: str | None = None) -> list[ReservationRow]:
        sql = "SELECT id, user_id, day, bytes, pid, host, created_at FROM reservations"
        rows = (self._conn.execute(sql + " WHERE user_id = ? ORDER BY id", (user_id,)) if user_id is not None
                else self._conn.execute(sql + " ORDER BY id"))
        return [ReservationRow(*r) for r in rows]

    def image(self, image_id: int) -> ImageRow | None:
        return _image(self._conn.execute(f"SELECT {_IMAGE} FROM images WHERE id = ?", (image_id,)).fetchone())

    def image_by_key(self, key: str) -> ImageRow | None:
        return _image(self._conn.execute(f"SELECT {_IMAGE} FROM images WHERE key = ?", (key,)).fetchone())

    def images(self, user_id: str | None = None, limit: int | None = None) -> list[ImageRow]:
        sql, args = f"SELECT {_IMAGE} FROM images", []
        if user_id is not None:
            sql += " WHERE user_id = ?"
            args.append(user_id)
        sql += " ORDER BY created_at DESC, id DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return [ImageRow(*r) for r in self._conn.execute(sql, args)]

    def images_created_before(self, cutoff: float, user_id: str | None = None) -> list[ImageRow]:
        where, args = _matching(None, cutoff, user_id)
        return [ImageRow(*r) for r in self._conn.execute(
            f"SELECT {_IMAGE} FROM images WHERE {where} ORDER BY created_at, id", args)]

    def pending_deletes(self, started_before: float | None = None) -> list[ImageRow]:
        sql, args = f"SELECT {_IMAGE} FROM deleting", []
        if started_before is not None:
            sql += " WHERE since < ?"
            args.append(started_before)
        return [ImageRow(*r) for r in self._conn.execute(sql + " ORDER BY created_at, id", args)]

    def count_images(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def blob_sizes(self) -> dict[str, int]:
        # Files of an interrupted delete are known too: `deleting` still counts them.
        return dict(self._conn.execute("SELECT key, size FROM images UNION ALL SELECT key, size FROM deleting"))

    def _truth(self) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
        """Per-user (bytes, files) summed over the rows, and reserved bytes summed over reservations."""
        truth = {u: (b, f) for u, b, f in self._conn.execute(
            "SELECT user_id, SUM(size), COUNT(*) FROM (SELECT user_id, size FROM images "
            "UNION ALL SELECT user_id, size FROM deleting) GROUP BY user_id")}
        held = dict(self._conn.execute("SELECT user_id, SUM(bytes) FROM reservations GROUP BY user_id").fetchall())
        return truth, held

    def audit_totals(self) -> TotalsAudit:
        truth, held = self._truth()
        recorded = {u: (b, f, r) for u, b, f, r in self._conn.execute(
            "SELECT user_id, bytes, files, reserved FROM usage")}
        wrong = sorted(u for u in set(truth) | set(recorded) | set(held)
                       if (truth.get(u, (0, 0)) + (held.get(u, 0),)) != recorded.get(u, (0, 0, 0)))
        want = (sum(b for b, _ in truth.values()), sum(f for _, f in truth.values()), sum(held.values()))
        total = tuple(self._conn.execute("SELECT bytes, files, reserved FROM totals").fetchone())
        return TotalsAudit(tuple(wrong), total != want)

    def over_quota(self, user_cap: int) -> list[tuple[str, int]]:
        return self._conn.execute("SELECT user_id, bytes FROM usage WHERE bytes > ? ORDER BY user_id",
                                  (user_cap,)).fetchall()

    def history(self, user_id: str | None = None, since: float | None = None,
                limit: int | None = None) -> list[tuple]:
        sql, args = f"SELECT {', '.join(HISTORY_COLUMNS)} FROM history WHERE 1 = 1", []
        if user_id is not None:
            sql += " AND user_id = ?"
            args.append(user_id)
        if since is not None:
            sql += " AND at >= ?"
            args.append(since)
        sql += " ORDER BY at DESC, id DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return self._conn.execute(sql, args).fetchall()

    # --- moving a store (abby migrate) ---------------------------------------------------
    def images_page(self, after_id: int, limit: int) -> list[ImageRow]:
        return [ImageRow(*r) for r in self._conn.execute(
            f"SELECT {_IMAGE} FROM images WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))]

    def _images_in(self, column: str, values: Sequence) -> list[ImageRow]:
        out = []
        values = list(values)
        for i in range(0, len(values), 500):  # well under SQLite's limit on bound parameters
            chunk = values[i:i + 500]
            out += [ImageRow(*r) for r in self._conn.execute(
                f"SELECT {_IMAGE} FROM images WHERE {column} IN ({','.join('?' * len(chunk))})", chunk)]
        return out

    def images_by_keys(self, keys: Sequence[str]) -> list[ImageRow]:
        return self._images_in("key", keys)

    def images_by_ids(self, ids: Sequence[int]) -> list[ImageRow]:
        return self._images_in("id", ids)

    def history_page(self, after_id: int, limit: int) -> list[tuple]:
        return self._conn.execute(f"SELECT {', '.join(HISTORY_COLUMNS)} FROM history WHERE id > ? "
                                  "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()

    def history_between(self, start: float, end: float) -> list[tuple]:
        return self._conn.execute(f"SELECT {', '.join(HISTORY_COLUMNS)} FROM history WHERE at BETWEEN ? AND ? "
                                  "ORDER BY id", (start, end)).fetchall()

    def daily_counts(self, day: str) -> dict[str, int]:
        return dict(self._conn.execute("SELECT user_id, used FROM daily WHERE day = ?", (day,)).fetchall())

    def setting(self, name: str) -> str | None:
        row = self._conn.execute("SELECT value FROM state WHERE key = ?", ("setting:" + name,)).fetchone()
        return row[0] if row else None


def _matching(ids: Sequence[int] | None, created_before: float | None, user_id: str | None) -> tuple[str, list]:
    where, args = ["1 = 1"], []
    if ids is not None:
        where.append(f"id IN ({','.join('?' * len(ids))})")
        args += list(ids)
    if created_before is not None:
        where.append("created_at <= ?")
        args.append(created_before)
    if user_id is not None:
        where.append("user_id = ?")
        args.append(user_id)
    return " AND ".join(where), args


class _Writer(_Reader, LedgerWriter):
    """Domain writes, inside a ``BEGIN IMMEDIATE`` transaction."""

    def next_image_id(self) -> int:
        # The write lock is ours, so the next AUTOINCREMENT value is ours too.
        return self._conn.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM sqlite_sequence WHERE name = 'images'").fetchone()[0]

    def insert_image(self, row: ImageRow) -> int:
        return self._conn.execute(
            "INSERT INTO images (id, user_id, key, size, format, created_at, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.user_id, row.key, row.size, row.format, row.created_at, row.meta)).lastrowid

    def insert_images(self, rows: Iterable[ImageRow]) -> None:
        self._conn.executemany(
            "INSERT OR IGNORE INTO images (id, user_id, key, size, format, created_at, meta) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((r.id, r.user_id, r.key, r.size, r.format, r.created_at, r.meta) for r in rows))

    def resize_image(self, image_id: int, size: int) -> None:
        self._conn.execute("UPDATE images SET size = ? WHERE id = ?", (size, image_id))

    def remove_image(self, image_id: int) -> None:
        self._conn.execute("DELETE FROM images WHERE id = ?", (image_id,))

    def begin_delete(self, *, ids: Sequence[int] | None = None, created_before: float | None = None,
                     user_id: str | None = None, limit: int) -> list[ImageRow]:
        where, args = _matching(ids, created_before, user_id)
        conn = self._conn
        # Copied and deleted in SQL, without a round trip through Python per row.
        conn.execute(
            "INSERT INTO deleting (id, user_id, key, size, format, created_at, meta, since) "
            f"SELECT id, user_id, key, size, format, created_at, meta, ? FROM images WHERE {where} "
            "ORDER BY created_at, id LIMIT ?", [time.time(), *args, limit])
        conn.execute("UPDATE bulk_delete SET active = 1")  # the per-row trigger would uncount them now
        # Rows already in `deleting` (an interrupted run's, a delete in flight) are no longer
        # in `images`: this removes exactly the rows just copied.
        rows = conn.execute(f"DELETE FROM images WHERE id IN (SELECT id FROM deleting) RETURNING {_IMAGE}").fetchall()
        conn.execute("UPDATE bulk_delete SET active = 0")
        rows.sort(key=lambda r: (r[5], r[0]))
        return [ImageRow(*r) for r in rows]

    def end_delete(self, gone: Sequence[ImageRow], kept: Sequence[ImageRow]) -> None:
        conn = self._conn
        rows = {r.id: r for r in [*gone, *kept]}
        settled: dict[int, ImageRow] = {}
        ids = list(rows)
        for i in range(0, len(ids), 500):  # well under SQLite's limit on bound parameters
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for (image_id,) in conn.execute(f"DELETE FROM deleting WHERE id IN ({marks}) RETURNING id", chunk):
                settled[image_id] = rows[image_id]
        per_user: dict[str, list[int]] = {}
        for row in settled.values():
            totals = per_user.setdefault(row.user_id, [0, 0])
            totals[0] += row.size
            totals[1] += 1
        conn.executemany("UPDATE usage SET bytes = bytes - ?, files = files - ? WHERE user_id = ?",
                         [(b, f, u) for u, (b, f) in per_user.items()])
        conn.execute("UPDATE totals SET bytes = bytes - ?, files = files - ?",
                     (sum(b for b, _ in per_user.values()), len(settled)))
        # Back in `images`, whose insert trigger counts them again. AUTOINCREMENT never
        # hands out an id twice, so the old id is still free.
        back = [settled[r.id] for r in kept if r.id in settled]
        conn.executemany(
            "INSERT INTO images (id, user_id, key, size, format, created_at, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(r.id, r.user_id, r.key, r.size, r.format, r.created_at, r.meta) for r in back])

    def reserve(self, user_id: str, day: str, nbytes: int, count: int, pid: int, host: str,
                now: float) -> list[int]:
        return [self._conn.execute(
            "INSERT INTO reservations (user_id, day, bytes, pid, host, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (user_id, day, nbytes, pid, host, now)).lastrowid for _ in range(count)]

    def release(self, reservation_id: int) -> bool:
        return self._conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,)).rowcount > 0

    def release_many(self, reservation_ids: Sequence[int]) -> None:
        self._conn.executemany("DELETE FROM reservations WHERE id = ?", [(i,) for i in reservation_ids])

    def count_generation(self, user_id: str, day: str) -> None:
        self._conn.execute("INSERT INTO daily (user_id, day, used) VALUES (?, ?, 1) "
                           "ON CONFLICT (user_id, day) DO UPDATE SET used = used + 1", (user_id, day))

    def repair_totals(self) -> None:
        truth, held = self._truth()
        self._conn.execute("DELETE FROM usage")
        self._conn.executemany(
            "INSERT INTO usage (user_id, bytes, files, reserved) VALUES (?, ?, ?, ?)",
            [(u, *truth.get(u, (0, 0)), held.get(u, 0)) for u in set(truth) | set(held)])
        self._conn.execute("UPDATE totals SET bytes = ?, files = ?, reserved = ?",
                           (sum(b for b, _ in truth.values()), sum(f for _, f in truth.values()),
                            sum(held.values())))

    def append_history(self, records: Sequence[tuple]) -> None:
        columns = HISTORY_COLUMNS[1:]
        self._conn.executemany(
            f"INSERT INTO history ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", records)

    # --- SQLite-only: the rebuild of a lost ledger ---------------------------------------
    def recount_daily_from_images(self, day: str, since: float) -> None:
        """The daily counters went with a lost ledger: count today's images instead, which
        counts imports as generations too: a user may be refused early, never allowed more."""
        self._conn.execute(
            "INSERT INTO daily (user_id, day, used) SELECT user_id, ?, COUNT(*) FROM images "
            "WHERE created_at >= ? GROUP BY user_id "
            "ON CONFLICT (user_id, day) DO UPDATE SET used = MAX(used, excluded.used)", (day, since))
        self._conn.execute("DELETE FROM state WHERE key = 'rebuild'")

    def raise_daily(self, day: str, counts: dict[str, int]) -> None:
        self._conn.executemany(
            "INSERT INTO daily (user_id, day, used) VALUES (?, ?, ?) "
            "ON CONFLICT (user_id, day) DO UPDATE SET used = MAX(used, excluded.used)",
            [(user, day, used) for user, used in counts.items()])

    def set_setting(self, name: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", ("setting:" + name, value))


class SqliteLedger(Ledger):
    """One connection per process, shared by threads under a lock.

    The connection is opened lazily so that building a StorageManager costs
    nothing until it is used. Where this user cannot write the store, the
    ledger is opened read-only: reads work, ``write()`` raises ReadOnlyStore.

    ``disk_has_images`` and ``rebuild`` come from the storage manager: when a
    ledger is created while image files exist, the old ledger was lost, and
    every process that opens it calls ``rebuild`` before using it, so no quota
    is ever served from an empty ledger.
    """

    name = "sqlite"

    def __init__(self, state_dir: Path, busy_timeout: float = 60.0, *,
                 disk_has_images: Callable[[], bool] | None = None, rebuild: Callable[[], None] | None = None):
        self.path = Path(state_dir) / "ledger.sqlite3"
        self.store_root = self.path.parent.parent
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._disk_has_images = disk_has_images
        self._rebuild = rebuild
        self._maintenance = None  # the maintenance FileLock, made on first use
        self.read_only = False
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file the connection has open

    def describe(self) -> str:
        return str(self.path)

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
                    raise ReadOnlyStore(f"the store {self.store_root} has no ledger yet, and this user "
                                        "cannot create one; run abby once as the store's owner")
                conn = connect_read_only(self.path)
                if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    conn.close()
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
        except sqlite3.Error as exc:
            raise convert_error(exc, self.path) from exc
        except OSError as exc:
            raise StorageError(f"cannot open the ledger {self.path}: {exc.strerror or exc}") from exc
        try:
            self._set_up(conn, fresh)
        except BaseException:
            conn.close()  # Windows keeps a file open by a leaked connection from being replaced
            raise
        return conn

    def _set_up(self, conn: sqlite3.Connection, fresh: bool) -> None:
        try:
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
        """Whether this ledger was made next to existing images and not yet rebuilt (SQLite-only)."""
        try:
            return self._conn.execute("SELECT 1 FROM state WHERE key = 'rebuild'").fetchone() is not None
        except sqlite3.Error as exc:
            raise convert_error(exc, self.path) from exc

    def open(self) -> None:
        with self._lock:
            self._connection()

    def _initialise(self, conn: sqlite3.Connection, fresh: bool) -> None:
        """Switch to WAL and migrate the schema, one process at a time.

        Several processes may open a new root at the same moment, and SQLite
        answers a concurrent journal-mode switch with "database is locked"
        at once instead of waiting, so the first set-up is serialised by a lock file.
        """
        from filelock import FileLock

        with FileLock(self.path.with_name("ledger.init.lock"), timeout=self._busy_timeout):
            conn.execute("PRAGMA journal_mode=WAL")
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                migrate(conn, lost=(lambda: fresh and self._disk_has_images is not None and self._disk_has_images()))

    @contextmanager
    def write(self) -> Iterator[_Writer]:
        """A write transaction holding the database's write lock from the start."""
        with self._lock:
            conn = self._connection()
            if self.read_only:
                raise ReadOnlyStore(f"the store {self.store_root} is read-only for this user; "
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
                yield _Writer(conn)
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
    def read(self) -> Iterator[_Reader]:
        """A read transaction: one consistent snapshot, never blocks writers."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN")
                try:
                    yield _Reader(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise convert_error(exc, self.path) from exc

    @contextmanager
    def maintenance_lock(self, timeout: float, writes: bool = True) -> Iterator[None]:
        """A lock file next to the ledger (re-entrant in this process).

        A run that only reads (a dry run, check without --fix) on a store this user
        cannot write goes on without the lock: it changes nothing it could race with.
        """
        from filelock import FileLock, Timeout

        state = self.path.parent
        if state.is_dir() and not os.access(state, os.W_OK):
            if writes:
                raise ReadOnlyStore(f"the store {self.store_root} is read-only for this user; this needs write "
                                    "access: run it as the store's owner")
            yield
            return
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {state}: {exc.strerror or exc}") from exc
        if self._maintenance is None:
            self._maintenance = FileLock(state / "maintenance.lock")
        try:
            self._maintenance.acquire(timeout=timeout)
        except Timeout:
            raise Busy(f"another abby cleanup or check is running on {self.store_root}; "
                       f"waited {timeout:g} s, giving up") from None
        except OSError as exc:
            raise StorageError(f"cannot take the lock in {state}: {exc.strerror or exc}") from exc
        try:
            yield
        finally:
            self._maintenance.release()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def open_read_only(self) -> None:
        """A read-only connection (``mode=ro``): reads see other processes' commits as usual,
        and this process never writes the ledger file, never upgrades or rebuilds it."""
        with self._lock:
            self.close()
            if not self.path.is_file():
                raise StorageError(f"there is no ledger {self.path}")
            try:
                conn = connect_read_only(self.path)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.Error as exc:
                raise convert_error(exc, self.path) from exc
            if version != SCHEMA_VERSION:
                conn.close()
                raise StorageError(
                    f"the ledger {self.path} was written by a newer abby (schema {version}); upgrade abby"
                    if version > SCHEMA_VERSION else
                    f"the ledger {self.path} needs an upgrade, which a read-only opening never makes; "
                    "run `abby check` on that store once first")
            self._conn, self.read_only, self._identity = conn, True, _file_identity(self.path)
            if self.needs_rebuild():
                self.close()
                raise StorageError(f"the ledger {self.path} was lost and is not rebuilt yet: "
                                   "run `abby check --fix` on that store first")

    def identity(self) -> tuple:
        return "sqlite", os.path.normcase(os.path.realpath(self.path))
