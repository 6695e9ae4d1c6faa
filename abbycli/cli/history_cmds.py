"""`abby history` and `abby stats`: who generated what, and how it went."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

import typer

from ..errors import InvalidInput
from ..storage.quota import human_size
from . import output
from .output import MAX_COUNT
from .app import state


def _since(text: Optional[str], tz) -> Optional[float]:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"--since must be a date (2026-11-24) or a date and time (2026-11-24T08:00), "
                           f"got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)  # dates are days of the daily-limit time zone
    return moment.timestamp()


def history_cmd(
    ctx: typer.Context,
    user: Optional[str] = typer.Option(None, "--user", "-u", help="Only this user's attempts.", show_default=False),
    since: Optional[str] = typer.Option(None, "--since", help="From this date or time (in daily_reset_timezone).",
                                        show_default=False),
    limit: int = typer.Option(50, "--limit", "-n", min=0, max=MAX_COUNT, help="At most N attempts (0 = all)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per attempt."),
) -> None:
    """List generation attempts, newest first: who, what, how long, and the outcome."""
    from .. import history
    from ..storage.names import validate_user_id

    storage = state(ctx).storage()
    rows = history.query(storage, validate_user_id(user) if user else None, _since(since, storage.quota._tz),
                         limit or None)
    if as_json:
        output.print_json(rows)
        return
    if not rows:
        output.info("No generation attempts recorded" + (f" for {user}." if user else "."))
        return
    output.table(
        ["When", "User", "Operation", "Provider", "Model", "Outcome", "Seconds", "Size", "Prompt"],
        [[r["at"][:16].replace("T", " "), r["user_id"], r["operation"], r["provider"] or "", r["model"] or "",
          [(r["outcome"], _OUTCOME_STYLE.get(r["outcome"], ""))], f"{r['duration'] or 0:.1f}",
          human_size(r["bytes"]) if r["bytes"] else "", (r["prompt"] or "")[:60]] for r in rows],
    )


_OUTCOME_STYLE = {"success": "green", "filtered": "yellow", "refused-limit": "yellow", "rejected": "red",
                  "failed": "red", "interrupted": "yellow"}


def stats_cmd(
    ctx: typer.Context,
    days: int = typer.Option(7, "--days", "-d", min=1, max=3660, help="How many days, today included."),
    top: int = typer.Option(10, "--top", min=1, max=MAX_COUNT, help="How many users to rank."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for dashboards."),
) -> None:
    """Generations and bytes per day, outcomes, providers, top users and daily-limit hits."""
    from .. import history

    data = history.stats(state(ctx).storage(), days, top)
    if as_json:
        output.print_json(data)
        return
    output.info(f"Generations from {data['from']} to {data['to']} ({data['timezone']})")
    peak = max([d["generations"] for d in data["per_day"]] + [1])
    output.table(["Day", "Generations", "", "Bytes", "Attempts"],
                 [[d["day"], d["generations"], output.bar(100 * d["generations"] / peak, 30),
                   human_size(d["bytes"]), d["attempts"]] for d in data["per_day"]])
    output.info("Outcomes: " + ", ".join(f"{k} {v}" for k, v in data["outcomes"].items()))
    if data["providers"]:
        output.table(["Provider", "Generations", "Bytes", "Attempts"],
                     [[p["provider"], p["generations"], human_size(p["bytes"]), p["attempts"]]
                      for p in data["providers"]], title="Providers")
    if data["top_users"]:
        output.table(["User", "Generations", "Bytes", "Attempts"],
                     [[u["user_id"], u["generations"], human_size(u["bytes"]), u["attempts"]]
                      for u in data["top_users"]], title="Top users")
    hits = data["daily_limit_hits"]
    output.info(f"Daily-limit hits: {hits['total']}" + (
        " (" + ", ".join(f"{u['user_id']} {u['hits']}" for u in hits["users"]) + ")" if hits["users"] else ""))


def register(app: typer.Typer) -> None:
    app.command("history")(history_cmd)
    app.command("stats")(stats_cmd)
