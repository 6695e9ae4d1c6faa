"""ComfyUI: the user's own API-format workflow graphs, run on a ComfyUI server or on Comfy Cloud.

A request fills the placeholders of a workflow file (a string input that is exactly
``$prompt``, ``$seed``, ...), queues the graph with ``POST /prompt``, polls until it
has run, and fetches every image a save node wrote with ``GET /view``. An input
image is uploaded first with ``POST /upload/image``.

With an API key the provider talks to Comfy Cloud: the same routes under ``/api``
with an ``X-API-Key`` header, except that a job is followed with ``GET /api/jobs/{id}``
(the cloud has no ``/history/{id}``) and ``/api/view`` answers with a redirect to a
signed storage URL, which is fetched without the key.

Graphs are checked in ``prepare`` (format, placeholders, values), so a typo costs
neither a daily slot nor a GPU second.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import json
import random
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...config import Bounded, Key, api_key, http_url, non_empty, number_text
from ...errors import (ApiRejected, AuthError, ConfigError, InsufficientCredits, InvalidInput, InvalidRequest,
                       MalformedResponse, PayloadTooLarge, ProviderError, ProviderUnavailable, RateLimited)
from ...secrets import MASK, redact
from ...storage.formats import sniff_format
from ..http import MAX_SEED, Progress, checked_key, gather_all, json_body, logger, request, retry_after, retrying
from ..imaging import inspect, resize, size_of
from ..provider import Option, Provider
from ..request import GeneratedImage, ImageRequest, check_count, check_prompt, check_upscale_size, choice, in_range, refuse
from .local import target_size

if TYPE_CHECKING:
    import httpx

DEFAULT_HOST = "http://127.0.0.1:8188"
CLOUD_PREFIX = "/api"
KEY_HELP = "set one with the COMFY_API_KEY environment variable or `abby config set providers.comfyui.api_key KEY`"
DEFAULT_STRENGTH = 0.5  # what `abby img2img --help` documents when --strength is not given
MAX_PROMPT = 20_000  # CLIP truncates long before this; the bound only stops a pasted file
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

log = logger("comfyui")

# The placeholders abby fills, and the type each is sent as (numbers as JSON numbers).
PLACEHOLDERS = {"prompt": str, "negative_prompt": str, "seed": int, "width": int, "height": int, "count": int,
                "steps": int, "cfg_scale": float, "strength": float, "image": str, "scale": float, "model": str,
                "sampler": str, "scheduler": str}
_PLACEHOLDER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def _default_t2i() -> dict[str, Any]:
    """The built-in text-to-image graph for a standard SD checkpoint (the one ComfyUI's
    default workflow is, exported with "Save (API Format)")."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "$model"}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": "$width", "height": "$height", "batch_size": "$count"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "$prompt", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "$negative_prompt", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler",
              "inputs": {"seed": "$seed", "steps": "$steps", "cfg": "$cfg_scale", "sampler_name": "$sampler",
                         "scheduler": "$scheduler", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
                         "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "abby", "images": ["8", 0]}},
    }


def _default_i2i() -> dict[str, Any]:
    """The built-in image-to-image graph: the input encoded as the latent, denoised by $strength."""
    graph = _default_t2i()
    del graph["5"]
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "$image"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["12"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["11", 0], "amount": "$count"}}
    graph["3"]["inputs"] |= {"denoise": "$strength", "latent_image": ["12", 0]}
    return graph


BUILT_IN = {"text-to-image": _default_t2i, "image-to-image": _default_i2i}
WORKFLOW_KEY = {"text-to-image": "text_to_image_workflow", "image-to-image": "image_to_image_workflow",
                "upscale": "upscale_workflow"}


