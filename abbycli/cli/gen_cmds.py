"""Generation commands: generate, img2img, upscale, info, balance, providers."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import AbbyError, InvalidInput, NotFound
from ..storage.quota import human_size, mib
from . import output
from .app import report_interrupt, state

USER = typer.Option(None, "--user", "-u", help="User the image is generated for (default: cli.default_user).",
                    show_default=False)
MODEL = typer.Option(None, "--model", "-m", help="The provider's model (`abby providers` lists them; default: the "
                     "provider's configured model).", show_default=False)
PROVIDER = typer.Option(None, "--provider", help="stability, openai, automatic1111, comfyui, local or a plugin "
                        "(default: generation.provider).", show_default=False)
OPTION = typer.Option(None, "--option", "-O", help="A provider-specific extra, KEY=VALUE (repeatable), e.g. "
                      "quality=high or sampler_name='Euler a'.", show_default=False)
STYLE = typer.Option(None, "--style", help="Stability style preset, e.g. anime, photographic, pixel-art.",
                     show_default=False)
NEGATIVE = typer.Option(None, "--negative", help="What you do not want to see.", show_default=False)
SEED = typer.Option(None, "--seed", min=0, help="Seed (where the provider takes one).", show_default=False)
FORMAT = typer.Option("png", "--format", "-f", help="png, jpeg or webp (where the model allows it).")
COUNT = typer.Option(1, "--count", "-n", min=1, max=10, help="How many images (each one is a paid generation).")
CONCURRENCY = typer.Option(4, "--concurrency", min=1, max=16, help="Requests in flight at once.")
OUT = typer.Option(None, "--out", "-o", help="Also copy the result here: a folder, or a file name with an "
                   "extension (numbered when there are several images).",
                   show_default=False)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")
DRY_RUN = typer.Option(False, "--dry-run", help="Print the request and its quota impact; send nothing.")
CFG = typer.Option(None, "--cfg-scale", help="How strictly to follow the prompt (Stability sd3 1-10, v1 0-35; "
                   "AUTOMATIC1111 and ComfyUI 1-30).", show_default=False)
STEPS = typer.Option(None, "--steps", help="Diffusion steps (Stability v1 engines, AUTOMATIC1111, ComfyUI).",
                     show_default=False)


MAX_INPUT_BYTES = 64 * 1024 * 1024  # far above what any endpoint accepts; the pixel limit is checked after


def _read_image(path: Path) -> bytes:
    from .files import read_bounded

    try:
        return read_bounded(path, MAX_INPUT_BYTES, lambda size: InvalidInput(
            f"it is {human_size(size)}, more than the {human_size(MAX_INPUT_BYTES)} abby reads as an input"))
    except InvalidInput as exc:
        raise InvalidInput(f"{path}: {exc}") from None


def _options(pairs: Optional[list[str]]) -> dict[str, str]:
    """--option KEY=VALUE pairs; the provider checks the keys and the values."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"--option {pair!r}: write it as KEY=VALUE")
        if key.strip() in out:
            raise InvalidInput(f"--option {key.strip()} is given twice")
        out[key.strip()] = value
    return out


