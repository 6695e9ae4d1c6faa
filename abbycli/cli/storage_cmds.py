"""Admin commands over the store: quota, list, save, delete, cleanup, check."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import AbbyError, UserQuotaExceeded
from ..storage.quota import human_size, size_pair, too_big_for_user
from . import logfile, output
from .output import MAX_COUNT
from .files import read_bounded
from .app import state

JSON = typer.Option(False, "--json", help="Print JSON for scripts.")


def quota(
    ctx: typer.Context,
    user: Optional[str] = typer.Option(None, "--user", "-u", help="Show one user's status instead of all users.",
                                       show_default=False),
    top: Optional[int] = typer.Option(None, "--top", min=1, max=MAX_COUNT, help="Only the N largest users.", show_default=False),
    check: bool = typer.Option(False, "--check", help="Monitoring mode (Nagios convention): exit 0 OK, 1 WARNING, 2 FULL."),
    as_json: bool = JSON,
) -> None:
    """Show storage and daily-generation usage, for one user or for everyone."""
    storage = state(ctx).storage()
    if user is not None:
        data = storage.get_quota_status(user)
        worst = _worst(data["global"]["status"], data["user"]["status"])
        if as_json:
            output.print_json({"user_id": user, **data})
        elif check:
            _nagios(worst, f"user {user} {data['user']['percentage']}% "
                           f"({' of '.join(size_pair(data['user']['used_bytes'], data['user']['limit_bytes']))}), "
                           f"global {data['global']['percentage']}%", data)
        else:
            _status_line("Global", data["global"], "total_bytes")
            _status_line("User", data["user"], "limit_bytes")
            daily = data["daily"]
            output.info(f"Daily   {daily['remaining']} of {daily['limit']} generations left today"
                        + (f" ({daily['in_progress']} running)" if daily["in_progress"] else "")
                        + f"; resets {daily['resets_at'][:16].replace('T', ' ')}")
    else:
        g = storage.quota.global_status()
        users = storage.quota.users()
        shown = users[:top] if top else users
        worst = g["status"]
        if as_json:
            output.print_json({"global": g, "users": shown, "user_count": len(users)})
        elif check:
            full = sum(u["status"] == "FULL" for u in users)
            _nagios(worst, f"global {g['percentage']}% ({' of '.join(size_pair(g['used_bytes'], g['total_bytes']))}), "
                           f"{len(users)} users, {full} at their limit", {"global": g})
        else:
            _status_line("Global", g, "total_bytes")
            output.info(f"{g['files']} images, {len(users)} users")
            if shown:
                output.table(
                    ["User", "Used", "Files", "%", "", "Status", "Today"],
                    [[u["user_id"], human_size(u["used_bytes"]), u["files"], output.percent(u["percentage"]),
                      output.bar(u["percentage"], 12), output.status_text(u["status"]),
                      f"{u['daily_used']}/{u['daily_limit']}"] for u in shown],
                )
                if top and len(users) > top:
                    output.info(f"... and {len(users) - top} more")
    if check:
        raise typer.Exit({"OK": 0, "WARNING": 1, "FULL": 2}[worst])


def _worst(*statuses: str) -> str:
    order = ["OK", "WARNING", "FULL"]
    return max(statuses, key=order.index)


def _status_line(label: str, part: dict, cap_key: str) -> None:
    line = [f"{label:<7} ", *output.bar(part["percentage"]),
            f" {output.percent(part['percentage']):>5}%  {' of '.join(size_pair(part['used_bytes'], part[cap_key]))}  ",
            *output.status_text(part["status"])]
    if part.get("reserved_bytes"):
        line.append((f"  (+{human_size(part['reserved_bytes'])} reserved)", "dim"))
    output.info(*line)


def _nagios(status: str, summary: str, data: dict) -> None:
    g = data["global"]
    perf = f"global={g['used_bytes']}B;{int(g['total_bytes'] * 0.8)};{g['total_bytes']};0;{g['total_bytes']}"
    if "user" in data:
        u = data["user"]
        perf += f" user={u['used_bytes']}B;{int(u['limit_bytes'] * 0.8)};{u['limit_bytes']};0;{u['limit_bytes']}"
    typer.echo(f"ABBY QUOTA {status} - {summary} | {perf}")

URL = typer.Option(False, "--url", help="Show a time-limited URL to each image (S3 stores; lifetime: "
                   "storage.url_lifetime).")


def _url(storage, st, image) -> str:
    """A presigned URL, or a clear refusal on a store without URLs."""
    from ..errors import InvalidInput

    link = storage.image_url(image, st.settings().storage.url_lifetime)
    if link is None:
        raise InvalidInput(f"--url needs an S3 image store (storage.blobs_url); the images of "
                           f"{storage.blobs.describe()} are plain files")
    return link



def list_images(
    ctx: typer.Context,
    user: Optional[str] = typer.Option(None, "--user", "-u", help="Only this user's images (default: everyone's).",
                                       show_default=False),
    limit: int = typer.Option(0, "--limit", "-n", min=0, max=MAX_COUNT, help="Show at most N images (0 = all)."),
    url: bool = URL,
    as_json: bool = JSON,
) -> None:
    """List stored images, newest first."""
    st = state(ctx)
    storage = st.storage()
    images = storage.list_images(user, limit or None)
    urls = [_url(storage, st, i) for i in images] if url else []
    if as_json:
        output.print_json([i.to_dict() | ({"url": urls[n]} if url else {}) for n, i in enumerate(images)])
        return
    if not images:
        output.info("No images stored" + (f" for {user}." if user else "."))
        return
    output.table(
        ["ID", "User", "Created", "Size", "URL" if url else "Path"],
        [[i.id, i.user_id, output.local_time(i.created_at), human_size(i.size), urls[n] if url else storage.where(i)]
         for n, i in enumerate(images)],
    )



def save(
    ctx: typer.Context,
    files: List[Path] = typer.Argument(..., help="PNG, JPEG or WebP files to store.", show_default=False),
    user: Optional[str] = typer.Option(None, "--user", "-u", help="Owner (default: cli.default_user).",
                                       show_default=False),
    name: Optional[str] = typer.Option(None, "--name", help="Name to store under (default: the file's name).",
                                       show_default=False),
    as_json: bool = JSON,
) -> None:
    """Store existing image files for a user, under the same quotas as generated ones.

    Every file is tried; the exit code is the first failure's. Daily generation
    limits do not apply: nothing is generated.
    """
    st = state(ctx)
    owner = st.user(user)
    storage = st.storage()
    stored, failed, code = [], [], 0
    cap = storage.limits.user_bytes
    try:
        for path in files:
            try:
                data = read_bounded(path, cap, lambda size: UserQuotaExceeded(too_big_for_user(size, cap)))
                image = storage.store(data, owner, name or path.name,
                                      metadata={"source": path.name, "operation": "import"})
            except AbbyError as exc:
                message = f"{path}: {exc}"
                failed.append({"file": str(path), "error": message, "exit_code": exc.exit_code})
                code = code or exc.exit_code
                output.item_error(message, show=not as_json)
                continue
            stored.append(image.to_dict())
            if not as_json:
                output.info(f"stored {output.printable(storage.where(image))} (id {image.id}, "
                            f"{human_size(image.size)})")
    except KeyboardInterrupt:
        # What was stored stays stored: say so, in the JSON too, then exit 130 as usual.
        if as_json:
            output.print_json({"stored": stored, "failed": failed, "interrupted": True})
        raise
    if as_json:
        output.print_json({"stored": stored, "failed": failed})
    if code:
        raise typer.Exit(code)


def delete(
    ctx: typer.Context,
    refs: List[str] = typer.Argument(..., help="Image ids or paths.", show_default=False),
    as_json: bool = JSON,
) -> None:
    """Delete stored images by id or path; their space is returned to the quota at once."""
    storage = state(ctx).storage()
    deleted, failed, code = [], [], 0
    for ref in refs:
        try:
            image = storage.delete_image(ref)
        except AbbyError as exc:  # FileInUse among them: the row is kept, nothing is lost
            failed.append({"ref": ref, "error": str(exc), "exit_code": exc.exit_code})
            code = code or exc.exit_code
            output.item_error(str(exc), show=not as_json)
            continue
        deleted.append(image.to_dict())
        if not as_json:
            output.info(f"deleted {image.id} ({image.user_id}, {human_size(image.size)}) {storage.where(image)}")
    if as_json:
        output.print_json({"deleted": deleted, "failed": failed})
    if code:
        raise typer.Exit(code)


def cleanup(
    ctx: typer.Context,
    older_than: Optional[float] = typer.Option(
        None, "--older-than", min=0, help="Delete images created this many days ago or earlier "
        "(default: storage.cleanup_days; 0 = everything up to now).", show_default=False),
    user: Optional[str] = typer.Option(None, "--user", "-u", help="Only this user's images.", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="List exactly what would be deleted; delete nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing unless something fails (for cron)."),
    as_json: bool = JSON,
) -> None:
    """Delete expired images, abandoned temp files and empty user folders.

    Safe for cron and Task Scheduler: never interactive, one run at a time,
    never follows links, never leaves the storage root.
    """
    report = state(ctx).storage().cleanup(older_than, user, dry_run)
    # Files another program holds open (Windows), or that an error kept: their rows stay,
    # the next run retries. An error (not a file in use) makes the run fail, so a
    # nightly job that cannot delete does not look fine for ever.
    kept, failed = report.kept, report.failed
    code = 1 if failed else 0
    if not dry_run:
        logfile.log().info("deleted %d image(s), %d bytes, %d temp file(s), %d empty folder(s); "
                           "%d in use, kept; %d failed, kept; %d skipped (links)", len(report.deleted),
                           report.freed_bytes, len(report.temp_files), len(report.empty_dirs), len(kept),
                           len(failed), len(report.skipped))
        for path in kept:
            logfile.log().warning("in use, kept: %s", path)
        for path in failed:
            logfile.log().error("could not be deleted, kept: %s", path)
    if as_json:
        output.print_json(report.to_dict())
        raise typer.Exit(code)
    for path in failed:  # shown even with --quiet: it is a failure
        output.error(f"could not be deleted (an error, see the log; kept for the next run): {output.printable(path)}")
    if quiet:
        raise typer.Exit(code)
    verb = "Would delete" if dry_run else "Deleted"
    if dry_run:
        for path in report.deleted:
            output.info(f"would delete {output.printable(path)}")
        for path in report.temp_files:
            output.info(f"would delete {output.printable(path)}")
        for path in report.empty_dirs:
            output.info(f"would remove empty folder {output.printable(path)}")
    for path in report.skipped:
        output.warn(f"not deleted, a link is on its way: {output.printable(path)}")
    for path in kept:
        output.warn(f"not deleted, in use by another program: {output.printable(path)}")
    output.info(
        f"{verb} {len(report.deleted)} image(s) ({human_size(report.freed_bytes)}), "
        f"{len(report.temp_files)} temp file(s), {len(report.empty_dirs)} empty folder(s)"
        + (f"; {len(kept)} in use, kept; the next run retries" if kept else "")
        + (f"; {len(failed)} could not be deleted, kept" if failed else "")
        + f"; cut-off {output.local_time(report.cutoff)}."
    )
    raise typer.Exit(code)


# Problems `check --fix` cannot repair: they need a person (move a file out, delete images).
NEEDS_A_PERSON = {"foreign", "network_share", "not_an_image", "over_quota", "changed"}


def check(
    ctx: typer.Context,
    fix: bool = typer.Option(False, "--fix", help="Repair what can be repaired: drop rows of missing files, adopt "
                             "unknown images, correct sizes and totals, release stale reservations, remove temp leftovers."),
    as_json: bool = JSON,
) -> None:
    """Reconcile the ledger with the files on disk. Exit 0 when consistent (or all fixed), 1 otherwise."""
    report = state(ctx).storage().check(fix)
    for p in report.problems:
        logfile.log().log(20 if p.fixed else 30, "%s %s: %s: %s", "fixed" if p.fixed else "found",
                          p.kind, p.path, p.detail)
    logfile.log().info("checked %d files: %d problem(s), %d remaining", report.files_checked,
                       len(report.problems), len(report.remaining))
    if as_json:
        output.print_json(report.to_dict())
    else:
        for p in report.problems:
            mark = ("fixed ", "green") if p.fixed else ("found ", "yellow")
            output.info(mark, output.printable(f"{p.kind}: {p.path}: {p.detail}"))
        if not report.problems:
            output.info(f"Consistent: {report.files_checked} files match the ledger.")
        else:
            fixed = len(report.problems) - len(report.remaining)
            fixable = any(p.kind not in NEEDS_A_PERSON for p in report.remaining)
            output.info(f"{len(report.problems)} problem(s), {fixed} fixed, {len(report.remaining)} remaining"
                        + ("; run `abby check --fix` to repair" if fixable and not fix else "") + ".")
    if report.remaining:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(quota)
    app.command("list")(list_images)
    app.command()(save)
    app.command()(delete)
    app.command()(cleanup)
    app.command()(check)
