"""What the provider seam guarantees whatever a provider or its backend does: found by
trying abby as a hostile user would (issue 10's adversarial try-out)."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib

import httpx
import pytest

from abbycli.errors import InvalidInput, MalformedResponse, ProviderError, ProviderUnavailable
from abbycli.generation.provider import Provider
from abbycli.generation.request import GeneratedImage, ImageRequest
from abbycli.pipeline import generate as pipeline_generate
from conftest import run_abby, write_config
from stability_helpers import KEY, Recorder, gen, image_bytes, ok_image, run_pipeline, small_store


@pytest.fixture
def sm(root):
    with small_store(root) as store:
        yield store


def daily_used(sm, user="alice"):
    return sm.get_quota_status(user)["daily"]["used"]


def test_a_paid_image_whose_metadata_cannot_be_embedded_is_still_stored(sm):
    """A JPEG's XMP segment holds 64 KiB: a long prompt (escaped, doubled by a negative prompt)
    used to make the store fail AFTER the paid request, refund the slot, and let the user
    spend credits forever. The image is now stored with its parameters in the ledger."""
    prompt = "&" * 9000  # each & becomes &amp; in the XMP
    rec = Recorder(lambda: ok_image(fmt="jpeg"))
    result = run_pipeline(sm, rec, ImageRequest("text-to-image", prompt=prompt, negative_prompt=prompt,
                                                output_format="jpeg"))
    [outcome] = result.outcomes
    assert outcome.error is None and outcome.stored is not None
    assert any("not embedded in the file" in n for n in outcome.image.notes)
    assert sm.get_image(outcome.stored.id).metadata["prompt"] == prompt
    assert daily_used(sm) == 1  # spent, as it was paid for


def test_text_a_server_echoes_back_is_scrubbed_of_the_key_before_it_is_stored(sm):
    def echo(request):
        response = ok_image()
        response.headers["x-request-id"] = "req " + request.headers["authorization"]
        return response

    result = run_pipeline(sm, echo, ImageRequest("text-to-image", prompt="a cat"))
    stored = result.outcomes[0].stored
    assert stored is not None
    assert KEY not in json.dumps(sm.get_image(stored.id).metadata)
    with sm.open_image(stored) as fh:
        assert KEY.encode() not in fh.read()
    assert KEY.encode() not in (sm.root / ".abby" / "ledger.sqlite3").read_bytes()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's first bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_a_provider_image_claiming_too_many_pixels_is_refused_from_its_header(sm):
    bomb = httpx.Response(200, content=_png_header_only(20_000, 20_000),
                          headers={"content-type": "image/png", "finish-reason": "SUCCESS"})
    result = run_pipeline(sm, Recorder(bomb), ImageRequest("text-to-image", prompt="a cat"))
    error = result.outcomes[0].error
    assert isinstance(error, MalformedResponse) and "20000x20000" in str(error)
    assert daily_used(sm) == 0  # refunded


def test_a_json_answer_nested_absurdly_deep_is_a_malformed_answer(sm):
    deep = httpx.Response(200, content=b"[" * 200_000, headers={"content-type": "application/json"})
    rec = Recorder(deep)
    result = run_pipeline(sm, rec, ImageRequest("text-to-image", prompt="x", model="stable-diffusion-xl-1024-v1-0"))
    assert isinstance(result.outcomes[0].error, MalformedResponse)
    assert daily_used(sm) == 0


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_larger_than_abby_reads_is_refused_without_holding_it(sm, monkeypatch, declared):
    from abbycli.generation import http

    monkeypatch.setattr(http, "MAX_BODY_BYTES", 50_000)

    async def chunks():  # no Content-Length: the cap must hold while reading
        for _ in range(100):
            yield b"\0" * 10_000

    def answer(request):
        body = b"\0" * 1_000_000 if declared else chunks()
        return httpx.Response(200, content=body, headers={"content-type": "image/png"})

    result = run_pipeline(sm, answer, ImageRequest("text-to-image", prompt="x"))
    error = result.outcomes[0].error
    assert isinstance(error, MalformedResponse) and "more than the 50,000" in str(error)
    assert daily_used(sm) == 0


def test_a_retry_after_longer_than_abby_would_wait_fails_at_once(sm):
    busy = httpx.Response(503, json={"errors": ["busy"]}, headers={"retry-after": "99999999"})
    rec = Recorder(busy)
    result = run_pipeline(sm, rec, ImageRequest("text-to-image", prompt="x"))
    assert isinstance(result.outcomes[0].error, ProviderUnavailable)
    assert len(rec.requests) == 1


class Garbage(Provider):
    """A plugin whose run() misbehaves in the way ``mode`` says."""

    name = "garbage"
    title = "garbage"
    operations = ("text-to-image", "upscale")
    mode = ""

    def prepare(self, req):
        return req.with_(model="g-1")

    def describe(self, req):
        return []

    def is_free(self, req):
        return self.mode == "free-extra"

    async def run(self, req, *, user_id, concurrency, progress, on_images):
        good = GeneratedImage(image_bytes(), "png", 10**30, "SUCCESS", "g-1")
        if self.mode == "raises":
            raise KeyError("sk-plugin-secret")
        if self.mode == "junk":
            await on_images(["not an image", None])
            return ["not an image", None]
        if self.mode == "silent":  # returns its images without handing them over
            return [good]
        if self.mode == "fewer":
            await on_images([good])
            return [good]
        if self.mode == "free-extra":
            images = [GeneratedImage(image_bytes(), "png", None, "SUCCESS", "g-1") for _ in range(6)]
            await on_images(images)
            return images
        raise AssertionError(self.mode)


def run_garbage(sm, mode, count=1, operation="text-to-image"):
    async def go():
        g = gen(Recorder(ok_image))
        g._providers["garbage"] = Garbage({})
        g._providers["garbage"].mode = mode
        req = ImageRequest(operation, prompt="x" if operation != "upscale" else None, count=count,
                           provider="garbage", image=image_bytes() if operation == "upscale" else None)
        async with g:
            return await pipeline_generate(sm, g, req, "alice")
    return asyncio.run(go())


@pytest.mark.parametrize("mode, count, stored, message", [
    ("raises", 2, 0, "the garbage provider failed unexpectedly (KeyError"),
    ("junk", 2, 0, "handed over str instead of image bytes"),
    ("silent", 1, 1, None),
    ("fewer", 3, 1, "returned fewer images than asked for"),
])
def test_a_misbehaving_provider_gives_errors_per_image_never_a_crash(sm, mode, count, stored, message):
    result = run_garbage(sm, mode, count)
    assert len(result.outcomes) == count
    assert len(result.stored) == stored
    errors = [o.error for o in result.outcomes if o.error]
    assert all(isinstance(e, ProviderError) for e in errors)
    if message:
        assert message in str(errors[0]) and result.exit_code == 1
    assert daily_used(sm) == stored  # every image not stored gave its slot back
    assert all(o.image.seed is None for o in result.outcomes if o.image)  # 10**30 is no seed


def test_a_free_provider_cannot_store_more_images_than_asked(sm):
    result = run_garbage(sm, "free-extra", operation="upscale")
    assert len(result.stored) == 1 and result.extra == 5


@pytest.mark.parametrize("url, message", [
    ("http://abby:pw@127.0.0.1:7860", "must not hold a user name or password"),
    ("http://127.0.0.1:99999", "is not a valid URL"),
    ("http://[::1", "is not a valid URL"),
    ("http://127.0.0.1:7860/\nx", "control characters"),
    ("http://:7860", "has no host"),
])
def test_a_provider_url_is_checked_when_the_config_loads(tmp_path, url, message):
    cfg = write_config(tmp_path / "abby.toml", f"[providers.automatic1111]\napi_host = {json.dumps(url)}\n")
    result = run_abby("--config", str(cfg), "providers")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "pw" not in result.stderr.replace("password", "")


def test_every_provider_secret_is_scrubbed_from_a_last_resort_message(tmp_path, monkeypatch):
    """A message abby did not write itself (a plugin's error, say) is scrubbed of every secret the
    settings hold, not only Stability's key."""
    from abbycli.config import load_settings

    cfg = write_config(tmp_path / "abby.toml", '[providers.openai]\napi_key = "sk-openai-secret-55"\n'
                                               '[providers.automatic1111]\nusername = "u"\npassword = "a1-pass-66"\n'
                                               '[storage]\nledger_url = "postgresql://abby:pg-pass-77@db/abby"\n')
    secrets = load_settings(cfg, env={"COMFY_API_KEY": "comfy-key-88"}).secrets()
    assert {"sk-openai-secret-55", "a1-pass-66", "pg-pass-77", "comfy-key-88"} <= set(secrets)


def test_a_plugin_that_exits_on_import_does_not_end_abby(tmp_path):
    from abbycli.errors import ConfigError
    from abbycli.generation import provider as registry

    class Point:
        name, value = "quits", "quits:Provider"

        def load(self):
            raise SystemExit(7)

    registry._found = {"quits": Point()}
    try:
        with pytest.raises(ConfigError, match="could not be loaded"):
            registry.load("quits")
    finally:
        registry._found = None


def test_an_image_input_refused_for_a_provider_image_is_not_blamed_on_the_user():
    from abbycli.generation.imaging import inspect

    with pytest.raises(InvalidInput):
        inspect(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(MalformedResponse):
        inspect(b"\x89PNG\r\n\x1a\nbroken", from_provider=True)
