"""The rotating log file for unattended commands and generation failures.

Each line: time, level, the command, the message (and, for an unexpected
error, its traceback). Every formatted line, traceback included, passes
through ``secrets.redact``: abby never puts the API key in a message, this is
the second guard.

A log is a help, never a reason to fail: if the file cannot be written (disk
full, permissions changed, ``/dev/full``) the user is told once, in one line,
and the command goes on without it.
"""

from __future__ import annotations

import logging
import os
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Callable

from ..secrets import redact
from . import output

LOGGER = "abby"


class _RedactingFormatter(logging.Formatter):
    def __init__(self, command: str, secrets: Callable[[], tuple[str, ...]]):
        super().__init__(f"%(asctime)s %(levelname)s abby {command}: %(message)s")
        self._secrets = secrets
        self._known: tuple[str, ...] | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        # Gathered at the first record, not at start-up: finding every provider's secrets
        # imports every provider, which a command that logs nothing need not pay for.
        if self._known is None:
            self._known = tuple(self._secrets())
        return self._known

    def format(self, record: logging.LogRecord) -> str:
        # One record, one line: control characters in the message (a file name with a
        # newline) are escaped so that nobody can forge a line. A traceback, which
        # only abby itself adds, keeps its lines.
        message = output.printable(record.getMessage())
        record = logging.makeLogRecord({**record.__dict__, "msg": message, "args": ()})
        return redact(super().format(record), *self.secrets)


class _Handler(RotatingFileHandler):
    """Warns once when a write fails and then stays quiet, where logging's own
    handler would print a "--- Logging error ---" traceback for every record."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        self.failed = True
        exc = sys.exc_info()[1]
        reason = getattr(exc, "strerror", None) or exc
        output.warn(f"cannot write the log file {self.baseFilename}: {reason}; continuing without it")


def setup(path: Path, command: str, secrets: Callable[[], tuple[str, ...]] = tuple) -> None:
    """Send the "abby" logger to ``path``, and only there.

    Calling it again (a second command in one process, as the test runner
    does) reuses the handler for the same file or replaces the old one, so a
    line is never written twice.
    """
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    target = os.path.abspath(path)
    for handler in list(logger.handlers):
        if isinstance(handler, _Handler):
            if handler.baseFilename == target:
                handler.setFormatter(_RedactingFormatter(command, secrets))
                handler.failed = False
                return
            logger.removeHandler(handler)
            handler.close()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _Handler(path, maxBytes=1024 * 1024, backupCount=5, encoding="utf-8")
    except OSError as exc:
        output.warn(f"cannot write the log file {path}: {exc.strerror or exc}; continuing without it")
        return
    handler.setFormatter(_RedactingFormatter(command, secrets))
    logger.addHandler(handler)


def log() -> logging.Logger:
    return logging.getLogger(LOGGER)
