"""check / check --fix: reconcile the ledger's rows with the blobs the store lists.

The blobs are listed without holding the ledger lock (saves go on); each finding
is then confirmed inside one ledger transaction, where no save can be half-done,
before it is reported or fixed. The comparison runs on any BlobStore
(``list``/``stat``/``open``); what only a folder has (temp files, links, folders
abby never makes, a scan split between forked processes) is in the local branch.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Callable

from ..errors import InvalidInput, NotFound, StorageError
from .backend import ImageRow, Ledger, LedgerReader
from .blobs import BlobStore, LocalBlobStore
from .formats import verify_image
from .maintenance import GONE, finish_interrupted_deletes, where
from .names import decode_user_dir
from .quota import Limits, abandoned_reservations, human_size, reclaim_abandoned, size_pair
from .reports import CheckReport, Problem
from .safefs import SafeRemover, network_filesystem

_MAX_ID = 2**63 - 1  # SQLite's INTEGER range, and PostgreSQL's bigint
_NAME_ID = re.compile(r"-([0-9]{1,19})(?:-[0-9a-f]{6})?\.(?:png|jpg|webp)$")
_NOT_PLAIN = "not a plain file; abby never follows links; remove it by hand"


def check(ledger: Ledger, blobs: BlobStore, limits: Limits, *, fix: bool, now: float) -> CheckReport:
    """Called under the maintenance lock, with the ledger open."""
    report = CheckReport(fix)
    local = blobs if isinstance(blobs, LocalBlobStore) else None
    _check_interrupted_deletes(ledger, blobs, report, fix, now)
    suspects, foreign, report.files_checked, drift, report.scan_processes = _scan(ledger, blobs)
    temp_files = local.stale_temp_files(now) if local else []

    # Decoding is slow: done before the lock is taken, so saves go on meanwhile.
    verdicts = {key: _verify(blobs, key, limits.user_bytes) for key in suspects}
    # A blob without a row may be a save in flight (placed, its row not committed yet):
    # only under the write lock can no save be half-done, so a check that only reads
    # takes it too when there is something to confirm (and this user may write at all).
    with (ledger.write() if fix or (suspects and not ledger.read_only) else ledger.read()) as tx:
        # Lowest name id first (names without one last): an orphan adopted under the id its
        # name carries pushes the next id past it, so a higher one can keep its own too.
        for key in sorted(suspects, key=lambda k: (_name_id(k) or _MAX_ID + 1, k)):
            _confirm_and_fix(tx, blobs, key, report, fix, verdicts[key])
        stale = reclaim_abandoned(tx, now) if fix else abandoned_reservations(tx, now)
        for r in stale:
            report.problems.append(Problem("stale_reservation", r.user_id,
                                           f"reservation {r.id} of {r.bytes} bytes abandoned", fixed=fix))
        if drift:  # seen in a consistent snapshot; confirmed (and fixed) under the lock
            _check_totals(tx, ledger, report, fix)
        _over_quota(tx, limits, report, blobs)
    if local:
        with SafeRemover(local.root) as remover:
            for rel in temp_files:
                fixed = fix and remover.unlink(rel) in GONE
                report.problems.append(Problem("temp_leftover", local.root_text(rel), "abandoned partial write",
                                               fixed=fixed))
    for path, why in foreign:
        report.problems.append(Problem("foreign", path, why))
    store_root = getattr(ledger, "store_root", None)  # a ledger in a file: SQLite's locking is per host
    remote = network_filesystem(store_root) if store_root is not None else None
    if remote:
        report.problems.append(Problem(
            "network_share", str(store_root),
            f"the root is on a network filesystem ({remote}); SQLite's locking cannot keep "
            "processes on different machines within the limits: use a local disk"))
    return report


def _check_interrupted_deletes(ledger: Ledger, blobs: BlobStore, report: CheckReport, fix: bool,
                               now: float) -> None:
    """Deletes a process left half-done: their blobs are still counted; --fix finishes them."""
    if fix:
        for row, outcome in finish_interrupted_deletes(ledger, blobs):
            report.problems.append(Problem(
                "interrupted_delete", where(blobs, row.key), f"image {row.id}'s delete was interrupted; " + (
                    "finished" if outcome in GONE else "its file could not be removed: kept"), fixed=True))
        return
    with ledger.read() as tx:  # younger ones are most likely a delete in progress right now
        rows = tx.pending_deletes(started_before=now - 60)
    for row in rows:
        report.problems.append(Problem("interrupted_delete", where(blobs, row.key),
                                       f"image {row.id}'s delete was interrupted; still counted in the quota"))


# --- the scan ----------------------------------------------------------------------------

def _scan(ledger: Ledger, blobs: BlobStore) -> tuple[list[str], list[tuple[str, str]], int, bool, int]:
    """Compare every blob under users/ with the ledger's rows.

    Returns the keys that disagree (unknown blob, other size, or a row whose blob is
    missing), entries abby never makes, how many blobs were seen, whether the totals
    drifted, and how many processes scanned. Findings are confirmed by the caller.
    """
    with ledger.read() as tx:
        known = tx.blob_sizes()
    if not isinstance(blobs, LocalBlobStore):
        seen, suspects = 0, []
        for info in blobs.list("users/"):
            seen += 1
            if known.pop(info.key, None) != info.size:
                suspects.append(info.key)
        with ledger.read() as tx:
            drift = not tx.audit_totals().ok
        return suspects + list(known), [], seen, drift, 1

    users, foreign = blobs.user_folders()
    folders = [f"users/{name}" for name in users]
    grouped: dict[str, dict[str, int]] = {}
    for key, size in known.items():
        grouped.setdefault(key[:key.rfind("/")], {})[key] = size
    pending, processes = _compare_in_parallel(blobs, grouped, folders)
    # While the workers stat files, check the totals in one consistent snapshot.
    with ledger.read() as tx:
        drift = not tx.audit_totals().ok
    suspects: list[str] = []
    seen = 0
    for found, odd, count in pending():
        suspects += found
        foreign += odd
        seen += count
    # Rows whose folder was not scanned (gone, or a link): their files are missing.
    scanned = set(folders)
    for folder, rows in grouped.items():
        if folder not in scanned:
            suspects += rows
    return suspects, foreign, seen, drift, processes


# What forked workers compare against: set before the fork, so each child has it without pickling.
_SHARED: tuple[LocalBlobStore, dict[str, dict[str, int]]] | None = None


def _compare_folders(folders: list[str]) -> tuple[list[str], list[tuple[str, str]], int]:
    """Compare these folders' files with their rows: (keys that disagree, odd entries, files seen)."""
    blobs, grouped = _SHARED
    found: list[str] = []
    odd: list[tuple[str, str]] = []
    seen = 0
    for folder in folders:
        rows = dict(grouped.get(folder, ()))
        scanned = blobs.scan_folder(folder)
        if scanned is None:
            found += rows  # replaced by a link or removed meanwhile
            continue
        infos, strange, subfolders = scanned
        odd += [(path, _NOT_PLAIN) for path, _ in strange]
        odd += [(blobs.path_text(f"{folder}/{sub}"), _NOT_PLAIN) for sub in subfolders]
        seen += len(infos)
        for info in infos:
            if rows.pop(info.key, None) != info.size:
                found.append(info.key)
        found += rows  # rows whose file was not there
    return found, odd, seen


