"""QuotaManager: the limits, the check-and-reserve logic and the seed's status dict.

Every check here runs on a ledger transaction opened by the caller with
``ledger.write()``, so the check and the row that consumes the quota commit
together. A check outside that transaction would be no quota. The rules and
messages live here; the ledger (backend.py) only stores and counts.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from ..errors import DailyLimitReached, GlobalQuotaExceeded, InvalidInput, QuotaExceeded, UserQuotaExceeded
from .backend import Ledger, LedgerReader, LedgerWriter, ReservationRow
from .names import validate_user_id

MIB = 1024 * 1024
WARNING_PERCENT = 80.0
# Bounds of the size settings, in MiB: 1 KiB to 16 TiB; and of the daily allowance.
MIN_MB = 1 / 1024
MAX_MB = 16 * 1024 * 1024
MAX_DAILY_GENS = 1_000_000


def mib(nbytes: int) -> float:
    """Bytes as MiB, rounded to 3 decimals: the unit of every *_mb field."""
    return round(nbytes / MIB, 3)


def human_size(nbytes: int) -> str:
    """A size for people in binary units: '152 B', '340.2 KiB', '1.4 MiB', '4.9 GiB'.

    The config's ``*_mb`` keys are MiB, so every size abby shows uses the same
    binary units. A value that would round up to 1024 of a unit is shown in the
    next one, so nothing reads '1024.0 KiB'.
    """
    size = float(nbytes)
    if abs(size) < 1024:
        return f"{nbytes} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if abs(round(size, 1)) < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def size_pair(a: int, b: int) -> tuple[str, str]:
    """Two sizes for one sentence ('X of Y', 'X, more than Y'), exact in bytes where
    rounding would make different sizes read the same."""
    ha, hb = human_size(a), human_size(b)
    if ha == hb and a != b:
        return f"{ha} ({a:,} bytes)", f"{hb} ({b:,} bytes)"
    return ha, hb


@dataclass(frozen=True)
class Limits:
    global_bytes: int
    user_bytes: int
    daily_gens: int
    generation_bytes: int
    timezone: str = "UTC"

    @classmethod
    def from_mb(cls, global_mb: float, user_mb: float, daily_gens: int,
                generation_mb: float = 1.5, timezone: str = "UTC") -> "Limits":
        """Limits from the config's MiB values, refusing any that could not work
        (a cap of zero bytes, one beyond what the disk could hold, a generation
        that could never fit under the per-user cap)."""
        for name, value in [("max_global_storage_mb", global_mb), ("max_user_storage_mb", user_mb),
                            ("image_generation_size_mb", generation_mb)]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidInput(f"{name} must be a number, got {value!r}")
            if not MIN_MB <= value <= MAX_MB:
                raise InvalidInput(f"{name} must be between 1 KiB and 16 TiB (given in MiB), got {value!r}")
        if isinstance(daily_gens, bool) or not isinstance(daily_gens, int) or not 1 <= daily_gens <= MAX_DAILY_GENS:
            raise InvalidInput(f"max_user_daily_gens must be a whole number from 1 to {MAX_DAILY_GENS:,}, "
                               f"got {daily_gens!r}")
        if user_mb > global_mb:
            raise InvalidInput(f"max_user_storage_mb ({user_mb}) is above max_global_storage_mb ({global_mb})")
        if generation_mb > user_mb:
            raise InvalidInput(f"image_generation_size_mb ({generation_mb}) is above max_user_storage_mb "
                               f"({user_mb}): no generation could ever fit")
        try:
            ZoneInfo(timezone)
        except Exception:
            raise InvalidInput(f"unknown time zone {timezone!r}") from None
        return cls(int(global_mb * MIB), int(user_mb * MIB), daily_gens, int(generation_mb * MIB), timezone)


@dataclass(frozen=True)
class Reservation:
    """A daily slot and some room, held while a paid generation runs."""

    id: int
    user_id: str
    day: str
    bytes: int


def too_big_for_user(nbytes: int, cap: int) -> str:
    size, limit = size_pair(nbytes, cap)
    return f"the image is {size}, more than the whole per-user limit of {limit}"


def _status(used: int, total: int) -> tuple[float, str]:
    """(percentage, status). The percentage is rounded down, so a store one byte
    short of its cap reads 99.99 %, never a 100 % that is not FULL."""
    percentage = math.floor(used * 10000 / total) / 100
    if used >= total:
        return percentage, "FULL"
    return percentage, "WARNING" if used * 100 >= total * WARNING_PERCENT else "OK"


def abandoned_reservations(tx: LedgerReader, now: float, user_id: str | None = None) -> list[ReservationRow]:
    """Reservations whose owner is gone (see ``liveness.abandoned``): by age, or on this
    host by a pid that no longer runs."""
    from .liveness import abandoned

    return [r for r in tx.reservations(user_id) if abandoned(r.pid, r.host, r.created_at, now)]


def reclaim_abandoned(tx: LedgerWriter, now: float, user_id: str | None = None) -> list[ReservationRow]:
    """Delete abandoned reservations; returns them. A crashed bot must not keep a
    user's daily slots until the next cleanup."""
    stale = abandoned_reservations(tx, now, user_id)
    tx.release_many([r.id for r in stale])
    return stale


