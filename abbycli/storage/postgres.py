"""The PostgreSQL ledger: the same tables and rules as the SQLite one, shared by many hosts.

Selected by ``storage.ledger_url = "postgresql://user:password@host:port/db"``; needs the
``postgres`` extra (psycopg 3 and psycopg_pool), imported only when configured.

How the contract of ``backend.py`` is kept across hosts:

* ``write()`` serialises writers: its first statement takes a transaction-level advisory
  lock (one key per store), so a quota check and the row that uses the quota commit
  together. Write transactions run in READ COMMITTED: every statement after the lock
  sees what the previous lock holder committed (REPEATABLE READ would keep the snapshot
  taken before the lock was granted, and check the quota against stale totals).
* ``read()`` is REPEATABLE READ, READ ONLY: one consistent snapshot over its several
  queries (a status reads totals, usage and the daily counter together), and MVCC never
  makes it wait for a writer nor a writer for it.
* The usage totals change in the same statement as the rows that change them (each
  write is one statement of data-modifying CTEs): exact by construction, one round trip.
* Image ids come from ``totals.next_image_id``, which only grows (inserts with an
  explicit id push it past that id), so an id is never handed out twice.
* The schema grows by an ordered list of steps recorded in ``schema_migrations``, the
  same mechanism as the SQLite ledger; any host migrates on first use, under an advisory
  lock, so concurrent first starts are safe.
* Maintenance (cleanup, check --fix) holds a session-level advisory lock on a
  connection of its own, one run at a time across every host sharing the store.

A store lives in one schema: ``schema=`` (created on first use), or the first schema
of the URL's search_path (``?options=-csearch_path%3Dname``), else ``public``. The
advisory lock keys are derived from the schema's name, so two stores in one database
do not wait for each other.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import zlib
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

from ..errors import Busy, ConfigError, ReadOnlyStore, StorageError
from .backend import (HISTORY_COLUMNS, ImageRow, Ledger, LedgerReader, LedgerWriter, ReservationRow,
                      TotalsAudit, Usage, UserUsage)

try:
    import psycopg
    from psycopg import errors as pgerrors
    from psycopg import sql as pgsql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # the extra is not installed: PostgresLedger() says so
    psycopg = None
else:
    # The pool reconnects in the background and logs each failure (several lines each).
    # Without this, Python's last-resort handler would print them under a CLI command;
    # an application that configures logging (the bot) still receives them.
    logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())

# --- migrations ---------------------------------------------------------------------

MIGRATIONS: list[tuple[int, str, Callable]] = []


def _migration(fn: Callable) -> Callable:
    """Register the next schema step. Steps are never edited once released: a change is a new step."""
    MIGRATIONS.append((len(MIGRATIONS) + 1, fn.__name__, fn))
    return fn


@_migration
def images_usage_reservations_daily(conn) -> None:
    conn.execute("""
CREATE TABLE images (
    id         bigint PRIMARY KEY,
    user_id    text   NOT NULL,
    key        text   NOT NULL UNIQUE,      -- the blob key, 'users/<dir>/<file>'
    size       bigint NOT NULL,
    format     text,
    created_at double precision NOT NULL,  -- Unix time
    meta       text                        -- JSON, generation parameters
);
CREATE INDEX images_by_user ON images (user_id, created_at);
CREATE INDEX images_by_age ON images (created_at);

-- Images being deleted: no longer listed, still counted until their blob is gone.
CREATE TABLE deleting (
    id         bigint PRIMARY KEY,
    user_id    text   NOT NULL,
    key        text   NOT NULL,
    size       bigint NOT NULL,
    format     text,
    created_at double precision NOT NULL,
    meta       text,
    since      double precision NOT NULL   -- Unix time the delete began
);

CREATE TABLE usage (
    user_id  text PRIMARY KEY,
    bytes    bigint NOT NULL DEFAULT 0,
    files    bigint NOT NULL DEFAULT 0,
    reserved bigint NOT NULL DEFAULT 0     -- bytes held by generations in flight
);
CREATE TABLE totals (
    id            int    PRIMARY KEY CHECK (id = 1),
    bytes         bigint NOT NULL,
    files         bigint NOT NULL,
    reserved      bigint NOT NULL,
    next_image_id bigint NOT NULL          -- only grows: an image id is never handed out twice
);
INSERT INTO totals VALUES (1, 0, 0, 0, 1);

