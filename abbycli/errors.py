"""The exception tree of abby.

Every error abby raises on purpose is an ``AbbyError``. Each class carries the
process exit code the CLI uses for it, so the mapping lives in one place::

    AbbyError                 exit 1   anything that went wrong
    ├── ConfigError           exit 2   broken or invalid configuration
    ├── InvalidInput          exit 2   bad user id, empty data, not an image
    ├── NotFound              exit 1   no such image
    ├── StorageError          exit 1   disk full, I/O failure, ledger trouble
    │   └── Busy              exit 1   another run holds the lock
    └── QuotaExceeded         exit 3   refused by a limit (no byte written)
        ├── UserQuotaExceeded
        ├── GlobalQuotaExceeded
        └── DailyLimitReached

Lower-level errors (sqlite3, OSError) are converted where they happen, with
``raise ... from exc``, so callers only ever need to catch ``AbbyError``.
"""

from __future__ import annotations


class AbbyError(Exception):
    """Base class: a one-line, user-facing message."""

    exit_code = 1


class ConfigError(AbbyError):
    exit_code = 2


class InvalidInput(AbbyError):
    exit_code = 2


class NotFound(AbbyError):
    exit_code = 1


class StorageError(AbbyError):
    exit_code = 1


class Busy(StorageError):
    """Another process holds a single-instance lock (cleanup, check --fix)."""


class QuotaExceeded(AbbyError):
    exit_code = 3


class UserQuotaExceeded(QuotaExceeded):
    pass


class GlobalQuotaExceeded(QuotaExceeded):
    pass


class DailyLimitReached(QuotaExceeded):
    pass
