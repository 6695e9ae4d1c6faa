"""The exception tree of abby.

Every error abby raises on purpose is an ``AbbyError``. Each class carries the
process exit code the CLI uses for it, so the mapping lives in one place::

    AbbyError                 exit 1   anything that went wrong
    ├── ConfigError           exit 2   broken or invalid configuration
    ├── InvalidInput          exit 2   bad user id, empty data, not an image
    ├── NotFound              exit 1   no such image
    ├── StorageError          exit 1   disk full, I/O failure, ledger trouble
    │   ├── Busy              exit 1   another run holds the lock
    │   ├── FileInUse         exit 1   another program holds the file open (Windows); row kept
    │   └── ReadOnlyStore     exit 1   the store can be read but not written by this user
    ├── QuotaExceeded         exit 3   refused by a limit (no byte written, no credit spent)
    │   ├── UserQuotaExceeded
    │   ├── GlobalQuotaExceeded
    │   └── DailyLimitReached
    └── ProviderError         exit 1   the image API failed, after retries
        ├── ProviderUnavailable        5xx, time-out, connection error (retried)
        │   └── RateLimited            429 (retried, honouring Retry-After)
        ├── MalformedResponse          a body that is not what the API documents
        ├── ContentFiltered   exit 5   the provider's moderation blurred the result
        └── ApiRejected       exit 4   the API refused the request (never retried)
            ├── AuthError              401: missing or wrong API key
            ├── InsufficientCredits    402: the account is out of credits
            ├── ModerationRejected     403: the request itself was flagged
            ├── ModelNotFound          404: unknown model or engine
            ├── PayloadTooLarge        413
            └── InvalidRequest         400/422: with the API's own `errors`

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


class FileInUse(StorageError):
    """The file could not be removed because another program has it open (a
    sharing violation on Windows). Its ledger row is kept, so nothing is lost
    from the quota; the next cleanup tries again."""


class ReadOnlyStore(StorageError):
    """A command that writes was run on a store this user may only read."""


class QuotaExceeded(AbbyError):
    exit_code = 3


class UserQuotaExceeded(QuotaExceeded):
    pass


class GlobalQuotaExceeded(QuotaExceeded):
    pass


class DailyLimitReached(QuotaExceeded):
    pass


class ProviderError(AbbyError):
    exit_code = 1

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    pass


class RateLimited(ProviderUnavailable):
    pass


class MalformedResponse(ProviderError):
    pass


class ContentFiltered(ProviderError):
    exit_code = 5


class ApiRejected(ProviderError):
    exit_code = 4


class AuthError(ApiRejected):
    pass


class InsufficientCredits(ApiRejected):
    pass


class ModerationRejected(ApiRejected):
    pass


class ModelNotFound(ApiRejected):
    pass


class PayloadTooLarge(ApiRejected):
    pass


class InvalidRequest(ApiRejected):
    pass