-- A generation that has been allowed to call a paid API but has not finished.
CREATE TABLE reservations (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    text   NOT NULL,
    day        text   NOT NULL,            -- calendar day in daily_reset_timezone
    bytes      bigint NOT NULL,
    pid        bigint NOT NULL,
    host       text   NOT NULL,
    created_at double precision NOT NULL
);
CREATE INDEX reservations_by_user ON reservations (user_id, day);

CREATE TABLE daily (
    user_id text NOT NULL,
    day     text NOT NULL,
    used    int  NOT NULL,
    PRIMARY KEY (user_id, day)
);
""")


@_migration
def history(conn) -> None:
    """Every generation attempt, for `abby history` and `abby stats`."""
    conn.execute("""
CREATE TABLE history (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         double precision NOT NULL,
    user_id    text NOT NULL,
    operation  text NOT NULL,
    provider   text,
    model      text,
    prompt     text,
    seed       bigint,
    duration   double precision,
    bytes      bigint,
    outcome    text NOT NULL,
    error_type text,
    error      text,
    image_id   bigint
);
CREATE INDEX history_by_time ON history (at);
CREATE INDEX history_by_user ON history (user_id, at);
""")


@_migration
def settings(conn) -> None:
    """Facts about the store kept with its ledger: which image store its rows belong to."""
    conn.execute("CREATE TABLE settings (name text PRIMARY KEY, value text NOT NULL)")


SCHEMA_VERSION = len(MIGRATIONS)

# Advisory lock keys: (kind, crc32 of the schema name). 0x6162 is 'ab'.
_WRITE, _MIGRATE, _MAINTENANCE = 0x61620001, 0x61620002, 0x61620003


def _lock_key(schema: str) -> int:
    return zlib.crc32(schema.encode()) - 2**31  # into int4's range


# --- errors ---------------------------------------------------------------------------

def _one_line(exc: BaseException, secret: str | None) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.replace(secret, "***") if secret else text


def convert_error(exc: BaseException, where: str, secret: str | None = None) -> StorageError:
    """One line for a psycopg error, chosen by its SQLSTATE class (not its text)."""
    if psycopg is not None and isinstance(exc, PoolTimeout):
        return StorageError(f"no connection to the ledger {where} within the time-out; is the server up?")
    state = getattr(exc, "sqlstate", None) or ""
    detail = _one_line(exc, secret)
    if state == "55P03":  # lock_not_available: lock_timeout expired
        return Busy(f"the ledger {where} stayed locked by another process; try again")
    if state in ("42501", "25006"):  # insufficient_privilege, read_only_sql_transaction
        return ReadOnlyStore(f"the ledger {where} is read-only for this user; run this as the store's owner")
    if state == "23505":
        return StorageError(f"ledger {where}: an image with this id or key is already recorded ({detail})")
    if state.startswith("53"):  # insufficient resources: disk full, too many connections
        return StorageError(f"the ledger server {where} is out of resources: {detail}")
    if not state or state.startswith(("08", "57")):  # connection lost, server shutting down
        return StorageError(f"cannot reach the ledger {where}: {detail}")
    return StorageError(f"ledger {where}: {detail}")


# --- reads -----------------------------------------------------------------------------

_IMAGE = "id, user_id, key, size, format, created_at, meta"


class _Reader(LedgerReader):
    """Domain reads on a connection inside a transaction the ledger opened."""

    def __init__(self, conn, error: Callable[[BaseException], StorageError]):
        self._conn = conn
        self._error = error

    def _run(self, sql: str, args: Sequence | dict = ()):
        try:
            return self._conn.execute(sql, args)
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _all(self, sql: str, args: Sequence | dict = ()) -> list[tuple]:
        return self._run(sql, args).fetchall()

    def _one(self, sql: str, args: Sequence | dict = ()) -> tuple | None:
        return self._run(sql, args).fetchone()

    def usage(self, user_id: str) -> Usage:
        row = self._one("SELECT bytes, files, reserved FROM usage WHERE user_id = %s", (user_id,))
        return Usage(*row) if row else Usage(0, 0, 0)

    def totals(self) -> Usage:
        return Usage(*self._one("SELECT bytes, files, reserved FROM totals"))

    def daily_taken(self, user_id: str, day: str) -> tuple[int, int]:
        used, held = self._one(
            "SELECT (SELECT used FROM daily WHERE user_id = %(u)s AND day = %(d)s), "
            "(SELECT count(*) FROM reservations WHERE user_id = %(u)s AND day = %(d)s)", {"u": user_id, "d": day})
        return used or 0, held

    def users_usage(self, day: str) -> list[UserUsage]:
        return [UserUsage(*r) for r in self._all(
            "SELECT u.user_id, u.bytes, u.files, u.reserved, COALESCE(d.used, 0) FROM usage u "
            "LEFT JOIN daily d ON d.user_id = u.user_id AND d.day = %s "
            "WHERE u.files > 0 OR u.reserved > 0 OR d.used > 0 ORDER BY u.bytes DESC, u.user_id", (day,))]

    def reservations(self, user_id: str | None = None) -> list[ReservationRow]:
        sql = "SELECT id, user_id, day, bytes, pid, host, created_at FROM reservations"
        rows = (self._all(sql + " WHERE user_id = %s ORDER BY id", (user_id,)) if user_id is not None
                else self._all(sql + " ORDER BY id"))
        return [ReservationRow(*r) for r in rows]

    def image(self, image_id: int) -> ImageRow | None:
        row = self._one(f"SELECT {_IMAGE} FROM images WHERE id = %s", (image_id,))
        return None if row is None else ImageRow(*row)

    def image_by_key(self, key: str) -> ImageRow | None:
        row = self._one(f"SELECT {_IMAGE} FROM images WHERE key = %s", (key,))
        return None if row is None else ImageRow(*row)

    def images(self, user_id: str | None = None, limit: int | None = None) -> list[ImageRow]:
        sql, args = f"SELECT {_IMAGE} FROM images", []
        if user_id is not None:
            sql += " WHERE user_id = %s"
            args.append(user_id)
        sql += " ORDER BY created_at DESC, id DESC"
        if limit:
            sql += " LIMIT %s"
            args.append(limit)
        return [ImageRow(*r) for r in self._all(sql, args)]

    def images_created_before(self, cutoff: float, user_id: str | None = None) -> list[ImageRow]:
        where, args = _matching(None, cutoff, user_id)
        return [ImageRow(*r) for r in self._all(f"SELECT {_IMAGE} FROM images WHERE {where} "
                                                "ORDER BY created_at, id", args)]

    def pending_deletes(self, started_before: float | None = None) -> list[ImageRow]:
        sql, args = f"SELECT {_IMAGE} FROM deleting", []
        if started_before is not None:
            sql += " WHERE since < %s"
            args.append(started_before)
        return [ImageRow(*r) for r in self._all(sql + " ORDER BY created_at, id", args)]

    def count_images(self) -> int:
        return self._one("SELECT count(*) FROM images")[0]

    def blob_sizes(self) -> dict[str, int]:
        return dict(self._all("SELECT key, size FROM images UNION ALL SELECT key, size FROM deleting"))

    def _truth(self) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
        """Per-user (bytes, files) summed over the rows, and reserved bytes summed over reservations."""
        truth = {u: (int(b), f) for u, b, f in self._all(
            "SELECT user_id, sum(size), count(*) FROM (SELECT user_id, size FROM images "
            "UNION ALL SELECT user_id, size FROM deleting) AS rows GROUP BY user_id")}
        held = {u: int(b) for u, b in self._all("SELECT user_id, sum(bytes) FROM reservations GROUP BY user_id")}
        return truth, held

    def audit_totals(self) -> TotalsAudit:
        truth, held = self._truth()
        recorded = {u: (b, f, r) for u, b, f, r in self._all("SELECT user_id, bytes, files, reserved FROM usage")}
        wrong = sorted(u for u in set(truth) | set(recorded) | set(held)
                       if (truth.get(u, (0, 0)) + (held.get(u, 0),)) != recorded.get(u, (0, 0, 0)))
        want = (sum(b for b, _ in truth.values()), sum(f for _, f in truth.values()), sum(held.values()))
        return TotalsAudit(tuple(wrong), tuple(self._one("SELECT bytes, files, reserved FROM totals")) != want)

    def over_quota(self, user_cap: int) -> list[tuple[str, int]]:
        return self._all("SELECT user_id, bytes FROM usage WHERE bytes > %s ORDER BY user_id", (user_cap,))

    def history(self, user_id: str | None = None, since: float | None = None,
                limit: int | None = None) -> list[tuple]:
        sql, args = f"SELECT {', '.join(HISTORY_COLUMNS)} FROM history WHERE true", []
        if user_id is not None:
            sql += " AND user_id = %s"
            args.append(user_id)
        if since is not None:
            sql += " AND at >= %s"
            args.append(since)
        sql += " ORDER BY at DESC, id DESC"
        if limit:
            sql += " LIMIT %s"
            args.append(limit)
        return self._all(sql, args)

    # --- moving a store (abby migrate) ---------------------------------------------------
    def images_page(self, after_id: int, limit: int) -> list[ImageRow]:
        return [ImageRow(*r) for r in self._all(
            f"SELECT {_IMAGE} FROM images WHERE id > %s ORDER BY id LIMIT %s", (after_id, limit))]

    def images_by_keys(self, keys: Sequence[str]) -> list[ImageRow]:
        return [ImageRow(*r) for r in self._all(f"SELECT {_IMAGE} FROM images WHERE key = ANY(%s)", (list(keys),))]

    def images_by_ids(self, ids: Sequence[int]) -> list[ImageRow]:
        return [ImageRow(*r) for r in self._all(f"SELECT {_IMAGE} FROM images WHERE id = ANY(%s)", (list(ids),))]

    def history_page(self, after_id: int, limit: int) -> list[tuple]:
        return self._all(f"SELECT {', '.join(HISTORY_COLUMNS)} FROM history WHERE id > %s ORDER BY id LIMIT %s",
                         (after_id, limit))

    def history_between(self, start: float, end: float) -> list[tuple]:
        return self._all(f"SELECT {', '.join(HISTORY_COLUMNS)} FROM history WHERE at BETWEEN %s AND %s ORDER BY id",
                         (start, end))

    def daily_counts(self, day: str) -> dict[str, int]:
        return dict(self._all("SELECT user_id, used FROM daily WHERE day = %s", (day,)))

    def setting(self, name: str) -> str | None:
        rows = self._all("SELECT value FROM settings WHERE name = %s", (name,))
        return rows[0][0] if rows else None


def _matching(ids: Sequence[int] | None, created_before: float | None, user_id: str | None) -> tuple[str, list]:
    where, args = ["true"], []
    if ids is not None:
        where.append("id = ANY(%s)")
        args.append(list(ids))
    if created_before is not None:
        where.append("created_at <= %s")
        args.append(created_before)
    if user_id is not None:
        where.append("user_id = %s")
        args.append(user_id)
    return " AND ".join(where), args


# --- writes: every statement changes its rows and their totals together -----------------

# Rows given as arrays; ids left NULL are numbered from next_image_id (or past the largest
# id given, so a generated id never meets a given one); next_image_id moves past them all.
_INSERT_IMAGES = """
WITH given AS (
    SELECT * FROM unnest(%(id)s::bigint[], %(user_id)s::text[], %(key)s::text[], %(size)s::bigint[],
                         %(format)s::text[], %(created_at)s::float8[], %(meta)s::text[])
                  WITH ORDINALITY AS g(id, user_id, key, size, format, created_at, meta, n)),
