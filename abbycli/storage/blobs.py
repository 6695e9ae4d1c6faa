"""Where image bytes live: the BlobStore interface and LocalBlobStore, the folder under the root.

Keys are '/'-separated relative strings such as ``users/alice/cat-12.png`` (no
leading '/', no '..', no backslash); a store maps them under its own root or
prefix. The store facade decides keys inside the ledger transaction (a name
carries its image id), so the write order is:

1. ``stage(data)`` before the transaction (local: temp file, fsynced);
2. ``commit(staged, key)`` inside it, before the row commits; create-only, so a
   blob the ledger does not know about is never overwritten;
3. the row commits. If it does not, the facade deletes the committed blob.

A crash can leave a blob without a row (``check --fix`` adopts it), never a row
without its blob.
"""

from __future__ import annotations

import errno
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from ..errors import NotFound, ReadOnlyStore, StorageError
from .safefs import DELETED, FAILED, IN_USE, MISSING, UNSAFE, SafeRemover, is_link

__all__ = ["BlobInfo", "BlobExists", "BlobStore", "Staged", "LocalBlobStore", "check_key",
           "DELETED", "MISSING", "UNSAFE", "IN_USE", "FAILED"]


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: float          # epoch seconds (object Last-Modified / file mtime)


@dataclass
class Staged:
    """Bytes made ready by ``stage`` and not yet committed. A store keeps what it needs:
    the local store a temp file, an object store the bytes themselves."""

    size: int
    path: Path | None = None
    data: bytes | None = None


class BlobExists(StorageError):
    """commit() found the key already taken (create-only)."""


def check_key(key: object) -> str:
    """``key`` if it is a well-formed blob key, else StorageError: a key comes from abby
    or from the ledger, so a bad one means a bug or a tampered ledger."""
    if (not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\0" in key
            or any(part in ("", ".", "..") for part in key.split("/"))):
        raise StorageError(f"{key!r} is not a valid blob key")
    return key


