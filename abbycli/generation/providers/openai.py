"""OpenAI Images: ``/images/generations`` (JSON) and ``/images/edits`` (multipart).

What each model accepts (sizes, ``n``, prompt length, options) follows OpenAI's
published OpenAPI document and is checked in ``prepare``, before a request can
cost anything. Requests are planned once as plain ``Call`` objects, which
``--dry-run`` prints and ``run`` sends. Every HTTP failure becomes one of the
package's exceptions in ``_error_for`` and nowhere else; it scrubs the key (and
the key fragment OpenAI quotes back on a 401) from the message.

Any OpenAI-compatible server works by changing ``api_host``.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...config import Bounded, Key, api_key, http_url, non_empty, number_text
from ...errors import (AuthError, ConfigError, ContentFiltered, InsufficientCredits, InvalidInput, MalformedResponse,
                       ProviderError)
from ...secrets import MASK, redact
from ...storage.formats import sniff_format
from ..http import (b64_image, checked_key, gather_all, json_body, logger, request, retrying, short_text,
                    status_error)
from ..imaging import inspect, resize, size_of
from ..provider import Option, Provider
from ..request import GeneratedImage, ImageRequest, check_count, check_prompt, choice, refuse

if TYPE_CHECKING:
    import httpx

DEFAULT_HOST = "https://api.openai.com/v1"
KEY_HELP = ("set one with the OPENAI_API_KEY environment variable or "
            "`abby config set providers.openai.api_key KEY`")
log = logger("openai")

_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
GPT_SIZES = ("1024x1024", "1536x1024", "1024x1536")


@dataclass(frozen=True)
class Model:
    """What one model accepts, from the API document."""

    sizes: tuple[str, ...]
    max_n: int  # images per request
    max_prompt: int
    quality: tuple[str, ...]
    gpt: bool  # a GPT image model: output_format, background, moderation; always answers base64
    edits: bool = True  # takes /images/edits
    fidelity: bool = False  # takes input_fidelity on edits


_GPT_QUALITY = ("low", "medium", "high", "auto")
MODELS = {
    "gpt-image-1": Model(GPT_SIZES, 10, 32_000, _GPT_QUALITY, gpt=True, fidelity=True),
    "gpt-image-1-mini": Model(GPT_SIZES, 10, 32_000, _GPT_QUALITY, gpt=True),
    "gpt-image-1.5": Model(GPT_SIZES, 10, 32_000, _GPT_QUALITY, gpt=True, fidelity=True),
    "dall-e-3": Model(("1024x1024", "1792x1024", "1024x1792"), 1, 4_000, ("standard", "hd", "auto"), gpt=False,
                      edits=False),
    "dall-e-2": Model(("256x256", "512x512", "1024x1024"), 10, 1_000, ("standard", "auto"), gpt=False),
}
# Input images for an edit: dall-e-2 takes one square PNG under 4 MB, the GPT models
# PNG, WebP or JPEG under 50 MB. Decimal megabytes: the smaller reading of "MB" is the safe one.
DALLE2_MAX_INPUT = 4_000_000
GPT_MAX_INPUT = 50_000_000


def _word(value: Any) -> str:
    return non_empty(value).strip()


def _model(value: Any) -> str:
    value = _word(value)
    if value not in MODELS:
        raise ValueError(f"unknown OpenAI model {value!r}; choose one of: {', '.join(MODELS)}")
    return value


def _edit_model(value: Any) -> str:
    value = _model(value)
    if not MODELS[value].edits:
        raise ValueError(f"{value} cannot edit images; choose one of: {', '.join(m for m in MODELS if MODELS[m].edits)}")
    return value


def _compression(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be a whole number from 0 to 100, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number from 0 to 100, got {value!r}") from None
    if not 0 <= number <= 100:
        raise ValueError(f"must be a whole number from 0 to 100, got {number}")
    return number


OPTIONS = {
    "quality": Option(_word, "gpt-image-*: low, medium, high, auto; dall-e-3: standard, hd, auto; "
                             "dall-e-2: standard, auto."),
    "background": Option(_word, "GPT image models: transparent (png or webp only), opaque or auto."),
    "moderation": Option(_word, "GPT image models, text to image: low or auto."),
    "output_compression": Option(_compression, "GPT image models with jpeg or webp: 0-100 (default 100)."),
    "style": Option(_word, "dall-e-3: vivid or natural."),
    "input_fidelity": Option(_word, "image to image with gpt-image-1 and gpt-image-1.5: high or low (how closely "
                                    "faces and features of the input are kept)."),
}
# Who takes each option, for the refusal message when a request's model does not.
_TAKEN_BY = {"background": "the GPT image models", "output_compression": "the GPT image models",
             "moderation": "text to image with the GPT image models", "style": "dall-e-3",
             "input_fidelity": "image to image with gpt-image-1 and gpt-image-1.5"}


def allowed_options(model: str, operation: str) -> tuple[str, ...]:
    """The --option keys ``model`` takes for ``operation`` (the edits endpoint has no moderation)."""
    rules = MODELS[model]
    keys = ["quality"]
    if rules.gpt:
        keys += ["background", "output_compression"]
        if operation == "text-to-image":
            keys.append("moderation")
    if model == "dall-e-3":
        keys.append("style")
    if rules.fidelity and operation == "image-to-image":
        keys.append("input_fidelity")
    return tuple(keys)


def nearest_size(aspect: str, sizes: tuple[str, ...]) -> str:
    """The size whose shape is closest to ``aspect`` ("16:9"), compared on a log scale so
    that 2:1 and 1:2 are equally far from 1:1; of equally close ones, the largest."""
    w, _, h = aspect.partition(":")
    try:
        ratio = int(w) / int(h)
    except (ValueError, ZeroDivisionError):
        ratio = 0
    if ratio <= 0:
        raise InvalidInput(f"aspect ratio {aspect!r} is not WIDTH:HEIGHT in whole numbers, e.g. 16:9")

    def distance(size: str) -> tuple[float, int]:
        sw, sh = map(int, size.split("x"))
        return abs(math.log(sw / sh) - math.log(ratio)), -sw * sh  # equally close: the larger (dall-e-2)

    return min(sizes, key=distance)


@dataclass
class Call:
    """One HTTP request, fully described; the key is added only when sending."""

    path: str
    n: int  # images it asks for
    model: str
    json: dict[str, Any] | None = None
    fields: dict[str, str] = field(default_factory=dict)  # multipart text fields (edits)
    files: dict[str, tuple[str, bytes, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class OpenAIProvider(Provider):
    """OpenAI's Images API: gpt-image-1, gpt-image-1-mini, gpt-image-1.5, dall-e-3, dall-e-2."""

    name = "openai"
    title = "OpenAI Images"
    operations = ("text-to-image", "image-to-image")
    settings = (
        Key("providers.openai.api_key", api_key, None,
            "API key. Prefer the OPENAI_API_KEY environment variable.", env="OPENAI_API_KEY", secret=True),
        Key("providers.openai.api_host", http_url, DEFAULT_HOST,
            "Base URL of the API; any OpenAI-compatible server works.", env="OPENAI_BASE_URL"),
        Key("providers.openai.organization", non_empty, None,
            "Organization id sent as OpenAI-Organization (optional).", env="OPENAI_ORG_ID"),
        Key("providers.openai.project", non_empty, None,
            "Project id sent as OpenAI-Project (optional).", env="OPENAI_PROJECT_ID"),
        Key("providers.openai.model", _model, "gpt-image-1",
            "Default text-to-image model: gpt-image-1, gpt-image-1-mini, gpt-image-1.5, dall-e-3, dall-e-2."),
        Key("providers.openai.img2img_model", _edit_model, "gpt-image-1",
            "Default image-to-image model: gpt-image-1, gpt-image-1-mini, gpt-image-1.5, dall-e-2."),
        Key("providers.openai.timeout", Bounded(1, 1800, "seconds"), 300,
            "Seconds to wait for one answer (high quality images can take minutes).", from_text=number_text),
    )
    options = OPTIONS

    def __init__(self, config, *, transport=None):
        super().__init__(config, transport=transport)
        c = self.config
        self._key = checked_key(self.title, c.get("api_key"))
        self.host = (c.get("api_host") or DEFAULT_HOST).rstrip("/")
        self._timeout = float(c.get("timeout") or 300)
        self._client: httpx.AsyncClient | None = None

    # --- describing itself -------------------------------------------------------------
    def default_model(self, operation: str) -> str | None:
        return self.config.get("model" if operation == "text-to-image" else "img2img_model") or "gpt-image-1"

    def models(self, operation: str) -> tuple[str, ...]:
        return tuple(m for m, rules in MODELS.items() if operation == "text-to-image" or rules.edits)

    def configured(self) -> tuple[bool, str]:
        return (True, "API key set") if self._key else (False, f"no API key: {KEY_HELP}")

    # --- checking ----------------------------------------------------------------------
    def prepare(self, req: ImageRequest) -> ImageRequest:
        model = req.model or self.default_model(req.operation)
        if model not in MODELS:
            raise InvalidInput(f"unknown OpenAI model {model!r}; choose one of: {', '.join(self.models(req.operation))}")
        rules = MODELS[model]
        where = f"model {model}"
        if req.operation == "image-to-image" and not rules.edits:
            raise InvalidInput(f"{model} cannot edit images; use --model with one of: "
                               f"{', '.join(self.models('image-to-image'))}")
        self._refuse_foreign_flags(req)
        check_prompt(req, rules.max_prompt, where)
        check_count(req, 10)
        options = self._options(req, model)
        choice("quality", options.get("quality"), rules.quality, where)
        if rules.gpt:
            choice("output format", req.output_format, ("png", "jpeg", "webp"), where)
            choice("background", options.get("background"), ("transparent", "opaque", "auto"), where)
            if options.get("background") == "transparent" and req.output_format == "jpeg":
                raise InvalidInput("a transparent background needs --format png or webp")
            choice("moderation", options.get("moderation"), ("low", "auto"), where)
            if "output_compression" in options and req.output_format == "png":
                raise InvalidInput("--option output_compression applies to --format jpeg or webp, not png")
        elif req.output_format != "png":
            raise InvalidInput(f"{model} returns PNG images only; leave out --format or use a GPT image model")
        choice("style", options.get("style"), ("vivid", "natural"), where)
        choice("input fidelity", options.get("input_fidelity"), ("high", "low"), where)
        req = req.with_(model=model, options=options, **self._size(req, rules, where))
        if req.operation == "image-to-image":
            req = req.with_(**self._input(req, model))
        if not self._key:
            raise ConfigError(f"no OpenAI API key: {KEY_HELP}")
        return req

    @staticmethod
    def _refuse_foreign_flags(req: ImageRequest) -> None:
        """Flags of other providers that OpenAI has no parameter for."""
        where = "OpenAI"
        refuse("--seed", req.seed, where, "its images cannot be repeated from a seed")
        refuse("--negative", req.negative_prompt or None, where, "say what you want in the prompt instead")
        refuse("--style", req.style_preset, where, "for dall-e-3 use --option style=vivid or style=natural")
        refuse("--cfg-scale", req.cfg_scale, where)
        refuse("--steps", req.steps, where)
        refuse("--strength", req.strength, where, "it has no such parameter; --option input_fidelity=high "
               "(gpt-image-1, gpt-image-1.5) keeps the input's faces and features more closely")

    def _options(self, req: ImageRequest, model: str) -> dict[str, Any]:
        allowed = allowed_options(model, req.operation)
        for key in req.options or {}:
            if key in _TAKEN_BY and key not in allowed:
                raise InvalidInput(f"--option {key} is not accepted by model {model} for {req.operation} "
                                   f"(it is for {_TAKEN_BY[key]})")
        return self.parse_options(req, allowed)

    @staticmethod
    def _size(req: ImageRequest, rules: Model, where: str) -> dict[str, Any]:
        """The size to ask for, kept in width/height; none given leaves it to the API's default."""
        if (req.width is None) != (req.height is None):
            raise InvalidInput("give both --width and --height (or --aspect)")
        nearest = None if req.aspect_ratio is None else nearest_size(req.aspect_ratio, rules.sizes)
        if req.width is None:
            return {} if nearest is None else dict(zip(("width", "height"), map(int, nearest.split("x"))))
        size = f"{req.width}x{req.height}"
        if size not in rules.sizes:
            raise InvalidInput(f"{size} is not a size {where} makes; use --aspect, or --width/--height "
                               f"of one of: {', '.join(rules.sizes)}")
        if nearest not in (None, size):  # (the size an earlier prepare chose for the aspect is fine)
            raise InvalidInput("give --aspect or --width/--height, not both")
        return {}

    @staticmethod
    def _input(req: ImageRequest, model: str) -> dict[str, Any]:
        """Refuse an input image the edits endpoint would refuse; dall-e-2's is made a PNG."""
        data = req.image
        name = req.image_name or "the input image"
        if model != "dall-e-2":
            if len(data) >= GPT_MAX_INPUT:
                raise InvalidInput(f"{name} is {len(data):,} bytes; {model} takes images under 50 MB")
            return {}
        w, h = size_of(data)  # the generator has decoded it whole already
        if w != h:
            raise InvalidInput(f"dall-e-2 edits square images only, and {name} is {w}x{h}; crop it square "
                               "or use a GPT image model")
        if sniff_format(data) != "png":
            data = resize(data, w, h, "png")  # the same size: only the format changes
        if len(data) >= DALLE2_MAX_INPUT:
            raise InvalidInput(f"{name} is {len(data):,} bytes as a PNG; dall-e-2 takes a PNG under 4 MB")
        return {"image": data}

    # --- planning ----------------------------------------------------------------------
    def plan(self, req: ImageRequest) -> list[Call]:
        """The HTTP calls for a prepared request: as many images per call as the model
        takes (dall-e-3: one), so ``--count 3`` is one call for gpt-image-1, three for dall-e-3."""
        rules = MODELS[req.model]
        body: dict[str, Any] = {"model": req.model, "prompt": req.prompt}
        notes: list[str] = []
        if req.width is not None:
            body["size"] = f"{req.width}x{req.height}"
            if req.aspect_ratio is not None and _shape(body["size"]) != _shape(req.aspect_ratio):
                notes.append(f"--aspect {req.aspect_ratio} was sent as size {body['size']}, the nearest "
                             f"{req.model} makes")
        if rules.gpt:
            body["output_format"] = req.output_format
        else:
            body["response_format"] = "b64_json"  # never a URL that expires after an hour
        body |= dict(req.options)
        files: dict[str, tuple[str, bytes, str]] = {}
        if req.operation == "image-to-image":
            fmt = sniff_format(req.image)
            files["image"] = (f"image.{_EXT[fmt]}", req.image, _MIME[fmt])
        calls = []
        left = req.count
        while left:
            n = min(left, rules.max_n)
            left -= n
            if files:
                fields = {k: str(v) for k, v in (body | {"n": n}).items()}
                calls.append(Call("/images/edits", n, req.model, fields=fields, files=files, notes=notes))
            else:
                calls.append(Call("/images/generations", n, req.model, json=body | {"n": n}, notes=notes))
        return calls

    def _headers(self) -> dict[str, str]:
        if not self._key:
            raise ConfigError(f"no OpenAI API key: {KEY_HELP}")
        headers = {"Authorization": f"Bearer {self._key}"}
        if self.config.get("organization"):
            headers["OpenAI-Organization"] = self.config["organization"]
        if self.config.get("project"):
            headers["OpenAI-Project"] = self.config["project"]
        return headers

    def describe(self, req: ImageRequest) -> list[dict[str, Any]]:
        out = []
        for call in self.plan(req):
            headers = self._headers() | {"Authorization": f"Bearer {MASK}"}
            one: dict[str, Any] = {"method": "POST", "url": self.host + call.path, "headers": headers}
            if call.json is not None:
                one["json"] = call.json
            else:
                one["multipart"] = call.fields | {k: f"<{len(v[1])} bytes {v[2]}>" for k, v in call.files.items()}
            out.append(one)
        return out

    # --- sending -----------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.host, transport=self.transport,
                                             timeout=httpx.Timeout(self._timeout, connect=15.0),
                                             limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
        return self._client

    async def run(self, req, *, user_id, concurrency, progress, on_images):
        gate = asyncio.Semaphore(max(1, concurrency))  # requests on the network at once

        async def one(call: Call) -> list:
            try:
                return await self._send(call, gate)
            except ProviderError as exc:
                return [exc] * call.n

        async def arrived(images: list) -> None:
            if on_images is not None:
                await on_images(images)

        results = await gather_all([lambda c=c: one(c) for c in self.plan(req)], arrived)
        return [image for result in results for image in result]

    async def _send(self, call: Call, gate: asyncio.Semaphore) -> list:
        async with gate:
            async for attempt in retrying(f"POST {call.path}", log):
                with attempt:
                    response = await self._request_once(call)
        # Decoding each image whole is CPU work: off the event loop.
        return await asyncio.to_thread(self._images, response, call)

    async def _request_once(self, call: Call) -> httpx.Response:
        kwargs: dict[str, Any] = {"headers": self._headers()}
        if call.json is not None:
            kwargs["json"] = call.json
        else:
            kwargs["data"], kwargs["files"] = call.fields, call.files
        response = await request(self._http(), "POST", call.path, host=self.host, secrets=(self._key,), **kwargs)
        if response.status_code >= 400:
            raise _error_for(response, call.model, self._key)
        return response

    @staticmethod
    def _images(response: httpx.Response, call: Call) -> list:
        """One entry per image asked: the image, or why it is missing."""
        body = json_body(response)
        items = body.get("data") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise MalformedResponse("the API answered without a 'data' list of images")
        request_id = response.headers.get("x-request-id")
        out: list = []
        for item in items[:call.n]:
            try:
                if not isinstance(item, dict):
                    raise MalformedResponse("an image in the API's answer is not an object")
                data = b64_image(item.get("b64_json"))
                fmt = inspect(data, from_provider=True)[0]
            except ProviderError as exc:
                out.append(exc)
                continue
            extras = {k: body.get(k) for k in ("quality", "background") if isinstance(body.get(k), str)}
            if isinstance(item.get("revised_prompt"), str):
                extras["revised_prompt"] = item["revised_prompt"]
            out.append(GeneratedImage(data, fmt, None, "SUCCESS", call.model, request_id, list(call.notes),
                                      metadata=extras))
        missing = call.n - len(out)
        out += [MalformedResponse(f"the API returned {len(out)} of the {call.n} images asked for")] * missing
        return out

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _shape(size: str) -> float:
    w, h = re.split("[x:]", size)
    return int(w) / int(h)