# --- workflow files ----------------------------------------------------------------------
class Workflow:
    """A checked API-format graph and where each placeholder sits in it."""

    def __init__(self, name: str, graph: dict[str, Any]):
        self.name, self.graph = name, graph
        self.uses: set[str] = set()
        for node_id, node in graph.items():
            for where, text in _strings(node["inputs"], f"node {node_id} ({node['class_type']}) input"):
                m = _PLACEHOLDER.fullmatch(text)
                if not m:
                    continue
                if m.group(1) not in PLACEHOLDERS:
                    raise ConfigError(f"workflow {name}: unknown placeholder ${m.group(1)} in {where}"
                                      f"{_did_you_mean(m.group(1))}; abby fills: "
                                      f"{', '.join('$' + p for p in PLACEHOLDERS)} (write $$ for a literal $)")
                self.uses.add(m.group(1))

    def filled(self, values: dict[str, Any]) -> dict[str, Any]:
        """A copy of the graph with every placeholder replaced by its typed value."""
        def fill(value: Any) -> Any:
            if isinstance(value, str):
                m = _PLACEHOLDER.fullmatch(value)
                if m:
                    return values[m.group(1)]
                return value[1:] if value.startswith("$$") else value  # "$$x" sends a literal "$x"
            if isinstance(value, list):
                return [fill(v) for v in value]
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            return value

        return {node_id: {**node, "inputs": fill(node["inputs"])} for node_id, node in self.graph.items()}


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(PLACEHOLDERS), n=1, cutoff=0.6)
    return f" (did you mean ${close[0]}?)" if close else ""


