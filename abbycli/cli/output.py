"""How the CLI talks: rich on a terminal, plain text when piped, JSON for scripts.

rich honours NO_COLOR and drops styling when stdout is not a terminal; here
we also drop table borders and widen the page when piped, so that
``abby list | grep`` sees whole lines. rich is imported on first use only:
``--json`` runs never load it, which keeps start-up close to Typer's own.

Styled text is passed around as ``(text, style)`` pairs so that commands
never import rich themselves.

Output must survive any encoding: on Windows a pipe or a file gets the ANSI
code page (cp1252), not UTF-8. So text that the stream cannot encode is
replaced rather than fatal, bars fall back to ASCII, and JSON is escaped to
ASCII whenever the stream is not UTF-8, so it always parses to the same data.
"""

from __future__ import annotations

import codecs
import errno
import json
import sys
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Union

from ..errors import AbbyError

Piece = Union[str, tuple[str, str]]  # plain text, or (text, rich style)

RIGHT = {"ID", "Size", "Used", "Files", "%", "Limit", "Today", "Bytes"}
STATUS_STYLE = {"OK": "green", "WARNING": "yellow", "FULL": "bold red"}


@lru_cache(maxsize=None)
def console():
    from rich.console import Console

    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=4096)


@lru_cache(maxsize=None)
def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _text(pieces: Iterable[Piece]):
    from rich.text import Text

    out = Text()
    for piece in pieces:
        if isinstance(piece, tuple):
            out.append(piece[0], style=piece[1])
        else:
            out.append(piece)
    return out


def tolerate_any_encoding() -> None:
    """Make stdout replace what its encoding cannot show instead of raising
    UnicodeEncodeError (stderr already does: Python gives it backslashreplace)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) == "strict":
        reconfigure(errors="replace")


def _encoding() -> str:
    name = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "ascii"


@lru_cache(maxsize=None)
def _can_show(encoding: str, text: str) -> bool:
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


@contextmanager
def _writing():
    """A stdout that cannot be written (a full disk, /dev/full) is one clear error;
    a closed pipe (`abby list | head`) is left to Typer, which ends quietly."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise
        raise AbbyError(f"cannot write the output: {exc.strerror or exc}") from exc


# Upper bound of --limit/--top: far above any store, and well inside SQLite's integers.
MAX_COUNT = 1_000_000_000

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]}


def printable(text: str) -> str:
    """``text`` with control characters escaped: a file name with a newline must not
    make one line look like two (on the terminal or in the log)."""
    return text.translate(_CONTROL)


def print_json(data: Any) -> None:
    # Escaped \uXXXX is plain ASCII, which every code page carries unchanged.
    text = json.dumps(data, indent=2, ensure_ascii=_encoding() != "utf-8", default=str)
    with _writing():
        sys.stdout.write(text + "\n")


def error(message: str) -> None:
    err_console().print(_text([(f"abby: error: {message}", "bold red")]))


def item_error(message: str, show: bool = True) -> None:
    """One failed item of a command that goes on with the others (save, delete): one
    line, unless ``show`` is off (--json); with ABBY_DEBUG=1 the traceback as well."""
    import os

    if os.environ.get("ABBY_DEBUG"):
        import traceback

        traceback.print_exc()
    if show:
        error(message)


def warn(message: str) -> None:
    err_console().print(_text([(f"abby: warning: {message}", "yellow")]))


def note(message: str) -> None:
    err_console().print(_text([(f"abby: note: {message}", "dim")]))


def info(*pieces: Piece) -> None:
    with _writing():
        console().print(_text(pieces))


def table(columns: Iterable[str], rows: Iterable[Iterable[Any]], title: str | None = None) -> None:
    from rich import box
    from rich.table import Table

    out = console()
    t = Table(box=box.SIMPLE_HEAD if out.is_terminal else None, title=title, header_style="bold", pad_edge=False)
    for name in columns:
        t.add_column(name, overflow="fold", justify="right" if name in RIGHT else "left")
    for row in rows:
        t.add_row(*[_text(c) if isinstance(c, list) else _text([str(c)]) for c in row])
    with _writing():
        out.print(t)


def bar(percentage: float, width: int = 20) -> list[Piece]:
    # Rounded down like the percentages: a full bar only for a full store.
    filled = max(0, min(width, int(percentage / 100 * width)))
    style = "red" if percentage >= 100 else "yellow" if percentage >= 80 else "green"
    full, empty = ("█", "░") if _can_show(_encoding(), "█░") else ("#", "-")
    return [(full * filled, style), (empty * (width - filled), "dim")]


def percent(value: float) -> str:
    """A status percentage with one decimal, rounded down like the status itself:
    99.99 reads 99.9, never a 100.0 that is not FULL."""
    import math

    return f"{math.floor(round(value * 10, 6)) / 10:.1f}"


def status_text(status: str) -> list[Piece]:
    return [(status, STATUS_STYLE.get(status, ""))]


def local_time(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


class activity:
    """A spinner with elapsed time on a terminal; nothing when piped or for --json.

    Used as ``with activity("generating") as progress:``; ``progress(text)``
    updates the line (the creative upscale reports its polling through it).
    """

    def __init__(self, text: str, enabled: bool = True):
        self.text = text
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda _text: None
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=err_console(), transient=True)
        self._progress.start()
        task = self._progress.add_task(self.text)
        return lambda text: self._progress.update(task, description=f"{self.text}: {text}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
