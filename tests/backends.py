"""Every backend combination of the store, as one pytest fixture.

    from backends import backend  # noqa: F401

``backend`` is parametrised over ``sqlite-local``, ``postgres-local`` and ``postgres-s3``
and yields a ``Backend``: a factory of ``StorageManager``s that all share one store
(the same root, ledger and bucket prefix) with whatever limits a test asks for.

Isolation: SQLite lives under the test's temp dir; PostgreSQL gets a schema of its own,
dropped afterwards (as in test_postgres_ledger.py); S3 a prefix of its own, emptied
afterwards. The PostgreSQL params skip with the servers' reason where the test servers
of .ci/servers are not running (and always on Windows).

Worker processes build the same store from ``Backend.description(host)``, a small JSON
document (``build`` below turns it back into a manager). It holds the S3 test secret, so
it travels on a pipe, never on a command line.
"""

from __future__ import annotations

import sqlite3
import sys
import uuid
from pathlib import Path

import pytest

BACKENDS = ("sqlite-local", "postgres-local", "postgres-s3")
MIB = 1024 * 1024


def limits_mb(*, user: int, total: int, daily: int = 5, generation: int | None = None) -> dict:
    """StorageManager's keyword arguments for limits given in bytes (exact: x / 2**20 is)."""
    return {"max_global_storage_mb": total / MIB, "max_user_storage_mb": user / MIB, "max_user_daily_gens": daily,
            "image_generation_size_mb": (generation or min(user, 1024)) / MIB}


def build(description: dict, limits: dict):
    """The StorageManager a description names (in this process, or in a worker's)."""
    from abbycli import StorageManager

    ledger = blobs = None
    if description.get("ledger_url"):
        from abbycli.storage.postgres import PostgresLedger

        # A long lock time-out: a test's processes queue on the write lock on a loaded machine.
        ledger = PostgresLedger(description["ledger_url"], schema=description["schema"], lock_timeout=60)
    if description.get("s3"):
        from abbycli.storage.s3 import S3BlobStore, resolve_s3_options

        env = description["s3"]
        blobs = S3BlobStore.from_url(env["ABBY_BLOBS_URL"], resolve_s3_options({}, env))
    return StorageManager(description["root"], ledger=ledger, blobs=blobs, **limits)


class Backend:
    """One store on one backend combination; ``backend(**limits)`` makes a manager on it."""

    def __init__(self, kind: str, tmp_path: Path, pg_url: str | None = None, s3_env: dict | None = None):
        self.kind = kind
        self.tmp_path = tmp_path
        self.root = tmp_path / "store"
        self.pg_url = pg_url
        self.schema = f"abby_contract_{uuid.uuid4().hex[:12]}" if pg_url else None
        self.s3_env = s3_env
        self._managers: list = []

    def __repr__(self) -> str:
        return f"Backend({self.kind})"

    @property
    def shared_ledger(self) -> bool:
        """Whether processes of several (simulated) hosts may share this store."""
        return self.pg_url is not None

    def description(self, host: str = "host0") -> dict:
        """What a worker needs to build this store. On S3 every host has a local root of its
        own (nothing is shared there); the local blob store is the root, shared by all."""
        root = self.tmp_path / f"root-{host}" if self.s3_env else self.root
        return {"kind": self.kind, "root": str(root), "ledger_url": self.pg_url, "schema": self.schema,
                "s3": self.s3_env}

    def __call__(self, host: str = "host0", **limits):
        """A StorageManager on this store; ``limits`` as StorageManager's keywords."""
        sm = build(self.description(host), limits)
        self._managers.append(sm)
        return sm

    # --- looking behind the facade ---------------------------------------------------------
    def listing(self, sm) -> dict[str, int]:
        """key -> size of every blob under users/, as the blob store lists them."""
        return {info.key: info.size for info in sm.blobs.list("users/")}

    def rows(self, sm) -> dict[str, int]:
        """key -> size of every blob the ledger accounts for (listed and pending deletes)."""
        with sm.ledger.read() as tx:
            return tx.blob_sizes()

    def sql(self, sm, statement: str) -> None:
        """Run raw SQL on the ledger (a state abby never makes itself): the table and column
        names are the same on both ledgers; no parameters, the two drivers spell them apart."""
        sm.ledger.open()
        if self.pg_url is None:
            conn = sqlite3.connect(sm.ledger.path, isolation_level=None, timeout=30)
            try:
                conn.executescript(f"BEGIN IMMEDIATE; {statement}; COMMIT;")
            finally:
                conn.close()
            return
        import psycopg

        with psycopg.connect(self.pg_url, autocommit=True, options=f"-c search_path={self.schema}") as conn:
            conn.execute(statement)

    def close(self) -> None:
        for sm in self._managers:
            sm.close()
        if self.s3_env:
            from abbycli.storage.s3 import S3BlobStore, resolve_s3_options

            store = S3BlobStore.from_url(self.s3_env["ABBY_BLOBS_URL"], resolve_s3_options({}, self.s3_env))
            store.delete([info.key for info in store.list()])  # the bucket is shared by the session
        if self.pg_url:
            import psycopg

            with psycopg.connect(self.pg_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    kind = request.param
    pg_url = s3_env = None
    if kind != "sqlite-local":
        if sys.platform == "win32":
            pytest.skip("the PostgreSQL and S3 test servers run on the Linux side only")
        pg_url = request.getfixturevalue("postgres_url")
        pytest.importorskip("psycopg", reason="the PostgreSQL ledger needs psycopg: pip install '.[test]'")
        pytest.importorskip("psycopg_pool", reason="the PostgreSQL ledger needs psycopg_pool: pip install '.[test]'")
    if kind == "postgres-s3":
        s3_env = request.getfixturevalue("s3_store_env")
    b = Backend(kind, tmp_path, pg_url, s3_env)
    try:
        yield b
    finally:
        b.close()
