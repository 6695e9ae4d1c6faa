"""The Typer application: global options, and the one place errors become exit codes.

Commands are declarations that parse their options, call the core and render
the result. Every ``AbbyError`` is caught once, in ``AbbyGroup.invoke``, and
becomes one line on stderr plus the exit code its class carries (see
``abbycli.errors``). ``ABBY_DEBUG=1`` re-raises so the traceback shows.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from .. import __version__
from ..config import Settings, load_settings
from ..errors import AbbyError, InvalidInput
from ..secrets import redact
from . import logfile, output

# Commands whose runs are logged: the unattended ones, and those whose failures cost credits.
LOGGED = {"cleanup", "check", "schedule", "generate", "img2img", "upscale", "migrate"}


INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)
_DEBUG_HINT = " (run with ABBY_DEBUG=1 for the traceback)"


class AbbyGroup(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (TyperException, typer.Exit, typer.Abort):  # usage errors and exits: Typer reports them
            raise
        except AbbyError as exc:
            st = _state_of(ctx)
            st.open_log()
            logfile.log().error("%s (exit %d)", exc, exc.exit_code)
            if os.environ.get("ABBY_DEBUG"):
                raise
            output.error(redact(str(exc), *st.secrets()))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _state_of(ctx).open_log()
            logfile.log().warning("interrupted")
            report_interrupt()
            raise typer.Exit(INTERRUPTED) from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # `abby list | head`: Typer ends quietly
                raise
            self._unexpected(ctx, exc)
        except Exception as exc:
            self._unexpected(ctx, exc)

    @staticmethod
    def _unexpected(ctx, exc: Exception) -> None:
        """A bug or an error the core did not convert: the traceback goes to the log
        (redacted), the user gets one line."""
        st = _state_of(ctx)
        st.open_log()
        logfile.log().error("unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
        if os.environ.get("ABBY_DEBUG"):
            raise exc
        output.error(redact(f"unexpected {type(exc).__name__}: {exc}", *st.secrets()) + _DEBUG_HINT)
        raise typer.Exit(1) from None


_interrupt_reported = False


def _show_storage_warnings() -> None:
    """The store logs what a person should know (a lost ledger rebuilt from the
    disk); the log file gets it through the "abby" logger, the terminal here."""
    import logging

    class ToTerminal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            output.warn(record.getMessage())

    logger = logging.getLogger("abby.storage")
    if not any(isinstance(h, ToTerminal) for h in logger.handlers):
        handler = ToTerminal(logging.WARNING)
        logger.addHandler(handler)


def report_interrupt(message: str = "interrupted") -> None:
    """Say once that the run was interrupted, however many layers notice it."""
    global _interrupt_reported
    if not _interrupt_reported:
        _interrupt_reported = True
        output.error(message)


@dataclass
class State:
    """What the global options chose; settings and storage are built on first use."""

    config: Optional[Path] = None
    root: Optional[str] = None
    log_file: Optional[str] = None
    command: Optional[str] = None
    _settings: Optional[Settings] = field(default=None, repr=False)
    _storage: object = field(default=None, repr=False)

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config, {"storage.root": self.root, "cli.log_file": self.log_file})
            if self.command in LOGGED:
                logfile.setup(self._settings.cli.log_file, self.command, self._settings.secrets)
        return self._settings

    def open_log(self) -> None:
        """Make sure a logged command that fails has its log, even when it failed
        before reading the settings, or because they are broken (a cron cleanup
        with a bad config file is exactly the failure the log is for)."""
        if self.command not in LOGGED or self._settings is not None:
            return
        try:
            self.settings()
        except AbbyError:
            from ..config import default_log_file

            logfile.setup(Path(self.log_file) if self.log_file else default_log_file(), self.command)

    def secrets(self) -> tuple[str, ...]:
        """Every secret of the loaded settings (none before they load), for scrubbing output."""
        return self._settings.secrets() if self._settings is not None else ()

    def storage(self):
        if self._storage is None:
            from ..storage.manager import StorageManager

            _show_storage_warnings()
            self._storage = StorageManager.from_settings(self.settings())
        return self._storage

    def user(self, given: Optional[str]) -> str:
        user = given or self.settings().cli.default_user
        if not user:
            raise InvalidInput("no user given: pass --user ID or set cli.default_user (abby config set cli.default_user ID)")
        return user


app = typer.Typer(
    cls=AbbyGroup,
    name="abby",
    help="abby: a quota-managed image store for bots, with image generation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"abby {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Config file to use (default: $ABBY_CONFIG, then the user and site config dirs).",
        show_default=False,
    ),
    root: Optional[str] = typer.Option(
        None, "--root", help="Storage root, overriding storage.root and $STORAGE_ROOT.", show_default=False,
    ),
    log_file: Optional[str] = typer.Option(
        None, "--log-file", help="Log file for unattended commands and generation failures (overrides cli.log_file).",
        show_default=False,
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    ctx.obj = State(config=config, root=root, log_file=log_file, command=ctx.invoked_subcommand)


def state(ctx: typer.Context) -> State:
    return ctx.ensure_object(State)


def _state_of(ctx) -> State:
    return ctx.obj if isinstance(ctx.obj, State) else State()


def _register() -> None:
    from . import config_cmds, gen_cmds, history_cmds, migrate_cmds, schedule_cmds, storage_cmds

    gen_cmds.register(app)
    storage_cmds.register(app)
    migrate_cmds.register(app)
    history_cmds.register(app)
    app.add_typer(schedule_cmds.app, name="schedule")
    app.add_typer(config_cmds.app, name="config")


_register()


def main() -> None:
    output.tolerate_any_encoding()
    try:
        app(prog_name="abby")
        code = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # Ctrl-C outside a command (while parsing, say)
        code = INTERRUPTED
    try:
        if code == INTERRUPTED:  # Typer turns a Ctrl-C outside invoke into a silent 130
            report_interrupt()
        # Flush while a Ctrl-C can still be caught, so nothing is left for Python's exit.
        sys.stdout.flush()
    except KeyboardInterrupt:
        report_interrupt()
        code = INTERRUPTED
    except OSError as exc:
        # A closed pipe or a full disk: what is left cannot be shown. Let it drain into
        # the null device, or Python's exit would try again and print a traceback.
        if exc.errno != errno.EPIPE and not code:
            output.error(f"cannot write the output: {exc.strerror or exc}")
        code = code or 1
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    # The command is over and its output is out. A Ctrl-C from here on would land while
    # Python shuts down, which resets SIGINT to its default and dies of it (exit -2);
    # the outcome is already decided, so the command's own exit code stands.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
