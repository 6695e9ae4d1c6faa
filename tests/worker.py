"""A separate process that uses the store, for concurrency and crash tests.

    python worker.py ROOT ACTION USER COUNT SIZE START_AT [LIMITS_JSON]

Prints one JSON line: how many operations succeeded and were refused.
ACTION is save, reserve, save-then-die, temp-then-die, reserve-then-die or save-forever.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from abbycli import QuotaExceeded, StorageManager  # noqa: E402
from conftest import make_png  # noqa: E402


def die() -> None:
    """End at once, with no clean-up of any kind: SIGKILL, or on Windows (which has no
    signals) the closest thing, an immediate exit that runs no finally or atexit code."""
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)


def main() -> None:
    root, action, user, count, size, start_at = sys.argv[1:7]
    limits = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    sm = StorageManager(root, **limits)
    data = make_png(int(size))
    if action == "save-then-die":  # killed after the blob is in place, before the commit
        original = sm.blobs.commit

        def commit_and_die(staged, key):
            original(staged, key)
            die()

        sm.blobs.commit = commit_and_die
    elif action == "temp-then-die":  # killed after the temp file is written
        original_stage = sm.blobs.stage

        def stage_and_die(payload):
            original_stage(payload)
            die()

        sm.blobs.stage = stage_and_die
    while time.time() < float(start_at):  # start together, for maximum contention
        time.sleep(0.001)
    ok = refused = 0
    n = int(count)
    i = 0
    while action == "save-forever" or i < n:
        i += 1
        try:
            if action == "reserve":
                sm.quota.reserve_generation(user)
            elif action == "reserve-then-die":
                sm.quota.reserve_generation(user)
                die()
            else:
                sm.store(data, user)
            ok += 1
        except QuotaExceeded:
            refused += 1
    print(json.dumps({"ok": ok, "refused": refused}), flush=True)
    if action == "reserve":
        # Hold the reservations until every worker has reserved: a finished (dead)
        # process's reservations are reclaimed at once, as a crashed bot's are.
        release = Path(root) / "release"
        deadline = time.time() + 120
        while not release.exists() and time.time() < deadline:
            time.sleep(0.01)


if __name__ == "__main__":
    main()