base AS (SELECT GREATEST((SELECT next_image_id FROM totals), (SELECT COALESCE(max(id), 0) + 1 FROM given)) AS v),
numbered AS (
    SELECT COALESCE(id, (SELECT v FROM base) - 1 + row_number() OVER (PARTITION BY id IS NULL ORDER BY n)) AS id,
           user_id, key, size, format, created_at, meta, n
    FROM given),
ins AS (
    INSERT INTO images (id, user_id, key, size, format, created_at, meta)
    SELECT id, user_id, key, size, format, created_at, meta FROM numbered ORDER BY n
    {conflict} RETURNING id, user_id, size),
per AS (SELECT user_id, sum(size) AS b, count(*) AS f FROM ins GROUP BY user_id),
u AS (
    INSERT INTO usage (user_id, bytes, files) SELECT user_id, b, f FROM per
    ON CONFLICT (user_id) DO UPDATE SET bytes = usage.bytes + excluded.bytes, files = usage.files + excluded.files),
t AS (
    UPDATE totals SET bytes = bytes + (SELECT COALESCE(sum(size), 0) FROM ins),
                      files = files + (SELECT count(*) FROM ins),
                      next_image_id = GREATEST(next_image_id, (SELECT COALESCE(max(id), 0) + 1 FROM ins)))
