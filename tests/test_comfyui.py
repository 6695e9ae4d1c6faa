"""The ComfyUI provider: exact requests and every error path with httpx.MockTransport, request
bodies against the API documents, the strict fake server, and the real CLI end to end."""

from __future__ import annotations

import asyncio
import io
import json
import uuid

import httpx
import pytest
from PIL import Image

from abbycli.errors import (ApiRejected, AuthError, ConfigError, InvalidInput, InvalidRequest, ProviderError,
                            ProviderUnavailable)
from abbycli.generation.generator import ImageGenerator
from abbycli.generation.request import GeneratedImage, ImageRequest
from conftest import run_abby, write_config
from fake_comfyui import FakeComfyUI, png
from spec_check import check_body
from stability_helpers import multipart

KEY = "comfy-cloud-secret-5150"
LOCAL_DOC, CLOUD_DOC = "comfyui-openapi.yaml", "comfy-cloud-openapi.yaml"
ENV = ("COMFY_API_KEY", "COMFYUI_API_HOST")


@pytest.fixture(autouse=True)
def no_comfy_env(monkeypatch):
    for var in ENV:  # the shared isolation does not know this provider's variables yet
        monkeypatch.delenv(var, raising=False)


class Server:
    """A MockTransport handler playing ComfyUI (or Comfy Cloud): it records every request,
    answers /history (or /api/jobs) with ``pending`` empty polls first, then ``outcome``."""

    def __init__(self, images=1, outcome=None, pending=1, cloud=False, prompt_answer=None):
        self.requests: list[httpx.Request] = []
        self.images = [{"filename": f"abby_{i:05d}_.png", "subfolder": "", "type": "output"} for i in range(images)]
        self.outcome, self.pending, self.cloud, self.prompt_answer = outcome, pending, cloud, prompt_answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix("/api") if self.cloud else request.url.path
        if path == "/prompt":
            return self.prompt_answer or httpx.Response(200, json={"prompt_id": "p-1", "number": 3, "node_errors": {}})
        if path == "/upload/image":
            return httpx.Response(200, json={"name": "in.png", "subfolder": "abby", "type": "input"})
        if path in ("/history/p-1", "/jobs/p-1"):
            if self.pending:
                self.pending -= 1
                return httpx.Response(200, json={"id": "p-1", "status": "pending"} if self.cloud else {})
            outputs = {"9": {"images": self.images}}
            if self.cloud:
                return httpx.Response(200, json=self.outcome or {"id": "p-1", "status": "completed",
                                                                 "outputs": outputs})
            return httpx.Response(200, json={"p-1": self.outcome or {
                "outputs": outputs, "status": {"status_str": "success", "completed": True, "messages": []}}})
        if path == "/view":
            if self.cloud:
                return httpx.Response(302, headers={"location": "https://storage.test/b/x.png?sig=1"})
            return httpx.Response(200, content=png(64, 48), headers={"content-type": "image/png"})
        if request.url.host == "storage.test":
            return httpx.Response(200, content=png(64, 48), headers={"content-type": "image/png"})
        if path == "/queue":
            return httpx.Response(200)
        return httpx.Response(404, text="404: Not Found")

    def paths(self):
        return [f"{r.method} {r.url.path}" for r in self.requests]


def gen(server, **config):
    config = {"checkpoint": "sd15.safetensors", "poll_interval": 0.05} | config
    return ImageGenerator(provider="comfyui", configs={"comfyui": config}, transport=httpx.MockTransport(server))


def run(g, req):
    async def go():
        async with g:
            return await g.generate(req)
    return asyncio.run(go())


def t2i(prompt="a red fox", **kw):
    return ImageRequest("text-to-image", prompt=prompt, **kw)


def picture(w=96, h=64) -> bytes:
    return png(w, h)


def workflow_file(tmp_path, graph, name="flow.json"):
    path = tmp_path / name
    path.write_text(json.dumps(graph), encoding="utf-8")
    return str(path)


UPSCALE = {"1": {"class_type": "LoadImage", "inputs": {"image": "$image"}},
           "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "lanczos",
                                                          "scale_by": "$scale"}},
           "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "up"}}}


