"""A fake AUTOMATIC1111 WebUI API on loopback, strict about what it accepts.

It serves ``/sdapi/v1/txt2img``, ``img2img``, ``extra-single-image``, ``progress`` and
``sd-models``; refuses unknown fields and wrong types with FastAPI's 422 ``detail`` list;
answers with real PNGs (at 1/``image_scale`` of the asked size, to keep tests fast) and an
``info`` JSON string with ``all_seeds`` and ``index_of_first_image``; can require HTTP Basic,
put a grid before the batch and ControlNet-style maps after it, and be told to fail
(``script``: answers for the next POSTs) or to be slow (``seconds``: each generation takes
that long while ``/progress`` reports its steps). ``api=False`` answers every path the way
a WebUI started without ``--api`` does.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from PIL import Image

from loopback import LoopbackServer, send

CHECKPOINTS = [
    {"title": "v1-5-pruned-emaonly.safetensors [6ce0161689]", "model_name": "v1-5-pruned-emaonly",
     "hash": "6ce0161689", "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
     "filename": "/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors", "config": None},
    {"title": "sd_xl_base_1.0.safetensors [31e35c80fc]", "model_name": "sd_xl_base_1.0", "hash": "31e35c80fc",
     "sha256": "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
     "filename": "/models/Stable-diffusion/sd_xl_base_1.0.safetensors", "config": None},
]
SAMPLERS = {"Euler a", "Euler", "DPM++ 2M", "DPM++ SDE", "DDIM"}
SCHEDULERS = {"Automatic", "Karras", "Exponential", "Uniform"}
UPSCALERS = {"None", "Lanczos", "Nearest", "R-ESRGAN 4x+", "ESRGAN_4x"}

# Field types from the WebUI's request models (a subset: what a client may plausibly send).
_COMMON = {"prompt": str, "negative_prompt": str, "seed": int, "sampler_name": str, "scheduler": str,
           "batch_size": int, "n_iter": int, "steps": int, "cfg_scale": float, "width": int, "height": int,
           "restore_faces": bool, "tiling": bool, "denoising_strength": float, "override_settings": dict,
           "do_not_save_grid": bool, "do_not_save_samples": bool, "send_images": bool, "save_images": bool}
FIELDS = {
    "/sdapi/v1/txt2img": _COMMON | {"enable_hr": bool, "hr_scale": float, "hr_upscaler": str,
                                    "hr_second_pass_steps": int},
    "/sdapi/v1/img2img": _COMMON | {"init_images": list, "resize_mode": int},
    "/sdapi/v1/extra-single-image": {"resize_mode": int, "upscaling_resize": float, "upscaling_resize_w": int,
                                     "upscaling_resize_h": int, "upscaling_crop": bool, "upscaler_1": str,
                                     "upscaler_2": str, "extras_upscaler_2_visibility": float,
                                     "gfpgan_visibility": float, "codeformer_visibility": float,
                                     "codeformer_weight": float, "image": str},
}


class Invalid(Exception):
    """A 422 with FastAPI's detail list."""

    def __init__(self, *items: tuple[list, str, str]):
        super().__init__("invalid")
        self.detail = [{"loc": ["body", *loc], "msg": msg, "type": kind} for loc, msg, kind in items]


