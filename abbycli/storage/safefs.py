"""Filesystem helpers that never follow a symlink and never leave the root.

Cleanup and check delete files named by the ledger. On POSIX every folder on
the way is opened with O_NOFOLLOW relative to its parent, and the file is
unlinked relative to that folder's descriptor, so a symlink planted anywhere
in the store (even while abby runs) cannot redirect a delete outside the root.
Windows has no dir_fd; there each folder is checked for a reparse point
(symlink or junction) before use.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_POSIX = os.name == "posix" and os.unlink in os.supports_dir_fd


def is_link(path: str | os.PathLike) -> bool:
    """A symlink, or on Windows any reparse point such as a junction."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISLNK(st.st_mode):
        return True
    return bool(getattr(st, "st_file_attributes", 0) & getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0))


class SafeRemover:
    """Deletes files and empty folders given as paths relative to the root."""

    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[str, int | None] = {}  # relative folder -> fd (POSIX) or None if unsafe
        self._checked: dict[str, bool] = {}  # Windows: relative folder -> safe

    def _dir_fd(self, rel_dir: str) -> int | None:
        if rel_dir in self._dirs:
            return self._dirs[rel_dir]
        parent, _, name = rel_dir.rpartition("/")
        if name == "":
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        else:
            parent_fd = self._dir_fd(parent)
            fd = None
            if parent_fd is not None:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
                except OSError:
                    fd = None  # a symlink (ELOOP), not a folder, or gone
        self._dirs[rel_dir] = fd
        return fd

    def _dir_safe(self, rel_dir: str) -> bool:
        if rel_dir not in self._checked:
            parent, _, name = rel_dir.rpartition("/")
            safe = True if not name else self._dir_safe(parent) and not is_link(self.root / rel_dir)
            self._checked[rel_dir] = safe
        return self._checked[rel_dir]

    def unlink(self, rel_path: str) -> str:
        """Remove one file. Returns 'deleted', 'missing' or 'unsafe' (a link on the way)."""
        rel_dir, _, name = rel_path.rpartition("/")
        if name in ("", ".", ".."):
            return "unsafe"
        try:
            if _POSIX:
                fd = self._dir_fd(rel_dir)
                if fd is None:
                    return "unsafe" if os.path.lexists(self.root / rel_dir) else "missing"
                os.unlink(name, dir_fd=fd)
            else:
                if not self._dir_safe(rel_dir):
                    return "unsafe"
                os.unlink(self.root / rel_path)
        except FileNotFoundError:
            return "missing"
        return "deleted"

    def prepare(self, rel_paths: list[str]) -> None:
        """Open (or check) every folder on the way before threads share this remover,
        so that its cache is only ever read concurrently."""
        for rel_dir in {p.rpartition("/")[0] for p in rel_paths}:
            if _POSIX:
                self._dir_fd(rel_dir)
            else:
                self._dir_safe(rel_dir)

    def rmdir(self, rel_dir: str) -> bool:
        """Remove a folder if it is empty (and not a link). True if removed."""
        parent, _, name = rel_dir.rpartition("/")
        try:
            if _POSIX:
                fd = self._dir_fd(parent)
                if fd is None:
                    return False
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    return False
                old = self._dirs.pop(rel_dir, None)
                if old is not None:
                    os.close(old)
                os.rmdir(name, dir_fd=fd)
            else:
                if not self._dir_safe(parent) or is_link(self.root / rel_dir):
                    return False
                os.rmdir(self.root / rel_dir)
        except OSError:
            return False  # not empty, or a save created a file meanwhile
        return True

    def close(self) -> None:
        for fd in self._dirs.values():
            if fd is not None:
                os.close(fd)
        self._dirs.clear()

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