class BlobStore(ABC):
    name: str                                  # "local" or "s3"; shown by `abby status`

    @abstractmethod
    def describe(self) -> str:
        """One line for messages, no secrets: "/srv/abby/images", "s3://bucket/prefix"."""

    @abstractmethod
    def stage(self, data: bytes) -> Staged:
        """BEFORE the ledger transaction: make the bytes ready to commit."""

    @abstractmethod
    def commit(self, staged: Staged, key: str) -> None:
        """INSIDE the ledger transaction, before the row commits: put the staged bytes under
        ``key``, durably. Create-only: raises BlobExists if the key is taken, never overwrites."""

    @abstractmethod
    def discard(self, staged: Staged) -> None:
        """Staged bytes that were not committed; idempotent."""

    @abstractmethod
    def delete(self, keys: Sequence[str]) -> dict[str, str]:
        """Delete blobs; the outcome per key (DELETED, MISSING, UNSAFE, IN_USE, FAILED).
        Only DELETED and MISSING mean the blob is gone."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every blob whose key starts with ``prefix``, streamed (never all in memory)."""

    @abstractmethod
    def stat(self, key: str) -> BlobInfo | None: ...

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable binary file object (discord.File accepts it); NotFound if absent."""

    def read(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    @abstractmethod
    def local_path(self, key: str) -> Path | None:
        """The file holding the blob where the store has one (local), else None."""

    @abstractmethod
    def url(self, key: str, expires: float) -> str | None:
        """A time-limited URL to fetch the blob where the store offers one (s3), else None."""

    def close(self) -> None:
        """Release connections; a later call opens them again."""


# fdatasync skips the timestamps but still flushes the data and the size, which is
# all a new file needs (SQLite makes the same choice); not every platform has it.
_datasync = getattr(os, "fdatasync", os.fsync)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_AT_FDS = os.stat in os.supports_dir_fd and hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY")


class LocalBlobStore(BlobStore):
    """Blobs as files under ``<root>/images``, written through ``<root>/temp``.

    Never follows a symlink (or a Windows junction) and never leaves the root:
    writes refuse a linked folder, reads open without following, deletes go
    through SafeRemover. The methods below the interface are local-only (temp
    files, folders, links): cleanup and check use them where the store has them.
    """

    name = "local"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(root))
        self.images = self.root / "images"
        self.temp = self.root / "temp"
        self._prefix = os.path.join(str(self.images), "")  # images folder and one separator
        self._ready = False

    def describe(self) -> str:
        return str(self.images)

    def prepare(self) -> None:
        """Create the folders on first use and refuse a layout that leads out of the root."""
        if self._ready:
            return
        from .names import path_under

        try:
            for sub in ("images/users", "temp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            path_under(self.root, "images", "users")  # not a link out of the root
            path_under(self.root, "temp")
        except OSError as exc:
            raise StorageError(f"cannot create the storage root {self.root}: {exc.strerror or exc}") from exc
        self._ready = True

    def _path(self, key: str) -> Path:
        return self.images.joinpath(*check_key(key).split("/"))

    def path_text(self, key: str) -> str:
        """The file of ``key`` as this OS writes it, without checks: the text StoredImage.path
        shows, so reports and listings compare. (Plain string work: pathlib would cost a
        cleanup of 50,000 files most of a second.)"""
        return self._prefix + (key if os.sep == "/" else key.replace("/", os.sep))

    # --- writing ----------------------------------------------------------------------
    def stage(self, data: bytes) -> Staged:
        self.prepare()
        temp = self.temp / f"{os.getpid()}-{os.urandom(8).hex()}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o644)
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
        return Staged(len(data), path=temp)

    def commit(self, staged: Staged, key: str) -> None:
        final = self._path(key)
        folder = final.parent
        self._refuse_linked_folder(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                self._move_new(staged.path, final)
            except FileNotFoundError:
                # A concurrent cleanup removed the (then empty) user folder; recreate it once.
                folder.mkdir(parents=True, exist_ok=True)
                self._move_new(staged.path, final)
        except FileExistsError:
            raise BlobExists(f"{final} already exists; abby never overwrites a file") from None
        except OSError as exc:
            raise StorageError(f"cannot move the image into {folder}: {exc.strerror or exc}") from exc
        # The new name must be on disk before the row that points at it can be.
        _fsync_dir(folder)

    @staticmethod
    def _move_new(temp: Path, final: Path) -> None:
        """Move ``temp`` to ``final`` unless ``final`` exists (FileExistsError then).

        Windows' rename never replaces. POSIX rename does, so a hard link (which
        fails on an existing name, atomically) takes the new name and the temp name
        goes; where the filesystem has no hard links, a look before the rename does,
        which the ledger's write lock makes safe against other abby processes.
        """
        if os.name == "nt":
            os.rename(temp, final)
            return
        try:
            os.link(temp, final)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
            if os.path.lexists(final):
                raise FileExistsError(errno.EEXIST, "exists", str(final)) from None
            os.rename(temp, final)
            return
        os.unlink(temp)

    def _refuse_linked_folder(self, folder: Path) -> None:
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            return  # commit creates it
        except OSError as exc:
            raise StorageError(f"cannot use {folder}: {exc.strerror or exc}") from exc
        if is_link(folder) or not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"{folder} is not a plain folder (a link?); abby will not write through it")

    def discard(self, staged: Staged) -> None:
        if staged.path is not None:
            try:
                staged.path.unlink(missing_ok=True)
            except OSError:
                pass  # a leftover temp file is reclaimed by cleanup; never worth an error here

    # --- deleting -------------------------------------------------------------------
    def delete(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        groups: dict[str, list[str]] = {}
        for key in keys:
            try:
                check_key(key)
            except StorageError:
                out[key] = UNSAFE  # only a tampered ledger names such a key: never acted on
                continue
            folder, _, name = key.rpartition("/")
            groups.setdefault(folder, []).append(name)
        with SafeRemover(self.root) as remover:
            for folder, names in groups.items():
                rel_dir = f"images/{folder}" if folder else "images"
                for name, outcome in zip(names, remover.unlink_all(rel_dir, names)):
                    out[f"{folder}/{name}" if folder else name] = outcome
        return out

    # --- reading --------------------------------------------------------------------
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        # Folder by folder, depth first, into the folders that can hold keys with this prefix.
        stack = [prefix.rpartition("/")[0]]
        while stack:
            current = stack.pop()
            scanned = self.scan_folder(current)
            if scanned is None:
                continue
            infos, _odd, subfolders = scanned
            yield from (info for info in infos if info.key.startswith(prefix))
            for sub in sorted(subfolders, reverse=True):
                child = f"{current}/{sub}/" if current else f"{sub}/"
                if child.startswith(prefix) or prefix.startswith(child):
                    stack.append(child[:-1])

    def scan_folder(self, folder: str) -> tuple[list[BlobInfo], list[tuple[str, str]], list[str]] | None:
        """(files, entries that are neither files nor folders, subfolder names) of one folder
        ('' is the images folder itself), each stat'ed relative to it without following a
        link; None if the folder is missing, a link, or cannot be read. Local-only."""
        path = self.images.joinpath(*folder.split("/")) if folder else self.images
        base = f"{folder}/" if folder else ""
        fd = None
        try:
            if _AT_FDS:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            elif is_link(path):
                return None
            entries = os.listdir(fd if fd is not None else path)
        except OSError:
            if fd is not None:
                os.close(fd)
            return None
        infos: list[BlobInfo] = []
        odd: list[tuple[str, str]] = []
        subfolders: list[str] = []
        try:
            for entry in entries:
                try:
                    st = (os.stat(entry, dir_fd=fd, follow_symlinks=False) if fd is not None
                          else os.lstat(os.path.join(path, entry)))
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) and not getattr(st, "st_file_attributes", 0) & 0x400:
                    infos.append(BlobInfo(base + entry, st.st_size, st.st_mtime))
                elif stat.S_ISDIR(st.st_mode) and not getattr(st, "st_file_attributes", 0) & 0x400:
                    subfolders.append(entry)
                else:
                    odd.append((os.path.join(path, entry), "not a plain file; abby never follows links; "
                                                            "remove it by hand"))
        finally:
            if fd is not None:
                os.close(fd)
        return infos, odd, subfolders

    def stat(self, key: str) -> BlobInfo | None:
        path = self._path(key)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or is_link(path):
            return None
        return BlobInfo(key, st.st_size, st.st_mtime)

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _BINARY)
        except FileNotFoundError:
            raise NotFound(f"no file {path} in the store {self.images}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP or is_link(path):
                raise StorageError(f"{path} is a link; abby never follows one") from None
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if os.name == "nt" and is_link(path):  # no O_NOFOLLOW there: refuse a reparse point after the fact
            os.close(fd)
            raise StorageError(f"{path} is a link; abby never follows one")
        return os.fdopen(fd, "rb")

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def url(self, key: str, expires: float) -> str | None:
        return None

    # --- local-only: layout, temp files, folders --------------------------------------
    def has_files(self) -> bool:
        """Whether any user folder holds a file (stops at the first one)."""
        for user in _scandir(self.images / "users"):
            if user.is_dir(follow_symlinks=False):
                for entry in _scandir(user.path):
                    if entry.is_file(follow_symlinks=False):
                        return True
        return False

    def user_folders(self) -> tuple[list[str], list[tuple[str, str]]]:
        """(names of the folders abby made for users, entries abby never makes under images/)."""
        from .names import decode_user_dir

        foreign: list[tuple[str, str]] = []
        for entry in _scandir(self.images):
            if entry.name != "users" or not entry.is_dir(follow_symlinks=False) or is_link(entry.path):
                foreign.append((entry.path, "not part of abby's layout; move it out of the store"))
        users = []
        for user in _scandir(self.images / "users"):
            if is_link(user.path):
                foreign.append((user.path, "a link inside the store; abby never follows it; remove it by hand"))
            elif not user.is_dir(follow_symlinks=False) or decode_user_dir(user.name) is None:
                foreign.append((user.path, "not a folder abby made for a user; move it out of the store"))
            else:
                users.append(user.name)
        return users, foreign

    def stale_temp_files(self, now: float) -> list[str]:
        """Temp files whose writer is gone (see liveness.abandoned), as 'temp/<name>'."""
        from .liveness import abandoned

        out = []
        for entry in _scandir(self.temp):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_dir(follow_symlinks=False):
                continue
            pid_text = entry.name.split("-", 1)[0]
            if abandoned(int(pid_text) if pid_text.isdigit() else None, None, st.st_mtime, now):
                out.append(f"temp/{entry.name}")
        return sorted(out)

    def root_text(self, rel: str) -> str:
        """A path relative to the store root ('temp/x', 'images/users/a') as this OS writes it."""
        return os.path.join(str(self.root), "") + (rel if os.sep == "/" else rel.replace("/", os.sep))

    def folders_left_empty(self, doomed: set[str], user_dir: str | None,
                           only_empty: bool = False) -> list[str]:
        """User folders ('users/<dir>') that hold nothing once the ``doomed`` keys are gone
        (or, with ``only_empty``, that are empty already: a cheap look at one entry)."""
        base = self.images / "users"
        names = [user_dir] if user_dir is not None else [
            e.name for e in _scandir(base) if e.is_dir(follow_symlinks=False)]
        out = []
        for name in sorted(names):
            folder = f"users/{name}"
            path = base / name
            try:
                if is_link(path):
                    continue
                if only_empty:
                    with os.scandir(path) as it:
                        empty = next(it, None) is None
                else:
                    empty = all(f"{folder}/{e}" in doomed for e in os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            if empty:
                out.append(folder)
        return out


def _scandir(path: str | os.PathLike) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            yield from it
    except (FileNotFoundError, NotADirectoryError):
        return


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
