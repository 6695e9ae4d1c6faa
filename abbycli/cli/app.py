"""The Typer application: global options, and the one place errors become exit codes.

Commands are declarations that parse their options, call the core and render
the result. Every ``AbbyError`` is caught once, in ``AbbyGroup.invoke``, and
becomes one line on stderr plus the exit code its class carries (see
``abbycli.errors``). ``ABBY_DEBUG=1`` re-raises so the traceback shows.
"""

from __future__ import annotations

import os
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
from . import logfile, output

# Commands whose runs are logged: the unattended ones, and those whose failures cost credits.
LOGGED = {"cleanup", "check", "schedule", "generate", "img2img", "upscale"}


class AbbyGroup(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (TyperException, typer.Exit, typer.Abort):  # usage errors and exits: Typer reports them
            raise
        except AbbyError as exc:
            if os.environ.get("ABBY_DEBUG"):
                raise
            logfile.log().error("%s", exc)
            output.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            output.error("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if os.environ.get("ABBY_DEBUG"):
                raise
            output.error(f"unexpected {type(exc).__name__}: {exc} (run with ABBY_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None


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
                logfile.setup(self._settings.cli.log_file, self.command, self._settings.generation.api_key)
        return self._settings

    def storage(self):
        if self._storage is None:
            from ..storage.manager import StorageManager

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


def _register() -> None:
    from . import config_cmds, gen_cmds, history_cmds, schedule_cmds, storage_cmds

    gen_cmds.register(app)
    storage_cmds.register(app)
    history_cmds.register(app)
    app.add_typer(schedule_cmds.app, name="schedule")
    app.add_typer(config_cmds.app, name="config")


_register()


def main() -> None:
    app(prog_name="abby")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
