"""A separate process on a PostgreSQL ledger, for the tests that need real processes.

    python pg_worker.py URL SCHEMA ACTION [ARGS...]

Every action builds its ledger, prints ``ready`` and waits for a line on stdin before it
starts, so the test can release all workers at once. Then it prints one JSON line.

    migrate                       open (and so migrate) the ledger
    reserve N LIMITS_JSON USERS   N check-and-reserve attempts through QuotaManager,
                                  round-robin over the comma-separated USERS
    maintenance                   take the maintenance lock, print ``locked``, hold it
                                  until stdin closes
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abbycli.errors import QuotaExceeded  # noqa: E402
from abbycli.storage.postgres import PostgresLedger  # noqa: E402
from abbycli.storage.quota import Limits, QuotaManager  # noqa: E402


def main() -> None:
    url, schema, action, *args = sys.argv[1:]
    ledger = PostgresLedger(url, schema=schema)
    if action != "migrate":
        ledger.open()
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    if action == "migrate":
        ledger.open()
        print(json.dumps({"ok": True}), flush=True)
    elif action == "reserve":
        attempts, limits, users = int(args[0]), Limits(**json.loads(args[1])), args[2].split(",")
        quota = QuotaManager(ledger, limits)
        won = refused = 0
        for i in range(attempts):
            try:
                quota.reserve_generation(users[i % len(users)])
                won += 1
            except QuotaExceeded:
                refused += 1
        print(json.dumps({"won": won, "refused": refused, "seconds": time.perf_counter() - started}), flush=True)
    elif action == "maintenance":
        with ledger.maintenance_lock(timeout=30):
            print("locked", flush=True)
            sys.stdin.read()
    ledger.close()


if __name__ == "__main__":
    main()
