"""The OpenAI provider: exact requests (checked against OpenAI's API document), every
refusal before a request, every error answer, retries; then the real CLI against the
strict fake server on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from abbycli.errors import (AuthError, ConfigError, ContentFiltered, InsufficientCredits, InvalidInput,
                            InvalidRequest, MalformedResponse, ModelNotFound, PayloadTooLarge, ProviderUnavailable,
                            RateLimited)
from abbycli.generation.generator import ImageGenerator
from abbycli.generation.request import ImageRequest
from conftest import run_abby, write_config
from fake_openai import FakeOpenAI
from spec_check import check_body
from stability_helpers import multipart

KEY = "sk-unit-openai-secret-4567"
DOC = "openai-images-openapi.json"
OPENAI_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID")


@pytest.fixture(autouse=True)
def no_openai_env(monkeypatch):
    """The user's own OpenAI settings must not reach the tests (conftest does not know them)."""
    for var in OPENAI_ENV:
        monkeypatch.delenv(var, raising=False)


class Recorder:
    """A MockTransport handler: records requests and plays answers in order, the last one
    for ever; an answer may be a function of the request."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer


def picture(w=32, h=32, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 40, 40)).save(buf, fmt)
    return buf.getvalue()


def answer(n=1, revised=None, **extra):
    item = {"b64_json": base64.b64encode(picture()).decode()} | ({"revised_prompt": revised} if revised else {})
    return httpx.Response(200, json={"created": 1, "data": [item] * n, **extra}, headers={"x-request-id": "req_abc"})


def as_asked(request: httpx.Request) -> httpx.Response:
    """As many images as the request's n."""
    if request.url.path.endswith("/generations"):
        return answer(json.loads(request.content)["n"])
    return answer(int(multipart(request)[0]["n"]))


def oai_error(status, message, code=None, kind="invalid_request_error", headers=None):
    return httpx.Response(status, headers=headers or {},
                          json={"error": {"message": message, "type": kind, "param": None, "code": code}})


def gen(recorder, **config):
    config.setdefault("api_key", KEY)
    return ImageGenerator(provider="openai", configs={"openai": config}, transport=httpx.MockTransport(recorder))


def run(g, req):
    async def go():
        async with g:
            return await g.generate(req)
    return asyncio.run(go())


# --- requests ------------------------------------------------------------------------------------

def test_gpt_image_generation_is_one_json_request_with_n():
    rec = Recorder(as_asked)
    images = run(gen(rec, organization="org-1", project="proj-2"),
                 ImageRequest("text-to-image", prompt="a lighthouse", count=3, output_format="webp",
                              aspect_ratio="3:2", options={"quality": "high", "background": "opaque",
                                                           "output_compression": "80", "moderation": "low"}))
    [req] = rec.requests
    assert (req.method, str(req.url)) == ("POST", "https://api.openai.com/v1/images/generations")
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["openai-organization"] == "org-1" and req.headers["openai-project"] == "proj-2"
    body = json.loads(req.content)
    assert body == {"model": "gpt-image-1", "prompt": "a lighthouse", "n": 3, "size": "1536x1024",
                    "output_format": "webp", "quality": "high", "background": "opaque", "output_compression": 80,
                    "moderation": "low"}
    assert [i.model for i in images] == ["gpt-image-1"] * 3
    assert all(i.request_id == "req_abc" and i.seed is None and i.notes == [] for i in images)
    check_body(DOC, "/images/generations", "POST", "application/json", body)  # last: it skips without the document


def test_nothing_asked_leaves_size_and_options_to_the_api():
    rec = Recorder(as_asked)
    run(gen(rec), ImageRequest("text-to-image", prompt="x"))
    body = json.loads(rec.requests[0].content)
    assert body == {"model": "gpt-image-1", "prompt": "x", "n": 1, "output_format": "png"}
    assert "openai-organization" not in rec.requests[0].headers
    check_body(DOC, "/images/generations", "POST", "application/json", body)


