"""ImageGenerator: one front for every provider, and the seed's tuple-returning API.

``prepare()`` and ``run()`` are the typed API the pipeline and the CLI use: the
generator picks the request's provider (``req.provider``, else the configured
default), does the checks every provider shares (the input image, the pixel
limit, an upscale's exact size) and leaves the rest to the provider. The seed's
methods (``text_to_image`` and friends) wrap it and never raise.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Mapping

from ..errors import AbbyError, ContentFiltered, InvalidInput, MalformedResponse, ProviderError
from ..secrets import redact
from . import provider as registry
from .http import Progress, seed_or_none
from .imaging import MAX_SIDE, check_size, inspect, over_limit, resize, size_of
from .provider import Provider
from .providers.local import target_size
from .request import GeneratedImage, ImageRequest

DEFAULT_MAX_MEGAPIXELS = 40

log = logging.getLogger("abby")


class ImageGenerator:
    def __init__(
        self,
        api_key: str | None = None,
        api_host: str | None = None,
        *,
        transport: Any = None,
        model: str | None = None,
        img2img_model: str | None = None,
        upscale_mode: str | None = None,
        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
        provider: str = "stability",
        configs: Mapping[str, Mapping[str, Any]] | None = None,
        **client_options: Any,
    ):
        """A bot may build it with Stability's settings as arguments (abby's first API);
        ``configs`` gives other providers' settings ({name: {setting: value}}), and
        ``provider`` picks the default one. ``from_settings`` reads them from abby's config."""
        self.default = provider
        self._configs = configs or {}
        legacy = {"api_key": api_key, "api_host": api_host, "model": model, "img2img_model": img2img_model,
                  "upscale_mode": upscale_mode}
        self._arguments = {"stability": {k: v for k, v in legacy.items() if v is not None}}
        self._transport = transport
        self._client_options = client_options  # Stability's client tuning (retries, polling), for tests and bots
        self._providers: dict[str, Provider] = {}
        # The largest image read as an input or made here (a local upscale, an exact-size resize).
        self.max_pixels = int(max_megapixels * 1_000_000)
        if self._arguments["stability"]:
            self.provider("stability")  # built now, as before providers: a bad key is refused here

    @classmethod
    def from_settings(cls, settings, *, provider: str | None = None, **options: Any) -> "ImageGenerator":
        """Every provider configured from ``settings``; ``provider`` overrides the default one."""
        names = set(registry.installed())
        configs = _LazyConfigs(settings, names)
        return cls(provider=provider or settings.generation.provider, configs=configs,
                   max_megapixels=settings.generation.max_megapixels, **options)

    def __repr__(self) -> str:
        return f"ImageGenerator(provider={self.default!r})"

    async def __aenter__(self) -> "ImageGenerator":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for p in self._providers.values():
            await p.aclose()

    # --- providers -----------------------------------------------------------------------
    def provider(self, name: str | None = None) -> Provider:
        """The provider called ``name`` (default: the configured one), built on first use."""
        name = name or self.default
        if name not in self._providers:
            cls = registry.load(name)
            config = ({k.short: k.default for k in cls.settings} | dict(self._configs.get(name) or {})
                      | self._arguments.get(name, {}))
            options = self._client_options if name == "stability" else {}
            self._providers[name] = cls(config, transport=self._transport, **options)
        return self._providers[name]

    @property
    def client(self):
        """The Stability client (abby's first API exposed it; bots may still use it)."""
        return self.provider("stability").client

    # --- the typed API ---------------------------------------------------------------
    def prepare(self, req: ImageRequest) -> ImageRequest:
        """Pick the provider, fill in the defaults and validate; raises InvalidInput or
        ConfigError before anything is sent. A request that already went through here is
        returned as it is (the CLI checks before --dry-run, the pipeline again for callers
        who did not)."""
        if req.checked:
            return req
        provider = self.provider(req.provider)
        if req.operation not in provider.operations:
            able = [n for n in sorted(registry.installed()) if req.operation in _operations(n)]
            raise InvalidInput(f"provider {provider.name} cannot do {req.operation}; "
                               f"providers that can: {', '.join(able) or 'none installed'}")
        req = req.with_(provider=provider.name)
        if req.operation != "text-to-image" and req.image is None:
            raise InvalidInput(f"{req.operation} needs an input image")
        if req.image is not None:
            # The size limit is applied from the header, before Pillow decodes a single pixel.
            width, height = check_size(req.image, self.max_pixels, req.image_name)
            inspect(req.image, name=req.image_name)  # a broken input image is refused before any credit is spent
        prepared = provider.prepare(req)
        if prepared.provider != provider.name:  # handed over (Stability's --mode local)
            return self.prepare(prepared)
        if prepared.operation == "upscale":
            self._check_output(prepared, width, height, provider.native_factor(prepared))
        return prepared.with_(checked=True)

    def _check_output(self, req: ImageRequest, width: int, height: int, native: float) -> None:
        """Refuse an upscale whose result abby would have to make above the pixel limit."""
        tw, th = target_size(width, height, req, native)
        if tw * th > self.max_pixels:
            raise InvalidInput(f"the upscaled image would be {tw}x{th} {over_limit(tw * th, self.max_pixels)}; "
                               "ask for a smaller --width or --factor")
        side = MAX_SIDE[req.output_format]
        if max(tw, th) > side:
            raise InvalidInput(f"the upscaled image would be {tw}x{th}, but {req.output_format.upper()} images "
                               f"can be at most {side} pixels on a side; ask for a smaller --width or --factor, "
                               "or another --format")

    def is_free(self, req: ImageRequest) -> bool:
        """True when the (prepared) request takes no daily slot."""
        return self.provider(req.provider).is_free(req)

    def describe(self, req: ImageRequest) -> list[dict[str, Any]]:
        """The exact requests a prepared request would send (secrets masked), for --dry-run."""
        return self.provider(req.provider).describe(req)

    def secrets(self, req: ImageRequest) -> tuple[str, ...]:
        """What must be scrubbed from anything the request's provider sent back."""
        return self.provider(req.provider).secrets()

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

        ``on_images`` receives each batch of images as soon as it arrives, so a caller can
        store the first ones while the others are still being made.
        """
        provider = self.provider(req.provider)
        delivered: list[GeneratedImage | ProviderError] = []
        seen: dict[int, Any] = {}  # id of what the provider handed over -> what was handed on

        async def arrived(images: Any) -> None:
            fresh = [i for i in (images if isinstance(images, list) else [images]) if id(i) not in seen]
            checked = [_checked(provider, i) for i in fresh]
            seen.update((id(i), c) for i, c in zip(fresh, checked))
            for image in checked:
                if isinstance(image, GeneratedImage) and req.operation == "upscale":
                    await asyncio.to_thread(self._exact_size, req, image, provider.native_factor(req))
            delivered.extend(checked)
            if on_images is not None and checked:
                await on_images(checked)

        try:
            returned = await provider.run(req, user_id=user_id, concurrency=concurrency, progress=progress,
                                          on_images=arrived)
        except ProviderError as exc:  # the whole request failed: every image not yet made did
            returned, failure = [], exc
        except (Exception, SystemExit) as exc:  # a provider's bug, or an answer it could not read
            log.warning("provider %s failed unexpectedly", provider.name, exc_info=True)
            returned = []
            failure = ProviderError(redact(f"the {provider.name} provider failed unexpectedly "
                                           f"({type(exc).__name__}: {exc})", *provider.secrets()))
        else:
            failure = MalformedResponse(f"the {provider.name} provider returned fewer images than asked for")
        # What was returned but never handed over, then an error for each image still missing.
        returned = returned if isinstance(returned, list) else []
        await arrived([i for i in returned if id(i) not in seen])
        # In the provider's order where it returned everything it handed over (arrival order else).
        ordered = [seen[id(i)] for i in returned]
        result = ordered if len(ordered) == len(delivered) else list(delivered)
        missing = expected_images(req) - len(result)
        if missing > 0:
            await arrived([failure] * missing)
            result += [failure] * missing
        return result

    @staticmethod
    def _exact_size(req: ImageRequest, image: GeneratedImage, native: float) -> None:
        """Honour --width/--factor exactly, whatever size the provider returned."""
        in_w, in_h = size_of(req.image)
        tw, th = target_size(in_w, in_h, req, native)
        w, h = size_of(image.data)  # decoded whole when it arrived
        if (w, h) == (tw, th):
            return
        how = "down" if w * h > tw * th else "up"
        image.data = resize(image.data, tw, th, image.format)
        image.notes.append(f"the provider returned {w}x{h}; scaled {how} to {tw}x{th} (LANCZOS) as asked")

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


def expected_images(req: ImageRequest) -> int:
    """How many images a request asks for: one entry each in what ``run`` returns."""
    return req.count if req.operation != "upscale" else 1


def _checked(provider: Provider, item: Any) -> GeneratedImage | ProviderError:
    """One entry a provider handed over, made safe for the pipeline: an error stays an error
    (any other exception becomes one), an image must carry bytes, and an informative seed
    outside 0..2**32-1 is dropped rather than breaking the history."""
    if isinstance(item, ProviderError):
        return item
    if isinstance(item, BaseException):
        return ProviderError(redact(f"the {provider.name} provider failed ({type(item).__name__}: {item})",
                                    *provider.secrets()))
    if not isinstance(item, GeneratedImage) or not isinstance(item.data, (bytes, bytearray)):
        what = type(item.data if isinstance(item, GeneratedImage) else item).__name__
        return MalformedResponse(f"the {provider.name} provider handed over {what} instead of image bytes")
    item.data = bytes(item.data)
    item.provider = item.provider or provider.name
    if item.seed is not None:
        item.seed = seed_or_none(item.seed)
    return item


def _operations(name: str) -> tuple[str, ...]:
    try:
        return registry.load(name).operations
    except AbbyError:
        return ()  # a broken plugin cannot do anything


class _LazyConfigs(Mapping):
    """Provider settings read from ``Settings`` only for the providers actually used, so a
    broken table of an unused plugin does not stop the others."""

    def __init__(self, settings, names: set[str]):
        self._settings, self._names = settings, names

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self._settings.provider_config(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
