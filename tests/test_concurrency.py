"""Several real processes share one root: no limit is ever exceeded, and the
ledger always matches the bytes on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abbycli import StorageManager
from conftest import MIB

WORKER = Path(__file__).with_name("worker.py")
SIZE = 100 * 1024


def run_workers(root, jobs, limits):
    # Every process is up and waiting by then (a Windows process takes longer to start).
    start_at = time.time() + (1.0 if os.name == "posix" else 6.0)
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(root), action, user, str(count), str(SIZE), str(start_at),
                          json.dumps(limits)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for action, user, count in jobs
    ]
    # Each worker reports, then (for "reserve") holds its reservations until all have reported.
    lines = [p.stdout.readline() for p in procs]
    root.mkdir(parents=True, exist_ok=True)
    (root / "release").touch()
    results = []
    for p, line in zip(procs, lines):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0 and line, err
        results.append(json.loads(line))
    return results


def disk_usage(root: Path) -> dict[str, int]:
    usage: dict[str, int] = {}
    for path in (root / "images" / "users").rglob("*"):
        if path.is_file():
            usage[path.parent.name] = usage.get(path.parent.name, 0) + path.stat().st_size
    return usage


def assert_ledger_matches_disk(root, limits):
    sm = StorageManager(root, **limits)
    report = sm.check()
    assert report.problems == [], report.problems
    assert sm.quota.global_status()["used_bytes"] == sum(disk_usage(root).values())
    return sm


def test_many_processes_one_user_never_exceed_the_user_limit(root):
    limits = {"max_global_storage_mb": 50, "max_user_storage_mb": 2}
    results = run_workers(root, [("save", "alice", 10)] * 8, limits)
    stored = sum(r["ok"] for r in results)
    assert stored == (2 * MIB) // SIZE  # every slot filled, none beyond
    assert sum(r["refused"] for r in results) == 80 - stored
    assert disk_usage(root) == {"alice": stored * SIZE}
    assert_ledger_matches_disk(root, limits)


def test_many_processes_many_users_never_exceed_the_global_limit(root):
    limits = {"max_global_storage_mb": 3, "max_user_storage_mb": 2}
    jobs = [("save", user, 12) for user in ("a", "b", "c", "d")] * 2
    results = run_workers(root, jobs, limits)
    per_user = disk_usage(root)
    assert sum(per_user.values()) <= 3 * MIB
    assert all(v <= 2 * MIB for v in per_user.values())
    assert sum(r["ok"] for r in results) == (3 * MIB) // SIZE
    assert_ledger_matches_disk(root, limits)


def test_concurrent_reservations_never_take_more_daily_slots_than_allowed(root):
    limits = {"max_user_daily_gens": 5, "image_generation_size_mb": 0.01}
    results = run_workers(root, [("reserve", "alice", 3)] * 8, limits)
    assert sum(r["ok"] for r in results) == 5
    assert sum(r["refused"] for r in results) == 19
    sm = StorageManager(root, **limits)
    assert sm.get_quota_status("alice")["daily"]["remaining"] == 0


@pytest.mark.parametrize("size_mb", [0.5])
def test_reservation_room_is_shared_across_processes(root, size_mb):
    # 2 MiB per user, 0.5 MiB per reservation: at most 4 generations in flight.
    limits = {"max_user_storage_mb": 2, "max_user_daily_gens": 100, "image_generation_size_mb": size_mb}
    results = run_workers(root, [("reserve", "alice", 2)] * 6, limits)
    assert sum(r["ok"] for r in results) == 4
    sm = StorageManager(root, **limits)
    assert sm.get_quota_status("alice")["user"]["reserved_bytes"] == 2 * MIB
