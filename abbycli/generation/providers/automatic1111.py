"""AUTOMATIC1111 / Forge: the stable-diffusion-webui's own API, served with its ``--api`` flag.

One request per operation: ``POST /sdapi/v1/txt2img`` (``--count`` is its ``batch_size``),
``/sdapi/v1/img2img`` and ``/sdapi/v1/extra-single-image``, JSON in and base64 images out.
While a request runs, ``GET /sdapi/v1/progress`` is polled for the progress line; the
poller sleeps between polls and is cancelled as soon as the request ends, however it ends.

What the server really did is read from its answer, not assumed: the seeds and the model
come from the ``info`` JSON string, and only the images from ``index_of_first_image`` on
(a returned grid comes first; scripts such as ControlNet append their maps after the batch)
are handed back. HTTP failures become the package's exceptions in ``_error_for`` only.

A generation POST is never sent twice for a slow answer: a GPU job that ran out of time may
still be running, and a second one would queue behind it. Only failures to connect are retried.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
from typing import TYPE_CHECKING, Any

from ...config import Bounded, Key, http_url, non_empty, number_text
from ...errors import (ApiRejected, AuthError, ConfigError, InvalidInput, InvalidRequest, MalformedResponse,
                       ModelNotFound, PayloadTooLarge, ProviderError, ProviderUnavailable, RateLimited)
from ...secrets import MASK, redact
from ...storage.formats import sniff_format
from ..http import (MAX_SEED, b64_image, json_body, logger, request, retry_after, retrying, seed_or_none,
                    short_text)
from ..imaging import inspect, resize, size_of
from ..provider import Option, Provider
from ..request import (GeneratedImage, ImageRequest, check_count, check_prompt, check_upscale_size, choice,
                       in_range, num, refuse)

if TYPE_CHECKING:
    import httpx

    from ..http import Progress

NAME = "automatic1111"
DEFAULT_HOST = "http://127.0.0.1:7860"
WHERE = "AUTOMATIC1111"
API_HINT = "start the WebUI with --api (or set providers.automatic1111.api_host / A1111_API_HOST)"
AUTH_HELP = ("set providers.automatic1111.username and password (A1111_USERNAME, A1111_PASSWORD) to a pair "
             "from the WebUI's --api-auth")
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# The SDXL training sizes, by aspect ratio. --aspect picks one and scales it to the area of the
# configured width x height (512x512 halves every side), so a 1.5 model and an SDXL model
# each get sizes they were trained near.
ASPECTS = {"21:9": (1536, 640), "16:9": (1344, 768), "3:2": (1216, 832), "5:4": (1152, 896), "1:1": (1024, 1024),
           "4:5": (896, 1152), "2:3": (832, 1216), "9:16": (768, 1344), "9:21": (640, 1536)}
SIDE = (64, 4096)  # pixels; the model works on 8-pixel latent blocks
MAX_PROMPT = 20_000
DEFAULT_STRENGTH = 0.75  # the WebUI's own img2img default

# Failures to connect are retried briefly (the WebUI may be restarting); the budget is short
# so that a request that failed after a long GPU run is never sent again.
RETRY = {"attempts": 3, "timeout": 20.0, "wait_initial": 1.0, "wait_max": 8.0}
POLL_INTERVAL = 1.0  # seconds between progress polls
POLL_TIMEOUT = 5.0  # a progress poll that takes longer is skipped, not waited for

log = logger(NAME)


# --- option values: text from the command line, or typed values from a bot ------------------
def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _number(low: float, high: float, whole: bool = False):
    def parse(value: Any) -> int | float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            number = value if isinstance(value, (int, float)) else number_text(str(value).strip())
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
        if whole and not float(number).is_integer():
            raise ValueError(f"must be a whole number, got {value!r}")
        if not (math.isfinite(number) and low <= number <= high):
            raise ValueError(f"must be between {num(low)} and {num(high)}, got {value!r}")
        return int(number) if whole else float(number)

    return parse


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty name")
    return value.strip()


# Every option is a field of the WebUI's request document (clip_skip goes in override_settings).
OPTIONS = {
    "sampler_name": Option(_text, "Sampler, e.g. 'Euler a', 'DPM++ 2M' (the WebUI's /sdapi/v1/samplers)."),
    "scheduler": Option(_text, "Scheduler, e.g. Automatic, Karras (WebUI 1.9 and later)."),
    "restore_faces": Option(_bool, "Run the face restorer on the result (true/false)."),
    "tiling": Option(_bool, "Make a seamlessly tiling image (true/false)."),
    "clip_skip": Option(_number(1, 12, whole=True), "Skip the last CLIP layers, 1-12 (override_settings)."),
    "enable_hr": Option(_bool, "Hires fix: generate, upscale, then refine (true/false)."),
    "hr_scale": Option(_number(1, 4), "Hires fix upscale factor, 1-4 (needs enable_hr)."),
    "hr_upscaler": Option(_text, "Hires fix upscaler, e.g. Latent, 'R-ESRGAN 4x+' (needs enable_hr)."),
    "hr_second_pass_steps": Option(_number(0, 150, whole=True), "Hires fix steps, 0 = as many as --steps "
                                                                "(needs enable_hr)."),
    "denoising_strength": Option(_number(0, 1), "Hires fix denoising, 0-1 (needs enable_hr; img2img uses "
                                                "--strength)."),
    "upscaler_2": Option(_text, "A second upscaler blended over the first (upscale)."),
    "extras_upscaler_2_visibility": Option(_number(0, 1), "How much of upscaler_2 shows, 0-1 (upscale)."),
    "gfpgan_visibility": Option(_number(0, 1), "GFPGAN face restoration strength, 0-1 (upscale)."),
    "codeformer_visibility": Option(_number(0, 1), "CodeFormer face restoration strength, 0-1 (upscale)."),
    "codeformer_weight": Option(_number(0, 1), "CodeFormer weight, 0 = strongest effect, 1 = weakest (upscale)."),
}
GENERATE_OPTIONS = ("sampler_name", "scheduler", "restore_faces", "tiling", "clip_skip")
HIRES_OPTIONS = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "denoising_strength")
ALLOWED = {
    "text-to-image": GENERATE_OPTIONS + ("enable_hr",) + HIRES_OPTIONS,
    "image-to-image": GENERATE_OPTIONS,
    "upscale": ("upscaler_2", "extras_upscaler_2_visibility", "gfpgan_visibility", "codeformer_visibility",
                "codeformer_weight"),
}


# --- settings checks ------------------------------------------------------------------------------
def _username(value: Any) -> str:
    value = non_empty(value)
    if ":" in value:
        raise ValueError("must not contain ':' (HTTP Basic separates the user name from the password with it)")
    return value


def _password(value: Any) -> str:
    return non_empty(value)  # its messages never quote it


def _side(value: Any) -> int:
    value = Bounded(*SIDE, "pixels", whole=True)(value)
    if value % 8:
        raise ValueError(f"must be a multiple of 8, got {value}")
    return value


# --- sizes ------------------------------------------------------------------------------------------
def _round8(x: float) -> int:
    return min(SIDE[1], max(SIDE[0], int(round(x / 8)) * 8))


def aspect_size(aspect: str, width: int, height: int) -> tuple[int, int]:
    """The size --aspect means: the SDXL size for that ratio at the area of width x height."""
    w, h = ASPECTS[aspect]
    scale = math.sqrt(width * height) / 1024
    return _round8(w * scale), _round8(h * scale)


def ratio_size(in_w: int, in_h: int, width: int, height: int) -> tuple[int, int]:
    """An input image's aspect ratio at the area of width x height (img2img works at the model's
    size, not the input's: a 12-megapixel photo would not fit in the GPU)."""
    area = width * height
    w = math.sqrt(area * in_w / in_h)
    return _round8(w), _round8(area / w)


