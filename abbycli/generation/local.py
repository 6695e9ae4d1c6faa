"""Offline operations: no key, no network, no credits."""

from __future__ import annotations

from .imaging import resize, size_of
from .request import GeneratedImage, ImageRequest

LOCAL_FACTOR = 2.0  # a local upscale with neither --width nor --factor doubles the size


def target_size(width: int, height: int, req: ImageRequest, default_factor: float) -> tuple[int, int]:
    """The exact output size an upscale was asked for, keeping the aspect ratio."""
    if req.width is not None:
        return req.width, max(1, round(height * req.width / width))
    factor = req.factor or default_factor
    return max(1, round(width * factor)), max(1, round(height * factor))


def upscale_local(req: ImageRequest) -> GeneratedImage:
    """Pillow LANCZOS resampling to the size asked for (twice the size by default)."""
    w, h = size_of(req.image)  # prepare() has already decoded it whole
    tw, th = target_size(w, h, req, LOCAL_FACTOR)
    data = resize(req.image, tw, th, req.output_format)
    return GeneratedImage(data, req.output_format, None, "SUCCESS", "local-lanczos",
                          notes=[f"resized locally from {w}x{h} to {tw}x{th} (LANCZOS)"])