# --- requests ------------------------------------------------------------------------------------
def test_text_to_image_sends_a_typed_graph_polls_and_fetches_the_image():
    server = Server()
    [image] = run(gen(server, steps=30), t2i(negative_prompt="fog", seed=7, cfg_scale=4.5, width=768,
                                             options={"sampler": "dpmpp_2m"}))
    assert server.paths() == ["POST /prompt", "GET /history/p-1", "GET /history/p-1", "GET /view"]
    body = json.loads(server.requests[0].content)
    graph = body["prompt"]
    assert graph["3"]["inputs"] | {} == {"seed": 7, "steps": 30, "cfg": 4.5, "sampler_name": "dpmpp_2m",
                                         "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                         "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    assert graph["5"]["inputs"] == {"width": 768, "height": 512, "batch_size": 1}
    assert graph["6"]["inputs"]["text"] == "a red fox" and graph["7"]["inputs"]["text"] == "fog"
    assert graph["4"]["inputs"] == {"ckpt_name": "sd15.safetensors"}
    assert uuid.UUID(body["client_id"])
    assert dict(server.requests[3].url.params) == {"filename": "abby_00000_.png", "subfolder": "", "type": "output"}
    assert "x-api-key" not in server.requests[0].headers
    assert isinstance(image, GeneratedImage) and image.format == "png" and image.seed == 7
    assert image.model == "sd15.safetensors" and image.request_id == "p-1" and image.provider == "comfyui"
    assert image.metadata == {"workflow": "built-in text-to-image", "comfyui_output": "abby_00000_.png"}


def test_abby_picks_the_seed_and_a_fresh_client_id_each_run():
    server = Server(pending=0)
    g = gen(server)
    first = g.prepare(t2i())
    assert first.seed is not None and 0 <= first.seed <= 2**32 - 1
    [image] = run(g, first)
    assert image.seed == first.seed == json.loads(server.requests[0].content)["prompt"]["3"]["inputs"]["seed"]
    run(gen(server), t2i(seed=1))
    ids = [json.loads(r.content)["client_id"] for r in server.requests if r.url.path == "/prompt"]
    assert len(set(ids)) == 2


def test_image_to_image_uploads_the_input_and_names_it_in_the_graph():
    server = Server(pending=0)
    data = picture()
    [image] = run(gen(server), ImageRequest("image-to-image", prompt="blue", image=data, strength=0.7, count=1))
    assert server.paths()[:2] == ["POST /upload/image", "POST /prompt"]
    fields, files = multipart(server.requests[0])
    assert fields == {"type": "input"} and files["image"] == data
    assert "filename=\"abby-" in server.requests[0].content.decode("latin-1")
    graph = json.loads(server.requests[1].content)["prompt"]
    assert graph["10"]["inputs"]["image"] == "abby/in.png"  # the returned subfolder/name
    assert graph["3"]["inputs"]["denoise"] == 0.7 and graph["12"]["inputs"]["amount"] == 1
    assert isinstance(image, GeneratedImage)


def test_an_upscale_workflow_gets_the_exact_scale_and_the_result_is_resized_to_it(tmp_path):
    server = Server(pending=0)
    flow = workflow_file(tmp_path, UPSCALE)
    [image] = run(gen(server, upscale_workflow=flow), ImageRequest("upscale", image=picture(100, 50), width=250))
    graph = json.loads(server.requests[1].content)["prompt"]
    assert graph["2"]["inputs"]["scale_by"] == 2.5
    with Image.open(io.BytesIO(image.data)) as img:  # the server's 64x48 made exactly what was asked
        assert img.size == (250, 125)
    assert image.model == "workflow flow.json"


def test_other_formats_are_converted_with_a_note():
    [image] = run(gen(Server(pending=0)), t2i(output_format="webp"))
    assert image.format == "webp" and image.data[8:12] == b"WEBP"
    assert image.notes == ["converted from PNG to WEBP by abby"]


def test_more_images_than_asked_fetches_only_the_first_with_a_note_fewer_fail_the_rest():
    server = Server(images=3, pending=0)
    images = run(gen(server), t2i(count=2))
    assert [type(i) for i in images] == [GeneratedImage, GeneratedImage]
    assert server.paths().count("GET /view") == 2
    assert "the workflow saved 3 images; abby kept the first 2 asked for" in images[0].notes
    assert json.loads(server.requests[0].content)["prompt"]["5"]["inputs"]["batch_size"] == 2
    short = run(gen(Server(images=1, pending=0)), t2i(count=3))
    assert isinstance(short[0], GeneratedImage) and all(isinstance(e, ProviderError) for e in short[1:])
    assert len(short) == 3 and "saved 1 image; 3 were asked for" in str(short[1])


def test_request_bodies_match_the_api_documents():
    for cloud, doc, prefix in ((False, LOCAL_DOC, ""), (True, CLOUD_DOC, "/api")):
        server = Server(pending=0, cloud=cloud)
        run(gen(server, api_key=KEY if cloud else None),
            ImageRequest("image-to-image", prompt="x", image=picture(), count=2, seed=4))
        upload, prompt = server.requests[:2]
        fields, files = multipart(upload)
        check_body(doc, prefix + "/upload/image", "POST", "multipart/form-data", fields | {"image": "<bytes>"})
        check_body(doc, prefix + "/prompt", "POST", "application/json", json.loads(prompt.content))


# --- what the server refuses or fails ------------------------------------------------------------------
NODE_ERRORS = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                         "details": "", "extra_info": {}},
               "node_errors": {"4": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                 "details": "ckpt_name: 'x.safetensors' not in ['a.safetensors']",
                                                 "extra_info": {"input_name": "ckpt_name"}}],
                                     "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"},
                               "3": {"errors": [{"type": "required_input_missing", "message": "Required input is "
                                                 "missing", "details": "model", "extra_info": {"input_name": "model"}}],
                                     "dependent_outputs": ["9"], "class_type": "KSampler"}}}