def _compare_in_parallel(blobs: LocalBlobStore, grouped: dict[str, dict[str, int]],
                         folders: list[str]) -> tuple[Callable[[], list], int]:
    """Start comparing the folders; returns a function that waits for the results.

    Where fork is cheap and safe (Linux) the folders are split between worker
    processes: stat waits in the kernel, so two processes nearly halve a big check.
    """
    import sys
    import threading

    global _SHARED
    _SHARED = (blobs, grouped)
    workers = min(os.cpu_count() or 1, 4)
    # fork copies only the calling thread: with other threads alive (a bot's executor,
    # say) a lock they hold could never be released in the child, so scan in-process.
    if (sys.platform != "linux" or workers < 2 or len(folders) < 2 * workers
            or threading.active_count() > 1):
        try:
            result = [_compare_folders(folders)]
        finally:
            _SHARED = None
        return (lambda: result), 1
    import multiprocessing

    try:
        pool = multiprocessing.get_context("fork").Pool(workers)
    finally:
        _SHARED = None  # the children have their copy
    pending = pool.map_async(_compare_folders, [folders[i::workers] for i in range(workers)])

    def wait():
        try:
            return pending.get()
        finally:
            pool.close()
            pool.join()

    return wait, workers


# --- confirming and fixing ---------------------------------------------------------------

def _verify(blobs: BlobStore, key: str, max_bytes: int) -> tuple[int, str | None, str] | None:
    """(size, format or None, why not an image) for a blob; None if it is gone or not a
    plain file. Read through the store, which never follows a link. An object in a remote
    store larger than a whole user's cap is not read (it would be held in memory, and abby
    never stores such an image): it is reported, not adopted; a local file is read as it is."""
    try:
        if blobs.local_path(key) is None:
            info = blobs.stat(key)
            if info is not None and info.size > max_bytes:
                return info.size, None, (f"it is {human_size(info.size)}, more than a user's whole cap "
                                         f"({human_size(max_bytes)}), so abby never stored it; not read")
        fh = blobs.open(key)
    except (NotFound, StorageError):
        return None
    with fh:
        try:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(0)
        except OSError:
            return None
        try:
            return size, verify_image(fh, "the file")[0], ""
        except InvalidInput as exc:
            return size, None, str(exc)
        except OSError as exc:
            return size, None, f"the file cannot be read: {exc.strerror or exc}"


