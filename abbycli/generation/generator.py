"""ImageGenerator: the seed's tuple-returning facade over a typed, raising API.

``generate()`` is the typed API: it validates a request, sends it (or runs it
locally) and returns one entry per image: a ``GeneratedImage`` or the
``ProviderError`` that image failed with. The seed's methods
(``text_to_image`` and friends) wrap it and never raise.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from ..errors import AbbyError, ConfigError, ContentFiltered, InvalidInput, ProviderError
from .imaging import MAX_SIDE, check_size, inspect, over_limit, resize, size_of
from .local import LOCAL_FACTOR, target_size, upscale_local
from .request import GeneratedImage, ImageRequest, validate
from .stability import DEFAULT_HOST, KEY_HELP, Progress, StabilityClient, gather_all

# What each paid upscale returns, as a multiple of the input width.
NATIVE_FACTOR = {"fast": 4.0, "esrgan": 2.0, "conservative": 4.0, "creative": 4.0}


class ImageGenerator:
    def __init__(
        self,
        api_key: str | None = None,
        api_host: str = DEFAULT_HOST,
        *,
        transport: Any = None,
        model: str = "core",
        img2img_model: str = "sd3.5-large",
        upscale_mode: str | None = None,
        max_megapixels: float = 40,
        **client_options: Any,
    ):
        self.client = StabilityClient(api_key, api_host, transport=transport, **client_options)
        self.model = model
        self.img2img_model = img2img_model
        # A fresh machine without a key can still upscale: locally.
        self.upscale_mode = upscale_mode or ("fast" if self.client.has_key else "local")
        # The largest image read as an input or made here (a local upscale, an exact-size resize).
        self.max_pixels = int(max_megapixels * 1_000_000)

    @classmethod
    def from_settings(cls, settings, **options: Any) -> "ImageGenerator":
        g = settings.generation
        return cls(g.api_key, g.api_host, model=g.model, img2img_model=g.img2img_model,
                   upscale_mode=g.upscale_mode, max_megapixels=g.max_megapixels, poll_timeout=g.upscale_timeout,
                   **options)

    def __repr__(self) -> str:
        return f"ImageGenerator(api_host={self.client.host!r}, model={self.model!r})"

    async def __aenter__(self) -> "ImageGenerator":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    # --- the typed API ---------------------------------------------------------------
    def prepare(self, req: ImageRequest) -> ImageRequest:
        """Fill in the defaults and validate; raises InvalidInput before anything is sent.
        A request that already went through here is returned as it is (the CLI checks
        before --dry-run, the pipeline checks again for callers who did not)."""
        if req.checked:
            return req
        if req.operation == "upscale" and req.mode is None:
            req = req.with_(mode=self.upscale_mode)
        elif req.operation == "text-to-image" and req.model is None:
            req = req.with_(model=self.model)
        elif req.operation == "image-to-image" and req.model is None:
            req = req.with_(model=self.img2img_model)
        req = validate(req)
        if not self.is_free(req) and not self.client.has_key:
            raise ConfigError(f"no Stability API key: {KEY_HELP}")
        if req.image is not None:
            # The size limit is applied from the header, before Pillow decodes a single pixel.
            width, height = check_size(req.image, self.max_pixels, req.image_name)
            inspect(req.image, name=req.image_name)  # a broken input image is refused before any credit is spent
            if req.operation == "upscale":
                self._check_output(req, width, height)
        return req.with_(checked=True)

    def _check_output(self, req: ImageRequest, width: int, height: int) -> None:
        """Refuse an upscale whose result abby would have to make above the pixel limit."""
        tw, th = target_size(width, height, req, NATIVE_FACTOR.get(req.mode, LOCAL_FACTOR))
        if tw * th > self.max_pixels:
            raise InvalidInput(f"the upscaled image would be {tw}x{th} {over_limit(tw * th, self.max_pixels)}; "
                               "ask for a smaller --width or --factor")
        side = MAX_SIDE[req.output_format]
        if max(tw, th) > side:
            raise InvalidInput(f"the upscaled image would be {tw}x{th}, but {req.output_format.upper()} images "
                               f"can be at most {side} pixels on a side; ask for a smaller --width or --factor, "
                               "or another --format")

    @staticmethod
    def is_free(req: ImageRequest) -> bool:
        """A local upscale costs no credits and takes no daily slot."""
        return req.operation == "upscale" and req.mode == "local"

    async def generate(self, req: ImageRequest, *, user_id: str | None = None, concurrency: int = 4,
                       progress: Progress | None = None) -> list[GeneratedImage | ProviderError]:
        """Validate and run a request; one entry per image (an image or the error it failed with)."""
        # prepare() decodes the input image whole: CPU work, kept off the event loop.
        req = await asyncio.to_thread(self.prepare, req)
        return await self.run(req, user_id=user_id, concurrency=concurrency, progress=progress)

    async def run(self, req: ImageRequest, *, user_id: str | None = None, concurrency: int = 4,
                  progress: Progress | None = None,
                  on_images: Callable[[list[GeneratedImage | ProviderError]], Awaitable[None]] | None = None,
                  ) -> list[GeneratedImage | ProviderError]:
        """Run a request that ``prepare()`` has already checked.

        ``on_images`` receives each request's images as soon as they arrive, so a
        caller can store the first ones while the others are still being made.
        """
        if self.is_free(req):
            images: list[GeneratedImage | ProviderError] = [await asyncio.to_thread(upscale_local, req)]
            if on_images:
                await on_images(images)
            return images

        gate = asyncio.Semaphore(max(1, concurrency))  # requests on the network at once

        async def one(call):
            try:
                result = await self.client.send(call, user_id, progress, gate)
            except ProviderError as exc:
                return [exc] * call.images
            if req.operation == "upscale":
                result = [await asyncio.to_thread(self._exact_size, req, i) for i in result]
            return result

        calls = await asyncio.to_thread(self.client.plan, req)  # may resize the input image
        results = await gather_all([lambda c=c: one(c) for c in calls], on_images)
        return [image for result in results for image in result]

    @staticmethod
    def _exact_size(req: ImageRequest, image: GeneratedImage) -> GeneratedImage:
        """Honour --width/--factor exactly, whatever size the provider returned."""
        in_w, in_h = size_of(req.image)
        tw, th = target_size(in_w, in_h, req, NATIVE_FACTOR[req.mode])
        w, h = size_of(image.data)  # decoded whole when it arrived
        if (w, h) == (tw, th):
            return image
        how = "down" if w * h > tw * th else "up"
        image.data = resize(image.data, tw, th, image.format)
        image.notes.append(f"the provider returned {w}x{h}; scaled {how} to {tw}x{th} (LANCZOS) as asked")
        return image

    # --- the seed's API: (success, image bytes, message), never raises ---------------
    async def text_to_image(self, prompt: str, style_preset: str | None = None, **options: Any):
        return await self._first(ImageRequest("text-to-image", prompt=prompt, style_preset=style_preset, **options))

    async def image_to_image(self, image_data: bytes, prompt: str, **options: Any):
        return await self._first(ImageRequest("image-to-image", prompt=prompt, image=image_data, **options))

    async def upscale_image(self, image_data: bytes, width: int | None = None, **options: Any):
        return await self._first(ImageRequest("upscale", image=image_data, width=width, **options))

    async def _first(self, req: ImageRequest) -> tuple[bool, bytes | None, str]:
        try:
            result = (await self.generate(req))[0]
            if isinstance(result, Exception):
                raise result
            if result.filtered:
                raise ContentFiltered("the image was blocked by the provider's content filter")
        except AbbyError as exc:
            return False, None, str(exc)
        except Exception as exc:  # the seed's contract: a message, never an exception
            return False, None, f"image generation failed: {type(exc).__name__}: {exc}"
        seed = f", seed {result.seed}" if result.seed is not None else ""
        return True, result.data, f"generated with {result.model}{seed}"
