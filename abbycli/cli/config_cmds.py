"""``abby config``: where the config lives, what it says, and safe edits."""

from __future__ import annotations

import os
import shutil

import typer

from ..config import (KEYS, display_value, find_config, key_for, render_template, search_list,
                      set_value, user_config_path, write_private)
from ..errors import AbbyError
from . import output
from .app import state

app = typer.Typer(help="Show, create and edit abby's configuration.", no_args_is_help=True)


@app.command("path")
def path_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the config file in use and the places abby searches."""
    st = state(ctx)
    in_use = find_config(st.config, os.environ)
    places = ([("--config", st.config)] if st.config else []) + search_list()
    if as_json:
        output.print_json({"in_use": str(in_use) if in_use else None,
                           "search": [{"from": w, "path": str(p), "exists": p.is_file()} for w, p in places]})
        return
    output.info(f"In use: {in_use if in_use else '(none: built-in defaults)'}")
    output.info("Search order:")
    for where, path in places:
        output.info(f"  {where:<12} {path}" + ("" if path.is_file() else "  (not found)"))


@app.command("show")
def show(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print every setting's effective value and where it came from (default, file, env or flag)."""
    settings = state(ctx).settings()
    rows = [{"key": name, "value": display_value(settings, name), "source": settings.sources[name]}
            for name in KEYS]
    rows += _provider_rows(settings)
    if as_json:
        output.print_json({"config_file": str(settings.config_path) if settings.config_path else None,
                           "settings": rows})
        return
    output.info(f"Config file: {settings.config_path or '(none: built-in defaults)'}")
    output.table(["Key", "Value", "Source"],
                 [[r["key"], "(not set)" if r["value"] is None else r["value"], r["source"]] for r in rows])


def _provider_rows(settings) -> list[dict]:
    """Each installed provider's settings; a provider that cannot be loaded gets one row saying why."""
    from ..generation.provider import installed, load

    rows = []
    for name in sorted(installed()):
        try:
            keys = {k.short: k for k in load(name).settings}
            values = settings.provider_values(name)
        except AbbyError as exc:
            rows.append({"key": f"providers.{name}", "value": None, "source": f"error: {exc}"})
            continue
        for short, (value, source) in values.items():
            shown = "********" if keys[short].secret and value is not None else value
            rows.append({"key": f"providers.{name}.{short}", "value": shown, "source": source})
    return rows


@app.command("init")
def init(
    ctx: typer.Context,
    force: bool = typer.Option(False, "--force", help="Replace an existing file (the old one is kept as .bak)."),
) -> None:
    """Write a commented starter config file (to --config if given, else the user config dir)."""
    target = state(ctx).config or user_config_path()
    if target.exists():
        if not force:
            raise AbbyError(f"{target} already exists; use --force to replace it (a .bak copy is kept)")
        backup = target.with_name(target.name + ".bak")
        shutil.copy2(target, backup)
        output.info(f"kept the old file as {backup}")
    write_private(target, render_template())
    output.info(f"wrote {target}")


@app.command("set")
def set_cmd(
    ctx: typer.Context,
    key: str = typer.Argument(..., help=f"Dotted key: {', '.join(KEYS)}, or providers.<name>.<key> "
                              "(`abby config show` lists them).", show_default=False),
    value: str = typer.Argument(..., help="New value.", show_default=False),
) -> None:
    """Set one key in the config file in use (or create the user config file), keeping the other values.

    The value is validated first; the file is rewritten with every key documented,
    mode 0600 on POSIX. Comments of your own in the file are not kept.
    """
    st = state(ctx)
    target = find_config(st.config, os.environ) or user_config_path()
    lost_comments = set_value(target, key, value)
    found = key_for(key)
    shown = "********" if found.secret else found.show(value) if found.show else value
    output.info(f"set {key} = {shown} in {target}")
    if lost_comments:
        output.warn("your own comments in that file were not kept (abby's key documentation was)")
    if found.env and os.environ.get(found.env):
        output.warn(f"${found.env} is set and overrides this value")

