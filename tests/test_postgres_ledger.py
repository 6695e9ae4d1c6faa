"""PostgresLedger against a real PostgreSQL: the ledger contract (backend.py), the
cross-process guarantees (migrations, the maintenance lock, the quota race) and the
store on top of it.

Uses the PostgreSQL test server of tests/servers.py (ABBY_TEST_POSTGRES_URL, or started by the
fixtures; skipped, saying how to start it, otherwise).
Every test works in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from abbycli.errors import Busy, ConfigError, ReadOnlyStore, StorageError
from abbycli.storage.backend import ImageRow, Usage

WORKER = Path(__file__).with_name("pg_worker.py")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the test servers run on the Linux side only")


@pytest.fixture(scope="session")
def pg_url(postgres_url) -> str:
    """The test server of tests/servers.py (started there, or skipped saying how)."""
    pytest.importorskip("psycopg", reason="needs the postgres extra: pip install 'abbycli[postgres]'")
    pytest.importorskip("psycopg_pool", reason="needs the postgres extra: pip install 'abbycli[postgres]'")
    return postgres_url


def admin(url: str, sql: str, args=()):
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, args)
        return cur.fetchall() if cur.description else None


@pytest.fixture
def schema(pg_url):
    name = f"abby_test_{uuid.uuid4().hex[:12]}"
    yield name
    admin(pg_url, f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def ledger(pg_url, schema):
    from abbycli.storage.postgres import PostgresLedger

    led = PostgresLedger(pg_url, schema=schema, lock_timeout=5)
    yield led
    led.close()


def row(user: str, key: str, size: int, created: float = 1000.0, image_id: int | None = None) -> ImageRow:
    return ImageRow(image_id, user, key, size, "png", created)


def assert_exact(ledger) -> None:
    """The kept totals equal the sums over the rows, per user and overall."""
    with ledger.read() as tx:
        assert tx.audit_totals().ok


# --- the contract, on one ledger -------------------------------------------------------------

def test_totals_follow_every_write(ledger):
    with ledger.write() as tx:
        a = tx.insert_image(row("alice", "users/alice/a-1.png", 100))
        tx.insert_images([row("alice", "users/alice/b.png", 40), row("bob", "users/bob/c.png", 7),
                          row("bob", "users/alice/a-1.png", 999)])  # a taken key: skipped
        held = tx.reserve("alice", "2030-01-01", 1000, 3, os.getpid(), socket.gethostname(), time.time())
    with ledger.read() as tx:
        assert tx.usage("alice") == Usage(140, 2, 3000)
        assert tx.usage("bob") == Usage(7, 1, 0)
        assert tx.usage("nobody") == Usage(0, 0, 0)
        assert tx.totals() == Usage(147, 3, 3000)
        assert tx.daily_taken("alice", "2030-01-01") == (0, 3)
        assert [r.id for r in tx.reservations("alice")] == held
    assert_exact(ledger)

    with ledger.write() as tx:
        assert tx.release(held[0]) is True
        assert tx.release(held[0]) is False  # already gone: changes nothing
        tx.release_many([held[1], held[2], 987654])
        tx.count_generation("alice", "2030-01-01")
        tx.resize_image(a, 60)
        tx.remove_image(tx.image_by_key("users/bob/c.png").id)
    with ledger.read() as tx:
        assert tx.usage("alice") == Usage(100, 2, 0)
        assert tx.totals() == Usage(100, 2, 0)
        assert tx.daily_taken("alice", "2030-01-01") == (1, 0)
        assert [(u.user_id, u.bytes, u.files, u.daily_used) for u in tx.users_usage("2030-01-01")] == [
            ("alice", 100, 2, 1)]
        assert tx.over_quota(99) == [("alice", 100)]
    assert_exact(ledger)


def test_a_failed_write_changes_nothing(ledger):
    with ledger.write() as tx:
        tx.insert_image(row("alice", "users/alice/a-1.png", 100))
    with pytest.raises(StorageError, match="already recorded") as err:
        with ledger.write() as tx:
            tx.reserve("alice", "2030-01-01", 10, 1, 1, "h", time.time())
            tx.insert_image(row("bob", "users/alice/a-1.png", 5))  # the key is taken
    assert "\n" not in str(err.value)
    with pytest.raises(RuntimeError):
        with ledger.write() as tx:
            tx.insert_image(row("carol", "users/carol/c.png", 5))
            raise RuntimeError("the caller failed half-way")
    with ledger.read() as tx:
        assert tx.totals() == Usage(100, 1, 0)
        assert tx.reservations() == [] and tx.image_by_key("users/carol/c.png") is None


def test_begin_and_end_delete(ledger):
    with ledger.write() as tx:
        tx.insert_images([row("alice", f"users/alice/{i}.png", 10 + i, created=100.0 + i) for i in range(5)])
        tx.insert_image(row("bob", "users/bob/old.png", 1, created=50.0))
    with ledger.write() as tx:
        moving = tx.begin_delete(created_before=103.0, user_id="alice", limit=3)
    assert [r.key for r in moving] == ["users/alice/0.png", "users/alice/1.png", "users/alice/2.png"]
    with ledger.read() as tx:
        assert tx.count_images() == 3  # no longer listed ...
        assert tx.totals() == Usage(10 + 11 + 12 + 13 + 14 + 1, 6, 0)  # ... still counted
        assert [r.id for r in tx.pending_deletes()] == [r.id for r in moving]
        assert tx.pending_deletes(started_before=time.time() - 3600) == []
        assert set(tx.blob_sizes()) == {f"users/alice/{i}.png" for i in range(5)} | {"users/bob/old.png"}
    assert_exact(ledger)

    gone, kept = moving[:2], moving[2:]
    for _ in range(2):  # settling twice changes nothing
        with ledger.write() as tx:
            tx.end_delete(gone, kept)
        with ledger.read() as tx:
            assert tx.totals() == Usage(12 + 13 + 14 + 1, 4, 0)
            assert tx.pending_deletes() == []
            assert tx.image(kept[0].id) == kept[0]  # listed again under its old id
            assert tx.image(gone[0].id) is None
        assert_exact(ledger)

    with ledger.write() as tx:
        assert [r.key for r in tx.begin_delete(ids=[kept[0].id, 424242], limit=10)] == [kept[0].key]
        assert tx.begin_delete(ids=[], limit=10) == []


def test_image_ids_are_never_handed_out_twice(ledger):
    with ledger.write() as tx:
        first = tx.next_image_id()
        assert tx.insert_image(row("alice", f"users/alice/a-{first}.png", 1, image_id=first)) == first
        second = tx.insert_image(row("alice", "users/alice/b.png", 1))
    assert second == first + 1
    with ledger.write() as tx:
        tx.remove_image(second)  # the newest id is gone ...
    with ledger.write() as tx:
        assert tx.next_image_id() == second + 1  # ... and still not handed out again
        # An adopted file keeps the id its name carries; later ids go past it.
        tx.insert_image(row("bob", "users/bob/x-500.png", 1, image_id=500))
        tx.insert_images([row("bob", "users/bob/y.png", 1), row("bob", "users/bob/z-900.png", 1, image_id=900)])
        assert tx.next_image_id() == 902
    with ledger.read() as tx:
        assert sorted(i.id for i in tx.images("bob")) == [500, 900, 901]
    with pytest.raises(StorageError):
        with ledger.write() as tx:
            tx.insert_image(row("bob", "users/bob/w.png", 1, image_id=500))  # the id is taken
    with ledger.write() as tx:
        tx.repair_totals()  # never lowers it
        assert tx.next_image_id() == 902


def test_listing_orders(ledger):
    with ledger.write() as tx:
        tx.insert_images([row("alice", "users/alice/a.png", 1, created=300.0),
                          row("alice", "users/alice/b.png", 1, created=100.0),
                          row("bob", "users/bob/c.png", 1, created=300.0),
                          row("alice", "users/alice/d.png", 1, created=200.0)])
    with ledger.read() as tx:
        assert [r.key for r in tx.images()] == ["users/bob/c.png", "users/alice/a.png", "users/alice/d.png",
                                                "users/alice/b.png"]
        assert [r.key for r in tx.images("alice", limit=2)] == ["users/alice/a.png", "users/alice/d.png"]
        assert [r.key for r in tx.images_created_before(200.0)] == ["users/alice/b.png", "users/alice/d.png"]
        assert [r.key for r in tx.images_created_before(300.0, "bob")] == ["users/bob/c.png"]


def test_history_appends_and_queries_newest_first(ledger):
    def record(at, user, outcome):
        return (at, user, "text-to-image", "stability", "core", "a cat", 7, 1.5, 1234, outcome, None, None, None)

    with ledger.write() as tx:
        tx.append_history([record(10.0, "alice", "success"), record(30.0, "bob", "failed"),
                           record(20.0, "alice", "filtered")])
    with ledger.write() as tx:
        tx.append_history([record(30.0, "alice", "success")])  # same time as bob's: the later id first
    with ledger.read() as tx:
        everything = tx.history()
        assert [(r[1], r[2], r[10]) for r in everything] == [
            (30.0, "alice", "success"), (30.0, "bob", "failed"), (20.0, "alice", "filtered"),
            (10.0, "alice", "success")]
        assert everything[0][0] > everything[1][0]
        assert [r[1] for r in tx.history("alice", since=20.0)] == [30.0, 20.0]
        assert [r[1] for r in tx.history(limit=1)] == [30.0]


def test_repair_totals_and_audit(ledger, pg_url, schema):
    with ledger.write() as tx:
        tx.insert_images([row("alice", "users/alice/a.png", 10), row("bob", "users/bob/b.png", 20)])
        tx.reserve("carol", "2030-01-01", 5, 2, 1, "h", time.time())
        tx.begin_delete(user_id="bob", limit=1)
    admin(pg_url, f"UPDATE {schema}.usage SET bytes = bytes + 3 WHERE user_id = 'alice'; "
                  f"UPDATE {schema}.totals SET reserved = 0")
    with ledger.read() as tx:
        audit = tx.audit_totals()
    assert audit.users == ("alice",) and audit.overall
    with ledger.write() as tx:
        tx.repair_totals()
        assert tx.totals() == Usage(30, 2, 10)
        assert tx.usage("bob") == Usage(20, 1, 0)
    assert_exact(ledger)


def test_read_sees_one_snapshot_and_never_waits_for_a_writer(ledger, pg_url, schema):
    from abbycli.storage.postgres import PostgresLedger

    other = PostgresLedger(pg_url, schema=schema)
    inside, finish = threading.Event(), threading.Event()

    def slow_writer():
        with other.write() as tx:
            tx.insert_image(row("bob", "users/bob/b.png", 5))
            inside.set()
            finish.wait(10)

    ledger.open()
    writer = threading.Thread(target=slow_writer)
    writer.start()
    try:
        assert inside.wait(10)
        started = time.perf_counter()
        with ledger.read() as tx:
            before = tx.totals()
            finish.set()
            writer.join(10)
            assert tx.totals() == before  # the writer committed meanwhile: not in this snapshot
        assert time.perf_counter() - started < 5
        assert before == Usage(0, 0, 0)
        with ledger.read() as tx:
            assert tx.totals() == Usage(5, 1, 0)
    finally:
        finish.set()
        writer.join(10)
        other.close()


def test_a_held_write_lock_times_out_as_busy(ledger, pg_url, schema):
    from abbycli.storage.postgres import PostgresLedger

    impatient = PostgresLedger(pg_url, schema=schema, lock_timeout=0.3)
    try:
        with ledger.write():
            started = time.perf_counter()
            with pytest.raises(Busy, match="stayed locked"):
                with impatient.write() as tx:
                    tx.totals()
            assert time.perf_counter() - started < 3
            with impatient.read() as tx:  # readers do not queue behind it
                tx.totals()
        with impatient.write() as tx:  # free again, and the failed attempt left nothing behind
            tx.count_generation("alice", "2030-01-01")
    finally:
        impatient.close()


def test_threads_share_one_ledger(ledger):
    errors = []

    def work(n):
        try:
            for i in range(20):
                with ledger.write() as tx:
                    tx.insert_image(row(f"user{n}", f"users/user{n}/{i}.png", 3))
                with ledger.read() as tx:
                    tx.usage(f"user{n}")
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with ledger.read() as tx:
        assert tx.totals() == Usage(6 * 20 * 3, 6 * 20, 0)
        assert len({r.id for r in tx.images()}) == 120
    assert_exact(ledger)


def test_a_connection_killed_while_idle_is_replaced(ledger, pg_url):
    with ledger.write() as tx:
        tx.insert_image(row("alice", "users/alice/a.png", 1))
    # A server restart or an admin's pg_terminate_backend ends the pooled connections
    # (only this ledger's: the server may be shared with other test runs).
    pids = [conn.info.backend_pid for conn in ledger._pool._pool]
    assert pids
    admin(pg_url, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    time.sleep(0.2)
    with ledger.read() as tx:  # nothing had run on it: started again on a fresh one
        assert tx.count_images() == 1


# --- describe, errors, read-only --------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_describe_and_errors_never_show_the_password(pg_url):
    from abbycli.storage.postgres import PostgresLedger

    port = free_port()  # nothing listens there
    down = PostgresLedger(f"postgresql://abby:s3cretpw@127.0.0.1:{port}/abbydb", connect_timeout=2)
    assert down.describe() == f"postgresql://127.0.0.1:{port}/abbydb"
    started = time.perf_counter()
    for attempt in (down.open, lambda: down.read().__enter__(), lambda: down.write().__enter__()):
        with pytest.raises(StorageError) as err:
            attempt()
        message = str(err.value)
        assert type(err.value) is StorageError and err.value.exit_code == 1
        assert f"127.0.0.1:{port}/abbydb" in message and "s3cretpw" not in message and "\n" not in message
    assert time.perf_counter() - started < 10
    with pytest.raises(ConfigError) as err:
        PostgresLedger("postgresql://abby:s3cretpw@127.0.0.1:notaport/db?bogus=1")
    assert "s3cretpw" not in str(err.value)
    with pytest.raises(ConfigError, match="schema"):
        PostgresLedger(pg_url, schema="Mixed; DROP")


def test_a_user_who_may_only_read(pg_url, schema, ledger):
    from abbycli.storage.postgres import PostgresLedger

    with ledger.write() as tx:
        tx.insert_image(row("alice", "users/alice/a.png", 1))
    role = f"abby_ro_{uuid.uuid4().hex[:8]}"
    admin(pg_url, f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {role}; "
                  f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}")
    import psycopg.conninfo

    url = psycopg.conninfo.make_conninfo(pg_url, user=role)
    reader = PostgresLedger(url, schema=schema)
    try:
        with reader.read() as tx:
            assert tx.count_images() == 1
        assert reader.read_only
        with pytest.raises(ReadOnlyStore):
            with reader.write():
                pass
        with pytest.raises(ReadOnlyStore):
            with reader.maintenance_lock(1):
                pass
        with reader.maintenance_lock(1, writes=False):  # a dry run may go on
            pass
        # A schema this role may not create is refused in one line, as read-only.
        with pytest.raises(ReadOnlyStore, match="store's owner"):
            PostgresLedger(url, schema=schema + "_new").open()
    finally:
        reader.close()
        admin(pg_url, f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_the_schema_can_come_from_the_url(pg_url, schema):
    from abbycli.storage.postgres import PostgresLedger
    import psycopg.conninfo

    admin(pg_url, f"CREATE SCHEMA {schema}")
    led = PostgresLedger(psycopg.conninfo.make_conninfo(pg_url, options=f"-csearch_path={schema}"))
    try:
        with led.write() as tx:
            tx.insert_image(row("alice", "users/alice/a.png", 1))
    finally:
        led.close()
    assert admin(pg_url, f"SELECT count(*) FROM {schema}.images") == [(1,)]


# --- migrations -------------------------------------------------------------------------------

def test_migrations_are_recorded_once_and_a_newer_schema_is_refused(pg_url, schema):
    from abbycli.storage import postgres

    for _ in range(3):
        led = postgres.PostgresLedger(pg_url, schema=schema)
        led.open()
        led.close()
    recorded = admin(pg_url, f"SELECT version, name FROM {schema}.schema_migrations ORDER BY version")
    assert recorded == [(n, name) for n, name, _ in postgres.MIGRATIONS]

    admin(pg_url, f"INSERT INTO {schema}.schema_migrations VALUES (%s, 'from the future', 0)",
          (postgres.SCHEMA_VERSION + 1,))
    with pytest.raises(StorageError, match="newer abby"):
        postgres.PostgresLedger(pg_url, schema=schema).open()


def start_workers(pg_url, schema, action, *args, count):
    procs = [subprocess.Popen([sys.executable, str(WORKER), pg_url, schema, action, *map(str, args)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    return procs


def release(procs) -> list[dict]:
    for p in procs:  # all at once: they race from here
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_hosts_starting_together_migrate_once(pg_url, schema):
    from abbycli.storage import postgres

    results = release(start_workers(pg_url, schema, "migrate", count=4))
    assert all(r["ok"] for r in results)
    assert admin(pg_url, f"SELECT count(*) FROM {schema}.schema_migrations") == [(postgres.SCHEMA_VERSION,)]


# --- across processes ---------------------------------------------------------------------------

def test_one_maintenance_run_at_a_time_across_processes(ledger, pg_url, schema):
    ledger.open()
    holder = subprocess.Popen([sys.executable, str(WORKER), pg_url, schema, "maintenance"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "locked"
        started = time.perf_counter()
        with pytest.raises(Busy, match="another abby cleanup or check"):
            with ledger.maintenance_lock(timeout=0.5):
                pass
        assert 0.4 < time.perf_counter() - started < 5
        with pytest.raises(Busy):
            with ledger.maintenance_lock(timeout=0):
                pass
    finally:
        holder.stdin.close()  # the holder lets go
        holder.wait(30)
    with ledger.maintenance_lock(timeout=10):
        with ledger.maintenance_lock(timeout=0):  # re-entrant in this thread
            with ledger.write() as tx:
                tx.totals()


def test_eight_processes_never_take_more_than_the_limit(pg_url, schema, ledger):
    """The race the write lock exists for: the check and the reservation commit together."""
    gen = 1000
    ledger.open()
    # Room for 37 generations overall; each user's own cap and daily limit are far away.
    limits = {"global_bytes": 37 * gen, "user_bytes": 30 * gen, "daily_gens": 1000, "generation_bytes": gen}
    users = ",".join(f"user{i}" for i in range(5))
    results = release(start_workers(pg_url, schema, "reserve", 15, json.dumps(limits), users, count=8))
    assert sum(r["won"] for r in results) == 37
    assert sum(r["refused"] for r in results) == 8 * 15 - 37
    with ledger.read() as tx:
        assert tx.totals() == Usage(0, 0, 37 * gen)
        assert len(tx.reservations()) == 37
    assert_exact(ledger)

    # The daily limit: one user, five slots, eight processes asking.
    limits = {"global_bytes": 10_000 * gen, "user_bytes": 10_000 * gen, "daily_gens": 5, "generation_bytes": 1}
    results = release(start_workers(pg_url, schema, "reserve", 3, json.dumps(limits), "dave", count=8))
    assert sum(r["won"] for r in results) == 5
    with ledger.read() as tx:
        assert len(tx.reservations("dave")) == 5


# --- the store on a PostgreSQL ledger -------------------------------------------------------------

@pytest.fixture
def pg_storage(tmp_path, ledger):
    from abbycli import StorageManager

    sm = StorageManager(tmp_path / "store", max_global_storage_mb=10, max_user_storage_mb=2, max_user_daily_gens=3,
                        cleanup_days=7, image_generation_size_mb=0.5, ledger=ledger)
    yield sm
    sm.close()


def test_the_store_on_postgres(pg_storage):
    from conftest import make_png

    from abbycli import QuotaExceeded

    a = pg_storage.store(make_png(1000), "alice", "cat.png")
    b = pg_storage.store(make_png(2000), "alice", "dog.png", metadata={"seed": 7})
    assert b.id > a.id and b.path.read_bytes()[:8] == make_png(2000)[:8]
    status = pg_storage.get_quota_status("alice")
    assert status["user"]["used_bytes"] == 3000
    assert [i.id for i in pg_storage.list_images("alice")] == [b.id, a.id]
    assert pg_storage.get_image(b.id).metadata == {"seed": 7}

    held = pg_storage.quota.reserve_generation("alice")
    assert pg_storage.get_quota_status("alice")["daily"]["in_progress"] == 1
    pg_storage.store(make_png(1500), "alice", "owl.png", reservation=held)
    assert pg_storage.get_quota_status("alice")["daily"]["used"] == 1
    with pytest.raises(QuotaExceeded):
        pg_storage.store(make_png(3 * 1024 * 1024 - 10), "alice", "too-big.png")

    gone = pg_storage.delete_image(a.id)
    assert not gone.path.exists()
    assert pg_storage.get_quota_status("alice")["user"]["used_bytes"] == 3500
    report = pg_storage.check()
    assert report.problems == []


def test_cleanup_and_check_fix_on_postgres(pg_storage, pg_url, schema):
    from conftest import make_png

    old = pg_storage.store(make_png(1000), "alice", "old.png")
    new = pg_storage.store(make_png(1000), "bob", "new.png")
    admin(pg_url, f"UPDATE {schema}.images SET created_at = created_at - 30 * 86400 WHERE id = %s", (old.id,))
    report = pg_storage.cleanup()
    assert not old.path.exists() and new.path.exists()
    assert [i.id for i in pg_storage.list_images()] == [new.id]
    assert len(report.deleted) == 1 and report.freed_bytes == 1000

    admin(pg_url, f"UPDATE {schema}.usage SET bytes = 1 WHERE user_id = 'bob'")
    assert [p.kind for p in pg_storage.check().problems] == ["totals"]
    assert [p.fixed for p in pg_storage.check(fix=True).problems] == [True]
    assert pg_storage.check().problems == []
    assert pg_storage.get_quota_status("bob")["user"]["used_bytes"] == 1000


def test_importing_abbycli_does_not_import_psycopg():
    code = ("import sys, abbycli, abbycli.storage.manager, abbycli.cli; "
            "assert not [m for m in sys.modules if m.startswith('psycopg')], 'psycopg imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
