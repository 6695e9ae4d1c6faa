"""python -m bench.pg_ledger URL: the PostgreSQL ledger's write path, measured.

* one conditional ``UPDATE … RETURNING`` round trip (autocommit): the floor of any
  check-and-reserve on PostgreSQL;
* one reserve() transaction through QuotaManager (reclaim, daily and room checks, the
  insert, all under the write lock), in one process;
* reservations per second with 8 processes (each reservation for a user of its own:
  QuotaManager scans the user's reservations for stale ones on every reserve, a cost
  that grows with the user's backlog and is not the ledger's), with the write lock taken as the advisory
  transaction lock (what PostgresLedger does) or as ``SELECT … FOR UPDATE`` on the totals row.

Works in a schema of its own, dropped at the end. Prints a markdown table.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import uuid

import psycopg

from abbycli.storage.postgres import PostgresLedger
from abbycli.storage.quota import Limits, QuotaManager

LIMITS = dict(global_bytes=10**15, user_bytes=10**14, daily_gens=1_000_000, generation_bytes=1000)
FOR_UPDATE = "SELECT 1 FROM totals WHERE id = 1 FOR UPDATE"


def ledger_for(url: str, schema: str, lock: str) -> PostgresLedger:
    ledger = PostgresLedger(url, schema=schema)
    ledger.open()
    if lock == "for-update":  # the alternative, measured only here
        ledger._begin_write = ledger._begin_write.rsplit(";", 1)[0] + "; " + FOR_UPDATE
    return ledger


def worker(url: str, schema: str, lock: str, count: int, tag: str) -> None:
    quota = QuotaManager(ledger_for(url, schema, lock), Limits(**LIMITS))
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        quota.reserve_generation(f"{tag}-{i}")  # a user of its own: no backlog of reservations to scan
    print(json.dumps({"done": time.time()}), flush=True)


def per_second(url: str, schema: str, lock: str, procs: int, count: int) -> float:
    cmd = [sys.executable, "-m", "bench.pg_ledger", "--worker", url, schema, lock, str(count)]
    ps = [subprocess.Popen(cmd + [f"p{n}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
          for n in range(procs)]
    for p in ps:
        assert p.stdout.readline().strip() == "ready"
    started = time.time()
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()
    ends = [json.loads(p.communicate()[0].splitlines()[-1])["done"] for p in ps]
    return procs * count / (max(ends) - started)


def median_us(fn, n: int = 2000) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    if sys.argv[1] == "--worker":
        worker(*sys.argv[2:5], int(sys.argv[5]), sys.argv[6])
        return
    url = sys.argv[1]
    schema = f"abby_bench_{uuid.uuid4().hex[:8]}"
    try:
        ledger = ledger_for(url, schema, "advisory")
        with psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn:
            update = median_us(lambda: conn.execute(
                "UPDATE totals SET reserved = reserved + %s WHERE bytes + reserved + %s <= %s RETURNING reserved",
                (1000, 1000, 10**15)).fetchone())
        quota = QuotaManager(ledger, Limits(**LIMITS))
        users = iter(range(10**9))
        reserve = median_us(lambda: quota.reserve_generation(f"solo-{next(users)}"), 1000)
        ledger.close()
        rates = {lock: [per_second(url, schema, lock, 8, 300) for _ in range(3)] for lock in ("advisory", "for-update")}
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    print("| figure | value |\n|---|---|")
    print(f"| one `UPDATE … RETURNING` round trip (median) | {update:.0f} µs |")
    print(f"| one reserve() transaction through QuotaManager (median) | {reserve:.0f} µs |")
    for lock, values in rates.items():
        print(f"| reservations/s, 8 processes, {lock} write lock (3 runs) | "
              f"{' / '.join(f'{v:.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
