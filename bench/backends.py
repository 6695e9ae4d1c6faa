"""Figures 7-9: abby on PostgreSQL + S3, against the same work done directly.

The servers are the throwaway ones of `.ci/servers` (PostgreSQL and SeaweedFS on loopback):
the ones the ABBY_TEST_* variables name, else the ones in ``--servers DIR`` (started there if
need be, and left running), else a pair started for this run and stopped after it. That
PostgreSQL runs with fsync off, which is right for tests and wrong for a durability
comparison, so the save and reservation figures run on a second cluster with PostgreSQL's
default (durable) settings, started here for a few seconds, where the binaries allow it.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from abbycli import StorageManager
from abbycli.storage.backend import ImageRow
from abbycli.storage.names import encode_user_id

from .data import png_bytes
from .figures import Row, Settings
from .timing import Pair, alternate

ROOT_DIR = Path(__file__).resolve().parents[1]
SCRIPT = ROOT_DIR / ".ci" / "servers"
VARS = ("ABBY_TEST_POSTGRES_URL", "ABBY_TEST_S3_ENDPOINT", "ABBY_TEST_S3_BUCKET", "ABBY_TEST_S3_REGION",
        "ABBY_TEST_S3_ACCESS_KEY_ID", "ABBY_TEST_S3_SECRET_ACCESS_KEY")
GENEROUS = dict(max_global_storage_mb=10**7, max_user_storage_mb=10**6, max_user_daily_gens=10**6)
MARKER = "bench-ready"  # written last by a complete population of the check store


class Unavailable(Exception):
    """The servers (or the clients) are missing: the backend figures are skipped, with this reason."""


@dataclass
class Servers:
    pg_url: str  # the .ci/servers cluster: fsync off
    durable_url: str | None  # a cluster with PostgreSQL's default settings, when one could be started
    durable_why_not: str
    bucket: str
    options: object  # abbycli.storage.s3.S3Options


def load_average() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


# --- the servers ------------------------------------------------------------------------------------

@contextmanager
def servers(keep_in: str | None) -> Iterator[Servers]:
    """The servers for figures 7-9 (see the module's docstring); Unavailable says why there are none."""
    try:
        import obstore  # noqa: F401
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"needs obstore and psycopg ({exc.name} is missing): "
                          "pip install -e '.[bench,s3,postgres]'") from None
    from abbycli.storage.s3 import S3Options

    with ExitStack() as stack:
        facts = {v: os.environ[v] for v in VARS if os.environ.get(v)}
        if len(facts) != len(VARS):
            # Not under the work dir: PostgreSQL runs as its own user, which must reach its folder.
            folder = keep_in or tempfile.mkdtemp(prefix="abby-bench-servers-")
            facts = stack.enter_context(_ci_servers(folder, stop=keep_in is None))
        durable_url, why_not = stack.enter_context(_durable_postgres())
        yield Servers(facts["ABBY_TEST_POSTGRES_URL"], durable_url, why_not, facts["ABBY_TEST_S3_BUCKET"],
                      S3Options(endpoint=facts["ABBY_TEST_S3_ENDPOINT"], region=facts["ABBY_TEST_S3_REGION"],
                                access_key_id=facts["ABBY_TEST_S3_ACCESS_KEY_ID"],
                                secret_access_key=facts["ABBY_TEST_S3_SECRET_ACCESS_KEY"]))


@contextmanager
def _ci_servers(folder: str, stop: bool) -> Iterator[dict[str, str]]:
    if sys.platform != "linux":
        raise Unavailable("the PostgreSQL and S3 servers of .ci/servers run on Linux only")
    # A benchmark never installs anything: `bash .ci/servers start DIR` once does.
    env = dict(os.environ, ABBY_SERVERS_NO_INSTALL="1")
    done = subprocess.run(["bash", str(SCRIPT), "start", folder], capture_output=True, text=True, env=env,
                          timeout=180)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        said = [line for line in lines if line.startswith("servers: ")]  # the script's own words first
        why = (said or lines)[-1].removeprefix("servers: ")[:200]
        raise Unavailable(f"no PostgreSQL/S3 servers ({why}); run `bash .ci/servers start DIR` once "
                          "(it installs them) and pass --servers DIR")
    try:
        yield dict(line.split("=", 1) for line in done.stdout.splitlines() if line.startswith("ABBY_TEST_"))
    finally:
        if stop:
            subprocess.run(["bash", str(SCRIPT), "stop", folder], capture_output=True, env=env, timeout=180)


