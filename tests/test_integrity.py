"""The store never lies: every file on disk is counted, limits survive ledger loss,
crashed owners give their slots back, and bad input never reaches the disk.

Each test here pins one defect found by trying abby hard (issue "Hardening").
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from abbycli import (DailyLimitReached, FileInUse, InvalidInput, StorageError, StorageManager,
                     UserQuotaExceeded)
from abbycli.storage import safefs
from conftest import MIB, make_png, run_abby
from ledger_helpers import ledger_sql

WORKER = Path(__file__).with_name("worker.py")


def files_on_disk(root: Path) -> list[Path]:
    return sorted(p for p in (root / "images" / "users").rglob("*") if p.is_file())


def ledger_bytes(sm: StorageManager) -> int:
    return sm.quota.global_status()["used_bytes"]


# --- A1: cleanup over many folders, with few descriptors -------------------------

@pytest.mark.skipif(os.name == "nt", reason="Windows has no RLIMIT_NOFILE to lower")
def test_cleanup_over_many_user_folders_with_few_descriptors(root):
    sm = StorageManager(root, 100, 10, cleanup_days=1)
    png = make_png(200)
    for i in range(300):
        sm.store(png, f"user{i}")
    sm.close()
    script = textwrap.dedent(f"""
        import resource, json
        from abbycli import StorageManager
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        report = StorageManager({str(root)!r}, 100, 10).cleanup(older_than_days=0)
        print(json.dumps(report.to_dict()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["deleted_files"] == 300 and report["kept"] == [] and report["skipped"] == []
    assert files_on_disk(root) == []
    sm = StorageManager(root, 100, 10)
    assert ledger_bytes(sm) == 0 and sm.check().problems == []


# --- A1 + Windows: a file that cannot be removed keeps its row ---------------------

def hold_open_or_refuse(monkeypatch, path: Path):
    """Make ``path`` impossible to delete: really (Windows keeps open files), or by
    refusing its unlink the way a sharing violation or EBUSY does."""
    if os.name == "nt":
        return open(path, "rb")
    real_unlink = os.unlink

    def unlink(name, *args, **kwargs):
        if os.fspath(name) in (path.name, str(path)):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        return real_unlink(name, *args, **kwargs)

    monkeypatch.setattr(safefs.os, "unlink", unlink)
    return None


def test_cleanup_keeps_the_row_of_a_file_in_use_and_goes_on(storage, root, monkeypatch):
    images = [storage.store(make_png(1000 + i), "alice") for i in range(3)]
    busy = images[1]
    handle = hold_open_or_refuse(monkeypatch, busy.path)
    try:
        report = storage.cleanup(older_than_days=0)
    finally:
        if handle:
            handle.close()
        monkeypatch.undo()
    assert report.kept == [str(busy.path)]
    assert sorted(report.deleted) == sorted(str(i.path) for i in images if i is not busy)
    assert report.freed_bytes == images[0].size + images[2].size  # the kept file is not counted as freed
    assert files_on_disk(root) == [busy.path]
    assert ledger_bytes(storage) == busy.size  # still counted: the quota never forgets a file on disk
    assert storage.get_image(busy.id).path == busy.path
    # Once released, the next run removes it.
    again = storage.cleanup(older_than_days=0)
    assert again.deleted == [str(busy.path)] and files_on_disk(root) == [] and ledger_bytes(storage) == 0


def test_delete_of_a_file_in_use_keeps_its_row(storage, monkeypatch):
    image = storage.store(make_png(1000), "alice")
    handle = hold_open_or_refuse(monkeypatch, image.path)
    try:
        with pytest.raises(FileInUse, match="kept"):
            storage.delete_image(image.id)
    finally:
        if handle:
            handle.close()
        monkeypatch.undo()
    assert image.path.exists() and storage.get_image(image.id).size == 1000
    assert ledger_bytes(storage) == 1000
    storage.delete_image(image.id)
    assert not image.path.exists() and ledger_bytes(storage) == 0


def test_cleanup_report_paths_are_the_stored_paths(storage):
    # One path representation end to end: on Windows, root\images\users\a\x.png,
    # never a mix of separators.
    image = storage.store(make_png(1000), "alice")
    dry = storage.cleanup(older_than_days=0, dry_run=True)
    real = storage.cleanup(older_than_days=0)
    assert dry.deleted == real.deleted == [str(image.path)]


# --- A2: a lost ledger never resets the limits -----------------------------------

def lose_ledger(root: Path, how: str) -> None:
    for path in (root / ".abby").glob("ledger.sqlite3*"):
        path.unlink()
    if how == "empty":
        (root / ".abby" / "ledger.sqlite3").write_bytes(b"")


@pytest.mark.parametrize("how", ["deleted", "empty"])
def test_a_lost_ledger_is_rebuilt_before_any_quota_is_served(root, how):
    sm = StorageManager(root, 10, 1, 5, image_generation_size_mb=0.5)
    kept = [sm.store(make_png(400_000), "alice") for _ in range(2)]
    sm.close()
    lose_ledger(root, how)

    sm = StorageManager(root, 10, 1, 5, image_generation_size_mb=0.5)
    status = sm.get_quota_status("alice")
    assert status["user"]["used_bytes"] == 800_000
    with pytest.raises(UserQuotaExceeded):  # would have been accepted by an empty ledger
        sm.store(make_png(400_000), "alice")
    assert sorted(i.id for i in sm.list_images("alice")) == sorted(i.id for i in kept)  # ids from the names
    # Today's allowance is rebuilt from today's images: refused early rather than reset.
    assert status["daily"]["used"] == 2
    assert sm.check().problems == []


def test_processes_racing_on_a_lost_ledger_never_exceed_the_cap(root):
    limits = {"max_global_storage_mb": 10, "max_user_storage_mb": 2, "image_generation_size_mb": 0.5}
    sm = StorageManager(root, **limits)
    for _ in range(15):
        sm.store(make_png(100 * 1024), "alice")
    sm.close()
    lose_ledger(root, "deleted")
    start_at = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(root), "save", "alice", "5", str(100 * 1024),
                               str(start_at), json.dumps(limits)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    stored = sum(json.loads(o)["ok"] for o, _ in outs)
    assert stored == (2 * MIB) // (100 * 1024) - 15  # exactly the room that was left, not 20 more
    assert sum(p.stat().st_size for p in files_on_disk(root)) <= 2 * MIB
    assert StorageManager(root, **limits).check().problems == []


def test_a_damaged_ledger_is_one_line_naming_the_fix(root):
    sm = StorageManager(root, 10, 1, image_generation_size_mb=0.5)
    sm.store(make_png(1000), "alice")
    sm.close()
    lose_ledger(root, "deleted")
    (root / ".abby" / "ledger.sqlite3").write_bytes(b"this is not a database" * 100)
    sm = StorageManager(root, 10, 1, image_generation_size_mb=0.5)
    for call in (lambda: sm.get_quota_status("alice"), sm.check, lambda: sm.list_images()):
        with pytest.raises(StorageError, match="damaged.*check --fix"):
            call()


# --- A3: a dead owner's reservations are reclaimed when reserving -----------------

def test_slots_of_a_killed_generation_are_reclaimed_at_the_next_request(root):
    limits = {"max_user_daily_gens": 2, "image_generation_size_mb": 0.01}
    worker = subprocess.run([sys.executable, str(WORKER), str(root), "reserve-then-die", "alice", "1", "1000",
                             "0", json.dumps(limits)], capture_output=True, text=True, timeout=60)
    assert worker.returncode != 0  # killed while holding its slot
    sm = StorageManager(root, **limits)
    assert sm.get_quota_status("alice")["daily"]["in_progress"] == 1
    held = sm.quota.reserve_generations("alice", 2)  # both slots: the dead one's was reclaimed
    assert len(held) == 2


def test_reservations_of_another_host_are_reclaimed_only_by_age(storage):
    now = time.time()
    with storage.ledger.write() as tx:
        for age in (100, 4000):  # one running elsewhere, one abandoned long ago
            tx.reserve("alice", storage.quota.today(), 1000, 1, 1, "another-host", now - age)
    storage.quota.reserve_generation("alice")
    assert storage.get_quota_status("alice")["daily"]["in_progress"] == 2  # the old one went, the new one came
    with pytest.raises(DailyLimitReached):
        storage.quota.reserve_generations("alice", 2)


# --- A4: settling twice is a no-op ------------------------------------------------

def test_a_reservation_is_charged_once(storage):
    r = storage.quota.reserve_generation("alice")
    storage.store(make_png(1000), "alice", reservation=r)
    storage.quota.confirm(r)  # already settled by store()
    storage.quota.refund(r)
    daily = storage.get_quota_status("alice")["daily"]
    assert (daily["used"], daily["in_progress"]) == (1, 0)
    assert storage.get_quota_status("alice")["user"]["reserved_bytes"] == 0


# --- A5: check --fix adopts only images, and reports users over their cap ----------

def test_check_leaves_non_images_alone_and_reports_them(storage, root):
    storage.store(make_png(1000), "alice")
    folder = root / "images" / "users" / "alice"
    (folder / "notes.png").write_text("not an image at all")
    (folder / "cut.png").write_bytes(make_png(1000)[:40])
    report = storage.check(fix=True)
    kinds = sorted((p.kind, Path(p.path).name, p.fixed) for p in report.problems)
    assert kinds == [("not_an_image", "cut.png", False), ("not_an_image", "notes.png", False)]
    assert report.remaining and ledger_bytes(storage) == 1000
    assert (folder / "notes.png").exists()  # left for a person


def test_adopting_a_file_over_the_cap_is_reported(storage, root):
    storage.store(make_png(1000), "alice")
    big = root / "images" / "users" / "alice" / "copied-in.png"
    big.write_bytes(make_png(3 * MIB))  # the cap is 2 MiB
    report = storage.check(fix=True)
    assert [(p.kind, p.fixed) for p in report.problems] == [("orphan_file", True), ("over_quota", False)]
    assert "alice" in report.problems[1].detail and report.remaining


# --- B1: only whole images are stored ----------------------------------------------

@pytest.mark.parametrize("data", [make_png(1000)[:40], b"\x89PNG\r\n\x1a\n" + b"garbage" * 50,
                                  b"\xff\xd8\xff" + b"\x00" * 100, b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x01" * 60],
                         ids=["cut-off PNG", "PNG signature then garbage", "JPEG signature then zeros", "broken WebP"])
def test_broken_images_are_refused_before_anything_is_written(storage, root, data):
    with pytest.raises(InvalidInput, match="damaged|not a PNG"):
        storage.store(data, "alice")
    ok, message, path = asyncio_run(storage.save_image(data, "alice"))
    assert not ok and path is None and "<" not in message  # no object repr in the message
    assert files_on_disk(root) == [] and list((root / "temp").glob("*")) == []
    assert ledger_bytes(storage) == 0


def asyncio_run(coro):
    import asyncio

    return asyncio.run(coro)


# --- B6: image ids ------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["\u0661", "\u00b2", "9" * 23, "0", -1, 2**63])
def test_ids_are_ascii_digits_in_range(storage, ref):
    storage.store(make_png(1000), "alice")  # id 1 exists: '١' must not reach it
    with pytest.raises(InvalidInput):
        storage.get_image(ref)
    with pytest.raises(InvalidInput):
        storage.delete_image(ref)
    assert ledger_bytes(storage) == 1000


# --- B7: limits that could never work ------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"max_user_storage_mb": 1e-9}, {"max_global_storage_mb": float("inf")}, {"cleanup_days": 1e300},
    {"max_user_storage_mb": 1, "image_generation_size_mb": 1.5}, {"max_user_daily_gens": 2.5},
])
def test_unworkable_limits_are_refused_at_construction(root, kwargs):
    with pytest.raises(InvalidInput):
        StorageManager(root, **{"max_global_storage_mb": 10, "max_user_storage_mb": 2,
                                "image_generation_size_mb": 0.5, **kwargs})


@pytest.mark.parametrize("days", [1e6, float("inf"), float("nan"), -1])
def test_cleanup_ages_out_of_range_are_refused(storage, days):
    with pytest.raises(InvalidInput, match="older-than"):
        storage.cleanup(older_than_days=days)


def test_nfc_and_nfd_ids_are_one_user(storage):
    storage.store(make_png(1000), "Ren\u00e9")
    storage.store(make_png(1000), "Rene\u0301")
    assert storage.get_quota_status("Ren\u00e9")["user"]["used_bytes"] == 2000
    assert len({i.user_id for i in storage.list_images()}) == 1


# --- D2: a read-only store can be read ------------------------------------------------

@pytest.fixture
def read_only_store(tmp_path):
    if os.name == "nt":
        pytest.skip("Windows has no POSIX write permission bits or immutable flag to take away")
    root = tmp_path / "ro"
    sm = StorageManager(root, 10, 2, image_generation_size_mb=0.5)
    image = sm.store(make_png(1000), "alice")
    sm.close()
    if os.geteuid() == 0:  # root ignores permissions; the immutable flag binds root too
        if subprocess.run(["chattr", "-R", "+i", str(root)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i: cannot make a store read-only")
        yield root, image
        subprocess.run(["chattr", "-R", "-i", str(root)], check=True)
    else:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        yield root, image
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_reading_commands_work_on_a_read_only_store(read_only_store):
    root, image = read_only_store
    env = {"STORAGE_ROOT": str(root), "MAX_GLOBAL_STORAGE_MB": "10", "MAX_USER_STORAGE_MB": "2",
           "IMAGE_GEN_SIZE_MB": "0.5"}
    quota = run_abby("quota", "--json", env=env)
    assert quota.returncode == 0, quota.stderr
    assert json.loads(quota.stdout)["global"]["used_bytes"] == 1000
    for args in (["list"], ["check"], ["cleanup", "--dry-run", "--older-than", "0"], ["info", str(image.id)]):
        result = run_abby(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
    for args in (["cleanup", "--older-than", "0"], ["delete", str(image.id)], ["check", "--fix"]):
        result = run_abby(*args, env=env)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "read-only" in result.stderr, (args, result.stderr)
    assert image.path.exists()


# --- D4: errors from below are AbbyErrors --------------------------------------------

def test_a_failing_folder_fsync_is_a_storage_error_and_leaves_nothing(storage, root, monkeypatch):
    if os.name != "posix":
        pytest.skip("Windows cannot fsync a folder; abby does not try")
    from abbycli.storage import blobs

    real_fsync = os.fsync

    def failing(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}") or os.fstat(fd).st_mode & 0o040000:
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(blobs.os, "fsync", failing)
    with pytest.raises(StorageError, match="durable"):
        storage.store(make_png(1000), "alice")
    monkeypatch.undo()
    assert files_on_disk(root) == [] and ledger_bytes(storage) == 0


# --- E: units that tell the truth ----------------------------------------------------

def test_sizes_that_round_alike_are_shown_in_bytes(root):
    sm = StorageManager(root, 10, 1, image_generation_size_mb=0.5)
    with pytest.raises(UserQuotaExceeded) as refused:
        sm.store(make_png(MIB + 1), "alice")
    assert "1,048,577 bytes" in str(refused.value) and "1,048,576 bytes" in str(refused.value)
    assert "MB" not in str(refused.value)


def test_one_byte_short_of_the_cap_is_not_shown_as_100_percent(root):
    sm = StorageManager(root, 10, 1, image_generation_size_mb=0.5)
    sm.store(make_png(MIB - 1), "alice")
    user = sm.get_quota_status("alice")["user"]
    assert user["percentage"] < 100 and user["status"] == "WARNING"


# --- A2 (found again by trying it): a long-lived process sees its ledger replaced --------

@pytest.mark.skipif(os.name == "nt", reason="Windows does not let a file another process holds open be "
                    "deleted or replaced, so a running bot's ledger cannot be swapped under it")
def test_a_process_holding_the_ledger_follows_its_replacement(root):
    limits = dict(max_global_storage_mb=10, max_user_storage_mb=1, image_generation_size_mb=0.5)
    bot = StorageManager(root, **limits)  # a bot keeps its connection for days
    for _ in range(2):
        bot.store(make_png(300_000), "alice")
    lose_ledger(root, "deleted")
    admin = StorageManager(root, **limits)
    assert admin.get_quota_status("alice")["user"]["used_bytes"] == 600_000  # rebuilt
    bot.store(make_png(300_000), "alice")  # must land in the new ledger, not the deleted file
    with pytest.raises(UserQuotaExceeded):
        bot.store(make_png(300_000), "alice")
    assert admin.get_quota_status("alice")["user"]["used_bytes"] == 900_000
    assert admin.check().problems == []


# --- A1 (found again): a cleanup or delete killed half-way leaves nothing uncounted ------

KILLED_DELETE = textwrap.dedent("""
    import os, signal, sys
    from abbycli import StorageManager
    from abbycli.storage import safefs
    root, when, what = sys.argv[1:4]
    real = safefs.SafeRemover.unlink_all
    def dying(self, rel_dir, names):
        if when == "after":
            real(self, rel_dir, names)
        # No clean-up at all: SIGKILL, or an immediate exit on Windows (no signals there).
        os.kill(os.getpid(), signal.SIGKILL) if hasattr(signal, "SIGKILL") else os._exit(137)
    safefs.SafeRemover.unlink_all = dying
    sm = StorageManager(root, 100, 10)
    sm.cleanup(older_than_days=0) if what == "cleanup" else sm.delete_image(1)
""")


@pytest.mark.parametrize("what", ["cleanup", "delete"])
@pytest.mark.parametrize("when", ["before", "after"])  # killed before or after the files were unlinked
def test_a_delete_killed_half_way_is_finished_by_the_next_cleanup(root, what, when):
    sm = StorageManager(root, 100, 10)
    images = [sm.store(make_png(1000 + i), f"user{i % 3}") for i in range(6)]
    sm.close()
    killed = subprocess.run([sys.executable, "-c", KILLED_DELETE, str(root), when, what], timeout=60)
    assert killed.returncode != 0
    sm = StorageManager(root, 100, 10)
    on_disk = sum(p.stat().st_size for p in files_on_disk(root))
    assert ledger_bytes(sm) >= on_disk  # every file still on disk is still counted
    check = sm.check(now=time.time() + 120)
    assert {p.kind for p in check.problems} <= {"interrupted_delete"} and check.problems
    report = sm.cleanup(older_than_days=0 if what == "cleanup" else 1000)
    doomed = images if what == "cleanup" else images[:1]
    assert sorted(report.deleted) == sorted(str(i.path) for i in doomed)
    assert ledger_bytes(sm) == sum(p.stat().st_size for p in files_on_disk(root))
    assert sm.check().problems == []


def test_a_settled_reservation_cannot_store_a_second_image_for_free(storage):
    r = storage.quota.reserve_generation("alice")
    storage.store(make_png(1000), "alice", reservation=r)
    storage.store(make_png(1000), "alice", reservation=r)  # a second image: a second slot
    assert storage.get_quota_status("alice")["daily"]["used"] == 2
    refunded = storage.quota.reserve_generation("alice")
    storage.quota.refund(refunded)
    with pytest.raises(DailyLimitReached):  # the limit is 3: the third slot goes, then no more
        storage.store(make_png(1000), "alice", reservation=refunded)
        storage.store(make_png(1000), "alice", reservation=refunded)
    assert storage.get_quota_status("alice")["daily"]["used"] == 3


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_an_image_cut_and_padded_to_its_length_is_refused(storage, kind):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, kind.upper())
    data = buf.getvalue()
    half = data[:len(data) // 2] + b"\0" * (len(data) - len(data) // 2)  # decodes without an error
    with pytest.raises(InvalidInput, match="damaged"):
        storage.store(half, "alice")
    assert storage.store(data + b"trailing bytes", "alice").size == len(data) + 14  # a tail is harmless


def test_a_tampered_ledger_path_is_never_acted_on(storage, root):
    image = storage.store(make_png(1000), "alice")
    with ledger_sql(storage) as conn:
        conn.execute("UPDATE images SET key = 'users/alice/..' WHERE id = ?", (image.id,))
    other = storage.store(make_png(1001), "alice")
    report = storage.cleanup(older_than_days=0)
    assert report.deleted == [str(other.path)] and len(report.skipped) == 1
    assert (root / "images" / "users").is_dir() and image.path.exists()
