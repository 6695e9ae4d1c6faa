"""python -m bench [--quick] [--servers DIR]: measure abby against the physical floor and the tools
admins use instead.

Builds its own data in a temp dir, prints a markdown table and writes bench/RESULTS.md.
Figures 7-9 (PostgreSQL + S3) need the servers of `.ci/servers`; without them they are
skipped with the reason, and the rest still runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from . import backends, figures
from .data import build_store

HERE = Path(__file__).resolve().parent
FIGURES = {"1", "2", "3", "4", "5", "6", "7", "8", "9"}


def table(rows: list[figures.Row]) -> str:
    def shown(value: float, rate: bool) -> str:
        return f"{value:.0f}/s" if rate else f"{value * 1000:.1f} ms"

    lines = ["| Figure | A | B | A median | B median | A/B | Target | Met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a_med = shown(r.pair.a_median, r.rate) if r.pair else ""
        b_med = shown(r.pair.b_median, r.rate) if r.pair else ""
        met = "" if r.ok is None else ("yes" if r.ok else "**no**")
        lines.append(f"| {r.figure} | {r.a} | {r.b} | {a_med} | {b_med} | {r.ratio:.2f}× | {r.target} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller stores and fewer runs")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per side (at least 5)")
    parser.add_argument("--only", default=None, help="comma-separated figure numbers, e.g. 1,5")
    parser.add_argument("--servers", metavar="DIR", default=None,
                        help="the PostgreSQL/S3 servers of `.ci/servers start DIR` (started if need be, left "
                             "running, so figure 9's store is kept for the next run); default: the ABBY_TEST_* "
                             "variables, else a pair started for this run")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args()
    runs = max(5, args.runs or (5 if args.quick else 7))
    only = set(args.only.split(",")) if args.only else FIGURES
    work = Path(tempfile.mkdtemp(prefix="abby-bench-"))
    os.environ.setdefault("XDG_CONFIG_HOME", str(work / "config"))  # never the user's real config
    os.environ.setdefault("XDG_DATA_HOME", str(work / "data"))
    os.environ.pop("ABBY_CONFIG", None)
    # Installed packages run from compiled bytecode; let the warm-up runs write it, as
    # `pip install` would have, so start-up is measured as users see it.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    s = figures.Settings(args.quick, work, runs)
    started = time.time()
    load_before = backends.load_average()
    rows: list[figures.Row] = []
    skipped: list[str] = []
    try:
        if "1" in only:
            rows += step("save path", figures.save_path, s)
        if "2" in only:
            rows += step("concurrency", figures.concurrency, s)
        if "3" in only:
            small = 2_000
            users = 100 if s.quick else 1_000
            stores = {}
            for n in (small, s.big):
                stores[n] = work / f"quota-{n}"
                build_store(stores[n], n, users).close()
            rows += step("quota and check", figures.quota_and_check, s, stores)
        if "4" in only:
            rows += step("cleanup", figures.cleanup, s)
        if "5" in only:
            rows += step("start-up", figures.startup, s)
        if "6" in only:
            rows += step("generation fan-out", figures.fan_out, s)
        if only & {"7", "8", "9"}:
            rows += with_servers(s, only, args.servers, skipped)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = render(rows, s, time.time() - started, load_before, skipped)
    print(report)
    if not args.no_write and only == FIGURES:
        (HERE / "RESULTS.md").write_text(report, encoding="utf-8")
        print(f"wrote {HERE / 'RESULTS.md'}", file=sys.stderr)


def with_servers(s: figures.Settings, only: set[str], keep_in: str | None, skipped: list[str]) -> list[figures.Row]:
    """Figures 7-9, or none, with a one-line reason, when the servers are not there."""
    rows: list[figures.Row] = []
    try:
        with backends.servers(keep_in) as srv:
            for number, name, fn in (("7", "save on PostgreSQL + S3", backends.save),
                                     ("8", "reservations on PostgreSQL", backends.reservations),
                                     ("9", "check on S3", backends.check)):
                if number in only:
                    rows += step(name, fn, s, srv)
    except backends.Unavailable as exc:
        skipped.append(f"figures 7-9 (PostgreSQL + S3) skipped: {exc}")
        print(f"... {skipped[-1]}", file=sys.stderr, flush=True)
    return rows


def step(name, fn, *args):
    print(f"... {name}", file=sys.stderr, flush=True)
    t = time.time()
    load = backends.load_average()
    rows = fn(*args)
    print(f"    {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    if rows:  # the machine is shared: what else ran meanwhile is part of the figure
        rows[0].notes.append(f"load average (1/5/15 min) {load} before, {backends.load_average()} after")
    return rows


def render(rows: list[figures.Row], s: figures.Settings, seconds: float, load_before: str,
           skipped: list[str]) -> str:
    notes = [f"- **{r.figure}**: {n}" for r in rows for n in r.notes]
    return "\n".join([
        "# abby benchmark results",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `python -m bench{' --quick' if s.quick else ''}` "
        f"in {seconds:.0f} s on {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}. Each ratio compares medians of A and B measured in turns "
        f"in the same run ({s.runs}+ timed runs each, after a warm-up). Load average (1/5/15 min) "
        f"{load_before} at the start, {backends.load_average()} at the end: the 2 cores are shared.",
        "",
        table(rows),
        "",
        "Notes:",
        "",
        *notes,
        *[f"- {line}" for line in skipped],
        *([("- **--quick**: the stores are 10× smaller, so figures 3 and 4 compare Python's ~0.15 s start-up "
            "with C tools that finish in tens of milliseconds; their targets are for the full sizes "
            "(`python -m bench`).")] if s.quick else []),
        "- **2.**: every save fsyncs its file, so with one disk the throughput is bounded by the disk, "
        "not by the ledger's lock: 8 processes reach about what 1 does, and never exceed a limit.",
        "",
        (HERE / "fixes.md").read_text(encoding="utf-8"),
    ])


if __name__ == "__main__":
    main()
