"""The ``abby`` command line: a thin adapter over the core. Only this package imports typer and rich."""
