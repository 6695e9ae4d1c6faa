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

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from ..errors import AbbyError, Busy, InvalidInput, NotFound, StorageError, UserQuotaExceeded
from .formats import EXTENSIONS, sniff_format
from .ledger import Ledger
from .names import clean_stem, decode_user_dir, encode_user_id, path_under, validate_user_id
from .quota import Limits, QuotaManager, Reservation, human_size, mib
from .safefs import SafeRemover, is_link, network_filesystem

USERS_DIR = "images/users"
STALE_AFTER_SECONDS = 3600  # a temp file or reservation this old is abandoned, whatever its pid
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
    skipped: list[str] = field(default_factory=list)  # rows whose file sat behind a symlink

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run, "cutoff": self.cutoff.isoformat(),
            "deleted_files": len(self.deleted), "freed_bytes": self.freed_bytes, "freed_mb": mib(self.freed_bytes),
            "files": self.deleted, "temp_files": self.temp_files, "empty_dirs": self.empty_dirs,
            "released_reservations": self.released_reservations, "skipped": self.skipped,
        }


@dataclass
class Problem:
    kind: str  # missing_file orphan_file size_mismatch stale_reservation temp_leftover totals foreign network_share
    path: str
    detail: str
    fixed: bool = False


@dataclass
class CheckReport:
    fix: bool
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if not p.fixed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "consistent": not self.remaining, "fix": self.fix, "files_checked": self.files_checked,
            "problems": [p.__dict__ for p in self.problems], "remaining": len(self.remaining),
        }