def _run(ctx: typer.Context, req, user: Optional[str], out: Optional[Path], as_json: bool, dry_run: bool,
         concurrency: int, name: Optional[str] = None) -> None:
    import asyncio

    from ..generation.generator import ImageGenerator
    from ..pipeline import GenerationResult, generate

    st = state(ctx)
    owner = st.user(user)
    settings = st.settings()
    storage = st.storage()
    generator = ImageGenerator.from_settings(settings)
    req = generator.prepare(req)  # every value checked before anything else happens
    if out is not None:
        _check_out(out)  # before any credit is spent
    if dry_run:
        if _dry_run(generator, storage, req, owner, as_json):
            raise typer.Exit(3)  # the real run would be refused by a limit
        return

    outcomes: list = []  # filled as images are stored, so an interruption still shows them

    async def go():
        async with generator:
            with output.activity(f"{_verb(req)} for {owner}", enabled=not as_json) as progress:
                return await generate(storage, generator, req, owner, name=name, concurrency=concurrency,
                                      progress=progress, outcomes=outcomes)

    interrupted = False
    with _retry_notes(quiet_stamina=not generator.is_free(req)):
        try:
            result = asyncio.run(go())
        except KeyboardInterrupt:
            # asyncio.run cancelled the pipeline, which recorded the unfinished images as
            # interrupted and refunded their reservations; show what was stored all the same.
            interrupted = True
            result = GenerationResult(req, outcomes)
    _late_interrupts_exit_130()
    copies, copy_errors = _copy_out(storage, result, out) if out else ({}, {})
    if as_json:
        images = [o.to_dict() | ({"out": str(copies[i])} if i in copies else {})
                  | ({"out_error": copy_errors[i]} if i in copy_errors else {})
                  for i, o in enumerate(result.outcomes)]
        output.print_json({"user_id": owner, "operation": req.operation, "images": images,
                           "quota": storage.get_quota_status(owner)} | ({"interrupted": True} if interrupted else {}))
    else:
        for i, o in enumerate(result.outcomes):
            for note in o.image.notes if o.image else []:
                output.note(note)
            if o.stored:
                seed = f", seed {o.image.seed}" if o.image and o.image.seed is not None else ""
                output.info(f"stored {storage.where(o.stored)} (id {o.stored.id}, {human_size(o.stored.size)}{seed})")
            if i in copies:
                output.info(f"copied to {copies[i]}")
            if o.error:
                output.error(str(o.error))
        daily = storage.get_quota_status(owner)["daily"]
        if not generator.is_free(req):
            output.info(f"{daily['remaining']} of {daily['limit']} generations left today for {owner}.")
    sys.stdout.flush()  # the output is complete: let the caller see it now, while a Ctrl-C still means 130
    if interrupted:
        report_interrupt("interrupted; the images not yet made were given back to the daily limit")
        raise typer.Exit(130)
    if result.exit_code or copy_errors:
        raise typer.Exit(result.exit_code or 1)


def _late_interrupts_exit_130() -> None:
    """From here on the work is done: a Ctrl-C ends the process with 130 at once. Without
    this, a Ctrl-C while Python shuts down (where it has put back the system's default
    handler) kills the process by signal, which a shell or script sees as -2, not 130."""
    import atexit
    import os
    import signal

    def leave(*_):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)

    signal.signal(signal.SIGINT, leave)
    # The last stretch of the shutdown runs no Python handler at all; an ignored signal stays ignored.
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)


class _retry_notes:
    """While a generation runs: one note on stderr for each retry the client logs (stdout,
    and so --json, stays clean), and stamina's own retry instrumentation switched off,
    since abby reports retries itself (stamina would log "stamina.retry_scheduled" to
    stderr, or to stdout when structlog is installed)."""

    def __init__(self, quiet_stamina: bool = True):
        import logging

        self.quiet_stamina = quiet_stamina
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: output.note(record.getMessage())

    def __enter__(self):
        import logging

        from ..generation.http import LOG_PREFIX

        log = logging.getLogger(LOG_PREFIX)
        if self.quiet_stamina:
            from stamina.instrumentation import set_on_retry_hooks

            set_on_retry_hooks([])
        log.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        from ..generation.http import LOG_PREFIX

        logging.getLogger(LOG_PREFIX).removeHandler(self.handler)


def _verb(req) -> str:
    if req.operation == "upscale":
        return f"upscaling with {req.provider}" + (f" ({req.mode})" if req.mode and req.mode != "local" else "")
    count = f"{req.count} images" if req.count > 1 else "an image"
    return f"generating {count} with {req.provider} {req.model or ''}".rstrip()


