"""Hand edits of a store's SQLite ledger, for tests that need a state abby itself never makes
(totals that drift, rows made old, a tampered key)."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def ledger_sql(storage) -> Iterator[sqlite3.Connection]:
    """A raw connection to ``storage``'s ledger, inside one write transaction."""
    storage.ledger.open()  # made and migrated by abby first
    conn = sqlite3.connect(storage.ledger.path, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()
