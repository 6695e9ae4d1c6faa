"""Filesystem helpers that never follow a symlink and never leave the root.

Cleanup and check delete files named by the ledger. On POSIX every folder on
the way is opened with O_NOFOLLOW relative to its parent, and the file is
unlinked relative to that folder's descriptor, so a symlink planted anywhere
in the store (even while abby runs) cannot redirect a delete outside the root.
Windows has no dir_fd; there each folder is checked for a reparse point
(symlink or junction) before use.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

_POSIX = os.name == "posix" and os.unlink in os.supports_dir_fd

# What happened to one file. Only DELETED and MISSING mean the file is gone;
# for the others its ledger row must be kept.
DELETED, MISSING, UNSAFE, IN_USE, FAILED = "deleted", "missing", "unsafe", "in_use", "failed"


def is_link(path: str | os.PathLike) -> bool:
    """A symlink, or on Windows any reparse point such as a junction."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISLNK(st.st_mode):
        return True
    return bool(getattr(st, "st_file_attributes", 0) & getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0))


def _outcome(exc: OSError) -> str:
    """Sort a failed unlink: gone already, held open by someone (Windows sharing
    violation, EBUSY), or anything else (permissions, EMFILE, I/O)."""
    if isinstance(exc, FileNotFoundError):
        return MISSING
    if getattr(exc, "winerror", None) in (5, 32, 33) or exc.errno == errno.EBUSY:
        return IN_USE
    return FAILED


class SafeRemover:
    """Deletes files and empty folders given as paths relative to the root.

    Only the few folders every path shares (the root, ``images``, ``images/users``,
    ``temp``) stay open; a user's folder is opened for the files being removed
    from it and closed again, so a cleanup over any number of users needs a
    handful of descriptors. Safe to share between threads.
    """

    _SHARED = frozenset(["", "images", "images/users", "temp"])

    def __init__(self, root: Path):
        self.root = root
        self._fds: dict[str, int | None] = {}  # shared folder -> fd, or None if unsafe/missing
        self._lock = threading.RLock()

    def _open_child(self, parent_fd: int, name: str) -> int:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)

    def _shared_fd(self, rel_dir: str) -> int | None:
        with self._lock:  # re-entrant: a folder's parent is opened first
            if rel_dir not in self._fds:
                parent, _, name = rel_dir.rpartition("/")
                if not name:
                    self._fds[rel_dir] = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
                else:
                    parent_fd = self._shared_fd(parent)
                    try:
                        self._fds[rel_dir] = None if parent_fd is None else self._open_child(parent_fd, name)
                    except FileNotFoundError:
                        self._fds[rel_dir] = None
                    except OSError as exc:
                        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                            raise  # EMFILE and the like say nothing about the folder: not remembered
                        self._fds[rel_dir] = None
            return self._fds[rel_dir]

    def _folder(self, rel_dir: str) -> tuple[int | None, bool, str]:
        """(fd, owned, problem) for a folder: the fd is the caller's to close when owned;
        problem is MISSING/UNSAFE when there is no fd."""
        if rel_dir in self._SHARED:
            fd = self._shared_fd(rel_dir)
            return fd, False, "" if fd is not None else (UNSAFE if os.path.lexists(self.root / rel_dir) else MISSING)
        parent, _, name = rel_dir.rpartition("/")
        parent_fd, owned, problem = self._folder(parent)
        if parent_fd is None:
            return None, False, problem
        try:
            return self._open_child(parent_fd, name), True, ""
        except FileNotFoundError:
            return None, False, MISSING
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                return None, False, UNSAFE  # a symlink, or not a folder: never followed
            raise
        finally:
            if owned:
                os.close(parent_fd)

    def unlink_all(self, rel_dir: str, names: list[str]) -> list[str]:
        """Remove files of one folder; one outcome per name (see the constants above)."""
        # Only a tampered ledger names a file like '..' or 'a/b': never act on one.
        bad = {i for i, n in enumerate(names) if n in ("", ".", "..") or "/" in n or "\\" in n}
        done = iter(self._unlink_names(rel_dir, [n for i, n in enumerate(names) if i not in bad]))
        return [UNSAFE if i in bad else next(done) for i in range(len(names))]

    def _unlink_names(self, rel_dir: str, names: list[str]) -> list[str]:
        if not names:
            return []
        if not _POSIX:
            return self._unlink_all_windows(rel_dir, names)
        try:
            fd, owned, problem = self._folder(rel_dir)
        except OSError:
            return [FAILED] * len(names)  # e.g. out of descriptors: the rows are kept, retried next run
        if fd is None:
            return [problem] * len(names)
        out = []
        try:
            for name in names:
                try:
                    os.unlink(name, dir_fd=fd)
                    out.append(DELETED)
                except OSError as exc:
                    out.append(_outcome(exc))
        finally:
            if owned:
                os.close(fd)
        return out

    def _unlink_all_windows(self, rel_dir: str, names: list[str]) -> list[str]:
        # No dir_fd: refuse to go through any reparse point on the way instead.
        if self._link_on_the_way(rel_dir):
            return [UNSAFE] * len(names)
        folder = self.root.joinpath(*rel_dir.split("/"))
        out = []
        for name in names:
            try:
                if is_link(folder / name):
                    out.append(UNSAFE)
                    continue
                os.unlink(folder / name)
                out.append(DELETED)
            except OSError as exc:
                out.append(_outcome(exc))
        return out

    def _link_on_the_way(self, rel_dir: str) -> bool:
        """Windows: whether any folder from the root down to ``rel_dir`` is a reparse point."""
        parts = rel_dir.split("/") if rel_dir else []
        return any(is_link(self.root.joinpath(*parts[:i])) for i in range(1, len(parts) + 1))

    def unlink(self, rel_path: str) -> str:
        """Remove one file; returns its outcome."""
        rel_dir, _, name = rel_path.rpartition("/")
        if name in ("", ".", ".."):
            return UNSAFE
        return self.unlink_all(rel_dir, [name])[0]

    def rmdir(self, rel_dir: str) -> bool:
        """Remove a folder if it is empty (and not a link). True if removed."""
        parent, _, name = rel_dir.rpartition("/")
        try:
            if _POSIX:
                fd, owned, _ = self._folder(parent)
                if fd is None:
                    return False
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        return False
                    os.rmdir(name, dir_fd=fd)
                finally:
                    if owned:
                        os.close(fd)
            else:
                if self._link_on_the_way(rel_dir):
                    return False
                os.rmdir(self.root.joinpath(*rel_dir.split("/")))
        except OSError:
            return False  # not empty, or a save created a file meanwhile
        return True

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                if fd is not None:
                    os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "SafeRemover":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Filesystems where SQLite's WAL locking does not work across machines.
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "davfs",
               "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse"}


def network_filesystem(path: Path) -> str | None:
    """The type of network filesystem holding ``path``, or None if local or unknown."""
    real = os.path.realpath(path)
    if os.name == "nt":
        if real.startswith("\\\\"):
            return "UNC share"
        import ctypes

        drive = os.path.splitdrive(real)[0] + "\\"
        return "network drive" if ctypes.windll.kernel32.GetDriveTypeW(drive) == 4 else None  # DRIVE_REMOTE
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            mounts = [line.split()[1:3] for line in fh]
    except OSError:
        return None  # not Linux: no cheap way to tell
    best, fstype = "", None
    for mount_point, kind in mounts:
        mount_point = mount_point.replace("\\040", " ")
        if (real == mount_point or real.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
            best, fstype = mount_point, kind
    return fstype if fstype in _NETWORK_FS else None
