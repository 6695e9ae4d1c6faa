"""StorageManager: the quota-managed image store, as one facade over two seams.

* the ledger (``backend.Ledger``; ``sqlite.SqliteLedger`` by default) keeps the
  rows, the usage totals, the reservations, the daily counters and the history;
* the blob store (``blobs.BlobStore``; ``blobs.LocalBlobStore`` by default) keeps
  the bytes.

Layout of the default (local) pair under the root::

    images/users/<encoded user id>/<stem>-<id>.<ext>   stored images (key: users/<dir>/<name>)
    temp/                                             writes in progress
    .abby/ledger.sqlite3, .abby/maintenance.lock      ledger and locks

Write order of a save (the order python-diskcache uses): the bytes are staged
(local: a temp file on the same volume, fsynced); then, inside one ledger write
transaction, the quota is checked, the id and key decided, the blob committed
under the key (create-only; local: moved into place and the folder fsynced) and
the row inserted; then the transaction commits. A crash before the commit
leaves at most a blob without a row (``check --fix`` adopts it), never a row
without its blob, and never a partial file under images/.
Deleting goes the other way: the row leaves the listing, the blob goes, then
the row is settled (see maintenance.py). Cleanup and check live in
maintenance.py and reconcile.py; their reports in reports.py.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import (AbbyError, ConfigError, FileInUse, InvalidInput, NotFound, ReadOnlyStore, StorageError,
                      UserQuotaExceeded)
from .backend import ImageRow, Ledger
from .blobs import IN_USE, UNSAFE, BlobExists, BlobStore, LocalBlobStore
from .formats import EXTENSIONS, verify_image
from .maintenance import GONE, check_days, cleanup as _cleanup, where
from .names import clean_stem, encode_user_id, fit_name, validate_user_id
from .quota import Limits, QuotaManager, Reservation, human_size, too_big_for_user
from .reports import CheckReport, CleanupReport, Problem
from .sqlite import SqliteLedger

__all__ = ["StorageManager", "StoredImage", "CleanupReport", "CheckReport", "Problem", "QuotaManager",
           "parse_image_id"]

LOCK_TIMEOUT_SECONDS = 10.0
_MAX_ID = 2**63 - 1  # SQLite's INTEGER range


@dataclass(frozen=True)
class StoredImage:
    id: int
    user_id: str
    path: Path | None  # the file, where the blob store has files (local); None elsewhere
    size: int
    format: str | None
    created_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    key: str = ""      # the blob key: read the image with StorageManager.open_image, on any store

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "user_id": self.user_id, "path": str(self.path) if self.path is not None else None,
            "key": self.key, "size": self.size, "format": self.format, "created_at": self.created_at.isoformat(),
            "metadata": self.metadata,
        }


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


def _boundary(method):
    """Errors from below (the filesystem) leave the public methods as StorageError, so
    that callers only ever need to catch AbbyError. (Ledgers convert their own.)"""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except AbbyError:
            raise
        except OSError as exc:
            where_ = f"{exc.filename}: " if exc.filename else ""
            raise StorageError(f"{where_}{exc.strerror or exc}") from exc

    return wrapper


class StorageManager:
    """The quota-managed image store shared by the bot, the CLI and cron.

    ``ledger`` and ``blobs`` inject other backends (PostgreSQL, S3); by default the
    store is the SQLite ledger and the folder under ``storage_root``.
    """

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
        ledger: Ledger | None = None,
        blobs: BlobStore | None = None,
    ):
        check_days("cleanup_days", cleanup_days, minimum=1 / 86400)
        self.root = Path(os.path.abspath(storage_root))
        self.cleanup_days = cleanup_days
        self.limits = Limits.from_mb(
            max_global_storage_mb, max_user_storage_mb, max_user_daily_gens,
            image_generation_size_mb, daily_reset_timezone,
        )
        self.blobs = blobs if blobs is not None else LocalBlobStore(self.root)
        if ledger is None:
            # A lost SQLite ledger is rebuilt from the files next to it: only the local pair can.
            local = isinstance(self.blobs, LocalBlobStore)
            ledger = SqliteLedger(self.root / ".abby", disk_has_images=self.blobs.has_files if local else None,
                                  rebuild=self._rebuild_lost_ledger if local else None)
        self.ledger = ledger
        self.quota = QuotaManager(self.ledger, self.limits)
        self._blobs_matched = False  # the ledger's recorded image store was compared with ours

    @classmethod
    def from_settings(cls, settings) -> "StorageManager":
        """Build from a loaded ``Settings`` (or its ``storage`` part)."""
        s = getattr(settings, "storage", settings)
        return cls(
            s.root, s.max_global_storage_mb, s.max_user_storage_mb, s.max_user_daily_gens, s.cleanup_days,
            image_generation_size_mb=s.image_generation_size_mb, daily_reset_timezone=s.daily_reset_timezone,
            ledger=_ledger_for(s), blobs=_blobs_for(s, getattr(settings, "env", None)),
        )

    @classmethod
    def from_config(cls, config: str | os.PathLike | None = None) -> "StorageManager":
        """Find and load abby's config file the way the CLI does, then build."""
        from ..config import load_settings

        return cls.from_settings(load_settings(config))

    def close(self) -> None:
        """Close the ledger connection and the blob store (a later call opens them again)."""
        self.ledger.close()
        self.blobs.close()

    def __enter__(self) -> "StorageManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- saving -----------------------------------------------------------------
    async def save_image(
        self, image_data: bytes, user_id: str, image_name: str = "generated.png", **kwargs
    ) -> tuple[bool, str, Path | None]:
        """The seed's call: ``(True, message, path)`` or ``(False, reason, None)``; never raises.
        The path is None on a store without files (S3): use ``store`` and ``open_image`` there."""
        import asyncio

        try:
            stored = await asyncio.to_thread(self.store, image_data, user_id, image_name, **kwargs)
        except AbbyError as exc:
            return False, str(exc), None
        except Exception as exc:  # the seed's contract: a refusal, never an exception
            return False, f"could not save the image: {exc}", None
        return True, f"saved {stored.key.rpartition('/')[2]} ({human_size(stored.size)})", stored.path

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
        self._match_blobs()
        if reservation is None:
            # Cheap early refusal (no lock): spares staging bytes that would be refused.
            # The binding check is the one inside the write transaction below.
            with self.ledger.read() as tx:
                self.quota.check_room(tx, user_id, len(data))

        stem, ext = clean_stem(image_name), EXTENSIONS[fmt]
        folder = f"users/{user_dir}"
        folder_path = self.blobs.local_path(folder)  # a file name must fit Windows' path limit there
        staged = self.blobs.stage(data)
        placed: str | None = None  # a key the blob may have reached
        try:
            created = time.time()
            with self.ledger.write() as tx:
                if reservation is not None:
                    self.quota.charge(tx, reservation)
                self.quota.check_room(tx, user_id, len(data))
                # The write lock is ours, so the next id is ours too: the name can carry it
                # and the row is written once, complete.
                image_id = tx.next_image_id()
                suffix = f"-{image_id}{ext}"
                for _ in range(4):
                    key = f"{folder}/{self._name(folder_path, stem, suffix)}"
                    placed = key
                    try:
                        self.blobs.commit(staged, key)
                        break
                    except BlobExists:  # a stray file from an old ledger: never overwrite it
                        placed = None
                        suffix = f"-{image_id}-{os.urandom(3).hex()}{ext}"
                else:
                    raise StorageError(f"no free name for image {image_id} in {where(self.blobs, folder)}")
                tx.insert_image(ImageRow(image_id, user_id, key, len(data), fmt, created,
                                         json.dumps(metadata, ensure_ascii=False) if metadata else None))
        except BaseException:
            # Rolled back: whatever reached its final place is taken away again.
            if placed is not None:
                try:
                    with self.ledger.read() as tx:
                        known = tx.image(image_id) is not None
                except AbbyError:
                    known = True  # cannot tell; keeping a file is safer than losing one
                if not known:
                    self.blobs.delete([placed])
            self.blobs.discard(staged)
            raise
        return StoredImage(image_id, user_id, self._path(key), len(data), fmt,
                           datetime.fromtimestamp(created, timezone.utc), metadata or {}, key)

    @staticmethod
    def _name(folder_path: Path | None, stem: str, suffix: str) -> str:
        if folder_path is None:  # no local path to keep short: only the name's own limit
            return fit_name("", stem, suffix, windows=False)
        return fit_name(str(folder_path), stem, suffix)

    def _path(self, key: str) -> Path | None:
        try:
            return self.blobs.local_path(key)
        except StorageError:
            return None  # a malformed key (a tampered ledger) names no file

    # --- reading ------------------------------------------------------------------
    def get_quota_status(self, user_id: str) -> dict:
        """The seed's status dict: global, user and daily parts (see the README)."""
        return self.quota.status(user_id)

    def _image(self, row: ImageRow) -> StoredImage:
        return StoredImage(row.id, row.user_id, self._path(row.key), row.size, row.format,
                           datetime.fromtimestamp(row.created_at, timezone.utc),
                           json.loads(row.meta) if row.meta else {}, row.key)

    @_boundary
    def list_images(self, user_id: str | None = None, limit: int | None = None) -> list[StoredImage]:
        """A user's images (or everyone's), newest first."""
        user_id = validate_user_id(user_id) if user_id is not None else None
        with self.ledger.read() as tx:
            rows = tx.images(user_id, limit)
        return [self._image(r) for r in rows]

    @_boundary
    def get_image(self, ref: int | str | os.PathLike) -> StoredImage:
        """Find an image by ledger id, by path (absolute, or relative to the root) or by key."""
        if isinstance(ref, str) and not ref.strip():
            raise InvalidInput("no image given: pass an id or a path")
        image_id = parse_image_id(ref)
        with self.ledger.read() as tx:
            row = None
            if image_id is not None:
                row = tx.image(image_id)
            else:
                for key in self._keys(ref):
                    row = tx.image_by_key(key)
                    if row is not None:
                        break
        if row is None:
            raise NotFound(f"no stored image {str(ref)!r}")
        return self._image(row)

    def _keys(self, ref: Any) -> list[str]:
        """The keys a reference may name: a file under the images folder (local store),
        and the reference itself as a key (any store)."""
        keys = []
        if isinstance(self.blobs, LocalBlobStore):
            path = Path(ref)
            candidates = [path] if path.is_absolute() else [Path.cwd() / path, self.root / path]
            for candidate in candidates:
                try:
                    keys.append(Path(os.path.abspath(candidate)).relative_to(self.blobs.images).as_posix())
                except ValueError:
                    continue
        if isinstance(ref, str) and ref not in keys:
            keys.append(ref)
        return keys

    @_boundary
    @_boundary
    def image_url(self, image: StoredImage, expires: float = 3600) -> str | None:
        """A time-limited URL to the image where the store has them (S3: presigned); None elsewhere."""
        return self.blobs.url(image.key, expires)

    def where(self, image: StoredImage) -> str:
        """How messages name a stored image: its file on the local store, else store + key."""
        if image.path is not None:
            return str(image.path)
        return f"{self.blobs.describe().rstrip('/')}/{image.key}"

    def open_image(self, image: StoredImage) -> BinaryIO:
        """The image's bytes as a binary file object, on any store (``discord.File`` accepts it).
        Close it when done (``with storage.open_image(image) as fh: ...``)."""
        return self.blobs.open(image.key)

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
        self._match_blobs()
        image = self.get_image(ref)
        with self.ledger.write() as tx:
            rows = tx.begin_delete(ids=[image.id], limit=1)
        if not rows:
            raise NotFound(f"image {image.id} was deleted by someone else meanwhile")
        outcome = self.blobs.delete([rows[0].key])[rows[0].key]
        gone = outcome in GONE
        with self.ledger.write() as tx:
            tx.end_delete(rows if gone else [], [] if gone else rows)
        if gone:
            return image
        shown = where(self.blobs, image.key)
        if outcome == IN_USE:
            raise FileInUse(f"{shown} is open in another program; image {image.id} was kept; "
                            "close it and try again")
        if outcome == UNSAFE:
            raise StorageError(f"{shown} sits behind a link; abby never deletes through one; image kept")
        raise StorageError(f"cannot delete {shown}; image {image.id} was kept")

    # --- maintenance --------------------------------------------------------------------
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
        check_days("older-than", days, minimum=0)
        self._match_blobs()
        now = time.time() if now is None else now
        user_id = validate_user_id(user_id) if user_id is not None else None
        return _cleanup(self.ledger, self.blobs, cutoff=now - days * 86400, user_id=user_id,
                        user_dir=encode_user_id(user_id) if user_id is not None else None,
                        dry_run=dry_run, now=now, lock_timeout=lock_timeout)

    @_boundary
    def check(self, fix: bool = False, *, now: float | None = None,
              lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> CheckReport:
        """Reconcile the ledger with the blobs; with ``fix``, repair what can be repaired."""
        from . import reconcile

        now = time.time() if now is None else now
        self._match_blobs()
        with self.ledger.maintenance_lock(lock_timeout, writes=fix):
            self.ledger.open()
            return reconcile.check(self.ledger, self.blobs, self.limits, fix=fix, now=now)

    def _match_blobs(self) -> None:
        """Every host sharing a ledger must keep its images in the same store: a host that
        forgot ``storage.blobs_url`` (or names another bucket) would write rows the others
        see as missing files, and their ``check --fix`` would drop them. The first writer
        records its image store with the ledger; a different one is refused (once per
        manager: one read, and one write the very first time)."""
        if self._blobs_matched:
            return
        mine = "local" if isinstance(self.blobs, LocalBlobStore) else self.blobs.describe()
        with self.ledger.read() as tx:
            recorded = tx.setting("blobs")
        if recorded is None and not self.ledger.read_only:
            try:
                with self.ledger.write() as tx:
                    recorded = tx.setting("blobs")
                    if recorded is None:
                        tx.set_setting("blobs", mine)
                        recorded = mine
            except ReadOnlyStore:
                pass  # a reader records nothing; the store's owner will
        if recorded is not None and recorded != mine:
            def name(store: str) -> str:
                return "the local images/ folder" if store == "local" else store

            raise ConfigError(f"this store's ledger ({self.ledger.describe()}) belongs to images in "
                              f"{name(recorded)}, but this host keeps them in {name(mine)}: every host "
                              "sharing a ledger must use the same storage.blobs_url")
        self._blobs_matched = True

    def _rebuild_lost_ledger(self) -> None:
        from . import reconcile

        reconcile.rebuild_lost_ledger(self.ledger, self.blobs, self.quota, LOCK_TIMEOUT_SECONDS)


def _ledger_for(s) -> Ledger | None:
    """The PostgreSQL ledger when ``storage.ledger_url`` names one; None: the SQLite file.
    psycopg is imported only here, only then."""
    url = getattr(s, "ledger_url", None)
    if not url:
        return None
    from .postgres import PostgresLedger

    return PostgresLedger(url)


def _blobs_for(s, env) -> BlobStore | None:
    """The S3 store when ``storage.blobs_url`` names one; None: the folder under the root."""
    url = getattr(s, "blobs_url", None)
    if not url:
        return None
    from .s3 import S3_SETTINGS, S3BlobStore, resolve_s3_options

    values = {name: getattr(s, name.split(".", 1)[1], None) for name in S3_SETTINGS}
    return S3BlobStore.from_url(url, resolve_s3_options(values, env))
