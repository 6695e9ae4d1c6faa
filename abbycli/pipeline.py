"""The generation pipeline shared by the CLI and the bot.

1. Reserve daily slots and room for the user; at a limit, refuse with no request sent.
2. Call the provider.
3. Check the returned bytes (done by the client: signature and a full decode).
4. Embed the parameters and save through StorageManager, atomically; the
   reservation is confirmed in the same transaction as the image row.
5. Refund every reservation that did not become a stored image: failures,
   filtered images and anything interrupted.
6. Record every attempt in the history, including the images an interruption
   (Ctrl-C, a cancelled task) stopped before they were made ("interrupted").

A free request (the local upscale) takes no daily slot; it still obeys the
storage caps. The pipeline never knows which provider it talks to.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import history
from .errors import AbbyError, ContentFiltered, InvalidInput, MalformedResponse, QuotaExceeded
from .generation.generator import ImageGenerator, expected_images
from .generation.imaging import embed_metadata
from .generation.http import Progress
from .generation.request import GeneratedImage, ImageRequest
from .secrets import redact
from .storage.manager import StorageManager, StoredImage


log = logging.getLogger("abby")


@dataclass
class ImageOutcome:
    stored: StoredImage | None = None
    image: GeneratedImage | None = None  # kept on failure too, when the provider did return one
    error: AbbyError | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(self.stored.path) if self.stored and self.stored.path else None}
        if self.stored:
            out |= {"id": self.stored.id, "key": self.stored.key, "bytes": self.stored.size,
                    "format": self.stored.format}
        if self.image:
            out |= {"seed": self.image.seed, "finish_reason": self.image.finish_reason, "model": self.image.model,
                    "notes": self.image.notes}
        if self.error:
            out |= {"error": str(self.error), "error_type": type(self.error).__name__}
        return out


@dataclass
class GenerationResult:
    request: ImageRequest
    outcomes: list[ImageOutcome] = field(default_factory=list)
    extra: int = 0  # images the provider made beyond those asked for (not stored)

    @property
    def stored(self) -> list[StoredImage]:
        return [o.stored for o in self.outcomes if o.stored]

    @property
    def exit_code(self) -> int:
        """0 when every image was stored, else the code of the first one that was not."""
        for o in self.outcomes:
            if o.error is not None:
                return o.error.exit_code
        return 0


def _stem(req: ImageRequest, name: str | None) -> str:
    if name:
        return name
    if req.prompt and req.operation != "upscale":
        words = re.findall(r"\w+", req.prompt.lower())[:6]
        if words:
            return "-".join(words)
    return {"upscale": "upscaled", "image-to-image": "img2img"}.get(req.operation, "generated")


def metadata_for(req: ImageRequest, image: GeneratedImage, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parameters stored with an image. Text the provider sent back (a request id, a
    revised prompt) is scrubbed of the provider's secrets first: a server that echoes a key
    must not get it into the ledger or the file."""
    meta = {
        "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": image.seed, "model": image.model,
        "style_preset": req.style_preset, "provider": image.provider or req.provider,
        "operation": req.operation, "finish_reason": image.finish_reason,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "aspect_ratio": req.aspect_ratio, "strength": req.strength, "upscale_mode": req.mode,
        "request_id": image.request_id, "notes": image.notes or None,
        "options": dict(req.options) or None,
    }
    meta |= image.metadata  # what the provider adds (OpenAI's revised_prompt, say)
    return {k: _scrubbed(v, secrets) for k, v in meta.items() if v is not None}