def test_node_errors_become_one_line_naming_node_and_input_exit_4_not_retried():
    server = Server(prompt_answer=httpx.Response(400, json=NODE_ERRORS))
    [error] = run(gen(server), t2i())
    assert isinstance(error, InvalidRequest) and error.exit_code == 4 and "\n" not in str(error)
    assert str(error) == ("ComfyUI refused the workflow (400): node 4 (CheckpointLoaderSimple) input ckpt_name: "
                          "Value not in list: ckpt_name: 'x.safetensors' not in ['a.safetensors'] (and 1 more)")
    assert server.paths() == ["POST /prompt"]
    unknown = {"error": {"type": "invalid_prompt", "message": "Cannot execute because node Foo does not exist.",
                         "details": "Node ID '#3'", "extra_info": {}}, "node_errors": {}}
    [error] = run(gen(Server(prompt_answer=httpx.Response(400, json=unknown))), t2i())
    assert isinstance(error, InvalidRequest)
    assert str(error).endswith(": Cannot execute because node Foo does not exist. (Node ID '#3')")


def test_an_execution_error_a_graph_with_no_saved_image_and_an_interruption_fail():
    failed = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {}], ["execution_error", {"node_id": "3", "node_type": "KSampler",
                                                      "exception_type": "torch.OutOfMemoryError",
                                                      "exception_message": "out of memory\nmore lines"}]]}}
    [error] = run(gen(Server(outcome=failed)), t2i())
    assert type(error) is ProviderError and error.exit_code == 1
    assert str(error) == "the workflow failed on the server in node 3 (KSampler): OutOfMemoryError: out of memory"
    previews = {"outputs": {"9": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}]}},
                "status": {"status_str": "success", "completed": True, "messages": []}}
    [error] = run(gen(Server(outcome=previews)), t2i())
    assert "saved no images (only previews" in str(error)
    stopped = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                         "messages": [["execution_interrupted", {"node_id": "3"}]]}}
    [error] = run(gen(Server(outcome=stopped)), t2i())
    assert "interrupted" in str(error)


def test_a_time_out_takes_the_prompt_off_the_queue():
    server = Server(pending=10_000)
    [error] = run(gen(server, timeout=1, poll_interval=0.2), t2i())
    assert isinstance(error, ProviderUnavailable) and "did not finish within 1 s" in str(error)
    assert server.paths()[-1] == "POST /queue"
    assert json.loads(server.requests[-1].content) == {"delete": ["p-1"]}


