"""The AUTOMATIC1111 provider: exact requests and every error path with httpx.MockTransport,
request bodies against the WebUI's API document, and the real CLI against the fake WebUI."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from PIL import Image

from abbycli.errors import (ApiRejected, AuthError, ConfigError, InvalidInput, InvalidRequest, MalformedResponse,
                            ModelNotFound, ProviderError, ProviderUnavailable)
from abbycli.generation.generator import ImageGenerator
from abbycli.generation.providers import automatic1111 as a1111
from abbycli.generation.request import ImageRequest
from conftest import run_abby, write_config
from fake_automatic1111 import FakeWebUI, png
from spec_check import check_body

HOST = "http://gpu.test:7860"
PASSWORD = "pa55-w0rd-secret"
DOC = "a1111-openapi.json"


@pytest.fixture(autouse=True)
def no_a1111_env(monkeypatch):
    for var in ("A1111_API_HOST", "A1111_USERNAME", "A1111_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(a1111, "RETRY", a1111.RETRY | {"wait_initial": 0.001, "wait_max": 0.002})


def answer(count=1, seeds=None, first=0, extra=0, info=None, size=(64, 64), fmt="PNG"):
    """A txt2img/img2img answer: ``first`` leading grid images, the batch, ``extra`` trailing maps."""
    def image(color):
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, fmt)
        return base64.b64encode(buf.getvalue()).decode()

    images = [image((0, 0, 0))] * first + [image((i * 50, 90, 90)) for i in range(count)] + [image((255,) * 3)] * extra
    meta = {"all_seeds": seeds if seeds is not None else [100 + i for i in range(count)], "index_of_first_image": first,
            "sd_model_name": "v1-5-pruned-emaonly", "sampler_name": "Euler a", "steps": 20, "cfg_scale": 7.0}
    return httpx.Response(200, json={"images": images, "parameters": {},
                                     "info": json.dumps(meta) if info is None else info})


class Server:
    """A MockTransport handler: answers by path, records every request."""

    def __init__(self, post=None, progress=None, models=None):
        self.post = post if post is not None else answer()
        self.progress = progress
        self.models = models if models is not None else [{"title": "v1-5.safetensors [6ce0161689]",
                                                           "model_name": "v1-5", "hash": "6ce0161689",
                                                           "filename": "/m/v1-5.safetensors"}]
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/sdapi/v1/progress":
            return self.progress() if callable(self.progress) else httpx.Response(200, json={
                "progress": 0, "eta_relative": 0, "state": {"job_count": 0}})
        if request.url.path == "/sdapi/v1/sd-models":
            return httpx.Response(200, json=self.models)
        post = self.post.pop(0) if isinstance(self.post, list) else self.post
        if isinstance(post, Exception):
            raise post
        if callable(post):
            post = post()
        return await post if asyncio.iscoroutine(post) else post

    def body(self, i=-1) -> dict:
        posts = [r for r in self.requests if r.method == "POST"]
        return json.loads(posts[i].content)


def generator(server, **config):
    return ImageGenerator(provider="automatic1111", configs={"automatic1111": {"api_host": HOST, **config}},
                          transport=httpx.MockTransport(server))


def run(server, req, progress=None, **config):
    async def go():
        async with generator(server, **config) as g:
            return await g.generate(req, progress=progress)
    return asyncio.run(go())


def prepare(req, **config):
    return generator(Server(), **config).prepare(req)


# --- requests ---------------------------------------------------------------------------------
def test_txt2img_request_is_exactly_as_documented():
    server = Server(answer(count=2, seeds=[7, 8]))
    images = run(server, ImageRequest("text-to-image", prompt="a lighthouse", negative_prompt="fog", seed=7, count=2,
                                      aspect_ratio="16:9", steps=25, cfg_scale=6.5,
                                      options={"sampler_name": "DPM++ 2M", "scheduler": "Karras", "clip_skip": "2",
                                               "tiling": "false"}))
    [req] = server.requests
    assert (req.method, str(req.url)) == ("POST", f"{HOST}/sdapi/v1/txt2img")
    assert "authorization" not in req.headers  # no auth configured: none sent
    assert server.body() == {
        "prompt": "a lighthouse", "seed": 7, "sampler_name": "DPM++ 2M", "negative_prompt": "fog",
        "scheduler": "Karras", "batch_size": 2, "n_iter": 1, "steps": 25, "cfg_scale": 6.5, "width": 672,
        "height": 384, "tiling": False, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    assert [i.seed for i in images] == [7, 8]
    assert images[0].model == "v1-5-pruned-emaonly" and images[0].provider == "automatic1111"
    assert images[0].metadata == {"sampler_name": "Euler a", "steps": 20, "cfg_scale": 7.0}


def test_defaults_come_from_the_settings_and_no_seed_is_minus_one():
    server = Server()
    run(server, ImageRequest("text-to-image", prompt="x"), sampler="DDIM", scheduler="Karras", steps=30,
        cfg_scale=5, width=1024, height=768)
    assert server.body() == {"prompt": "x", "seed": -1, "sampler_name": "DDIM",
                             "scheduler": "Karras", "batch_size": 1, "n_iter": 1, "steps": 30, "cfg_scale": 5,
                             "width": 1024, "height": 768}


@pytest.mark.parametrize("aspect, base, size", [("1:1", 512, (512, 512)), ("21:9", 512, (768, 320)),
                                                ("9:16", 512, (384, 672)), ("16:9", 1024, (1344, 768)),
                                                ("2:3", 1024, (832, 1216)), ("3:2", 768, (912, 624))])
def test_aspect_keeps_the_configured_area(aspect, base, size):
    req = prepare(ImageRequest("text-to-image", prompt="x", aspect_ratio=aspect), width=base, height=base)
    assert (req.width, req.height) == size


def test_model_is_checked_against_the_webui_then_sent_as_an_override():
    server = Server()
    run(server, ImageRequest("text-to-image", prompt="x", model="v1-5"))
    assert [r.url.path for r in server.requests] == ["/sdapi/v1/sd-models", "/sdapi/v1/txt2img"]
    assert server.body()["override_settings"] == {"sd_model_checkpoint": "v1-5"}


def test_an_unknown_model_is_refused_before_the_gpu_runs():
    """The WebUI would silently load its first checkpoint instead."""
    server = Server()
    [error] = run(server, ImageRequest("text-to-image", prompt="x"), model="sdxl-typo")
    assert isinstance(error, ModelNotFound) and error.exit_code == 4
    assert "no checkpoint 'sdxl-typo'" in str(error) and "v1-5" in str(error)
    assert [r.method for r in server.requests] == ["GET"]


def test_img2img_sends_the_image_at_the_models_area_with_denoising_strength():
    src = png(300, 200)
    server = Server()
    run(server, ImageRequest("image-to-image", prompt="blue", image=src, strength=0.4))
    body = server.body()
    assert server.requests[0].url.path == "/sdapi/v1/img2img"
    assert base64.b64decode(body.pop("init_images")[0]) == src
    assert body["denoising_strength"] == 0.4 and (body["width"], body["height"]) == (624, 416)
    run(server, ImageRequest("image-to-image", prompt="blue", image=src))
    assert server.body()["denoising_strength"] == 0.75  # the WebUI's own default, sent explicitly


def test_upscale_to_an_exact_width_or_a_factor_with_the_configured_upscaler():
    src = png(60, 40)
    server = Server(lambda: httpx.Response(200, json={"html_info": "", "image": base64.b64encode(png(200, 133)).decode()}))
    [image] = run(server, ImageRequest("upscale", image=src, width=200))
    body = server.body()
    assert base64.b64decode(body.pop("image")) == src
    assert body == {"upscaler_1": "R-ESRGAN 4x+", "resize_mode": 1, "upscaling_resize_w": 200,
                    "upscaling_resize_h": 133, "upscaling_crop": True}
    assert image.model == "R-ESRGAN 4x+" and image.seed is None
    run(server, ImageRequest("upscale", image=src, factor=3, options={"gfpgan_visibility": "0.5"}), upscaler="Lanczos")
    body = server.body()
    del body["image"]
    assert body == {"upscaler_1": "Lanczos", "resize_mode": 0, "upscaling_resize": 3, "gfpgan_visibility": 0.5}
    run(server, ImageRequest("upscale", image=src, model="ESRGAN_4x"))
    assert server.body()["upscaler_1"] == "ESRGAN_4x" and server.body()["upscaling_resize"] == 2


def test_basic_auth_is_sent_and_masked_in_describe():
    server = Server()
    run(server, ImageRequest("text-to-image", prompt="x"), username="abby", password=PASSWORD)
    token = base64.b64encode(f"abby:{PASSWORD}".encode()).decode()
    assert server.requests[0].headers["authorization"] == f"Basic {token}"
    g = generator(Server(), username="abby", password=PASSWORD)
    described = g.describe(g.prepare(ImageRequest("image-to-image", prompt="x", image=png(30, 20))))
    assert PASSWORD not in json.dumps(described) and token not in json.dumps(described)
    [call] = described
    assert call["headers"] == {"Accept": "application/json", "Authorization": "Basic ********"}
    assert call["url"] == f"{HOST}/sdapi/v1/img2img" and call["json"]["init_images"][0].endswith("image/png, base64>")


def test_half_configured_auth_is_a_config_error():
    with pytest.raises(ConfigError, match="username is set but password is not"):
        prepare(ImageRequest("text-to-image", prompt="x"), username="abby")


# --- what comes back ------------------------------------------------------------------------------
def test_a_grid_before_and_control_maps_after_the_batch_are_not_returned():
    server = Server(answer(count=2, seeds=[5, 6], first=1, extra=2, size=(32, 48)))
    images = run(server, ImageRequest("text-to-image", prompt="x", count=2))
    assert len(images) == 2 and [i.seed for i in images] == [5, 6]
    for image, color in zip(images, [(0, 90, 90), (50, 90, 90)]):
        with Image.open(io.BytesIO(image.data)) as img:
            assert img.getpixel((0, 0)) == color  # the batch's own images, not the black grid


def test_fewer_images_than_asked_become_errors_and_bad_info_costs_only_the_seed():
    images = run(Server(answer(count=1, info="not json")), ImageRequest("text-to-image", prompt="x", count=3))
    assert images[0].seed is None and images[0].model == "unknown"
    assert all(isinstance(e, MalformedResponse) and "1 image(s) of the 3" in str(e) for e in images[1:])


def test_format_is_converted_locally_when_the_webui_answers_another():
    [jpeg] = run(Server(answer()), ImageRequest("text-to-image", prompt="x", output_format="jpeg"))
    assert jpeg.format == "jpeg" and jpeg.data[:2] == b"\xff\xd8"
    assert jpeg.notes == ["converted from PNG to JPEG by abby"]
    [webp] = run(Server(answer(fmt="WEBP")), ImageRequest("text-to-image", prompt="x", output_format="webp"))
    assert webp.notes == []  # already WebP (the server's samples_format): stored as it came


def test_a_broken_image_is_refused():
    bad = httpx.Response(200, json={"images": [base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode()], "info": "{}"})
    [error] = run(Server(bad), ImageRequest("text-to-image", prompt="x"))
    assert isinstance(error, MalformedResponse) and "damaged PNG" in str(error)


# --- refused before anything is sent ------------------------------------------------------------------
@pytest.mark.parametrize("req, config, message", [
    (ImageRequest("text-to-image", prompt="x", count=5), {}, "count must be between 1 and 4"),
    (ImageRequest("text-to-image", prompt="x", count=6), {"max_batch_size": 8}, None),
    (ImageRequest("text-to-image", prompt="x", width=500), {}, "multiple of 8"),
    (ImageRequest("text-to-image", prompt="x", width=512, aspect_ratio="1:1"), {}, "not both"),
    (ImageRequest("text-to-image", prompt="x", aspect_ratio="7:3"), {}, "aspect ratio '7:3'"),
    (ImageRequest("text-to-image", prompt="x", style_preset="anime"), {}, "--style"),
    (ImageRequest("text-to-image", prompt="x", cfg_scale=31), {}, "cfg scale must be between 1 and 30"),
    (ImageRequest("text-to-image", prompt="x", steps=151), {}, "steps must be between 1 and 150"),
    (ImageRequest("text-to-image", prompt="x", output_format="gif"), {}, "output format 'gif'"),
    (ImageRequest("text-to-image", prompt="x", options={"hr_scale": "2"}), {}, "needs --option enable_hr=true"),
    (ImageRequest("text-to-image", prompt="x", options={"enable_hr": "maybe"}), {}, "must be true or false"),
    (ImageRequest("text-to-image", prompt="x", options={"clip_skip": "1.5"}), {}, "whole number"),
    (ImageRequest("text-to-image", prompt="x", options={"sampler": "Euler"}), {}, "did you mean 'sampler_name'"),
    (ImageRequest("image-to-image", prompt="x", image=png(8, 8), options={"enable_hr": True}), {}, "not accepted"),
    (ImageRequest("upscale", image=png(8, 8), prompt="sharp"), {}, "--prompt"),
    (ImageRequest("upscale", image=png(8, 8), mode="fast"), {}, "choose the upscaler with --model"),
])
def test_bad_values_are_refused_with_one_line(req, config, message):
    if message is None:
        assert prepare(req, **config).count == 6
        return
    with pytest.raises(InvalidInput) as exc:
        prepare(req, **config)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_options_take_typed_values_from_a_bot():
    server = Server()
    run(server, ImageRequest("text-to-image", prompt="x", options={
        "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 10,
        "denoising_strength": 0.3, "restore_faces": True}))
    body = server.body()
    assert (body["enable_hr"], body["hr_scale"], body["hr_upscaler"], body["hr_second_pass_steps"],
            body["denoising_strength"], body["restore_faces"]) == (True, 1.5, "Latent", 10, 0.3, True)


# --- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, kind, text", [
    (httpx.Response(422, json={"detail": [{"loc": ["body", "steps"], "msg": "value is not a valid integer",
                                           "type": "type_error.integer"},
                                          {"loc": ["body", "width"], "msg": "field\nrequired", "type": "x"}]}),
     InvalidRequest, "(422): steps: value is not a valid integer; width: field required"),
    (httpx.Response(404, json={"detail": "Not Found"}), ApiRejected,
     f"the WebUI at {HOST} does not serve the API (404): start the WebUI with --api"),
    (httpx.Response(404, text="<html>nothing here</html>"), ApiRejected, "does not serve the API"),
    (httpx.Response(404, json={"error": "HTTPException", "detail": "Model not found", "errors": ""}), ModelNotFound,
     "Model not found"),
    (httpx.Response(404, json={"error": "HTTPException", "detail": "Sampler not found", "errors": ""}),
     InvalidRequest, "Sampler not found"),
    (httpx.Response(500, json={"error": "AssertionError", "detail": "", "body": "",
                               "errors": "could not find upscaler named Foo"}),
     ProviderError, "the WebUI failed (500, AssertionError): could not find upscaler named Foo"),
    (httpx.Response(500, json={"error": "OutOfMemoryError", "detail": "", "body": "",
                               "errors": "CUDA out of memory. Tried to allocate 2.00 GiB"}),
     ProviderError, "ran out of GPU memory"),
])
def test_http_errors_map_to_one_line_messages(response, kind, text):
    server = Server(response)
    [error] = run(server, ImageRequest("text-to-image", prompt="x"))
    assert type(error) is kind and text in str(error) and "\n" not in str(error)
    assert len(server.requests) == 1  # none of these is retried


def test_401_names_the_settings_and_never_the_password():
    body = {"detail": f"Incorrect username or password {PASSWORD}"}
    [error] = run(Server(httpx.Response(401, json=body)), ImageRequest("text-to-image", prompt="x"),
                  username="abby", password=PASSWORD)
    assert isinstance(error, AuthError) and error.exit_code == 4
    assert "refused the user name and password" in str(error) and "A1111_PASSWORD" in str(error)
    assert PASSWORD not in str(error)
    [error] = run(Server(httpx.Response(401, json={"detail": "Not authenticated"})),
                  ImageRequest("text-to-image", prompt="x"))
    assert "needs a user name and password (--api-auth)" in str(error)


def test_a_500_error_body_echoing_the_password_is_scrubbed():
    token = base64.b64encode(f"abby:{PASSWORD}".encode()).decode()
    body = {"error": "RuntimeError", "errors": f"bad header Basic {token} and {PASSWORD}"}
    [error] = run(Server(httpx.Response(500, json=body)), ImageRequest("text-to-image", prompt="x"),
                  username="abby", password=PASSWORD)
    assert PASSWORD not in str(error) and token not in str(error) and "********" in str(error)


def test_connection_refused_is_retried_briefly_then_says_to_start_the_webui():
    server = Server(httpx.ConnectError("[Errno 111] Connection refused"))
    [error] = run(server, ImageRequest("text-to-image", prompt="x"))
    assert isinstance(error, ProviderUnavailable) and error.exit_code == 1
    assert f"cannot reach the API at {HOST}" in str(error) and "start the WebUI with --api" in str(error)
    assert len(server.requests) == a1111.RETRY["attempts"]


def test_a_5xx_without_the_webuis_error_body_is_retried():
    server = Server([httpx.Response(502, text="Bad Gateway"), answer()])
    [image] = run(server, ImageRequest("text-to-image", prompt="x"))
    assert image.seed == 100 and len(server.requests) == 2


def test_a_slow_generation_times_out_once_and_is_not_sent_again():
    async def slow():
        await asyncio.sleep(5)
        return answer()

    server = Server(slow)
    [error] = run(server, ImageRequest("text-to-image", prompt="x"), timeout=0.2)
    assert type(error) is ProviderError and "did not finish within 0.2 s (providers.automatic1111.timeout)" in str(error)
    assert [r.method for r in server.requests] == ["POST"]


# --- progress -------------------------------------------------------------------------------------------
def test_progress_is_polled_while_the_request_runs_and_stops_with_it(monkeypatch):
    monkeypatch.setattr(a1111, "POLL_INTERVAL", 0.02)
    state = {"step": 0}

    def progress():
        state["step"] += 1
        return httpx.Response(200, json={"progress": 0.4, "eta_relative": 8.2, "state": {
            "job_count": 1, "sampling_step": 12, "sampling_steps": 30}})

    async def slow():
        await asyncio.sleep(0.3)
        return answer()

    server = Server(slow, progress)
    lines: list[str] = []

    async def go():
        async with generator(server) as g:
            result = await g.generate(ImageRequest("text-to-image", prompt="x"), progress=lines.append)
            polls = state["step"]
            await asyncio.sleep(0.2)  # the poller is gone: no poll after the answer
            return result, polls

    [image], polls = asyncio.run(go())
    assert image.seed == 100 and polls >= 3 and state["step"] == polls
    assert lines[0] == "step 12/30, 40%, eta 8 s"
    assert all(r.url.params["skip_current_image"] == "true" for r in server.requests if r.method == "GET")


def test_progress_stops_when_the_request_fails_and_a_failed_poll_is_skipped(monkeypatch):
    monkeypatch.setattr(a1111, "POLL_INTERVAL", 0.02)
    polls = []

    def progress():
        polls.append(1)
        return httpx.Response(500, text="oops") if len(polls) == 1 else httpx.Response(
            200, json={"progress": 0, "eta_relative": 0, "state": {"job_count": 0}})

    async def failing():
        await asyncio.sleep(0.2)
        return httpx.Response(500, json={"error": "RuntimeError", "errors": "boom"})

    lines: list[str] = []

    async def go():
        async with generator(Server(failing, progress)) as g:
            result = await g.generate(ImageRequest("text-to-image", prompt="x"), progress=lines.append)
            count = len(polls)
            await asyncio.sleep(0.15)
            return result, count

    [error], count = asyncio.run(go())
    assert "boom" in str(error) and count >= 2 and len(polls) == count
    assert "waiting for the WebUI" in lines


@pytest.mark.parametrize("body, line", [
    ({"progress": 0.55, "eta_relative": 3.4, "state": {"job_count": 1, "sampling_step": 11, "sampling_steps": 20}},
     "step 11/20, 55%, eta 3 s"),
    ({"progress": 0.2, "eta_relative": -1, "state": {"job_count": 1, "sampling_steps": 0}}, "20%"),
    ({"progress": 0, "eta_relative": 0, "state": {"job_count": 0}}, "waiting for the WebUI"),
    ([], None),
])
def test_progress_line(body, line):
    assert a1111.progress_line(body) == line


# --- the API document -------------------------------------------------------------------------------------
def test_request_bodies_match_the_webuis_api_document():
    server = Server([answer(), answer(), httpx.Response(200, json={"html_info": "", "image": base64.b64encode(
        png(16, 16)).decode()}), httpx.Response(200, json={"html_info": "", "image": base64.b64encode(png(16, 16)).decode()})])
    run(server, ImageRequest("text-to-image", prompt="x", seed=3, model="v1-5", aspect_ratio="3:2", options={
        "enable_hr": "true", "hr_scale": "2", "hr_upscaler": "Latent", "hr_second_pass_steps": "5",
        "denoising_strength": "0.5", "restore_faces": "true", "tiling": "false", "clip_skip": "2",
        "sampler_name": "Euler", "scheduler": "Karras"}))
    check_body(DOC, "/sdapi/v1/txt2img", "POST", "application/json", server.body())
    run(server, ImageRequest("image-to-image", prompt="x", image=png(20, 30), strength=0.3,
                             options={"restore_faces": "1"}))
    check_body(DOC, "/sdapi/v1/img2img", "POST", "application/json", server.body())
    run(server, ImageRequest("upscale", image=png(20, 30), width=50, options={
        "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": "0.5", "codeformer_visibility": "0.2",
        "codeformer_weight": "0.4"}))
    check_body(DOC, "/sdapi/v1/extra-single-image", "POST", "application/json", server.body())
    run(server, ImageRequest("upscale", image=png(20, 30), factor=2.5))
    check_body(DOC, "/sdapi/v1/extra-single-image", "POST", "application/json", server.body())


def test_every_option_is_a_field_of_the_document():
    from spec_check import body_schema, document

    doc = document(DOC)
    fields = set()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image"):
        schema = body_schema(doc, path, "POST", "application/json")
        ref = schema["$ref"].rsplit("/", 1)[1]
        fields |= set(doc["components"]["schemas"][ref]["properties"])
    assert set(a1111.OPTIONS) - {"clip_skip"} <= fields  # clip_skip travels in override_settings


# --- the real CLI against the fake WebUI -----------------------------------------------------------------------
@pytest.fixture
def webui():
    server = FakeWebUI(auth=("abby", PASSWORD))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "abby.toml", '[storage]\nroot = "store"\nmax_user_daily_gens = 3\n'
                                                '[cli]\ndefault_user = "alice"\nlog_file = "abby.log"\n'
                                                '[generation]\nprovider = "automatic1111"\n'
                                                '[providers.automatic1111]\nusername = "abby"\n')


def abby(cfg, webui, *args, password=PASSWORD):
    env = {"A1111_API_HOST": webui.url}
    if password:
        env["A1111_PASSWORD"] = password
    result = run_abby("--config", str(cfg), *args, env=env)
    assert PASSWORD not in result.stdout + result.stderr, "the password leaked into the output"
    assert "Traceback" not in result.stderr
    return result


def test_cli_generates_stores_and_records_with_the_provider(cfg, webui, tmp_path):
    webui.grid, webui.control_maps = True, 1
    result = abby(cfg, webui, "generate", "a lighthouse", "--count", "2", "--seed", "42", "--aspect", "16:9",
                  "--option", "sampler_name=DPM++ 2M", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [i["seed"] for i in data["images"]] == [42, 43] and data["quota"]["daily"]["remaining"] == 1
    for image in data["images"]:
        with Image.open(image["path"]) as img:
            assert img.size == (672 // 8, 384 // 8)  # the batch's images, not the grid or the map
    assert webui.posts()[0]["json"]["batch_size"] == 2
    info = json.loads(abby(cfg, webui, "info", str(data["images"][0]["id"]), "--json").stdout)
    meta = info["metadata"]
    assert (meta["provider"], meta["model"], meta["seed"], meta["sampler_name"]) == (
        "automatic1111", "v1-5-pruned-emaonly", 42, "DPM++ 2M")
    assert meta["options"] == {"sampler_name": "DPM++ 2M"}
    history = json.loads(abby(cfg, webui, "history", "--json").stdout)
    assert [h["provider"] for h in history] == ["automatic1111"] * 2
    assert all(h["outcome"] == "success" for h in history)
    upscaled = abby(cfg, webui, "upscale", data["images"][0]["path"], "--width", "300", "--json")
    assert upscaled.returncode == 0, upscaled.stderr
    with Image.open(json.loads(upscaled.stdout)["images"][0]["path"]) as img:
        assert img.size == (300, 171)
    assert webui.posts()[-1]["json"]["upscaler_1"] == "R-ESRGAN 4x+"


def test_cli_failures_refund_the_slot_and_keep_the_password_out_of_every_file(cfg, webui, tmp_path):
    webui.script.append((422, {"detail": [{"loc": ["body", "steps"], "msg": f"bad {PASSWORD}", "type": "x"}]}))
    rejected = abby(cfg, webui, "generate", "x")
    assert rejected.returncode == 4 and "steps: bad ********" in rejected.stderr
    wrong = abby(cfg, webui, "generate", "x", password="not-the-password")
    assert wrong.returncode == 4 and "refused the user name and password (401)" in wrong.stderr
    webui.api = False
    no_api = abby(cfg, webui, "generate", "x")
    assert no_api.returncode == 4 and "does not serve the API (404): start the WebUI with --api" in no_api.stderr
    quota = json.loads(abby(cfg, webui, "quota", "--user", "alice", "--json").stdout)
    assert quota["daily"]["remaining"] == 3  # every failure gave its slot back
    history = json.loads(abby(cfg, webui, "history", "--json").stdout)
    assert [h["outcome"] for h in history] == ["rejected"] * 3
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "abby.toml":
            assert PASSWORD.encode() not in path.read_bytes(), f"the password is in {path}"


def test_cli_dry_run_shows_the_request_and_sends_nothing(cfg, webui):
    result = abby(cfg, webui, "generate", "x", "--count", "2", "--model", "sd_xl_base_1.0", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert webui.requests == []
    check, post = data["requests"]
    assert (check["method"], check["url"]) == ("GET", f"{webui.url}/sdapi/v1/sd-models")
    assert post["url"] == f"{webui.url}/sdapi/v1/txt2img" and post["headers"]["Authorization"] == "Basic ********"
    assert post["json"]["batch_size"] == 2 and post["json"]["override_settings"] == {
        "sd_model_checkpoint": "sd_xl_base_1.0"}
    assert data["quota"]["daily_slots"] == 2  # free in credits, not in daily slots
    over = abby(cfg, webui, "generate", "x", "--count", "5", "--dry-run")
    assert over.returncode == 2 and "count must be between 1 and 4" in over.stderr