@contextmanager
def _durable_postgres() -> Iterator[tuple[str | None, str]]:
    """A throwaway cluster with the default fsync/synchronous_commit/full_page_writes, on loopback."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if sys.platform != "linux" or not initdb:
        yield None, "no PostgreSQL binaries to start a cluster with default settings"
        return
    bin_dir = Path(initdb[-1]).parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="abby-bench-pg-"))  # not under the work dir: postgres must reach it
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = False
    try:
        # --no-sync only skips flushing initdb's own files; the server keeps its defaults.
        subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
                        "-t", "30", "-o", f"-k {folder} -h 127.0.0.1 -p {port}", "start"],
                       check=True, capture_output=True, timeout=120)
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", ""
    except (subprocess.SubprocessError, OSError) as exc:
        if started:
            raise
        yield None, f"could not start a cluster with default settings ({type(exc).__name__})"
    finally:
        if started:
            subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def durability(url: str) -> str:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        values = [conn.execute(f"SHOW {name}").fetchone()[0]
                  for name in ("fsync", "synchronous_commit", "full_page_writes")]
    return "fsync={}, synchronous_commit={}, full_page_writes={}".format(*values)


def _store(srv: Servers, url: str, prefix: str, schema: str, root: Path) -> StorageManager:
    from abbycli.storage.postgres import PostgresLedger
    from abbycli.storage.s3 import S3BlobStore

    return StorageManager(root, **GENEROUS, ledger=PostgresLedger(url, schema=schema),
                          blobs=S3BlobStore(srv.bucket, prefix, srv.options))


def _drop(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _wipe_prefix(sm: StorageManager) -> None:
    """Every object of the store's prefix, not only users/."""
    import obstore

    for chunk in obstore.list(sm.blobs._store, chunk_size=1000):
        obstore.delete(sm.blobs._store, [meta["path"] for meta in chunk])


# --- 7. a save through PostgreSQL + S3 ----------------------------------------------------------------

def save(s: Settings, srv: Servers) -> list[Row]:
    url = srv.durable_url or srv.pg_url
    rows = [_save_row(s, srv, url, "7. save on PostgreSQL + S3 vs floor")]
    if srv.durable_url:  # the same on the fsync-off cluster: round trips without the commit's flush
        rows.append(_save_row(s, srv, srv.pg_url, "7. same, PostgreSQL with fsync off"))
    return rows


def _save_row(s: Settings, srv: Servers, url: str, figure: str) -> Row:
    import obstore
    import psycopg

    tag = uuid.uuid4().hex[:8]
    schema, prefix = f"abby_bench_save_{tag}", f"abby-bench-save-{tag}"
    sm = _store(srv, url, prefix, schema, s.work / f"s3-save-{tag}")
    files, users = s.saved_store
    try:
        sm.ledger.open()
        with sm.ledger.write() as tx:  # rows of as many images as figure 1's store (their blobs are not needed)
            tx.insert_images(ImageRow(None, f"user{i % users}", f"users/{encode_user_id(f'user{i % users}')}/"
                                      f"pre-{i}.png", 200, "png", time.time()) for i in range(files))
        image = png_bytes(int(1.5 * 1024 * 1024))
        client = sm.blobs._store  # the very client abby's store uses
        conn = psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}")
        conn.execute("CREATE TABLE floor (id int PRIMARY KEY, bytes bigint NOT NULL)")
        conn.execute("INSERT INTO floor VALUES (1, 0)")
        counter = iter(range(10**9))

        def abby_save():
            sm.store(image, f"user{next(counter) % users}")

        def floor():
            # The same create-only PUT abby sends, then one conditional update of a total.
            obstore.put(client, f"floor/{next(counter)}.png", image, mode="create",
                        attributes={"Content-Type": "image/png"})
            conn.execute("UPDATE floor SET bytes = bytes + %s WHERE bytes + %s <= %s RETURNING bytes",
                         (len(image), len(image), 10**15)).fetchone()

        pair = alternate(abby_save, floor, max(s.runs, 15), warmup=3)
        conn.close()
        settings = durability(url)
        _wipe_prefix(sm)
    finally:
        sm.close()
        _drop(url, schema)
    notes = [f"PostgreSQL {settings}; SeaweedFS on loopback; 1.5 MiB PNG; {files:,} rows in the ledger; "
             "floor: one create-only PUT (`If-None-Match: *`) with abby's obstore client + one "
             "`UPDATE … RETURNING` in autocommit"]
    if url == srv.pg_url and srv.durable_url is None:
        notes.append(f"the only PostgreSQL here runs with fsync off ({srv.durable_why_not}): "
                     "both sides skip the commit's flush, so this is not a durability comparison")
    return Row(figure, "abby store()", "conditional PUT + UPDATE … RETURNING", pair, "≤ 1.3×", 1.3, notes)


# --- 8. reservations per second ---------------------------------------------------------------------------

