"""abby migrate: a store copied into another, between any ledger/blob pair.

SQLite+local -> SQLite+local needs no server, so most behaviour is tested that way
(on Windows too); SQLite+local -> PostgreSQL+S3 -> SQLite+local runs against the
test servers (tests/servers.py) where they exist. Crashes are real processes killed
with no clean-up (SIGKILL; TerminateProcess on Windows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from abbycli import StorageManager
from abbycli.errors import InvalidInput, ReadOnlyStore
from abbycli.storage.backend import ImageRow
from abbycli.storage.migrate import migrate
from conftest import make_png, run_abby, write_config

KILLED = -9 if os.name == "posix" else 137  # tests/worker.py's die()
LIMITS = dict(max_global_storage_mb=10, max_user_storage_mb=2, max_user_daily_gens=5, cleanup_days=7,
              image_generation_size_mb=0.5)


def store_at(root: Path, **changes) -> StorageManager:
    return StorageManager(root, **{**LIMITS, **changes})


def fill(sm: StorageManager, count: int = 6) -> None:
    """Images of three users with metadata, history records (one per image, plus a failure
    with no image) and today's counters."""
    users = ["alice", "Bob", "carol"]
    records = []
    for n in range(count):
        user = users[n % 3]
        image = sm.store(make_png(900 + n, (n * 40 % 256, 10, 10)), user, f"pic{n}.png",
                         metadata={"prompt": f"prompt {n}", "seed": n})
        records.append((time.time(), user, "text-to-image", "stability", "core", f"prompt {n}", n, 1.5, image.size,
                        "success", None, None, image.id))
    records.append((time.time(), "alice", "text-to-image", "stability", "core", "a cat", None, 0.2, None,
                    "filtered", "ContentFiltered", "blocked", None))
    with sm.ledger.write() as tx:
        tx.append_history(records)
        for user, n in (("alice", 3), ("Bob", 1)):
            for _ in range(n):
                tx.count_generation(user, sm.quota.today())


def images_of(sm: StorageManager) -> list[tuple]:
    """Everything a row carries but its id, with the bytes, by key."""
    out = []
    for image in sm.list_images():
        with sm.open_image(image) as fh:
            data = fh.read()
        out.append((image.key, image.user_id, image.size, image.format, image.created_at, image.metadata, data))
    return sorted(out)


def history_of(sm: StorageManager) -> list[tuple]:
    """History without the record ids, image ids replaced by the image's key."""
    with sm.ledger.read() as tx:
        keys = {r.id: r.key for r in tx.images()}
        return sorted((r[1:13] + (keys.get(r[13]),) for r in tx.history()), key=repr)


def daily_of(sm: StorageManager) -> dict[str, int]:
    with sm.ledger.read() as tx:
        return tx.daily_counts(sm.quota.today())


