"""The Stability client with httpx.MockTransport: every endpoint's request, every error, retries."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from PIL import Image

from abbycli.errors import (AuthError, ConfigError, InsufficientCredits, InvalidInput, InvalidRequest,
                            MalformedResponse, ModelNotFound, ModerationRejected, PayloadTooLarge,
                            ProviderUnavailable, RateLimited)
from abbycli.generation.generator import ImageGenerator
from abbycli.generation.request import ImageRequest
from stability_helpers import KEY, Recorder, err, gen, generate, image_bytes, multipart, ok_image, run

# --- requests, endpoint by endpoint ------------------------------------------------------

def test_core_text_to_image_request_is_exactly_as_documented():
    rec = Recorder(ok_image)
    [image] = run(generate(gen(rec), ImageRequest("text-to-image", prompt="a lighthouse", seed=0, style_preset="anime",
                                                  aspect_ratio="16:9", negative_prompt="fog"), user_id="alice"))
    req = rec.requests[0]
    assert (req.method, req.url.path) == ("POST", "/v2beta/stable-image/generate/core")
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["accept"] == "image/*"
    assert req.headers["stability-client-id"] == "abby" and req.headers["stability-client-version"]
    user_hash = req.headers["stability-client-user-id"]
    assert "alice" not in user_hash and len(user_hash) == 32
    assert req.headers["content-type"].startswith("multipart/form-data")
    fields, files = multipart(req)
    assert fields == {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": "0", "style_preset": "anime",
                      "output_format": "png", "aspect_ratio": "16:9"}
    assert files == {}
    assert image.seed == 77 and image.finish_reason == "SUCCESS" and image.format == "png"


def test_unset_options_are_left_out_not_sent_empty():
    rec = Recorder(ok_image)
    run(generate(gen(rec), ImageRequest("text-to-image", prompt="x")))
    assert multipart(rec.requests[0])[0] == {"prompt": "x", "output_format": "png"}


def test_user_hash_is_stable_and_keyed():
    a, b = gen(Recorder(ok_image)).client, gen(Recorder(ok_image), key="sk-other").client
    assert a.user_hash("alice") == a.user_hash("alice") != a.user_hash("bob")
    assert a.user_hash("alice") != b.user_hash("alice")


@pytest.mark.parametrize("model", ["sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash"])
def test_sd3_models_go_to_the_sd3_endpoint_with_model(model):
    rec = Recorder(ok_image)
    run(generate(gen(rec), ImageRequest("text-to-image", prompt="x", model=model, output_format="jpeg")))
    assert rec.requests[0].url.path == "/v2beta/stable-image/generate/sd3"
    fields, _ = multipart(rec.requests[0])
    assert fields["model"] == model and fields["mode"] == "text-to-image" and fields["output_format"] == "jpeg"


def test_ultra_and_sd3_image_to_image():
    src = image_bytes(300, 200)
    rec = Recorder(ok_image)
    run(generate(gen(rec), ImageRequest("image-to-image", prompt="blue", image=src, model="ultra", strength=0.7)))
    fields, files = multipart(rec.requests[0])
    assert rec.requests[0].url.path == "/v2beta/stable-image/generate/ultra"
    assert fields["strength"] == "0.7" and files["image"] == src
    run(generate(gen(rec), ImageRequest("image-to-image", prompt="blue", image=src)))  # default model
    fields, files = multipart(rec.requests[1])
    assert fields["mode"] == "image-to-image" and fields["model"] == "sd3.5-large" and fields["strength"] == "0.5"
    assert "aspect_ratio" not in fields and files["image"] == src


def test_v1_text_to_image_is_json_with_samples_and_reads_artifacts():
    artifacts = [{"base64": base64.b64encode(image_bytes()).decode(), "finishReason": "SUCCESS", "seed": 5 + i}
                 for i in range(3)]
    rec = Recorder(httpx.Response(200, json={"artifacts": artifacts}))
    images = run(generate(gen(rec), ImageRequest("text-to-image", prompt="a fox", negative_prompt="rain",
                                                 model="stable-diffusion-xl-1024-v1-0", width=1152, height=896,
                                                 count=3, seed=0)))
    req = rec.requests[0]
    assert req.url.path == "/v1/generation/stable-diffusion-xl-1024-v1-0/text-to-image"
    assert req.headers["accept"] == "application/json" and req.headers["content-type"] == "application/json"
    assert json.loads(req.content) == {
        "text_prompts": [{"text": "a fox", "weight": 1.0}, {"text": "rain", "weight": -1.0}],
        "width": 1152, "height": 896, "samples": 3, "seed": 0}
    assert len(rec.requests) == 1 and [i.seed for i in images] == [5, 6, 7]


def test_v1_image_to_image_is_multipart_and_resizes_to_an_sdxl_size():
    artifacts = [{"base64": base64.b64encode(image_bytes()).decode(), "finishReason": "SUCCESS", "seed": 1}]
    rec = Recorder(httpx.Response(200, json={"artifacts": artifacts}))
    [image] = run(generate(gen(rec), ImageRequest("image-to-image", prompt="a fox", image=image_bytes(640, 480),
                                                  model="stable-diffusion-xl-1024-v1-0", strength=0.4)))
    req = rec.requests[0]
    assert req.url.path == "/v1/generation/stable-diffusion-xl-1024-v1-0/image-to-image"
    fields, files = multipart(req)
    assert fields == {"text_prompts[0][text]": "a fox", "text_prompts[0][weight]": "1", "image_strength": "0.4",
                      "init_image_mode": "IMAGE_STRENGTH", "samples": "1"}
    with Image.open(io.BytesIO(files["init_image"])) as sent:
        assert sent.size == (1152, 896)  # the SDXL size closest to 4:3
    assert any("resized from 640x480 to 1152x896" in n for n in image.notes)


def test_fast_upscale_and_an_exact_width():
    rec = Recorder(lambda: ok_image(256, 128))
    [image] = run(generate(gen(rec), ImageRequest("upscale", image=image_bytes(64, 32), mode="fast", width=200)))
    req = rec.requests[0]
    assert req.url.path == "/v2beta/stable-image/upscale/fast" and req.headers["accept"] == "image/*"
    assert multipart(req)[0] == {"output_format": "png"}
    with Image.open(io.BytesIO(image.data)) as out:
        assert out.size == (200, 100)  # the provider's 4x, scaled down to exactly what was asked
    assert any("scaled down to 200x100" in n for n in image.notes)


def test_fast_upscale_shrinks_an_input_above_one_megapixel_first():
    rec = Recorder(lambda: ok_image(64, 64))
    run(generate(gen(rec), ImageRequest("upscale", image=image_bytes(2000, 1000), mode="fast")))
    with Image.open(io.BytesIO(multipart(rec.requests[0])[1]["image"])) as sent:
        assert sent.width <= 1536 and sent.width * sent.height <= 1_048_576


def test_conservative_upscale_sends_prompt_and_creativity():
    rec = Recorder(lambda: ok_image(256, 256))
    run(generate(gen(rec), ImageRequest("upscale", image=image_bytes(), mode="conservative", prompt="crisp",
                                        creativity=0.3, seed=0)))
    fields, _ = multipart(rec.requests[0])
    assert rec.requests[0].url.path == "/v2beta/stable-image/upscale/conservative"
    assert fields == {"output_format": "png", "prompt": "crisp", "seed": "0", "creativity": "0.3"}


def test_creative_upscale_polls_until_done_and_reports_progress():
    job = "a" * 64
    rec = Recorder(httpx.Response(200, json={"id": job}),
                   httpx.Response(202, json={"id": job, "status": "in-progress"}),
                   httpx.Response(202, json={"id": job, "status": "in-progress"}),
                   ok_image(256, 256))
    seen = []
    [image] = run(generate(gen(rec, poll_interval=0.001),
                           ImageRequest("upscale", image=image_bytes(), mode="creative", prompt="crisp",
                                        style_preset="anime"), progress=seen.append))
    paths = [(r.method, r.url.path, r.headers["accept"]) for r in rec.requests]
    assert paths == [("POST", "/v2beta/stable-image/upscale/creative", "application/json")] + \
        [("GET", f"/v2beta/results/{job}", "*/*")] * 3
    assert len(seen) == 2 and "creative upscale running" in seen[0]
    assert image.format == "png"


def test_creative_upscale_gives_up_after_its_time_out():
    job = "b" * 64
    rec = Recorder(httpx.Response(200, json={"id": job}), httpx.Response(202, json={"id": job, "status": "in-progress"}))
    with pytest.raises(ProviderUnavailable, match="did not finish"):
        result = run(generate(gen(rec, poll_interval=0.001, poll_timeout=0.01),
                              ImageRequest("upscale", image=image_bytes(), mode="creative", prompt="x")))
        raise result[0]


def test_esrgan_upscale_uses_the_v1_engine_with_a_width():
    artifacts = [{"base64": base64.b64encode(image_bytes(600, 600)).decode(), "finishReason": "SUCCESS", "seed": 0}]
    rec = Recorder(httpx.Response(200, json={"artifacts": artifacts}))
    [image] = run(generate(gen(rec), ImageRequest("upscale", image=image_bytes(300, 300), mode="esrgan")))
    req = rec.requests[0]
    assert req.url.path == "/v1/generation/esrgan-v1-x2plus/image-to-image/upscale"
    assert multipart(req)[0] == {"width": "600"}
    with Image.open(io.BytesIO(image.data)) as out:
        assert out.size == (600, 600)


def test_local_upscale_needs_no_key_and_no_network():
    rec = Recorder(httpx.Response(500))
    g = gen(rec, key=None)
    [image] = run(generate(g, ImageRequest("upscale", image=image_bytes(64, 48), width=2048)))
    with Image.open(io.BytesIO(image.data)) as out:
        assert out.size == (2048, 1536)
    assert rec.requests == []
    assert (image.provider, image.model) == ("local", "local-lanczos")  # handed to the local provider


def test_balance():
    rec = Recorder(httpx.Response(200, json={"credits": 3.25}))
    assert run(gen(rec).client.balance()) == 3.25
    assert (rec.requests[0].method, rec.requests[0].url.path) == ("GET", "/v1/user/balance")


# --- refused before sending ------------------------------------------------------------------

@pytest.mark.parametrize("req, message", [
    (ImageRequest("text-to-image", prompt="x", style_preset="watercolour"), "style 'watercolour'"),
    (ImageRequest("text-to-image", prompt="x", aspect_ratio="4:3"), "aspect ratio '4:3'"),
    (ImageRequest("text-to-image", prompt="x", model="sd3.5-large", output_format="webp"), "output format 'webp'"),
    (ImageRequest("text-to-image", prompt="x", seed=4294967295), "seed must be between"),
    (ImageRequest("text-to-image", prompt="x", model="stable-diffusion-xl-1024-v1-0", width=1000, height=1000),
     "not an SDXL size"),
    (ImageRequest("text-to-image", prompt="x", model="stable-diffusion-xl-1024-v1-0", aspect_ratio="1:1"), "--aspect"),
    (ImageRequest("text-to-image", prompt="x", model="dall-e"), "unknown model"),
    (ImageRequest("text-to-image", prompt="   "), "prompt is empty"),
    (ImageRequest("text-to-image", prompt="x", count=11), "count must be between 1 and 10"),
    (ImageRequest("text-to-image", prompt="x", strength=0.5), "--strength"),
    (ImageRequest("image-to-image", prompt="x", image=image_bytes(), model="core"), "core does not do image-to-image"),
    (ImageRequest("image-to-image", prompt="x", image=b"not an image"), "not a PNG"),
    (ImageRequest("upscale", image=image_bytes(), mode="conservative"), "needs a prompt"),
    (ImageRequest("upscale", image=image_bytes(), mode="fast", width=10, factor=2), "not both"),
    (ImageRequest("upscale", image=image_bytes(), mode="creative", prompt="x", creativity=0.9), "creativity"),
    (ImageRequest("upscale", image=image_bytes(), mode="warp"), "upscale mode 'warp'"),
])
def test_invalid_values_are_refused_before_any_request(req, message):
    rec = Recorder(ok_image)
    with pytest.raises(InvalidInput, match=message):
        run(generate(gen(rec), req))
    assert rec.requests == []


def test_a_missing_key_says_how_to_set_one():
    rec = Recorder(ok_image)
    with pytest.raises(ConfigError, match="STABILITY_API_KEY"):
        run(generate(gen(rec, key=None), ImageRequest("text-to-image", prompt="x")))
    assert rec.requests == []


# --- errors and retries ------------------------------------------------------------------------

@pytest.mark.parametrize("response, exc, text", [
    (err(400, errors=["prompt: is required", "seed: too big"]), InvalidRequest, "prompt: is required; seed: too big"),
    (err(422, errors=["your prompt is too long"]), InvalidRequest, "your prompt is too long"),
    (err(401, errors=["bad key"]), AuthError, "STABILITY_API_KEY"),
    (err(402, errors=["insufficient credits"]), InsufficientCredits, "too few credits"),
    (err(403, errors=["flagged"]), ModerationRejected, "moderation"),
    (err(404, name="not_found", message="engine not found"), ModelNotFound, "does not know core"),
    (err(413, errors=["too big"]), PayloadTooLarge, "10 MiB"),
])
def test_client_errors_are_mapped_and_never_retried(response, exc, text):
    rec = Recorder(response)
    [result] = run(generate(gen(rec), ImageRequest("text-to-image", prompt="x")))
    assert isinstance(result, exc) and text in str(result)
    assert KEY not in str(result)
    assert len(rec.requests) == 1
    assert result.exit_code == 4


def test_429_then_200_is_retried_honouring_retry_after(sleeps):
    rec = Recorder(httpx.Response(429, headers={"Retry-After": "7"}, json={"errors": ["slow down"]}), ok_image)
    [image] = run(generate(gen(rec), ImageRequest("text-to-image", prompt="x")))
    assert image.finish_reason == "SUCCESS" and len(rec.requests) == 2
    assert 7 in sleeps


@pytest.mark.parametrize("failure", [
    httpx.Response(500, json={"errors": ["boom"]}),
    httpx.Response(503, text="unavailable"),
    httpx.ConnectError("refused"),
    httpx.ReadTimeout("slow"),
])
def test_server_and_network_failures_are_retried_then_reported(failure):
    rec = Recorder(failure)
    [result] = run(generate(gen(rec, max_attempts=3), ImageRequest("text-to-image", prompt="x")))
    assert isinstance(result, ProviderUnavailable) and result.exit_code == 1
    assert len(rec.requests) == 3
    recovering = Recorder(failure, ok_image)
    [image] = run(generate(gen(recovering), ImageRequest("text-to-image", prompt="x")))
    assert image.finish_reason == "SUCCESS"


def test_rate_limit_that_never_ends_is_bounded():
    rec = Recorder(httpx.Response(429, json={"errors": ["slow"]}))
    [result] = run(generate(gen(rec, max_attempts=4), ImageRequest("text-to-image", prompt="x")))
    assert isinstance(result, RateLimited) and len(rec.requests) == 4


@pytest.mark.parametrize("response, text", [
    (httpx.Response(200, content=b"<html>oops</html>", headers={"content-type": "image/png"}), "not a PNG"),
    (httpx.Response(200, content=image_bytes()[:60], headers={"content-type": "image/png"}), "damaged"),
    (httpx.Response(200, content=b"{not json", headers={"content-type": "application/json"}), "not JSON"),
    (httpx.Response(200, json={"image": "%%%", "finish_reason": "SUCCESS"}), "base64"),
])
def test_malformed_answers_are_reported(response, text):
    rec = Recorder(response)
    [result] = run(generate(gen(rec), ImageRequest("text-to-image", prompt="x")))
    assert isinstance(result, MalformedResponse) and text in str(result)


def test_json_image_answers_are_read_too():
    body = {"image": base64.b64encode(image_bytes()).decode(), "finish_reason": "CONTENT_FILTERED", "seed": 9}
    rec = Recorder(httpx.Response(200, json=body, headers={"content-type": "application/json; type=image/png"}))
    [image] = run(generate(gen(rec), ImageRequest("text-to-image", prompt="x")))
    assert image.filtered and image.seed == 9


def test_count_runs_concurrently_within_the_limit_over_one_client():
    in_flight, peak = 0, 0

    async def handler(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return ok_image()

    g = ImageGenerator(KEY, "https://api.test", transport=httpx.MockTransport(handler))
    images = run(generate(g, ImageRequest("text-to-image", prompt="x", count=8), concurrency=3))
    assert len(images) == 8 and peak == 3


def test_seed_facade_returns_tuples_and_never_raises():
    ok = run(gen(Recorder(ok_image)).text_to_image("a cat", style_preset="anime"))
    assert ok[0] is True and ok[1].startswith(b"\x89PNG") and "seed 77" in ok[2]
    filtered = run(gen(Recorder(lambda: ok_image(finish="CONTENT_FILTERED"))).text_to_image("a cat"))
    assert filtered[:2] == (False, None) and "content filter" in filtered[2]
    bad = run(gen(Recorder(err(401, errors=["no"]))).image_to_image(image_bytes(), "x"))
    assert bad[:2] == (False, None) and "refused" in bad[2]
    invalid = run(gen(Recorder(ok_image)).upscale_image(b"junk", width=100))
    assert invalid[:2] == (False, None)
    local = run(ImageGenerator(None).upscale_image(image_bytes(10, 10), width=30))
    assert local[0] is True


def test_the_key_is_in_no_repr():
    g = gen(Recorder(ok_image))
    assert KEY not in repr(g) and KEY not in repr(g.client)


# --- hardening: pixel limits, clean messages, the key, retries ------------------------------

def huge_png(side=12000):
    """A real 144-megapixel PNG of about 17 KB: cheap to hold, ruinous to decode and upscale."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def huge():
    return huge_png()


