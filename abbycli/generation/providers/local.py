"""The local provider: upscaling with Pillow. No key, no network, no credits, no daily slot."""

from __future__ import annotations

import asyncio
from typing import Any

from ...errors import InvalidInput
from ..imaging import resize, size_of
from ..provider import Provider
from ..request import GeneratedImage, ImageRequest, check_upscale_size, choice, refuse

LOCAL_FACTOR = 2.0  # neither --width nor --factor: twice the size
MODEL = "local-lanczos"


def target_size(width: int, height: int, req: ImageRequest, default_factor: float) -> tuple[int, int]:
    """The exact output size an upscale was asked for, keeping the aspect ratio."""
    if req.width is not None:
        return req.width, max(1, round(height * req.width / width))
    factor = req.factor or default_factor
    return max(1, round(width * factor)), max(1, round(height * factor))


class LocalProvider(Provider):
    name = "local"
    title = "local upscale (Pillow LANCZOS)"
    operations = ("upscale",)

    def models(self, operation: str) -> tuple[str, ...]:
        return (MODEL,)

    def default_model(self, operation: str) -> str | None:
        return MODEL

    def configured(self) -> tuple[bool, str]:
        return True, "offline, nothing to configure"

    def prepare(self, req: ImageRequest) -> ImageRequest:
        self.parse_options(req)
        check_upscale_size(req)
        choice("output format", req.output_format, ("png", "jpeg", "webp"), "a local upscale")
        for flag, value in (("--prompt", req.prompt or None), ("--negative", req.negative_prompt),
                            ("--seed", req.seed), ("--style", req.style_preset), ("--creativity", req.creativity)):
            refuse(flag, value, "a local upscale")
        if req.model not in (None, MODEL):
            raise InvalidInput(f"model {req.model!r} is not a local upscale; the local provider has only {MODEL}")
        return req.with_(model=MODEL, mode="local")

    def is_free(self, req: ImageRequest) -> bool:
        return True

    def native_factor(self, req: ImageRequest) -> float:
        return LOCAL_FACTOR

    def describe(self, req: ImageRequest) -> list[dict[str, Any]]:
        return []  # nothing is sent anywhere

    async def run(self, req, *, user_id, concurrency, progress, on_images):
        images: list = [await asyncio.to_thread(upscale_local, req)]
        if on_images is not None:
            await on_images(images)
        return images


def upscale_local(req: ImageRequest) -> GeneratedImage:
    """Pillow LANCZOS resampling to the size asked for (twice the size by default)."""
    w, h = size_of(req.image)  # already decoded whole when the request was prepared
    tw, th = target_size(w, h, req, LOCAL_FACTOR)
    data = resize(req.image, tw, th, req.output_format)
    return GeneratedImage(data, req.output_format, None, "SUCCESS", MODEL,
                          notes=[f"resized locally from {w}x{h} to {tw}x{th} (LANCZOS)"])
