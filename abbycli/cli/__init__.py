"""The `abby` command line: the only part of abbycli that uses typer, rich or click."""

import sys


def main() -> None:
    """The console script. Loading the app takes a moment; a Ctrl-C during it is
    reported like one during a command, not as a traceback."""
    try:
        from .app import main as run
    except KeyboardInterrupt:
        sys.stderr.write("abby: error: interrupted\n")
        sys.exit(130)
    run()