@pytest.mark.parametrize("req", [
    ImageRequest("upscale", mode="local"),
    ImageRequest("upscale", mode="fast"),
    ImageRequest("image-to-image", prompt="x", model="ultra"),
])
def test_an_input_above_the_pixel_limit_is_refused_from_its_header(huge, req):
    import warnings

    rec = Recorder(ok_image)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(InvalidInput, match=r"photo\.png is 12000x12000 \(144 megapixels\), above the limit "
                                               r"of 40 megapixels \(generation\.max_megapixels\)"):
            gen(rec).prepare(req.with_(image=huge, image_name="photo.png"))
    assert seen == [] and rec.requests == []  # Pillow never even opened it


@pytest.mark.parametrize("req, size", [
    (ImageRequest("upscale", mode="local", width=1_000_000), "1000000x500000"),
    (ImageRequest("upscale", mode="local", factor=16), "32000x16000"),
    (ImageRequest("upscale", mode="fast"), "8000x4000"),  # 4x by default, made exact locally
])
def test_an_upscale_beyond_the_pixel_limit_is_refused_before_any_work(req, size):
    rec = Recorder(ok_image)
    g = gen(rec, max_megapixels=30)
    with pytest.raises(InvalidInput, match=f"the upscaled image would be {size} .*above the limit of 30 megapixels"):
        run(generate(g, req.with_(image=image_bytes(2000, 1000))))
    assert rec.requests == []
    [image] = run(generate(gen(rec), ImageRequest("upscale", mode="local", image=image_bytes(1000, 500))))
    assert image.data  # 2000x1000 is within the default limit of 40


