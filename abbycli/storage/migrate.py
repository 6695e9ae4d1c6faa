"""abby migrate: copy a whole store into another one, between any ledger/blob pair.

What is copied, through the two stores' ledger and blob interfaces only:

* every listed image of the source (pending deletes are not), with its row: same key,
  size, format, created_at and metadata. The id is kept when the target has never
  handed it out (at or above its next id: an empty target keeps every id), else the
  image gets a new id and the change is reported: an id below the target's next one
  may have named a target image since deleted (in its history, in logs), and ids are
  never handed out twice;
* the history records the target does not have yet (see ``_fingerprint``);
* today's daily counters: the target ends with max(target, source) per user.
  Reservations in flight are not copied: they belong to processes of the source.

The target's limits are not applied (the images were admitted by the source); users
left over the target's caps are reported.

Each image goes the way a save goes (blobs.py): the bytes are read from the source
and checked against the row's size, staged, then, inside one target write
transaction, committed under the same key (create-only), read back and compared
(size and sha256), and the row inserted. A crash or Ctrl-C therefore leaves at most
a blob without its row, never a row without its blob; the next run finds that blob,
and when its bytes are the source's it counts as done (that is how a run resumes).
A blob with other bytes under the key is a conflict: reported, never overwritten.
Rows already in the target (same key) are skipped, so a second run copies nothing.

The source is opened read-only (``Ledger.open_read_only``) and only ever read.
Everything is streamed in pages of ``BATCH`` rows: a store may hold millions.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import InvalidInput, NotFound
from .backend import ImageRow
from .blobs import BlobExists

BATCH = 500

# progress(phase, done, total): phase "images" (total: the source's image count) or
# "history" (total None: not counted up front).
Progress = Callable[[str, int, Optional[int]], None]


@dataclass(frozen=True)
class Skipped:
    key: str
    image_id: int   # the source's id
    detail: str


@dataclass
class MigrateReport:
    source: str
    target: str
    dry_run: bool = False
    images: int = 0          # listed images of the source gone through
    copied: int = 0          # rows inserted into the target this run (dry run: would be)
    resumed: int = 0         # of those, whose blob the target already had (same bytes)
    already: int = 0         # rows the target had already (same key, same size)
    bytes_copied: int = 0
    conflicts: list[Skipped] = field(default_factory=list)  # the target holds other bytes under the key
    failed: list[Skipped] = field(default_factory=list)     # could not be copied from the source
    id_changes: list[tuple[int, int]] = field(default_factory=list)  # (source id, target id)
    history_copied: int = 0
    history_already: int = 0
    day: str = ""
    daily_users: int = 0     # users with a counter in the source today
    daily_raised: int = 0    # target counters raised to the source's
    over_quota: list[tuple[str, int]] = field(default_factory=list)  # (user, bytes) over the target's user cap
    over_global: int | None = None  # the target's total bytes, when over its global cap

    @property
    def complete(self) -> bool:
        """Every listed image of the source is in the target."""
        return not self.conflicts and not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "target": self.target, "dry_run": self.dry_run, "complete": self.complete,
            "images": self.images, "copied": self.copied, "resumed": self.resumed, "already_there": self.already,
            "bytes_copied": self.bytes_copied,
            "conflicts": [s.__dict__ for s in self.conflicts], "failed": [s.__dict__ for s in self.failed],
            "id_changes": [{"source_id": a, "target_id": b} for a, b in self.id_changes],
            "history_copied": self.history_copied, "history_already_there": self.history_already,
            "daily": {"day": self.day, "users": self.daily_users, "raised": self.daily_raised},
            "over_quota": [{"user_id": u, "used_bytes": b} for u, b in self.over_quota],
            "over_global_bytes": self.over_global,
        }


def migrate(source, target, *, progress: Progress | None = None, dry_run: bool = False) -> MigrateReport:
    """Copy ``source`` (a StorageManager, only read) into ``target`` (a StorageManager).

    Idempotent and resumable: run it again after a failure or an interruption and it
    copies only what is missing. Raises InvalidInput when both are the same ledger,
    StorageError when a store cannot be read or written (what was copied stays, whole).
    """
    source.ledger.open_read_only()
    if source.ledger.identity() == target.ledger.identity():
        raise InvalidInput(f"the target's ledger is the source's ({source.ledger.describe()}): "
                           "a store cannot be moved onto itself")
    report = MigrateReport(_describe(source), _describe(target), dry_run)
    tick = progress or (lambda phase, done, total: None)
    added = _copy_images(source, target, report, tick, dry_run)
    _copy_history(source, target, report, tick, dry_run)
    _copy_daily(source, target, report, dry_run)
    _over_caps(target, report, added)
    return report


def _describe(store) -> str:
    return f"{store.ledger.describe()} + {store.blobs.describe()}"


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- images ------------------------------------------------------------------------------

def _copy_images(source, target, report: MigrateReport, tick: Progress, dry_run: bool) -> dict[str, int]:
    """Returns the bytes per user a dry run would add (for the over-cap projection)."""
    with source.ledger.read() as tx:
        total = tx.count_images()
    start = 1
    if not dry_run:
        with target.ledger.write() as tx:  # reads only; next_image_id is a writer's
            start = tx.next_image_id()
    added: dict[str, int] = {}
    for page in _pages(source, start):
        with target.ledger.read() as tx:
            there = {r.key: r for r in tx.images_by_keys([r.key for r in page])}
        for row in page:
            found = there.get(row.key)
            if found is not None:
                _already(report, row, found)
            elif dry_run:
                if _plan_one(source, target, row, report):
                    added[row.user_id] = added.get(row.user_id, 0) + row.size
            else:
                _copy_one(source, target, row, report)
            report.images += 1
            tick("images", report.images, total)
    return added


def _pages(source, start: int):
    """The source's images in pages, ids from ``start`` (the target's next id) up first, then
    those below it. The first ones keep their ids; the others, taken in the target, get new
    ids only once the first are in, so that a new id never takes one a later image could keep."""
    for after, below in ((start - 1, None), (0, start)):
        while True:
            with source.ledger.read() as tx:
                page = tx.images_page(after, BATCH)
            if below is not None:
                page = [row for row in page if row.id < below]
            if not page:
                break
            yield page
            after = page[-1].id


def _already(report: MigrateReport, row: ImageRow, found: ImageRow) -> None:
    if found.size != row.size:
        report.conflicts.append(Skipped(row.key, row.id, f"the target already has an image of {found.size} bytes "
                                                          f"under this key (the source's has {row.size}); not replaced"))
        return
    report.already += 1
    if found.id != row.id:
        report.id_changes.append((row.id, found.id))


def _read_source(source, row: ImageRow, report: MigrateReport) -> bytes | None:
    """The source's bytes of ``row``, or None (reported) when they are missing or differ
    from the row. Other errors (the store unreachable) stop the run: they are no one image's."""
    try:
        data = source.blobs.read(row.key)
    except NotFound:
        report.failed.append(Skipped(row.key, row.id, "missing from the source's image store "
                                                      "(`abby check` on the source says more)"))
        return None
    if len(data) != row.size:
        report.failed.append(Skipped(row.key, row.id, f"the source's file has {len(data)} bytes, its ledger row "
                                                      f"says {row.size}; not copied (`abby check` on the source)"))
        return None
    return data