def _strings(value: Any, where: str):
    """(where, text) for every string inside an input value, nested ones included."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where} {k!r}" if where.endswith("input") else f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, where)


def _no_constant(name: str):
    """NaN and Infinity are not JSON: a graph holding them could not be sent as JSON either."""
    raise ValueError(f"{name} is not a JSON number")


def load_workflow(path: str, setting: str) -> Workflow:
    """Read and check an API-format workflow file; ConfigError with one clear line otherwise."""
    where = f"providers.comfyui.{setting}: {path}"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is harmless
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist (a relative path is relative to the current folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        graph = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a workflow") from None
    except ValueError as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc})") from None
    return Workflow(Path(path).name, check_graph(graph, where))


def check_graph(graph: Any, where: str) -> dict[str, Any]:
    if isinstance(graph, dict) and isinstance(graph.get("nodes"), list) and isinstance(graph.get("links"), list):
        raise ConfigError(f"{where} is a workflow in ComfyUI's UI format; abby needs the API format: "
                          "in ComfyUI use Workflow > Export (API), or \"Save (API Format)\" with dev mode on")
    if not isinstance(graph, dict) or not graph:
        raise ConfigError(f"{where} is not an API-format workflow (a JSON object of nodes)")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise ConfigError(f"{where}: node {node_id} has no class_type; is this an API-format workflow?")
        if not isinstance(node.get("inputs"), dict):
            raise ConfigError(f"{where}: node {node_id} ({node['class_type']}) has no inputs object")
    return graph


# --- settings checkers ----------------------------------------------------------------------
def _prefix(value: Any) -> str:
    if not isinstance(value, str) or (value and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value)):
        raise ValueError(f"must be empty or a path such as /api, got {value!r}")
    return value


def _multiple_of_8(name: str, value: int) -> None:
    if value % 8:
        low = value - value % 8
        raise InvalidInput(f"{name} {value} is not a multiple of 8 (Stable Diffusion works on 8-pixel blocks); "
                           f"try {max(low, 16)} or {low + 8}")


class ComfyUIProvider(Provider):
    """A ComfyUI server (or Comfy Cloud) running the user's workflow graphs."""

    name = "comfyui"
    title = "ComfyUI"
    operations = ("text-to-image", "image-to-image", "upscale")
    settings = (
        Key("providers.comfyui.api_host", http_url, DEFAULT_HOST,
            "Base URL of the ComfyUI server; https://cloud.comfy.org for Comfy Cloud.", env="COMFYUI_API_HOST"),
        Key("providers.comfyui.api_key", api_key, None,
            "Comfy Cloud API key (sent as X-API-Key; it also switches to the cloud's /api routes).\n"
            "Prefer the COMFY_API_KEY environment variable.", env="COMFY_API_KEY", secret=True),
        Key("providers.comfyui.api_prefix", _prefix, None,
            "Path before every route: empty for a local server, /api for Comfy Cloud.\n"
            "Default: /api when api_key is set, empty when not."),
        Key("providers.comfyui.checkpoint", non_empty, None,
            "Checkpoint file name on the server (fills $model when --model is not given),\n"
            "e.g. v1-5-pruned-emaonly.safetensors."),
        Key("providers.comfyui.text_to_image_workflow", non_empty, None,
            "API-format workflow file for `abby generate` (relative paths: to this file's folder).\n"
            "Default: abby's built-in SD checkpoint graph.", path=True),
        Key("providers.comfyui.image_to_image_workflow", non_empty, None,
            "API-format workflow file for `abby img2img`. Default: abby's built-in SD graph.", path=True),
        Key("providers.comfyui.upscale_workflow", non_empty, None,
            "API-format workflow file for `abby upscale` (no built-in one).", path=True),
        Key("providers.comfyui.width", Bounded(16, 16384, "pixels", whole=True), 512,
            "Image width ($width) when --width is not given.", from_text=number_text),
        Key("providers.comfyui.height", Bounded(16, 16384, "pixels", whole=True), 512,
            "Image height ($height) when --height is not given.", from_text=number_text),
        Key("providers.comfyui.steps", Bounded(1, 10000, whole=True), 20,
            "Sampling steps ($steps) when --steps is not given.", from_text=number_text),
        Key("providers.comfyui.cfg_scale", Bounded(1, 30), 7,
            "CFG scale ($cfg_scale) when --cfg-scale is not given.", from_text=number_text),
        Key("providers.comfyui.sampler", non_empty, "euler", "Sampler name ($sampler), e.g. euler, dpmpp_2m."),
        Key("providers.comfyui.scheduler", non_empty, "normal", "Scheduler ($scheduler), e.g. normal, karras."),
        Key("providers.comfyui.upscale_factor", Bounded(1.01, 16), 2,
            "Scale of an upscale ($scale) when neither --width nor --factor is given.", from_text=number_text),
        Key("providers.comfyui.timeout", Bounded(1, 1800, "seconds"), 600,
            "Seconds to wait for a workflow to finish, queue included (at most 30 minutes).",
            from_text=number_text),
        Key("providers.comfyui.poll_interval", Bounded(0.05, 60, "seconds"), 1.0,
            "Seconds between two checks of a running workflow.", from_text=number_text),
    )
    options = {
        "sampler": Option(non_empty, "sampler name for $sampler, e.g. dpmpp_2m"),
        "scheduler": Option(non_empty, "scheduler for $scheduler, e.g. karras"),
    }

    def __init__(self, config, *, transport=None):
        super().__init__(config, transport=transport)
        c = self.config
        self._key = checked_key("ComfyUI", c.get("api_key"))
        self.host = (c.get("api_host") or DEFAULT_HOST).rstrip("/")
        prefix = c.get("api_prefix")
        self.prefix = (CLOUD_PREFIX if self._key else "") if prefix is None else prefix
        self.cloud = bool(self._key)
        self._client: httpx.AsyncClient | None = None

    # --- describing itself -----------------------------------------------------------
    def default_model(self, operation: str) -> str | None:
        return self.config.get("checkpoint")

    def configured(self) -> tuple[bool, str]:
        where = f"{'Comfy Cloud at ' if self.cloud else 'server '}{self.host}"
        if not self.config.get("text_to_image_workflow") and not self.config.get("checkpoint"):
            return False, f"{where}; set providers.comfyui.checkpoint for the built-in workflow"
        return True, where

    def native_factor(self, req: ImageRequest) -> float:
        return float(self.config.get("upscale_factor") or 2)

    # --- checking a request ----------------------------------------------------------------
    def workflow(self, operation: str) -> Workflow:
        setting = WORKFLOW_KEY[operation]
        path = self.config.get(setting)
        if path:
            return load_workflow(path, setting)
        if operation not in BUILT_IN:
            raise ConfigError(f"ComfyUI has no built-in {operation} workflow: set providers.comfyui.{setting} "
                              "to an API-format workflow file")
        return Workflow(f"built-in {operation}", BUILT_IN[operation]())

    def prepare(self, req: ImageRequest) -> ImageRequest:
        opts = self.parse_options(req)
        where = "ComfyUI"
        refuse("--style", req.style_preset, where, "put the style in the prompt or in the workflow")
        refuse("--aspect", req.aspect_ratio, where, "give --width and --height")
        refuse("--mode", req.mode, where, "the upscale workflow decides how to upscale")
        refuse("--creativity", req.creativity, where)
        choice("output format", req.output_format, tuple(_MIME), where)
        flow = self.workflow(req.operation)
        uses = flow.uses
        upscale = req.operation == "upscale"
        if upscale:
            check_upscale_size(req)
        else:
            check_count(req, 10, where)
        # A value the user gave that the graph never reads would be silently ignored: refused.
        given = {"prompt": req.prompt or None, "negative_prompt": req.negative_prompt, "seed": req.seed,
                 "steps": req.steps, "cfg_scale": req.cfg_scale, "strength": req.strength, "model": req.model,
                 "sampler": opts.get("sampler"), "scheduler": opts.get("scheduler"),
                 "count": req.count if not upscale and req.count > 1 else None}
        if not upscale:
            given |= {"width": req.width, "height": req.height}
        for name, value in given.items():
            if value is not None and name not in uses:
                flag = {"negative_prompt": "--negative", "cfg_scale": "--cfg-scale", "sampler": "--option sampler",
                        "scheduler": "--option scheduler",
                        "prompt": "--prompt" if upscale else "the prompt"}.get(name, f"--{name}")
                raise InvalidInput(f"{flag} is not used by the workflow ({flow.name} has no ${name} placeholder)")
        if req.prompt is not None and "prompt" in uses:
            check_prompt(req, MAX_PROMPT, where)
        in_range("seed", req.seed, 0, MAX_SEED, where)
        in_range("steps", req.steps, 1, 10000, where)
        in_range("cfg scale", req.cfg_scale, 1, 30, where)
        in_range("strength", req.strength, 0, 1, where)
        if not upscale:
            for side in ("width", "height"):
                value = getattr(req, side)
                in_range(side, value, 16, 16384, where)
                if value is not None and side in uses:
                    _multiple_of_8(side, value)
        if "seed" in uses and req.seed is None:
            # abby picks the seed, so the stored metadata and history hold the one really used.
            req = req.with_(seed=random.randint(0, MAX_SEED))
        if "model" in uses and req.model is None:
            req = req.with_(model=self.config.get("checkpoint"))
        missing = [f"${n}" for n, v in self._values(req, "<uploaded>").items() if n in uses and v is None]
        if missing:
            hints = {"$model": "set providers.comfyui.checkpoint or give --model",
                     "$prompt": "give a prompt (--prompt for an upscale)",
                     "$image": "this operation has no input image"}
            hint = "; ".join(hints[m] for m in missing if m in hints)
            raise InvalidInput(f"the workflow {flow.name} needs a value for {', '.join(missing)}"
                               + (f": {hint}" if hint else ""))
        return req

    def _values(self, req: ImageRequest, image_name: str | None) -> dict[str, Any]:
        """Every placeholder's value for this request (None: it has none)."""
        c, opts = self.config, self.parse_options(req)
        width, height = req.width or c["width"], req.height or c["height"]
        scale = None
        if req.operation != "text-to-image" and req.image is not None:
            in_w, in_h = size_of(req.image)
            if req.operation == "upscale":
                width, height = target_size(in_w, in_h, req, self.native_factor(req))
                scale = round(width / in_w, 4)
            else:
                width, height = req.width or in_w, req.height or in_h
        values = {"prompt": req.prompt or None, "negative_prompt": req.negative_prompt or "", "seed": req.seed,
                  "width": width, "height": height, "count": req.count if req.operation != "upscale" else 1,
                  "steps": req.steps or c["steps"], "cfg_scale": req.cfg_scale or c["cfg_scale"],
                  "strength": DEFAULT_STRENGTH if req.strength is None else req.strength,
                  "image": image_name if req.image is not None else None, "scale": scale, "model": req.model,
                  "sampler": opts.get("sampler") or c["sampler"], "scheduler": opts.get("scheduler") or c["scheduler"]}
        return {k: (None if v is None else PLACEHOLDERS[k](v)) for k, v in values.items()}

    def graph(self, req: ImageRequest, image_name: str | None) -> tuple[Workflow, dict[str, Any]]:
        flow = self.workflow(req.operation)
        return flow, flow.filled(self._values(req, image_name))

    # --- HTTP ---------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self._key} if self._key else {}

    def _shown_headers(self) -> dict[str, str]:
        return {"X-API-Key": MASK} if self._key else {}

    def _upload_name(self, data: bytes) -> str:
        # Named by content: the same input reuses the server's copy instead of piling up renamed ones.
        return f"abby-{hashlib.sha256(data).hexdigest()[:16]}.{sniff_format(data).replace('jpeg', 'jpg')}"

    def describe(self, req: ImageRequest) -> list[dict[str, Any]]:
        out = []
        base = self.host + self.prefix
        name = None
        if req.image is not None:
            name = self._upload_name(req.image)
            fmt = sniff_format(req.image)
            out.append({"method": "POST", "url": base + "/upload/image", "headers": self._shown_headers(),
                        "multipart": {"image": f"<{len(req.image)} bytes {_MIME[fmt]}>", "type": "input"}})
        _flow, graph = self.graph(req, name)
        out.append({"method": "POST", "url": base + "/prompt", "headers": self._shown_headers(),
                    "json": {"prompt": graph, "client_id": "<a fresh id for each run>"}})
        poll = "/jobs/<prompt_id>" if self.cloud else "/history/<prompt_id>"
        out.append({"method": "GET", "url": f"{base}{poll} (every {self.config['poll_interval']:g} s, "
                    f"for up to {self.config['timeout']:g} s)", "headers": self._shown_headers()})
        out.append({"method": "GET", "url": f"{base}/view?filename=<each saved image>&subfolder=...&type=output",
                    "headers": self._shown_headers()})
        return out

    def _http(self) -> httpx.AsyncClient:
        import httpx

        if self._client is None:
            # The key is never a default header: a redirect to a storage host must not carry it.
            self._client = httpx.AsyncClient(base_url=self.host, transport=self.transport,
                                             timeout=httpx.Timeout(60.0, connect=15.0))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _call(self, method: str, route: str, what: str, **kwargs: Any) -> httpx.Response:
        """One request to a route under the prefix, with abby's retries; errors mapped in ``_error_for``."""
        path = self.prefix + route
        async for attempt in retrying(f"{method} {path.split('?')[0]}", log):
            with attempt:
                response = await request(self._http(), method, path, host=self.host, secrets=(self._key,),
                                         headers=self._headers(), **kwargs)
                if response.status_code >= 400:
                    raise _error_for(response, what, self._key, self.cloud)
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        body = json_body(response)
        if not isinstance(body, dict):
            raise MalformedResponse(f"ComfyUI answered {response.request.url.path} with unexpected JSON")
        return body

    # --- running --------------------------------------------------------------------------------
    async def run(self, req, *, user_id, concurrency, progress, on_images):
        async def arrived(images):
            if on_images is not None:
                await on_images(images)

        try:
            image_name = await self._upload(req.image) if req.image is not None else None
            flow, graph = await asyncio.to_thread(self.graph, req, image_name)
            prompt_id = await self._queue(graph)
            saved = await self._wait(prompt_id, progress)
        except ProviderError as exc:
            results = [exc] * self._asked(req)
            await arrived(results)
            return results
        asked = self._asked(req)
        notes = []
        if len(saved) > asked:
            # Only the images asked for are fetched: the others would not be stored (no slot was
            # reserved for them), so downloading them would be wasted time.
            notes.append(f"the workflow saved {len(saved)} images; abby kept the first {asked} asked for")
        seed = req.seed if "seed" in flow.uses else None
        model = req.model or f"workflow {flow.name}"
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(item):
            async with gate:
                data = await self._view(item)
            image = await asyncio.to_thread(self._image, data, req, seed, model, prompt_id, notes)
            image.metadata = {"workflow": flow.name, "comfyui_output": _file_label(item)}
            return image

        results = await gather_all([lambda i=i: one(i) for i in saved[:asked]], lambda r: arrived([r]))
        missing = asked - len(results)
        if missing:
            short = ProviderError(f"the workflow saved {len(saved)} image{'s' * (len(saved) != 1)}; "
                                  f"{asked} were asked for (is $count wired to the batch size?)")
            await arrived([short] * missing)
            results += [short] * missing
        return results

    @staticmethod
    def _asked(req: ImageRequest) -> int:
        return 1 if req.operation == "upscale" else req.count

    async def _upload(self, data: bytes) -> str:
        fmt = sniff_format(data)
        files = {"image": (self._upload_name(data), data, _MIME[fmt]), "type": (None, "input")}
        body = self._json(await self._call("POST", "/upload/image", "the image upload", files=files))
        name, sub = body.get("name"), body.get("subfolder") or ""
        if not isinstance(name, str) or not name:
            raise MalformedResponse("ComfyUI accepted the upload but returned no file name")
        return f"{sub}/{name}" if sub else name

    async def _queue(self, graph: dict[str, Any]) -> str:
        body = {"prompt": graph, "client_id": uuid.uuid4().hex}  # a fresh client id for every run
        answer = self._json(await self._call("POST", "/prompt", "the workflow", json=body))
        prompt_id = answer.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            raise MalformedResponse("ComfyUI accepted the workflow but returned no prompt_id")
        return prompt_id

    async def _wait(self, prompt_id: str, progress: Progress | None) -> list[dict[str, Any]]:
        """Poll until the graph has run; the images it saved, in the order the server lists them."""
        try:
            return await self._poll(prompt_id, progress)
        except asyncio.CancelledError:  # Ctrl-C or a cancelled bot task: the images are refunded,
            with contextlib.suppress(asyncio.TimeoutError):  # so spare the server the work
                await asyncio.wait_for(self._drop(prompt_id), 3)
            raise

    async def _poll(self, prompt_id: str, progress: Progress | None) -> list[dict[str, Any]]:
        started = time.monotonic()
        timeout, interval = float(self.config["timeout"]), float(self.config["poll_interval"])
        while True:
            if self.cloud:
                job = self._json(await self._call("GET", f"/jobs/{prompt_id}", "the job"))
                done = _cloud_outcome(job)
            else:
                history = self._json(await self._call("GET", f"/history/{prompt_id}", "the history"))
                done = _local_outcome(history.get(prompt_id))
            if done is not None:
                return done
            elapsed = time.monotonic() - started
            if elapsed + interval > timeout:
                await self._drop(prompt_id)
                raise ProviderUnavailable(f"the ComfyUI workflow {prompt_id} did not finish within {timeout:g} s "
                                          "(providers.comfyui.timeout)")
            if progress:
                progress(f"ComfyUI workflow running, {elapsed:.0f} s")
            await asyncio.sleep(interval)

    async def _drop(self, prompt_id: str) -> None:
        """Take a prompt that timed out off the queue if it is still waiting, so no GPU time is
        spent on an image abby has refunded. (A graph already running finishes: interrupting
        could stop another client's graph on servers that ignore the prompt_id.)"""
        try:
            await request(self._http(), "POST", self.prefix + "/queue", host=self.host, secrets=(self._key,),
                          headers=self._headers(), json={"delete": [prompt_id]})
        except ProviderError:
            pass  # best effort: the time-out is what gets reported

    async def _view(self, item: dict[str, Any]) -> bytes:
        from urllib.parse import urlencode

        query = urlencode({"filename": item["filename"], "subfolder": item.get("subfolder") or "",
                           "type": item.get("type") or "output"})
        response = await self._call("GET", f"/view?{query}", f"the output image {_file_label(item)}")
        if response.status_code in (301, 302, 303, 307, 308):  # Comfy Cloud: a signed storage URL
            response = await self._follow(response)
        return response.content

    async def _follow(self, response: httpx.Response) -> httpx.Response:
        location = response.headers.get("location")
        if not location:
            raise MalformedResponse("ComfyUI redirected the image download without a Location")
        url = response.request.url.join(location)
        same = (url.scheme, url.host, url.port) == (response.request.url.scheme, response.request.url.host,
                                                    response.request.url.port)
        async for attempt in retrying("GET the signed image URL", log):
            with attempt:
                # The key goes to ComfyUI only, never to the storage host the signed URL points at.
                answer = await request(self._http(), "GET", str(url), host=url.host, secrets=(self._key,),
                                       headers=self._headers() if same else {})
                if answer.status_code >= 400:
                    raise _error_for(answer, "the signed image URL", self._key, self.cloud)
                return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _image(self, data: bytes, req: ImageRequest, seed, model: str, prompt_id: str,
               notes: list[str]) -> GeneratedImage:
        fmt, w, h = inspect(data, from_provider=True)
        notes = list(notes)
        if fmt != req.output_format:
            # SaveImage writes PNG; abby converts so the stored file is in the format asked for.
            data = resize(data, w, h, req.output_format)
            notes.append(f"converted from {fmt.upper()} to {req.output_format.upper()} by abby")
            fmt = req.output_format
        return GeneratedImage(data, fmt, seed, "SUCCESS", model, prompt_id, notes)