def reservations(s: Settings, srv: Servers) -> list[Row]:
    from . import pg_ledger

    clusters = [(srv.durable_url, "default settings")] if srv.durable_url else []
    clusters.append((srv.pg_url, "fsync off"))
    total = 400 if s.quick else 1_600
    out = []
    for url, label in clusters:
        schema = f"abby_bench_reserve_{uuid.uuid4().hex[:8]}"
        try:
            pg_ledger.ledger_for(url, schema, "advisory").close()  # the tables, made once, outside the timing
            commit_us = _commit_us(url, schema)
            eight, one = [], []
            for _ in range(3):
                eight.append(pg_ledger.per_second(url, schema, "advisory", 8, total // 8))
                one.append(pg_ledger.per_second(url, schema, "advisory", 1, total))
        finally:
            _drop(url, schema)
        pair = Pair(eight, one)
        out.append(Row(f"8. reservations/s, PostgreSQL ({label})", "8 processes", "1 process", pair,
                       "report (higher is better)", None,
                       [f"{total} reserve_generation() calls each side, a user per call, 3 runs; "
                        f"{durability(url)}; one `UPDATE … RETURNING` commit takes {commit_us:.0f} µs (median): "
                        f"as writers commit one at a time under the write lock, at most "
                        f"{1e6 / commit_us:,.0f} commits/s, before any work"], rate=True))
    return out


def _commit_us(url: str, schema: str) -> float:
    import psycopg

    from .pg_ledger import median_us

    with psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}") as conn:
        return median_us(lambda: conn.execute(
            "UPDATE totals SET reserved = reserved + 1 WHERE bytes + reserved + 1 <= %s RETURNING reserved",
            (10**15,)).fetchone(), 300)


# --- 9. check on S3 -------------------------------------------------------------------------------------------

def check(s: Settings, srv: Servers) -> list[Row]:
    import obstore

    n, users = s.big, 100 if s.quick else 1_000
    # Named by size, kept across runs on the same servers: populating is the slow part.
    schema, prefix = f"abby_bench_check_{n}", f"abby-bench-check-{n}"
    sm = _store(srv, srv.pg_url, prefix, schema, s.work / "s3-check")
    try:
        built = _populate(sm, srv.pg_url, schema, n, users)
        client = sm.blobs._store
        seen = {}

        def abby_check():
            report = sm.check()
            seen["abby"] = report.files_checked
            assert report.problems == [], f"check found problems in the bench store: {report.problems[:3]}"

        def raw_list():
            seen["raw"] = sum(len(chunk) for chunk in obstore.list(client, prefix="users"))

        pair = alternate(abby_check, raw_list, max(5, s.runs - 2), warmup=1)
        assert seen == {"abby": n, "raw": n}, seen
    finally:
        sm.close()
    how = (f"populated in {built:.0f} s (async create-only PUTs, 64 at a time, rows in bulk)" if built
           else "populated by an earlier run (marker object found, row count checked)")
    return [Row(f"9. abby check on S3, {n:,} objects", "StorageManager.check()", "obstore.list of users/",
                pair, "report", None,
                [f"{n:,} objects of 200 B over {users:,} users, PostgreSQL ledger (fsync off; check only reads); "
                 f"{how}; check reports no problem (asserted)"])]


def _populate(sm: StorageManager, url: str, schema: str, n: int, users: int) -> float:
    """Make the check store unless a complete one is there; returns the seconds it took (0: reused)."""
    import obstore

    sm.ledger.open()
    with sm.ledger.read() as tx:
        rows = tx.count_images()
    try:
        obstore.head(sm.blobs._store, MARKER)
        complete = rows == n
    except FileNotFoundError:
        complete = False
    if complete:
        return 0.0
    print(f"    populating {n:,} objects (once per server pair; reused by later runs)", file=sys.stderr, flush=True)
    started = time.time()
    sm.close()
    _drop(url, schema)
    _wipe_prefix(sm)
    sm.ledger.open()
    data = png_bytes(200)
    created = time.time() - 60
    keys = [(f"user{i % users}", f"users/{encode_user_id(f'user{i % users}')}/bench-{i}.png") for i in range(n)]
    asyncio.run(_put_all(sm.blobs._store, [k for _, k in keys], data))
    with sm.ledger.write() as tx:
        tx.insert_images(ImageRow(None, user, key, len(data), "png", created) for user, key in keys)
    obstore.put(sm.blobs._store, MARKER, b"complete\n")
    return time.time() - started


async def _put_all(client, keys: list[str], data: bytes, concurrency: int = 64) -> None:
    import obstore

    todo = iter(keys)

    async def worker():
        for key in todo:  # the workers share one iterator: each key is taken once
            await obstore.put_async(client, key, data, mode="create")

    await asyncio.gather(*(worker() for _ in range(concurrency)))