def _confirm_and_fix(tx, blobs: BlobStore, key: str, report: CheckReport, fix: bool,
                     verdict: tuple[int, str | None, str] | None) -> None:
    row = tx.image_by_key(key)
    info = blobs.stat(key)
    size = info.size if info is not None else None
    path = where(blobs, key)
    if size is not None and (verdict is None or verdict[0] != size):
        report.problems.append(Problem("changed", path, "changed while abby checked it; run check again"))
        return
    if row is not None and size is None:
        problem = Problem("missing_file", path, f"image {row.id} is in the ledger but its file is gone")
        if fix:
            tx.remove_image(row.id)
            problem.fixed = True
    elif size is not None and verdict[1] is None:
        known = f"image {row.id}'s file was changed: " if row is not None else ""
        problem = Problem("not_an_image", path,
                          f"{known}{verdict[2]}; not adopted and left alone: move it out of the store")
    elif row is not None and size != row.size:
        problem = Problem("size_mismatch", path, f"ledger says {row.size} bytes, the file has {size}")
        if fix:
            tx.resize_image(row.id, size)
            problem.fixed = True
    elif row is None and size is not None:
        parts = key.split("/")
        user_id = decode_user_dir(parts[1]) if len(parts) == 3 and parts[0] == "users" else None
        if user_id is None:
            report.problems.append(Problem("foreign", path, "not a name abby makes; move it out of the store"))
            return
        problem = Problem("orphan_file", path, f"{size} bytes the ledger does not know")
        if fix:
            # Names end in '-<id>': keep that id where it was never handed out, so a rebuilt
            # ledger shows the ids users and logs already know. A lower one may have named
            # another image since (a crashed save's id goes to the next save): a new id then.
            image_id = _name_id(key)
            if image_id is not None and image_id < tx.next_image_id():
                image_id = None
            tx.insert_image(ImageRow(image_id, user_id, key, size, verdict[1], info.modified))
            problem.detail += "; adopted into its user's usage"
            problem.fixed = True
    else:
        return  # consistent after all: a save or delete finished between scan and lock
    report.problems.append(problem)


def _name_id(key: str) -> int | None:
    named = _NAME_ID.search(key)
    return int(named.group(1)) if named and int(named.group(1)) <= _MAX_ID else None


def _check_totals(tx, ledger: Ledger, report: CheckReport, fix: bool) -> None:
    audit = tx.audit_totals()
    if audit.ok:
        return
    problem = Problem("totals", ledger.describe(),
                      f"usage totals differ from the image rows for {len(audit.users)} user(s) or overall")
    if fix:
        tx.repair_totals()
        problem.fixed = True
    report.problems.append(problem)


def _over_quota(tx: LedgerReader, limits: Limits, report: CheckReport, blobs: BlobStore) -> None:
    """Users (and the store) above their cap: adopted files, or caps lowered since.
    Nothing is deleted for them; the admin decides."""
    for user_id, used in tx.over_quota(limits.user_bytes):
        used_text, cap = size_pair(used, limits.user_bytes)
        report.problems.append(Problem("over_quota", user_id, f"user {user_id!r} uses {used_text}, over the "
                                       f"per-user cap of {cap}; delete images or raise max_user_storage_mb"))
    used = tx.totals().bytes
    if used > limits.global_bytes:
        used_text, cap = size_pair(used, limits.global_bytes)
        place = str(blobs.root) if isinstance(blobs, LocalBlobStore) else blobs.describe()
        report.problems.append(Problem("over_quota", place, f"the store holds {used_text}, over the "
                                       f"global cap of {cap}; delete images or raise max_global_storage_mb"))


def rebuild_lost_ledger(ledger, blobs: BlobStore, quota, lock_timeout: float) -> None:
    """A new SQLite ledger was made next to existing images: the old one was lost.
    Adopt every image again (as ``check --fix`` would) before anything is served,
    so that no limit is ever reset by the loss.

    The daily counters are gone with the old ledger; they are rebuilt from the
    images created today, which counts imports as generations too: a user may
    be refused early today, never allowed more than the limit.
    """
    log = logging.getLogger("abby.storage")
    with ledger.maintenance_lock(lock_timeout):
        if not ledger.needs_rebuild():
            return  # another process rebuilt it while this one waited
        log.warning("the ledger %s was missing or empty while images exist; rebuilding it from the disk",
                    ledger.describe())
        report = check(ledger, blobs, quota.limits, fix=True, now=time.time())
        with ledger.write() as tx:
            tx.recount_daily_from_images(quota.today(), quota.day_start().timestamp())
        adopted = sum(p.kind == "orphan_file" and p.fixed for p in report.problems)
        log.warning("ledger rebuilt: %d image(s) adopted, %d problem(s) left for `abby check`",
                    adopted, len(report.remaining))