# OpenAI quotes part of a refused key back ("Incorrect API key provided: sk-proj-abc***xyz").
_KEY_FRAGMENT = re.compile(r"\bsk-[\w*-]+")
_FILTERED = ("moderation_blocked", "content_policy_violation")
_NO_CREDIT = ("insufficient_quota", "billing_hard_limit_reached")


def _error_for(response: httpx.Response, model: str, key: str | None) -> ProviderError:
    """Map an error answer (``{"error": {"message", "type", "param", "code"}}``) to the package's
    exceptions: the one place this happens. Every text is scrubbed of the key first."""
    status = response.status_code
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON, or absurdly deep
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        kind = str(error.get("type") or "")
        detail = str(error.get("message") or code or kind)
        if error.get("param"):
            detail += f" (param {error['param']})"
        detail = _KEY_FRAGMENT.sub(MASK, redact(detail, key))
    else:
        code = kind = ""
        detail = _KEY_FRAGMENT.sub(MASK, short_text(response, key or ""))
    suffix = f": {detail}" if detail else ""
    if code in _FILTERED or kind in _FILTERED:
        return ContentFiltered(f"OpenAI's content filter refused the request ({status}){suffix}", status=status)
    if code in _NO_CREDIT or kind in _NO_CREDIT:  # a 429 too: waiting does not bring money back
        return InsufficientCredits(f"the OpenAI account is out of quota or credit ({status}){suffix}", status=status)
    if status == 401:
        return AuthError(f"the API key was refused (401){suffix}; {KEY_HELP}", status=status)
    if status == 403:
        return AuthError(f"the key may not use {model} (403){suffix}", status=status)
    return status_error(response, suffix, f"{model} or this endpoint")