def test_a_raised_limit_lets_pillow_decode_without_its_bomb_warning(huge):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        req = gen(Recorder(ok_image), max_megapixels=150).prepare(
            ImageRequest("image-to-image", prompt="x", model="ultra", image=huge))
    assert req.checked and seen == []


@pytest.mark.parametrize("data", [image_bytes()[:60], image_bytes()[:33] + b"\0" * 50, b"\x89PNG\r\n\x1a\nxx"])
def test_a_broken_input_is_named_in_a_clean_message(data):
    with pytest.raises(InvalidInput) as caught:
        gen(Recorder(ok_image)).prepare(ImageRequest("upscale", mode="local", image=data, image_name="photo.png"))
    message = str(caught.value)
    assert message.startswith("photo.png is a damaged PNG image (") and "0x" not in message and "<" not in message


@pytest.mark.parametrize("model, bound", [("core", 4294967294), ("stable-diffusion-xl-1024-v1-0", 4294967295)])
def test_the_seed_bound_is_printed_as_an_exact_integer(model, bound):
    with pytest.raises(InvalidInput, match=f"seed must be between 0 and {bound} .*got {bound + 1}$"):
        gen(Recorder(ok_image)).prepare(ImageRequest("text-to-image", prompt="x", model=model, seed=bound + 1))


