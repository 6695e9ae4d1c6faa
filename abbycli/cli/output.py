"""How the CLI talks: rich on a terminal, plain text when piped, JSON for scripts.

rich already honours NO_COLOR and drops styling when stdout is not a terminal;
here we also drop table borders and widen the page when piped, so that
``abby list | grep`` sees whole lines.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any, Iterable

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(highlight=False, soft_wrap=False)
if not console.is_terminal:
    console = Console(highlight=False, width=4096)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def error(message: str) -> None:
    err_console.print(Text(f"abby: error: {message}", style="bold red"))


def warn(message: str) -> None:
    err_console.print(Text(f"abby: warning: {message}", style="yellow"))


def note(message: str) -> None:
    err_console.print(Text(f"abby: note: {message}", style="dim"))


def info(message: str | Text) -> None:
    console.print(message)


def table(columns: Iterable[str], rows: Iterable[Iterable[Any]], title: str | None = None) -> None:
    t = Table(box=box.SIMPLE_HEAD if console.is_terminal else None, title=title,
              header_style="bold", pad_edge=False)
    for name in columns:
        t.add_column(name, overflow="fold", justify="right" if name in RIGHT else "left")
    for row in rows:
        t.add_row(*[c if isinstance(c, Text) else Text(str(c)) for c in row])
    console.print(t)


RIGHT = {"ID", "Size", "Used", "Files", "%", "Limit", "Today", "Bytes"}
STATUS_STYLE = {"OK": "green", "WARNING": "yellow", "FULL": "bold red"}


def bar(percentage: float, width: int = 20) -> Text:
    filled = min(width, round(percentage / 100 * width))
    style = "red" if percentage >= 100 else "yellow" if percentage >= 80 else "green"
    return Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim")


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def local_time(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


class activity:
    """A spinner with elapsed time on a terminal; nothing when piped or for --json.

    Used as ``with activity("generating") as progress:``; ``progress(text)``
    updates the line (the creative upscale reports its polling through it).
    """

    def __init__(self, text: str, enabled: bool = True):
        self.text = text
        self.enabled = enabled and err_console.is_terminal
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda _text: None
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=err_console, transient=True)
        self._progress.start()
        task = self._progress.add_task(self.text)
        return lambda text: self._progress.update(task, description=f"{self.text}: {text}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
