"""A fake Stability API on loopback, as strict as the official OpenAPI documents.

It checks paths, methods, the Authorization and Accept headers, multipart
versus JSON bodies, required fields, enums and ranges, and answers the way the
real API does (raw image bytes with finish-reason and seed headers for
v2beta, base64 artifacts for v1, a job id and 202 polling for the creative
upscale). A test can queue scripted answers (``server.script``), make images
come back filtered, and add latency (to every answer, or to chosen ones). It counts TCP connections, so tests can
prove that connections are reused.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from PIL import Image

from loopback import LoopbackServer, send

STYLES = {"enhance", "anime", "photographic", "digital-art", "comic-book", "fantasy-art", "line-art", "analog-film",
          "neon-punk", "isometric", "low-poly", "origami", "modeling-compound", "cinematic", "3d-model", "pixel-art",
          "tile-texture"}
ASPECTS = {"21:9": (1536, 640), "16:9": (1344, 768), "3:2": (1216, 832), "5:4": (1152, 896), "1:1": (1024, 1024),
           "4:5": (896, 1152), "2:3": (832, 1216), "9:16": (768, 1344), "9:21": (640, 1536)}
SD3 = {"sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash", "sd3-large", "sd3-large-turbo",
       "sd3-medium"}
SDXL = {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (768, 1344), (1536, 640), (640, 1536)}
IMG_ACCEPT = {"image/*", "application/json"}

# path -> (allowed fields, required fields, file fields, output formats)
V2 = {
    "/v2beta/stable-image/generate/core": (
        {"prompt", "aspect_ratio", "negative_prompt", "seed", "style_preset", "output_format"}, {"prompt"}, set(),
        {"png", "jpeg", "webp"}),
    "/v2beta/stable-image/generate/ultra": (
        {"prompt", "negative_prompt", "aspect_ratio", "seed", "output_format", "style_preset", "strength"},
        {"prompt"}, {"image"}, {"png", "jpeg", "webp"}),
    "/v2beta/stable-image/generate/sd3": (
        {"prompt", "mode", "strength", "aspect_ratio", "model", "seed", "output_format", "style_preset",
         "negative_prompt", "cfg_scale"}, {"prompt"}, {"image"}, {"png", "jpeg"}),
    "/v2beta/stable-image/upscale/fast": ({"output_format"}, set(), {"image"}, {"png", "jpeg", "webp"}),
    "/v2beta/stable-image/upscale/conservative": (
        {"prompt", "negative_prompt", "seed", "output_format", "creativity"}, {"prompt"}, {"image"},
        {"png", "jpeg", "webp"}),
    "/v2beta/stable-image/upscale/creative": (
        {"prompt", "negative_prompt", "output_format", "seed", "creativity", "style_preset"}, {"prompt"}, {"image"},
        {"png", "jpeg", "webp"}),
}


class Reject(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def png(width: int, height: int, fmt: str = "png", color: tuple = (30, 90, 160)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


class FakeStability:
    def __init__(self, api_key: str = "sk-test-key-123", latency: float = 0.0, image_scale: int = 8):
        self.api_key = api_key
        self.latency = latency
        self.delays: list[float] = []  # extra seconds before each answer, in order (then none)
        self.image_scale = image_scale  # real sizes divided by this, to keep tests fast
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[int, dict[str, str], bytes | dict]] = []  # answers to give before normal ones
        self.filtered = False
        self.polls_before_done = 2
        self.connections = 0
        self._jobs: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._server: LoopbackServer | None = None

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> str:
        def connected():
            with self._lock:
                self.connections += 1

        self._server = LoopbackServer(self._handle, connected)
        return self._server.url

    def stop(self) -> None:
        if self._server:
            self._server.stop()

    # --- request handling --------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        record = {"method": h.command, "path": h.path, "headers": {k.lower(): v for k, v in h.headers.items()},
                  "fields": {}, "files": {}, "json": None}
        try:
            self._parse_body(h, body, record)
        except Reject as exc:
            record["rejected"] = str(exc)
        with self._lock:
            self.requests.append(record)
            scripted = self.script.pop(0) if self.script else None
            delay = self.latency + (self.delays.pop(0) if self.delays else 0.0)
        if delay:
            time.sleep(delay)
        if "rejected" in record:
            return self._send_error(h, 400, record["rejected"])
        if scripted is not None:
            status, headers, payload = scripted
            data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
            return self._send(h, status, data, {"Content-Type": "application/json"} | headers)
        try:
            self._check_auth(record)
            status, headers, data = self._route(record)
        except Reject as exc:
            return self._send_error(h, exc.status, str(exc))
        self._send(h, status, data, headers)

    def _parse_body(self, h, body: bytes, record: dict) -> None:
        ctype = h.headers.get("Content-Type", "")
        if h.command == "GET":
            if body:
                raise Reject(400, "GET with a body")
            return
        if ctype.startswith("application/json"):
            record["json"] = json.loads(body)
        elif ctype.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if part.get_filename() is not None:
                    record["files"][name] = payload
                else:
                    record["fields"][name] = payload.decode("utf-8")
        else:
            raise Reject(400, f"content-type: unsupported {ctype!r}")

    def _check_auth(self, record: dict) -> None:
        if record["headers"].get("authorization") != f"Bearer {self.api_key}":
            raise Reject(401, "authorization: invalid api key")
        if record["headers"].get("stability-client-id") != "abby":
            raise Reject(400, "stability-client-id: expected 'abby'")

    def _route(self, r: dict) -> tuple[int, dict, bytes]:
        path, method, accept = r["path"], r["method"], r["headers"].get("accept")
        if path in V2 and method == "POST":
            return self._v2(r, path, accept)
        if path.startswith("/v2beta/results/") and method == "GET":
            return self._result(path.rsplit("/", 1)[1], accept)
        if path.startswith("/v1/generation/") and method == "POST":
            return self._v1(r, path, accept)
        if path == "/v1/user/balance" and method == "GET":
            return 200, {"Content-Type": "application/json"}, json.dumps({"credits": 12.5}).encode()
        raise Reject(404, f"no route {method} {path}")

    def _v2(self, r: dict, path: str, accept: str | None) -> tuple[int, dict, bytes]:
        allowed, required, file_fields, formats = V2[path]
        f, files = r["fields"], r["files"]
        if r["json"] is not None:
            raise Reject(400, "the body must be multipart/form-data")
        for name in required:
            if not f.get(name):
                raise Reject(400, f"{name}: is required")
        extra = set(f) - allowed
        if extra or set(files) - file_fields:
            raise Reject(400, f"unknown fields: {sorted(extra | (set(files) - file_fields))}")
        creative = path.endswith("/creative")
        if creative and accept not in (None, "application/json"):
            raise Reject(400, f"accept: {accept!r} is not valid here")
        if not creative and accept not in IMG_ACCEPT:
            raise Reject(400, f"accept: must be image/* or application/json, got {accept!r}")
        fmt = f.get("output_format", "png")
        if fmt not in formats:
            raise Reject(400, f"output_format: must be one of {sorted(formats)}")
        if "style_preset" in f and f["style_preset"] not in STYLES:
            raise Reject(400, "style_preset: invalid")
        if "aspect_ratio" in f and f["aspect_ratio"] not in ASPECTS:
            raise Reject(400, "aspect_ratio: invalid")
        seed = int(float(f.get("seed", 0)))
        if not 0 <= seed <= 4294967294:
            raise Reject(400, "seed: out of range")
        if path.endswith("/sd3"):
            if f.get("model", "sd3.5-large") not in SD3:
                raise Reject(400, "model: invalid")
            if f.get("mode", "text-to-image") not in ("text-to-image", "image-to-image"):
                raise Reject(400, "mode: invalid")
            i2i = f.get("mode") == "image-to-image"
            if i2i != ("image" in files) or (i2i and "strength" not in f):
                raise Reject(400, "image-to-image needs image and strength, and text-to-image neither")
            if i2i and "aspect_ratio" in f:
                raise Reject(400, "aspect_ratio: not valid for image-to-image")
        if path.endswith("/ultra") and ("image" in files) != ("strength" in f):
            raise Reject(400, "strength: is required when image is provided")
        if "strength" in f and not 0 <= float(f["strength"]) <= 1:
            raise Reject(400, "strength: out of range")
        if "upscale" in path:
            if "image" not in files:
                raise Reject(400, "image: is required")
            size = self._image_size(files["image"])
            rules = {"fast": (32, 1536, 1024, 1_048_576), "conservative": (64, 10**9, 4096, 9_437_184),
                     "creative": (64, 10**9, 4096, 1_048_576)}[path.rsplit("/", 1)[1]]
            w, h = size
            if not (rules[0] <= min(w, h) and max(w, h) <= rules[1] and rules[2] <= w * h <= rules[3]):
                raise Reject(400, f"image: {w}x{h} breaks the size rules")
            creativity = f.get("creativity")
            if creativity is not None:
                low = 0.2 if path.endswith("conservative") else 0.1
                if not low <= float(creativity) <= 0.5:
                    raise Reject(400, "creativity: out of range")
            out = (w * 4, h * 4)
            if creative:
                job = f"{random.getrandbits(256):064x}"
                self._jobs[job] = {"polls": 0, "size": out, "fmt": fmt, "seed": seed}
                return 200, {"Content-Type": "application/json"}, json.dumps({"id": job}).encode()
            return self._image_answer(out, fmt, seed, accept, scale=1)  # upscales come back at full size
        else:
            if "image" in files:
                self._image_size(files["image"])
                out = ASPECTS["1:1"]
            else:
                out = ASPECTS[f.get("aspect_ratio", "1:1")]
        return self._image_answer(out, fmt, seed, accept)

    def _image_answer(self, size, fmt, seed, accept, scale=None):
        seed = seed or random.randint(1, 4294967294)
        finish = "CONTENT_FILTERED" if self.filtered else "SUCCESS"
        scale = scale or self.image_scale
        w, h = max(1, size[0] // scale), max(1, size[1] // scale)
        data = png(w, h, fmt)
        if accept == "application/json":
            body = {"image": base64.b64encode(data).decode(), "finish_reason": finish, "seed": seed}
            return 200, {"Content-Type": f"application/json; type=image/{fmt}"}, json.dumps(body).encode()
        return 200, {"Content-Type": f"image/{fmt}", "finish-reason": finish, "seed": str(seed),
                     "x-request-id": "req-123"}, data

    def _result(self, job_id: str, accept: str | None) -> tuple[int, dict, bytes]:
        if len(job_id) != 64:
            raise Reject(400, "id: must be 64 characters")
        if accept not in ("*/*", "application/json"):
            raise Reject(400, f"accept: must be */* or application/json, got {accept!r}")
        job = self._jobs.get(job_id)
        if job is None:
            raise Reject(404, "id: the generation either does not exist or has expired")
        job["polls"] += 1
        if job["polls"] <= self.polls_before_done:
            return 202, {"Content-Type": "application/json"}, json.dumps(
                {"id": job_id, "status": "in-progress"}).encode()
        return self._image_answer(job["size"], job["fmt"], job["seed"], None if accept == "*/*" else accept, scale=1)

    def _v1(self, r: dict, path: str, accept: str | None) -> tuple[int, dict, bytes]:
        if accept not in ("application/json", "image/png"):
            raise Reject(400, f"accept: must be application/json or image/png, got {accept!r}")
        parts = path.split("/")
        engine, op = parts[3], "/".join(parts[4:])
        if op == "text-to-image":
            body = r["json"]
            if body is None:
                raise Reject(400, "text-to-image takes a JSON body")
            prompts = body.get("text_prompts")
            if not prompts or not all(isinstance(p, dict) and p.get("text") for p in prompts):
                raise Reject(400, "text_prompts: is required")
            size = (body.get("width", 512), body.get("height", 512))
            if "xl" in engine and size not in SDXL:
                raise Reject(400, "width/height: not an SDXL size")
            samples = body.get("samples", 1)
            seed = body.get("seed", 0)
            extra = set(body) - {"text_prompts", "width", "height", "samples", "seed", "style_preset", "cfg_scale",
                                 "steps", "sampler", "clip_guidance_preset", "extras"}
        elif op == "image-to-image":
            f, files = r["fields"], r["files"]
            if r["json"] is not None or "init_image" not in files or not f.get("text_prompts[0][text]"):
                raise Reject(400, "init_image and text_prompts[0][text] are required, as multipart")
            if f.get("init_image_mode", "IMAGE_STRENGTH") not in ("IMAGE_STRENGTH", "STEP_SCHEDULE"):
                raise Reject(400, "init_image_mode: invalid")
            size = self._image_size(files["init_image"])
            if "xl" in engine and size not in SDXL:
                raise Reject(400, "init_image: dimensions are not an SDXL size")
            samples, seed = int(f.get("samples", 1)), int(f.get("seed", 0))
            extra = {k for k in f if not k.startswith("text_prompts[")} - {
                "init_image_mode", "image_strength", "samples", "seed", "style_preset", "cfg_scale", "steps",
                "step_schedule_start", "step_schedule_end", "sampler", "clip_guidance_preset"}
        elif op == "image-to-image/upscale":
            f, files = r["fields"], r["files"]
            if "image" not in files or ("width" in f and "height" in f):
                raise Reject(400, "image is required, and only one of width or height")
            w, h = self._image_size(files["image"])
            width = int(f.get("width", 2 * w))
            if width < 512:
                raise Reject(400, "width: must be at least 512")
            size, samples, seed = (width, round(h * width / w)), 1, 0
            extra = set(f) - {"width", "height"}
        else:
            raise Reject(404, f"no v1 operation {op}")
        if extra:
            raise Reject(400, f"unknown fields: {sorted(extra)}")
        if not engine.startswith(("stable-diffusion", "esrgan")):
            raise Reject(404, f"engine {engine} not found")
        finish = "CONTENT_FILTERED" if self.filtered else "SUCCESS"
        scale = 1 if op.endswith("upscale") else self.image_scale
        artifacts = [{"base64": base64.b64encode(png(size[0] // scale, size[1] // scale)).decode(),
                      "finishReason": finish, "seed": seed or random.randint(1, 4294967295)} for _ in range(samples)]
        return 200, {"Content-Type": "application/json"}, json.dumps({"artifacts": artifacts}).encode()

    @staticmethod
    def _image_size(data: bytes) -> tuple[int, int]:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return img.size
        except Exception:
            raise Reject(400, "image: not a valid image") from None

    def _send_error(self, h, status: int, message: str) -> None:
        names = {400: "bad_request", 401: "unauthorized", 404: "not_found"}
        body = {"id": "e" * 32, "name": names.get(status, "error"), "errors": [message]}
        self._send(h, status, json.dumps(body).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def _send(h, status: int, data: bytes, headers: dict[str, str]) -> None:
        send(h, status, data, headers)


if __name__ == "__main__":  # run by hand: python tests/fake_stability.py
    server = FakeStability()
    print(server.start(), flush=True)
    threading.Event().wait()