def test_dall_e_3_count_3_is_three_requests_for_base64_and_keeps_revised_prompts():
    rec = Recorder(lambda r: answer(1, revised="a lighthouse at dusk, oil painting"))
    images = run(gen(rec), ImageRequest("text-to-image", prompt="a lighthouse", model="dall-e-3", count=3,
                                        aspect_ratio="9:16", options={"style": "natural", "quality": "hd"}))
    assert len(rec.requests) == 3
    for req in rec.requests:
        body = json.loads(req.content)
        assert body == {"model": "dall-e-3", "prompt": "a lighthouse", "n": 1, "size": "1024x1792",
                        "response_format": "b64_json", "style": "natural", "quality": "hd"}
    assert len(images) == 3
    assert all(i.metadata == {"revised_prompt": "a lighthouse at dusk, oil painting"} for i in images)
    assert images[0].notes == ["--aspect 9:16 was sent as size 1024x1792, the nearest dall-e-3 makes"]
    check_body(DOC, "/images/generations", "POST", "application/json", body)


def test_the_response_quality_and_background_are_kept_with_each_image():
    rec = Recorder(lambda r: answer(1, quality="medium", background="transparent", size="1024x1024"))
    [image] = run(gen(rec), ImageRequest("text-to-image", prompt="x", options={"quality": "auto"}))
    assert image.metadata == {"quality": "medium", "background": "transparent"}


@pytest.mark.parametrize("model, aspect, size", [
    ("gpt-image-1", "1:1", "1024x1024"), ("gpt-image-1", "16:9", "1536x1024"), ("gpt-image-1", "21:9", "1536x1024"),
    ("gpt-image-1", "5:4", "1536x1024"), ("gpt-image-1", "4:5", "1024x1536"), ("gpt-image-1-mini", "9:21", "1024x1536"),
    ("gpt-image-1.5", "2:3", "1024x1536"),
    ("dall-e-3", "16:9", "1792x1024"), ("dall-e-3", "3:2", "1792x1024"), ("dall-e-3", "5:4", "1024x1024"),
    ("dall-e-3", "4:5", "1024x1024"), ("dall-e-3", "2:3", "1024x1792"),
    ("dall-e-2", "16:9", "1024x1024"), ("dall-e-2", "1:1", "1024x1024"),
])
def test_aspect_maps_to_the_models_nearest_size(model, aspect, size):
    rec = Recorder(as_asked)
    run(gen(rec), ImageRequest("text-to-image", prompt="x", model=model, aspect_ratio=aspect))
    assert json.loads(rec.requests[0].content)["size"] == size


@pytest.mark.parametrize("model, size", [("gpt-image-1", (1024, 1536)), ("dall-e-3", (1792, 1024)),
                                         ("dall-e-2", (256, 256))])
def test_width_and_height_of_a_supported_size_are_the_size(model, size):
    rec = Recorder(as_asked)
    run(gen(rec), ImageRequest("text-to-image", prompt="x", model=model, width=size[0], height=size[1]))
    assert json.loads(rec.requests[0].content)["size"] == f"{size[0]}x{size[1]}"


def test_a_prepared_request_prepares_again_to_the_same_request():
    g = gen(Recorder(as_asked))
    provider = g.provider("openai")
    once = provider.prepare(ImageRequest("text-to-image", prompt="x", aspect_ratio="16:9"))
    assert provider.prepare(once) == once


def test_an_edit_is_multipart_with_the_image_and_input_fidelity():
    src = picture(300, 200, "JPEG")
    rec = Recorder(as_asked)
    images = run(gen(rec), ImageRequest("image-to-image", prompt="make it blue", image=src, count=2,
                                        model="gpt-image-1.5", options={"input_fidelity": "high"}))
    [req] = rec.requests
    assert str(req.url) == "https://api.openai.com/v1/images/edits"
    assert req.headers["content-type"].startswith("multipart/form-data")
    fields, files = multipart(req)
    assert fields == {"model": "gpt-image-1.5", "prompt": "make it blue", "n": "2", "output_format": "png",
                      "input_fidelity": "high"}
    assert files == {"image": src}
    assert b'filename="image.jpg"' in req.content and b"Content-Type: image/jpeg" in req.content
    assert len(images) == 2
    check_body(DOC, "/images/edits", "POST", "multipart/form-data", fields | {"image": "<file>"})