def _dry_run(generator, storage, req, owner: str, as_json: bool) -> bool:
    """Print what a real run would send and its quota impact; True if a limit would refuse it."""
    from ..errors import DailyLimitReached, UserQuotaExceeded
    from ..pipeline import daily_slots

    slots = daily_slots(generator, req)
    status = storage.get_quota_status(owner)
    reserve = slots * storage.limits.generation_bytes
    refused = storage.quota.would_refuse(owner, slots)  # the very check the real run makes
    refusal = None
    if refused is not None:
        kind = ("daily limit" if isinstance(refused, DailyLimitReached) else
                "per-user storage cap" if isinstance(refused, UserQuotaExceeded) else "global storage cap")
        refusal = f"the {kind}: {refused}"
    requests = generator.describe(req)
    impact = {"daily_slots": slots, "daily_remaining_before": status["daily"]["remaining"],
              "reserved_mb": mib(reserve), "would_be_refused_by": refusal}
    if as_json:
        output.print_json({"dry_run": True, "user_id": owner, "provider": req.provider, "model": req.model,
                           "requests": requests, "local": not requests, "quota": impact})
        return refusal is not None
    if not requests:
        output.info(f"{req.provider}: nothing is sent anywhere; upscale to "
                    f"{f'width {req.width}' if req.width else f'factor {req.factor or 2:g}'}")
    for r in requests:
        output.info(f"{r['method']} {r['url']}")
        for k, v in r["headers"].items():
            output.info(f"  {k}: {v}")
        for k, v in (r.get("json") or r.get("multipart") or {}).items():
            output.info(f"  {k} = {v}")
    output.info(f"quota: takes {slots} daily generation(s); {status['daily']['remaining']} left today; "
                f"{human_size(reserve)} reserved" + (f"; WOULD BE REFUSED by {refusal}" if refusal else ""))
    return refusal is not None


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be written, before any credit is spent. Nothing is created
    here: the nearest folder that exists is probed with a temporary file."""
    import tempfile

    folder = out if out.is_dir() or not out.suffix else out.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInput(f"cannot write to --out {out}: {existing} is not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise InvalidInput(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def _copy_out(storage, result, out: Path) -> tuple[dict[int, Path], dict[int, str]]:
    """Copy each stored image (or an image that could not be stored: it was paid for) to --out.
    Returns the copies made and, for the images that could not be copied, why."""
    copies: dict[int, Path] = {}
    errors: dict[int, str] = {}
    done = [(i, o) for i, o in enumerate(result.outcomes) if o.stored or (o.image and not o.image.filtered)]
    for n, (i, o) in enumerate(done, start=1):
        ext = "." + (o.stored.format if o.stored else o.image.format).replace("jpeg", "jpg")
        if out.is_dir() or not out.suffix:  # a folder (existing, or a name without an extension)
            target = out / (o.stored.key.rpartition("/")[2] if o.stored else f"abby-{n}{ext}")
        else:
            stem = out.with_suffix("") if out.suffix else out
            target = stem.with_name(stem.name + (f"-{n}" if len(done) > 1 else "")).with_suffix(ext)
            if out.suffix and out.suffix.lower() not in (ext, ".jpeg" if ext == ".jpg" else ext):
                output.warn(f"the image is {ext[1:].upper()}, so it was written as {target.name}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if o.stored:
                with storage.open_image(o.stored) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            else:
                target.write_bytes(o.image.data)
        except OSError as exc:
            errors[i] = f"cannot write {target}: {exc.strerror or exc}"
            output.error(errors[i] + ("; the image stays stored" if o.stored else ""))
            continue
        copies[i] = target
    return copies, errors


def generate_cmd(
    ctx: typer.Context,
    prompt: str = typer.Argument(..., help="What the image should show.", show_default=False),
    user: Optional[str] = USER, model: Optional[str] = MODEL, style: Optional[str] = STYLE,
    negative: Optional[str] = NEGATIVE,
    aspect: Optional[str] = typer.Option(None, "--aspect", "-a", help="Aspect ratio W:H: 21:9, 16:9, 3:2, 5:4, 1:1, "
                                         "4:5, 2:3, 9:16, 9:21 (mapped to the model's nearest size where it has "
                                         "fixed sizes).", show_default=False),
    width: Optional[int] = typer.Option(None, "--width", help="Width in pixels, where the provider takes one (Stability "
                                        "v1: SDXL sizes; OpenAI: an exact model size).", show_default=False),
    height: Optional[int] = typer.Option(None, "--height", help="Height in pixels.", show_default=False),
    seed: Optional[int] = SEED, fmt: str = FORMAT, count: int = COUNT, concurrency: int = CONCURRENCY,
    cfg_scale: Optional[float] = CFG, steps: Optional[int] = STEPS,
    provider: Optional[str] = PROVIDER, option: Optional[list[str]] = OPTION,
    out: Optional[Path] = OUT, as_json: bool = JSON, dry_run: bool = DRY_RUN,
) -> None:
    """Generate images from a text prompt and store them under the user's quota."""
    from ..generation.request import ImageRequest

    req = ImageRequest("text-to-image", prompt=prompt, model=model, style_preset=style, negative_prompt=negative,
                       aspect_ratio=aspect, width=width, height=height, seed=seed, output_format=fmt, count=count,
                       cfg_scale=cfg_scale, steps=steps, provider=provider, options=_options(option))
    _run(ctx, req, user, out, as_json, dry_run, concurrency)


