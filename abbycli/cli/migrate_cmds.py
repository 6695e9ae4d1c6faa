"""abby migrate --to OTHER.toml: move the current store into the one another config describes."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..errors import ConfigError
from ..storage.quota import human_size
from . import output
from .app import report_interrupt, state

SHOWN = 10  # conflicts, failures and id changes listed one per line; the rest counted (all in --json)


def migrate(
    ctx: typer.Context,
    to: Path = typer.Option(..., "--to", help="Config file of the target store (read alone: no environment "
                            "variables apply to it).", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be copied; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Copy every image (with its metadata), the history and today's daily counters from the
    current store to the store OTHER.toml describes, then check the target.

    Safe to run again: a second run copies only what is missing, and finishes an
    interrupted one. The current store is only read. Exit 0 when everything is in the
    target and its check is clean, 1 otherwise.
    """
    from ..config import load_settings
    from ..storage.manager import StorageManager
    from ..storage.migrate import migrate as run

    source = state(ctx).storage()
    if not to.is_file():
        raise ConfigError(f"config file {to} (from --to) does not exist")
    # The environment configures the current store (ABBY_LEDGER_URL, STORAGE_ROOT, AWS_*...):
    # applied to the target as well, it would turn the target into the source, or hand
    # one store's credentials to the other. The target is OTHER.toml alone.
    try:
        target = StorageManager.from_settings(load_settings(to, env={}))
    except ConfigError as exc:
        raise ConfigError(f"the target ({to}): {exc} (the target is read from that file alone: "
                          "no environment variable applies to it)") from None
    with target, _Bar(enabled=not as_json) as bar:
        try:
            report = run(source, target, progress=bar.update, dry_run=dry_run)
        except KeyboardInterrupt:
            bar.stop()
            report_interrupt("interrupted; every image copied so far is complete in the target: "
                             "run the same command again to finish")
            raise
        bar.stop()
        checked = None if dry_run else target.check()
    ok = report.complete and (checked is None or not checked.remaining)
    if as_json:
        output.print_json({"migrate": report.to_dict(), "check": checked.to_dict() if checked else None})
    else:
        _summary(report, checked, to)
    if not ok:
        raise typer.Exit(1)


def _summary(report, checked, to: Path) -> None:
    would = "would be " if report.dry_run else ""
    output.info(f"{'Dry run: ' if report.dry_run else ''}{report.source} -> {report.target}")
    output.info(f"Images: {report.copied} {would}copied ({human_size(report.bytes_copied)})"
                + (f", {report.resumed} of them found with the same bytes in the target's image store "
                   "(an interrupted run's, or the same folder or bucket)" if report.resumed else "")
                + f"; {report.already} already there; {len(report.conflicts)} conflict(s); "
                  f"{len(report.failed)} failed; {report.images} in the source")
    output.info(f"History: {report.history_copied} record(s) {would}copied, {report.history_already} already there")
    output.info(f"Daily counters ({report.day}): {report.daily_raised} of {report.daily_users} user(s) {would}raised "
                "to the source's count")
    if report.id_changes:
        output.info(f"Ids changed (taken in the target): {len(report.id_changes)}")
        for old, new in report.id_changes[:SHOWN]:
            output.info(f"  {old} -> {new}")
        _more(report.id_changes)
    for kind, items in (("conflict", report.conflicts), ("failed", report.failed)):
        for item in items[:SHOWN]:
            output.warn(output.printable(f"{kind}: image {item.image_id} {item.key}: {item.detail}"))
        _more(items)
    if checked is None:  # after a real run, the target's check lists them
        for user, used in report.over_quota:
            output.warn(output.printable(f"user {user!r} would end at {human_size(used)}, over the target's "
                                         "per-user cap (migrated images are kept; nothing is deleted)"))
        if report.over_global is not None:
            output.warn(f"the target would hold {human_size(report.over_global)}, over its global cap")
    if checked is not None:
        if not checked.remaining:
            output.info(("Check of the target: consistent", "green"),
                        f" ({checked.files_checked} files match its ledger).")
        else:
            for p in checked.remaining:
                output.info(("found ", "yellow"), output.printable(f"{p.kind}: {p.path}: {p.detail}"))
            output.info(output.printable(f"Check of the target: {len(checked.remaining)} problem(s); "
                                         f"see `abby --config {to} check`."))
    if not report.complete:
        output.info("Not everything was copied: fix what is listed above and run the same command again.")


def _more(items: list) -> None:
    if len(items) > SHOWN:
        output.info(f"  ... and {len(items) - SHOWN} more (--json lists them all)")


class _Bar:
    """A progress bar on a terminal (stderr); nothing when piped or for --json."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=output.err_console(), transient=True)
            self._progress.start()
        return self

    def update(self, phase: str, done: int, total: int | None) -> None:
        if self._progress is None:
            return
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total)
        self._progress.update(self._tasks[phase], completed=done, total=total)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __exit__(self, *exc) -> None:
        self.stop()


def register(app: typer.Typer) -> None:
    app.command()(migrate)