SELECT id FROM ins
"""

_RELEASE = """
WITH del AS (DELETE FROM reservations WHERE id = ANY(%s) RETURNING user_id, bytes),
per AS (SELECT user_id, sum(bytes) AS b FROM del GROUP BY user_id),
u AS (UPDATE usage SET reserved = usage.reserved - per.b FROM per WHERE usage.user_id = per.user_id),
t AS (UPDATE totals SET reserved = reserved - (SELECT COALESCE(sum(bytes), 0) FROM del))
SELECT count(*) FROM del
"""

class _Writer(_Reader, LedgerWriter):
    """Domain writes, inside a transaction that holds the store's write lock."""

    def next_image_id(self) -> int:
        return self._one("SELECT next_image_id FROM totals")[0]

    def _insert(self, rows: Sequence[ImageRow], skip_taken: bool) -> list[int]:
        columns = {c: [getattr(r, c) for r in rows]
                   for c in ("id", "user_id", "key", "size", "format", "created_at", "meta")}
        sql = _INSERT_IMAGES.format(conflict="ON CONFLICT DO NOTHING" if skip_taken else "")
        return [i for (i,) in self._all(sql, columns)]

    def insert_image(self, row: ImageRow) -> int:
        return self._insert([row], skip_taken=False)[0]

    def insert_images(self, rows: Iterable[ImageRow]) -> None:
        rows = list(rows)
        if rows:
            self._insert(rows, skip_taken=True)

    def resize_image(self, image_id: int, size: int) -> None:
        self._run("""
WITH old AS (SELECT id, size FROM images WHERE id = %(id)s),
upd AS (UPDATE images i SET size = %(size)s FROM old WHERE i.id = old.id RETURNING i.user_id, i.size - old.size AS d),
u AS (UPDATE usage SET bytes = usage.bytes + upd.d FROM upd WHERE usage.user_id = upd.user_id)
UPDATE totals SET bytes = totals.bytes + upd.d FROM upd""", {"id": image_id, "size": size})

    def remove_image(self, image_id: int) -> None:
        self._run("""
WITH del AS (DELETE FROM images WHERE id = %s RETURNING user_id, size),
u AS (UPDATE usage SET bytes = usage.bytes - del.size, files = usage.files - 1 FROM del
      WHERE usage.user_id = del.user_id)
UPDATE totals SET bytes = totals.bytes - del.size, files = totals.files - 1 FROM del""", (image_id,))

    def begin_delete(self, *, ids: Sequence[int] | None = None, created_before: float | None = None,
                     user_id: str | None = None, limit: int) -> list[ImageRow]:
        where, args = _matching(ids, created_before, user_id)
        # Moved in SQL, without a round trip through Python per row; the totals keep counting them.
        rows = self._all(f"""
WITH moved AS (
    DELETE FROM images WHERE id IN (SELECT id FROM images WHERE {where} ORDER BY created_at, id LIMIT %s)
    RETURNING {_IMAGE}),
ins AS (INSERT INTO deleting ({_IMAGE}, since) SELECT {_IMAGE}, %s FROM moved)
SELECT {_IMAGE} FROM moved ORDER BY created_at, id""", [*args, limit, time.time()])
        return [ImageRow(*r) for r in rows]

    def end_delete(self, gone: Sequence[ImageRow], kept: Sequence[ImageRow]) -> None:
        if not gone and not kept:
            return
        # Only rows still pending are settled: gone ones leave the totals, kept ones are
        # listed again under their id (still counted, so the totals do not move for them).
        self._run(f"""
WITH settled AS (DELETE FROM deleting WHERE id = ANY(%(gone)s) OR id = ANY(%(kept)s) RETURNING {_IMAGE}),
back AS (INSERT INTO images ({_IMAGE}) SELECT {_IMAGE} FROM settled WHERE id = ANY(%(kept)s)),
out AS (SELECT user_id, size FROM settled WHERE id = ANY(%(gone)s) AND NOT id = ANY(%(kept)s)),
per AS (SELECT user_id, sum(size) AS b, count(*) AS f FROM out GROUP BY user_id),
u AS (UPDATE usage SET bytes = usage.bytes - per.b, files = usage.files - per.f FROM per
      WHERE usage.user_id = per.user_id)
UPDATE totals SET bytes = bytes - (SELECT COALESCE(sum(size), 0) FROM out), files = files - (SELECT count(*) FROM out)
""", {"gone": [r.id for r in gone], "kept": [r.id for r in kept]})

    def reserve(self, user_id: str, day: str, nbytes: int, count: int, pid: int, host: str,
                now: float) -> list[int]:
        if count <= 0:
            return []
        return [i for (i,) in self._all("""
WITH ins AS (
    INSERT INTO reservations (user_id, day, bytes, pid, host, created_at)
    SELECT %(u)s, %(day)s, %(b)s, %(pid)s, %(host)s, %(now)s FROM generate_series(1, %(n)s) RETURNING id),
u AS (INSERT INTO usage (user_id, reserved) VALUES (%(u)s, %(b)s * %(n)s)
      ON CONFLICT (user_id) DO UPDATE SET reserved = usage.reserved + excluded.reserved),
t AS (UPDATE totals SET reserved = reserved + %(b)s * %(n)s)
SELECT id FROM ins ORDER BY id""", {"u": user_id, "day": day, "b": nbytes, "pid": pid, "host": host,
                                       "now": now, "n": count})]

    def release(self, reservation_id: int) -> bool:
        return self._one(_RELEASE, ([reservation_id],))[0] > 0

    def release_many(self, reservation_ids: Sequence[int]) -> None:
        if reservation_ids:  # the reserve path calls this on every reservation, usually empty
            self._run(_RELEASE, (list(reservation_ids),))

    def count_generation(self, user_id: str, day: str) -> None:
        self._run("INSERT INTO daily (user_id, day, used) VALUES (%s, %s, 1) "
                           "ON CONFLICT (user_id, day) DO UPDATE SET used = daily.used + 1", (user_id, day))

    def repair_totals(self) -> None:
        self._run("""
DELETE FROM usage;
INSERT INTO usage (user_id, bytes, files, reserved)
SELECT user_id, COALESCE(sum(size), 0), count(size), COALESCE(sum(held), 0) FROM (
    SELECT user_id, size, NULL::bigint AS held FROM images
    UNION ALL SELECT user_id, size, NULL FROM deleting
    UNION ALL SELECT user_id, NULL, bytes FROM reservations) AS rows
GROUP BY user_id;
UPDATE totals SET bytes = (SELECT COALESCE(sum(bytes), 0) FROM usage),
                  files = (SELECT COALESCE(sum(files), 0) FROM usage),
                  reserved = (SELECT COALESCE(sum(reserved), 0) FROM usage),
                  next_image_id = GREATEST(next_image_id, (SELECT COALESCE(max(id), 0) + 1 FROM images),
                                           (SELECT COALESCE(max(id), 0) + 1 FROM deleting));
""")

    def append_history(self, records: Sequence[tuple]) -> None:
        columns = HISTORY_COLUMNS[1:]
        try:
            with self._conn.cursor() as cur:
                cur.executemany(f"INSERT INTO history ({', '.join(columns)}) "
                                f"VALUES ({', '.join(['%s'] * len(columns))})", records)
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def raise_daily(self, day: str, counts: dict[str, int]) -> None:
        if counts:
            self._run("INSERT INTO daily (user_id, day, used) SELECT u, %s, n FROM unnest(%s::text[], %s::int[]) "
                      "AS c(u, n) ON CONFLICT (user_id, day) DO UPDATE SET used = GREATEST(daily.used, excluded.used)",
                      (day, list(counts), list(counts.values())))


