"""The ledger interface: what the store asks of its database, as domain operations.

The quota rules (QuotaManager), the store facade, cleanup and check never see SQL
or a connection: they open a transaction and call methods on it::

    with ledger.write() as tx:          # the ledger's write lock, held from the start
        tx.reserve(...)
    with ledger.read() as tx:           # one consistent snapshot; never blocks writers
        tx.usage(user_id)

Contract every implementation keeps (SqliteLedger today, PostgresLedger next):

* ``write()`` serialises writers for the whole transaction, from its first
  statement: a quota check made on ``tx`` and the row that uses the quota commit
  together, and no other writer can slip in between (SQLite: ``BEGIN IMMEDIATE``;
  PostgreSQL: one transaction that takes a store-wide lock first). It commits when
  the block ends normally and rolls back on any exception.
* The usage totals (per user and overall: bytes, files, reserved) change in the
  same transaction as the row that changes them, so they are exact by construction.
  How (triggers, explicit updates) is the implementation's business.
* Errors from the database leave ``read()``/``write()`` and every method as
  ``StorageError`` (``Busy``, ``ReadOnlyStore``) with a one-line message, never
  with a password or a DSN's secret.
* Transactions do not nest; methods of ``tx`` are only valid inside its block.
  Everything given and returned is plain data: tuples, ints, the dataclasses below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ContextManager, Iterable, Sequence

# The columns of one history record, in the order append_history and history use.
HISTORY_COLUMNS = ("id", "at", "user_id", "operation", "provider", "model", "prompt", "seed", "duration", "bytes",
                   "outcome", "error_type", "error", "image_id")


@dataclass(frozen=True)
class Usage:
    bytes: int       # stored (including images whose delete is still in progress)
    files: int
    reserved: int    # held by generations in flight


@dataclass(frozen=True)
class ImageRow:
    id: int | None           # None only when inserting: the ledger picks one
    user_id: str
    key: str                 # the blob key, 'users/<dir>/<name>'
    size: int
    format: str | None
    created_at: float        # Unix time
    meta: str | None = None  # JSON text, as stored


@dataclass(frozen=True)
class ReservationRow:
    id: int
    user_id: str
    day: str                 # calendar day in daily_reset_timezone, 'YYYY-MM-DD'
    bytes: int
    pid: int
    host: str
    created_at: float


@dataclass(frozen=True)
class UserUsage:
    user_id: str
    bytes: int
    files: int
    reserved: int
    daily_used: int          # generations counted on the day asked about


@dataclass(frozen=True)
class TotalsAudit:
    users: tuple[str, ...]   # users whose kept usage differs from their rows and reservations
    overall: bool            # the overall line differs

    @property
    def ok(self) -> bool:
        return not self.users and not self.overall


class LedgerReader(ABC):
    """Operations valid in any transaction."""

    # --- usage and limits ----------------------------------------------------------
    @abstractmethod
    def usage(self, user_id: str) -> Usage:
        """The user's kept totals; zeros for a user the ledger has never seen."""

    @abstractmethod
    def totals(self) -> Usage:
        """The store's kept totals."""

    @abstractmethod
    def daily_taken(self, user_id: str, day: str) -> tuple[int, int]:
        """(generations counted on ``day``, reservations held for ``day``)."""

    @abstractmethod
    def users_usage(self, day: str) -> list[UserUsage]:
        """Every user with files, reserved bytes or generations counted on ``day``;
        largest ``bytes`` first, then by user id."""

    @abstractmethod
    def reservations(self, user_id: str | None = None) -> list[ReservationRow]:
        """Reservations in flight (one user's, or all), in id order."""

    # --- images ----------------------------------------------------------------------
    @abstractmethod
    def image(self, image_id: int) -> ImageRow | None: ...

    @abstractmethod
    def image_by_key(self, key: str) -> ImageRow | None: ...

    @abstractmethod
    def images(self, user_id: str | None = None, limit: int | None = None) -> list[ImageRow]:
        """Listed images (not those being deleted), newest first: created_at, then id, descending."""

    @abstractmethod
    def images_created_before(self, cutoff: float, user_id: str | None = None) -> list[ImageRow]:
        """Listed images with created_at <= cutoff (one user's, or all), oldest first (created_at, id)."""

    @abstractmethod
    def pending_deletes(self, started_before: float | None = None) -> list[ImageRow]:
        """Rows whose delete began (``begin_delete``) and was not settled; optionally only
        those begun before a time. Oldest first (created_at, id)."""

    @abstractmethod
    def count_images(self) -> int:
        """Listed images."""

    @abstractmethod
    def blob_sizes(self) -> dict[str, int]:
        """key -> size of every blob the ledger accounts for: listed images and pending deletes."""

    # --- reconcile ---------------------------------------------------------------------
    @abstractmethod
    def audit_totals(self) -> TotalsAudit:
        """Compare the kept totals with sums over the image rows, pending deletes and reservations."""

    @abstractmethod
    def over_quota(self, user_cap: int) -> list[tuple[str, int]]:
        """(user, bytes) of users whose kept bytes exceed ``user_cap``, by user id."""

    # --- history -------------------------------------------------------------------------
    @abstractmethod
    def history(self, user_id: str | None = None, since: float | None = None,
                limit: int | None = None) -> list[tuple]:
        """History records (tuples in HISTORY_COLUMNS order), newest first (at, then id,
        descending); only ``user_id``'s and those with ``at >= since`` when given."""

    # --- moving a store (abby migrate): paging and lookups in batches -------------------
    @abstractmethod
    def images_page(self, after_id: int, limit: int) -> list[ImageRow]:
        """Up to ``limit`` listed images with id > ``after_id``, by id ascending (keyset paging:
        a store of millions is read page by page, each page one short transaction)."""

    @abstractmethod
    def images_by_keys(self, keys: Sequence[str]) -> list[ImageRow]:
        """The listed images among these keys (any order; missing keys are left out)."""

    @abstractmethod
    def images_by_ids(self, ids: Sequence[int]) -> list[ImageRow]:
        """The listed images among these ids (any order; missing ids are left out)."""

    @abstractmethod
    def history_page(self, after_id: int, limit: int) -> list[tuple]:
        """Up to ``limit`` history records with id > ``after_id``, by id ascending."""

    @abstractmethod
    def history_between(self, start: float, end: float) -> list[tuple]:
        """History records with start <= at <= end, by id ascending."""

    @abstractmethod
    def daily_counts(self, day: str) -> dict[str, int]:
        """user -> generations counted on ``day`` (users with a counter only)."""

    # --- the store's own facts -----------------------------------------------------------
    @abstractmethod
    def setting(self, name: str) -> str | None:
        """A fact recorded with the ledger (which image store its rows belong to), or None."""


