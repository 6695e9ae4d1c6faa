"""StorageManager: the shared image folder, with quotas, atomic saves, cleanup and check.

Layout under the root::

    images/users/<encoded user id>/<stem>-<id>.<ext>   stored images
    temp/                                             writes in progress
    .abby/ledger.sqlite3, .abby/maintenance.lock      ledger and locks

Write order of a save (the order python-diskcache uses): the bytes go to a
temp file on the same volume and are fsynced; then, inside one ledger write
transaction, the quota is checked, the row inserted and the file moved into
place with os.replace; then the transaction commits. A crash before the
commit leaves at most a file without a row (``check --fix`` adopts it), never
a row without its file, and never a partial file under images/.
Deleting goes the other way: remove the row, commit, then unlink.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sqlite3
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import (AbbyError, Busy, FileInUse, InvalidInput, NotFound, ReadOnlyStore, StorageError,
                      UserQuotaExceeded)
from .formats import EXTENSIONS, verify_image
from .ledger import Ledger, connect_read_only, convert_error
from .names import clean_stem, decode_user_dir, encode_user_id, fit_name, path_under, validate_user_id
from .liveness import abandoned
from .quota import (Limits, QuotaManager, Reservation, human_size, mib, reclaim_abandoned, size_pair,
                    too_big_for_user)
from .safefs import DELETED, IN_USE, MISSING, UNSAFE, SafeRemover, is_link, network_filesystem

USERS_DIR = "images/users"
LOCK_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class StoredImage:
    id: int
    user_id: str
    path: Path
    size: int
    format: str | None
    created_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "user_id": self.user_id, "path": str(self.path), "size": self.size,
            "format": self.format, "created_at": self.created_at.isoformat(), "metadata": self.metadata,
        }


@dataclass
class CleanupReport:
    dry_run: bool
    cutoff: datetime
    deleted: list[str] = field(default_factory=list)  # paths of images (would be) deleted
    freed_bytes: int = 0
    temp_files: list[str] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)
    released_reservations: int = 0
    skipped: list[str] = field(default_factory=list)  # files behind a link: never followed, rows kept
    kept: list[str] = field(default_factory=list)  # files another program holds open: rows kept, retried
    failed: list[str] = field(default_factory=list)  # files that could not be removed (an error): rows kept

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run, "cutoff": self.cutoff.isoformat(),
            "deleted_files": len(self.deleted), "freed_bytes": self.freed_bytes, "freed_mb": mib(self.freed_bytes),
            "files": self.deleted, "temp_files": self.temp_files, "empty_dirs": self.empty_dirs,
            "released_reservations": self.released_reservations, "skipped": self.skipped, "kept": self.kept,
            "failed": self.failed,
        }


@dataclass
class Problem:
    # missing_file orphan_file size_mismatch not_an_image changed over_quota stale_reservation temp_leftover
    # totals foreign network_share
    kind: str
    path: str
    detail: str
    fixed: bool = False


@dataclass
class CheckReport:
    fix: bool
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    scan_processes: int = 1  # how many processes scanned the folders (more than 1 on Linux for big stores)

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if not p.fixed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "consistent": not self.remaining, "fix": self.fix, "files_checked": self.files_checked,
            "scan_processes": self.scan_processes,
            "problems": [p.__dict__ for p in self.problems], "remaining": len(self.remaining),
        }


MAX_DAYS = 36_500  # a century: any longer age is a typo, and would overflow date arithmetic


def _check_days(name: str, days: object, minimum: float) -> None:
    if isinstance(days, bool) or not isinstance(days, (int, float)) or not math.isfinite(days):
        raise InvalidInput(f"{name} must be a number of days, got {days!r}")
    if not minimum <= days <= MAX_DAYS:
        span = f"from 0 to {MAX_DAYS:,}" if minimum == 0 else f"more than 0 and at most {MAX_DAYS:,}"
        raise InvalidInput(f"{name} must be {span} days, got {days!r}")


_MAX_ID = 2**63 - 1  # SQLite's INTEGER range
_NAME_ID = re.compile(r"-([0-9]{1,19})(?:-[0-9a-f]{6})?\.(?:png|jpg|webp)$")


def parse_image_id(ref: object) -> int | None:
    """The ledger id ``ref`` names, or None when it is a path. Ids are written with
    the ASCII digits 0-9 only: '١' or '²' (which str.isdigit() accepts) and numbers
    beyond SQLite's range are refused, not guessed at."""
    if isinstance(ref, bool):
        raise InvalidInput(f"{ref!r} is not an image id")
    if isinstance(ref, int):
        text = str(ref)
    elif isinstance(ref, str) and ref and all(ch.isdigit() or ch.isdecimal() or ch.isnumeric() for ch in ref):
        text = ref
    else:
        return None
    if not text.isascii() or not text.isdigit():
        raise InvalidInput(f"{text!r} is not an image id: ids are written with the digits 0-9")
    value = int(text)
    if not 1 <= value <= _MAX_ID:
        raise InvalidInput(f"image id {text} is out of range (1 to {_MAX_ID})")
    return value


def _by_folder(rows: list[tuple]) -> list[list[tuple]]:
    """Ledger rows grouped by the folder of their rel_path (column 2)."""
    groups: dict[str, list[tuple]] = {}
    for row in rows:
        groups.setdefault(row[2].rpartition("/")[0], []).append(row)
    return list(groups.values())