def img2img_cmd(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="The starting image (PNG, JPEG or WebP).", show_default=False),
    prompt: str = typer.Argument(..., help="What the new image should show.", show_default=False),
    user: Optional[str] = USER,
    model: Optional[str] = MODEL,
    strength: Optional[float] = typer.Option(None, "--strength", "-s", min=0.0, max=1.0,
                                             help="How far to move from the input: 0 keeps it, 1 ignores it "
                                             "(default 0.5; v1: image strength, default 0.35).", show_default=False),
    style: Optional[str] = STYLE, negative: Optional[str] = NEGATIVE, seed: Optional[int] = SEED,
    fmt: str = FORMAT, count: int = COUNT, concurrency: int = CONCURRENCY,
    cfg_scale: Optional[float] = CFG, steps: Optional[int] = STEPS,
    provider: Optional[str] = PROVIDER, option: Optional[list[str]] = OPTION,
    out: Optional[Path] = OUT, as_json: bool = JSON, dry_run: bool = DRY_RUN,
) -> None:
    """Generate images from an image and a prompt."""
    from ..generation.request import ImageRequest

    req = ImageRequest("image-to-image", prompt=prompt, image=_read_image(image), image_name=str(image), model=model,
                       strength=strength, style_preset=style, negative_prompt=negative, seed=seed, output_format=fmt,
                       count=count, cfg_scale=cfg_scale, steps=steps, provider=provider, options=_options(option))
    _run(ctx, req, user, out, as_json, dry_run, concurrency)


def upscale_cmd(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="The image to upscale.", show_default=False),
    user: Optional[str] = USER,
    mode: Optional[str] = typer.Option(None, "--mode", help="Stability: fast (4x), conservative, creative, esrgan "
                                       "(2x) or local (offline, free). Default: its upscale_mode, else fast with an "
                                       "API key and local without.", show_default=False),
    width: Optional[int] = typer.Option(None, "--width", "-w", min=1, help="Exact output width in pixels.",
                                        show_default=False),
    factor: Optional[float] = typer.Option(None, "--factor", "-x", help="Exact scale factor, e.g. 2 or 3.5.",
                                           show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Needed by conservative and creative.",
                                         show_default=False),
    negative: Optional[str] = NEGATIVE, seed: Optional[int] = SEED, style: Optional[str] = STYLE,
    creativity: Optional[float] = typer.Option(None, "--creativity", help="conservative 0.2-0.5, creative 0.1-0.5.",
                                               show_default=False),
    fmt: str = FORMAT, provider: Optional[str] = PROVIDER, option: Optional[list[str]] = OPTION,
    model: Optional[str] = MODEL,
    out: Optional[Path] = OUT, as_json: bool = JSON, dry_run: bool = DRY_RUN,
) -> None:
    """Upscale an image to an exact width or factor, and store it under the user's quota.

    The local provider (or Stability's --mode local) needs no key, no network and no
    credits, and takes no daily generation.
    """
    from ..generation.request import ImageRequest

    req = ImageRequest("upscale", image=_read_image(image), image_name=str(image), mode=mode, width=width,
                       factor=factor, prompt=prompt, negative_prompt=negative, seed=seed, style_preset=style,
                       creativity=creativity, output_format=fmt, provider=provider, options=_options(option),
                       model=model)
    _run(ctx, req, user, out, as_json, dry_run, 1, name=f"{image.stem}-upscaled")


