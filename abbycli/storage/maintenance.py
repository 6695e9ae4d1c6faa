"""Cleanup: expired images, interrupted deletes, stale temp files and reservations, empty folders.

Deletes go the safe way round: the rows leave the listing first (still counted),
then the blobs go, then the rows are settled: uncounted if the blob is gone, listed
again if not. A crash anywhere leaves rows pending, which the next run finishes.
Local-only work (temp files, empty folders) happens only where the blob store is
the local folder; it never follows a link and never leaves the root.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Sequence

from ..errors import InvalidInput
from .backend import ImageRow, Ledger
from .blobs import DELETED, IN_USE, MISSING, UNSAFE, BlobStore, LocalBlobStore
from .quota import abandoned_reservations, reclaim_abandoned
from .reports import CleanupReport
from .safefs import SafeRemover

MAX_DAYS = 36_500  # a century: any longer age is a typo, and would overflow date arithmetic
GONE = (DELETED, MISSING)


def check_days(name: str, days: object, minimum: float) -> None:
    if isinstance(days, bool) or not isinstance(days, (int, float)) or not math.isfinite(days):
        raise InvalidInput(f"{name} must be a number of days, got {days!r}")
    if not minimum <= days <= MAX_DAYS:
        span = f"from 0 to {MAX_DAYS:,}" if minimum == 0 else f"more than 0 and at most {MAX_DAYS:,}"
        raise InvalidInput(f"{name} must be {span} days, got {days!r}")


def where(blobs: BlobStore, key: str) -> str:
    """A blob as reports show it: the local file's path (the text StoredImage.path gives),
    or the store's description and the key."""
    if isinstance(blobs, LocalBlobStore):
        return blobs.path_text(key)
    return f"{blobs.describe().rstrip('/')}/{key}"


def by_folder(rows: Sequence[ImageRow]) -> list[list[ImageRow]]:
    """Rows grouped by the folder part of their key."""
    groups: dict[str, list[ImageRow]] = {}
    for row in rows:
        groups.setdefault(row.key.rpartition("/")[0], []).append(row)
    return list(groups.values())


def delete_rows(blobs: BlobStore, rows: list[ImageRow]) -> list[tuple[ImageRow, str]]:
    """Delete the blobs of some rows; (row, outcome) for each."""
    outcomes = blobs.delete([r.key for r in rows])
    return [(r, outcomes[r.key]) for r in rows]


def settle(ledger: Ledger, results: list[tuple[ImageRow, str]]) -> list[tuple[ImageRow, str]]:
    if results:
        with ledger.write() as tx:
            tx.end_delete([r for r, o in results if o in GONE], [r for r, o in results if o not in GONE])
    return results


def finish_interrupted_deletes(ledger: Ledger, blobs: BlobStore) -> list[tuple[ImageRow, str]]:
    """Finish deletes that a process dying half-way left pending (their blobs still
    counted). Called under the maintenance lock; a delete still in flight elsewhere is
    harmless to finish too: settling is idempotent."""
    with ledger.read() as tx:
        rows = tx.pending_deletes()
    return settle(ledger, [pair for group in by_folder(rows) for pair in delete_rows(blobs, group)])


def delete_expired(ledger: Ledger, blobs: BlobStore, cutoff: float, user_id: str | None,
                   batch: int = 10_000, workers: int = 2) -> list[tuple[ImageRow, str]]:
    """Delete matching images in batches, overlapping the ledger and the blob work.

    Each batch's rows become pending deletes (still counted) and commit; threads
    delete the batch folder by folder while the next batch's rows move; then every
    row is settled. Deleting waits on the filesystem (or the network), not on
    Python, so the threads overlap. Returns (row, outcome) for every row.
    """
    from concurrent.futures import ThreadPoolExecutor

    pending = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            with ledger.write() as tx:
                rows = tx.begin_delete(created_before=cutoff, user_id=user_id, limit=batch)
            if not rows:
                break
            pending += [pool.submit(delete_rows, blobs, group) for group in by_folder(rows)]
    return settle(ledger, [pair for future in pending for pair in future.result()])


def cleanup(ledger: Ledger, blobs: BlobStore, *, cutoff: float, user_id: str | None, user_dir: str | None,
            dry_run: bool, now: float, lock_timeout: float) -> CleanupReport:
    """See StorageManager.cleanup. ``user_dir`` is the user's encoded folder name."""
    report = CleanupReport(dry_run, datetime.fromtimestamp(cutoff, timezone.utc))
    local = blobs if isinstance(blobs, LocalBlobStore) else None
    with ledger.maintenance_lock(lock_timeout, writes=not dry_run):
        ledger.open()
        temp_files = local.stale_temp_files(now) if local else []
        if dry_run:
            with ledger.read() as tx:
                # An interrupted run's deletes first, as the real run finishes them first.
                rows = tx.pending_deletes() + tx.images_created_before(cutoff, user_id)
                reservations = abandoned_reservations(tx, now)
            report.deleted = [where(blobs, r.key) for r in rows]
            report.freed_bytes = sum(r.size for r in rows)
            report.released_reservations = len(reservations)
            if local:
                report.temp_files = [local.root_text(t) for t in temp_files]
                report.empty_dirs = [local.path_text(d) for d in
                                     local.folders_left_empty({r.key for r in rows}, user_dir)]
            return report
        touched: set[str] = set()
        # First what a run that died half-way left (still counted), then the expired.
        for row, outcome in [*finish_interrupted_deletes(ledger, blobs),
                             *delete_expired(ledger, blobs, cutoff, user_id)]:
            if outcome in GONE:
                report.deleted.append(where(blobs, row.key))
                report.freed_bytes += row.size
                touched.add(row.key.rpartition("/")[0])
            else:  # still there, so still counted: the next run tries again
                {UNSAFE: report.skipped, IN_USE: report.kept}.get(outcome, report.failed).append(
                    where(blobs, row.key))
        if local:
            with SafeRemover(local.root) as remover:
                for rel in temp_files:
                    outcome = remover.unlink(rel)
                    if outcome in GONE:
                        report.temp_files.append(local.root_text(rel))
                    elif outcome != UNSAFE:
                        (report.kept if outcome == IN_USE else report.failed).append(local.root_text(rel))
                candidates = touched | set(local.folders_left_empty(set(), user_dir, only_empty=True))
                report.empty_dirs = [local.path_text(d) for d in sorted(candidates)
                                     if remover.rmdir(f"images/{d}")]
        with ledger.write() as tx:
            report.released_reservations = len(reclaim_abandoned(tx, now))
    return report