def test_dall_e_2_edit_gets_a_png_and_base64():
    src = picture(64, 64, "JPEG")
    rec = Recorder(as_asked)
    run(gen(rec), ImageRequest("image-to-image", prompt="x", image=src, model="dall-e-2"))
    fields, files = multipart(rec.requests[0])
    assert fields == {"model": "dall-e-2", "prompt": "x", "n": "1", "response_format": "b64_json"}
    assert files["image"].startswith(b"\x89PNG") and b'filename="image.png"' in rec.requests[0].content
    with Image.open(io.BytesIO(files["image"])) as img:
        assert img.size == (64, 64)
    check_body(DOC, "/images/edits", "POST", "multipart/form-data", fields | {"image": "<file>"})


def test_dry_run_describes_every_request_with_the_key_masked():
    g = gen(Recorder(as_asked), organization="org-1")
    req = g.prepare(ImageRequest("image-to-image", prompt="x", image=picture(), model="dall-e-2", count=2))
    [described] = g.describe(req)
    assert described["headers"] == {"Authorization": "Bearer ********", "OpenAI-Organization": "org-1"}
    assert described["multipart"]["image"].endswith("bytes image/png>") and described["multipart"]["n"] == "2"
    assert KEY not in json.dumps(described)
    three = g.describe(g.prepare(ImageRequest("text-to-image", prompt="x", model="dall-e-3", count=3)))
    assert [d["json"]["n"] for d in three] == [1, 1, 1]


# --- refusals before anything is sent ------------------------------------------------------------

def t2i(**kw):
    return ImageRequest("text-to-image", prompt=kw.pop("prompt", "x"), **kw)


@pytest.mark.parametrize("req, message", [
    (t2i(seed=5), "--seed is not accepted by OpenAI"),
    (t2i(negative_prompt="fog"), "--negative is not accepted by OpenAI"),
    (t2i(style_preset="anime"), "--option style=vivid"),
    (t2i(cfg_scale=7.0), "--cfg-scale is not accepted"),
    (t2i(steps=20), "--steps is not accepted"),
    (ImageRequest("image-to-image", prompt="x", image=picture(), strength=0.5), "--strength is not accepted by OpenAI"),
    (t2i(width=1000, height=1000), "1000x1000 is not a size model gpt-image-1 makes"),
    (t2i(width=1024), "give both --width and --height"),
    (t2i(width=1024, height=1536, aspect_ratio="16:9"), "give --aspect or --width/--height, not both"),
    (t2i(aspect_ratio="wide"), "aspect ratio 'wide' is not WIDTH:HEIGHT"),
    (t2i(aspect_ratio="0:1"), "is not WIDTH:HEIGHT"),
    (t2i(model="dall-e-4"), "unknown OpenAI model 'dall-e-4'"),
    (t2i(model="dall-e-3", width=256, height=256), "256x256 is not a size model dall-e-3 makes"),
    (t2i(model="dall-e-3", output_format="jpeg"), "dall-e-3 returns PNG images only"),
    (t2i(model="dall-e-2", prompt="x" * 1001), "model dall-e-2 takes at most 1000"),
    (t2i(model="dall-e-3", prompt="x" * 4001), "model dall-e-3 takes at most 4000"),
    (t2i(prompt="x" * 32001), "takes at most 32000"),
    (t2i(prompt="  "), "the prompt is empty"),
    (t2i(count=11), "count must be between 1 and 10"),
    (t2i(options={"style": "vivid"}), "--option style is not accepted by model gpt-image-1"),
    (t2i(model="dall-e-3", options={"background": "opaque"}), "(it is for the GPT image models)"),
    (t2i(options={"input_fidelity": "high"}), "--option input_fidelity is not accepted"),
    (t2i(options={"qualty": "high"}), "did you mean 'quality'"),
    (t2i(options={"quality": "hd"}), "quality 'hd' is not accepted by model gpt-image-1"),
    (t2i(model="dall-e-2", options={"quality": "high"}), "quality 'high' is not accepted by model dall-e-2"),
    (t2i(options={"background": "transparent"}, output_format="jpeg"), "transparent background needs"),
    (t2i(options={"output_compression": "50"}), "output_compression applies to --format jpeg or webp"),
    (t2i(options={"output_compression": "x"}, output_format="jpeg"), "must be a whole number from 0 to 100"),
    (t2i(options={"moderation": "off"}), "moderation 'off' is not accepted"),
    (ImageRequest("image-to-image", prompt="x", image=picture(), options={"moderation": "low"}),
     "--option moderation is not accepted by model gpt-image-1 for image-to-image"),
    (ImageRequest("image-to-image", prompt="x", image=picture(), model="gpt-image-1-mini",
                  options={"input_fidelity": "high"}), "--option input_fidelity is not accepted"),
    (ImageRequest("image-to-image", prompt="x", image=picture(), model="dall-e-3"), "dall-e-3 cannot edit images"),
    (ImageRequest("image-to-image", prompt="x", image=picture(64, 32), model="dall-e-2", image_name="wide.png"),
     "dall-e-2 edits square images only, and wide.png is 64x32"),
    (ImageRequest("upscale", image=picture()), "provider openai cannot do upscale; providers that can: "),
])
def test_invalid_values_are_refused_before_any_request(req, message):
    rec = Recorder(as_asked)
    with pytest.raises(InvalidInput, match=None) as caught:
        gen(rec).prepare(req)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert rec.requests == []