def png(width: int, height: int, color: tuple = (40, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (max(1, width), max(1, height)), color).save(buf, "PNG")
    return buf.getvalue()


class FakeWebUI:
    def __init__(self, auth: tuple[str, str] | None = None, image_scale: int = 8):
        self.auth = auth
        self.image_scale = image_scale
        self.api = True
        self.grid = False  # put a grid image first (index_of_first_image 1)
        self.control_maps = 0  # extra images after the batch, as ControlNet adds
        self.seconds = 0.0  # how long each generation takes
        self.script: list[tuple[int, Any]] = []  # (status, JSON body) for the next POSTs
        self.loaded = CHECKPOINTS[0]
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._job: dict[str, Any] | None = None  # the running generation, for /progress
        self._server: LoopbackServer | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> str:
        self._server = LoopbackServer(self._handle)
        self.url = self._server.url
        return self.url

    def stop(self) -> None:
        if self._server:
            self._server.stop()

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST"]

    # --- handling ----------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        path, _, query = h.path.partition("?")
        record = {"method": h.command, "path": path, "query": query,
                  "headers": {k.lower(): v for k, v in h.headers.items()}, "json": None}
        with self._lock:
            self.requests.append(record)
        if not self.api or not path.startswith("/sdapi/v1/"):
            return self._send(h, 404, {"detail": "Not Found"})
        if self.auth is not None and record["headers"].get("authorization") != "Basic " + base64.b64encode(
                f"{self.auth[0]}:{self.auth[1]}".encode()).decode():
            return self._send(h, 401, {"detail": "Incorrect username or password"}, {"WWW-Authenticate": "Basic"})
        if h.command == "GET":
            if raw:
                return self._send(h, 400, {"detail": "GET with a body"})
            if path == "/sdapi/v1/progress":
                return self._send(h, 200, self._progress())
            if path == "/sdapi/v1/sd-models":
                return self._send(h, 200, CHECKPOINTS)
            return self._send(h, 404, {"detail": "Not Found"})
        if path not in FIELDS:
            return self._send(h, 404, {"detail": "Not Found"})
        if not record["headers"].get("content-type", "").startswith("application/json"):
            return self._send(h, 422, {"detail": [{"loc": ["body"], "msg": "field required", "type": "missing"}]})
        try:
            body = record["json"] = json.loads(raw)
            self._validate(path, body)
        except ValueError:
            return self._send(h, 422, {"detail": [{"loc": ["body"], "msg": "not JSON", "type": "json_invalid"}]})
        except Invalid as exc:
            return self._send(h, 422, {"detail": exc.detail})
        with self._lock:
            scripted = self.script.pop(0) if self.script else None
        if scripted is not None:
            return self._send(h, *scripted)
        try:
            answer = self._upscale(body) if path.endswith("extra-single-image") else self._generate(path, body)
        except LookupError as exc:  # what the WebUI's assert/HTTPException answers look like
            return self._send(h, 500, {"error": "AssertionError", "detail": "", "body": "", "errors": str(exc)})
        self._send(h, 200, answer)

    def _validate(self, path: str, body: Any) -> None:
        if not isinstance(body, dict):
            raise Invalid(([], "value is not a valid dict", "type_error.dict"))
        types = FIELDS[path]
        problems = []
        for key, value in body.items():
            want = types.get(key)
            if want is None:
                problems.append(([key], "extra fields not permitted", "value_error.extra"))
            elif want is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                problems.append(([key], "value is not a valid float", "type_error.float"))
            elif want is not float and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
                problems.append(([key], f"value is not a valid {want.__name__}", f"type_error.{want.__name__}"))
        if problems:
            raise Invalid(*problems)
        if path != "/sdapi/v1/extra-single-image":
            if body.get("sampler_name", "Euler") not in SAMPLERS:
                raise Invalid((["sampler_name"], "Sampler not found", "value_error"))
            if "scheduler" in body and body["scheduler"] not in SCHEDULERS:
                raise Invalid((["scheduler"], "Scheduler not found", "value_error"))
            for key in ("width", "height"):
                if body.get(key, 512) % 8:
                    raise Invalid(([key], "must be a multiple of 8", "value_error"))
            if path.endswith("img2img") and not body.get("init_images"):
                raise Invalid((["init_images"], "field required", "value_error.missing"))

    # --- answers -----------------------------------------------------------------------------------
    def _progress(self) -> dict[str, Any]:
        job = self._job
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_no": 0,
                 "sampling_step": 0, "sampling_steps": 0}
        if job is None:
            return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
        done = min(1.0, (time.monotonic() - job["started"]) / max(job["seconds"], 0.001))
        state |= {"job": "scripts_txt2img", "job_count": 1, "sampling_steps": job["steps"],
                  "sampling_step": int(done * job["steps"])}
        return {"progress": done, "eta_relative": job["seconds"] * (1 - done), "state": state,
                "current_image": None, "textinfo": None}

    def _run_job(self, steps: int) -> None:
        self._job = {"started": time.monotonic(), "seconds": self.seconds, "steps": steps}
        try:
            time.sleep(self.seconds)
        finally:
            self._job = None

    def _generate(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        checkpoint = body.get("override_settings", {}).get("sd_model_checkpoint")
        model = next((c for c in CHECKPOINTS if checkpoint in (c["title"], c["model_name"], c["hash"])), None)
        # The real WebUI falls back to its first checkpoint, silently, for a name it does not know.
        model = model or self.loaded
        if path.endswith("img2img"):
            for item in body["init_images"]:
                try:
                    Image.open(io.BytesIO(base64.b64decode(item, validate=True))).load()
                except (binascii.Error, OSError):
                    raise LookupError("Invalid encoded image") from None
        self._run_job(body.get("steps", 50))
        batch = body.get("batch_size", 1)
        seed = body.get("seed", -1)
        seed = random.randrange(1, 2**32) if seed == -1 else seed
        seeds = [seed + i for i in range(batch)]
        w, h = body.get("width", 512) // self.image_scale, body.get("height", 512) // self.image_scale
        images = [png(w, h, (i * 40 % 256, 100, 150)) for i in range(batch)]
        first = 0
        if self.grid and batch > 1:
            images.insert(0, png(w * batch, h, (0, 0, 0)))
            first = 1
        images += [png(w, h, (255, 255, 255)) for _ in range(self.control_maps)]
        info = {"prompt": body.get("prompt", ""), "all_prompts": [body.get("prompt", "")] * batch, "seed": seeds[0],
                "all_seeds": seeds, "width": body.get("width", 512), "height": body.get("height", 512),
                "sampler_name": body.get("sampler_name", "Euler"), "cfg_scale": body.get("cfg_scale", 7.0),
                "steps": body.get("steps", 50), "batch_size": batch, "sd_model_name": model["model_name"],
                "sd_model_hash": model["hash"], "index_of_first_image": first,
                "infotexts": ["..."] * len(images)}
        return {"images": [base64.b64encode(i).decode() for i in images], "parameters": body,
                "info": json.dumps(info)}

    def _upscale(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("upscaler_1", "None") not in UPSCALERS:
            raise LookupError(f"could not find upscaler named {body['upscaler_1']}")
        try:
            with Image.open(io.BytesIO(base64.b64decode(body.get("image", ""), validate=True))) as img:
                img.load()
                w, h = img.size
        except (binascii.Error, OSError):
            raise LookupError("Invalid encoded image") from None
        self._run_job(1)
        if body.get("resize_mode", 0) == 1:
            size = (body.get("upscaling_resize_w", 512), body.get("upscaling_resize_h", 512))
        else:
            factor = body.get("upscaling_resize", 2)
            size = (round(w * factor), round(h * factor))
        return {"html_info": "<p>done</p>", "image": base64.b64encode(png(*size)).decode()}

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        send(h, status, data, {"Content-Type": "application/json", **(headers or {})})