def test_a_key_with_surrounding_whitespace_is_sent_clean():
    rec = Recorder(ok_image)
    run(generate(gen(rec, key=f" {KEY}\t\r\n"), ImageRequest("text-to-image", prompt="x")))
    assert rec.requests[0].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("bad", [f"{KEY}\rextra", "sk-unit-sécret", f"{KEY} {KEY}", "   "])
def test_a_key_that_cannot_go_in_a_header_is_refused_without_echo(bad):
    with pytest.raises(ConfigError) as caught:
        gen(Recorder(ok_image), key=bad)
    assert caught.value.exit_code == 2 and "API key" in str(caught.value)
    assert "sk-unit" not in str(caught.value)


def test_a_header_the_http_library_refuses_is_not_retried_nor_echoed():
    from abbycli.errors import ProviderError

    rec = Recorder(httpx.LocalProtocolError(f"Illegal header value b'Bearer {KEY}\\r'"))
    [result] = run(generate(gen(rec), ImageRequest("text-to-image", prompt="x")))
    assert type(result) is ProviderError and len(rec.requests) == 1
    assert KEY not in str(result) and "Bearer" not in str(result)


@pytest.mark.parametrize("response", [
    err(400, errors=[f"invalid header: authorization: Bearer {KEY}"]),
    err(401, message=f"key {KEY} is not valid"),
    httpx.Response(502, text=f"<html>upstream said: Authorization: Bearer {KEY}</html>"),
    httpx.Response(500, text="x" * 190 + KEY),  # a key cut by the 200-character limit leaks no part of it
])
def test_a_key_echoed_in_an_error_body_is_redacted_where_the_error_is_made(response):
    rec = Recorder(response)
    [result] = run(generate(gen(rec, max_attempts=1), ImageRequest("text-to-image", prompt="x")))
    assert KEY[:10] not in str(result) and "********" in str(result)


