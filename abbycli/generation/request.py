"""Provider-neutral requests and results, and the small checks every provider uses.

What each backend accepts (models, sizes, ranges) is its provider's business
(``generation/providers/``); the helpers here word the refusals the same way
for all of them, so a typo never costs a credit and always reads alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..errors import InvalidInput


@dataclass(frozen=True)
class ImageRequest:
    operation: str  # "text-to-image" | "image-to-image" | "upscale"
    prompt: str | None = None
    model: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    aspect_ratio: str | None = None
    width: int | None = None
    height: int | None = None
    style_preset: str | None = None
    output_format: str = "png"
    count: int = 1
    strength: float | None = None
    image: bytes | None = field(default=None, repr=False)
    image_name: str | None = None  # how messages name the input image (its file name); "the input image" if None
    mode: str | None = None  # upscale mode
    factor: float | None = None  # upscale factor
    creativity: float | None = None
    cfg_scale: float | None = None
    steps: int | None = None
    provider: str | None = None  # which provider runs it (None: the configured default)
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)  # --option KEY=VALUE extras
    checked: bool = field(default=False, repr=False, compare=False)  # set by ImageGenerator.prepare

    def with_(self, **changes: Any) -> "ImageRequest":
        return replace(self, **changes)


@dataclass
class GeneratedImage:
    data: bytes = field(repr=False)
    format: str
    seed: int | None
    finish_reason: str  # SUCCESS | CONTENT_FILTERED
    model: str
    request_id: str | None = None
    notes: list[str] = field(default_factory=list)  # what abby changed on the way (resizes)
    provider: str = ""  # the provider that made it (set by the generator)
    metadata: dict[str, Any] = field(default_factory=dict)  # what the provider adds to the stored metadata

    @property
    def filtered(self) -> bool:
        return self.finish_reason == "CONTENT_FILTERED"


def choice(name: str, value: Any, allowed: tuple, where: str) -> None:
    if value is not None and value not in allowed:
        raise InvalidInput(f"{name} {value!r} is not accepted by {where}; choose one of: {', '.join(map(str, allowed))}")


def num(value: float) -> str:
    """A number as typed: whole numbers in full (4294967295, never 4.29497e+09), others short."""
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return f"{value:g}"


def in_range(name: str, value: float | None, low: float, high: float, where: str) -> None:
    if value is not None and not (low <= value <= high):
        raise InvalidInput(f"{name} must be between {num(low)} and {num(high)} for {where}, got {num(value)}")


def refuse(name: str, value: Any, where: str, hint: str = "") -> None:
    if value is not None:
        raise InvalidInput(f"{name} is not accepted by {where}" + (f"; {hint}" if hint else ""))


def check_prompt(req: "ImageRequest", max_chars: int, where: str = "the API") -> None:
    if not req.prompt or not req.prompt.strip():
        raise InvalidInput("the prompt is empty")
    if len(req.prompt) > max_chars:
        raise InvalidInput(f"the prompt is {len(req.prompt)} characters; {where} takes at most {max_chars}")


def check_count(req: "ImageRequest", maximum: int = 10, where: str = "") -> None:
    if not isinstance(req.count, int) or not 1 <= req.count <= maximum:
        raise InvalidInput(f"count must be between 1 and {maximum}{' for ' + where if where else ''}, got {req.count}")


def check_upscale_size(req: "ImageRequest") -> None:
    """--width and --factor, which every upscale provider takes the same way."""
    if req.width is not None and req.factor is not None:
        raise InvalidInput("give --width or --factor, not both")
    if req.width is not None and req.width < 1:
        raise InvalidInput(f"width must be a positive number of pixels, got {req.width}")
    if req.factor is not None and not 1 < req.factor <= 16:
        raise InvalidInput(f"factor must be above 1 and at most 16, got {req.factor:g}")