# --- reading the server's answers ------------------------------------------------------------
def _file_label(item: dict[str, Any]) -> str:
    sub = item.get("subfolder") or ""
    return f"{sub}/{item['filename']}" if sub else str(item["filename"])


def _saved_images(outputs: Any) -> list[dict[str, Any]]:
    """The files save nodes wrote (type "output"), node by node as listed. Previews ("temp")
    are not results: ComfyUI deletes them."""
    if not isinstance(outputs, dict):
        raise MalformedResponse("ComfyUI's history has no outputs object")
    saved, previews = [], 0
    for node_output in outputs.values():
        for item in (node_output or {}).get("images") or []:
            if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
                raise MalformedResponse("an output image in ComfyUI's history has no filename")
            if item.get("type", "output") == "output":
                saved.append(item)
            else:
                previews += 1
    if not saved:
        hint = " (only previews, which ComfyUI does not keep: use a SaveImage node)" if previews else ""
        raise ProviderError(f"the workflow finished but saved no images{hint}")
    return saved


def _execution_error(info: Any) -> ProviderError:
    info = info if isinstance(info, dict) else {}
    node = f" in node {info.get('node_id')} ({info.get('node_type')})" if info.get("node_id") else ""
    message = str(info.get("exception_message") or "no details").strip().splitlines() or ["no details"]
    kind = str(info.get("exception_type") or "").rpartition(".")[2]
    return ProviderError(f"the workflow failed on the server{node}: {(kind + ': ') if kind else ''}"
                         f"{message[0][:300]}")


