"""The rotating log file for unattended commands and generation failures.

Each line: time, level, the command, the message. The API key is removed from
every line by a filter, as a second guard: abby never puts it in a message.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import output

LOGGER = "abby"


class _Redact(logging.Filter):
    def __init__(self, secret: str | None):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secret:
            message = record.getMessage()
            if self.secret in message:
                record.msg, record.args = message.replace(self.secret, "********"), ()
        return True


def setup(path: Path, command: str, secret: str | None) -> None:
    """Send the "abby" logger to ``path``; if it cannot be written, say so once and go on
    (a cleanup must not fail because its log is unwritable)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        output.warn(f"cannot write the log file {path}: {exc.strerror or exc}; continuing without it")
        return
    from logging.handlers import RotatingFileHandler

    handler = RotatingFileHandler(path, maxBytes=1024 * 1024, backupCount=5, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s abby {command}: %(message)s"))
    handler.addFilter(_Redact(secret))
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)


def log() -> logging.Logger:
    return logging.getLogger(LOGGER)
