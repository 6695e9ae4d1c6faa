"""StorageManager and QuotaManager behaviour in one process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from abbycli import (DailyLimitReached, GlobalQuotaExceeded, InvalidInput, NotFound, StorageManager,
                     UserQuotaExceeded)
from conftest import MIB, make_image, make_png
from ledger_helpers import ledger_sql


def save(storage, data, user="alice", name="generated.png"):
    return asyncio.run(storage.save_image(data, user, name))


def disk_bytes(root):
    return sum(p.stat().st_size for p in (root / "images").rglob("*") if p.is_file())


def test_save_image_returns_the_seed_tuple_and_writes_atomically(storage, root):
    ok, message, path = save(storage, make_png(5000))
    assert ok is True and path is not None and "saved" in message
    assert path.read_bytes() == make_png(5000)
    assert path.parent.parent == root / "images" / "users"
    assert list((root / "temp").iterdir()) == []


def test_same_name_twice_never_overwrites(storage):
    _, _, first = save(storage, make_png(1000, (1, 2, 3)))
    _, _, second = save(storage, make_png(1000, (4, 5, 6)))
    assert first != second and first.exists() and second.exists()
    assert first.read_bytes() != second.read_bytes()


@pytest.mark.parametrize("fmt, ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_stored_extension_follows_the_real_format(storage, fmt, ext):
    ok, _, path = save(storage, make_image(fmt), name="misleading.gif")
    assert ok and path.suffix == ext and path.stem.startswith("misleading-")


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"GIF89a" + b"\0" * 100, "not a PNG, JPEG or WebP"),
    (b"hello world", "not a PNG, JPEG or WebP"),
    (b"RIFF\0\0\0\0WAVE", "not a PNG, JPEG or WebP"),
])
def test_bad_data_is_refused_without_raising(storage, root, data, reason):
    ok, message, path = save(storage, data)
    assert (ok, path) == (False, None) and reason in message
    assert disk_bytes(root) == 0


def test_image_larger_than_the_whole_user_limit(storage):
    ok, message, _ = save(storage, make_png(2 * MIB + 1))
    assert not ok and "whole per-user limit" in message


def test_user_limit_is_enforced_before_any_byte_lands(storage, root):
    assert save(storage, make_png(MIB))[0]
    assert save(storage, make_png(MIB - 200_000))[0]
    ok, message, _ = save(storage, make_png(300_000))
    assert not ok and "storage limit" in message
    assert disk_bytes(root) == 2 * MIB - 200_000
    assert list((root / "temp").iterdir()) == []
    with pytest.raises(UserQuotaExceeded):
        storage.store(make_png(300_000), "alice")
    assert save(storage, make_png(300_000), user="bob")[0]  # other users are not affected


def test_global_limit(root):
    sm = StorageManager(root, max_global_storage_mb=3, max_user_storage_mb=2)
    assert sm.store(make_png(MIB + MIB // 2), "a") and sm.store(make_png(MIB + MIB // 2), "b")
    with pytest.raises(GlobalQuotaExceeded, match="shared storage is full"):
        sm.store(make_png(1000), "c")


def test_quota_status_has_the_seed_shape_and_exact_bytes(storage):
    storage.store(make_png(1_677_722), "alice")  # 80 % of 2 MiB, rounded up
    status = storage.get_quota_status("alice")
    assert set(status) == {"global", "user", "daily"}
    assert {"used_mb", "total_mb", "percentage", "status", "used_bytes", "total_bytes"} <= set(status["global"])
    assert {"used_mb", "limit_mb", "percentage", "status", "used_bytes", "limit_bytes"} <= set(status["user"])
    assert {"allowed", "remaining", "limit"} <= set(status["daily"])
    assert status["user"]["used_bytes"] == 1_677_722 and status["user"]["limit_bytes"] == 2 * MIB
    assert status["user"]["used_mb"] == 1.6 and status["user"]["limit_mb"] == 2.0
    assert status["user"]["status"] == "WARNING" and status["global"]["status"] == "OK"
    assert status["daily"] == status["daily"] | {"allowed": True, "remaining": 3, "limit": 3}
    storage.store(make_png(2 * MIB - 1_677_722), "alice")
    assert storage.get_quota_status("alice")["user"]["status"] == "FULL"
    assert storage.get_quota_status("nobody")["user"]["status"] == "OK"


def test_just_below_warning_is_ok(storage):
    storage.store(make_png(int(2 * MIB * 0.79)), "alice")
    assert storage.get_quota_status("alice")["user"]["status"] == "OK"


def test_save_does_not_take_a_daily_slot(storage):
    for _ in range(4):
        storage.store(make_png(1000), "alice")
    assert storage.get_quota_status("alice")["daily"]["remaining"] == 3


def test_daily_reserve_confirm_refund(storage):
    q = storage.quota
    first = q.reserve_generation("alice")
    assert storage.get_quota_status("alice")["daily"]["remaining"] == 2
    assert storage.get_quota_status("alice")["user"]["reserved_bytes"] == MIB // 2
    q.refund(first)
    assert storage.get_quota_status("alice")["daily"]["remaining"] == 3
    assert storage.get_quota_status("alice")["user"]["reserved_bytes"] == 0
    for _ in range(3):
        q.confirm(q.reserve_generation("alice"))
    with pytest.raises(DailyLimitReached, match="0 of 3 are left today"):
        q.reserve_generation("alice")
    assert q.reserve_generation("bob")


def test_reservation_holds_room_against_other_saves(storage):
    storage.store(make_png(MIB + MIB // 4), "alice")
    r = storage.quota.reserve_generation("alice")  # holds 0.5 MiB of the remaining 0.75
    with pytest.raises(UserQuotaExceeded):
        storage.store(make_png(MIB // 2), "alice")
    # The generation's own image replaces its reservation in one transaction.
    image = storage.store(make_png(MIB // 2 + 1000), "alice", reservation=r)
    status = storage.get_quota_status("alice")
    assert status["user"]["reserved_bytes"] == 0 and status["daily"]["used"] == 1
    assert status["user"]["used_bytes"] == MIB + MIB // 4 + MIB // 2 + 1000
    assert image.path.exists()


def test_failed_save_with_reservation_keeps_the_reservation_for_refund(storage):
    r = storage.quota.reserve_generation("alice")
    with pytest.raises(InvalidInput):
        storage.store(b"not an image", "alice", reservation=r)
    storage.quota.refund(r)
    assert storage.get_quota_status("alice")["daily"] == storage.get_quota_status("alice")["daily"] | {
        "remaining": 3, "used": 0, "in_progress": 0}


def test_daily_counter_follows_the_configured_time_zone(root):
    sm = StorageManager(root, 10, 2, 2, daily_reset_timezone="Pacific/Kiritimati")  # UTC+14
    now = time.time()
    expected = datetime.fromtimestamp(now, ZoneInfo("Pacific/Kiritimati")).date().isoformat()
    assert sm.quota.today(now) == expected
    r = sm.quota.reserve_generation("alice")
    assert r.day == expected
    reset = sm.quota.next_reset(now)
    assert reset.utcoffset().total_seconds() == 14 * 3600 and (reset.hour, reset.minute) == (0, 0)


def test_list_newest_first_with_metadata(storage):
    a = storage.store(make_png(1000), "alice", "a.png", metadata={"prompt": "a cat"})
    b = storage.store(make_png(1000), "alice", "b.png")
    storage.store(make_png(1000), "bob", "c.png")
    listed = storage.list_images("alice")
    assert [i.id for i in listed] == [b.id, a.id]
    assert listed[1].metadata == {"prompt": "a cat"} and listed[1].size == 1000
    assert len(storage.list_images()) == 3


def test_delete_by_id_and_path_updates_quota(storage, root, monkeypatch):
    a = storage.store(make_png(10_000), "alice")
    b = storage.store(make_png(20_000), "alice")
    storage.delete_image(a.id)
    assert not a.path.exists() and storage.get_quota_status("alice")["user"]["used_bytes"] == 20_000
    monkeypatch.chdir(root)
    storage.delete_image(str(b.path.relative_to(root)))
    assert not b.path.exists() and storage.get_quota_status("alice")["user"]["used_bytes"] == 0
    with pytest.raises(NotFound):
        storage.delete_image(a.id)


def test_cleanup_by_ledger_time_and_dry_run_matches(storage, root):
    old = [storage.store(make_png(1000), "alice") for _ in range(3)]
    new = storage.store(make_png(1000), "bob")
    # Make the old ones 10 days old in the ledger only: file mtimes must not matter.
    with ledger_sql(storage) as conn:
        conn.executemany("UPDATE images SET created_at = created_at - 10 * 86400 WHERE id = ?", [(i.id,) for i in old])
    now = time.time()
    dry = storage.cleanup(dry_run=True, now=now)
    assert sorted(dry.deleted) == sorted(str(i.path) for i in old)
    assert all(i.path.exists() for i in old)
    real = storage.cleanup(now=now)
    assert real.deleted == dry.deleted and real.freed_bytes == dry.freed_bytes == 3000
    assert real.empty_dirs == dry.empty_dirs == [str(root / "images" / "users" / "alice")]
    assert not any(i.path.exists() for i in old) and new.path.exists()
    assert storage.get_quota_status("alice")["user"]["used_bytes"] == 0
    assert storage.cleanup(now=now).deleted == []  # nothing left to do


def test_cleanup_older_than_zero_means_everything_up_to_now(storage):
    images = [storage.store(make_png(1000), u) for u in ("a", "b")]
    report = storage.cleanup(older_than_days=0)
    assert len(report.deleted) == 2 and not any(i.path.exists() for i in images)


def test_cleanup_per_user(storage):
    a = storage.store(make_png(1000), "alice")
    b = storage.store(make_png(1000), "bob")
    storage.cleanup(older_than_days=0, user_id="alice")
    assert not a.path.exists() and b.path.exists()


@pytest.mark.skipif(os.name != "posix", reason="symlinks need privileges on Windows")
def test_cleanup_never_follows_a_symlink_out_of_the_root(storage, root, tmp_path):
    victim_dir = tmp_path / "outside"
    victim_dir.mkdir()
    image = storage.store(make_png(1000), "alice")
    victim = victim_dir / image.path.name
    victim.write_bytes(b"precious")
    user_dir = image.path.parent
    image.path.unlink()
    user_dir.rmdir()
    user_dir.symlink_to(victim_dir)  # the user's folder now points outside the root
    (root / "temp" / "1-evil.part").symlink_to(victim)
    os.utime(root / "temp" / "1-evil.part", (0, 0), follow_symlinks=False)
    report = storage.cleanup(older_than_days=0)
    assert victim.read_bytes() == b"precious"
    assert report.skipped == [str(image.path)]
    assert user_dir.is_symlink()  # the link itself is left for the admin


def test_cleanup_removes_stale_temp_files_only(storage, root):
    storage.store(make_png(1000), "alice")
    stale = root / "temp" / "999999999-old.part"  # no such process
    stale.write_bytes(b"x")
    live = root / "temp" / f"{os.getpid()}-mine.part"  # a write in progress here
    live.write_bytes(b"x")
    report = storage.cleanup()
    assert report.temp_files == [str(stale)]
    assert not stale.exists() and live.exists()


def test_one_cleanup_at_a_time(storage):
    from filelock import FileLock

    from abbycli import Busy

    storage.store(make_png(1000), "alice")
    with FileLock(storage.root / ".abby" / "maintenance.lock"):
        with pytest.raises(Busy, match="another abby cleanup or check is running"):
            storage.cleanup(older_than_days=0, lock_timeout=0.2)


def test_check_finds_and_fixes_every_kind_of_drift(storage, root):
    kept = storage.store(make_png(1000), "alice")
    gone = storage.store(make_png(1000), "alice")
    grown = storage.store(make_png(1000), "bob")
    gone.path.unlink()
    grown.path.write_bytes(make_png(1500))
    orphan = root / "images" / "users" / "carol" / "stray.png"
    orphan.parent.mkdir()
    orphan.write_bytes(make_png(700))
    (root / "temp" / "999999999-left.part").write_bytes(b"partial")
    with ledger_sql(storage) as conn:  # totals drift, as after a hand edit of the database
        conn.execute("UPDATE totals SET bytes = bytes + 5")
    with storage.ledger.write() as tx:
        tx.reserve("dave", "2000-01-01", 100, 1, 999999999, "h", 0)

    report = storage.check()
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["missing_file", "orphan_file", "size_mismatch", "stale_reservation", "temp_leftover", "totals"]
    assert report.remaining == report.problems

    fixed = storage.check(fix=True)
    assert not fixed.remaining
    assert storage.check().problems == []
    assert storage.get_quota_status("bob")["user"]["used_bytes"] == 1500
    assert storage.get_quota_status("carol")["user"]["used_bytes"] == 700
    assert storage.get_quota_status("alice")["global"]["used_bytes"] == 1000 + 1500 + 700
    assert [i.path for i in storage.list_images("carol")] == [orphan]
    assert kept.path.exists()


def test_check_reports_foreign_entries_and_exit_stays_unclean(storage, root):
    storage.store(make_png(1000), "alice")
    (root / "images" / "users" / "Not Encoded").mkdir()
    report = storage.check(fix=True)
    assert [p.kind for p in report.remaining] == ["foreign"]


def test_two_managers_on_one_root_share_totals(root):
    a = StorageManager(root, 10, 2)
    b = StorageManager(root, 10, 2)
    a.store(make_png(MIB), "alice")
    b.store(make_png(MIB - 1000), "alice")
    with pytest.raises(UserQuotaExceeded):
        a.store(make_png(2000), "alice")


def test_a_full_disk_leaves_nothing_behind(storage, root, monkeypatch):
    import errno

    storage.store(make_png(1000), "alice")

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    ok, message, path = save(storage, make_png(5000))
    assert (ok, path) == (False, None) and "disk is full" in message
    monkeypatch.undo()
    assert list((root / "temp").iterdir()) == []
    assert storage.get_quota_status("alice")["user"]["used_bytes"] == 1000
    assert storage.check().problems == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/mounts, which only Linux has")
def test_network_filesystems_are_recognised(tmp_path, monkeypatch):
    from abbycli.storage import safefs

    mounts = tmp_path / "mounts"
    mounts.write_text(f"server:/export {tmp_path}/nfs nfs4 rw 0 0\n/dev/vda / ext4 rw 0 0\n"
                      f"//nas/share {tmp_path}/with\\040space cifs rw 0 0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(mounts if f == "/proc/self/mounts" else f, *a, **k))
    assert safefs.network_filesystem(tmp_path / "nfs" / "abby") == "nfs4"
    assert safefs.network_filesystem(tmp_path / "nfs") == "nfs4"
    assert safefs.network_filesystem(tmp_path / "nfsother") is None  # a prefix of the name is not the mount
    assert safefs.network_filesystem(tmp_path / "with space" / "x") == "cifs"
    assert safefs.network_filesystem(tmp_path / "local") is None


@pytest.mark.skipif(os.name != "nt", reason="drive types and UNC paths exist only on Windows")
def test_windows_network_roots_are_recognised():
    from abbycli.storage import safefs

    assert safefs.network_filesystem(Path("\\\\server\\share\\abby")) == "UNC share"


def test_check_over_many_folders_finds_every_problem(root):
    # Enough folders for the check to split them between worker processes (on Linux).
    sm = StorageManager(root, 100, 50)
    images = [sm.store(make_png(1000), f"user{i}") for i in range(24)]
    images[3].path.unlink()
    images[17].path.write_bytes(make_png(1200))
    (images[9].path.parent / "extra.png").write_bytes(make_png(900))
    (images[20].path.parent / "sub").mkdir()
    # In a fresh process: pytest's may hold threads (fake servers), and abby rightly
    # never forks beside other threads.
    script = (f"import json; from abbycli import StorageManager; "
              f"print(json.dumps(StorageManager({str(root)!r}, 100, 50).check().to_dict()))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sorted((p["kind"], p["path"]) for p in report["problems"]) == sorted([
        ("missing_file", str(images[3].path)), ("size_mismatch", str(images[17].path)),
        ("orphan_file", str(images[9].path.parent / "extra.png")), ("foreign", str(images[20].path.parent / "sub"))])
    assert report["files_checked"] == 24
    # The parallel scan must really have run where it can (a silent fallback to one
    # process would pass every other assertion here).
    cpus = os.cpu_count() or 1
    assert report["scan_processes"] == (min(cpus, 4) if sys.platform == "linux" and cpus > 1 else 1)
    assert [p.kind for p in sm.check(fix=True).remaining] == ["foreign"]
    assert sm.get_quota_status("user17")["user"]["used_bytes"] == 1200