# --- the ledger ----------------------------------------------------------------------------

    def set_setting(self, name: str, value: str) -> None:
        self._run("INSERT INTO settings (name, value) VALUES (%s, %s) "
                  "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", (name, value))


class PostgresLedger(Ledger):
    """A store's ledger in PostgreSQL; one object shared by a process's threads.

    Connections come from a small pool (opened lazily, on first use): threads read
    in parallel, and writers queue on the database's lock, not on a Python one.
    """

    name = "postgres"

    def __init__(self, url: str, *, schema: str | None = None, lock_timeout: float = 60.0,
                 connect_timeout: float = 10.0, pool_size: int = 4):
        if psycopg is None:
            raise ConfigError("storage.ledger_url names a PostgreSQL ledger, which needs psycopg: "
                              "pip install 'abbycli[postgres]'")
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error:
            # libpq's message may quote the URL, password included: say it without.
            raise ConfigError("storage.ledger_url is not a valid PostgreSQL URL; expected "
                              "postgresql://user:password@host:port/database") from None
        if schema is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            # Unquoted in search_path, so only names PostgreSQL keeps as written.
            raise ConfigError(f"the ledger schema must be lower-case letters, digits and '_', got {schema!r}")
        self._secret = params.get("password") or None
        host = params.get("host") or params.get("hostaddr") or "localhost"
        database = params.get("dbname") or params.get("user") or ""
        self._where = f"postgresql://{host}:{params.get('port') or 5432}/{database}"
        options = params.get("options") or ""
        if schema is not None:
            options += f" -c search_path={schema}"
        extra = {"options": options.strip()} if options.strip() else {}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = str(max(1, round(connect_timeout)))
        self._conninfo = make_conninfo(url, **extra)
        self._wanted_schema = schema
        self._lock_timeout_ms = max(1, int(lock_timeout * 1000))
        self._connect_timeout = connect_timeout
        self._pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._schema: str | None = None
        self._begin_write = ""
        self._opening = threading.Lock()
        self._held = threading.local()  # how deep this thread is in maintenance_lock()
        self.read_only = False

    def describe(self) -> str:
        return self._where

    def _error(self, exc: BaseException) -> StorageError:
        return convert_error(exc, self._where, self._secret)

    def _connect(self):
        """A connection of its own (migration, maintenance lock), outside the pool."""
        try:
            return psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    # --- opening and migrating ---------------------------------------------------------
    def open(self) -> None:
        self._get_pool()

    def _get_pool(self) -> ConnectionPool:
        pool = self._pool
        if pool is not None:
            return pool
        with self._opening:
            if self._pool is None:
                # Connected and migrated here, in the caller's thread, so that a server
                # that is down or a wrong password is reported at once with its cause
                # (the pool connects in the background and would only time out).
                with self._connect() as conn:
                    try:
                        self._schema = self._migrate(conn)
                        self.read_only = not conn.execute(
                            "SELECT has_table_privilege('images', 'INSERT, UPDATE, DELETE') "
                            "AND NOT pg_is_in_recovery()").fetchone()[0]
                    except psycopg.Error as exc:
                        raise self._error(exc) from exc
                self._begin_write = (f"BEGIN; SET LOCAL lock_timeout = {self._lock_timeout_ms}; "
                                     f"SELECT pg_advisory_xact_lock({_WRITE}, {_lock_key(self._schema)})")
                self._pool = ConnectionPool(
                    self._conninfo, min_size=1, max_size=self._pool_size, kwargs={"autocommit": True},
                    timeout=self._connect_timeout, name="abby-ledger", open=True)
            return self._pool

    def _migrate(self, conn) -> str:
        """Bring the schema up to date; returns the schema's name. Cheap when it is current."""
        if self._wanted_schema is None and conn.execute("SELECT current_schema()").fetchone()[0] is None:
            raise StorageError(f"the search_path of {self._where} names no existing schema; create it first")
        try:
            version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
        except (pgerrors.UndefinedTable, pgerrors.InvalidSchemaName):
            version = 0
        if version < SCHEMA_VERSION:
            try:
                self._apply_migrations(conn)
            except pgerrors.InsufficientPrivilege:
                raise ReadOnlyStore(f"the ledger {self._where} needs its tables made or upgraded, and this user "
                                    "may not; run abby once as the store's owner") from None
            version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(f"ledger {self._where} was written by a newer abby (schema {version}); upgrade abby")
        return conn.execute("SELECT current_schema()").fetchone()[0]

    def _apply_migrations(self, conn) -> list[str]:
        """The missing steps in one transaction, under an advisory lock: hosts starting
        together take turns, and the later ones find the work done."""
        schema = self._wanted_schema or conn.execute("SELECT current_schema()").fetchone()[0]
        applied = []
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_MIGRATE, _lock_key(schema)))
            if self._wanted_schema is not None:
                conn.execute(pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                    pgsql.Identifier(self._wanted_schema)))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                         "(version int PRIMARY KEY, name text NOT NULL, applied_at double precision NOT NULL)")
            done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
            for number, name, step in MIGRATIONS:
                if number not in done:
                    step(conn)
                    conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)", (number, name, time.time()))
                    applied.append(name)
        return applied

    # --- transactions ----------------------------------------------------------------------
    @contextmanager
    def _transaction(self, begin: str) -> Iterator:
        pool = self._get_pool()
        for attempt in (1, 2):
            try:
                conn = pool.getconn()
            except PoolTimeout as exc:
                # The pool only says it waited; one direct attempt says why (refused, bad password).
                self._connect().close()
                raise self._error(exc) from exc
            try:
                conn.execute(begin)
                break
            except psycopg.Error as exc:
                broken = conn.broken
                self._put_back(pool, conn)
                # A pooled connection that died while idle (a server restart): nothing ran
                # yet, so starting again is safe, once, after the pool has replaced every
                # dead connection it holds.
                if not broken or attempt == 2:
                    raise self._error(exc) from exc
                pool.check()
        try:
            yield conn
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            self._rollback(conn)
            raise self._error(exc) from exc
        except BaseException:
            self._rollback(conn)
            raise
        finally:
            self._put_back(pool, conn)

    @staticmethod
    def _rollback(conn) -> None:
        if not conn.broken:
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error:
                pass  # the connection goes back broken; the pool throws it away

    @staticmethod
    def _put_back(pool, conn) -> None:
        if not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            PostgresLedger._rollback(conn)
        pool.putconn(conn)

    @contextmanager
    def write(self) -> Iterator[_Writer]:
        """A READ COMMITTED transaction that holds the store's write lock from its first statement."""
        self._get_pool()
        if self.read_only:
            raise ReadOnlyStore(f"the ledger {self._where} is read-only for this user; "
                                "this needs write access: run it as the store's owner")
        with self._transaction(self._begin_write) as conn:
            yield _Writer(conn, self._error)

    @contextmanager
    def read(self) -> Iterator[_Reader]:
        """One consistent snapshot (REPEATABLE READ); never waits for writers."""
        with self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as conn:
            yield _Reader(conn, self._error)

    @contextmanager
    def maintenance_lock(self, timeout: float, writes: bool = True) -> Iterator[None]:
        """A session advisory lock on a connection of its own, held for the whole run;
        re-entrant within a thread (like the SQLite ledger's lock file)."""
        self._get_pool()
        if writes and self.read_only:
            raise ReadOnlyStore(f"the ledger {self._where} is read-only for this user; this needs write "
                                "access: run it as the store's owner")
        held = self._held
        if getattr(held, "depth", 0):
            held.depth += 1
            try:
                yield
            finally:
                held.depth -= 1
            return
        conn = self._connect()
        try:
            key = (_MAINTENANCE, _lock_key(self._schema))
            try:
                if timeout > 0:
                    conn.execute(f"SET lock_timeout = {max(1, int(timeout * 1000))}")
                    conn.execute("SELECT pg_advisory_lock(%s, %s)", key)
                    got = True
                else:  # lock_timeout = 0 would mean waiting for ever
                    got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()[0]
            except pgerrors.LockNotAvailable:
                got = False
            except psycopg.Error as exc:
                raise self._error(exc) from exc
            if not got:
                raise Busy(f"another abby cleanup or check is running on {self._where}; "
                           f"waited {timeout:g} s, giving up")
            held.depth = 1
            try:
                yield
            finally:
                held.depth = 0
        finally:
            conn.close()  # ends the session, and with it the lock

    def close(self) -> None:
        with self._opening:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def open_read_only(self) -> None:
        """Reads only: the schema must be current already (no migration runs), and
        ``write()`` and ``maintenance_lock()`` refuse; read transactions are READ ONLY anyway."""
        with self._connect() as conn:
            try:
                version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
            except (pgerrors.UndefinedTable, pgerrors.InvalidSchemaName):
                version = 0
            except psycopg.Error as exc:
                raise self._error(exc) from exc
        if version != SCHEMA_VERSION:
            raise StorageError(
                f"ledger {self._where} was written by a newer abby (schema {version}); upgrade abby"
                if version > SCHEMA_VERSION else
                f"the ledger {self._where} has no abby tables or needs an upgrade, which a read-only "
                "opening never makes; run `abby check` on that store once first")
        self._get_pool()
        self.read_only = True

    def identity(self) -> tuple:
        self._get_pool()
        return "postgres", self._where, self._schema
