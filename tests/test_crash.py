"""Processes killed at the worst moments: nothing partial under images/, no row
without its file, and `check --fix` restores exact totals.

The kill is SIGKILL on POSIX; on Windows, which has no signals, the worker ends
itself with an immediate exit and the parent uses TerminateProcess (Popen.kill):
either way no clean-up code of abby's runs."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from abbycli import StorageManager
from conftest import make_png

WORKER = Path(__file__).with_name("worker.py")
KILLED = -signal.SIGKILL if hasattr(signal, "SIGKILL") else 137  # worker.die()'s exit on Windows
SIZE = 300 * 1024


def worker(root, action, count=1, user="alice"):
    return subprocess.Popen([sys.executable, str(WORKER), str(root), action, user, str(count), str(SIZE), "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def images_on_disk(root):
    return [p for p in (root / "images").rglob("*") if p.is_file()]


def test_killed_after_the_file_moved_but_before_the_commit(root):
    p = worker(root, "save-then-die")
    p.wait(timeout=60)
    assert p.returncode == KILLED
    sm = StorageManager(root)
    files = images_on_disk(root)
    assert len(files) == 1 and files[0].read_bytes() == make_png(SIZE)  # whole, never partial
    assert sm.list_images() == []  # the transaction never committed
    report = sm.check()
    assert [p.kind for p in report.problems] == ["orphan_file"]
    assert not sm.check(fix=True).remaining
    assert [i.path for i in sm.list_images("alice")] == files  # adopted, not lost
    assert sm.get_quota_status("alice")["user"]["used_bytes"] == SIZE
    assert sm.check().problems == []


def test_killed_after_writing_the_temp_file(root):
    p = worker(root, "temp-then-die")
    p.wait(timeout=60)
    assert p.returncode == KILLED
    sm = StorageManager(root)
    assert images_on_disk(root) == []
    assert len(list((root / "temp").iterdir())) == 1
    report = sm.check(fix=True)
    assert [(p.kind, p.fixed) for p in report.problems] == [("temp_leftover", True)]
    assert list((root / "temp").iterdir()) == []


def test_killed_while_holding_a_reservation(root):
    p = worker(root, "reserve-then-die")
    p.wait(timeout=60)
    sm = StorageManager(root)
    assert sm.get_quota_status("alice")["daily"]["in_progress"] == 1
    report = sm.check(fix=True)
    assert [(p.kind, p.fixed) for p in report.problems] == [("stale_reservation", True)]
    status = sm.get_quota_status("alice")
    assert status["daily"]["remaining"] == status["daily"]["limit"] and status["user"]["reserved_bytes"] == 0


def test_killed_at_random_moments_while_saving(root):
    rng = random.Random(1234)
    for _ in range(6):
        before = len(images_on_disk(root)) if (root / "images").exists() else 0
        p = worker(root, "save-forever")
        deadline = time.time() + 30  # start-up is slow on a loaded machine: wait for the first save
        while time.time() < deadline and (not (root / "images").exists() or len(images_on_disk(root)) == before):
            time.sleep(0.02)
        time.sleep(rng.random() * 0.3)  # then kill it at a random moment of its save loop
        p.kill()  # SIGKILL on POSIX, TerminateProcess on Windows
        p.wait(timeout=60)
    sm = StorageManager(root)
    for path in images_on_disk(root):
        assert path.read_bytes() == make_png(SIZE), f"partial or corrupt file {path}"
    stored = {i.path for i in sm.list_images()}
    assert stored <= set(images_on_disk(root))  # no row without its file
    assert stored, "the worker never got to save; the test proves nothing"
    sm.check(fix=True)
    after = sm.check()
    assert after.problems == []
    assert sm.quota.global_status()["used_bytes"] == SIZE * len(images_on_disk(root))
    assert list((root / "temp").iterdir()) == []
