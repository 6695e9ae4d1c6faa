"""Generation history: every attempt recorded in the ledger, and the reports built on it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from typing import Any

from .errors import AbbyError, ApiRejected, ContentFiltered, QuotaExceeded
from .storage.backend import HISTORY_COLUMNS as COLUMNS
from .storage.manager import StorageManager

# "interrupted": the run was stopped (Ctrl-C, a cancelled task) before this image was made;
# its reservation was refunded.
OUTCOMES = ("success", "filtered", "refused-limit", "rejected", "failed", "interrupted")


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "success"
    if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
        return "interrupted"
    if isinstance(error, ContentFiltered):
        return "filtered"
    if isinstance(error, QuotaExceeded):
        return "refused-limit"
    if isinstance(error, ApiRejected):
        return "rejected"
    return "failed"


def record(storage: StorageManager, rows: list[dict[str, Any]]) -> None:
    """Append attempts; history must never break a generation, so ledger trouble is swallowed."""
    if not rows:
        return
    try:
        with storage.ledger.write() as tx:
            tx.append_history([tuple(r.get(c) for c in COLUMNS[1:]) for r in rows])
    except (AbbyError, OverflowError, ValueError, TypeError) as exc:  # a value the ledger cannot hold, say
        import logging

        logging.getLogger("abby.history").warning("could not record %d generation attempt(s): %s", len(rows), exc)


def attempt(at: float, user_id: str, req, *, error: BaseException | None = None, image=None, stored=None,
            provider: str | None = None) -> dict[str, Any]:
    return {
        "at": at, "user_id": user_id, "operation": req.operation,
        "provider": provider or (image.provider if image is not None and image.provider else req.provider),
        "model": image.model if image is not None else req.model, "prompt": req.prompt,
        "seed": image.seed if image is not None else req.seed, "duration": round(time.time() - at, 3),
        "bytes": stored.size if stored is not None else None, "outcome": outcome_of(error),
        "error_type": type(error).__name__ if error is not None else None,
        "error": _message(error), "image_id": stored.id if stored is not None else None,
    }


def _message(error: BaseException | None) -> str | None:
    if error is None:
        return None
    if outcome_of(error) == "interrupted":  # these carry no message of their own
        return "interrupted before the image was made"
    return str(error)


def query(storage: StorageManager, user_id: str | None = None, since: float | None = None,
          limit: int | None = None) -> list[dict[str, Any]]:
    """Attempts, newest first."""
    with storage.ledger.read() as tx:
        rows = [dict(zip(COLUMNS, r)) for r in tx.history(user_id, since, limit)]
    for r in rows:
        r["at"] = datetime.fromtimestamp(r["at"], timezone.utc).isoformat(timespec="seconds")
    return rows


def stats(storage: StorageManager, days: int = 7, top: int = 10, now: float | None = None) -> dict[str, Any]:
    """Per-day generations and bytes, outcomes, providers, top users and daily-limit hits over ``days``
    calendar days (in daily_reset_timezone), today included."""
    from datetime import timedelta

    now = time.time() if now is None else now
    tz = storage.quota._tz
    today = datetime.fromtimestamp(now, tz).date()
    first = today - timedelta(days=days - 1)
    start = datetime.combine(first, datetime.min.time(), tz).timestamp()
    with storage.ledger.read() as tx:
        records = tx.history(since=start)
    at, user, outcome, nbytes, error_type, provider = (
        COLUMNS.index(c) for c in ("at", "user_id", "outcome", "bytes", "error_type", "provider"))
    rows = [(r[at], r[user], r[outcome], r[nbytes], r[error_type], r[provider]) for r in records]
    per_day = {(first + timedelta(days=i)).isoformat(): {"generations": 0, "bytes": 0, "attempts": 0}
               for i in range(days)}
    outcomes: Counter = Counter()
    users: dict[str, dict[str, int]] = defaultdict(lambda: {"generations": 0, "bytes": 0, "attempts": 0})
    limit_hits: Counter = Counter()
    providers: dict[str, dict[str, int]] = defaultdict(lambda: {"generations": 0, "bytes": 0, "attempts": 0})
    for at, user, outcome, nbytes, error_type, provider in rows:
        day = datetime.fromtimestamp(at, tz).date().isoformat()
        if day not in per_day:
            continue
        outcomes[outcome] += 1
        by_provider = providers[provider or "unknown"]
        by_provider["attempts"] += 1
        if outcome == "success":
            by_provider["generations"] += 1
            by_provider["bytes"] += nbytes or 0
        per_day[day]["attempts"] += 1
        users[user]["attempts"] += 1
        if outcome == "success":
            per_day[day]["generations"] += 1
            per_day[day]["bytes"] += nbytes or 0
            users[user]["generations"] += 1
            users[user]["bytes"] += nbytes or 0
        if error_type == "DailyLimitReached":
            limit_hits[user] += 1
    ranked = sorted(users.items(), key=lambda kv: (-kv[1]["generations"], -kv[1]["bytes"], kv[0]))[:top]
    return {
        "days": days, "from": first.isoformat(), "to": today.isoformat(), "timezone": storage.limits.timezone,
        "per_day": [{"day": d, **v} for d, v in per_day.items()],
        "outcomes": {o: outcomes.get(o, 0) for o in OUTCOMES},
        "top_users": [{"user_id": u, **v} for u, v in ranked],
        "providers": [{"provider": p, **v} for p, v in sorted(providers.items(), key=lambda kv: (-kv[1]["generations"],
                                                                                                   kv[0]))],
        "daily_limit_hits": {"total": sum(limit_hits.values()),
                             "users": [{"user_id": u, "hits": n} for u, n in limit_hits.most_common(top)]},
    }