def _copy_one(source, target, row: ImageRow, report: MigrateReport) -> None:
    data = _read_source(source, row, report)
    if data is None:
        return
    digest = _sha(data)
    staged = target.blobs.stage(data)
    placed = False  # whether this run's blob may have reached the key (set before the commit, as store() does)
    try:
        with target.ledger.write() as tx:
            found = tx.images_by_keys([row.key])
            if found:  # another run copied it meanwhile
                _already(report, row, found[0])
                return
            placed = True
            try:
                target.blobs.commit(staged, row.key)
            except BlobExists:
                placed = False  # an interrupted run's, or someone else's: the bytes decide
            back = target.blobs.read(row.key)
            if len(back) != len(data) or _sha(back) != digest:
                if placed:  # written but not read back the same: take it away again
                    target.blobs.delete([row.key])
                    placed = False
                    report.failed.append(Skipped(row.key, row.id, "the copy read back from the target differs "
                                                                  "from the source; removed, not recorded"))
                else:
                    report.conflicts.append(Skipped(row.key, row.id, f"the target already holds a different file "
                                                                     f"({len(back)} bytes) under this key; "
                                                                     "not overwritten"))
                return
            next_id = tx.next_image_id()
            image_id = row.id if row.id >= next_id else next_id
            tx.insert_image(ImageRow(image_id, row.user_id, row.key, row.size, row.format, row.created_at, row.meta))
    except BaseException:
        # Rolled back (an error, Ctrl-C): a blob this run placed goes again unless its row
        # did commit after all. Keeping a blob is safe (the next run or `check --fix`
        # deals with it); a row without its blob never happens.
        if placed:
            try:
                with target.ledger.read() as tx:
                    known = bool(tx.images_by_keys([row.key]))
            except Exception:
                known = True
            if not known:  # if this delete fails too, the next run finds the same bytes and records them
                target.blobs.delete([row.key])
        raise
    finally:
        target.blobs.discard(staged)
    report.copied += 1
    report.bytes_copied += row.size
    if not placed:
        report.resumed += 1
    if image_id != row.id:
        report.id_changes.append((row.id, image_id))