def test_dall_e_2_input_of_4_mb_is_refused_and_gpt_input_of_50_mb():
    big = picture(64, 64) + b"\0" * 4_000_000  # a valid PNG padded past the limit
    with pytest.raises(InvalidInput, match="dall-e-2 takes a PNG under 4 MB"):
        gen(Recorder(as_asked)).prepare(ImageRequest("image-to-image", prompt="x", image=big, model="dall-e-2"))
    huge = picture(64, 64) + b"\0" * 50_000_000
    with pytest.raises(InvalidInput, match="gpt-image-1 takes images under 50 MB"):
        gen(Recorder(as_asked)).prepare(ImageRequest("image-to-image", prompt="x", image=huge))


def test_no_key_is_a_config_error_that_says_how_to_set_one():
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        gen(Recorder(as_asked), api_key=None).prepare(t2i())
    ok, why = gen(Recorder(as_asked), api_key=None).provider("openai").configured()
    assert not ok and "OPENAI_API_KEY" in why


def test_settings_come_from_the_openai_environment_variables(tmp_path):
    from abbycli.config import load_settings

    cfg = write_config(tmp_path / "abby.toml", '[providers.openai]\nmodel = "dall-e-3"\napi_key = "sk-from-file"\n')
    env = {"OPENAI_API_KEY": "sk-from-env", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1/", "OPENAI_ORG_ID": "org-9",
           "OPENAI_PROJECT_ID": "proj-9"}
    config = load_settings(cfg, env=env).provider_config("openai")
    assert config == {"api_key": "sk-from-env", "api_host": "http://127.0.0.1:9/v1", "organization": "org-9",
                      "project": "proj-9", "model": "dall-e-3", "img2img_model": "gpt-image-1", "timeout": 300}
    bad = write_config(tmp_path / "bad.toml", '[providers.openai]\nimg2img_model = "dall-e-3"\n')
    with pytest.raises(ConfigError, match="dall-e-3 cannot edit images"):
        load_settings(bad, env={})


# --- answers ---------------------------------------------------------------------------------------

def test_fewer_images_than_asked_give_errors_for_the_missing_ones():
    rec = Recorder(answer(2))
    results = run(gen(rec), t2i(count=3))
    assert [type(r).__name__ for r in results] == ["GeneratedImage", "GeneratedImage", "MalformedResponse"]
    assert "returned 2 of the 3 images" in str(results[2])


@pytest.mark.parametrize("response, text", [
    (httpx.Response(200, json={"created": 1}), "without a 'data' list"),
    (httpx.Response(200, text="<html>"), "not JSON"),
    (httpx.Response(200, json={"created": 1, "data": [{"url": "https://x/y.png"}]}), "no base64 image"),
    (httpx.Response(200, json={"created": 1, "data": [{"b64_json": "!!"}]}), "not valid base64"),
    (httpx.Response(200, json={"created": 1, "data": [{"b64_json": base64.b64encode(b"GIF89a").decode()}]}),
     "not a PNG, JPEG or WebP"),
])
def test_malformed_answers_are_reported(response, text):
    [result] = run(gen(Recorder(response)), t2i())
    assert isinstance(result, MalformedResponse) and text in str(result)