class QuotaManager:
    def __init__(self, ledger: Ledger, limits: Limits):
        self.ledger = ledger
        self.limits = limits
        self._tz = ZoneInfo(limits.timezone)

    # --- days -------------------------------------------------------------
    def today(self, now: float | None = None) -> str:
        return datetime.fromtimestamp(time.time() if now is None else now, self._tz).date().isoformat()

    def day_start(self, now: float | None = None) -> datetime:
        """Midnight that began today in the configured time zone."""
        local = datetime.fromtimestamp(time.time() if now is None else now, self._tz)
        return datetime.combine(local.date(), datetime.min.time(), self._tz)

    def next_reset(self, now: float | None = None) -> datetime:
        local = datetime.fromtimestamp(time.time() if now is None else now, self._tz)
        midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), self._tz)
        return midnight

    # --- checks (inside the caller's write transaction) ---------------------
    def check_room(self, tx: LedgerReader, user_id: str, nbytes: int) -> None:
        """Raise unless ``nbytes`` more fit under the user's and the global cap."""
        lim = self.limits
        if nbytes > lim.user_bytes:
            raise UserQuotaExceeded(too_big_for_user(nbytes, lim.user_bytes))
        usage = tx.usage(user_id)
        user_used = usage.bytes + usage.reserved
        if user_used + nbytes > lim.user_bytes:
            used, cap = size_pair(user_used, lim.user_bytes)
            raise UserQuotaExceeded(
                f"user {user_id!r} is at their storage limit: {used} of {cap} used, "
                f"{human_size(nbytes)} more needed"
            )
        totals = tx.totals()
        global_used = totals.bytes + totals.reserved
        if global_used + nbytes > lim.global_bytes:
            used, cap = size_pair(global_used, lim.global_bytes)
            raise GlobalQuotaExceeded(
                f"the shared storage is full: {used} of {cap} used, {human_size(nbytes)} more needed"
            )

    # --- the daily-generation API -------------------------------------------
    def reserve_generation(self, user_id: str, nbytes: int | None = None) -> Reservation:
        """Take a daily slot and room for one image *before* a paid API is called.

        Raises DailyLimitReached, UserQuotaExceeded or GlobalQuotaExceeded.
        Follow with confirm() on success or refund() on any failure.
        """
        return self.reserve_generations(user_id, 1, nbytes)[0]

    def _check_generations(self, tx: LedgerReader, user_id: str, count: int, nbytes: int,
                           day: str) -> None:
        """Raise unless ``count`` more generations of ``nbytes`` each fit today."""
        used, held = tx.daily_taken(user_id, day)
        left = self.limits.daily_gens - used - held
        if count > left:
            running = f", {held} still running" if held else ""
            wanted = f"{count} generations were asked for but" if count > 1 else "this generation needs one but"
            raise DailyLimitReached(
                f"user {user_id!r} has reached the daily limit: {wanted} {max(left, 0)} of "
                f"{self.limits.daily_gens} are left today{running}; "
                f"the limit resets at {self.next_reset():%Y-%m-%d %H:%M %Z}"
            )
        self.check_room(tx, user_id, nbytes * count)

    def reserve_generations(self, user_id: str, count: int, nbytes: int | None = None) -> list[Reservation]:
        """Reserve ``count`` generations at once, or none: asking for 4 with 2 left is refused whole."""
        import socket

        user_id = validate_user_id(user_id)
        nbytes = self.limits.generation_bytes if nbytes is None else nbytes
        day = self.today()
        with self.ledger.write() as tx:
            now, pid, host = time.time(), os.getpid(), socket.gethostname()
            reclaim_abandoned(tx, now, user_id)
            self._check_generations(tx, user_id, count, nbytes, day)
            ids = tx.reserve(user_id, day, nbytes, count, pid, host, now)
        return [Reservation(i, user_id, day, nbytes) for i in ids]

    def would_refuse(self, user_id: str, count: int) -> QuotaExceeded | None:
        """The refusal reserve_generations would give right now, without reserving anything."""
        if count == 0:
            return None
        user_id = validate_user_id(user_id)
        with self.ledger.read() as tx:
            try:
                self._check_generations(tx, user_id, count, self.limits.generation_bytes, self.today())
            except QuotaExceeded as exc:
                return exc
        return None

    def settle(self, tx: LedgerWriter, reservation: Reservation, charge: bool) -> bool:
        """Release a reservation's room and, if ``charge``, count its daily slot.

        Settling twice (store() with the reservation, then confirm(); or a refund
        after a reclaim) is a no-op: the slot is counted by whoever removes the row.
        Returns False when the reservation was already settled.
        """
        if not tx.release(reservation.id):
            return False
        if charge:
            tx.count_generation(reservation.user_id, reservation.day)
        return True

    def charge(self, tx: LedgerWriter, reservation: Reservation) -> None:
        """Count the daily slot of a generation whose image is being stored: by settling
        its reservation, or, if that was already settled (used for another image,
        refunded, or reclaimed after an hour), as a new generation that must fit under
        today's limit. One paid image is never stored without one slot counted."""
        if self.settle(tx, reservation, charge=True):
            return
        day = self.today()
        self._check_generations(tx, reservation.user_id, 1, 0, day)
        tx.count_generation(reservation.user_id, day)

    def confirm(self, reservation: Reservation) -> None:
        """The generation succeeded: the daily slot is spent, the held room freed."""
        with self.ledger.write() as tx:
            self.settle(tx, reservation, charge=True)

    def refund(self, reservation: Reservation) -> None:
        """The generation failed or was filtered: give the slot and the room back."""
        with self.ledger.write() as tx:
            self.settle(tx, reservation, charge=False)

    # --- reports --------------------------------------------------------------
    def status(self, user_id: str) -> dict:
        """The seed's three-part status dict, plus exact byte counts."""
        user_id = validate_user_id(user_id)
        day = self.today()
        with self.ledger.read() as tx:
            everyone, user = tx.totals(), tx.usage(user_id)
            d_used, d_held = tx.daily_taken(user_id, day)
        return {
            "global": self._part(everyone.bytes, everyone.reserved, self.limits.global_bytes, "total"),
            "user": self._part(user.bytes, user.reserved, self.limits.user_bytes, "limit"),
            "daily": self._daily_part(d_used, d_held),
        }

    def global_status(self) -> dict:
        with self.ledger.read() as tx:
            totals = tx.totals()
        return self._part(totals.bytes, totals.reserved, self.limits.global_bytes, "total") | {"files": totals.files}

    def _part(self, used: int, reserved: int, cap: int, word: str) -> dict:
        percentage, status = _status(used, cap)
        return {
            "used_mb": mib(used), f"{word}_mb": mib(cap), "percentage": percentage, "status": status,
            "used_bytes": used, f"{word}_bytes": cap, "reserved_bytes": reserved,
        }

    def _daily_part(self, used: int, held: int) -> dict:
        remaining = max(0, self.limits.daily_gens - used - held)
        return {
            "allowed": remaining > 0, "remaining": remaining, "limit": self.limits.daily_gens,
            "used": used, "in_progress": held, "resets_at": self.next_reset().isoformat(),
        }

    def users(self) -> list[dict]:
        """Every user with stored bytes or reservations, largest first."""
        day = self.today()
        with self.ledger.read() as tx:
            rows = tx.users_usage(day)
        out = []
        for user_id, nbytes, files, reserved, gens in ((r.user_id, r.bytes, r.files, r.reserved, r.daily_used)
                                                       for r in rows):
            percentage, status = _status(nbytes, self.limits.user_bytes)
            out.append({
                "user_id": user_id, "used_bytes": nbytes, "used_mb": mib(nbytes), "files": files,
                "reserved_bytes": reserved, "limit_bytes": self.limits.user_bytes,
                "limit_mb": mib(self.limits.user_bytes), "percentage": percentage, "status": status,
                "daily_used": gens, "daily_limit": self.limits.daily_gens,
            })
        return out