def files_under(root: Path) -> dict[str, bytes]:
    """Every file of a local store, bytes included; SQLite's -wal/-shm companions of a
    reader are not the ledger."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


@pytest.fixture
def source(tmp_path):
    sm = store_at(tmp_path / "src")
    fill(sm)
    sm.close()  # a store at rest: its ledger file is whole, with no WAL to replay
    sm = store_at(tmp_path / "src")
    yield sm
    sm.close()


@pytest.fixture
def target(tmp_path):
    sm = store_at(tmp_path / "dst")
    sm.ledger.open()  # an existing store: blobs put there later are not a lost ledger's
    yield sm
    sm.close()


def assert_same_content(a: StorageManager, b: StorageManager) -> None:
    assert images_of(b) == images_of(a)
    assert history_of(b) == history_of(a)


# --- what is copied ------------------------------------------------------------------------

def test_everything_is_copied_with_ids_and_the_source_is_left_byte_for_byte(source, target, tmp_path):
    before = files_under(tmp_path / "src")
    progress = []
    report = migrate(source, target, progress=lambda *a: progress.append(a))
    assert report.complete and report.copied == report.images == 6 and report.already == 0
    assert report.bytes_copied == sum(900 + n for n in range(6))
    assert report.id_changes == []  # an empty target keeps every id
    assert sorted((i.id, i.key) for i in target.list_images()) == sorted((i.id, i.key) for i in source.list_images())
    assert_same_content(source, target)
    assert report.history_copied == 7
    assert daily_of(target) == {"alice": 3, "Bob": 1} and report.daily_raised == 2
    assert progress[-1] == ("history", 7, None) and ("images", 6, 6) in progress
    # The target's usage follows its rows, and its check is clean.
    assert target.get_quota_status("alice")["user"]["used_bytes"] == source.get_quota_status("alice")["user"]["used_bytes"]
    assert target.check().problems == []
    # The source: not one byte changed, and it was never opened for writing.
    assert files_under(tmp_path / "src") == before
    with pytest.raises(ReadOnlyStore):
        with source.ledger.write():
            pass


def test_a_second_run_copies_nothing(source, target):
    migrate(source, target)
    history = history_of(target)
    again = migrate(source, target)
    assert (again.copied, again.already, again.history_copied, again.history_already, again.daily_raised) == (0, 6, 0, 7, 0)
    assert again.complete and history_of(target) == history
    assert target.check().problems == []


def test_new_source_records_are_copied_by_the_next_run(source, target, tmp_path):
    migrate(source, target)
    source.close()
    writer = store_at(tmp_path / "src")  # the bot goes on using the source meanwhile
    writer.store(make_png(1200), "dave", "late.png")
    with writer.ledger.write() as tx:
        tx.append_history([(time.time(), "dave", "upscale", "local", None, None, None, 0.1, 1200, "success",
                            None, None, None)])
        tx.count_generation("alice", writer.quota.today())
    writer.close()
    report = migrate(store_at(tmp_path / "src"), target)
    assert (report.copied, report.already, report.history_copied, report.history_already) == (1, 6, 1, 7)
    assert daily_of(target)["alice"] == 4
    assert_same_content(store_at(tmp_path / "src"), target)


def test_ids_the_target_has_handed_out_are_replaced_and_reported(source, target):
    for n in range(3):  # the target's own images take ids 1-3
        target.store(make_png(700 + n), "zed", f"own{n}.png")
    report = migrate(source, target)
    assert report.complete and report.copied == 6
    source_ids = {i.key: i.id for i in source.list_images()}
    target_ids = {i.key: i.id for i in target.list_images()}
    assert sorted(report.id_changes) == sorted((source_ids[k], target_ids[k]) for k in source_ids
                                               if source_ids[k] != target_ids[k])
    assert {source_ids[k] for k in source_ids if source_ids[k] != target_ids[k]} == {1, 2, 3}
    assert len(set(target_ids.values())) == 9
    # History follows the images to their new ids (history_of names images by key).
    assert set(history_of(source)) <= set(history_of(target))
    # A rerun reports the same mapping for the images already there.
    assert sorted(migrate(source, target).id_changes) == sorted(report.id_changes)


def test_the_target_s_limits_do_not_apply_and_users_over_its_caps_are_reported(source, tmp_path):
    small = store_at(tmp_path / "small", max_global_storage_mb=0.004, max_user_storage_mb=0.001,
                     image_generation_size_mb=0.001, max_user_daily_gens=1)
    dry = migrate(source, small, dry_run=True)
    report = migrate(source, small)
    assert report.copied == 6 and report.complete  # admitted by the source: all copied
    assert [u for u, _ in report.over_quota] == [u for u, _ in dry.over_quota] == ["Bob", "alice", "carol"]
    assert report.over_global == dry.over_global == sum(900 + n for n in range(6))
    assert daily_of(small) == {"alice": 3, "Bob": 1}  # above its daily limit of 1: copied as they are
    assert {p.kind for p in small.check().problems} == {"over_quota"}
    small.close()


def test_daily_counters_end_at_the_larger_count(source, target):
    with target.ledger.write() as tx:
        for _ in range(4):
            tx.count_generation("Bob", target.quota.today())
        tx.count_generation("alice", target.quota.today())
    report = migrate(source, target)
    assert daily_of(target) == {"alice": 3, "Bob": 4}
    assert (report.daily_users, report.daily_raised) == (2, 1)


def test_a_dry_run_writes_nothing(source, target, tmp_path):
    report = migrate(source, target, dry_run=True)
    assert report.dry_run and report.copied == 6 and report.history_copied == 7 and report.daily_raised == 2
    assert target.list_images() == [] and history_of(target) == [] and daily_of(target) == {}
    assert [p for p in (tmp_path / "dst" / "images").rglob("*") if p.is_file()] == []


def test_a_store_cannot_be_moved_onto_itself(source, tmp_path):
    before = files_under(tmp_path / "src")
    with pytest.raises(InvalidInput, match="onto itself"):
        migrate(source, store_at(tmp_path / "." / "src"))
    assert files_under(tmp_path / "src") == before


# --- conflicts, damage, resuming ---------------------------------------------------------------

def put_blob(sm: StorageManager, key: str, data: bytes) -> None:
    """A blob under ``key`` with no row, as a crashed run (or someone else) leaves one."""
    sm.blobs.commit(sm.blobs.stage(data), key)


def test_other_bytes_under_a_key_are_a_conflict_never_overwritten(source, target):
    victim, other = source.list_images()[:2]
    put_blob(target, victim.key, make_png(victim.size, (1, 2, 3)))  # same size, other bytes
    put_blob(target, other.key, make_png(other.size + 1))  # and another image, with its row, under the second
    with target.ledger.write() as tx:
        tx.insert_image(ImageRow(None, other.user_id, other.key, other.size + 1, "png", 1.0))
    report = migrate(source, target)
    assert not report.complete
    assert sorted(c.key for c in report.conflicts) == sorted([victim.key, other.key])
    assert report.copied == 4
    with target.blobs.open(victim.key) as fh:
        assert fh.read() == make_png(victim.size, (1, 2, 3))  # left as it was
    with target.ledger.read() as tx:
        assert tx.image_by_key(victim.key) is None
        assert tx.image_by_key(other.key).size == other.size + 1
    again = migrate(source, target)  # and so on every run: never overwritten
    assert sorted(again.conflicts, key=repr) == sorted(report.conflicts, key=repr) and again.copied == 0


def test_a_blob_a_crashed_run_left_counts_as_done(source, target):
    image = source.list_images()[0]
    with source.open_image(image) as fh:
        put_blob(target, image.key, fh.read())
    report = migrate(source, target)
    assert report.complete and (report.copied, report.resumed) == (6, 1)
    assert_same_content(source, target)
    assert target.check().problems == []


def test_a_file_missing_from_the_source_is_reported_and_the_rest_copied(source, target, tmp_path):
    gone = source.list_images()[0]
    source.close()
    gone.path.unlink()
    report = migrate(store_at(tmp_path / "src"), target)
    assert [f.key for f in report.failed] == [gone.key] and report.copied == 5 and not report.complete
    assert target.check().problems == []


def test_an_interrupt_right_after_a_blob_lands_leaves_no_trace_and_a_rerun_finishes(source, target, monkeypatch):
    commit = target.blobs.commit
    calls = []

    def commit_then_interrupt(staged, key):
        commit(staged, key)
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C inside the transaction, the row not yet in

    monkeypatch.setattr(target.blobs, "commit", commit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        migrate(source, target)
    assert len(target.list_images()) == 2
    assert target.blobs.stat(calls[2]) is None  # its blob was taken away again
    assert target.check().problems == []
    monkeypatch.setattr(target.blobs, "commit", commit)
    report = migrate(source, target)
    assert report.complete and (report.copied, report.already) == (4, 2)
    assert_same_content(source, target)


CHILD = textwrap.dedent("""
    import os, signal, sys
    from abbycli import StorageManager
    from abbycli.storage.migrate import migrate

    def die():
        if hasattr(signal, "SIGKILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)

    source, target = StorageManager(sys.argv[1]), StorageManager(sys.argv[2])
    mode, at = sys.argv[3], int(sys.argv[4])
    commit = target.blobs.commit
    def commit_then_die(staged, key, n=[0]):
        commit(staged, key)
        n[0] += 1
        if n[0] == at:
            die()  # the blob is in, its row is not: the worst moment
    if mode == "after-blob":
        target.blobs.commit = commit_then_die
    def tick(phase, done, total):
        print(phase, done, flush=True)
    migrate(source, target, progress=tick)
    print("finished", flush=True)
""")


def run_child(src: Path, dst: Path, mode: str, at: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(dst), mode, str(at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_at_the_worst_moment_is_finished_by_the_next(source, tmp_path):
    child = run_child(tmp_path / "src", tmp_path / "dst", "after-blob", 4)
    child.wait(timeout=120)
    assert child.returncode == KILLED, child.stderr.read()
    target = store_at(tmp_path / "dst")
    assert len(target.list_images()) == 3  # three whole images; the fourth's blob has no row
    report = migrate(source, target)
    assert report.complete and (report.copied, report.resumed, report.already) == (3, 1, 3)
    assert_same_content(source, target)
    assert daily_of(target) == {"alice": 3, "Bob": 1}
    assert target.check().problems == []
    target.close()


def test_a_run_killed_at_a_random_moment_is_finished_by_the_next(tmp_path):
    src = store_at(tmp_path / "src")
    for n in range(60):
        src.store(make_png(700 + n), f"user{n % 4}", f"p{n}.png", metadata={"n": n})
    src.close()
    child = run_child(tmp_path / "src", tmp_path / "dst", "plain")
    for line in child.stdout:  # kill it in the middle of the images
        if line.startswith("images ") and int(line.split()[1]) >= 20:
            child.kill()
            break
    child.wait(timeout=120)
    assert child.returncode != 0
    target, source = store_at(tmp_path / "dst"), store_at(tmp_path / "src")
    assert 20 <= len(target.list_images()) < 60
    # Never a row without its blob: at most a blob without its row, or a staged temp file.
    assert {p.kind for p in target.check().problems} <= {"orphan_file", "temp_leftover"}
    report = migrate(source, target)
    assert report.complete and report.copied + report.already == 60
    assert_same_content(source, target)
    assert {p.kind for p in target.check().problems} <= {"temp_leftover"}  # for check --fix, as after any kill
    target.close()
    source.close()


# --- PostgreSQL and S3 -------------------------------------------------------------------------

@pytest.fixture
def pg_s3(postgres_url, s3_store_env, tmp_path):
    """A PostgreSQL+S3 store: a schema and a bucket prefix of this test's own."""
    psycopg = pytest.importorskip("psycopg")
    from abbycli.storage.postgres import PostgresLedger
    from abbycli.storage.s3 import S3BlobStore, resolve_s3_options

    schema = f"abby_migrate_{uuid.uuid4().hex[:12]}"
    blobs = S3BlobStore.from_url(s3_store_env["ABBY_BLOBS_URL"], resolve_s3_options({}, s3_store_env))
    sm = StorageManager(tmp_path / "unused", **LIMITS, ledger=PostgresLedger(postgres_url, schema=schema), blobs=blobs)
    yield sm
    blobs.delete([info.key for info in blobs.list()])
    sm.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_sqlite_local_to_postgres_s3_and_back(source, pg_s3, tmp_path):
    there = migrate(source, pg_s3)
    assert there.complete and there.copied == 6 and there.id_changes == []
    assert_same_content(source, pg_s3)
    assert daily_of(pg_s3) == {"alice": 3, "Bob": 1}
    assert pg_s3.check().problems == []
    again = migrate(source, pg_s3)
    assert (again.copied, again.history_copied) == (0, 0)

    back_store = store_at(tmp_path / "back")
    back = migrate(pg_s3, back_store)
    assert back.complete and back.copied == 6 and back.history_copied == 7
    assert_same_content(source, back_store)
    assert sorted((i.id, i.key) for i in back_store.list_images()) == sorted((i.id, i.key) for i in source.list_images())
    assert daily_of(back_store) == {"alice": 3, "Bob": 1}
    assert back_store.check().problems == []
    # The PostgreSQL source was opened read-only.
    with pytest.raises(ReadOnlyStore):
        with pg_s3.ledger.write():
            pass
    back_store.close()


# --- the command -------------------------------------------------------------------------------

def abby(*args: str, env: dict, cwd: Path):
    return run_abby(*args, env=env, cwd=cwd)


def test_the_command_end_to_end(source, tmp_path):
    source.close()
    other = write_config(tmp_path / "other" / "abby.toml", '[storage]\nroot = "store"\n')
    # The environment names the current store; it must not reach the target.
    env = {"STORAGE_ROOT": str(tmp_path / "src")}
    done = abby("migrate", "--to", str(other), "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["migrate"]["copied"] == 6 and result["migrate"]["complete"]
    assert result["migrate"]["history_copied"] == 7
    assert result["check"]["consistent"] and result["check"]["files_checked"] == 6
    target = store_at(tmp_path / "other" / "store")
    assert_same_content(store_at(tmp_path / "src"), target)
    target.close()

    again = abby("migrate", "--to", str(other), env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Images: 0 copied" in again.stdout and "6 already there" in again.stdout
    assert "Check of the target: consistent" in again.stdout