def _pid_alive(pid: int) -> bool | None:
    """True/False on POSIX; None where it cannot be asked safely (on Windows
    os.kill would terminate the process)."""
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(pid: int | None, host: str | None, created: float, now: float) -> bool:
    if now - created > STALE_AFTER_SECONDS:
        return True
    import socket

    if pid is None or (host is not None and host != socket.gethostname()):
        return False
    return _pid_alive(pid) is False


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
        if isinstance(cleanup_days, bool) or not isinstance(cleanup_days, (int, float)) or cleanup_days <= 0:
            raise InvalidInput(f"cleanup_days must be a number greater than 0, got {cleanup_days!r}")
        self.root = Path(os.path.abspath(storage_root))
        self.cleanup_days = cleanup_days
        self.limits = Limits.from_mb(
            max_global_storage_mb, max_user_storage_mb, max_user_daily_gens,
            image_generation_size_mb, daily_reset_timezone,
        )
        self.ledger = Ledger(self.root / ".abby")
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
        self.ledger.close()

    def _prepare(self) -> None:
        if not self._ready:
            try:
                for sub in ("images/users", "temp", ".abby"):
                    (self.root / sub).mkdir(parents=True, exist_ok=True)
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
        fmt = sniff_format(data)
        if fmt is None:
            raise InvalidInput("the data is not a PNG, JPEG or WebP image")
        if len(data) > self.limits.user_bytes:
            raise UserQuotaExceeded(
                f"the image is {mib(len(data))} MB, more than the whole per-user limit of "
                f"{mib(self.limits.user_bytes)} MB"
            )
        if reservation is not None and reservation.user_id != user_id:
            raise InvalidInput("the reservation belongs to another user")
        self._prepare()
        if reservation is None:
            # Cheap early refusal (no lock): spares writing a temp file that would be refused.
            # The binding check is the one inside the write transaction below.
            with self.ledger.read() as conn:
                self.quota.check_room(conn, user_id, len(data))

        stem, ext = clean_stem(image_name), EXTENSIONS[fmt]
        user_path = path_under(self.root, *USERS_DIR.split("/"), user_dir)
        temp = self._write_temp(data)
        final: Path | None = None
        try:
            created = time.time()
            with self.ledger.write() as conn:
                if reservation is not None:
                    self.quota.settle(conn, reservation, charge=True)
                self.quota.check_room(conn, user_id, len(data))
                cur = conn.execute(
                    "INSERT INTO images (user_id, rel_path, size, format, created_at, meta) VALUES (?, ?, ?, ?, ?, ?)",
                    (user_id, f"pending/{temp.name}", len(data), fmt, created,
                     json.dumps(metadata, ensure_ascii=False) if metadata else None),
                )
                image_id = cur.lastrowid
                name = f"{stem}-{image_id}{ext}"
                while os.path.lexists(user_path / name):  # a stray file from an old ledger: never overwrite it
                    name = f"{stem}-{image_id}-{os.urandom(3).hex()}{ext}"
                conn.execute("UPDATE images SET rel_path = ? WHERE id = ?", (f"{USERS_DIR}/{user_dir}/{name}", image_id))
                final = user_path / name
                self._place(temp, final)
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

    def _write_temp(self, data: bytes) -> Path:
        temp = self.root / "temp" / f"{os.getpid()}-{os.urandom(8).hex()}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            reason = "the disk is full" if exc.errno == 28 else (exc.strerror or str(exc))
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

    def get_image(self, ref: int | str | os.PathLike) -> StoredImage:
        """Find an image by ledger id or by path (absolute, or relative to the root)."""
        with self.ledger.read() as conn:
            row = None
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                row = conn.execute(f"SELECT {self._COLUMNS} FROM images WHERE id = ?", (int(ref),)).fetchone()
            if row is None and not isinstance(ref, int):
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
    def delete_image(self, ref: int | str | os.PathLike) -> StoredImage:
        """Remove one image: the row first (the quota frees at once), then the file."""
        image = self.get_image(ref)
        with self.ledger.write() as conn:
            gone = conn.execute("DELETE FROM images WHERE id = ?", (image.id,)).rowcount == 0
        if gone:
            raise NotFound(f"image {image.id} was deleted by someone else meanwhile")
        with SafeRemover(self.root) as remover:
            remover.unlink(image.path.relative_to(self.root).as_posix())
        return image

    # --- cleanup --------------------------------------------------------------------
    def _maintenance_lock(self, timeout: float):
        from filelock import FileLock, Timeout

        self._prepare()
        lock = FileLock(self.root / ".abby" / "maintenance.lock", timeout=timeout)

        class _Guard:
            def __enter__(_):
                try:
                    lock.acquire()
                except Timeout:
                    raise Busy(
                        f"another abby cleanup or check is running on {self.root}; "
                        f"waited {timeout:g} s, giving up"
                    ) from None

            def __exit__(_, *exc):
                lock.release()

        return _Guard()

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
            if _abandoned(pid, None, st.st_mtime, now):
                out.append(f"temp/{entry.name}")
        return sorted(out)

    def _release_stale_reservations(self, conn, now: float) -> list[tuple]:
        rows = conn.execute("SELECT id, user_id, bytes, pid, host, created_at FROM reservations").fetchall()
        stale = [r for r in rows if _abandoned(r[3], r[4], r[5], now)]
        conn.executemany("DELETE FROM reservations WHERE id = ?", [(r[0],) for r in stale])
        return stale

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
        if isinstance(days, bool) or not isinstance(days, (int, float)) or days < 0:
            raise InvalidInput(f"older-than must be 0 or more days, got {days!r}")
        now = time.time() if now is None else now
        cutoff = now - days * 86400
        report = CleanupReport(dry_run, datetime.fromtimestamp(cutoff, timezone.utc))
        sql, args = "SELECT id, rel_path, size FROM images WHERE created_at <= ?", [cutoff]
        if user_id is not None:
            sql += " AND user_id = ?"
            args.append(validate_user_id(user_id))
        with self._maintenance_lock(lock_timeout):
            with self.ledger.read() as conn:
                rows = conn.execute(sql + " ORDER BY created_at, id", args).fetchall()
            temp_files = self._stale_temp_files(now)
            empty_dirs = self._dirs_left_empty({r[1] for r in rows}, user_id)
            if dry_run:
                report.deleted = [str(self.root / r[1]) for r in rows]
                report.freed_bytes = sum(r[2] for r in rows)
                report.temp_files = [str(self.root / t) for t in temp_files]
                report.empty_dirs = [str(self.root / d) for d in empty_dirs]
                with self.ledger.read() as conn:
                    reservations = conn.execute("SELECT pid, host, created_at FROM reservations").fetchall()
                report.released_reservations = sum(_abandoned(*r, now) for r in reservations)
                return report
            with SafeRemover(self.root) as remover:
                batch = 2000  # rows per transaction: short write locks, so saves barely wait
                for start in range(0, len(rows), batch):
                    chunk = rows[start:start + batch]
                    with self.ledger.write() as conn:
                        conn.executemany("DELETE FROM images WHERE id = ?", [(r[0],) for r in chunk])
                    for _id, rel, size in chunk:
                        if remover.unlink(rel) == "unsafe":
                            report.skipped.append(str(self.root / rel))
                        report.deleted.append(str(self.root / rel))
                        report.freed_bytes += size
                for rel in temp_files:
                    remover.unlink(rel)
                    report.temp_files.append(str(self.root / rel))
                report.empty_dirs = [str(self.root / d) for d in empty_dirs if remover.rmdir(d)]
            with self.ledger.write() as conn:
                report.released_reservations = len(self._release_stale_reservations(conn, now))
        return report

    def _dirs_left_empty(self, doomed: set[str], user_id: str | None) -> list[str]:
        """User folders that hold nothing once ``doomed`` files are gone."""
        base = self.root / USERS_DIR
        if user_id is not None:
            names = [encode_user_id(user_id)]
        else:
            try:
                names = [e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                return []
        out = []
        for name in sorted(names):
            rel_dir = f"{USERS_DIR}/{name}"
            try:
                if is_link(base / name):
                    continue
                entries = os.listdir(base / name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if all(f"{rel_dir}/{e}" in doomed for e in entries):
                out.append(rel_dir)
        return out

    # --- check ----------------------------------------------------------------------
    def check(self, fix: bool = False, *, now: float | None = None,
              lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> CheckReport:
        """Reconcile the ledger with the disk; with ``fix``, repair what can be repaired.

        The disk is scanned without holding the ledger lock (saves go on); each
        finding is then confirmed inside one write transaction, where no save
        can be half-done, before it is reported or fixed.
        """
        now = time.time() if now is None else now
        report = CheckReport(fix)
        with self._maintenance_lock(lock_timeout):
            on_disk, foreign = self._scan()
            report.files_checked = len(on_disk)
            with self.ledger.read() as conn:
                rows = {rel: (i, size) for i, rel, size in conn.execute("SELECT id, rel_path, size FROM images")}
            suspects = [rel for rel, size in on_disk.items() if rel not in rows or rows[rel][1] != size]
            suspects += [rel for rel in rows if rel not in on_disk]
            temp_files = self._stale_temp_files(now)

            with self.ledger.write() as conn:
                for rel in suspects:
                    self._confirm_and_fix(conn, rel, report, fix)
                for i, user_id, nbytes, *_ in self._release_stale_reservations(conn, now) if fix else []:
                    report.problems.append(Problem("stale_reservation", user_id,
                                                   f"reservation {i} of {nbytes} bytes abandoned", fixed=True))
                if not fix:
                    for r in conn.execute("SELECT id, user_id, bytes, pid, host, created_at FROM reservations"):
                        if _abandoned(r[3], r[4], r[5], now):
                            report.problems.append(Problem("stale_reservation", r[1],
                                                           f"reservation {r[0]} of {r[2]} bytes abandoned"))
                self._check_totals(conn, report, fix)
            for rel in temp_files:
                report.problems.append(Problem("temp_leftover", str(self.root / rel), "abandoned partial write"))
            if fix and temp_files:
                with SafeRemover(self.root) as remover:
                    for problem, rel in zip(report.problems[-len(temp_files):], temp_files):
                        problem.fixed = remover.unlink(rel) in ("deleted", "missing")
            for path, why in foreign:
                report.problems.append(Problem("foreign", path, why))
            remote = network_filesystem(self.root)
            if remote:
                report.problems.append(Problem(
                    "network_share", str(self.root),
                    f"the root is on a network filesystem ({remote}); SQLite's locking cannot keep "
                    "processes on different machines within the limits: use a local disk"))
        return report

    def _scan(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """Regular files under images/users/<dir>/ with their sizes, and anything abby never makes."""
        files: dict[str, int] = {}
        foreign: list[tuple[str, str]] = []
        images = self.root / "images"
        for entry in _scandir(images):
            if entry.name != "users" or not entry.is_dir(follow_symlinks=False) or is_link(entry.path):
                foreign.append((entry.path, "not part of abby's layout; move it out of the store"))
        for user in _scandir(images / "users"):
            if is_link(user.path):
                foreign.append((user.path, "a link inside the store; abby never follows it; remove it by hand"))
                continue
            if not user.is_dir(follow_symlinks=False) or decode_user_dir(user.name) is None:
                foreign.append((user.path, "not a folder abby made for a user; move it out of the store"))
                continue
            for entry in _scandir(user.path):
                if entry.is_file(follow_symlinks=False) and not is_link(entry.path):
                    try:
                        files[f"{USERS_DIR}/{user.name}/{entry.name}"] = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        pass
                else:
                    foreign.append((entry.path, "not a plain file; abby never follows links; remove it by hand"))
        return files, foreign

    def _confirm_and_fix(self, conn, rel: str, report: CheckReport, fix: bool) -> None:
        row = conn.execute("SELECT id, size FROM images WHERE rel_path = ?", (rel,)).fetchone()
        path = self.root / rel
        try:
            st = os.lstat(path)
            size = st.st_size if not is_link(path) else None
        except FileNotFoundError:
            size = None
        if row is not None and size is None:
            problem = Problem("missing_file", str(path), f"image {row[0]} is in the ledger but its file is gone")
            if fix:
                conn.execute("DELETE FROM images WHERE id = ?", (row[0],))
                problem.fixed = True
        elif row is not None and size != row[1]:
            problem = Problem("size_mismatch", str(path), f"ledger says {row[1]} bytes, the file has {size}")
            if fix:
                conn.execute("UPDATE images SET size = ? WHERE id = ?", (size, row[0]))
                problem.fixed = True
        elif row is None and size is not None:
            user_dir = rel.split("/")[2]
            problem = Problem("orphan_file", str(path), f"{size} bytes the ledger does not know")
            if fix:
                with open(path, "rb") as fh:
                    fmt = sniff_format(fh.read(16))
                conn.execute(
                    "INSERT INTO images (user_id, rel_path, size, format, created_at) VALUES (?, ?, ?, ?, ?)",
                    (decode_user_dir(user_dir), rel, size, fmt, st.st_mtime),
                )
                problem.detail += "; adopted into its user's usage"
                problem.fixed = True
        else:
            return  # consistent after all: a save or delete finished between scan and lock
        report.problems.append(problem)

    def _check_totals(self, conn, report: CheckReport, fix: bool) -> None:
        truth = {u: (b, f) for u, b, f in conn.execute(
            "SELECT user_id, SUM(size), COUNT(*) FROM images GROUP BY user_id")}
        held = dict(conn.execute("SELECT user_id, SUM(bytes) FROM reservations GROUP BY user_id").fetchall())
        recorded = {u: (b, f, r) for u, b, f, r in conn.execute("SELECT user_id, bytes, files, reserved FROM usage")}
        wrong = [u for u in set(truth) | set(recorded) | set(held)
                 if (truth.get(u, (0, 0)) + (held.get(u, 0),)) != recorded.get(u, (0, 0, 0))]
        total = conn.execute("SELECT bytes, files, reserved FROM totals").fetchone()
        want = (sum(b for b, _ in truth.values()), sum(f for _, f in truth.values()), sum(held.values()))
        if not wrong and tuple(total) == want:
            return
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


def _scandir(path: str | os.PathLike) -> Iterable[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            yield from it
    except (FileNotFoundError, NotADirectoryError):
        return


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
