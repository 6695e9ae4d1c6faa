"""Stability AI REST client (v2beta and v1) over one pooled ``httpx.AsyncClient``.

Requests are built by ``plan()`` as plain ``Call`` objects (which ``--dry-run``
prints) and sent by ``send()``. HTTP failures become the package's exceptions
in ``_request_once`` and ``_error_for``, and nowhere else: both scrub the API key
(and any ``Bearer`` token) from the message, so no error can carry it further.
Retries happen only for 429, 5xx, time-outs and connection errors, with capped
exponential backoff and jitter, or the server's Retry-After when it gives one;
each retry is logged on the ``abby.stability`` logger with its wait and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ... import __version__
from ...config import Bounded, Key, api_key, http_url, non_empty, number_text
from ...errors import (AuthError, ConfigError, InsufficientCredits, InvalidInput, InvalidRequest, MalformedResponse,
                       ModerationRejected, ProviderError, ProviderUnavailable)
from ...secrets import MASK, redact
from ...storage.formats import sniff_format
from ..http import (Progress, b64_image, checked_key, gather_all, json_body, logger, request, retrying, seed_or_none,
                    short_text, status_error)
from ..imaging import inspect, resize, size_of
from ..provider import Provider
from ..request import GeneratedImage, ImageRequest
from .stability_rules import (ESRGAN_ENGINE, IMAGE_RULES, SDXL_SIZES, UPSCALE_MODES, family, fit_image_rules,
                              nearest_sdxl_size, validate)

if TYPE_CHECKING:
    import httpx

DEFAULT_HOST = "https://api.stability.ai"
KEY_HELP = ("set one with the STABILITY_API_KEY environment variable or "
            "`abby config set providers.stability.api_key KEY`")
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# What each paid upscale returns, as a multiple of the input width.
NATIVE_FACTOR = {"fast": 4.0, "esrgan": 2.0, "conservative": 4.0, "creative": 4.0}

log = logger("stability")


@dataclass
class Call:
    """One HTTP request, fully described; the API key is added only when sending."""

    method: str
    path: str
    accept: str
    expect: str  # "image" (raw bytes), "artifacts" (v1 JSON), "job" (an async id), "json"
    fields: dict[str, str] = field(default_factory=dict)  # multipart text fields
    files: dict[str, tuple[str, bytes, str]] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    images: int = 1  # how many images this call returns
    model: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self, host: str) -> dict[str, Any]:
        """What --dry-run prints: everything but the key and the image bytes."""
        out: dict[str, Any] = {"method": self.method, "url": host + self.path,
                               "headers": {"Authorization": f"Bearer {MASK}", "Accept": self.accept}}
        if self.json is not None:
            out["json"] = self.json
        else:
            out["multipart"] = dict(self.fields) | {k: f"<{len(v[1])} bytes {v[2]}>" for k, v in self.files.items()}
        return out


def _fields(**values: Any) -> dict[str, str]:
    """Multipart fields; None means 'leave it out', and 0 is a real value that is sent."""
    return {k: (f"{v:g}" if isinstance(v, float) else str(v)) for k, v in values.items() if v is not None}


class StabilityClient:
    def __init__(
        self,
        api_key: str | None,
        api_host: str = DEFAULT_HOST,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 120.0,
        max_attempts: int = 4,
        retry_timeout: float = 180.0,
        wait_initial: float = 1.0,
        wait_max: float = 30.0,
        poll_interval: float = 2.0,
        poll_timeout: float = 600.0,
    ):
        self._key = checked_key("Stability", api_key)
        self.host = api_host.rstrip("/")
        self._transport = transport
        self._timeout = timeout
        self._retry = {"attempts": max_attempts, "timeout": retry_timeout, "wait_initial": wait_initial,
                       "wait_max": wait_max}
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never show the key
        return f"StabilityClient(api_host={self.host!r})"

    async def __aenter__(self) -> "StabilityClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def has_key(self) -> bool:
        return bool(self._key)

    def _http(self) -> httpx.AsyncClient:
        import httpx  # imported on first use: `import abbycli` stays light for the bot and the CLI

        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.host, transport=self._transport, timeout=httpx.Timeout(self._timeout, connect=15.0),
                headers={"stability-client-id": "abby", "stability-client-version": __version__},
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            )
        return self._client

    def _headers(self, call: Call, user_id: str | None) -> dict[str, str]:
        if not self._key:
            raise ConfigError(f"no Stability API key: {KEY_HELP}")
        headers = {"Authorization": f"Bearer {self._key}", "Accept": call.accept}
        if user_id is not None:
            headers["stability-client-user-id"] = self.user_hash(user_id)
        return headers

    def user_hash(self, user_id: str) -> str:
        """A keyed hash of the user id: Stability can tell users apart, never who they are."""
        key = (self._key or "abby").encode("utf-8")
        return hmac.new(key, f"abby-user:{user_id}".encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    # --- planning ----------------------------------------------------------------------
    def plan(self, req: ImageRequest) -> list[Call]:
        """The HTTP calls for a validated request. v2beta: one call per image; v1: one call with ``samples``."""
        if req.operation == "upscale":
            return [self._plan_upscale(req)]
        model = req.model or "core"
        kind = family(model)
        if kind == "v1":
            return [self._plan_v1(req, model)]
        notes: list[str] = []
        files: dict[str, tuple[str, bytes, str]] = {}
        if req.operation == "image-to-image":
            data, notes = self._fit_input(req.image, "ultra" if kind == "ultra" else "sd3")
            files["image"] = ("image", data, _MIME[sniff_format(data)])
        common = dict(prompt=req.prompt, negative_prompt=req.negative_prompt or None, seed=req.seed,
                      style_preset=req.style_preset, output_format=req.output_format)
        if kind == "sd3":
            i2i = req.operation == "image-to-image"
            fields = _fields(mode="image-to-image" if i2i else "text-to-image", model=model,
                             aspect_ratio=None if i2i else req.aspect_ratio, strength=req.strength if i2i else None,
                             cfg_scale=req.cfg_scale, **common)
        else:
            fields = _fields(aspect_ratio=req.aspect_ratio, strength=req.strength, **common)
        path = f"/v2beta/stable-image/generate/{'sd3' if kind == 'sd3' else kind}"
        call = Call("POST", path, "image/*", "image", fields, files, model=model, notes=notes)
        return [call] + [Call(call.method, call.path, call.accept, call.expect, dict(fields), dict(files),
                              model=model, notes=notes) for _ in range(req.count - 1)]

    def _plan_v1(self, req: ImageRequest, model: str) -> Call:
        prompts = [{"text": req.prompt, "weight": 1.0}]
        if req.negative_prompt:
            prompts.append({"text": req.negative_prompt, "weight": -1.0})
        options = {k: v for k, v in dict(seed=req.seed, style_preset=req.style_preset, cfg_scale=req.cfg_scale,
                                        steps=req.steps).items() if v is not None}
        path = f"/v1/generation/{model}"
        if req.operation == "text-to-image":
            body = {"text_prompts": prompts, "width": req.width, "height": req.height, "samples": req.count, **options}
            return Call("POST", path + "/text-to-image", "application/json", "artifacts", json=body,
                        images=req.count, model=model)
        data, notes = self._fit_input(req.image, "sdxl" if "stable-diffusion-xl" in model else None)
        fields = {f"text_prompts[{i}][{k}]": (f"{v:g}" if isinstance(v, float) else v)
                  for i, p in enumerate(prompts) for k, v in p.items()}
        fields.update(_fields(init_image_mode="IMAGE_STRENGTH", image_strength=req.strength, samples=req.count,
                              **options))
        files = {"init_image": ("init_image", data, _MIME[sniff_format(data)])}
        return Call("POST", path + "/image-to-image", "application/json", "artifacts", fields, files,
                    images=req.count, model=model, notes=notes)

    def _plan_upscale(self, req: ImageRequest) -> Call:
        mode = req.mode
        data, notes = self._fit_input(req.image, mode)
        files = {"image": ("image", data, _MIME[sniff_format(data)])}
        if mode == "esrgan":
            w, _h = size_of(data)
            width = min(req.width or 2 * w, 2 * w)
            fields = _fields(width=max(512, width))
            return Call("POST", f"/v1/generation/{ESRGAN_ENGINE}/image-to-image/upscale", "application/json",
                        "artifacts", fields, files, model=ESRGAN_ENGINE, notes=notes)
        fields = _fields(output_format=req.output_format)
        if mode in ("conservative", "creative"):
            fields.update(_fields(prompt=req.prompt, negative_prompt=req.negative_prompt or None, seed=req.seed,
                                  creativity=req.creativity, style_preset=req.style_preset))
        if mode == "creative":
            return Call("POST", "/v2beta/stable-image/upscale/creative", "application/json", "job", fields, files,
                        model="creative", notes=notes)
        return Call("POST", f"/v2beta/stable-image/upscale/{mode}", "image/*", "image", fields, files, model=mode,
                    notes=notes)

    def _fit_input(self, data: bytes | None, rules: str | None) -> tuple[bytes, list[str]]:
        """Check the input image and resize it on the client where the endpoint has size rules."""
        if not data:
            raise InvalidRequest("no input image was given")
        fmt = sniff_format(data)
        w, h = size_of(data)  # prepare() has already decoded it whole
        if rules == "sdxl":
            target = None if (w, h) in SDXL_SIZES else nearest_sdxl_size(w, h)
        elif rules in IMAGE_RULES:
            target = fit_image_rules(w, h, IMAGE_RULES[rules])
        else:
            target = None
        if target is None:
            return data, []
        out_fmt = "png" if fmt == "png" else "jpeg" if fmt == "jpeg" else "png"
        return resize(data, *target, out_fmt), [f"input image resized from {w}x{h} to {target[0]}x{target[1]} "
                                                f"to meet the endpoint's size rules"]

    # --- sending -------------------------------------------------------------------------
    async def send(self, call: Call, user_id: str | None = None, progress: Progress | None = None,
                   gate: asyncio.Semaphore | None = None) -> list[GeneratedImage]:
        """Send one call and return its checked images. ``gate`` limits only the time on
        the network: decoding happens after the slot is given back to the next request."""
        async with gate or contextlib.nullcontext():
            response = await self._request_with_retries(call, user_id)
            if call.expect == "job":
                job_id = self._json(response).get("id")
                if not isinstance(job_id, str) or not job_id:
                    raise MalformedResponse("the API accepted the upscale but returned no job id")
                response = await self._poll(job_id, call, user_id, progress)
        # Decoding the image to prove it whole is CPU work (and the first one imports
        # Pillow): a thread keeps the event loop free for the other requests meanwhile.
        if call.expect == "artifacts":
            return await asyncio.to_thread(self._artifacts, response, call)
        return [await asyncio.to_thread(self._image_from, response, call)]

    def _retries(self, what: str):
        return retrying(what, log, **self._retry)

    async def _request_with_retries(self, call: Call, user_id: str | None) -> httpx.Response:
        async for attempt in self._retries(f"{call.method} {call.path}"):
            with attempt:
                return await self._request_once(call, user_id)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request_once(self, call: Call, user_id: str | None, path: str | None = None,
                            method: str | None = None, accept: str | None = None) -> httpx.Response:
        headers = self._headers(call, user_id)
        if accept:
            headers["Accept"] = accept
        kwargs: dict[str, Any] = {"headers": headers}
        if (method or call.method) == "POST":
            if call.json is not None:
                kwargs["json"] = call.json
            else:
                # Every field goes in `files` so the body is multipart even without a file,
                # as the v2beta endpoints require.
                kwargs["files"] = {k: (None, v) for k, v in call.fields.items()} | call.files
        response = await request(self._http(), method or call.method, path or call.path, host=self.host,
                                  secrets=(self._key,), **kwargs)
        if response.status_code >= 400:
            raise _error_for(response, call.model, self._key)
        return response

    async def _poll(self, job_id: str, call: Call, user_id: str | None, progress: Progress | None) -> httpx.Response:
        started = time.monotonic()
        while True:
            async for attempt in self._retries(f"GET /v2beta/results/{job_id}"):
                with attempt:
                    response = await self._request_once(call, user_id, f"/v2beta/results/{job_id}", "GET", "*/*")
            if response.status_code != 202:
                return response
            elapsed = time.monotonic() - started
            if elapsed > self.poll_timeout:
                raise ProviderUnavailable(
                    f"the creative upscale {job_id} did not finish within {self.poll_timeout:g} s"
                )
            if progress:
                progress(f"creative upscale running, {elapsed:.0f} s")
            await asyncio.sleep(self.poll_interval)

    async def balance(self) -> float:
        call = Call("GET", "/v1/user/balance", "application/json", "json")
        response = await self._request_with_retries(call, None)
        credits = self._json(response).get("credits")
        if not isinstance(credits, (int, float)):
            raise MalformedResponse("the balance response has no 'credits' number")
        return float(credits)

    # --- reading responses ------------------------------------------------------------------
    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        data = json_body(response)
        if not isinstance(data, (dict, list)):
            raise MalformedResponse("the API answered with unexpected JSON")
        return data  # type: ignore[return-value]

    def _image_from(self, response: httpx.Response, call: Call) -> GeneratedImage:
        ctype = response.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            body = self._json(response)
            raw = b64_image(body.get("image"))
            finish, seed = body.get("finish_reason"), body.get("seed")
        else:
            raw = response.content
            finish, seed = response.headers.get("finish-reason"), response.headers.get("seed")
        if finish == "ERROR":  # documented for v2beta too: the image is not usable
            raise ProviderUnavailable("the API reported an error while generating the image")
        fmt = inspect(raw, from_provider=True)[0]
        return GeneratedImage(raw, fmt, seed_or_none(seed), _finish(finish), call.model,
                              response.headers.get("x-request-id"), list(call.notes))

    def _artifacts(self, response: httpx.Response, call: Call) -> list[GeneratedImage]:
        body = self._json(response)
        # The v1 generation endpoints answer {"artifacts": [...]}; the 2023 upscale spec documents a bare list.
        items = body.get("artifacts") if isinstance(body, dict) else body
        if not isinstance(items, list) or not items:
            raise MalformedResponse("the API answered without any 'artifacts'")
        out = []
        for item in items:
            if not isinstance(item, dict):
                raise MalformedResponse("an artifact in the API's answer is not an object")
            if item.get("finishReason") == "ERROR":
                raise ProviderUnavailable("the API reported an error while generating the image")
            raw = b64_image(item.get("base64"))
            fmt = inspect(raw, from_provider=True)[0]
            out.append(GeneratedImage(raw, fmt, seed_or_none(item.get("seed")), _finish(item.get("finishReason")),
                                      call.model, response.headers.get("x-request-id"), list(call.notes)))
        return out


def _finish(value: Any) -> str:
    return value if value in ("SUCCESS", "CONTENT_FILTERED") else "SUCCESS"


def _error_for(response: httpx.Response, model: str, key: str | None) -> ProviderError:
    """Map an HTTP error to the package's exceptions: the one place this happens. The body's
    text is scrubbed of ``key`` and of any Bearer token first: a provider that echoes the
    request back must not put the key on a terminal, in --json or in the ledger."""
    status = response.status_code
    detail, name = "", ""
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON, or absurdly deep
        body = None
    if isinstance(body, dict):
        name = str(body.get("name") or "")
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            detail = redact("; ".join(str(e) for e in errors), key)
        else:
            detail = redact(str(body.get("message") or name), key)
    else:
        detail = short_text(response, key)
    suffix = f": {detail}" if detail else ""
    credits_word = "credit" in detail.lower() or "balance" in name.lower() or name == "payment_required"
    if status == 401:
        return AuthError(f"the API key was refused (401){suffix}; {KEY_HELP}", status=status)
    if status == 402 or (status in (400, 403) and credits_word):
        return InsufficientCredits(f"the Stability account has too few credits ({status}){suffix}", status=status)
    if status == 403:
        return ModerationRejected(f"the request was refused by the API's content moderation or permissions "
                                  f"(403){suffix}", status=status)
    return status_error(response, suffix, model or "this resource", "10 MiB")


def _model(value: Any) -> str:
    value = non_empty(value)
    try:
        family(value)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None
    return value


def _upscale_mode(value: Any) -> str:
    value = non_empty(value)
    if value not in UPSCALE_MODES:
        raise ValueError(f"unknown upscale mode {value!r}; choose one of: {', '.join(UPSCALE_MODES)}")
    return value


class StabilityProvider(Provider):
    """Stability AI's REST API: v2beta (core, ultra, sd3.5) and v1 engines; four upscales."""

    name = "stability"
    title = "Stability AI"
    operations = ("text-to-image", "image-to-image", "upscale")
    settings = (
        Key("providers.stability.api_key", api_key, None,
            "API key. Prefer the STABILITY_API_KEY environment variable.", env="STABILITY_API_KEY", secret=True),
        Key("providers.stability.api_host", http_url, DEFAULT_HOST, "Base URL of the API.",
            env="STABILITY_API_HOST"),
        Key("providers.stability.model", _model, "core",
            "Default text-to-image model: core, ultra, sd3.5-large, sd3.5-large-turbo, sd3.5-medium,\n"
            "sd3.5-flash, or a v1 engine id such as stable-diffusion-xl-1024-v1-0."),
        Key("providers.stability.img2img_model", _model, "sd3.5-large", "Default image-to-image model."),
        Key("providers.stability.upscale_mode", _upscale_mode, None,
            "Default upscale mode: fast, conservative, creative, esrgan or local.\n"
            "Default: fast when an API key is set, local (offline, free) when not."),
        Key("providers.stability.upscale_timeout", Bounded(1, 1800, "seconds"), 600,
            "Seconds to wait for a creative upscale to finish (at most 30 minutes).", from_text=number_text),
    )
    legacy = {k: f"generation.{k}" for k in ("api_key", "api_host", "model", "img2img_model", "upscale_mode",
                                              "upscale_timeout")}

    def __init__(self, config, *, transport=None, **client_options: Any):
        super().__init__(config, transport=transport)
        c = self.config
        client_options.setdefault("poll_timeout", c.get("upscale_timeout", 600))
        self.client = StabilityClient(c.get("api_key"), c.get("api_host") or DEFAULT_HOST, transport=transport,
                                      **client_options)

    def default_model(self, operation: str) -> str | None:
        if operation == "upscale":
            return None
        return self.config.get("model" if operation == "text-to-image" else "img2img_model") or (
            "core" if operation == "text-to-image" else "sd3.5-large")

    def models(self, operation: str) -> tuple[str, ...]:
        from .stability_rules import SD3_MODELS

        if operation == "upscale":
            return tuple(m for m in UPSCALE_MODES if m != "local")
        return ("core", "ultra", *SD3_MODELS) if operation == "text-to-image" else ("ultra", *SD3_MODELS)

    def configured(self) -> tuple[bool, str]:
        return (True, "API key set") if self.client.has_key else (False, f"no API key: {KEY_HELP}")

    def prepare(self, req: ImageRequest) -> ImageRequest:
        self.parse_options(req)  # Stability's extras all have their own flags: no --option
        if req.operation == "upscale":
            mode = req.mode or self.config.get("upscale_mode") or ("fast" if self.client.has_key else "local")
            if mode == "local":  # offline and free: the local provider's job
                return req.with_(provider="local", mode=None)
            req = req.with_(mode=mode)
        elif req.model is None:
            req = req.with_(model=self.default_model(req.operation))
        req = validate(req)
        if not self.client.has_key:
            raise ConfigError(f"no Stability API key: {KEY_HELP}")
        return req

    def native_factor(self, req: ImageRequest) -> float:
        return NATIVE_FACTOR[req.mode]

    def describe(self, req: ImageRequest) -> list[dict[str, Any]]:
        return [call.describe(self.client.host) for call in self.client.plan(req)]

    async def run(self, req, *, user_id, concurrency, progress, on_images):
        gate = asyncio.Semaphore(max(1, concurrency))  # requests on the network at once

        async def one(call):
            try:
                return await self.client.send(call, user_id, progress, gate)
            except ProviderError as exc:
                return [exc] * call.images

        async def arrived(images):
            if on_images is not None:
                await on_images(images)

        calls = await asyncio.to_thread(self.client.plan, req)  # may resize the input image
        results = await gather_all([lambda c=c: one(c) for c in calls], arrived)
        return [image for result in results for image in result]

    async def balance(self) -> float | None:
        return await self.client.balance()

    async def aclose(self) -> None:
        await self.client.aclose()