def _local_outcome(entry: Any) -> list[dict[str, Any]] | None:
    """The saved images of a finished history entry, None while it runs, ProviderError if it failed."""
    if not entry:  # {} until the prompt has run
        return None
    if not isinstance(entry, dict):
        raise MalformedResponse("ComfyUI's history entry is not an object")
    status = entry.get("status") or {}
    messages = [m for m in status.get("messages") or [] if isinstance(m, list) and len(m) == 2]
    for kind, data in messages:
        if kind == "execution_error":
            raise _execution_error(data)
        if kind == "execution_interrupted":
            raise ProviderError("the workflow was interrupted on the server")
    if status.get("status_str") == "error":
        raise ProviderError("the workflow failed on the server (no details in its history)")
    if status and not status.get("completed", True):
        return None
    return _saved_images(entry.get("outputs"))


def _cloud_outcome(job: dict[str, Any]) -> list[dict[str, Any]] | None:
    state = job.get("status")
    if state in ("pending", "in_progress", "waiting_to_dispatch"):
        return None
    if state == "failed":
        raise _execution_error(job.get("execution_error"))
    if state == "cancelled":
        raise ProviderError("the job was cancelled on Comfy Cloud")
    if state != "completed":
        raise MalformedResponse(f"Comfy Cloud reported an unknown job status {str(state)[:40]!r}")
    return _saved_images(job.get("outputs"))


