"""What each Stability AI endpoint accepts, checked before any request is sent.

The rules follow Stability's published OpenAPI documents for each endpoint
(enums, ranges, image size rules).
"""

from __future__ import annotations

import re

from ...errors import InvalidInput
from ..request import ImageRequest, check_upscale_size, choice, in_range, refuse

STYLE_PRESETS = (
    "enhance", "anime", "photographic", "digital-art", "comic-book", "fantasy-art", "line-art", "analog-film",
    "neon-punk", "isometric", "low-poly", "origami", "modeling-compound", "cinematic", "3d-model", "pixel-art",
    "tile-texture",
)
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21")
# sd3.5-flash is accepted by the live API although the February 2025 spec's enum lacks it.
SD3_MODELS = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash", "sd3-large", "sd3-large-turbo",
              "sd3-medium")
V2_MODELS = ("core", "ultra") + SD3_MODELS
SDXL_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (768, 1344), (1536, 640), (640, 1536))
# "local" hands the request to the local provider (Pillow, offline), as before providers existed.
UPSCALE_MODES = ("fast", "conservative", "creative", "esrgan", "local")
ESRGAN_ENGINE = "esrgan-v1-x2plus"
MAX_SEED_V2 = 4_294_967_294
MAX_SEED_V1 = 4_294_967_295
_V1_ENGINE = re.compile(r"^[a-z0-9][a-z0-9.-]*-v\d[a-z0-9-]*$")

# Output formats each endpoint can return.
FORMATS = {"core": ("png", "jpeg", "webp"), "ultra": ("png", "jpeg", "webp"), "sd3": ("png", "jpeg"),
           "v1": ("png",), "upscale": ("png", "jpeg", "webp"), "local": ("png", "jpeg", "webp")}

# Input image rules for each endpoint: (min side, max side, min pixels, max pixels, max aspect).
IMAGE_RULES = {
    "ultra": (64, 16_384, 4_096, None, None),
    "sd3": (64, None, None, None, None),
    "fast": (32, 1_536, 1_024, 1_048_576, None),
    "conservative": (64, None, 4_096, 9_437_184, 2.5),
    "creative": (64, None, 4_096, 1_048_576, None),
    "esrgan": (None, None, None, 4_194_304, None),
}


def family(model: str) -> str:
    """Which API a model name belongs to: core, ultra, sd3 or v1."""
    if model in ("core", "ultra"):
        return model
    if model in SD3_MODELS:
        return "sd3"
    if _V1_ENGINE.match(model):
        return "v1"
    raise InvalidInput(
        f"unknown model {model!r}: use core, ultra, {', '.join(SD3_MODELS[:4])} or a v1 engine id "
        "such as stable-diffusion-xl-1024-v1-0"
    )


def validate(req: ImageRequest) -> ImageRequest:
    """Check every value against the endpoint it will go to; raise InvalidInput before any credit is spent."""
    if req.operation == "upscale":
        return _validate_upscale(req)
    if not req.prompt or not req.prompt.strip():
        raise InvalidInput("the prompt is empty")
    model = req.model
    kind = family(model)
    where = f"model {model}"
    if not isinstance(req.count, int) or req.count < 1 or req.count > 10:
        raise InvalidInput(f"count must be between 1 and 10, got {req.count}")
    choice("style", req.style_preset, STYLE_PRESETS, where)
    choice("output format", req.output_format, FORMATS[kind], where)
    if kind == "v1":
        in_range("seed", req.seed, 0, MAX_SEED_V1, where)
        if len(req.prompt) > 2000:
            raise InvalidInput(f"the prompt is {len(req.prompt)} characters; v1 engines take at most 2000")
        refuse("--aspect", req.aspect_ratio, where, "v1 engines take --width and --height")
        in_range("cfg scale", req.cfg_scale, 0, 35, where)
        if req.steps is not None and not 10 <= req.steps <= 50:
            raise InvalidInput(f"steps must be between 10 and 50 for {where}, got {req.steps}")
        in_range("strength", req.strength, 0, 1, where)
        if req.operation != "text-to-image":
            refuse("--width/--height", req.width or req.height, where, "the input image sets the size")
            return req.with_(model=model, strength=0.35 if req.strength is None else req.strength)
        default = 1024 if "stable-diffusion-xl" in model else 512
        width, height = req.width or default, req.height or default
        _check_v1_size(model, width, height)
        return req.with_(model=model, width=width, height=height)
    in_range("seed", req.seed, 0, MAX_SEED_V2, where)
    if len(req.prompt) > 10_000:
        raise InvalidInput(f"the prompt is {len(req.prompt)} characters; the API takes at most 10000")
    if req.negative_prompt and len(req.negative_prompt) > 10_000:
        raise InvalidInput("the negative prompt is longer than 10000 characters")
    refuse("--width/--height", req.width or req.height, where, "v2beta models take --aspect")
    refuse("--steps", req.steps, where)
    choice("aspect ratio", req.aspect_ratio, ASPECT_RATIOS, where)
    if model == "sd3-large-turbo" and req.negative_prompt:
        raise InvalidInput("a negative prompt is not accepted by model sd3-large-turbo")
    if kind != "sd3":
        refuse("cfg scale", req.cfg_scale, where, "only the sd3 models take it")
    in_range("cfg scale", req.cfg_scale, 1, 10, where)
    if req.operation == "image-to-image":
        if kind == "core":
            raise InvalidInput("model core does not do image-to-image; use ultra or an sd3.5 model")
        refuse("--aspect", req.aspect_ratio, f"image-to-image with {where}", "the input image sets the shape")
        strength = 0.5 if req.strength is None else req.strength
        in_range("strength", strength, 0, 1, where)
        return req.with_(model=model, strength=strength)
    refuse("--strength", req.strength, f"text-to-image with {where}")
    return req.with_(model=model)


