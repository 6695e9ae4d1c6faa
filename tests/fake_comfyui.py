"""A fake ComfyUI server on loopback, as strict as the real one where abby depends on it.

Routes: ``POST /prompt``, ``GET /history/{id}``, ``GET /view``, ``POST /upload/image``,
``POST /queue``, each also under ``/api`` (as upstream ComfyUI serves them). With
``api_key`` set it plays Comfy Cloud instead: only ``/api/*``, an ``X-API-Key`` header
required, jobs followed with ``GET /api/jobs/{id}``, and ``/api/view`` answering with a
302 to a signed URL on a second loopback server (another origin), which records the
headers it receives.

Graphs are validated the way ComfyUI does it: an unknown node class is a 400
``invalid_prompt`` with empty ``node_errors``; a missing or mistyped input is a 400 with
``node_errors[id].errors[]``; a graph with no output node is a 400 ``prompt_no_outputs``;
a body that is not JSON is a 500. Inputs must be typed (a number sent as text is refused,
stricter than ComfyUI, so tests prove abby types its placeholders). A graph "runs" in a
background thread and writes real small PNGs; resubmitting an identical graph is served
from the cache (no new files; the history lists the earlier ones). Knobs: ``fail`` (an
execution error in the KSampler), ``no_outputs``, ``extra_images``, ``run_time``,
``never_finish``.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from loopback import LoopbackServer, send

CHECKPOINTS = ["sd15.safetensors", "sdxl.safetensors"]
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m"]
SCHEDULERS = ["normal", "karras"]
INT, FLOAT, STR = "INT", "FLOAT", "STRING"
# class -> {input: kind}; a kind is INT/FLOAT/STRING, a list (a choice), or a link type in lower case.
NODES: dict[str, dict[str, Any]] = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINTS},
    "EmptyLatentImage": {"width": INT, "height": INT, "batch_size": INT},
    "CLIPTextEncode": {"text": STR, "clip": "clip"},
    "KSampler": {"seed": INT, "steps": INT, "cfg": FLOAT, "sampler_name": SAMPLERS, "scheduler": SCHEDULERS,
                 "denoise": FLOAT, "model": "model", "positive": "conditioning", "negative": "conditioning",
                 "latent_image": "latent"},
    "VAEDecode": {"samples": "latent", "vae": "vae"},
    "VAEEncode": {"pixels": "image", "vae": "vae"},
    "RepeatLatentBatch": {"samples": "latent", "amount": INT},
    "LoadImage": {"image": "input_file"},
    "ImageScaleBy": {"image": "image", "upscale_method": ["lanczos", "bicubic"], "scale_by": FLOAT},
    "ImageScale": {"image": "image", "upscale_method": ["lanczos", "bicubic"], "width": INT, "height": INT,
                   "crop": ["disabled", "center"]},
    "SaveImage": {"images": "image", "filename_prefix": STR},
    "PreviewImage": {"images": "image"},
}
OUTPUT_NODES = {"SaveImage", "PreviewImage"}
RANGES = {("EmptyLatentImage", "width"): (16, 16384), ("EmptyLatentImage", "height"): (16, 16384),
          ("EmptyLatentImage", "batch_size"): (1, 4096), ("KSampler", "steps"): (1, 10000),
          ("KSampler", "cfg"): (0, 100), ("KSampler", "denoise"): (0, 1),
          ("KSampler", "seed"): (0, 0xFFFFFFFFFFFFFFFF)}


class Reject(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(str(body))
        self.status, self.body = status, body


def png(width: int, height: int, color: tuple = (40, 120, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def _invalid(message: str, details: str = "", node_errors: Any = None, kind: str = "invalid_prompt") -> Reject:
    return Reject(400, {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                        "node_errors": {} if node_errors is None else node_errors})


class FakeComfyUI:
    def __init__(self, api_key: str | None = None):
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.bucket_requests: list[dict[str, Any]] = []
        self.files: dict[tuple[str, str], bytes] = {}  # (type, name) -> bytes
        self.history: dict[str, dict[str, Any]] = {}
        self.queue_deleted: list[str] = []
        self.run_time = 0.05
        self.fail = False
        self.no_outputs = False
        self.extra_images = 0
        self.never_finish = False
        self._cache: dict[str, dict[str, Any]] = {}  # graph -> outputs of its first run
        self._counter = 0
        self._lock = threading.Lock()
        self._servers: list[LoopbackServer] = []

    # --- lifecycle ------------------------------------------------------------------------
    def _serve(self, handle) -> str:
        server = LoopbackServer(handle)
        self._servers.append(server)
        return server.url

    def start(self) -> str:
        self.url = self._serve(self._handle)
        self.bucket_url = self._serve(self._bucket)  # another origin, like a cloud storage host
        return self.url

    def stop(self) -> None:
        for server in self._servers:
            server.stop()

    # --- plumbing ---------------------------------------------------------------------------
    @staticmethod
    def _send(h, status: int, body: Any, ctype: str = "application/json", headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if ctype == "application/json" else body
        send(h, status, data, {"Content-Type": ctype, **(headers or {})})

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        url = urlsplit(h.path)
        record = {"method": h.command, "path": url.path, "query": parse_qs(url.query, keep_blank_values=True),
                  "headers": {k.lower(): v for k, v in h.headers.items()}, "body": body}
        with self._lock:
            self.requests.append(record)
        try:
            status, answer, ctype, headers = self._route(record, h.headers.get("Content-Type", ""))
        except Reject as exc:
            status, answer, ctype, headers = exc.status, exc.body, "application/json", {}
            if not isinstance(answer, dict):
                answer, ctype = str(answer).encode(), "text/plain"
        self._send(h, status, answer, ctype, headers)

    def _bucket(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        self.bucket_requests.append({"path": url.path, "headers": {k.lower(): v for k, v in h.headers.items()}})
        name = url.path.rpartition("/")[2]
        data = self.files.get(("output", name))
        if data is None or parse_qs(url.query).get("sig") != ["ok"]:
            return self._send(h, 403, b"<Error>AccessDenied</Error>", "application/xml")
        self._send(h, 200, data, "image/png")

    def _route(self, r: dict, ctype: str):
        path = r["path"]
        if self.api_key is not None:  # Comfy Cloud: /api only, and the key on every call
            if not path.startswith("/api/"):
                raise Reject(404, {"code": "not_found", "message": "not found"})
            if r["headers"].get("x-api-key") != self.api_key:
                raise Reject(401, {"code": "unauthorized", "message": "invalid or missing API key"})
            path = path[4:]
        elif path.startswith("/api/"):
            path = path[4:]
        method = r["method"]
        if method == "POST" and path == "/prompt":
            return (200, self._prompt(r["body"]), "application/json", {})
        if method == "GET" and path.startswith("/history/") and self.api_key is None:
            pid = path.rpartition("/")[2]
            entry = self.history.get(pid)
            return 200, ({pid: entry["entry"]} if entry and entry["done"] else {}), "application/json", {}
        if method == "GET" and path.startswith("/jobs/") and self.api_key is not None:
            return (200, self._job(path.rpartition("/")[2]), "application/json", {})
        if method == "GET" and path == "/view":
            return self._view(r["query"])
        if method == "POST" and path == "/upload/image":
            return 200, self._upload(r["body"], ctype), "application/json", {}
        if method == "POST" and path == "/queue":
            self.queue_deleted += json.loads(r["body"]).get("delete", [])
            return 200, b"", "text/plain", {}
        raise Reject(404, b"404: Not Found")

    # --- routes ---------------------------------------------------------------------------------
    def _prompt(self, raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except ValueError:
            raise Reject(500, b"500 Internal Server Error\n\nServer got itself in trouble") from None
        graph = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(graph, dict):
            raise _invalid("No prompt provided", kind="no_prompt")
        if not isinstance(body.get("client_id", ""), str):
            raise Reject(400, {"error": "client_id must be a string"})
        outputs = self.validate(graph)
        pid = str(uuid.uuid4())
        with self._lock:
            self.history[pid] = {"done": False, "entry": None, "graph": graph}
        threading.Thread(target=self._execute, args=(pid, graph, outputs), daemon=True).start()
        return {"prompt_id": pid, "number": len(self.history), "node_errors": {}}

    def validate(self, graph: dict) -> list[str]:
        for node_id, node in graph.items():
            cls = node.get("class_type") if isinstance(node, dict) else None
            if cls not in NODES:
                raise _invalid(f"Cannot execute because node {cls} does not exist.", f"Node ID '#{node_id}'")
        outputs = [nid for nid, node in graph.items() if node["class_type"] in OUTPUT_NODES]
        if not outputs:
            raise Reject(400, {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                                         "details": "", "extra_info": {}}, "node_errors": []})
        errors: dict[str, Any] = {}
        for node_id, node in graph.items():
            problems = []
            inputs = node.get("inputs") or {}
            for name, kind in NODES[node["class_type"]].items():
                if name not in inputs:
                    problems.append(("required_input_missing", "Required input is missing", name, name))
                    continue
                value = inputs[name]
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    if value[0] not in graph:
                        problems.append(("invalid_link", "Node linked to does not exist", name, name))
                    continue
                problem = self._check_value(node["class_type"], name, kind, value)
                if problem:
                    problems.append(problem)
            if problems:
                errors[node_id] = {"errors": [{"type": t, "message": m, "details": d, "extra_info": {"input_name": n}}
                                              for t, m, d, n in problems],
                                   "dependent_outputs": outputs, "class_type": node["class_type"]}
        if errors:
            raise _invalid("Prompt outputs failed validation", node_errors=errors,
                           kind="prompt_outputs_failed_validation")
        return outputs

    def _check_value(self, cls: str, name: str, kind: Any, value: Any):
        if isinstance(kind, list):
            if value not in kind:
                return ("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {kind}", name)
        elif kind == "input_file":
            if ("input", value) not in self.files:
                return ("custom_validation_failed", "Custom validation failed for node",
                        f"image - Invalid image file: {value}", name)
        elif kind == INT:
            if isinstance(value, bool) or not isinstance(value, int):
                return ("invalid_input_type", "Failed to convert an input value to a INT value", f"{name}, {value}",
                        name)
        elif kind == FLOAT:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return ("invalid_input_type", "Failed to convert an input value to a FLOAT value",
                        f"{name}, {value}", name)
        elif kind == STR:
            if not isinstance(value, str):
                return ("invalid_input_type", "Failed to convert an input value to a STRING value", name, name)
        else:
            return ("invalid_link", f"Input {name} must be linked to a {kind.upper()} output", name, name)
        low, high = RANGES.get((cls, name), (None, None))
        if low is not None and not low <= value <= high:
            return ("value_bigger_than_max" if value > high else "value_smaller_than_min",
                    f"Value {value} out of range", f"{name}", name)
        return None

    # --- "running" a graph -------------------------------------------------------------------------
    def _images(self, graph: dict, node_id: str) -> tuple[int, int, int]:
        """(width, height, batch) flowing out of a node, following its links."""
        node = graph[node_id]
        cls, inputs = node["class_type"], node["inputs"]

        def up(name):
            return self._images(graph, inputs[name][0])

        if cls == "EmptyLatentImage":
            return inputs["width"], inputs["height"], inputs["batch_size"]
        if cls == "LoadImage":
            with Image.open(io.BytesIO(self.files[("input", inputs["image"])])) as img:
                return img.width, img.height, 1
        if cls == "RepeatLatentBatch":
            w, h, b = up("samples")
            return w, h, b * inputs["amount"]
        if cls == "ImageScaleBy":
            w, h, b = up("image")
            return round(w * inputs["scale_by"]), round(h * inputs["scale_by"]), b
        if cls == "ImageScale":
            return inputs["width"], inputs["height"], up("image")[2]
        source = {"KSampler": "latent_image", "VAEDecode": "samples", "VAEEncode": "pixels"}[cls]
        return up(source)

    def _execute(self, pid: str, graph: dict, output_nodes: list[str]) -> None:
        time.sleep(self.run_time)
        while self.never_finish:
            time.sleep(0.05)
        status = {"status_str": "success", "completed": True,
                  "messages": [["execution_start", {"prompt_id": pid, "timestamp": 0}]]}
        outputs: dict[str, Any] = {}
        key = json.dumps(graph, sort_keys=True)
        if self.fail:
            status = {"status_str": "error", "completed": False, "messages": status["messages"] + [
                ["execution_error", {"prompt_id": pid, "node_id": "3", "node_type": "KSampler", "executed": [],
                                     "exception_message": "Allocation on device 0 would exceed allowed memory.\n"
                                                          "(out of memory)",
                                     "exception_type": "torch.OutOfMemoryError", "traceback": ["..."],
                                     "current_inputs": {}, "current_outputs": {}}]]}
        elif key in self._cache:  # ComfyUI's cache: nothing runs, the earlier files are listed again
            outputs = self._cache[key]
            status["messages"].append(["execution_cached", {"nodes": list(graph), "prompt_id": pid}])
        elif not self.no_outputs:
            for node_id in output_nodes:
                node = graph[node_id]
                w, h, batch = self._images(graph, node["inputs"]["images"][0])
                kind = "output" if node["class_type"] == "SaveImage" else "temp"
                prefix = node["inputs"].get("filename_prefix", "ComfyUI")
                items = []
                for _ in range(batch + (self.extra_images if kind == "output" else 0)):
                    with self._lock:
                        self._counter += 1
                        name = f"{prefix}_{self._counter:05d}_.png"
                    self.files[(kind, name)] = png(w, h)
                    items.append({"filename": name, "subfolder": "", "type": kind})
                outputs[node_id] = {"images": items}
            self._cache[key] = outputs
        if status["status_str"] == "success":
            status["messages"].append(["execution_success", {"prompt_id": pid, "timestamp": 1}])
        entry = {"prompt": [1, pid, graph, {}, output_nodes], "outputs": outputs, "status": status, "meta": {}}
        with self._lock:
            self.history[pid].update(done=True, entry=entry)

    def _job(self, pid: str) -> dict:
        item = self.history.get(pid)
        if item is None:
            raise Reject(404, {"code": "not_found", "message": "job not found"})
        base = {"id": pid, "create_time": 1, "update_time": 2}
        if not item["done"]:
            return base | {"status": "in_progress"}
        entry = item["entry"]
        if entry["status"]["status_str"] == "error":
            error = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
            return base | {"status": "failed", "execution_error": error}
        return base | {"status": "completed", "outputs": entry["outputs"]}

    def _view(self, query: dict):
        name, kind = query.get("filename", [""])[0], query.get("type", ["output"])[0]
        if "subfolder" not in query or "filename" not in query:
            raise Reject(400, b"400: Bad Request")
        data = self.files.get((kind, name))
        if data is None:
            raise Reject(404, b"404: Not Found")
        if self.api_key is not None:
            return 302, b"", "text/plain", {"Location": f"{self.bucket_url}/bucket/{name}?sig=ok"}
        return 200, data, "image/png", {"Content-Disposition": f'filename="{name}"'}

    def _upload(self, body: bytes, ctype: str) -> dict:
        if not ctype.startswith("multipart/form-data"):
            raise Reject(400, b"400: Bad Request")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
        fields, image = {}, None
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename() is not None:
                if name == "image":
                    image = (part.get_filename(), part.get_payload(decode=True))
            else:
                fields[name] = part.get_content().strip()
        if image is None:
            raise Reject(400, b"400: Bad Request")
        kind = fields.get("type", "input")
        filename, data = image
        stem, dot, ext = filename.rpartition(".")
        n = 1
        while (kind, filename) in self.files and self.files[(kind, filename)] != data:  # never replaced
            filename = f"{stem} ({n}){dot}{ext}"
            n += 1
        self.files[(kind, filename)] = data
        return {"name": filename, "subfolder": "", "type": kind}