class Automatic1111Provider(Provider):
    """A local (or LAN) AUTOMATIC1111 or Forge WebUI started with --api."""

    name = NAME
    title = "AUTOMATIC1111 / Forge WebUI"
    operations = ("text-to-image", "image-to-image", "upscale")
    options = OPTIONS
    settings = (
        Key("providers.automatic1111.api_host", http_url, DEFAULT_HOST,
            "Base URL of the WebUI (started with --api).", env="A1111_API_HOST"),
        Key("providers.automatic1111.username", _username, None,
            "User name for HTTP Basic, when the WebUI runs with --api-auth USER:PASSWORD.", env="A1111_USERNAME"),
        Key("providers.automatic1111.password", _password, None,
            "Password for HTTP Basic. Prefer the A1111_PASSWORD environment variable.", env="A1111_PASSWORD",
            secret=True),
        Key("providers.automatic1111.timeout", Bounded(1, 1800, "seconds"), 600,
            "Seconds to wait for one request (a whole batch) to finish. At most 30 minutes: a\n"
            "reservation is reclaimed as abandoned after an hour.", from_text=number_text),
        Key("providers.automatic1111.max_batch_size", Bounded(1, 10, whole=True), 4,
            "Most images one request may ask for (--count): they are made together, in GPU memory.",
            from_text=number_text),
        Key("providers.automatic1111.model", non_empty, None,
            "Checkpoint to use (its title, name or hash; `abby providers` lists them when the WebUI\n"
            "is up). Default: whichever the WebUI has loaded."),
        Key("providers.automatic1111.upscaler", non_empty, "R-ESRGAN 4x+",
            "Upscaler for `abby upscale` (the WebUI's /sdapi/v1/upscalers; --model overrides it)."),
        Key("providers.automatic1111.sampler", non_empty, "Euler a", "Default sampler (--option sampler_name)."),
        Key("providers.automatic1111.scheduler", non_empty, None,
            "Default scheduler (--option scheduler). Default: the WebUI's choice (Automatic)."),
        Key("providers.automatic1111.steps", Bounded(1, 150, whole=True), 20, "Default --steps.",
            from_text=number_text),
        Key("providers.automatic1111.cfg_scale", Bounded(1, 30), 7, "Default --cfg-scale.", from_text=number_text),
        Key("providers.automatic1111.width", _side, 512,
            "Default width: 512 for SD 1.5 checkpoints, 1024 for SDXL. --aspect and img2img keep this area.",
            from_text=number_text),
        Key("providers.automatic1111.height", _side, 512, "Default height.", from_text=number_text),
    )

    def __init__(self, config, *, transport=None):
        super().__init__(config, transport=transport)
        self.host = (self.config.get("api_host") or DEFAULT_HOST).rstrip("/")
        self._client: httpx.AsyncClient | None = None
        self._checkpoints: list[dict[str, Any]] | None = None

    # --- describing itself ------------------------------------------------------------------
    def default_model(self, operation: str) -> str | None:
        if operation == "upscale":
            return self.config.get("upscaler")
        return self.config.get("model")

    def configured(self) -> tuple[bool, str]:
        user, password = self.config.get("username"), self.config.get("password")
        if bool(user) != bool(password):
            return False, self._half_auth()
        return True, f"WebUI at {self.host}" + (f" (HTTP Basic as {user})" if user else "")

    def _half_auth(self) -> str:
        have, missing = ("username", "password") if self.config.get("username") else ("password", "username")
        return f"providers.automatic1111.{have} is set but {missing} is not: {AUTH_HELP}"

    def _auth(self) -> tuple[str, str] | None:
        user, password = self.config.get("username"), self.config.get("password")
        return (user, password) if user and password else None

    def secrets(self) -> tuple[str, ...]:
        """What must never be shown: the password, and the Basic token made from it."""
        auth = self._auth()
        if auth is None:
            return ()
        return auth[1], base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()

    # --- a request's life -------------------------------------------------------------------
    def prepare(self, req: ImageRequest) -> ImageRequest:
        ok, why = self.configured()
        if not ok:
            raise ConfigError(why)
        options = self.parse_options(req, ALLOWED[req.operation])
        choice("output format", req.output_format, tuple(MIME), WHERE)
        if req.operation == "upscale":
            return self._prepare_upscale(req)
        check_prompt(req, MAX_PROMPT, WHERE)
        check_count(req, int(self.config["max_batch_size"]), "this WebUI (providers.automatic1111.max_batch_size)")
        refuse("--style", req.style_preset, WHERE, "write the style into the prompt")
        for flag, value in (("--mode", req.mode), ("--factor", req.factor), ("--creativity", req.creativity)):
            refuse(flag, value, f"{WHERE} {req.operation}")
        in_range("seed", req.seed, 0, MAX_SEED, WHERE)
        in_range("steps", req.steps, 1, 150, WHERE)
        in_range("cfg scale", req.cfg_scale, 1, 30, WHERE)
        hires = [k for k in HIRES_OPTIONS if k in options]
        if hires and not options.get("enable_hr"):
            raise InvalidInput(f"--option {hires[0]} needs --option enable_hr=true (it sets up the hires fix)")
        changes: dict[str, Any] = {"model": req.model or self.config.get("model"),
                                   "steps": req.steps or int(self.config["steps"]),
                                   "cfg_scale": req.cfg_scale if req.cfg_scale is not None else self.config["cfg_scale"]}
        if req.operation == "text-to-image":
            refuse("--strength", req.strength, f"{WHERE} text-to-image", "use --option denoising_strength with "
                   "enable_hr=true for the hires fix")
            changes["width"], changes["height"] = self._size(req)
        else:
            refuse("--width", req.width, f"{WHERE} image-to-image", "the size follows the input image")
            refuse("--height", req.height, f"{WHERE} image-to-image", "the size follows the input image")
            in_range("strength", req.strength, 0, 1, WHERE)
            changes["strength"] = req.strength if req.strength is not None else DEFAULT_STRENGTH
        return req.with_(**changes)

    def _size(self, req: ImageRequest) -> tuple[int, int]:
        width, height = int(self.config["width"]), int(self.config["height"])
        if req.aspect_ratio is not None:
            if req.width is not None or req.height is not None:
                raise InvalidInput("give --aspect or --width/--height, not both")
            choice("aspect ratio", req.aspect_ratio, tuple(ASPECTS), WHERE)
            return aspect_size(req.aspect_ratio, width, height)
        for name, value in (("width", req.width), ("height", req.height)):
            if value is not None and not (SIDE[0] <= value <= SIDE[1] and value % 8 == 0):
                raise InvalidInput(f"{name} must be a multiple of 8 from {SIDE[0]} to {SIDE[1]} for {WHERE} "
                                   f"(the model works in 8-pixel blocks), got {value}")
        return req.width or width, req.height or height

    def _prepare_upscale(self, req: ImageRequest) -> ImageRequest:
        check_upscale_size(req)
        for flag, value in (("--prompt", req.prompt or None), ("--negative", req.negative_prompt),
                            ("--seed", req.seed), ("--style", req.style_preset), ("--creativity", req.creativity)):
            refuse(flag, value, f"an {WHERE} upscale")
        refuse("--mode", req.mode, f"an {WHERE} upscale", "choose the upscaler with --model or "
               "providers.automatic1111.upscaler")
        return req.with_(model=req.model or self.config["upscaler"])

    def native_factor(self, req: ImageRequest) -> float:
        return 2.0  # what abby asks for when neither --width nor --factor is given

    # --- the requests ---------------------------------------------------------------------------
    def plan(self, req: ImageRequest) -> tuple[str, dict[str, Any]]:
        """The path and JSON body for a prepared request."""
        options = self.parse_options(req, ALLOWED[req.operation])
        if req.operation == "upscale":
            return "/sdapi/v1/extra-single-image", self._upscale_body(req, options)
        body: dict[str, Any] = {
            "prompt": req.prompt, "seed": req.seed if req.seed is not None else -1,  # -1: the WebUI picks one (read back from info)
            "sampler_name": options.pop("sampler_name", self.config.get("sampler")),
            "batch_size": req.count, "n_iter": 1, "steps": req.steps, "cfg_scale": req.cfg_scale,
        }
        if req.negative_prompt:
            body["negative_prompt"] = req.negative_prompt
        scheduler = options.pop("scheduler", self.config.get("scheduler"))
        if scheduler:
            body["scheduler"] = scheduler
        overrides: dict[str, Any] = {}
        if req.model:
            overrides["sd_model_checkpoint"] = req.model
        if "clip_skip" in options:
            overrides["CLIP_stop_at_last_layers"] = options.pop("clip_skip")
        if overrides:
            body["override_settings"] = overrides
        if req.operation == "image-to-image":
            w, h = size_of(req.image)
            body["width"], body["height"] = ratio_size(w, h, int(self.config["width"]), int(self.config["height"]))
            body["denoising_strength"] = req.strength
            body["init_images"] = [base64.b64encode(req.image).decode("ascii")]
            return "/sdapi/v1/img2img", body | options
        body["width"], body["height"] = req.width, req.height
        return "/sdapi/v1/txt2img", body | options

    def _upscale_body(self, req: ImageRequest, options: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"upscaler_1": req.model}
        if req.width is not None:
            from .local import target_size

            w, h = size_of(req.image)
            # Mode 1 scales to cover the box and crops the rounding: exactly width x height.
            body |= {"resize_mode": 1, "upscaling_resize_w": req.width,
                     "upscaling_resize_h": target_size(w, h, req, 2.0)[1], "upscaling_crop": True}
        else:
            body |= {"resize_mode": 0, "upscaling_resize": req.factor or self.native_factor(req)}
        return body | options | {"image": base64.b64encode(req.image).decode("ascii")}

    def _headers(self, masked: bool = False) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._auth() is not None:
            headers["Authorization"] = f"Basic {MASK}" if masked else self._basic()
        return headers

    def _basic(self) -> str:
        user, password = self._auth()  # type: ignore[misc]
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    def describe(self, req: ImageRequest) -> list[dict[str, Any]]:
        path, body = self.plan(req)
        shown = dict(body)
        if "init_images" in shown:
            shown["init_images"] = [f"<{len(req.image)} bytes {MIME[sniff_format(req.image)]}, base64>"]
        if "image" in shown:
            shown["image"] = f"<{len(req.image)} bytes {MIME[sniff_format(req.image)]}, base64>"
        out = []
        if req.operation != "upscale" and req.model:
            out.append({"method": "GET", "url": self.host + "/sdapi/v1/sd-models", "headers": self._headers(True)})
        return out + [{"method": "POST", "url": self.host + path, "headers": self._headers(True), "json": shown}]

    # --- sending ------------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        import httpx

        if self._client is None:
            timeout = float(self.config["timeout"])
            # The read time-out is a little longer than abby's own, so abby's fires first and says why.
            self._client = httpx.AsyncClient(
                base_url=self.host, transport=self.transport,
                timeout=httpx.Timeout(timeout + 5, connect=min(15.0, timeout)),
                limits=httpx.Limits(max_connections=4, max_keepalive_connections=4))
        return self._client

    async def _exchange(self, method: str, path: str, *, timeout: float | None = None, retry: bool = True,
                        **kwargs: Any) -> httpx.Response:
        """One HTTP exchange, its failures mapped; failures to connect are retried briefly
        (unless ``retry`` is False: a progress poll is simply skipped, and never logged)."""
        async for attempt in retrying(f"{method} {path}", log, **(RETRY if retry else RETRY | {"attempts": 1})):
            with attempt:
                try:
                    async with asyncio.timeout(timeout):
                        response = await request(self._http(), method, path, host=self.host,
                                                 secrets=self.secrets(), headers=self._headers(), **kwargs)
                except TimeoutError:
                    # Not retried: the GPU may still be working on it.
                    raise ProviderError(f"the WebUI at {self.host} did not finish within {num(timeout)} s "
                                        "(providers.automatic1111.timeout); it may still be working on the "
                                        "request") from None
                except ProviderUnavailable as exc:
                    raise ProviderUnavailable(f"{exc}; {API_HINT}") from None
                if response.status_code >= 400:
                    raise _error_for(response, self.host, self._auth() is not None, self.secrets())
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def checkpoints(self) -> list[dict[str, Any]]:
        """The WebUI's checkpoints (``GET /sdapi/v1/sd-models``), read once per provider."""
        if self._checkpoints is None:
            items = json_body(await self._exchange("GET", "/sdapi/v1/sd-models", timeout=60.0))
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise MalformedResponse("the WebUI's /sdapi/v1/sd-models answer is not a list of models")
            self._checkpoints = items
        return self._checkpoints

    async def list_models(self) -> list[str]:
        """The checkpoint titles the WebUI offers, for listings (``--model`` takes these)."""
        return [str(i.get("title") or i.get("model_name")) for i in await self.checkpoints()]

    async def _check_model(self, model: str) -> None:
        """The WebUI loads its first checkpoint, saying nothing, for a name it does not know:
        abby refuses such a name instead, before the GPU spends a second on the wrong model."""
        items = await self.checkpoints()
        if any(model in (i.get("title"), i.get("model_name"), i.get("hash"), i.get("sha256")) for i in items):
            return
        names = [str(i.get("model_name") or i.get("title")) for i in items]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ModelNotFound(f"the WebUI at {self.host} has no checkpoint {model!r}; it has: {shown or 'none'}")

    async def _watch(self, progress: Progress) -> None:
        """Feed the progress line until cancelled. A failed poll is skipped: progress is only a display."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                response = await self._exchange("GET", "/sdapi/v1/progress", timeout=POLL_TIMEOUT, retry=False,
                                                params={"skip_current_image": "true"})
                line = progress_line(json_body(response))
            except ProviderError as exc:
                log.debug("progress poll failed: %s", exc)
                continue
            if line:
                progress(line)

    async def run(self, req, *, user_id, concurrency, progress, on_images):
        asked = 1 if req.operation == "upscale" else req.count
        try:
            if req.model and req.operation != "upscale":
                await self._check_model(req.model)
            path, body = await asyncio.to_thread(self.plan, req)  # base64 of a large input: off the loop
            watcher = asyncio.create_task(self._watch(progress)) if progress is not None else None
            try:
                response = await self._exchange("POST", path, json=body, timeout=float(self.config["timeout"]))
            finally:
                if watcher is not None:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
            images = await asyncio.to_thread(self._images, req, json_body(response))
        except ProviderError as exc:
            images = [exc] * asked
        if on_images is not None:
            await on_images(images)
        return images

    # --- reading answers ----------------------------------------------------------------------
    def _images(self, req: ImageRequest, body: Any) -> list[GeneratedImage | ProviderError]:
        if not isinstance(body, dict):
            raise MalformedResponse("the WebUI answered with unexpected JSON")
        if req.operation == "upscale":
            return [self._image(req, b64_image(body.get("image")), None, req.model, {})]
        info = _info(body.get("info"))
        raw = body.get("images")
        if not isinstance(raw, list):
            raise MalformedResponse("the WebUI's answer has no 'images' list")
        first = info.get("index_of_first_image")
        first = first if type(first) is int and 0 <= first <= len(raw) else 0  # not a bool: true is no index
        seeds = info.get("all_seeds") if isinstance(info.get("all_seeds"), list) else []
        model = str(info.get("sd_model_name") or req.model or "unknown")
        extra = {k: info[k] for k in ("sampler_name", "scheduler", "steps", "cfg_scale", "width", "height",
                                      "sd_model_hash", "denoising_strength") if info.get(k) not in (None, "")}
        out: list[GeneratedImage | ProviderError] = []
        for i, item in enumerate(raw[first:first + req.count]):
            try:
                seed = seeds[i] if i < len(seeds) else None
                out.append(self._image(req, b64_image(item), seed, model, extra))
            except ProviderError as exc:
                out.append(exc)
        missing = req.count - len(out)
        if missing:
            out += [MalformedResponse(f"the WebUI returned {len(out)} image(s) of the {req.count} asked for")] * missing
        return out

    def _image(self, req: ImageRequest, data: bytes, seed: Any, model: str,
               extra: dict[str, Any]) -> GeneratedImage:
        fmt, w, h = inspect(data, from_provider=True)
        notes = []
        if fmt != req.output_format:
            # The WebUI encodes in its own samples_format (PNG unless changed); --format is honoured here.
            data = resize(data, w, h, req.output_format)
            notes.append(f"converted from {fmt.upper()} to {req.output_format.upper()} by abby")
        return GeneratedImage(data, req.output_format, seed_or_none(seed), "SUCCESS", model, notes=notes,
                              metadata=dict(extra))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _info(value: Any) -> dict[str, Any]:
    """The answer's ``info``: a JSON object in a string. Unreadable, it only costs the seeds:
    never a generated image."""
    try:
        info = json.loads(value) if isinstance(value, str) else value
    except (ValueError, RecursionError):  # not JSON, or absurdly deep
        return {}
    return info if isinstance(info, dict) else {}


def progress_line(body: Any) -> str | None:
    """"step 12/30, 40%, eta 8 s" from a /sdapi/v1/progress answer; None when there is nothing to say."""
    if not isinstance(body, dict):
        return None
    state = body.get("state") if isinstance(body.get("state"), dict) else {}
    if not state.get("job_count"):
        return "waiting for the WebUI"
    parts = []
    step, steps = state.get("sampling_step"), state.get("sampling_steps")
    if isinstance(step, int) and isinstance(steps, int) and steps > 0:
        parts.append(f"step {step}/{steps}")
    done = body.get("progress")
    if isinstance(done, (int, float)) and not isinstance(done, bool):
        parts.append(f"{min(100, max(0, round(done * 100)))}%")
    eta = body.get("eta_relative")
    if isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta) and eta >= 0:
        parts.append(f"eta {eta:.0f} s")
    return ", ".join(parts) or None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _detail(body: Any) -> str:
    """The readable part of a WebUI error body: FastAPI's 422 ``detail`` list as "field: message;
    ...", else its ``detail``/``errors`` text."""
    if not isinstance(body, dict):
        return ""
    detail = body.get("detail")
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = [str(p) for p in item.get("loc") or [] if p != "body"]
                parts.append(f"{'.'.join(loc)}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    errors = body.get("errors")
    return str(errors or detail or "")


def _error_for(response: httpx.Response, host: str, with_auth: bool, secrets: tuple[str, ...]) -> ProviderError:
    """Map an HTTP error to the package's exceptions: the one place this happens. Text from the
    server is scrubbed of the password and Basic token, and made one line."""
    status = response.status_code
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON, or absurdly deep
        body = None
    detail = _one_line(redact(_detail(body), *secrets)) if isinstance(body, dict) else short_text(response, *secrets)
    suffix = f": {detail}" if detail else ""
    if status == 401:
        why = "refused the user name and password" if with_auth else "needs a user name and password (--api-auth)"
        return AuthError(f"the WebUI at {host} {why} (401); {AUTH_HELP}", status=status)
    if status == 404 and (not isinstance(body, dict) or body.get("detail") == "Not Found"):
        return ApiRejected(f"the WebUI at {host} does not serve the API (404): {API_HINT}", status=status)
    if status == 404 and "model" in detail.lower():
        return ModelNotFound(f"the WebUI refused the request (404){suffix}", status=status)
    if status in (400, 404, 422):
        return InvalidRequest(f"the WebUI refused the request ({status}){suffix}", status=status)
    if status == 413:
        return PayloadTooLarge(f"the request is larger than the WebUI accepts (413){suffix}", status=status)
    if status == 429:
        return RateLimited(f"the WebUI is rate-limiting requests (429){suffix}", status=status,
                           retry_after=retry_after(response))
    if status >= 500 and isinstance(body, dict) and (body.get("error") or body.get("errors")):
        # The WebUI's own failure while running the job: the same request would fail again.
        name = str(body.get("error") or "")
        if "outofmemory" in name.lower() or "out of memory" in detail.lower():
            return ProviderError(f"the WebUI ran out of GPU memory ({status}); ask for fewer images (--count), "
                                 "a smaller size, or no hires fix, or free the GPU", status=status)
        return ProviderError(f"the WebUI failed ({status}{', ' + name if name else ''}){suffix}", status=status)
    if status >= 500:
        return ProviderUnavailable(f"the WebUI at {host} had an internal error ({status}){suffix}", status=status,
                                   retry_after=retry_after(response))
    return ApiRejected(f"the WebUI refused the request ({status}){suffix}", status=status)