def _check_v1_size(model: str, width: int, height: int) -> None:
    if "stable-diffusion-xl" in model:
        if (width, height) not in SDXL_SIZES:
            sizes = ", ".join(f"{w}x{h}" for w, h in SDXL_SIZES)
            raise InvalidInput(f"{width}x{height} is not an SDXL size; use one of: {sizes}")
    elif width % 64 or height % 64 or min(width, height) < 320 or max(width, height) > 1536:
        raise InvalidInput(f"{width}x{height}: sides must be multiples of 64 between 320 and 1536 for {model}")


def _validate_upscale(req: ImageRequest) -> ImageRequest:
    mode = req.mode
    choice("upscale mode", mode, UPSCALE_MODES, "upscale")
    check_upscale_size(req)
    choice("output format", req.output_format, FORMATS["upscale"], f"{mode} upscale")
    if mode in ("conservative", "creative") and not (req.prompt and req.prompt.strip()):
        raise InvalidInput(f"{mode} upscale needs a prompt (--prompt)")
    if mode in ("fast", "esrgan"):
        refuse("--prompt", req.prompt or None, f"{mode} upscale")
        refuse("--negative", req.negative_prompt, f"{mode} upscale")
        refuse("--seed", req.seed, f"{mode} upscale")
    if mode != "creative":
        refuse("--style", req.style_preset, f"{mode} upscale", "only creative upscale takes a style")
    choice("style", req.style_preset, STYLE_PRESETS, "creative upscale")
    in_range("seed", req.seed, 0, MAX_SEED_V2, f"{mode} upscale")
    if mode == "conservative":
        in_range("creativity", req.creativity, 0.2, 0.5, "conservative upscale")
    elif mode == "creative":
        in_range("creativity", req.creativity, 0.1, 0.5, "creative upscale")
    else:
        refuse("--creativity", req.creativity, f"{mode} upscale")
    model = {"fast": "fast", "conservative": "conservative", "creative": "creative", "esrgan": ESRGAN_ENGINE}[mode]
    return req.with_(model=model)


def fit_image_rules(width: int, height: int, rules: tuple) -> tuple[int, int] | None:
    """The size an input image must be resized to for an endpoint, or None if it fits as it is.

    Raises InvalidInput when no resize can help (an aspect ratio out of range).
    """
    min_side, max_side, min_px, max_px, max_aspect = rules
    if max_aspect and max(width / height, height / width) > max_aspect:
        raise InvalidInput(f"the image is {width}x{height}; this endpoint needs an aspect ratio within 1:{max_aspect:g}")
    scale = 1.0
    if max_side and max(width, height) > max_side:
        scale = min(scale, max_side / max(width, height))
    if max_px and width * height * scale * scale > max_px:
        scale = min(scale, (max_px / (width * height)) ** 0.5)
    if scale == 1.0:
        if min_side and min(width, height) < min_side:
            scale = min_side / min(width, height)
        if min_px and width * height * scale * scale < min_px:
            scale = max(scale, (min_px / (width * height)) ** 0.5)
    if scale == 1.0:
        return None
    new = (max(1, int(width * scale)), max(1, int(height * scale)))
    if max_px and new[0] * new[1] > max_px:  # rounding
        new = (new[0] - 1, new[1] - 1)
    if (min_side and min(new) < min_side) or (max_side and max(new) > max_side):
        raise InvalidInput(f"the image is {width}x{height}, which cannot be resized to fit this endpoint's size rules")
    return new


def nearest_sdxl_size(width: int, height: int) -> tuple[int, int]:
    """The SDXL size whose shape is closest to the image's."""
    ratio = width / height
    return min(SDXL_SIZES, key=lambda wh: abs(wh[0] / wh[1] - ratio))