def _scrubbed(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return redact(value, *secrets)
    if isinstance(value, dict):
        return {k: _scrubbed(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(v, secrets) for v in value]
    return value


def daily_slots(generator: ImageGenerator, req: ImageRequest) -> int:
    """Daily generations a request takes: one per image, none for a free request (a local upscale)."""
    if generator.is_free(req):
        return 0
    return req.count if req.operation != "upscale" else 1


async def generate(
    storage: StorageManager,
    generator: ImageGenerator,
    req: ImageRequest,
    user_id: str,
    *,
    name: str | None = None,
    concurrency: int = 4,
    progress: Progress | None = None,
    outcomes: list[ImageOutcome] | None = None,
) -> GenerationResult:
    """Run one request through the whole pipeline.

    Raises QuotaExceeded (nothing sent) or InvalidInput (nothing sent);
    per-image provider failures are reported in the result's outcomes.
    ``outcomes``, if given, is the list the outcomes are appended to as they
    happen: a caller whose run is interrupted (the task cancelled, Ctrl-C) still
    knows which images were stored.
    """
    # prepare() decodes the input image whole: CPU work, kept off the event loop.
    req = await asyncio.to_thread(generator.prepare, req)
    paid = not generator.is_free(req)
    slots = daily_slots(generator, req)
    started = time.time()
    expected = expected_images(req)
    secrets = generator.secrets(req)
    unsettled: list = []  # reservations not (yet) spent on a stored image
    extra: list = []  # images beyond the reserved slots, not stored
    result = GenerationResult(req, outcomes if outcomes is not None else [])

    async def keep(images: list) -> None:
        """Store each image as it arrives, spending one reservation per stored image."""
        for image in images:
            if isinstance(image, Exception):
                result.outcomes.append(ImageOutcome(error=image))
                continue
            if image.filtered:
                result.outcomes.append(ImageOutcome(image=image, error=ContentFiltered(
                    "the provider's content filter blocked this image; it was not stored and "
                    "does not count against the daily limit")))
                continue
            if len(result.outcomes) >= expected or (paid and not unsettled):
                # More images than were asked for (a ComfyUI graph may save extra ones): only
                # those asked for are stored, never one the user did not reserve room and a slot for.
                extra.append(image)
                continue
            reservation = unsettled.pop() if paid else None

            def kept(stored: StoredImage) -> None:
                nonlocal reservation
                result.outcomes.append(ImageOutcome(stored=stored, image=image))
                reservation = None  # spent: the store confirmed it with the image row

            meta = metadata_for(req, image, secrets)
            try:
                data = await asyncio.to_thread(_with_metadata, image, meta)
                await _uninterrupted(kept, storage.store, data, user_id, _stem(req, name) + ".png", metadata=meta,
                                     reservation=reservation)
            except InvalidInput as exc:  # the only input here is the provider's image: its fault, not the user's
                result.outcomes.append(ImageOutcome(image=image, error=MalformedResponse(
                    f"the provider's image cannot be stored: {exc}")))
            except AbbyError as exc:
                result.outcomes.append(ImageOutcome(image=image, error=exc))
            finally:
                if reservation is not None:
                    unsettled.append(reservation)

    stopped: BaseException | None = None  # what ended the run early: a refusal or an interruption
    try:
        if slots:
            await _uninterrupted(unsettled.extend, storage.quota.reserve_generations, user_id, slots)
        await generator.run(req, user_id=user_id, concurrency=concurrency, progress=progress, on_images=keep)
    except (QuotaExceeded, asyncio.CancelledError, KeyboardInterrupt) as exc:
        stopped = exc
        raise
    finally:
        attempts = [history.attempt(started, user_id, req, error=o.error, image=o.image, stored=o.stored)
                    for o in result.outcomes]
        if isinstance(stopped, QuotaExceeded):  # refused whole, before anything was sent
            attempts.append(history.attempt(started, user_id, req, error=stopped))
        elif stopped is not None:  # interrupted: one row for each image that was never made
            missing = max(0, expected - len(result.outcomes))
            attempts += [history.attempt(started, user_id, req, error=stopped)] * missing
        await asyncio.to_thread(history.record, storage, attempts)
        if extra:
            log.warning("the provider made %d image(s) more than the %d asked for; they were not stored",
                        len(extra), expected)
            result.extra = len(extra)
        for o in result.outcomes:
            if o.error is not None:
                log.warning("generation for %s failed (%s): %s", user_id, type(o.error).__name__, o.error)
        # Failures, filtered images and interruptions give their slots and room back.
        for reservation in unsettled:
            try:
                await asyncio.to_thread(storage.quota.refund, reservation)
            except AbbyError:
                pass  # the reservation expires and `abby check --fix` releases it
    return result


def _with_metadata(image: GeneratedImage, meta: dict[str, Any]) -> bytes:
    """The image with its parameters embedded. When they cannot be (more than a JPEG segment
    holds, say), the paid image is stored without them, never lost: the ledger keeps them."""
    try:
        return embed_metadata(image.data, meta)
    except InvalidInput as exc:
        image.notes.append(f"the parameters were not embedded in the file ({exc}); the ledger keeps them")
        return image.data


async def _uninterrupted(on_result, fn, *args, **kwargs) -> None:
    """Run the ledger call ``fn`` in a thread and give its result to ``on_result``, even if
    this task is cancelled meanwhile: the thread cannot be stopped, so what it did (an image
    stored, slots reserved) must be accounted for. The cancellation goes on afterwards."""
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        value = await asyncio.shield(job)
    except asyncio.CancelledError:
        try:
            on_result(await job)
        except Exception:
            pass  # it failed: nothing to account for
        raise
    on_result(value)
