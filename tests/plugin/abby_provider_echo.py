"""A third-party provider as a plugin author would write it: its own package, an entry
point in the group "abbycli.providers", and nothing changed in abby. It paints a plain
image whose colour comes from its settings and options, so tests can tell them apart."""

from __future__ import annotations

import io

from abbycli.config import Key, non_empty
from abbycli.errors import ProviderUnavailable
from abbycli.generation.imaging import inspect
from abbycli.generation.provider import Option, Provider
from abbycli.generation.request import GeneratedImage, check_count, check_prompt


def _shade(value):
    shade = int(value)
    if not 0 <= shade <= 255:
        raise ValueError(f"must be between 0 and 255, got {shade}")
    return shade


class EchoProvider(Provider):
    name = "echo"
    title = "Echo (test plugin)"
    operations = ("text-to-image",)
    settings = (Key("providers.echo.color", non_empty, "red", "Colour of the images.", env="ECHO_COLOR"),)
    options = {"shade": Option(_shade, "Blue channel, 0-255.")}

    def default_model(self, operation):
        return "echo-1"

    def prepare(self, req):
        check_prompt(req, 500, "echo")
        check_count(req, 4, "echo")
        self.parse_options(req)
        return req.with_(model=req.model or "echo-1")

    def describe(self, req):
        return [{"method": "PAINT", "url": "echo://local", "headers": {}, "json": {"prompt": req.prompt}}]

    async def run(self, req, *, user_id, concurrency, progress, on_images):
        from PIL import Image

        if req.prompt == "fail":
            images = [ProviderUnavailable("the echo backend is down")] * req.count
        else:
            shade = self.parse_options(req).get("shade", 0)
            images = []
            for i in range(req.count):
                buf = io.BytesIO()
                Image.new("RGB", (32 + i, 32), self.config["color"]).save(buf, "PNG")
                data = buf.getvalue()
                inspect(data, from_provider=True)
                images.append(GeneratedImage(data, "png", i, "SUCCESS", req.model,
                                             metadata={"echo": f"{self.config['color']}/{shade}"}))
        await on_images(images)
        return images
