"""A fake OpenAI Images API on loopback, as strict as the official OpenAPI document.

It serves ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits``
(multipart) and refuses what the document refuses: a missing prompt or image,
unknown fields, a model, size, ``n`` or option the model does not take, and a
wrong ``Authorization``. Errors come as OpenAI's ``{"error": {...}}`` bodies.
Images are real PNG/JPEG/WebP files made with Pillow, returned as ``b64_json``,
at 1/8 of the size asked for to keep tests fast. A test queues answers to give
first in ``script`` (``FakeOpenAI.error(...)`` builds one): 429 with
``retry-after-ms``, 500, 400 ``moderation_blocked``...
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from PIL import Image

from loopback import LoopbackServer, send

GPT = {"gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"}
SIZES = {"dall-e-2": {"256x256", "512x512", "1024x1024"}, "dall-e-3": {"1024x1024", "1792x1024", "1024x1792"}}
SIZES |= {m: {"1024x1024", "1536x1024", "1024x1536", "auto"} for m in GPT}
QUALITY = {"dall-e-2": {"standard", "auto"}, "dall-e-3": {"standard", "hd", "auto"}}
QUALITY |= {m: {"low", "medium", "high", "auto"} for m in GPT}
GENERATION_FIELDS = {"prompt", "model", "n", "quality", "response_format", "output_format", "output_compression",
                     "stream", "partial_images", "size", "moderation", "background", "style", "user"}
EDIT_FIELDS = {"prompt", "model", "n", "quality", "response_format", "output_format", "output_compression",
               "stream", "partial_images", "size", "background", "user", "input_fidelity"}
SCALE = 8


class Reject(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind


def picture(width: int, height: int, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 90)).save(buf, {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


class FakeOpenAI:
    def __init__(self, api_key: str = "sk-test-openai-123"):
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[int, dict[str, str], dict]] = []  # answers to give before normal ones
        self.short_by = 0  # answer with this many images fewer than asked
        self._lock = threading.Lock()
        self._server: LoopbackServer | None = None
        self._ids = 0

    @staticmethod
    def error(status: int, message: str, code: str | None = None, headers: dict | None = None,
              kind: str = "invalid_request_error") -> tuple[int, dict, dict]:
        return status, headers or {}, {"error": {"message": message, "type": kind, "param": None, "code": code}}

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> str:
        self._server = LoopbackServer(self._handle)
        return self._server.url + "/v1"

    def stop(self) -> None:
        if self._server:
            self._server.stop()

    # --- request handling --------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        record = {"method": h.command, "path": h.path, "headers": {k.lower(): v for k, v in h.headers.items()},
                  "fields": {}, "files": {}, "json": None}
        with self._lock:
            self.requests.append(record)
            scripted = self.script.pop(0) if self.script else None
            self._ids += 1
            request_id = f"req_{self._ids:04d}"
        try:
            self._check_auth(record)
            if scripted is not None:
                status, headers, payload = scripted
                return self._send(h, status, json.dumps(payload).encode(),
                                  {"Content-Type": "application/json", "x-request-id": request_id} | headers)
            self._parse_body(h, body, record)
            answer = self._route(record)
        except Reject as exc:
            error = {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.code}
            return self._send(h, exc.status, json.dumps({"error": error}).encode(),
                              {"Content-Type": "application/json", "x-request-id": request_id})
        self._send(h, 200, json.dumps(answer).encode(), {"Content-Type": "application/json",
                                                         "x-request-id": request_id})

    def _check_auth(self, record: dict) -> None:
        auth = record["headers"].get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            given = auth.removeprefix("Bearer ")
            # The real API quotes the start and end of a wrong key back.
            raise Reject(401, f"Incorrect API key provided: {given[:8]}{'*' * 20}{given[-4:]}. You can find your "
                              "API key at https://platform.openai.com/account/api-keys.", code="invalid_api_key")

    def _parse_body(self, h, body: bytes, record: dict) -> None:
        ctype = h.headers.get("Content-Type", "")
        if ctype.startswith("application/json"):
            record["json"] = json.loads(body)
        elif ctype.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if part.get_filename() is not None:
                    record["files"][name] = (part.get_filename(), part.get_content_type(), payload)
                else:
                    record["fields"][name] = payload.decode("utf-8")
        elif h.command == "POST":
            raise Reject(400, f"Unsupported content type: {ctype!r}")

    def _route(self, r: dict) -> dict:
        if r["method"] == "POST" and r["path"] == "/v1/images/generations":
            if r["json"] is None:
                raise Reject(400, "The body must be JSON")
            return self._generate(dict(r["json"]), edit=False)
        if r["method"] == "POST" and r["path"] == "/v1/images/edits":
            if r["json"] is not None:
                raise Reject(400, "This fake takes only multipart edits")
            fields: dict[str, Any] = dict(r["fields"])
            for name in ("n", "output_compression", "partial_images"):
                if name in fields:
                    fields[name] = int(fields[name])
            files = r["files"]
            if set(files) - {"image", "image[]", "mask"}:
                raise Reject(400, f"Unknown parameter: '{sorted(set(files) - {'image', 'image[]', 'mask'})[0]}'.")
            images = [files[k] for k in ("image", "image[]") if k in files]
            if not images:
                raise Reject(400, "Missing required parameter: 'image'.", param="image")
            self._check_input(images[0], fields.get("model", "gpt-image-1.5"))
            return self._generate(fields, edit=True)
        raise Reject(404, f"Invalid URL ({r['method']} {r['path']})")

    @staticmethod
    def _check_input(image: tuple[str, str, bytes], model: str) -> None:
        filename, ctype, data = image
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                fmt, size = img.format, img.size
        except Exception:
            raise Reject(400, "Invalid image file", param="image") from None
        if model == "dall-e-2" and (fmt != "PNG" or size[0] != size[1] or len(data) >= 4_000_000):
            raise Reject(400, "Uploaded image must be a PNG, square and less than 4 MB.", param="image")
        if fmt not in ("PNG", "JPEG", "WEBP") or ctype not in ("image/png", "image/jpeg", "image/webp"):
            raise Reject(400, f"Invalid file '{filename}': unsupported mimetype ('{ctype}').", param="image")

    def _generate(self, body: dict, edit: bool) -> dict:
        allowed = EDIT_FIELDS if edit else GENERATION_FIELDS
        for name in body:
            if name not in allowed:
                raise Reject(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise Reject(400, "Missing required parameter: 'prompt'.", param="prompt",
                         code="missing_required_parameter")
        model = body.get("model", "gpt-image-1.5" if edit else "dall-e-2")
        if model not in SIZES or (edit and model == "dall-e-3"):
            raise Reject(400, f"Invalid value: '{model}'. The model does not exist or you lack access.", param="model")
        gpt = model in GPT
        limit = 32000 if gpt else 4000 if model == "dall-e-3" else 1000
        if len(prompt) > limit:
            raise Reject(400, f"Invalid 'prompt': string too long. Expected at most {limit} characters.")
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= (1 if model == "dall-e-3" else 10):
            raise Reject(400, f"Invalid 'n': {n!r} for {model}.", param="n")
        size = body.get("size", "auto" if gpt else "1024x1024")
        if size not in SIZES[model]:
            raise Reject(400, f"Invalid value: '{size}'. Supported values are: {sorted(SIZES[model])}.", param="size")
        quality = body.get("quality", "auto")
        if quality not in QUALITY[model]:
            raise Reject(400, f"Invalid 'quality' for {model}: {quality!r}.", param="quality")
        gpt_only = {"output_format", "output_compression", "background", "moderation", "input_fidelity"}
        if not gpt and gpt_only & set(body):
            raise Reject(400, f"Unknown parameter for {model}: '{sorted(gpt_only & set(body))[0]}'.")
        if gpt and "response_format" in body:
            raise Reject(400, "Unknown parameter: 'response_format'.", param="response_format")
        if "style" in body and (model != "dall-e-3" or body["style"] not in ("vivid", "natural")):
            raise Reject(400, "Invalid 'style'.", param="style")
        fmt = body.get("output_format", "png")
        if fmt not in ("png", "jpeg", "webp"):
            raise Reject(400, f"Invalid 'output_format': {fmt!r}.", param="output_format")
        if body.get("background", "auto") not in ("transparent", "opaque", "auto") or (
                body.get("background") == "transparent" and fmt == "jpeg"):
            raise Reject(400, "Invalid 'background'.", param="background")
        if body.get("moderation", "auto") not in ("low", "auto"):
            raise Reject(400, "Invalid 'moderation'.", param="moderation")
        if "input_fidelity" in body and (model == "gpt-image-1-mini" or body["input_fidelity"] not in ("high", "low")):
            raise Reject(400, "Invalid 'input_fidelity'.", param="input_fidelity")
        if body.get("stream") or body.get("partial_images"):
            raise Reject(400, "This fake does not stream")
        if not gpt and body.get("response_format") != "b64_json":
            raise Reject(400, "This fake gives no URLs: ask for response_format b64_json")
        w, h = (1024, 1024) if size == "auto" else map(int, size.split("x"))
        data = base64.b64encode(picture(w // SCALE, h // SCALE, fmt)).decode()
        items = [{"b64_json": data} | ({"revised_prompt": f"{prompt}, revised"} if model == "dall-e-3" else {})
                 for _ in range(max(0, n - self.short_by))]
        answer: dict[str, Any] = {"created": 1_760_000_000, "data": items}
        if gpt:
            answer |= {"output_format": fmt, "quality": "medium" if quality == "auto" else quality,
                       "background": "opaque", "size": "1024x1024" if size == "auto" else size,
                       "usage": {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50,
                                 "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}}
        return answer

    @staticmethod
    def _send(h, status: int, data: bytes, headers: dict[str, str]) -> None:
        send(h, status, data, headers)


if __name__ == "__main__":  # run by hand: python tests/fake_openai.py
    server = FakeOpenAI()
    print(server.start(), flush=True)
    threading.Event().wait()
