"""Schema migrations: a ledger made by abby before migrations existed (schema version 4)
opens, migrates without losing anything, and a failing step changes nothing."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from abbycli import StorageError, StorageManager
from abbycli.history import query
from abbycli.storage import sqlite as sqlite_ledger
from conftest import make_png

# The schema abby wrote at version 4, verbatim (abbycli/storage/ledger.py before the seams):
# the test must not build the old ledger with the new code.
V4_SCHEMA = """

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


def make_v4_store(root):
    """A store as abby 4 left it: two images on disk, one pending delete, a reservation,
    a daily counter and a history record."""
    (root / ".abby").mkdir(parents=True)
    alice = root / "images" / "users" / "alice"
    alice.mkdir(parents=True)
    now = time.time()
    conn = sqlite3.connect(root / ".abby" / "ledger.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(f"BEGIN IMMEDIATE; {V4_SCHEMA} PRAGMA user_version=4; COMMIT;")
    for image_id, size in ((7, 1000), (9, 1200)):
        (alice / f"cat-{image_id}.png").write_bytes(make_png(size))
        conn.execute("INSERT INTO images (id, user_id, rel_path, size, format, created_at, meta) "
                     "VALUES (?, 'alice', ?, ?, 'png', ?, ?)",
                     (image_id, f"images/users/alice/cat-{image_id}.png", size, now - 60,
                      json.dumps({"prompt": "a cat"})))
    # Image 9's delete was interrupted: its row is in `deleting`, still counted.
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO deleting SELECT id, user_id, rel_path, size, format, created_at, meta, ? "
                 "FROM images WHERE id = 9", (now - 3600,))
    conn.execute("UPDATE bulk_delete SET active = 1")
    conn.execute("DELETE FROM images WHERE id = 9")
    conn.execute("UPDATE bulk_delete SET active = 0")
    conn.execute("COMMIT")
    conn.execute("INSERT INTO reservations (user_id, day, bytes, pid, host, created_at) "
                 "VALUES ('alice', '2999-01-01', 500, 1, 'elsewhere', ?)", (now,))
    conn.execute("INSERT INTO daily VALUES ('alice', '2999-01-01', 2)")
    conn.execute("INSERT INTO history (at, user_id, operation, outcome) VALUES (?, 'alice', 'upscale', 'success')",
                 (now,))
    conn.close()


def test_a_version_4_ledger_migrates_without_loss(root):
    make_v4_store(root)
    sm = StorageManager(root, 100, 10)
    [image] = sm.list_images("alice")
    assert (image.id, image.key, image.size) == (7, "users/alice/cat-7.png", 1000)
    assert image.path == root / "images" / "users" / "alice" / "cat-7.png" and image.metadata == {"prompt": "a cat"}
    assert sm.get_image(str(image.path)).id == 7
    user = sm.get_quota_status("alice")["user"]
    assert (user["used_bytes"], user["reserved_bytes"]) == (2200, 500)  # the pending delete is still counted
    with sm.ledger.read() as tx:
        assert tx.daily_taken("alice", "2999-01-01") == (2, 1)
        assert [r.key for r in tx.pending_deletes()] == ["users/alice/cat-9.png"]
    assert [r["operation"] for r in query(sm)] == ["upscale"]
    assert sm.store(make_png(800), "alice").id == 10  # ids go on after the highest ever given
    conn = sqlite3.connect(root / ".abby" / "ledger.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_ledger.SCHEMA_VERSION
    steps = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert steps == [(n, name) for n, name, _ in sqlite_ledger.MIGRATIONS]
    conn.close()
    report = sm.cleanup(older_than_days=1000)  # finishes the interrupted delete on the migrated keys
    assert report.deleted == [str(root / "images" / "users" / "alice" / "cat-9.png")]
    assert sm.get_quota_status("alice")["user"]["used_bytes"] == 1800
    assert [p.kind for p in sm.check().problems] == []


def test_a_new_ledger_records_every_step(root):
    sm = StorageManager(root)
    sm.ledger.open()
    conn = sqlite3.connect(root / ".abby" / "ledger.sqlite3")
    assert [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == \
        list(range(1, sqlite_ledger.SCHEMA_VERSION + 1))
    conn.close()


def test_a_failing_step_leaves_the_old_ledger_as_it_was(root, monkeypatch):
    make_v4_store(root)

    def broken(conn):
        conn.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_ledger, "MIGRATIONS", [*sqlite_ledger.MIGRATIONS, (6, "broken", broken)])
    monkeypatch.setattr(sqlite_ledger, "SCHEMA_VERSION", 6)
    with pytest.raises(StorageError):
        StorageManager(root, 100, 10).list_images()
    conn = sqlite3.connect(root / ".abby" / "ledger.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
    columns = [c[1] for c in conn.execute("PRAGMA table_info(images)")]
    assert "rel_path" in columns and "key" not in columns  # step 5 rolled back with the failing one
    assert conn.execute("SELECT name FROM sqlite_master WHERE name IN ('half_done', 'schema_migrations')").fetchall() == []
    conn.close()
    monkeypatch.undo()
    assert [i.id for i in StorageManager(root, 100, 10).list_images()] == [7]  # and migrates once fixed


def test_a_ledger_from_a_newer_abby_is_refused(root):
    StorageManager(root).ledger.open()
    conn = sqlite3.connect(root / ".abby" / "ledger.sqlite3")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StorageError, match="newer abby"):
        StorageManager(root).list_images()
