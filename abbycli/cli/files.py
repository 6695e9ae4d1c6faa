"""Reading the image files people name on the command line, safely.

`abby save /dev/zero` or `abby upscale /dev/zero` must not read forever, and a
huge file must be refused from its size, before any memory is spent on it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

from ..errors import AbbyError, InvalidInput


def read_bounded(path: Path, cap: int, too_big: Callable[[int], AbbyError]) -> bytes:
    """The file's bytes, refusing before reading anything that cannot be an image or
    is larger than ``cap`` (``too_big(size)`` is raised). A device, pipe or folder
    is refused; at most cap + 1 bytes are read, so a file that grows meanwhile
    cannot fill memory either."""
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer (no effect on files).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InvalidInput(f"cannot read it: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)  # of the file opened, so the file checked is the file read
        if stat.S_ISDIR(info.st_mode):
            raise InvalidInput("it is a folder, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput("not a regular file (a device, pipe or socket); abby reads image files only")
        if info.st_size > cap:
            raise too_big(info.st_size)
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read(cap + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read it: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > cap:
        raise too_big(len(data))
    return data