def info_cmd(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="A stored image's id, key or path, or any image file.",
                                 show_default=False),
    url: bool = typer.Option(False, "--url", help="Also show a time-limited URL to the image (S3 stores; "
                             "lifetime: storage.url_lifetime)."),
    as_json: bool = JSON,
) -> None:
    """Show the generation parameters stored with an image."""
    from ..generation.imaging import read_metadata
    from .storage_cmds import _url

    st = state(ctx)
    data: dict[str, Any] = {}
    try:
        storage = st.storage()
        stored = storage.get_image(target)
    except NotFound:
        path = Path(target)
        if not path.is_file():
            raise NotFound(f"{target!r} is neither a stored image nor a file") from None
        if url:
            raise InvalidInput(f"--url needs a stored image; {target} is a file outside the store")
        data = {"path": str(path), "size": path.stat().st_size}
        source, opener = str(path), lambda: open(path, "rb")
    else:
        data = stored.to_dict() | ({"url": _url(storage, st, stored)} if url else {})
        source, opener = storage.where(stored), lambda: storage.open_image(stored)
    try:
        with opener() as fh:
            data["embedded"] = read_metadata(fh.read())
    except (OSError, AbbyError) as exc:
        data["embedded"] = None
        output.warn(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}")
    if as_json:
        output.print_json(data)
        return
    meta = data.get("metadata") or data.get("embedded") or {}
    rows = [(k, data[k]) for k in ("id", "user_id", "path", "key", "size", "format", "created_at", "url")
            if data.get(k) is not None]
    shown = {k for k, _ in rows}
    rows += [(k, v) for k, v in meta.items() if k not in shown]  # the ledger's created_at wins
    for key, value in rows:
        output.info(f"{key:>16}: {value}")
    if not meta:
        output.info("no generation parameters are stored with this image")


def balance_cmd(ctx: typer.Context, provider: Optional[str] = PROVIDER, as_json: bool = JSON) -> None:
    """Show the provider account's credit balance (where the provider has one)."""
    import asyncio

    from ..generation.generator import ImageGenerator

    generator = ImageGenerator.from_settings(state(ctx).settings(), provider=provider)
    chosen = generator.provider()

    async def go():
        async with generator:
            return await chosen.balance()

    with _retry_notes():
        credits = asyncio.run(go())
    if credits is None:
        raise InvalidInput(f"provider {chosen.name} has no credit balance to show")
    if as_json:
        output.print_json({"provider": chosen.name, "credits": credits})
    else:
        output.info(f"{credits:.2f} credits ({chosen.title})")


def providers_cmd(
    ctx: typer.Context,
    models: Optional[str] = typer.Option(None, "--models", help="List the models provider NAME offers now "
                                         "(asks the server where it has a list, e.g. AUTOMATIC1111's checkpoints).",
                                         metavar="NAME", show_default=False),
    as_json: bool = JSON,
) -> None:
    """List the installed providers: operations, default models, whether configured."""
    from ..generation import provider as registry
    from ..generation.generator import ImageGenerator

    settings = state(ctx).settings()
    generator = ImageGenerator.from_settings(settings)
    if models is not None:
        import asyncio

        chosen = generator.provider(models)

        async def go():
            async with generator:
                return await chosen.list_models()

        with _retry_notes():
            names = asyncio.run(go())
        if as_json:
            output.print_json({"provider": chosen.name, "models": names})
        else:
            for name in names:
                output.info(output.printable(name))
        return
    rows = []
    for name, point in sorted(registry.installed().items()):
        row: dict[str, Any] = {"name": name, "source": point.value, "default": name == generator.default}
        try:
            p = generator.provider(name)
            ready, why = p.configured()
            row |= {"title": p.title, "operations": list(p.operations), "configured": ready, "status": why,
                    "default_models": {op: p.default_model(op) for op in p.operations},
                    "models": {op: list(p.models(op)) for op in p.operations}}
        except AbbyError as exc:  # a broken plugin or table: shown, not fatal
            row |= {"title": None, "operations": [], "configured": False, "status": str(exc),
                    "default_models": {}, "models": {}}
        rows.append(row)
    if as_json:
        output.print_json({"providers": rows})
        return
    lines = []
    for r in rows:
        model = r["default_models"].get("text-to-image") or next(iter(r["default_models"].values()), None) or "-"
        lines.append((r["name"] + (" *" if r["default"] else ""), ", ".join(r["operations"]) or "-", model,
                      ("ready" if r["configured"] else "not ready") + (f": {r['status']}" if r["status"] else "")))
    output.table(("provider", "operations", "default model", "status"), lines)
    output.info("* the default provider (generation.provider)")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
    app.command("img2img")(img2img_cmd)
    app.command("upscale")(upscale_cmd)
    app.command("info")(info_cmd)
    app.command("balance")(balance_cmd)
    app.command("providers")(providers_cmd)