class LedgerWriter(LedgerReader):
    """Operations that need ``write()``: all of them run under the ledger's write lock."""

    @abstractmethod
    def next_image_id(self) -> int:
        """The id the next inserted image gets. Ids only grow and are never handed out twice,
        not even after deletes; calling it twice in one transaction without inserting in
        between may return the same id (it is only ever used by this transaction's insert)."""

    @abstractmethod
    def insert_image(self, row: ImageRow) -> int:
        """Insert one image row and count it in the totals; returns its id (``row.id``, or a
        new one when None). Raises StorageError if the id or key is taken."""

    @abstractmethod
    def insert_images(self, rows: Iterable[ImageRow]) -> None:
        """Bulk insert (ids usually None); rows whose key is already taken are skipped."""

    @abstractmethod
    def resize_image(self, image_id: int, size: int) -> None:
        """Correct an image's size (its blob changed); the totals follow."""

    @abstractmethod
    def remove_image(self, image_id: int) -> None:
        """Forget a listed image at once (its blob is already gone); the totals follow."""

    @abstractmethod
    def begin_delete(self, *, ids: Sequence[int] | None = None, created_before: float | None = None,
                     user_id: str | None = None, limit: int) -> list[ImageRow]:
        """Move up to ``limit`` listed images matching every given filter (oldest first) to
        the pending deletes: they are no longer listed but stay counted in the totals
        until ``end_delete``. Returns the moved rows, oldest first (created_at, id)."""

    @abstractmethod
    def end_delete(self, gone: Sequence[ImageRow], kept: Sequence[ImageRow]) -> None:
        """Settle pending deletes: ``gone`` rows (their blob is gone) leave the totals;
        ``kept`` rows (their blob could not be removed) are listed again under their old id.
        Only rows still pending are settled, so settling twice changes nothing."""

    @abstractmethod
    def reserve(self, user_id: str, day: str, nbytes: int, count: int, pid: int, host: str,
                now: float) -> list[int]:
        """Insert ``count`` reservations of ``nbytes`` each (counted as reserved at once);
        returns their ids. The caller has checked the limits in this transaction."""

    @abstractmethod
    def release(self, reservation_id: int) -> bool:
        """Remove one reservation (its bytes stop counting); False if it was already gone."""

    @abstractmethod
    def release_many(self, reservation_ids: Sequence[int]) -> None:
        """Remove reservations (stale ones reclaimed); missing ids are ignored."""

    @abstractmethod
    def count_generation(self, user_id: str, day: str) -> None:
        """Add one to the user's counter of generations on ``day``."""

    @abstractmethod
    def repair_totals(self) -> None:
        """Recompute every kept total from the image rows, pending deletes and reservations."""

    @abstractmethod
    def append_history(self, records: Sequence[tuple]) -> None:
        """Append history records: tuples in HISTORY_COLUMNS order without ``id``."""

    @abstractmethod
    def raise_daily(self, day: str, counts: dict[str, int]) -> None:
        """Set each user's counter for ``day`` to at least the given count (never lowers one)."""

    @abstractmethod
    def set_setting(self, name: str, value: str) -> None:
        """Record a fact with the ledger, replacing the earlier value."""