@pytest.mark.parametrize("response, exc, text", [
    (oai_error(400, "Your request was rejected by the safety system.", "moderation_blocked"), ContentFiltered,
     "content filter"),
    (oai_error(400, "Your request was rejected as a result of our safety system.", "content_policy_violation"),
     ContentFiltered, "content filter"),
    (oai_error(429, "You exceeded your current quota.", "insufficient_quota", "insufficient_quota"),
     InsufficientCredits, "out of quota"),
    (oai_error(400, "Billing hard limit has been reached", "billing_hard_limit_reached"), InsufficientCredits,
     "out of quota"),
    (oai_error(401, f"Incorrect API key provided: {KEY[:8]}*****{KEY[-4:]}.", "invalid_api_key"), AuthError,
     "OPENAI_API_KEY"),
    (oai_error(403, "Your organization must be verified to use the model `gpt-image-1`."), AuthError, "(403)"),
    (oai_error(404, "The model does not exist", "model_not_found"), ModelNotFound, "gpt-image-1"),
    (oai_error(413, "Request too large"), PayloadTooLarge, "413"),
    (oai_error(400, "Invalid value: 'huge'.", "invalid_value"), InvalidRequest, "Invalid value: 'huge'."),
])
def test_error_answers_are_mapped_and_never_retried(response, exc, text):
    rec = Recorder(response)
    [result] = run(gen(rec), t2i())
    assert type(result) is exc and text in str(result) and len(rec.requests) == 1
    assert KEY[:8] not in str(result) and "\n" not in str(result)


def test_429_is_retried_honouring_retry_after_ms(sleeps):
    rec = Recorder(oai_error(429, "Rate limit reached", "rate_limit_exceeded",
                             headers={"retry-after-ms": "1500", "retry-after": "2"}), as_asked)
    [image] = run(gen(rec), t2i())
    assert image.finish_reason == "SUCCESS" and len(rec.requests) == 2
    assert sleeps[0] == 1.5


@pytest.mark.parametrize("failure", [oai_error(500, "The server had an error", kind="server_error"),
                                     httpx.Response(502, text="bad gateway"), httpx.ConnectError("refused")])
def test_server_and_network_failures_are_retried_then_reported(failure, sleeps):
    rec = Recorder(failure)
    [result] = run(gen(rec), t2i())
    assert isinstance(result, ProviderUnavailable) and not isinstance(result, RateLimited)
    assert len(rec.requests) == 4


def test_a_key_echoed_in_an_error_is_scrubbed():
    rec = Recorder(oai_error(400, f"bad header Authorization: Bearer {KEY} (key {KEY})"))
    [result] = run(gen(rec), t2i())
    assert KEY not in str(result) and "********" in str(result)


def test_the_key_is_in_no_repr():
    g = gen(Recorder(as_asked))
    assert KEY not in repr(g.provider("openai")) + repr(g)


# --- the real CLI against the fake server ----------------------------------------------------------

CLI_KEY = "sk-test-openai-123"


@pytest.fixture
def fake():
    server = FakeOpenAI(api_key=CLI_KEY)
    server.url = server.start()
    yield server
    server.stop()


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "abby.toml", '[storage]\nroot = "store"\nmax_user_daily_gens = 4\n'
                                                '[cli]\ndefault_user = "alice"\n[generation]\nprovider = "openai"\n')


def abby(cfg, fake, *args, key=CLI_KEY):
    env = {"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": key}
    result = run_abby("--config", str(cfg), *args, env=env)
    assert key[:8] not in result.stdout + result.stderr, "the API key leaked into the output"
    assert "Traceback" not in result.stderr
    return result


def daily_left(cfg, fake):
    return json.loads(abby(cfg, fake, "quota", "--user", "alice", "--json").stdout)["daily"]["remaining"]