def _node_errors(body: dict[str, Any]) -> str:
    """One readable line from a 400 answer: the first node, its class and input, and its message."""
    nodes = body.get("node_errors")
    problems = []
    if isinstance(nodes, dict):
        for node_id, entry in nodes.items():
            for err in (entry or {}).get("errors") or []:
                if not isinstance(err, dict):
                    continue
                extra = err.get("extra_info") if isinstance(err.get("extra_info"), dict) else {}
                field = extra.get("input_name") or ""
                text = str(err.get("message") or err.get("type") or "invalid")
                details = str(err.get("details") or "")
                if details and details != field:
                    text += f": {details}"
                problems.append(f"node {node_id} ({entry.get('class_type') or '?'})"
                                + (f" input {field}" if field else "") + f": {text}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return problems[0][:300] + more
    error = body.get("error")
    if isinstance(error, dict):
        text = str(error.get("message") or error.get("type") or "")
        if error.get("details"):
            text += f" ({error['details']})"
        return text
    if isinstance(error, str):
        return error
    return str(body.get("message") or "")


def _error_for(response: httpx.Response, what: str, key: str | None, cloud: bool) -> ProviderError:
    """Map an HTTP error to abby's exceptions, with the server's text scrubbed of the key: the one
    place this happens."""
    status = response.status_code
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON, or absurdly deep
        body = None
    if isinstance(body, dict):
        detail = _node_errors(body)
    else:
        text = response.text.strip()
        detail = text.splitlines()[0][:300] if text else ""
    detail = redact(" ".join(detail.split()), key)
    suffix = f": {detail}" if detail else ""
    server = "Comfy Cloud" if cloud else "ComfyUI"
    if status in (401, 403) and (cloud or status == 401):
        return AuthError(f"{server} refused the API key ({status}){suffix}; {KEY_HELP}", status=status)
    paying = any(w in detail.lower() for w in ("credit", "payment", "paid", "subscription", "balance"))
    if status == 402 or (status == 429 and paying):
        return InsufficientCredits(f"the Comfy Cloud account cannot pay for this ({status}){suffix}", status=status)
    if status == 400:
        return InvalidRequest(f"{server} refused {what} (400){suffix}", status=status)
    if status == 404:
        if what.startswith("the output image"):
            # A graph served from ComfyUI's cache lists the files of its first run, which may be gone.
            return ApiRejected(f"{server} no longer has {what} (404): a result cached from an earlier "
                               "identical run whose file was deleted? run again with another --seed", status=status)
        route = f"{response.request.method} {response.request.url.path}"
        return ApiRejected(f"{server} answered 404 (not found) to {route}{suffix}; check providers.comfyui.api_host"
                           + ("" if cloud else " and api_prefix"), status=status)
    if status == 413:
        return PayloadTooLarge(f"{server} refused {what} as too large (413){suffix}", status=status)
    if status == 429:
        return RateLimited(f"{server} is busy (429){suffix}", status=status, retry_after=retry_after(response))
    if status >= 500:
        return ProviderUnavailable(f"{server} had an internal error with {what} ({status}){suffix}", status=status,
                                   retry_after=retry_after(response))
    return ApiRejected(f"{server} refused {what} ({status}){suffix}", status=status)