def _boundary(method):
    """Errors from below (the filesystem, SQLite) leave the public methods as
    StorageError, so that callers only ever need to catch AbbyError."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except AbbyError:
            raise
        except sqlite3.Error as exc:
            raise convert_error(exc, self.ledger.path) from exc
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise StorageError(f"{where}{exc.strerror or exc}") from exc

    return wrapper


class StorageManager:
    """The quota-managed image store shared by the bot, the CLI and cron."""

    def __init__(
        self,
        storage_root: str | os.PathLike,
        max_global_storage_mb: float = 5000,
        max_user_storage_mb: float = 500,
        max_user_daily_gens: int = 5,
        cleanup_days: float = 7,
        *,
        image_generation_size_mb: float = 1.5,
        daily_reset_timezone: str = "UTC",
    ):
        _check_days("cleanup_days", cleanup_days, minimum=1 / 86400)
        self.root = Path(os.path.abspath(storage_root))
        self._root_prefix = os.path.join(str(self.root), "")  # the root and one separator
        self.cleanup_days = cleanup_days
        self.limits = Limits.from_mb(
            max_global_storage_mb, max_user_storage_mb, max_user_daily_gens,
            image_generation_size_mb, daily_reset_timezone,
        )
        self.ledger = Ledger(self.root / ".abby", disk_has_images=self._disk_has_images,
                             rebuild=self._rebuild_lost_ledger)
        self._lock = None  # the maintenance FileLock, made on first use
        self.quota = QuotaManager(self.ledger, self.limits)
        self._ready = False

    @classmethod
    def from_settings(cls, settings) -> "StorageManager":
        """Build from a loaded ``Settings`` (or its ``storage`` part)."""
        s = getattr(settings, "storage", settings)
        return cls(
            s.root, s.max_global_storage_mb, s.max_user_storage_mb, s.max_user_daily_gens, s.cleanup_days,
            image_generation_size_mb=s.image_generation_size_mb, daily_reset_timezone=s.daily_reset_timezone,
        )

    @classmethod
    def from_config(cls, config: str | os.PathLike | None = None) -> "StorageManager":
        """Find and load abby's config file the way the CLI does, then build."""
        from ..config import load_settings

        return cls.from_settings(load_settings(config))

    def close(self) -> None:
        """Close the ledger connection (a later call opens it again)."""
        self.ledger.close()

    def __enter__(self) -> "StorageManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prepare(self) -> None:
        if not self._ready:
            try:
                for sub in ("images/users", "temp", ".abby"):
                    (self.root / sub).mkdir(parents=True, exist_ok=True)
                path_under(self.root, "images", "users")  # not a link out of the root
                path_under(self.root, "temp")
            except OSError as exc:
                raise StorageError(f"cannot create the storage root {self.root}: {exc.strerror or exc}") from exc
            self._ready = True

    # --- saving -----------------------------------------------------------------
    async def save_image(
        self, image_data: bytes, user_id: str, image_name: str = "generated.png", **kwargs
    ) -> tuple[bool, str, Path | None]:
        """The seed's call: ``(True, message, path)`` or ``(False, reason, None)``; never raises."""
        import asyncio

        try:
            stored = await asyncio.to_thread(self.store, image_data, user_id, image_name, **kwargs)
        except AbbyError as exc:
            return False, str(exc), None
        except Exception as exc:  # the seed's contract: a refusal, never an exception
            return False, f"could not save the image: {exc}", None
        return True, f"saved {stored.path.name} ({human_size(stored.size)})", stored.path

    @_boundary
    def store(
        self,
        image_data: bytes,
        user_id: str,
        image_name: str = "generated.png",
        *,
        metadata: dict[str, Any] | None = None,
        reservation: Reservation | None = None,
    ) -> StoredImage:
        """Save one image atomically, enforcing every limit; raises AbbyError subclasses.

        With ``reservation`` (from ``quota.reserve_generation``), the held room is
        swapped for the real size and the daily slot is confirmed in the same
        transaction as the new row.
        """
        user_id = validate_user_id(user_id)
        user_dir = encode_user_id(user_id)
        if not isinstance(image_data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"image data must be bytes, not {type(image_data).__name__}")
        data = bytes(image_data)
        if not data:
            raise InvalidInput("the image data is empty")
        if len(data) > self.limits.user_bytes:
            raise UserQuotaExceeded(too_big_for_user(len(data), self.limits.user_bytes))
        if reservation is not None and reservation.user_id != user_id:
            raise InvalidInput("the reservation belongs to another user")
        fmt = verify_image(data)[0]  # before anything is written
        self._prepare()
        if reservation is None:
            # Cheap early refusal (no lock): spares writing a temp file that would be refused.
            # The binding check is the one inside the write transaction below.
            with self.ledger.read() as conn:
                self.quota.check_room(conn, user_id, len(data))

        stem, ext = clean_stem(image_name), EXTENSIONS[fmt]
        user_path = self._user_path(user_dir)
        temp = self._write_temp(data)
        final: Path | None = None
        try:
            created = time.time()
            with self.ledger.write() as conn:
                if reservation is not None:
                    self.quota.charge(conn, reservation)
                self.quota.check_room(conn, user_id, len(data))
                # The write lock is ours, so the next id is ours too: the name can carry it
                # and the row is written once, complete.
                image_id = conn.execute(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM sqlite_sequence WHERE name = 'images'").fetchone()[0]
                name = fit_name(str(user_path), stem, f"-{image_id}{ext}")
                while os.path.lexists(user_path / name):  # a stray file from an old ledger: never overwrite it
                    name = fit_name(str(user_path), stem, f"-{image_id}-{os.urandom(3).hex()}{ext}")
                conn.execute(
                    "INSERT INTO images (id, user_id, rel_path, size, format, created_at, meta) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (image_id, user_id, f"{USERS_DIR}/{user_dir}/{name}", len(data), fmt, created,
                     json.dumps(metadata, ensure_ascii=False) if metadata else None),
                )
                final = user_path / name
                self._place(temp, final)
                # The new name must be on disk before the row that points at it can be.
                _fsync_dir(user_path)
        except BaseException:
            # Rolled back: whatever reached its final place is taken away again.
            if final is not None and not os.path.exists(temp):
                try:
                    with self.ledger.read() as conn:
                        known = conn.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone()
                except AbbyError:
                    known = True  # cannot tell; keeping a file is safer than losing one
                if not known:
                    final.unlink(missing_ok=True)
            temp.unlink(missing_ok=True)
            raise
        return StoredImage(image_id, user_id, final, len(data), fmt,
                           datetime.fromtimestamp(created, timezone.utc), metadata or {})

    def _user_path(self, folder: str) -> Path:
        """The user's folder, refusing to write through a link planted in its place."""
        path = self.root / "images" / "users" / folder
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path  # _place creates it
        if is_link(path) or not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"{path} is not a plain folder (a link?); abby will not write through it")
        return path

    def _write_temp(self, data: bytes) -> Path:
        temp = self.root / "temp" / f"{os.getpid()}-{os.urandom(8).hex()}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                _datasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
                raise ReadOnlyStore(f"the store {self.root} is read-only for this user; "
                                    "saving needs write access") from exc
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise StorageError(f"cannot write to {temp.parent}: {reason}") from exc
        return temp

    @staticmethod
    def _place(temp: Path, final: Path) -> None:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(temp, final)
            except FileNotFoundError:
                # A concurrent cleanup removed the (then empty) user folder; recreate it once.
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp, final)
        except OSError as exc:
            raise StorageError(f"cannot move the image into {final.parent}: {exc.strerror or exc}") from exc

    # --- reading ------------------------------------------------------------------
    def get_quota_status(self, user_id: str) -> dict:
        """The seed's status dict: global, user and daily parts (see the README)."""
        return self.quota.status(user_id)

    def _row_to_image(self, row: tuple) -> StoredImage:
        image_id, user_id, rel_path, size, fmt, created, meta = row
        return StoredImage(image_id, user_id, self.root / rel_path, size, fmt,
                           datetime.fromtimestamp(created, timezone.utc), json.loads(meta) if meta else {})

    _COLUMNS = "id, user_id, rel_path, size, format, created_at, meta"

    @_boundary
    def list_images(self, user_id: str | None = None, limit: int | None = None) -> list[StoredImage]:
        """A user's images (or everyone's), newest first."""
        sql = f"SELECT {self._COLUMNS} FROM images"
        args: list[Any] = []
        if user_id is not None:
            sql += " WHERE user_id = ?"
            args.append(validate_user_id(user_id))
        sql += " ORDER BY created_at DESC, id DESC"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        with self.ledger.read() as conn:
            return [self._row_to_image(r) for r in conn.execute(sql, args)]

    @_boundary
    def get_image(self, ref: int | str | os.PathLike) -> StoredImage:
        """Find an image by ledger id or by path (absolute, or relative to the root)."""
        if isinstance(ref, str) and not ref.strip():
            raise InvalidInput("no image given: pass an id or a path")
        image_id = parse_image_id(ref)
        with self.ledger.read() as conn:
            row = None
            if image_id is not None:
                row = conn.execute(f"SELECT {self._COLUMNS} FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None and image_id is None:
                rel = self._rel(ref)
                if rel is not None:
                    row = conn.execute(f"SELECT {self._COLUMNS} FROM images WHERE rel_path = ?", (rel,)).fetchone()
        if row is None:
            raise NotFound(f"no stored image {str(ref)!r}")
        return self._row_to_image(row)

    def _rel(self, ref: Any) -> str | None:
        path = Path(ref)
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, self.root / path]
        for candidate in candidates:
            try:
                rel = Path(os.path.abspath(candidate)).relative_to(self.root)
            except ValueError:
                continue
            return rel.as_posix()
        return None

    # --- deleting -----------------------------------------------------------------
    @_boundary
    def delete_image(self, ref: int | str | os.PathLike) -> StoredImage:
        """Remove one image: the row leaves the listing first, then the file goes, then
        the quota is freed.

        If the file cannot be removed (another program holds it open on Windows, a
        permission problem), the row is put back and FileInUse or StorageError is
        raised: the quota never forgets a file that is still on disk, not even if
        this process dies half-way (the next cleanup finishes the delete).
        """
        image = self.get_image(ref)
        with self.ledger.write() as conn:
            rows = self.ledger.begin_delete(conn, "id = ?", [image.id], 1)
        if not rows:
            raise NotFound(f"image {image.id} was deleted by someone else meanwhile")
        rel_dir, _, name = rows[0][2].rpartition("/")
        with SafeRemover(self.root) as remover:
            outcome = remover.unlink_all(rel_dir, [name])[0]
        gone = outcome in (DELETED, MISSING)
        with self.ledger.write() as conn:
            self.ledger.end_delete(conn, rows if gone else [], [] if gone else rows)
        if gone:
            return image
        if outcome == IN_USE:
            raise FileInUse(f"{image.path} is open in another program; image {image.id} was kept; "
                            "close it and try again")
        if outcome == UNSAFE:
            raise StorageError(f"{image.path} sits behind a link; abby never deletes through one; image kept")
        raise StorageError(f"cannot delete {image.path}; image {image.id} was kept")

    # --- cleanup --------------------------------------------------------------------
    @contextmanager
    def _maintenance_lock(self, timeout: float, writes: bool = True) -> Iterator[None]:
        """One cleanup, check or rebuild at a time per root (re-entrant in this process).

        A run that only reads (a dry run, check without --fix) on a store this user
        cannot write goes on without the lock: it changes nothing it could race with.
        """
        from filelock import Timeout

        state = self.root / ".abby"
        if state.is_dir() and not os.access(state, os.W_OK):
            if writes:
                raise ReadOnlyStore(f"the store {self.root} is read-only for this user; this needs write "
                                    "access: run it as the store's owner")
            yield
            return
        self._prepare()
        if self._lock is None:
            from filelock import FileLock

            self._lock = FileLock(self.root / ".abby" / "maintenance.lock")
        try:
            self._lock.acquire(timeout=timeout)
        except Timeout:
            raise Busy(f"another abby cleanup or check is running on {self.root}; "
                       f"waited {timeout:g} s, giving up") from None
        except OSError as exc:
            raise StorageError(f"cannot take the lock in {self.root / '.abby'}: {exc.strerror or exc}") from exc
        try:
            yield
        finally:
            self._lock.release()

    def _stale_temp_files(self, now: float) -> list[str]:
        out = []
        try:
            entries = list(os.scandir(self.root / "temp"))
        except FileNotFoundError:
            return out
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            pid_text = entry.name.split("-", 1)[0]
            pid = int(pid_text) if pid_text.isdigit() else None
            if entry.is_dir(follow_symlinks=False):
                continue
            if abandoned(pid, None, st.st_mtime, now):
                out.append(f"temp/{entry.name}")
        return sorted(out)

    @_boundary
    def cleanup(
        self,
        older_than_days: float | None = None,
        user_id: str | None = None,
        dry_run: bool = False,
        *,
        now: float | None = None,
        lock_timeout: float = LOCK_TIMEOUT_SECONDS,
    ) -> CleanupReport:
        """Delete images created ``older_than_days`` ago or earlier (default: cleanup_days),
        stale temp files and empty user folders. One run at a time per root.

        A dry run returns exactly the list a real run with the same ``now`` deletes.
        """
        days = self.cleanup_days if older_than_days is None else older_than_days
        _check_days("older-than", days, minimum=0)
        now = time.time() if now is None else now
        cutoff = now - days * 86400
        report = CleanupReport(dry_run, datetime.fromtimestamp(cutoff, timezone.utc))
        where, args = "created_at <= ?", [cutoff]
        if user_id is not None:
            where += " AND user_id = ?"
            args.append(validate_user_id(user_id))
        with self._maintenance_lock(lock_timeout, writes=not dry_run):
            self.ledger.open()
            temp_files = self._stale_temp_files(now)
            if dry_run:
                with self.ledger.read() as conn:
                    # An interrupted run's deletes first, as the real run finishes them first.
                    rows = conn.execute("SELECT rel_path, size FROM deleting ORDER BY created_at, id").fetchall()
                    rows += conn.execute(f"SELECT rel_path, size FROM images WHERE {where} ORDER BY created_at, id",
                                         args).fetchall()
                report.deleted = [self._abs(rel) for rel, _ in rows]
                report.freed_bytes = sum(size for _, size in rows)
                report.temp_files = [self._abs(t) for t in temp_files]
                report.empty_dirs = [self._abs(d) for d in self._dirs_left_empty({r[0] for r in rows}, user_id)]
                with self.ledger.read() as conn:
                    reservations = conn.execute("SELECT pid, host, created_at FROM reservations").fetchall()
                report.released_reservations = sum(abandoned(*r, now) for r in reservations)
                return report
            touched: set[str] = set()
            with SafeRemover(self.root) as remover:
                # First what a run that died half-way left (still counted), then the expired.
                for row, outcome in [*self._finish_interrupted_deletes(remover),
                                     *self._delete_expired(remover, where, args)]:
                    rel = row[2]
                    if outcome in (DELETED, MISSING):
                        report.deleted.append(self._abs(rel))
                        report.freed_bytes += row[3]
                        touched.add(rel.rpartition("/")[0])
                    else:  # still on disk, so still counted: the next run tries again
                        {UNSAFE: report.skipped, IN_USE: report.kept}.get(outcome, report.failed).append(
                            self._abs(rel))
                for rel in temp_files:
                    outcome = remover.unlink(rel)
                    if outcome in (DELETED, MISSING):
                        report.temp_files.append(self._abs(rel))
                    elif outcome != UNSAFE:
                        (report.kept if outcome == IN_USE else report.failed).append(self._abs(rel))
                candidates = touched | set(self._dirs_left_empty(set(), user_id, only_empty=True))
                report.empty_dirs = [self._abs(d) for d in sorted(candidates) if remover.rmdir(d)]
            with self.ledger.write() as conn:
                report.released_reservations = len(reclaim_abandoned(conn, now))
        return report

    def _abs(self, rel: str) -> str:
        """A ledger path ('images/users/a/x.png') as this OS writes it: the same text as
        StoredImage.path, so reports and listings can be compared. (Plain string work:
        pathlib would cost a cleanup of 50,000 files most of a second.)"""
        return self._root_prefix + (rel if os.sep == "/" else rel.replace("/", os.sep))

    def _delete_expired(self, remover: SafeRemover, where: str, args: list, batch: int = 10_000,
                        workers: int = 2) -> list[tuple[tuple, str]]:
        """Delete matching images in batches, overlapping the ledger and the disk work.

        Each batch's rows move to ``deleting`` (still counted) and commit; threads
        unlink the batch folder by folder while the next batch's rows move; then
        every row is settled: uncounted if its file is gone, back in ``images`` if
        not. A crash anywhere leaves rows in ``deleting``, which the next run
        finishes. Unlinking waits on the filesystem, not on Python, so the threads
        overlap. Returns (row, outcome) for every row.
        """
        from concurrent.futures import ThreadPoolExecutor

        pending = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            while True:
                with self.ledger.write() as conn:
                    rows = self.ledger.begin_delete(conn, where, args, limit=batch)
                if not rows:
                    break
                pending += [pool.submit(self._unlink_rows, remover, group) for group in _by_folder(rows)]
        return self._settle_deletes([pair for future in pending for pair in future.result()])

    @staticmethod
    def _unlink_rows(remover: SafeRemover, rows: list[tuple]) -> list[tuple[tuple, str]]:
        """Unlink the files of rows that share one folder; (row, outcome) for each."""
        rel_dir = rows[0][2].rpartition("/")[0]
        return list(zip(rows, remover.unlink_all(rel_dir, [r[2].rpartition("/")[2] for r in rows])))

    def _settle_deletes(self, results: list[tuple[tuple, str]]) -> list[tuple[tuple, str]]:
        if results:
            with self.ledger.write() as conn:
                self.ledger.end_delete(conn, [r for r, o in results if o in (DELETED, MISSING)],
                                       [r for r, o in results if o not in (DELETED, MISSING)])
        return results

    def _finish_interrupted_deletes(self, remover: SafeRemover) -> list[tuple[tuple, str]]:
        """Finish deletes that a process dying half-way left in ``deleting`` (their
        files still counted). Called under the maintenance lock; a delete still in
        flight elsewhere is harmless to finish too: settling is idempotent."""
        with self.ledger.read() as conn:
            rows = conn.execute("SELECT id, user_id, rel_path, size, format, created_at, meta FROM deleting "
                                "ORDER BY created_at, id").fetchall()
        return self._settle_deletes([pair for group in _by_folder(rows) for pair in self._unlink_rows(remover, group)])

    def _dirs_left_empty(self, doomed: set[str], user_id: str | None, only_empty: bool = False) -> list[str]:
        """User folders that hold nothing once ``doomed`` files are gone (or, with
        ``only_empty``, folders that are empty already: a cheap look at one entry)."""
        base = self.root / USERS_DIR
        if user_id is not None:
            names = [encode_user_id(user_id)]
        else:
            names = [e.name for e in _scandir(base) if e.is_dir(follow_symlinks=False)]
        out = []
        for name in sorted(names):
            rel_dir = f"{USERS_DIR}/{name}"
            path = base / name
            try:
                if is_link(path):
                    continue
                if only_empty:
                    with os.scandir(path) as it:
                        empty = next(it, None) is None
                else:
                    empty = all(f"{rel_dir}/{e}" in doomed for e in os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            if empty:
                out.append(rel_dir)
        return out

    # --- check ----------------------------------------------------------------------
    @_boundary
    def check(self, fix: bool = False, *, now: float | None = None,
              lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> CheckReport:
        """Reconcile the ledger with the disk; with ``fix``, repair what can be repaired.

        The disk is scanned without holding the ledger lock (saves go on); each
        finding is then confirmed inside one write transaction, where no save
        can be half-done, before it is reported or fixed.
        """
        now = time.time() if now is None else now
        with self._maintenance_lock(lock_timeout, writes=fix):
            self.ledger.open()
            return self._check_locked(fix, now)

    def _check_locked(self, fix: bool, now: float) -> CheckReport:
        report = CheckReport(fix)
        self._check_interrupted_deletes(report, fix, now)
        try:
            suspects, foreign, report.files_checked, drift, report.scan_processes = self._scan()
        except sqlite3.Error as exc:  # from the scan's own read-only connections
            raise convert_error(exc, self.ledger.path) from exc
        temp_files = self._stale_temp_files(now)

        # Decoding is slow: done before the write lock is taken, so saves go on meanwhile.
        verdicts = {rel: self._verify_file(rel) for rel in suspects}
        with (self.ledger.write() if fix else self.ledger.read()) as conn:
            for rel in suspects:
                self._confirm_and_fix(conn, rel, report, fix, verdicts[rel])
            for i, user_id, nbytes, *_ in reclaim_abandoned(conn, now) if fix else []:
                report.problems.append(Problem("stale_reservation", user_id,
                                               f"reservation {i} of {nbytes} bytes abandoned", fixed=True))
            if not fix:
                for r in conn.execute("SELECT id, user_id, bytes, pid, host, created_at FROM reservations"):
                    if abandoned(r[3], r[4], r[5], now):
                        report.problems.append(Problem("stale_reservation", r[1],
                                                       f"reservation {r[0]} of {r[2]} bytes abandoned"))
            if drift:  # seen in a consistent snapshot; confirmed (and fixed) under the lock
                self._check_totals(conn, report, fix)
            self._over_quota(conn, report)
        with SafeRemover(self.root) as remover:
            for rel in temp_files:
                fixed = fix and remover.unlink(rel) in (DELETED, MISSING)
                report.problems.append(Problem("temp_leftover", self._abs(rel), "abandoned partial write",
                                               fixed=fixed))
        for path, why in foreign:
            report.problems.append(Problem("foreign", path, why))
        remote = network_filesystem(self.root)
        if remote:
            report.problems.append(Problem(
                "network_share", str(self.root),
                f"the root is on a network filesystem ({remote}); SQLite's locking cannot keep "
                "processes on different machines within the limits: use a local disk"))
        return report

    def _disk_has_images(self) -> bool:
        """Whether any user folder holds a file (stops at the first one)."""
        for user in _scandir(self.root / USERS_DIR):
            if user.is_dir(follow_symlinks=False):
                for entry in _scandir(user.path):
                    if entry.is_file(follow_symlinks=False):
                        return True
        return False

    def _rebuild_lost_ledger(self) -> None:
        """A new ledger was made next to existing images: the old one was lost.
        Adopt every image again (as ``check --fix`` would) before anything is served,
        so that no limit is ever reset by the loss.

        The daily counters are gone with the old ledger; they are rebuilt from the
        images created today, which counts imports as generations too: a user may
        be refused early today, never allowed more than the limit.
        """
        import logging

        log = logging.getLogger("abby.storage")
        with self._maintenance_lock(LOCK_TIMEOUT_SECONDS):
            if not self.ledger.needs_rebuild():
                return  # another process rebuilt it while this one waited
            log.warning("the ledger %s was missing or empty while images exist; rebuilding it from the disk",
                        self.ledger.path)
            report = self._check_locked(fix=True, now=time.time())
            with self.ledger.write() as conn:
                conn.execute(
                    "INSERT INTO daily (user_id, day, used) SELECT user_id, ?, COUNT(*) FROM images "
                    "WHERE created_at >= ? GROUP BY user_id "
                    "ON CONFLICT (user_id, day) DO UPDATE SET used = MAX(used, excluded.used)",
                    (self.quota.today(), self.quota.day_start().timestamp()))
                conn.execute("DELETE FROM state WHERE key = 'rebuild'")
            adopted = sum(p.kind == "orphan_file" and p.fixed for p in report.problems)
            log.warning("ledger rebuilt: %d image(s) adopted, %d problem(s) left for `abby check`",
                        adopted, len(report.remaining))

    def _scan(self) -> tuple[list[str], list[tuple[str, str]], int, bool, int]:
        """Compare every file under images/users/ with the ledger.

        Returns the paths that disagree (unknown file, other size, or a row whose
        file is missing), anything abby never makes, how many files were seen, whether
        the totals drifted, and how many processes scanned.
        Findings are confirmed under the write lock by the caller.
        """
        foreign: list[tuple[str, str]] = []
        images = self.root / "images"
        for entry in _scandir(images):
            if entry.name != "users" or not entry.is_dir(follow_symlinks=False) or is_link(entry.path):
                foreign.append((entry.path, "not part of abby's layout; move it out of the store"))
        users = []
        for user in _scandir(images / "users"):
            if is_link(user.path):
                foreign.append((user.path, "a link inside the store; abby never follows it; remove it by hand"))
            elif not user.is_dir(follow_symlinks=False) or decode_user_dir(user.name) is None:
                foreign.append((user.path, "not a folder abby made for a user; move it out of the store"))
            else:
                users.append(user.name)
        suspects: list[str] = []
        seen = examined = 0
        pending, processes = _scan_in_parallel(str(self.ledger.path), str(images / "users"), users)
        # While the workers stat files, check the totals in one consistent snapshot.
        with self.ledger.read() as conn:
            drift = bool(self._totals_drift(conn)[0])
            total_rows = conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        for found, odd, count, rows in pending():
            suspects += found
            foreign += odd
            seen += count
            examined += rows
        if examined < total_rows:
            # Rows whose folder was not scanned (gone, or a link): their files are missing.
            scanned = {f"{USERS_DIR}/{name}/" for name in users}
            with self.ledger.read() as conn:
                suspects += [rel for (rel,) in conn.execute("SELECT rel_path FROM images")
                             if rel[:rel.rindex("/") + 1] not in scanned]
        return suspects, foreign, seen, drift, processes

    def _check_interrupted_deletes(self, report: CheckReport, fix: bool, now: float) -> None:
        """Deletes a process left half-done: their files are still counted; --fix finishes them."""
        if fix:
            with SafeRemover(self.root) as remover:
                for row, outcome in self._finish_interrupted_deletes(remover):
                    report.problems.append(Problem(
                        "interrupted_delete", self._abs(row[2]),
                        f"image {row[0]}'s delete was interrupted; " + (
                            "finished" if outcome in (DELETED, MISSING) else "its file could not be removed: kept"),
                        fixed=True))
            return
        with self.ledger.read() as conn:
            rows = conn.execute("SELECT id, rel_path FROM deleting WHERE since < ?", (now - 60,)).fetchall()
        for image_id, rel in rows:  # younger ones are most likely a delete in progress right now
            report.problems.append(Problem("interrupted_delete", self._abs(rel),
                                           f"image {image_id}'s delete was interrupted; still counted in the quota"))

    def _verify_file(self, rel: str) -> tuple[int, str | None, str] | None:
        """(size, format or None, why not an image) for a file on disk; None if it is gone
        or not a plain file. Opened without following a link."""
        path = self.root / rel
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                return size, verify_image(fh, "the file")[0], ""
            except InvalidInput as exc:
                return size, None, str(exc)
            except OSError as exc:
                return size, None, f"the file cannot be read: {exc.strerror or exc}"

    def _confirm_and_fix(self, conn, rel: str, report: CheckReport, fix: bool,
                         verdict: tuple[int, str | None, str] | None) -> None:
        row = conn.execute("SELECT id, size FROM images WHERE rel_path = ?", (rel,)).fetchone()
        path = self.root / rel
        try:
            st = os.lstat(path)
            size = st.st_size if not is_link(path) else None
        except OSError:
            size = None
        if size is not None and (verdict is None or verdict[0] != size):
            report.problems.append(Problem("changed", str(path), "changed while abby checked it; run check again"))
            return
        if row is not None and size is None:
            problem = Problem("missing_file", str(path), f"image {row[0]} is in the ledger but its file is gone")
            if fix:
                conn.execute("DELETE FROM images WHERE id = ?", (row[0],))
                problem.fixed = True
        elif size is not None and verdict[1] is None:
            known = f"image {row[0]}'s file was changed: " if row is not None else ""
            problem = Problem("not_an_image", str(path),
                              f"{known}{verdict[2]}; not adopted and left alone: move it out of the store")
        elif row is not None and size != row[1]:
            problem = Problem("size_mismatch", str(path), f"ledger says {row[1]} bytes, the file has {size}")
            if fix:
                conn.execute("UPDATE images SET size = ? WHERE id = ?", (size, row[0]))
                problem.fixed = True
        elif row is None and size is not None:
            user_dir = rel.split("/")[2]
            problem = Problem("orphan_file", str(path), f"{size} bytes the ledger does not know")
            if fix:
                # Names end in '-<id>': keep that id where it is free, so a rebuilt
                # ledger shows the ids users and logs already know.
                named = _NAME_ID.search(rel)
                image_id = int(named.group(1)) if named and int(named.group(1)) <= _MAX_ID else None
                if image_id is not None and conn.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone():
                    image_id = None
                conn.execute(
                    "INSERT INTO images (id, user_id, rel_path, size, format, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (image_id, decode_user_dir(user_dir), rel, size, verdict[1], st.st_mtime),
                )
                problem.detail += "; adopted into its user's usage"
                problem.fixed = True
        else:
            return  # consistent after all: a save or delete finished between scan and lock
        report.problems.append(problem)

    def _over_quota(self, conn, report: CheckReport) -> None:
        """Users (and the store) above their cap: adopted files, or caps lowered since.
        Nothing is deleted for them; the admin decides."""
        lim = self.limits
        for user_id, used in conn.execute("SELECT user_id, bytes FROM usage WHERE bytes > ? ORDER BY user_id",
                                          (lim.user_bytes,)):
            used_text, cap = size_pair(used, lim.user_bytes)
            report.problems.append(Problem("over_quota", user_id, f"user {user_id!r} uses {used_text}, over the "
                                           f"per-user cap of {cap}; delete images or raise max_user_storage_mb"))
        used = conn.execute("SELECT bytes FROM totals").fetchone()[0]
        if used > lim.global_bytes:
            used_text, cap = size_pair(used, lim.global_bytes)
            report.problems.append(Problem("over_quota", str(self.root), f"the store holds {used_text}, over the "
                                           f"global cap of {cap}; delete images or raise max_global_storage_mb"))

    @staticmethod
    def _totals_drift(conn) -> tuple[list[str] | bool, tuple, dict, dict]:
        """Compare the kept totals with sums over the rows: (users that differ or True for
        the overall line, the right overall totals, per-user truth, per-user reservations)."""
        truth = {u: (b, f) for u, b, f in conn.execute(
            "SELECT user_id, SUM(size), COUNT(*) FROM (SELECT user_id, size FROM images "
            "UNION ALL SELECT user_id, size FROM deleting) GROUP BY user_id")}
        held = dict(conn.execute("SELECT user_id, SUM(bytes) FROM reservations GROUP BY user_id").fetchall())
        recorded = {u: (b, f, r) for u, b, f, r in conn.execute("SELECT user_id, bytes, files, reserved FROM usage")}
        wrong = [u for u in set(truth) | set(recorded) | set(held)
                 if (truth.get(u, (0, 0)) + (held.get(u, 0),)) != recorded.get(u, (0, 0, 0))]
        total = conn.execute("SELECT bytes, files, reserved FROM totals").fetchone()
        want = (sum(b for b, _ in truth.values()), sum(f for _, f in truth.values()), sum(held.values()))
        return (wrong or tuple(total) != want), want, truth, held

    def _check_totals(self, conn, report: CheckReport, fix: bool) -> None:
        wrong, want, truth, held = self._totals_drift(conn)
        if not wrong:
            return
        wrong = wrong if isinstance(wrong, list) else []
        problem = Problem("totals", str(self.ledger.path),
                          f"usage totals differ from the image rows for {len(wrong)} user(s) or overall")
        if fix:
            conn.execute("DELETE FROM usage")
            conn.executemany(
                "INSERT INTO usage (user_id, bytes, files, reserved) VALUES (?, ?, ?, ?)",
                [(u, *truth.get(u, (0, 0)), held.get(u, 0)) for u in set(truth) | set(held)],
            )
            conn.execute("UPDATE totals SET bytes = ?, files = ?, reserved = ?", want)
            problem.fixed = True
        report.problems.append(problem)


def _scan_users(ledger: str, base: str, names: list[str]) -> tuple[list[str], list[tuple[str, str]], int, int]:
    """Compare these user folders with their rows in the ledger.

    Every entry is stat'ed relative to its folder, never following a link. Returns
    the paths that disagree (unknown file, other size, row without its file),
    entries abby never makes, the files seen and the rows examined. Opens its own
    read-only connection, so it can run in a forked worker.
    """
    found: list[str] = []
    odd: list[tuple[str, str]] = []
    seen = examined = 0
    use_fd = os.stat in os.supports_dir_fd and hasattr(os, "O_NOFOLLOW")
    conn = connect_read_only(Path(ledger))
    try:
        conn.execute("PRAGMA mmap_size=268435456")
        for name in names:
            prefix = f"{USERS_DIR}/{name}/"
            # '0' sorts right after '/': this is the range of paths inside the folder
            # Files of an interrupted delete are known too: `deleting` still counts them.
            rows = dict(conn.execute("SELECT rel_path, size FROM images WHERE rel_path >= ?1 AND rel_path < ?2 "
                                     "UNION ALL SELECT rel_path, size FROM deleting WHERE rel_path >= ?1 "
                                     "AND rel_path < ?2", (prefix, prefix[:-1] + "0")))
            examined += len(rows)
            folder = os.path.join(base, name)
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW) if use_fd else None
                entries = os.listdir(fd if fd is not None else folder)
            except OSError:
                found += rows  # replaced by a link or removed meanwhile
                continue
            try:
                for entry in entries:
                    try:
                        st = (os.stat(entry, dir_fd=fd, follow_symlinks=False) if fd is not None
                              else os.lstat(os.path.join(folder, entry)))
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISREG(st.st_mode) or getattr(st, "st_file_attributes", 0) & 0x400:
                        odd.append((os.path.join(folder, entry),
                                    "not a plain file; abby never follows links; remove it by hand"))
                        continue
                    seen += 1
                    if rows.pop(prefix + entry, None) != st.st_size:
                        found.append(prefix + entry)
            finally:
                if fd is not None:
                    os.close(fd)
            found += rows  # rows whose file was not there
    finally:
        conn.close()
    return found, odd, seen, examined


def _scan_in_parallel(ledger: str, base: str, names: list[str]):
    """Start _scan_users over the folders; returns a function that waits for the results.

    Where fork is cheap and safe (Linux) the folders are split between worker
    processes: stat waits in the kernel, so two processes nearly halve a big check.
    """
    import sys
    import threading

    workers = min(os.cpu_count() or 1, 4)
    # fork copies only the calling thread: with other threads alive (a bot's executor,
    # say) a lock they hold could never be released in the child, so scan in-process.
    if (sys.platform != "linux" or workers < 2 or len(names) < 2 * workers
            or threading.active_count() > 1):
        result = [_scan_users(ledger, base, names)]
        return (lambda: result), 1
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(workers)
    pending = pool.starmap_async(_scan_users, [(ledger, base, names[i::workers]) for i in range(workers)])

    def wait():
        try:
            return pending.get()
        finally:
            pool.close()
            pool.join()

    return wait, workers


def _scandir(path: str | os.PathLike) -> Iterable[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            yield from it
    except (FileNotFoundError, NotADirectoryError):
        return


# fdatasync skips the timestamps but still flushes the data and the size, which is
# all a new file needs (SQLite makes the same choice); not every platform has it.
_datasync = getattr(os, "fdatasync", os.fsync)


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX; Windows cannot open folders)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot make the new image durable in {path}: {exc.strerror or exc}") from exc
