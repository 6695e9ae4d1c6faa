"""How the CLI talks: rich on a terminal, plain text when piped, JSON for scripts.

rich honours NO_COLOR and drops styling when stdout is not a terminal; here
we also drop table borders and widen the page when piped, so that
``abby list | grep`` sees whole lines. rich is imported on first use only:
``--json`` runs never load it, which keeps start-up close to Typer's own.

Styled text is passed around as ``(text, style)`` pairs so that commands
never import rich themselves.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Union

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


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def error(message: str) -> None:
    err_console().print(_text([(f"abby: error: {message}", "bold red")]))


def warn(message: str) -> None:
    err_console().print(_text([(f"abby: warning: {message}", "yellow")]))


def note(message: str) -> None:
    err_console().print(_text([(f"abby: note: {message}", "dim")]))


def info(*pieces: Piece) -> None:
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
    out.print(t)


def bar(percentage: float, width: int = 20) -> list[Piece]:
    filled = min(width, round(percentage / 100 * width))
    style = "red" if percentage >= 100 else "yellow" if percentage >= 80 else "green"
    return [("█" * filled, style), ("░" * (width - filled), "dim")]


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
