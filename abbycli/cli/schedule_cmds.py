"""`abby schedule install|show|remove`: the nightly cleanup, with cron, schtasks or systemd."""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import AbbyError, InvalidInput
from . import logfile, output
from .app import state

TARGETS = ("cron", "schtasks", "systemd")

app = typer.Typer(help="Install, show or remove the nightly `abby cleanup --quiet`.", no_args_is_help=True)

TARGET = typer.Option(None, "--target", "-t", help="cron, schtasks or systemd (default: schtasks on Windows, "
                      "cron elsewhere).", show_default=False)
PRINT = typer.Option(False, "--print", help="Print what would be done; change nothing.")


def _target(target: Optional[str]) -> str:
    from .. import schedule

    target = target or schedule.default_target()
    if target not in TARGETS:
        raise InvalidInput(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    return target


def _describe(plan) -> None:
    import shlex
    import subprocess

    for path, text in plan.files.items():
        output.info(f"write {path}:")
        output.info(text.rstrip())
    for args, stdin in plan.commands:
        # shown the way the target's own shell would read it
        output.info("run: " + (subprocess.list2cmdline(args) if plan.target == "schtasks" else shlex.join(args)))
        if stdin is not None:
            output.info("with this crontab on its standard input:")
            output.info(stdin.rstrip() or "(empty)")
    for path in plan.remove:
        output.info(f"delete {path}")


@app.command("install")
def install(
    ctx: typer.Context,
    at: str = typer.Option("03:30", "--at", help="Time of day, HH:MM (24-hour, local time)."),
    target: Optional[str] = TARGET,
    dry: bool = PRINT,
) -> None:
    """Run `abby cleanup --quiet` every day, using this abby and the config in use.

    Settings cleanup uses (root, age, log file) that come from environment
    variables or flags are written into the job, since a scheduler does not pass
    them on. Installing again replaces the entry; it never adds a second one.
    """
    from .. import schedule

    settings = state(ctx).settings()  # a broken config is refused before anything is scheduled
    command, left_out = schedule.job_command(settings)
    if left_out:
        output.note(f"the job does not get {', '.join(left_out)}: cleanup does not use "
                    f"{'it' if len(left_out) == 1 else 'them'}, and the config loads without "
                    f"{'it' if len(left_out) == 1 else 'them'}")
    runner = schedule.run_command
    if dry:
        def runner(args, stdin=None):  # --print must work where the scheduler is missing, too
            try:
                return schedule.run_command(args, stdin)
            except AbbyError as exc:
                output.warn(f"{exc}; showing the plan as if nothing were installed")
                return schedule.Result(1, "", "no crontab")
    plan = schedule.install_plan(_target(target), command, at, runner)
    if dry:
        _describe(plan)
        return
    schedule.execute(plan, schedule.run_command)
    logfile.log().info("installed: %s", plan.summary)
    output.info(f"installed: {plan.summary}")


@app.command("show")
def show_cmd(target: Optional[str] = TARGET) -> None:
    """Show the scheduled cleanup, as the scheduler reports it."""
    from .. import schedule

    found = schedule.show(_target(target), schedule.run_command)
    output.info(found if found else f"no abby cleanup is scheduled with {_target(target)}")
    if not found:
        raise typer.Exit(1)


@app.command("remove")
def remove(ctx: typer.Context, target: Optional[str] = TARGET, dry: bool = PRINT) -> None:
    """Remove the scheduled cleanup (other crontab lines are kept)."""
    from .. import schedule

    state(ctx).settings()
    plan = schedule.remove_plan(_target(target), schedule.run_command)
    if dry:
        _describe(plan)
        return
    schedule.execute(plan, schedule.run_command)
    if plan.commands:
        logfile.log().info("removed: %s", plan.summary)
    output.info(plan.summary)
