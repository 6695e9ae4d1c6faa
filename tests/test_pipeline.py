"""The generation pipeline: reserve, call, check, store with metadata, confirm or refund."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from PIL import Image

from abbycli import DailyLimitReached, UserQuotaExceeded
from abbycli.errors import ContentFiltered, ProviderUnavailable
from abbycli.generation.imaging import read_metadata
from abbycli.generation.request import ImageRequest
from abbycli.history import query
from abbycli.pipeline import generate
from stability_helpers import Recorder, err, gen, image_bytes, ok_image, run_pipeline, small_store


@pytest.fixture
def sm(root):
    with small_store(root) as store:
        yield store


def test_generate_stores_the_image_with_metadata_and_counts_one_slot(sm):
    rec = Recorder(lambda: ok_image(seed="1234"))
    req = ImageRequest("text-to-image", prompt="A red fox, at dawn", negative_prompt="rain", style_preset="anime",
                       seed=0)
    result = run_pipeline(sm, rec, req)
    assert result.exit_code == 0
    [stored] = result.stored
    assert stored.path.name == "a-red-fox-at-dawn-1.png"
    meta = stored.metadata
    assert meta["prompt"] == "A red fox, at dawn" and meta["seed"] == 1234
    assert {meta[k] for k in ("model", "style_preset", "provider", "operation", "finish_reason")} == {
        "core", "anime", "stability", "text-to-image", "SUCCESS"}
    assert meta["negative_prompt"] == "rain" and "created_at" in meta
    embedded = read_metadata(stored.path.read_bytes())
    assert embedded == meta
    with Image.open(stored.path) as img:  # other tools see the parameters too
        assert img.text["parameters"].startswith("A red fox, at dawn\nNegative prompt: rain\n")
        assert "Seed: 1234" in img.text["parameters"]
    status = sm.get_quota_status("alice")
    assert status["daily"]["used"] == 1 and status["daily"]["remaining"] == 2
    assert status["user"]["used_bytes"] == stored.size and status["user"]["reserved_bytes"] == 0
    assert sm.check().problems == []


def test_at_the_daily_limit_no_request_is_sent(sm):
    for _ in range(3):
        sm.quota.confirm(sm.quota.reserve_generation("alice"))
    rec = Recorder(ok_image)
    with pytest.raises(DailyLimitReached):
        run_pipeline(sm, rec, ImageRequest("text-to-image", prompt="x"))
    assert rec.requests == []


def test_asking_for_more_than_is_left_is_refused_whole(sm):
    rec = Recorder(ok_image)
    with pytest.raises(DailyLimitReached, match="4 generations were asked for but 3"):
        run_pipeline(sm, rec, ImageRequest("text-to-image", prompt="x", count=4))
    assert rec.requests == [] and sm.get_quota_status("alice")["daily"]["remaining"] == 3


def test_at_the_storage_limit_no_request_is_sent(sm):
    sm.store(image_bytes() + b"\0" * (5 * 1024 * 1024 - len(image_bytes()) - 1000), "alice")
    rec = Recorder(ok_image)
    with pytest.raises(UserQuotaExceeded):
        run_pipeline(sm, rec, ImageRequest("text-to-image", prompt="x"))
    assert rec.requests == []


def test_filtered_images_are_not_stored_and_refunded(sm):
    rec = Recorder(lambda: ok_image(finish="CONTENT_FILTERED"))
    result = run_pipeline(sm, rec, ImageRequest("text-to-image", prompt="x"))
    assert isinstance(result.outcomes[0].error, ContentFiltered) and result.exit_code == 5
    assert result.stored == [] and sm.list_images() == []
    status = sm.get_quota_status("alice")
    assert status["daily"]["remaining"] == 3 and status["user"]["reserved_bytes"] == 0


def test_failures_are_refunded_and_partial_success_is_kept(sm):
    rec = Recorder(ok_image, err(400, errors=["nope"]), ok_image)
    result = run_pipeline(sm, rec, ImageRequest("text-to-image", prompt="x", count=3), concurrency=1)
    assert len(result.stored) == 2 and result.exit_code == 4
    daily = sm.get_quota_status("alice")["daily"]
    assert (daily["used"], daily["in_progress"], daily["remaining"]) == (2, 0, 1)


def test_provider_down_refunds_everything(sm):
    rec = Recorder(httpx.Response(503))
    result = run_pipeline(sm, rec, ImageRequest("text-to-image", prompt="x"))
    assert isinstance(result.outcomes[0].error, ProviderUnavailable)
    status = sm.get_quota_status("alice")
    assert status["daily"]["remaining"] == 3 and status["user"]["reserved_bytes"] == 0


def test_an_interrupted_generation_gives_its_slot_back(sm):
    async def handler(request):
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        run_pipeline(sm, handler, ImageRequest("text-to-image", prompt="x"))
    assert sm.get_quota_status("alice")["daily"]["remaining"] == 3


def test_local_upscale_takes_no_daily_slot_but_obeys_storage(sm):
    result = run_pipeline(sm, Recorder(httpx.Response(500)), ImageRequest("upscale", image=image_bytes(40, 20),
                                                                             width=400), key=None)
    [stored] = result.stored
    with Image.open(stored.path) as img:
        assert img.size == (400, 200)
    assert stored.metadata["provider"] == "local" and stored.metadata["operation"] == "upscale"
    assert sm.get_quota_status("alice")["daily"]["remaining"] == 3


def test_paid_upscale_counts_one_slot(sm):
    run_pipeline(sm, Recorder(lambda: ok_image(160, 80)), ImageRequest("upscale", image=image_bytes(40, 20),
                                                                          mode="fast"))
    assert sm.get_quota_status("alice")["daily"]["used"] == 1


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_their_metadata_as_xmp(sm, fmt):
    rec = Recorder(lambda: ok_image(fmt=fmt))
    [stored] = run_pipeline(sm, rec, ImageRequest("text-to-image", prompt="x", output_format=fmt)).stored
    assert stored.format == fmt and read_metadata(stored.path.read_bytes())["prompt"] == "x"
    with Image.open(stored.path) as img:
        img.load()
        assert b"abby:parameters" in (img.info["xmp"] if isinstance(img.info["xmp"], bytes)
                                      else img.info["xmp"].encode())


def cancel_when(sm, recorder, req, ready, **kw):
    """Run the pipeline as a task, cancel it once ``ready()`` is true, return (outcomes, error)."""
    outcomes = []

    async def go():
        async with gen(recorder) as g:
            task = asyncio.ensure_future(generate(sm, g, req, "alice", outcomes=outcomes, **kw))
            while not ready():
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    return outcomes


def test_a_cancelled_run_records_each_unmade_image_and_refunds_it(sm):
    hang = asyncio.Event()

    async def handler(request):
        if handler.calls:
            await hang.wait()  # every request after the first never ends
        handler.calls += 1
        return ok_image()

    handler.calls = 0
    outcomes = cancel_when(sm, handler, ImageRequest("text-to-image", prompt="x", count=3),
                           lambda: sm.list_images() and handler.calls >= 1, concurrency=1)
    assert [o.stored is not None for o in outcomes] == [True]
    assert sorted(r["outcome"] for r in query(sm)) == ["interrupted", "interrupted", "success"]
    assert {r["error"] for r in query(sm) if r["outcome"] == "interrupted"} == {"interrupted before the image was made"}
    status = sm.get_quota_status("alice")
    assert (status["daily"]["used"], status["daily"]["in_progress"]) == (1, 0)
    assert status["user"]["reserved_bytes"] == 0


def test_an_image_being_written_when_cancelled_is_kept_and_reported(sm, monkeypatch):
    writing = threading.Event()
    real_store = sm.store

    def slow_store(*args, **kwargs):
        writing.set()
        time.sleep(0.3)  # the cancel arrives while the thread writes
        return real_store(*args, **kwargs)

    monkeypatch.setattr(sm, "store", slow_store)
    outcomes = cancel_when(sm, Recorder(ok_image), ImageRequest("text-to-image", prompt="x"), writing.is_set)
    [outcome] = outcomes
    assert outcome.stored is not None and outcome.stored.path.is_file()
    status = sm.get_quota_status("alice")
    assert (status["daily"]["used"], status["daily"]["in_progress"], status["user"]["reserved_bytes"]) == (1, 0, 0)
    assert [r["outcome"] for r in query(sm)] == ["success"]