def test_a_cancelled_run_takes_the_prompt_off_the_queue():
    server = Server(pending=10_000)

    async def go():
        async with gen(server) as g:
            task = asyncio.ensure_future(g.generate(t2i()))
            while "GET /history/p-1" not in server.paths():
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    assert server.paths()[-1] == "POST /queue" and json.loads(server.requests[-1].content) == {"delete": ["p-1"]}


def test_a_deleted_cached_file_and_a_wrong_host_read_clearly():
    class Gone(Server):
        def __call__(self, request):
            if request.url.path == "/view":
                self.requests.append(request)
                return httpx.Response(404, text="404: Not Found")
            return super().__call__(request)

    [error] = run(gen(Gone(pending=0)), t2i())
    assert isinstance(error, ApiRejected) and "no longer has the output image abby_00000_.png" in str(error)
    [error] = run(gen(Server(prompt_answer=httpx.Response(404, text="404: Not Found"))), t2i())
    assert "404 (not found) to POST /prompt" in str(error) and "api_host" in str(error)


# --- Comfy Cloud -------------------------------------------------------------------------------------
def test_cloud_uses_the_api_prefix_the_key_jobs_and_fetches_the_redirect_without_the_key():
    server = Server(cloud=True)
    [image] = run(gen(server, api_key=KEY, api_host="https://cloud.test"), t2i(count=1))
    assert server.paths() == ["POST /api/prompt", "GET /api/jobs/p-1", "GET /api/jobs/p-1", "GET /api/view",
                              "GET /b/x.png"]
    assert all(r.headers["x-api-key"] == KEY for r in server.requests[:4])
    assert "x-api-key" not in server.requests[4].headers  # the storage host never sees the key
    assert isinstance(image, GeneratedImage)
    described = gen(server, api_key=KEY, api_host="https://cloud.test").describe(
        gen(server, api_key=KEY).prepare(t2i()))
    assert described[0]["url"] == "https://cloud.test/api/prompt" and described[0]["headers"] == {"X-API-Key": "********"}
    assert KEY not in json.dumps(described)


def test_cloud_failures_refused_keys_and_echoed_keys():
    failed = {"id": "p-1", "status": "failed", "execution_error": {
        "node_id": "8", "node_type": "VAEDecode", "exception_message": "boom", "exception_type": "RuntimeError",
        "traceback": [], "current_inputs": {}, "current_outputs": {}}}
    [error] = run(gen(Server(cloud=True, outcome=failed), api_key=KEY), t2i())
    assert str(error) == "the workflow failed on the server in node 8 (VAEDecode): RuntimeError: boom"
    refused = Server(cloud=True, prompt_answer=httpx.Response(401, json={"code": "unauthorized",
                                                                         "message": f"bad key {KEY}"}))
    [error] = run(gen(refused, api_key=KEY), t2i())
    assert isinstance(error, AuthError) and error.exit_code == 4 and KEY not in str(error)
    assert "COMFY_API_KEY" in str(error)
    broke = Server(cloud=True, prompt_answer=httpx.Response(402, json={"error": "insufficient credits"}))
    [error] = run(gen(broke, api_key=KEY), t2i())
    assert error.exit_code == 4 and "cannot pay" in str(error)


# --- workflow files and values checked before anything is sent ----------------------------------------------
def refused(g, req, kind=InvalidInput):
    with pytest.raises(kind) as caught:
        g.prepare(req)
    return str(caught.value)


def test_workflow_files_are_read_and_checked(tmp_path):
    server = Server()
    ui = workflow_file(tmp_path, {"last_node_id": 9, "nodes": [], "links": []})
    assert "Save (API Format)" in refused(gen(server, text_to_image_workflow=ui), t2i(), ConfigError)
    broken = tmp_path / "broken.json"
    broken.write_text('{"3": {', encoding="utf-8")
    assert "is not valid JSON" in refused(gen(server, text_to_image_workflow=str(broken)), t2i(), ConfigError)
    assert "does not exist" in refused(gen(server, text_to_image_workflow=str(tmp_path / "no.json")), t2i(),
                                       ConfigError)
    odd = workflow_file(tmp_path, {"1": {"inputs": {}}})
    assert "node 1 has no class_type" in refused(gen(server, text_to_image_workflow=odd), t2i(), ConfigError)
    typo = workflow_file(tmp_path, {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "$promt"}}})
    message = refused(gen(server, text_to_image_workflow=typo), t2i(), ConfigError)
    assert "unknown placeholder $promt in node 1 (CLIPTextEncode) input 'text' (did you mean $prompt?)" in message
    assert server.requests == []