def test_cli_generates_stores_and_records_with_openai(cfg, fake, tmp_path):
    log = tmp_path / "abby.log"
    result = abby(cfg, fake, "--log-file", str(log), "generate", "a lighthouse", "--model", "dall-e-3",
                  "--count", "2", "--aspect", "16:9", "--json")
    assert result.returncode == 0, result.stderr
    images = json.loads(result.stdout)["images"]
    assert len(images) == 2 and len(fake.requests) == 2  # dall-e-3 makes one image a request
    assert [r["json"]["n"] for r in fake.requests] == [1, 1]
    with Image.open(images[0]["path"]) as img:
        assert img.size == (1792 // 8, 1024 // 8)
    info = json.loads(abby(cfg, fake, "info", str(images[0]["id"]), "--json").stdout)
    meta = info["metadata"]
    assert meta["provider"] == "openai" and meta["model"] == "dall-e-3"
    assert meta["revised_prompt"] == "a lighthouse, revised" and meta["request_id"].startswith("req_")
    assert info["embedded"] == meta
    history = json.loads(abby(cfg, fake, "history", "--json").stdout)
    assert [h["provider"] for h in history] == ["openai", "openai"]
    assert {h["outcome"] for h in history} == {"success"}
    ledger = b"".join(p.read_bytes() for p in (tmp_path / "store" / ".abby").glob("ledger.sqlite3*"))
    stored = b"".join(Path(i["path"]).read_bytes() for i in images)
    assert CLI_KEY.encode() not in ledger + stored + log.read_bytes()


def test_cli_failures_exit_with_their_codes_and_give_the_slot_back(cfg, fake, tmp_path):
    fake.script.append(FakeOpenAI.error(429, "Rate limit reached", "rate_limit_exceeded",
                                        headers={"retry-after-ms": "10"}))
    retried = abby(cfg, fake, "generate", "x", "--count", "2", "--format", "jpeg")
    assert retried.returncode == 0, retried.stderr
    assert "rate-limiting requests (429)" in retried.stderr and "retrying in 0.0 s" in retried.stderr
    assert len(fake.requests) == 2 and fake.requests[1]["json"]["n"] == 2
    fake.script.append(FakeOpenAI.error(400, "Your request was rejected by the safety system.", "moderation_blocked"))
    filtered = abby(cfg, fake, "generate", "x")
    assert filtered.returncode == 5 and "content filter" in filtered.stderr
    wrong = abby(cfg, fake, "generate", "x", key="sk-wrong-key-0000")
    assert wrong.returncode == 4 and "(401)" in wrong.stderr and "OPENAI_API_KEY" in wrong.stderr
    assert "0000" not in wrong.stderr  # not even the fragment the API quotes back
    fake.script += [FakeOpenAI.error(500, "The server had an error", kind="server_error",
                                     headers={"retry-after-ms": "1"})] * 4
    down = abby(cfg, fake, "generate", "x")
    assert down.returncode == 1 and "internal error (500)" in down.stderr
    assert daily_left(cfg, fake) == 2  # only the two stored images took a slot
    assert len(list((tmp_path / "store" / "images").rglob("*.jpg"))) == 2


def test_cli_img2img_dry_run_and_refusals(cfg, fake, tmp_path):
    photo = tmp_path / "photo.webp"
    photo.write_bytes(picture(64, 64, "WEBP"))
    dry = abby(cfg, fake, "img2img", str(photo), "make it blue", "--model", "dall-e-2", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    [sent] = json.loads(dry.stdout)["requests"]
    assert sent["url"] == fake.url + "/images/edits" and sent["headers"]["Authorization"] == "Bearer ********"
    assert sent["multipart"]["image"].endswith("bytes image/png>") and fake.requests == []
    edit = abby(cfg, fake, "img2img", str(photo), "make it blue", "--model", "dall-e-2", "--json")
    assert edit.returncode == 0, edit.stderr
    assert fake.requests[0]["files"]["image"][2].startswith(b"\x89PNG")
    for args, text in [(("generate", "x", "--seed", "1"), "--seed is not accepted by OpenAI"),
                       (("upscale", str(photo)), "provider openai cannot do upscale; providers that can: "),
                       (("img2img", str(photo), "x", "--strength", "0.4"), "--strength is not accepted by OpenAI")]:
        refused = abby(cfg, fake, *args)
        assert refused.returncode == 2 and text in refused.stderr and refused.stderr.count("\n") == 1
    assert len(fake.requests) == 1