def _plan_one(source, target, row: ImageRow, report: MigrateReport) -> bool:
    """What a real run would do with ``row``, reading as little as it can: the source's
    size from a stat, the bytes only where the target already has a blob to compare."""
    info = source.blobs.stat(row.key)
    if info is None or info.size != row.size:
        report.failed.append(Skipped(row.key, row.id, "missing from the source's image store" if info is None else
                                     f"the source's file has {info.size} bytes, its ledger row says {row.size}"))
        return False
    if target.blobs.stat(row.key) is not None:
        data = _read_source(source, row, report)
        if data is None:
            return False
        if _sha(target.blobs.read(row.key)) != _sha(data):
            report.conflicts.append(Skipped(row.key, row.id, "the target already holds a different file under "
                                                             "this key; would not be overwritten"))
            return False
        report.resumed += 1
    report.copied += 1
    report.bytes_copied += row.size
    return True


# --- history -----------------------------------------------------------------------------

def _fingerprint(record: tuple) -> tuple:
    """What recognises a source record in the target: every column but the two the copy
    changes (the record's own id, and the image id, which follows the image's id). An
    attempt is timed to the microsecond, so two records alike in all of these are
    (for all practical purposes) one attempt; alike records are still matched one for
    one. Content rather than a marker: it needs no column or table of its own, and it
    also recognises records that reached the target another way."""
    return record[1:13]


def _copy_history(source, target, report: MigrateReport, tick: Progress, dry_run: bool) -> None:
    after = 0
    while True:
        with source.ledger.read() as tx:
            page = tx.history_page(after, BATCH)
            keys = {r.id: r.key for r in tx.images_by_ids(sorted({p[13] for p in page if p[13] is not None}))}
        if not page:
            return
        after = page[-1][0]
        with target.ledger.read() as tx:
            have = Counter(map(_fingerprint, tx.history_between(min(p[1] for p in page), max(p[1] for p in page))))
            ids = {r.key: r.id for r in tx.images_by_keys(list(keys.values()))}
        records = []
        for record in page:
            fingerprint = _fingerprint(record)
            if have[fingerprint] > 0:
                have[fingerprint] -= 1
                report.history_already += 1
            else:
                # The image's id in the target; None when the image is not there (deleted
                # from the source before the move): never an id that may name another image.
                records.append((*fingerprint, ids.get(keys.get(record[13]))))
        if records and not dry_run:
            with target.ledger.write() as tx:  # one page per transaction: a rerun matches whole pages
                tx.append_history(records)
        report.history_copied += len(records)
        tick("history", report.history_copied + report.history_already, None)


# --- daily counters and caps ---------------------------------------------------------------

def _copy_daily(source, target, report: MigrateReport, dry_run: bool) -> None:
    """Today's counters, on the source's calendar (its daily_reset_timezone)."""
    report.day = day = source.quota.today()
    with source.ledger.read() as tx:
        counts = tx.daily_counts(day)
    with target.ledger.read() as tx:
        theirs = tx.daily_counts(day)
    higher = {user: used for user, used in counts.items() if used > theirs.get(user, 0)}
    if higher and not dry_run:
        with target.ledger.write() as tx:
            tx.raise_daily(day, higher)
    report.daily_users, report.daily_raised = len(counts), len(higher)


def _over_caps(target, report: MigrateReport, added: dict[str, int]) -> None:
    """Users (and the whole store) over the target's caps once the copy is in; a dry run
    adds what it would copy."""
    limits = target.limits
    with target.ledger.read() as tx:
        over = dict(tx.over_quota(limits.user_bytes))
        for user, extra in added.items():
            used = tx.usage(user).bytes + extra
            if used > limits.user_bytes:
                over[user] = used
        total = tx.totals().bytes + sum(added.values())
    report.over_quota = sorted(over.items())
    report.over_global = total if total > limits.global_bytes else None