def test_values_the_graph_cannot_use_or_lacks_are_refused(tmp_path):
    g = gen(Server())
    fixed = workflow_file(tmp_path, {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "$prompt"}},
                                     "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "$$seed"}}})
    assert refused(gen(Server(), text_to_image_workflow=fixed), t2i(steps=30)) == (
        "--steps is not used by the workflow (flow.json has no $steps placeholder)")
    assert "has no $count" in refused(gen(Server(), text_to_image_workflow=fixed), t2i(count=2))
    no_checkpoint = ImageGenerator(provider="comfyui", configs={"comfyui": {}})
    assert "needs a value for $model: set providers.comfyui.checkpoint or give --model" in refused(
        no_checkpoint, t2i())
    assert "not a multiple of 8" in refused(g, t2i(width=500))
    assert "--style is not accepted" in refused(g, t2i(style_preset="anime"))
    assert "seed must be between 0 and 4294967295" in refused(g, t2i(seed=2**32))
    assert "cfg scale must be between 1 and 30" in refused(g, t2i(cfg_scale=31))
    assert "--option foo" in refused(g, t2i(options={"foo": "1"}))
    assert "no built-in upscale workflow" in refused(g, ImageRequest("upscale", image=picture()), ConfigError)
    needs_image = workflow_file(tmp_path, UPSCALE | {"4": {"class_type": "CLIPTextEncode",
                                                           "inputs": {"text": "$prompt"}}})
    assert "needs a value for $image" in refused(gen(Server(), text_to_image_workflow=needs_image), t2i(), InvalidInput)


def test_a_literal_dollar_is_sent_as_written(tmp_path):
    server = Server(pending=0)
    flow = workflow_file(tmp_path, {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "$prompt"}},
                                    "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "$$seed",
                                                                                "note": "costs $5"}}})
    [image] = run(gen(server, text_to_image_workflow=flow), t2i())
    sent = json.loads(server.requests[0].content)["prompt"]["2"]["inputs"]
    assert sent == {"filename_prefix": "$seed", "note": "costs $5"}
    assert image.seed is None and image.model == "workflow flow.json"  # no $seed, no $model in this graph


# --- the strict fake server ------------------------------------------------------------------------
@pytest.fixture
def fake():
    server = FakeComfyUI()
    server.start()
    yield server
    server.stop()


def live(fake, **config):
    config = {"api_host": fake.url, "checkpoint": "sd15.safetensors", "poll_interval": 0.05} | config
    return ImageGenerator(provider="comfyui", configs={"comfyui": config})


def test_the_fake_server_runs_the_built_in_graphs_and_serves_identical_graphs_from_its_cache(fake):
    first = run(live(fake), t2i(seed=3, count=2, width=64, height=48))
    assert [i.metadata["comfyui_output"] for i in first] == ["abby_00001_.png", "abby_00002_.png"]
    with Image.open(io.BytesIO(first[0].data)) as img:
        assert img.size == (64, 48)
    again = run(live(fake), t2i(seed=3, count=2, width=64, height=48))  # cached: the earlier files again
    assert [i.metadata["comfyui_output"] for i in again] == ["abby_00001_.png", "abby_00002_.png"]
    assert [i.data for i in again] == [i.data for i in first]
    [i2i] = run(live(fake), ImageRequest("image-to-image", prompt="x", image=picture(40, 32)))
    with Image.open(io.BytesIO(i2i.data)) as img:
        assert img.size == (40, 32)


def test_the_fake_server_refuses_like_comfyui(fake):
    [error] = run(live(fake, checkpoint="missing.safetensors"), t2i())
    assert isinstance(error, InvalidRequest) and "node 4 (CheckpointLoaderSimple) input ckpt_name" in str(error)
    fake.extra_images = 2
    images = run(live(fake), t2i(count=1))
    assert len(images) == 1 and "saved 3 images" in images[0].notes[0]


