"""What cleanup and check report: plain dataclasses the CLI and the bot render."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .quota import mib


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
    # totals foreign network_share interrupted_delete
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