class Ledger(ABC):
    """A store's ledger. Opened lazily: building one costs nothing until it is used.
    One object is shared by a process's threads; implementations serialise them."""

    name: str            # 'sqlite', 'postgres'
    read_only: bool      # True once opened on a store this user may only read

    @abstractmethod
    def describe(self) -> str:
        """One line for messages, without secrets: a path, or 'postgresql://host/db'."""

    @abstractmethod
    def open(self) -> None:
        """Connect (and migrate the schema) now rather than on first use."""

    @abstractmethod
    def read(self) -> ContextManager[LedgerReader]: ...

    @abstractmethod
    def write(self) -> ContextManager[LedgerWriter]:
        """Raises ReadOnlyStore when this user may only read the store."""

    @abstractmethod
    def maintenance_lock(self, timeout: float, writes: bool = True) -> ContextManager[None]:
        """One cleanup, check or rebuild at a time per store, across processes and hosts
        sharing it; re-entrant within one process. Raises Busy after ``timeout`` seconds.
        ``writes=False`` (a dry run) may go on without the lock where this user cannot take it."""

    @abstractmethod
    def close(self) -> None:
        """Close connections; a later call opens them again."""

    @abstractmethod
    def open_read_only(self) -> None:
        """Open (or reopen) this ledger for reads only: ``write()`` raises ReadOnlyStore, and
        nothing is ever written, not even a schema upgrade or a rebuild (a ledger that needs
        one is refused with StorageError). For a store that must stay untouched: the source
        of ``abby migrate``."""

    @abstractmethod
    def identity(self) -> tuple:
        """Equal for two objects over the same ledger (the same file; the same database and
        schema), different otherwise. May open the ledger. Never holds a secret."""