# --- the real CLI -------------------------------------------------------------------------------------
@pytest.fixture
def cfg(tmp_path, fake):
    return write_config(tmp_path / "abby.toml", f"""
[storage]
root = "store"
max_user_daily_gens = 3
[cli]
default_user = "alice"
log_file = "abby.log"
[generation]
provider = "comfyui"
[providers.comfyui]
api_host = "{fake.url}"
checkpoint = "sd15.safetensors"
poll_interval = 0.05
width = 64
height = 64
""")


def abby(cfg, *args, key=None):
    result = run_abby("--config", str(cfg), *args, env={"COMFY_API_KEY": key} if key else {})
    assert "Traceback" not in result.stderr
    if key:
        assert key not in result.stdout + result.stderr, "the API key leaked into the output"
    return result


def test_cli_generates_stores_records_and_describes(cfg, fake, tmp_path):
    result = abby(cfg, "generate", "a lighthouse", "--count", "2", "--negative", "fog", "--json")
    assert result.returncode == 0, result.stderr
    images = json.loads(result.stdout)["images"]
    assert len(images) == 2 and images[0]["seed"] == images[1]["seed"] and images[0]["model"] == "sd15.safetensors"
    info = json.loads(abby(cfg, "info", str(images[0]["id"]), "--json").stdout)
    meta = info["metadata"]
    assert meta["provider"] == "comfyui" and meta["workflow"] == "built-in text-to-image"
    assert meta["negative_prompt"] == "fog" and meta["seed"] == images[0]["seed"] and info["embedded"] == meta
    rows = json.loads(abby(cfg, "history", "--json").stdout)
    assert [r["provider"] for r in rows] == ["comfyui", "comfyui"]
    sent = len(fake.requests)
    dry = abby(cfg, "generate", "a lighthouse", "--dry-run")
    assert dry.returncode == 0 and f"POST {fake.url}/prompt" in dry.stdout and "ckpt_name" in dry.stdout
    assert len(fake.requests) == sent


def test_cli_failures_are_refunded_with_their_exit_codes(cfg, fake, tmp_path):
    fake.fail = True
    failed = abby(cfg, "generate", "x")
    assert failed.returncode == 1 and "node 3 (KSampler): OutOfMemoryError" in failed.stderr
    fake.fail = False
    wrong = abby(cfg, "generate", "x", "--model", "nope.safetensors")
    assert wrong.returncode == 4 and "input ckpt_name: Value not in list" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    ui = tmp_path / "ui.json"
    ui.write_text('{"nodes": [], "links": []}', encoding="utf-8")
    ui_cfg = write_config(tmp_path / "ui.toml", cfg.read_text(encoding="utf-8")
                          + f"text_to_image_workflow = '{ui}'\n")
    sent = len(fake.requests)
    bad = abby(ui_cfg, "generate", "x")
    assert bad.returncode == 2 and "Save (API Format)" in bad.stderr and len(fake.requests) == sent
    assert json.loads(abby(cfg, "quota", "--user", "alice", "--json").stdout)["daily"]["remaining"] == 3
    assert not any((tmp_path / "store" / "images").rglob("*.png"))


def test_cli_cloud_never_shows_or_stores_the_key(tmp_path):
    cloud = FakeComfyUI(api_key=KEY)
    cloud.start()
    try:
        cfg = write_config(tmp_path / "abby.toml", f"""
[storage]
root = "store"
[cli]
default_user = "alice"
log_file = "abby.log"
[generation]
provider = "comfyui"
[providers.comfyui]
api_host = "{cloud.url}"
checkpoint = "sd15.safetensors"
poll_interval = 0.05
width = 64
height = 64
""")
        ok = abby(cfg, "generate", "x", "--json", key=KEY)
        assert ok.returncode == 0, ok.stderr
        assert cloud.bucket_requests and all("x-api-key" not in r["headers"] for r in cloud.bucket_requests)
        wrong = abby(cfg, "generate", "x", key="not-the-key-1")
        assert wrong.returncode == 4 and "refused the API key (401)" in wrong.stderr
        assert "not-the-key-1" not in wrong.stderr
        stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "abby.toml")
        assert KEY.encode() not in stored
    finally:
        cloud.stop()