def test_a_connection_error_message_is_redacted():
    rec = Recorder(httpx.ConnectError(f"failed while sending Bearer {KEY}"))
    [result] = run(generate(gen(rec, max_attempts=1), ImageRequest("text-to-image", prompt="x")))
    assert isinstance(result, ProviderUnavailable) and KEY not in str(result)


def test_each_retry_is_logged_with_its_wait_and_reason(sleeps, caplog):
    caplog.set_level("INFO", logger="abby")
    rec = Recorder(httpx.Response(429, headers={"Retry-After": "7"}, json={"errors": ["slow down"]}))
    [result] = run(generate(gen(rec, max_attempts=3), ImageRequest("text-to-image", prompt="x")))
    assert isinstance(result, RateLimited) and len(rec.requests) == 3
    retries = [r for r in caplog.records if r.name == "abby.providers.stability"]
    assert [r.getMessage() for r in retries] == [
        f"POST /v2beta/stable-image/generate/core failed: the API is rate-limiting requests (429): slow down; "
        f"retrying in 7.0 s (attempt {n} of 3)" for n in (2, 3)]  # none after the last attempt
    assert sleeps == [7.0, 7.0]  # the wait logged is the wait taken
    assert all(r.levelname == "WARNING" for r in retries)


def test_retries_stop_at_the_time_budget_without_a_false_promise(caplog):
    caplog.set_level("INFO", logger="abby")
    rec = Recorder(httpx.Response(503, headers={"Retry-After": "5"}, json={"errors": ["busy"]}))
    [result] = run(generate(gen(rec, retry_timeout=1.0), ImageRequest("text-to-image", prompt="x")))
    assert isinstance(result, ProviderUnavailable) and len(rec.requests) == 1
    assert not [r for r in caplog.records if r.name == "abby.providers.stability"]


def test_the_generator_is_an_async_context_manager_that_closes_its_pool():
    g = gen(Recorder(ok_image))

    async def go():
        async with g as same:
            assert same is g
            await g.generate(ImageRequest("text-to-image", prompt="x"))
            assert g.client._client is not None
        assert g.client._client is None
        await g.aclose()  # closing twice is harmless

    run(go())
