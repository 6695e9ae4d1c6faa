"""A process of a simulated host, working on a store described by tests/backends.py.

    python contract_worker.py            (reads one JSON job line on stdin)

The job: {"store": <Backend.description()>, "limits": {...}, "host": NAME, "action": ...,
"users": [...], "ops": N, "size": BYTES, "seed": N}. The worker claims the host name
``host`` (the ledger's reservations are owned by (host, pid)), builds its manager, prints
``ready`` and waits for a line on stdin, so the test releases every worker at once.

Actions:
    race      ``ops`` operations mixed at random (seeded), then one JSON line: what was
              stored (keys and sizes), the daily slots spent per user and the refusals.
    forever   the same mix until killed; prints '.' after each operation that was not refused.
    commit-then-die   reserve a generation, then store its image and SIGKILL itself right
              after the blob is committed, before the ledger commits.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from abbycli import QuotaExceeded  # noqa: E402
from backends import build  # noqa: E402
from conftest import make_png  # noqa: E402

KINDS = ("store", "reserve-store", "reserve-confirm", "reserve-refund")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def one_op(sm, kind: str, user: str, data: bytes, done: dict) -> None:
    """One operation; records what it changed in ``done``. QuotaExceeded goes to the caller."""
    if kind == "store":
        image = sm.store(data, user)
        done["stored"].append([image.key, image.size, user])
        return
    held = sm.quota.reserve_generation(user)
    try:
        if kind == "reserve-store":
            image = sm.store(data, user, reservation=held)
            done["stored"].append([image.key, image.size, user])
        elif kind == "reserve-confirm":  # delivered elsewhere (an --out copy): the slot is spent
            sm.quota.confirm(held)
        else:
            sm.quota.refund(held)
            return
    except BaseException:
        sm.quota.refund(held)  # a failed generation gives its slot back, as the pipeline does
        raise
    done["slots"][user] += 1


def main() -> None:
    job = json.loads(sys.stdin.readline())
    host = job["host"]
    socket.gethostname = lambda: host  # this process belongs to the simulated host
    sm = build(job["store"], job["limits"])
    sm.ledger.open()
    data = make_png(job.get("size", 4096))
    users = job.get("users", ["alice"])
    rng = random.Random(job.get("seed", 0))
    done = {"stored": [], "slots": Counter(), "refused": Counter()}
    print("ready", flush=True)
    sys.stdin.readline()

    if job["action"] == "commit-then-die":
        held = sm.quota.reserve_generation(users[0])
        original = sm.blobs.commit

        def commit_and_die(staged, key):
            original(staged, key)
            die()

        sm.blobs.commit = commit_and_die
        sm.store(data, users[0], reservation=held)
        raise AssertionError("not killed")

    forever = job["action"] == "forever"
    i = 0
    while forever or i < job["ops"]:
        i += 1
        try:
            one_op(sm, rng.choice(KINDS), rng.choice(users), data, done)
        except QuotaExceeded as exc:
            done["refused"][type(exc).__name__] += 1
            continue
        if forever:
            print(".", end="", flush=True)
    sm.close()
    print(json.dumps(done), flush=True)


if __name__ == "__main__":
    main()
